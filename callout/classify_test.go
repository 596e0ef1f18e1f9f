package callout

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/textproto"
	"os"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/emersion/go-smtp"
)

// classifyWireError turns one reply as written on the wire ("550 5.1.1
// text", lines joined by "\n") into the *smtp.SMTPError the go-smtp client
// returns for it, parsing the enhanced code as go-smtp does.
func classifyWireError(t *testing.T, wire string) *smtp.SMTPError {
	t.Helper()
	lines := strings.Split(wire, "\n")
	var msg []string
	code := 0
	for _, l := range lines {
		if len(l) < 4 {
			t.Fatalf("bad wire reply %q", wire)
		}
		c, err := strconv.Atoi(l[:3])
		if err != nil {
			t.Fatalf("bad wire reply %q: %v", wire, err)
		}
		code = c
		msg = append(msg, l[4:])
	}
	se := &smtp.SMTPError{Code: code, Message: strings.Join(msg, "\n")}
	first, rest, ok := strings.Cut(se.Message, " ")
	if !ok {
		return se
	}
	var e smtp.EnhancedCode
	parts := strings.Split(first, ".")
	if len(parts) != 3 {
		return se
	}
	for i, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil {
			return se
		}
		e[i] = n
	}
	se.EnhancedCode = e
	se.Message = strings.ReplaceAll(rest, "\n"+first+" ", "\n")
	return se
}

