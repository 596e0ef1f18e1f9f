package test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"sort"
	"strings"
	"testing"
	"time"
)

// PolicyClient speaks the Postfix policy delegation protocol over one
// persistent connection, as one smtpd process does.
type PolicyClient struct {
	t    testing.TB
	conn net.Conn
	r    *bufio.Reader
}

// DialPolicy connects to a policy service at addr ("host:port" or
// "unix:/path"); the connection is closed at t's cleanup.
func DialPolicy(t testing.TB, addr string) *PolicyClient {
	t.Helper()
	network := "tcp"
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		network, addr = "unix", p
	}
	conn, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		t.Fatalf("policy client: %v", err)
	}
	// A hung server fails the test instead of hanging it.
	_ = conn.SetDeadline(time.Now().Add(10 * time.Minute))
	t.Cleanup(func() { conn.Close() })
	return &PolicyClient{t: t, conn: conn, r: bufio.NewReader(conn)}
}

// Ask sends one request with the given attributes (in a stable order) and
// returns the action's value, e.g. "DUNNO" or "HOLD ...".
func (c *PolicyClient) Ask(attrs map[string]string) (string, error) {
	return c.AskRaw(Render(attrs))
}

// Render writes a request as Postfix sends it: name=value lines in a
// stable order and an empty line.
func Render(attrs map[string]string) string {
	names := make([]string, 0, len(attrs))
	for k := range attrs {
		names = append(names, k)
	}
	sort.Strings(names)
	var b strings.Builder
	for _, k := range names {
		b.WriteString(k)
		b.WriteByte('=')
		b.WriteString(attrs[k])
		b.WriteByte('\n')
	}
	b.WriteByte('\n')
	return b.String()
}

// AskRaw sends raw bytes and reads one answer.
func (c *PolicyClient) AskRaw(raw string) (string, error) {
	if _, err := io.WriteString(c.conn, raw); err != nil {
		return "", err
	}
	line, err := c.r.ReadString('\n')
	if err != nil {
		return "", err
	}
	blank, err := c.r.ReadString('\n')
	if err != nil {
		return "", err
	}
	if blank != "\n" {
		return "", fmt.Errorf("policy answer not followed by an empty line: %q", blank)
	}
	action, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "action=")
	if !ok {
		return "", fmt.Errorf("policy answer %q has no action=", line)
	}
	return action, nil
}

// Must is Ask that fails the test on an error.
func (c *PolicyClient) Must(attrs map[string]string) string {
	c.t.Helper()
	a, err := c.Ask(attrs)
	if err != nil {
		c.t.Fatalf("policy request: %v", err)
	}
	return a
}

// RcptRequest is what Postfix 3.x sends at RCPT TO for an authenticated
// client, with the full attribute set.
func RcptRequest(user, sender, rcpt, queueID string) map[string]string {
	return map[string]string{
		"request":                  "smtpd_access_policy",
		"protocol_state":           "RCPT",
		"protocol_name":            "ESMTPSA",
		"helo_name":                "[192.168.1.20]",
		"queue_id":                 queueID,
		"sender":                   sender,
		"recipient":                rcpt,
		"recipient_count":          "0",
		"client_address":           "198.51.100.23",
		"client_name":              "dsl-23.example.net",
		"reverse_client_name":      "dsl-23.example.net",
		"instance":                 "1a2b.5f3c9e1d.8a7b6.0",
		"sasl_method":              "PLAIN",
		"sasl_username":            user,
		"sasl_sender":              "",
		"size":                     "0",
		"ccert_subject":            "",
		"ccert_issuer":             "",
		"ccert_fingerprint":        "",
		"ccert_pubkey_fingerprint": "",
		"encryption_protocol":      "TLSv1.3",
		"encryption_cipher":        "TLS_AES_256_GCM_SHA384",
		"encryption_keysize":       "256",
		"etrn_domain":              "",
		"stress":                   "",
		"policy_context":           "submission",
		"server_address":           "192.0.2.1",
		"server_port":              "587",
		"compatibility_level":      "3.6",
		"mail_version":             "3.7.11",
		"client_port":              "51234",
	}
}
