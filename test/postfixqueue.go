package test

// Helpers for the queue tests: a submission Postfix with SASL (Dovecot)
// whose mail for one domain is deferred by a greylisting MX, so that
// authenticated users' messages sit in the deferred queue.

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// DeferringSubmission is a submission Postfix whose mail for Domain waits
// in the deferred queue: Domain is routed to a fake MX that greylists
// every recipient (451 4.7.1).
type DeferringSubmission struct {
	*Postfix
	Domain    string
	MX        *MX
	passwords map[string]string
}

// StartDeferringSubmission starts Dovecot (SASL only, with users, login →
// password) and a submission Postfix that accepts authenticated users'
// mail for domain and defers it, with a retry time far beyond the test
// (queue_run_delay and the backoff times are long, so a deferred message
// stays deferred until something moves it). The instance runs until t's
// cleanup.
func StartDeferringSubmission(t testing.TB, domain string, users map[string]string, main map[string]string) *DeferringSubmission {
	t.Helper()
	return StartDeferringSubmissionNamed(t, "submission", domain, users, main)
}

// StartDeferringSubmissionNamed is StartDeferringSubmission for an
// instance called name (its host name is name.customer.test, its log
// name postfix-name), so that a test can run several side by side, each
// with its own configuration, queue, ports, Dovecot and greylisting MX.
func StartDeferringSubmissionNamed(t testing.TB, name, domain string, users map[string]string, main map[string]string) *DeferringSubmission {
	t.Helper()
	mx := StartMX(t, MXConfig{Unknown: &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 1}, Message: "greylisted, try again later"}})
	cf := map[string]string{
		"myhostname":                   name + ".customer.test",
		"transport_maps":               fmt.Sprintf("inline:{ %s=smtp:[%s }", domain, mxNexthop(mx.Addr)),
		"smtpd_sasl_auth_enable":       "yes",
		"smtpd_sasl_type":              "dovecot",
		"smtpd_sasl_path":              "private/auth",
		"smtpd_sasl_security_options":  "noanonymous",
		"smtpd_tls_auth_only":          "no",
		"smtpd_recipient_restrictions": "permit_sasl_authenticated, reject_unauth_destination",
		"queue_run_delay":              "1h",
		"minimal_backoff_time":         "1h",
		"maximal_backoff_time":         "2h",
	}
	for k, v := range main {
		cf[k] = v
	}
	p := StartPostfix(t, PostfixConfig{Name: name, Main: cf})
	StartDovecotAuth(t, DovecotConfig{Users: users, AuthSocket: filepath.Join(p.QueueDir, "private", "auth")})
	return &DeferringSubmission{Postfix: p, Domain: domain, MX: mx, passwords: users}
}

// mxNexthop turns "127.0.0.1:port" into "127.0.0.1]:port" for the
// transport's "[host]:port" form.
func mxNexthop(addr string) string {
	host, port, _ := strings.Cut(addr, ":")
	return host + "]:" + port
}

// Send submits one message as user (authenticated with SASL PLAIN) with
// envelope sender from, which may be anybody's address, and returns its
// queue ID.
func (s *DeferringSubmission) Send(t testing.TB, user, from, subject string, to ...string) string {
	t.Helper()
	r, err := Swaks(t, SwaksMail{
		Server: s.Addr, User: user, Password: s.passwords[user],
		From: from, To: to, Subject: subject, Body: "rcptguard queue test: " + subject,
	})
	if err != nil {
		t.Fatalf("swaks as %s: %v", user, err)
	}
	if r.QueueID == "" {
		t.Fatalf("swaks as %s: no queue ID in the transcript:\n%s", user, r.Transcript)
	}
	return r.QueueID
}

// WaitDeferred waits until every message in ids is in the deferred queue.
func (s *DeferringSubmission) WaitDeferred(t testing.TB, ids ...string) {
	t.Helper()
	Eventually(t, 30*time.Second, fmt.Sprintf("messages %v to be deferred", ids), func() bool {
		in := map[string]string{}
		for _, e := range s.Queue(t) {
			in[e.QueueID] = e.QueueName
		}
		for _, id := range ids {
			if in[id] != "deferred" {
				return false
			}
		}
		return true
	})
}

// QueueNames returns the queue each message of the instance is in, by ID.
func (s *DeferringSubmission) QueueNames(t testing.TB) map[string]string {
	t.Helper()
	in := map[string]string{}
	for _, e := range s.Queue(t) {
		in[e.QueueID] = e.QueueName
	}
	return in
}