var classifyTests = []struct {
	name   string
	stage  Stage
	wire   string
	status Status
	reason Reason
}{
	// Accepted.
	{"accepted", StageRcpt, "250 2.1.5 Ok", StatusValid, ReasonAccepted},
	{"accepted no enhanced", StageRcpt, "250 Accepted", StatusValid, ReasonAccepted},
	{"will forward", StageRcpt, "251 2.1.5 User not local; will forward", StatusValid, ReasonAccepted},

	// Gmail.
	{"gmail no such user", StageRcpt, "550-5.1.1 The email account that you tried to reach does not exist. Please try\n" +
		"550-5.1.1 double-checking the recipient's email address for typos or\n" +
		"550-5.1.1 unnecessary spaces. For more information, go to\n" +
		"550 5.1.1  https://support.google.com/mail/?p=NoSuchUser 5a478bee46e88-2b0a2c1d1c2si1234567eec.123 - gsmtp",
		StatusInvalid, ReasonNoMailbox},
	{"gmail disabled", StageRcpt, "550-5.2.1 The email account that you tried to reach is disabled.\n" +
		"550 5.2.1 https://support.google.com/mail/?p=DisabledUser 41be03b00d2f7-2b1234si1234 - gsmtp",
		StatusUnknown, ReasonRejected},
	{"gmail over quota", StageRcpt, "452-4.2.2 The email account that you tried to reach is over quota. Please direct\n" +
		"452 4.2.2 the recipient to https://support.google.com/mail/?p=OverQuotaTemp - gsmtp",
		StatusUnknown, ReasonTemporary},
	{"gmail unsolicited", StageRcpt, "550-5.7.1 [192.0.2.1] Our system has detected an unusual rate of\n" +
		"550 5.7.1 unsolicited mail originating from your IP address. - gsmtp",
		StatusUnknown, ReasonRejected},
	{"gmail dmarc", StageRcpt, "550 5.7.26 Unauthenticated email from example.com is not accepted due to domain's DMARC policy. - gsmtp",
		StatusUnknown, ReasonRejected},

	// Microsoft.
	{"outlook mailbox unavailable", StageRcpt, "550 5.5.0 Requested action not taken: mailbox unavailable (S2017062302) [DM6NAM12FT012.eop-nam12.prod.protection.outlook.com]",
		StatusUnknown, ReasonRejected},
	{"m365 dbeb", StageRcpt, "550 5.4.1 Recipient address rejected: Access denied. AS(201806281) [BN8NAM11FT066.eop-nam11.prod.protection.outlook.com 2024-05-01T10:00:00.000Z 08DC69A1B2C3D4E5]",
		StatusInvalid, ReasonNoMailbox},
	{"m365 access denied without AS code", StageRcpt, "550 5.4.1 Recipient address rejected: Access denied",
		StatusUnknown, ReasonRejected},
	{"m365 AS code with other enhanced", StageRcpt, "550 5.7.1 Recipient address rejected: Access denied. AS(201806281)",
		StatusUnknown, ReasonRejected},
	{"m365 recipient not found", StageRcpt, "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
		StatusInvalid, ReasonNoMailbox},
	{"m365 banned ip", StageRcpt, "550 5.7.606 Access denied, banned sending IP [192.0.2.1]. To request removal from this list please visit https://sender.office.com/ and follow the directions.",
		StatusUnknown, ReasonRejected},
	{"m365 traffic not accepted", StageRcpt, "550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP.",
		StatusUnknown, ReasonRejected},
	{"outlook block list", StageRcpt, "550 5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3150).",
		StatusUnknown, ReasonRejected},

	// Postfix.
	{"postfix virtual", StageRcpt, "550 5.1.1 <x@y.example>: Recipient address rejected: User unknown in virtual mailbox table",
		StatusInvalid, ReasonNoMailbox},
	{"postfix local", StageRcpt, "550 5.1.1 <x@y.example>: Recipient address rejected: User unknown in local recipient table",
		StatusInvalid, ReasonNoMailbox},
	{"postfix verify", StageRcpt, "550 5.1.1 <x@y.example>: Recipient address rejected: undeliverable address: host mx.y.example[192.0.2.7] said: 550 5.1.1 <x@y.example>: Recipient address rejected: User unknown in virtual mailbox table (in reply to RCPT TO command)",
		StatusInvalid, ReasonNoMailbox},
	// A stock Postfix gateway with relay_recipient_maps: "relay" names the
	// table, not a policy about us.
	{"postfix relay recipient table", StageRcpt, "550 5.1.1 <nobody@x>: Recipient address rejected: User unknown in relay recipient table",
		StatusInvalid, ReasonNoMailbox},
	{"postfix relay recipient table, no enhanced code", StageRcpt, "550 <nobody@x>: Recipient address rejected: User unknown in relay recipient table",
		StatusInvalid, ReasonNoMailbox},
	{"postfix virtual alias table", StageRcpt, "550 5.1.1 <nobody@x>: Recipient address rejected: User unknown in virtual alias table",
		StatusInvalid, ReasonNoMailbox},
	{"postfix table and a client policy", StageRcpt, "550 5.1.1 <nobody@x>: Recipient address rejected: User unknown in relay recipient table; client host blocked",
		StatusUnknown, ReasonRejected},
	{"postfix table with another enhanced code", StageRcpt, "550 5.7.1 <nobody@x>: Recipient address rejected: User unknown in relay recipient table",
		StatusUnknown, ReasonRejected},
	{"postfix too many errors", StageRcpt, "421 4.7.0 mx.example Error: too many errors", StatusUnknown, ReasonTemporary},
	{"postfix relay", StageRcpt, "554 5.7.1 <x@y.example>: Relay access denied", StatusUnknown, ReasonRejected},
	{"postfix spamhaus", StageRcpt, "554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org; https://www.spamhaus.org/query/ip/192.0.2.1",
		StatusUnknown, ReasonRejected},
	{"postfix helo", StageRcpt, "450 4.7.1 <localhost>: Helo command rejected: Host not found", StatusUnknown, ReasonTemporary},
	{"postgrey", StageRcpt, "450 4.2.0 <x@y.example>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/y.example.html",
		StatusUnknown, ReasonTemporary},
	{"5.1.1 blocked by policy", StageRcpt, "550 5.1.1 blocked by policy", StatusUnknown, ReasonRejected},
	{"5.1.1 spam", StageRcpt, "550 5.1.1 Recipient rejected: spam", StatusUnknown, ReasonRejected},
	{"5.1.1 listed", StageRcpt, "550 5.1.1 Your IP is listed at bl.example", StatusUnknown, ReasonRejected},
	// The echoed address is the recipient's, not the server's words: a
	// policy word or phrase inside it does not count.
	{"policy word in address", StageRcpt, "550 5.1.1 <corporate@y.example>: Recipient address rejected: User unknown",
		StatusInvalid, ReasonNoMailbox},
	{"abuse mailbox unknown", StageRcpt, "550 5.1.1 <abuse@y.example>: Recipient address rejected: User unknown in virtual mailbox table",
		StatusInvalid, ReasonNoMailbox},
	{"phrase only inside address", StageRcpt, "550 <user-unknown@y.example> rejected",
		StatusUnknown, ReasonRejected},
	{"policy outside address", StageRcpt, "550 5.1.1 <x@y.example>: blocked by policy",
		StatusUnknown, ReasonRejected},

	// OpenSMTPD 6.8.
	{"opensmtpd valid", StageRcpt, "250 2.1.5 Destination address valid", StatusValid, ReasonAccepted},
	{"opensmtpd invalid", StageRcpt, "550 Invalid recipient: <nobody@x>", StatusInvalid, ReasonNoMailbox},
	{"opensmtpd second EHLO", StageHelo, "503 5.5.1 Invalid command: Already identified", StatusUnknown, ReasonSessionRefused},

	// Exim.
	{"exim unrouteable", StageRcpt, "550 Unrouteable address", StatusInvalid, ReasonNoMailbox},
	{"exim unknown local part", StageRcpt, "550 Unknown local part x in <x@y.example>", StatusInvalid, ReasonNoMailbox},
	{"exim sender verify", StageRcpt, "550-Verification failed for <>\n550-Called:   192.0.2.9\n550-Sent:     RCPT TO:<>\n550 Sender verify failed",
		StatusUnknown, ReasonRejected},
	{"exim relay", StageRcpt, "550 relay not permitted", StatusUnknown, ReasonRejected},

	// qmail.
	{"qmail no mailbox", StageRcpt, "553 sorry, no mailbox here by that name. (#5.1.1)", StatusInvalid, ReasonNoMailbox},
	{"qmail rcpthosts", StageRcpt, "553 sorry, that domain isn't in my list of allowed rcpthosts. (#5.7.1)", StatusUnknown, ReasonRejected},

	// Others.
	{"yahoo mailbox not found", StageRcpt, "552 1 Requested mail action aborted, mailbox not found", StatusInvalid, ReasonNoMailbox},
	{"yahoo no account", StageRcpt, "554 delivery error: dd This user doesn't have a yahoo.com account (x@yahoo.com) [0] - mta1234.mail.gq1.yahoo.com",
		StatusInvalid, ReasonNoMailbox},
	{"yahoo spamhaus", StageRcpt, "553 5.7.1 [BL21] Connections will not be accepted from 192.0.2.1, because the ip is in Spamhaus's list; see https://postmaster.yahooinc.com/error-codes",
		StatusUnknown, ReasonRejected},
	{"policy reasons", StageRcpt, "554 5.7.9 Message not accepted for policy reasons.", StatusUnknown, ReasonRejected},
	{"icloud", StageRcpt, "550 5.1.1 <x@icloud.com>: user does not exist", StatusInvalid, ReasonNoMailbox},
	{"gmx ptr", StageRcpt, "550-Requested action not taken: mailbox unavailable\n550 invalid DNS PTR resource record, IP=192.0.2.1",
		StatusUnknown, ReasonRejected},
	{"proofpoint user unknown", StageRcpt, "550 5.1.1 User Unknown", StatusInvalid, ReasonNoMailbox},
	{"proofpoint blocked", StageRcpt, "554 5.7.1 Blocked - see https://ipcheck.proofpoint.com/?ip=192.0.2.1", StatusUnknown, ReasonRejected},
	// Mimecast names itself even for unknown recipients: unknown, on purpose.
	{"mimecast", StageRcpt, "550 Invalid Recipient - https://community.mimecast.com/docs/DOC-1369#550 [Ab12Cd34Ef.us123]", StatusUnknown, ReasonRejected},
	{"barracuda", StageRcpt, "550 permanent failure for one or more recipients (x@y.example:blocked)", StatusUnknown, ReasonRejected},
	{"mailbox moved", StageRcpt, "550 5.1.6 Recipient addresses in this domain no longer exist", StatusInvalid, ReasonNoMailbox},
	{"null mx", StageRcpt, "556 5.1.10 Recipient address has null MX", StatusInvalid, ReasonNoMailbox},
	{"bad syntax", StageRcpt, "553 5.1.3 Bad recipient address syntax", StatusInvalid, ReasonNoMailbox},
	{"host unknown", StageRcpt, "550 5.1.2 Host unknown", StatusInvalid, ReasonNoMailbox},
	{"5.0.0 user unknown", StageRcpt, "550 5.0.0 User unknown", StatusInvalid, ReasonNoMailbox},
	{"5.0.0 plain", StageRcpt, "550 5.0.0 Rejected", StatusUnknown, ReasonRejected},
	{"bare user unknown", StageRcpt, "550 User unknown", StatusInvalid, ReasonNoMailbox},
	{"no such user", StageRcpt, "550 No such user here", StatusInvalid, ReasonNoMailbox},
	{"5.7.1 user unknown", StageRcpt, "550 5.7.1 User unknown", StatusUnknown, ReasonRejected},
	{"mismatched class", StageRcpt, "550 4.1.1 User unknown", StatusInvalid, ReasonNoMailbox},
	{"mismatched class no phrase", StageRcpt, "550 4.1.1 Go away", StatusUnknown, ReasonRejected},
	{"mailbox disabled", StageRcpt, "550 5.2.1 mailbox disabled", StatusUnknown, ReasonRejected},
	{"mailbox full", StageRcpt, "552 5.2.2 mailbox full", StatusUnknown, ReasonRejected},
	{"rfc default", StageRcpt, "550 Requested action not taken: mailbox unavailable", StatusUnknown, ReasonRejected},
	{"mailbox unavailable 5.x", StageRcpt, "550 5.2.0 Mailbox unavailable", StatusUnknown, ReasonRejected},
	{"5.3.0", StageRcpt, "554 5.3.0 Other mail system problem", StatusUnknown, ReasonRejected},
	{"too many recipients", StageRcpt, "452 4.5.3 Too many recipients", StatusUnknown, ReasonTemporary},
	{"greylisted", StageRcpt, "451 4.7.1 Greylisted, try again later", StatusUnknown, ReasonTemporary},
	{"closing", StageRcpt, "421 4.7.0 Try again later, closing connection.", StatusUnknown, ReasonTemporary},
	{"temporary user unknown", StageRcpt, "450 4.1.1 <x@y.example>: Recipient address rejected: unverified address: host mx.y.example said: User unknown",
		StatusUnknown, ReasonTemporary},
	{"354 at rcpt", StageRcpt, "354 Start mail input", StatusUnknown, ReasonProtocol},
	{"1xx at rcpt", StageRcpt, "199 what", StatusUnknown, ReasonProtocol},
	{"6xx at rcpt", StageRcpt, "650 5.1.1 user unknown", StatusUnknown, ReasonProtocol},

	// MAIL FROM.
	{"mail refused", StageMail, "550 5.7.1 <>: Sender address rejected: Access denied", StatusUnknown, ReasonMailFromRefused},
	{"mail refused user unknown", StageMail, "550 5.1.1 User unknown", StatusUnknown, ReasonMailFromRefused},
	{"mail temporary", StageMail, "451 4.3.0 Try again later", StatusUnknown, ReasonMailFromRefused},
	{"mail accepted", StageMail, "250 2.1.0 Ok", StatusUnknown, ReasonProtocol},

	// Connect and EHLO.
	{"connect refused", StageConnect, "554 5.7.1 No SMTP service here", StatusUnknown, ReasonSessionRefused},
	{"connect busy", StageConnect, "421 4.3.2 Too busy, try later", StatusUnknown, ReasonSessionRefused},
	{"connect user unknown", StageConnect, "550 5.1.1 User unknown", StatusUnknown, ReasonSessionRefused},
	{"connect greeting", StageConnect, "220 mx.example ESMTP", StatusUnknown, ReasonProtocol},
	{"helo refused", StageHelo, "501 5.5.2 Syntax error in parameters", StatusUnknown, ReasonSessionRefused},
	{"helo ok", StageHelo, "250 mx.example", StatusUnknown, ReasonProtocol},
	{"unknown stage", Stage("data"), "550 5.1.1 User unknown", StatusUnknown, ReasonProtocol},
}

