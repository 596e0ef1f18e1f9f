package app

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/rcptguard/rcptguard/test"
)

// verifyWith runs `rcptguard verify` against a fake MX on 127.0.0.1 that
// serves example.test, through an in-process DNS server.
func verifyWith(t *testing.T, mxc test.MXConfig, extra string, args ...string) (string, string, error) {
	t.Helper()
	out, errOut, _, err := verifyWithMX(t, mxc, extra, args...)
	return out, errOut, err
}

// verifyWithMX is verifyWith that also returns the fake MX.
func verifyWithMX(t *testing.T, mxc test.MXConfig, extra string, args ...string) (string, string, *test.MX, error) {
	t.Helper()
	mx := test.StartMX(t, mxc)
	_, port, _ := net.SplitHostPort(mx.Addr)
	dns := test.StartDNS(t, `
example.test. 300 IN MX 10 mx.example.test.
mx.example.test. 300 IN A 127.0.0.1
nullmx.test. 300 IN MX 0 .
`)
	cfg := writeConfig(t, fmt.Sprintf(`
[callout]
resolver = %q
port = %s
timeout = "1s"
helo = "probe.example.net"
allow_private = true
%s
`, dns.Addr, port, extra))
	var stdout, stderr bytes.Buffer
	err := Run(context.Background(), append([]string{"verify", "-config", cfg}, args...), &stdout, &stderr)
	return stdout.String(), stderr.String(), mx, err
}

func TestVerifyCommand(t *testing.T) {
	tests := []struct {
		name string
		mx   test.MXConfig
		addr string
		want string // prefix of the output line
	}{
		{"accept", test.MXConfig{Mailboxes: []string{"alice@example.test"}}, "alice@example.test", "alice@example.test valid accepted mx=mx.example.test"},
		{"5.1.1", test.MXConfig{}, "bob@example.test", `bob@example.test invalid mailbox-unknown mx=mx.example.test reply="550 5.1.1`},
		{"5.7.1", test.MXConfig{Unknown: &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "relaying denied"}}, "bob@example.test", "bob@example.test unknown rejected"},
		{"greylist", test.MXConfig{Unknown: &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 1}, Message: "greylisted"}}, "bob@example.test", "bob@example.test unknown temporary"},
		{"MAIL FROM refused", test.MXConfig{Mail: &smtp.SMTPError{Code: 553, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "no null senders"}}, "bob@example.test", "bob@example.test unknown mail-from-refused"},
		{"catch-all", test.MXConfig{CatchAll: true}, "anyone@example.test", "anyone@example.test unknown catch-all"},
		{"stall", test.MXConfig{BannerDelay: 5 * time.Second}, "bob@example.test", "bob@example.test unknown timeout"},
		{"drop", test.MXConfig{DropAt: "rcpt"}, "bob@example.test", "bob@example.test unknown unreachable"},
		{"STARTTLS", test.MXConfig{TLS: true, Mailboxes: []string{"alice@example.test"}}, "alice@example.test", "alice@example.test valid accepted"},
		{"null MX", test.MXConfig{}, "x@nullmx.test", "x@nullmx.test invalid null-mx"},
		{"NXDOMAIN", test.MXConfig{}, "x@nowhere.test", "x@nowhere.test invalid nxdomain"},
		{"syntax", test.MXConfig{}, "user@bad..domain.test", "user@bad..domain.test invalid bad-syntax"},
		{"unquoted local part, as Postfix passes it", test.MXConfig{Mailboxes: []string{"x..y@example.test"}}, "x..y@example.test", `"x..y"@example.test valid accepted`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, _, err := verifyWith(t, tt.mx, "", tt.addr)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(out, tt.want) {
				t.Fatalf("output %q, want prefix %q", out, tt.want)
			}
		})
	}
}

func TestVerifyCommandTranscriptAndSeveral(t *testing.T) {
	out, stderr, err := verifyWith(t, test.MXConfig{Mailboxes: []string{"a@example.test"}}, "", "-v", "a@example.test", "b@example.test")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], " valid ") || !strings.Contains(lines[1], " invalid ") {
		t.Fatalf("output %q", out)
	}
	for _, w := range []string{"EHLO probe.example.net", "MAIL FROM:<>", "RCPT TO:<a@example.test>"} {
		if !strings.Contains(stderr, w) {
			t.Errorf("transcript lacks %q:\n%s", w, stderr)
		}
	}
}

