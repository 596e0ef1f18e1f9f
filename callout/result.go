package callout

import (
	"fmt"
	"strconv"
	"strings"
)

// Status is the verdict on one recipient address.
type Status string

// The three verdicts. Only StatusInvalid is evidence against a sender: it
// means the mailbox definitely does not exist. StatusUnknown covers every
// case where rcptguard could not decide and must never be held against
// anyone.
const (
	StatusValid   Status = "valid"
	StatusInvalid Status = "invalid"
	StatusUnknown Status = "unknown"
)

// Reason is a short, stable, machine-readable word for why a verdict was
// reached. It appears in logs, reports and the output of `rcptguard verify`.
type Reason string

// Reasons, grouped by the Status each goes with; a reason coming from the
// cache keeps its meaning.
const (
	// valid
	ReasonAccepted Reason = "accepted" // 2xx at RCPT TO

	// invalid
	ReasonBadSyntax  Reason = "bad-syntax"      // not an RFC 5321 mailbox
	ReasonNXDomain   Reason = "nxdomain"        // the domain does not exist
	ReasonNullMX     Reason = "null-mx"         // RFC 7505 "MX 0 ."
	ReasonNoMailHost Reason = "no-mail-host"    // no MX, no A, no AAAA
	ReasonNoMailbox  Reason = "mailbox-unknown" // 5xx at RCPT saying the mailbox does not exist

	// unknown
	ReasonRejected        Reason = "rejected"          // 5xx at RCPT that is not "no such mailbox" (policy, reputation, ...)
	ReasonTemporary       Reason = "temporary"         // 4xx at RCPT: greylisting, throttling, too many recipients
	ReasonMailFromRefused Reason = "mail-from-refused" // the MX refused our MAIL FROM; it is remembered for a while
	ReasonRefusesProbes   Reason = "refuses-probes"    // remembered MAIL FROM refusal: not probed again yet
	ReasonSessionRefused  Reason = "session-refused"   // 4xx/5xx at connect or EHLO on every MX host
	ReasonUnreachable     Reason = "unreachable"       // no MX host could be reached
	ReasonTimeout         Reason = "timeout"           // callout.timeout ran out
	ReasonDNSError        Reason = "dns-error"         // SERVFAIL, timeout or malformed DNS answer
	ReasonUnsafeAddress   Reason = "unsafe-address"    // the MX resolves to loopback, private, ... addresses
	ReasonCatchAll        Reason = "catch-all"         // the domain accepted a random local part
	ReasonUnchecked       Reason = "accept-unchecked"  // accepted by an MX host not shown to refuse a random local part
	ReasonAcceptAll       Reason = "accept-all"        // a provider known to accept everything and bounce later
	ReasonNoSMTPUTF8      Reason = "no-smtputf8"       // UTF-8 local part, MX does not offer SMTPUTF8
	ReasonProtocol        Reason = "protocol-error"    // the MX spoke something that is not SMTP
	ReasonCanceled        Reason = "canceled"          // the caller gave up waiting
	ReasonShutdown        Reason = "shutdown"          // the verifier is closing
)

// Reply is an SMTP reply as received from a mail server.
type Reply struct {
	Code     int    // basic reply code, e.g. 550; 0 when there was no reply
	Enhanced [3]int // RFC 3463 enhanced status code, e.g. {5,1,1}; zero when absent
	Text     string // reply text without the codes, lines joined by a space
}

// IsZero reports whether r holds no reply.
func (r Reply) IsZero() bool { return r.Code == 0 }

// EnhancedString returns the enhanced status code as "5.1.1", or "" when
// the reply carried none.
func (r Reply) EnhancedString() string {
	if r.Enhanced == [3]int{} {
		return ""
	}
	return fmt.Sprintf("%d.%d.%d", r.Enhanced[0], r.Enhanced[1], r.Enhanced[2])
}

// String formats the reply as it appeared on the wire, on one line:
// "550 5.1.1 no such user".
func (r Reply) String() string {
	if r.IsZero() {
		return ""
	}
	var b strings.Builder
	b.WriteString(strconv.Itoa(r.Code))
	if e := r.EnhancedString(); e != "" {
		b.WriteByte(' ')
		b.WriteString(e)
	}
	if r.Text != "" {
		b.WriteByte(' ')
		b.WriteString(r.Text)
	}
	return b.String()
}

// Result is the outcome of verifying one address.
type Result struct {
	Address string // the address as normalised for the cache key
	Status  Status
	Reason  Reason
	Host    string // MX host name that gave the deciding reply, "" if none
	Reply   Reply  // the deciding SMTP reply, zero if none
	Detail  string // human-readable context for logs: a DNS or network error
	Cached  bool   // the verdict came from the cache, no network was used
}

// String is a one-line summary for logs and the verify command.
func (r Result) String() string {
	var b strings.Builder
	b.WriteString(r.Address)
	b.WriteByte(' ')
	b.WriteString(string(r.Status))
	b.WriteByte(' ')
	b.WriteString(string(r.Reason))
	if r.Host != "" {
		b.WriteString(" mx=")
		b.WriteString(r.Host)
	}
	if !r.Reply.IsZero() {
		b.WriteString(" reply=")
		b.WriteString(strconv.Quote(r.Reply.String()))
	}
	if r.Detail != "" {
		b.WriteString(" detail=")
		b.WriteString(strconv.Quote(r.Detail))
	}
	if r.Cached {
		b.WriteString(" cached")
	}
	return b.String()
}