func TestClassify(t *testing.T) {
	for _, tt := range classifyTests {
		t.Run(tt.name, func(t *testing.T) {
			r, ok := replyFromError(classifyWireError(t, tt.wire))
			if !ok {
				t.Fatalf("replyFromError(%q) found no reply", tt.wire)
			}
			status, reason := classify(tt.stage, r)
			if status != tt.status || reason != tt.reason {
				t.Errorf("classify(%s, %q) = %s, %s; want %s, %s", tt.stage, r, status, reason, tt.status, tt.reason)
			}
		})
	}
}

func TestClassifyRawReply(t *testing.T) {
	// classify does not trust the enhanced code it is given.
	for _, tt := range []struct {
		r      Reply
		status Status
		reason Reason
	}{
		{Reply{Code: 550, Enhanced: [3]int{5, 1, 1}}, StatusInvalid, ReasonNoMailbox},
		{Reply{Code: 550, Enhanced: [3]int{4, 1, 1}}, StatusUnknown, ReasonRejected},
		{Reply{Code: 550, Enhanced: [3]int{-1, -1, -1}, Text: "no such user"}, StatusInvalid, ReasonNoMailbox},
		{Reply{Code: 550, Enhanced: [3]int{5, 1, 1000}}, StatusUnknown, ReasonRejected},
		{Reply{Code: 550, Enhanced: [3]int{5, 1, 1}, Text: "BLOCKED"}, StatusUnknown, ReasonRejected},
		{Reply{}, StatusUnknown, ReasonProtocol},
		{Reply{Code: -550}, StatusUnknown, ReasonProtocol},
	} {
		status, reason := classify(StageRcpt, tt.r)
		if status != tt.status || reason != tt.reason {
			t.Errorf("classify(rcpt, %+v) = %s, %s; want %s, %s", tt.r, status, reason, tt.status, tt.reason)
		}
	}
}