// TestVerifyCommandDialogue: -v shows the dialogue in one format, only
// what was sent and received, and the command says QUIT before it exits.
func TestVerifyCommandDialogue(t *testing.T) {
	_, stderr, mx, err := verifyWithMX(t, test.MXConfig{Mailboxes: []string{"a@example.test"}}, "", "-v", "a@example.test", "b@example.test")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(strings.TrimSpace(stderr), "\n") {
		if f := strings.Fields(l); len(f) < 2 || f[0] != "mx.example.test" || f[1] != "C:" && f[1] != "S:" && f[1] != "*:" {
			t.Errorf("line not in the dialogue format: %q", l)
		}
	}
	for _, w := range []string{"C: QUIT", "S: 221 "} {
		if !strings.Contains(stderr, w) {
			t.Errorf("dialogue lacks %q:\n%s", w, stderr)
		}
	}
	for _, s := range mx.Sessions() {
		if !s.Quit || s.EHLOs != 1 {
			t.Errorf("session %+v: want one EHLO and QUIT", s)
		}
	}

	// A tarpit: the failure in words, not a Go error.
	start := time.Now()
	_, stderr, _, err = verifyWithMX(t, test.MXConfig{BannerDelay: 5 * time.Second}, "", "-v", "a@example.test")
	took := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	// The line names the time it waited for the greeting, measured: what
	// callout.timeout (1s, for the whole probe) left after the connection,
	// so a little less than 1s, or a little more on a loaded machine;
	// never the banner delay, never more than the command took.
	m := regexp.MustCompile(`mx\.example\.test \*: no greeting within (\S+)\n`).FindStringSubmatch(stderr)
	if m == nil || strings.Contains(stderr, "network connection") {
		t.Fatalf("tarpit dialogue:\n%s", stderr)
	}
	if waited, err := time.ParseDuration(m[1]); err != nil || waited <= 0 || waited >= 5*time.Second || waited > took {
		t.Errorf("tarpit: waited %q (%v), want the rest of callout.timeout 1s, within the %s the command took:\n%s", m[1], err, took, stderr)
	}
}

func TestUsageErrors(t *testing.T) {
	var out, errOut bytes.Buffer
	tests := [][]string{
		{},
		{"frobnicate"},
		{"verify", "-config", "/nonexistent/rcptguard.toml", "a@b.c"},
		{"verify", "-nosuchflag"},
		{"block"},
		{"unblock", "a", "b"},
	}
	for _, args := range tests {
		if code := Main(args, &out, &errOut); code != exitUsage {
			t.Errorf("%q: exit %d, want %d", args, code, exitUsage)
		}
	}
	path := writeConfig(t, "[callout]\ntimeout = \"soon\"\n")
	errOut.Reset()
	if code := Main([]string{"verify", "-config", path, "a@b.c"}, &out, &errOut); code != exitUsage ||
		!strings.Contains(errOut.String(), "callout.timeout") || !strings.Contains(errOut.String(), path) {
		t.Errorf("bad config: exit %d, stderr %q", code, errOut.String())
	}
	out.Reset()
	if code := Main([]string{"version"}, &out, &errOut); code != 0 || !strings.HasPrefix(out.String(), "rcptguard ") || !strings.Contains(out.String(), "go1.") {
		t.Errorf("version: %d %q", code, out.String())
	}
}

func TestNotifyTestCommand(t *testing.T) {
	relay := test.StartRelay(t, test.RelayConfig{AuthUser: "reports", AuthPass: "pw", AllowInsecureAuth: true})
	pw := writeConfig(t, "pw\n") // any file will do for the password
	cfg := writeConfig(t, fmt.Sprintf("[notify]\nto = [\"abuse@isp.test\"]\nrelay = %q\nusername = \"reports\"\npassword_file = %q\nstarttls = \"off\"\n", relay.Addr, pw))
	var out, errOut bytes.Buffer
	if err := Run(context.Background(), []string{"notify-test", "-config", cfg}, &out, &errOut); err != nil {
		t.Fatalf("notify-test: %v\n%s", err, errOut.String())
	}
	msgs := relay.Messages()
	if len(msgs) != 1 || msgs[0].AuthUser != "reports" || !strings.Contains(string(msgs[0].Data), "Subject: [rcptguard] blocked") {
		t.Fatalf("relay got %d messages", len(msgs))
	}
	// Without recipients it says so, as a usage error.
	if code := Main([]string{"notify-test", "-config", writeConfig(t, "")}, &out, &errOut); code != exitUsage {
		t.Fatalf("notify-test without notify.to: exit %d", code)
	}
	// A relay that is down is an error naming the relay.
	relay.SetDown(true)
	errOut.Reset()
	if err := Run(context.Background(), []string{"notify-test", "-config", cfg}, &out, &errOut); err == nil || !strings.Contains(err.Error(), "notify-test") {
		t.Fatalf("relay down: %v", err)
	}
}
