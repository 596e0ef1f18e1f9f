package callout

import (
	"bufio"
	"bytes"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/test"
)

// hostileMX listens on 127.0.0.1 and answers every connection with
// greeting, then, to every command, with reply (written as is).
func hostileMX(t *testing.T, greeting, reply string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				if _, err := c.Write([]byte(greeting)); err != nil {
					return
				}
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					if _, err := c.Write([]byte(reply)); err != nil {
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().String()
}

func TestDialogueHostileReplies(t *testing.T) {
	long := "220 " + strings.Repeat("x", 3*maxReplyLine) + "\r\n"
	many := strings.Repeat("250-x\r\n", 10*maxReplyLines) + "250 ok\r\n"
	for _, tc := range []struct {
		name, greeting, reply string
		reason                Reason
	}{
		{"endless line", long, "", ReasonProtocol},
		{"endless reply", "220 ok\r\n", many, ReasonProtocol},
		{"not SMTP", "HTTP/1.1 400 Bad Request\r\n", "", ReasonProtocol},
		{"mixed codes", "220-a\r\n250 b\r\n", "", ReasonProtocol},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr := hostileMX(t, tc.greeting, tc.reply)
			r := newRig(t, zoneOneMX, test.RouteDialer{"127.0.0.2": addr})
			start := time.Now()
			res := r.verify("a@example.test")
			if res.Status != StatusUnknown || res.Reason != tc.reason {
				t.Errorf("got %s, want unknown %s", res, tc.reason)
			}
			if el := time.Since(start); el > 2*time.Second {
				t.Errorf("took %v", el)
			}
		})
	}
}

// TestDialogueTranscript: the transcript has one format, C: for what was
// sent and S: for what was received, and says failures in words.
func TestDialogueTranscript(t *testing.T) {
	mx := test.StartMX(t, test.MXConfig{TLS: true})
	var buf bytes.Buffer
	r := newRig(t, zoneOneMX, route("127.0.0.2", mx), func(c *Config) { c.Transcript = &syncWriter{w: &buf} })
	r.verify("x@example.test")
	r.v.Close()
	want := []string{
		"mx1.example.test S: 220 ",
		"mx1.example.test C: EHLO probe.test",
		"mx1.example.test C: STARTTLS",
		"mx1.example.test *: TLS established",
		"mx1.example.test C: MAIL FROM:<>",
		"mx1.example.test C: RCPT TO:<x@example.test>",
		"mx1.example.test S: 550 5.1.1 <x@example.test>: no such user",
		"mx1.example.test C: QUIT",
		"mx1.example.test S: 221 ",
	}
	out := buf.String()
	at := 0
	for _, w := range want {
		i := strings.Index(out[at:], w)
		if i < 0 {
			t.Fatalf("transcript lacks %q in order:\n%s", w, out)
		}
		at += i
	}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 || f[0] != "mx1.example.test" || f[1] != "C:" && f[1] != "S:" && f[1] != "*:" {
			t.Errorf("line not in the format: %q", l)
		}
	}
	if strings.Count(out, "C: EHLO") != 2 {
		t.Errorf("want EHLO before and after STARTTLS only:\n%s", out)
	}

	// A tarpit: the failure in words.
	tarpit := test.StartMX(t, test.MXConfig{BannerDelay: 10 * time.Second})
	buf.Reset()
	r = newRig(t, zoneOneMX, route("127.0.0.2", tarpit), func(c *Config) {
		c.Transcript = &syncWriter{w: &buf}
		c.Timeout = 300 * time.Millisecond
	})
	res := r.verify("x@example.test")
	r.v.Close() // the QUIT after the silence is said in the background
	if res.Reason != ReasonTimeout || !strings.HasPrefix(res.Detail, "no greeting within ") {
		t.Errorf("tarpit: %s", res)
	}
	if !strings.Contains(buf.String(), "mx1.example.test *: no greeting within ") {
		t.Errorf("tarpit transcript:\n%s", buf.String())
	}
	// A refused connection.
	buf.Reset()
	r = newRig(t, zoneOneMX, test.RouteDialer{}, func(c *Config) { c.Transcript = &syncWriter{w: &buf} })
	if res := r.verify("x@example.test"); res.Reason != ReasonUnreachable || strings.Contains(res.Detail, "dial tcp") {
		t.Errorf("refused: %s", res)
	}
}

// scriptMX listens on 127.0.0.1 and answers each command with reply(verb,
// n), n counting that verb from 1; it records the verbs in order.
func scriptMX(t *testing.T, reply func(verb string, n int) string) (addr string, verbs func() []string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	var mu sync.Mutex
	var seen []string
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				_, _ = c.Write([]byte("220 script.test ESMTP\r\n"))
				count := map[string]int{}
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					verb := strings.ToUpper(strings.Fields(sc.Text() + " x")[0])
					count[verb]++
					mu.Lock()
					seen = append(seen, verb)
					mu.Unlock()
					if _, err := c.Write([]byte(reply(verb, count[verb]) + "\r\n")); err != nil || verb == "QUIT" {
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().String(), func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), seen...)
	}
}

// TestDialogue503IsNotTheEnd: a 503 to EHLO, to MAIL or to RCPT does not
// end the session: the probe carries on, opening the transaction again
// where the server lost it.
func TestDialogue503IsNotTheEnd(t *testing.T) {
	addr, verbs := scriptMX(t, func(verb string, n int) string {
		switch {
		case verb == "EHLO":
			return "503 5.5.1 Invalid command: Already identified"
		case verb == "MAIL" && n == 1:
			return "503 5.5.1 Error: nested MAIL command"
		case verb == "RCPT" && n == 1:
			return "503 5.5.1 Error: need MAIL command"
		case verb == "RCPT":
			return "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown in relay recipient table"
		case verb == "QUIT":
			return "221 2.0.0 Bye"
		}
		return "250 2.0.0 Ok"
	})
	r := newRig(t, zoneOneMX, test.RouteDialer{"127.0.0.2": addr})
	if res := r.verify("nobody@example.test"); res.Status != StatusInvalid || res.Reason != ReasonNoMailbox {
		t.Fatalf("got %s", res)
	}
	r.v.Close()
	// The verdict is handed out before the worker's RSET: Close may come
	// first, and then the session ends with QUIT alone. Both are polite.
	// The server notes a verb in its own goroutine, so the last one may
	// land just after Close returns.
	want, alt := "EHLO MAIL RSET MAIL RCPT MAIL RCPT RSET QUIT", "EHLO MAIL RSET MAIL RCPT MAIL RCPT QUIT"
	got := strings.Join(verbs(), " ")
	for deadline := time.Now().Add(5 * time.Second); got != want && got != alt && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
		got = strings.Join(verbs(), " ")
	}
	if got != want && got != alt {
		t.Fatalf("dialogue %q, want %q", got, want)
	}
}