func TestReplyFromError(t *testing.T) {
	long := strings.Repeat("x", 5000)
	longUTF8 := strings.Repeat("ü", 2500)
	exact := strings.Repeat("y", 512)
	for _, tt := range []struct {
		name string
		err  error
		ok   bool
		want Reply
	}{
		{"plain", &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "user unknown"},
			true, Reply{550, [3]int{5, 1, 1}, "user unknown"}},
		{"wrapped", fmt.Errorf("rcpt to <x@y>: %w", &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 1}, Message: "Greylisted"}),
			true, Reply{451, [3]int{4, 7, 1}, "Greylisted"}},
		{"double wrapped", fmt.Errorf("probe: %w", fmt.Errorf("rcpt: %w", &smtp.SMTPError{Code: 550, Message: "No such user"})),
			true, Reply{550, [3]int{}, "No such user"}},
		{"joined", errors.Join(errors.New("other"), &smtp.SMTPError{Code: 554, Message: "go away"}),
			true, Reply{554, [3]int{}, "go away"}},
		{"NoEnhancedCode", &smtp.SMTPError{Code: 550, EnhancedCode: smtp.NoEnhancedCode, Message: "no"},
			true, Reply{550, [3]int{}, "no"}},
		{"EnhancedCodeNotSet", &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCodeNotSet, Message: "no"},
			true, Reply{550, [3]int{}, "no"}},
		{"mismatched class", &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{4, 1, 1}, Message: "user unknown"},
			true, Reply{550, [3]int{}, "user unknown"}},
		{"mismatched 2xx", &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{2, 0, 0}, Message: "x"},
			true, Reply{550, [3]int{}, "x"}},
		{"garbage enhanced", &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, -1, 1}, Message: "x"},
			true, Reply{550, [3]int{}, "x"}},
		{"qmail", &smtp.SMTPError{Code: 553, Message: "sorry, no mailbox here by that name. (#5.1.1)"},
			true, Reply{553, [3]int{5, 1, 1}, "sorry, no mailbox here by that name. (#5.1.1)"}},
		{"qmail mismatched", &smtp.SMTPError{Code: 553, Message: "sorry (#4.3.0)"},
			true, Reply{553, [3]int{}, "sorry (#4.3.0)"}},
		{"qmail malformed", &smtp.SMTPError{Code: 553, Message: "sorry (#5.1) or (#5.1.1x) (#5.1.2)"},
			true, Reply{553, [3]int{5, 1, 2}, "sorry (#5.1) or (#5.1.1x) (#5.1.2)"}},
		{"code only", &smtp.SMTPError{Code: 550, Message: "5.1.1"},
			true, Reply{550, [3]int{5, 1, 1}, ""}},
		{"code then tab", &smtp.SMTPError{Code: 550, Message: "5.1.1\tuser unknown"},
			true, Reply{550, [3]int{5, 1, 1}, "user unknown"}},
		{"not a code", &smtp.SMTPError{Code: 550, Message: "5.1.1.1 user unknown"},
			true, Reply{550, [3]int{}, "5.1.1.1 user unknown"}},
		{"textproto", &textproto.Error{Code: 550, Msg: "5.1.1 no such user"},
			true, Reply{550, [3]int{5, 1, 1}, "no such user"}},
		{"control characters", &smtp.SMTPError{Code: 550, Message: "a\tb\r\nc\x00d\x7fe\x1bf\u0085g"},
			true, Reply{550, [3]int{}, "a b c d e f g"}},
		{"multi-line", &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "line one\nline two\n\n  line three  "},
			true, Reply{550, [3]int{5, 1, 1}, "line one line two line three"}},
		{"bidi override", &smtp.SMTPError{Code: 550, Message: "user\u202eunknown"},
			true, Reply{550, [3]int{}, "user unknown"}},
		{"invalid utf-8", &smtp.SMTPError{Code: 550, Message: "bad \xff\xfe byte"},
			true, Reply{550, [3]int{}, "bad \ufffd\ufffd byte"}},
		{"exactly 512", &smtp.SMTPError{Code: 550, Message: exact},
			true, Reply{550, [3]int{}, exact}},
		{"5000 bytes", &smtp.SMTPError{Code: 550, Message: long},
			true, Reply{550, [3]int{}, long[:509] + "…"}},
		{"5000 bytes utf-8", &smtp.SMTPError{Code: 550, Message: longUTF8},
			true, Reply{550, [3]int{}, longUTF8[:508] + "…"}},
		{"code 0", &smtp.SMTPError{Code: 0, Message: "x"}, false, Reply{}},
		{"nil SMTPError", error((*smtp.SMTPError)(nil)), false, Reply{}},
		{"net error", &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connection refused")}, false, Reply{}},
		{"timeout", fmt.Errorf("rcpt: %w", os.ErrDeadlineExceeded), false, Reply{}},
		{"context", context.DeadlineExceeded, false, Reply{}},
		{"nil", nil, false, Reply{}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := replyFromError(tt.err)
			if ok != tt.ok || got != tt.want {
				t.Errorf("replyFromError(%v) = %+v, %v; want %+v, %v", tt.err, got, ok, tt.want, tt.ok)
			}
			if len(got.Text) > classifyMaxText || !utf8.ValidString(got.Text) {
				t.Errorf("replyFromError(%v).Text is %d bytes or not UTF-8", tt.err, len(got.Text))
			}
		})
	}
}

