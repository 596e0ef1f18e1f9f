package test

import (
	"bufio"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// rawClient speaks to a fake MX line by line.
type rawClient struct {
	t *testing.T
	c net.Conn
	r *bufio.Reader
}

func dialRaw(t *testing.T, addr string) *rawClient {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	return &rawClient{t: t, c: c, r: bufio.NewReader(c)}
}

// reply reads one reply and returns its last line.
func (rc *rawClient) reply() string {
	rc.t.Helper()
	for {
		l, err := rc.r.ReadString('\n')
		if err != nil {
			rc.t.Fatalf("reading reply: %v", err)
		}
		l = strings.TrimRight(l, "\r\n")
		if len(l) < 4 || l[3] != '-' {
			return l
		}
	}
}

func (rc *rawClient) cmd(line string) string {
	rc.t.Helper()
	if _, err := rc.c.Write([]byte(line + "\r\n")); err != nil {
		rc.t.Fatal(err)
	}
	return rc.reply()
}

func TestMXPostfixErrorLimits(t *testing.T) {
	mx := StartMX(t, MXConfig{SoftErrorLimit: 10, ErrorSleep: time.Millisecond, HardErrorLimit: 20})
	c := dialRaw(t, mx.Addr)
	c.reply()
	c.cmd("EHLO client.test")
	c.cmd("MAIL FROM:<>")
	var last string
	for i := 1; i <= 20; i++ {
		last = c.cmd("RCPT TO:<nobody" + string(rune('a'+i)) + "@example.test>")
		if !strings.HasPrefix(last, "550 5.1.1") {
			t.Fatalf("RCPT %d: %q", i, last)
		}
	}
	// The 20th error ends the session, as smtpd_hard_error_limit does.
	if l := c.reply(); !strings.HasPrefix(l, "421 4.7.0") {
		t.Fatalf("after 20 errors: %q, want 421 4.7.0", l)
	}
	s := mx.Sessions()[0]
	// Errors 11 to 20 and the 421 were held back, one sleep per line.
	if s.Errors != 21 || s.ErrorSleeps != 11 {
		t.Fatalf("errors %d, sleeps %d; want 21 and 11", s.Errors, s.ErrorSleeps)
	}
}

func TestMXErrorSleepPerLine(t *testing.T) {
	mx := StartMX(t, MXConfig{SoftErrorLimit: 1, ErrorSleep: time.Millisecond})
	c := dialRaw(t, mx.Addr)
	c.reply()
	c.cmd("EHLO client.test")
	c.cmd("MAIL FROM:<>")
	c.cmd("RCPT TO:<nobody@example.test>") // the first error: no sleep yet
	c.cmd("RSET")
	c.cmd("EHLO client.test") // 7 lines, each held back
	if s := mx.Sessions()[0]; s.ErrorSleeps != 1+7 {
		t.Fatalf("sleeps %d, want 8 (RSET's line and EHLO's 7)", s.ErrorSleeps)
	}
}

func TestMXOneEHLO(t *testing.T) {
	mx := StartMX(t, MXConfig{OneEHLO: true, TLS: true})
	c := dialRaw(t, mx.Addr)
	c.reply()
	if l := c.cmd("EHLO client.test"); !strings.HasPrefix(l, "250 STARTTLS") {
		t.Fatalf("EHLO: %q, want STARTTLS offered last", l)
	}
	if l := c.cmd("EHLO client.test"); l != "503 5.5.1 Invalid command: Already identified" {
		t.Fatalf("second EHLO: %q", l)
	}
	if l := c.cmd("MAIL FROM:<>"); !strings.HasPrefix(l, "250") {
		t.Fatalf("MAIL after the 503: %q", l)
	}
	c.cmd("QUIT")
	s := mx.Sessions()[0]
	if s.EHLOs != 2 || !s.Quit || s.Errors != 1 {
		t.Fatalf("session %+v", s)
	}
}

func TestMXRefusingGreetingWaitsForQuit(t *testing.T) {
	mx := StartMX(t, MXConfig{Banner: &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "mx.test ESMTP not accepting connections"}})
	c := dialRaw(t, mx.Addr)
	if l := c.reply(); !strings.HasPrefix(l, "554 5.7.1") {
		t.Fatalf("greeting %q", l)
	}
	if l := c.cmd("EHLO client.test"); !strings.HasPrefix(l, "503") {
		t.Fatalf("EHLO after 554: %q", l)
	}
	if l := c.cmd("QUIT"); !strings.HasPrefix(l, "221") {
		t.Fatalf("QUIT: %q", l)
	}
	if s := mx.Sessions()[0]; !s.Quit || s.EHLOs != 0 {
		t.Fatalf("session %+v", s)
	}
}

func TestMXAcceptedReply(t *testing.T) {
	mx := StartMX(t, MXConfig{CatchAll: true, Accepted: &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 1, 5}, Message: "Destination address valid"}})
	c := dialRaw(t, mx.Addr)
	c.reply()
	c.cmd("EHLO client.test")
	c.cmd("MAIL FROM:<>")
	if l := c.cmd("RCPT TO:<anyone@example.test>"); l != "250 2.1.5 Destination address valid" {
		t.Fatalf("RCPT: %q", l)
	}
}