// TestReplyFromErrorClient runs a real go-smtp client against a scripted
// server over net.Pipe, so the multi-line reply takes the real parsing
// path.
func TestReplyFromErrorClient(t *testing.T) {
	clientConn, serverConn := net.Pipe()
	done := make(chan error, 1)
	go func() {
		defer serverConn.Close()
		r := textproto.NewReader(bufio.NewReader(serverConn))
		w := bufio.NewWriter(serverConn)
		say := func(s string) error {
			if _, err := w.WriteString(s); err != nil {
				return err
			}
			return w.Flush()
		}
		if err := say("220 mx.example ESMTP\r\n"); err != nil {
			done <- err
			return
		}
		for {
			line, err := r.ReadLine()
			if err != nil {
				done <- nil // the client hung up
				return
			}
			verb, _, _ := strings.Cut(strings.ToUpper(line), " ")
			var reply string
			switch verb {
			case "EHLO":
				reply = "250-mx.example\r\n250 8BITMIME\r\n"
			case "MAIL":
				reply = "250 2.1.0 Ok\r\n"
			case "RCPT":
				reply = "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n" +
					"550-5.1.1 double-checking the recipient's email address for typos or\r\n" +
					"550 5.1.1 unnecessary spaces. \x1b[31m - gsmtp\r\n"
			case "QUIT":
				done <- say("221 2.0.0 Bye\r\n")
				return
			default:
				reply = "502 5.5.1 Unrecognized command\r\n"
			}
			if err := say(reply); err != nil {
				done <- err
				return
			}
		}
	}()

	c := smtp.NewClient(clientConn)
	defer c.Close()
	if err := c.Hello("probe.example"); err != nil {
		t.Fatalf("Hello: %v", err)
	}
	if err := c.Mail("", nil); err != nil {
		t.Fatalf("Mail: %v", err)
	}
	err := c.Rcpt("nobody@example.com", nil)
	if err == nil {
		t.Fatal("Rcpt succeeded, want a 550")
	}
	r, ok := replyFromError(fmt.Errorf("rcpt: %w", err))
	if !ok {
		t.Fatalf("replyFromError(%v) found no reply", err)
	}
	want := Reply{Code: 550, Enhanced: [3]int{5, 1, 1}, Text: "The email account that you tried to reach does not exist. Please try double-checking the recipient's email address for typos or unnecessary spaces. [31m - gsmtp"}
	if r != want {
		t.Errorf("replyFromError = %+v, want %+v", r, want)
	}
	if status, reason := classify(StageRcpt, r); status != StatusInvalid || reason != ReasonNoMailbox {
		t.Errorf("classify = %s, %s; want invalid, %s", status, reason, ReasonNoMailbox)
	}
	if err := c.Quit(); err != nil {
		t.Errorf("Quit: %v", err)
	}
	if err := <-done; err != nil {
		t.Errorf("server: %v", err)
	}
}

func BenchmarkClassify(b *testing.B) {
	r := Reply{Code: 550, Enhanced: [3]int{5, 1, 1}, Text: "<x@y.example>: Recipient address rejected: User unknown in virtual mailbox table"}
	b.ReportAllocs()
	for b.Loop() {
		classify(StageRcpt, r)
	}
}
