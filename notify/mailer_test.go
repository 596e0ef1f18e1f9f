package notify_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/rcptguard/rcptguard/notify"
	"github.com/rcptguard/rcptguard/test"
)

const (
	testPassword = "s3cret-relay-pass"
	waitLong     = 10 * time.Second
)

// logBuffer collects a Mailer's log lines.
type logBuffer = test.Buffer

// testClock is a clock tests move by hand.
type testClock struct{ ns atomic.Int64 }

func newClock(t time.Time) *testClock {
	c := &testClock{}
	c.ns.Store(t.UnixNano())
	return c
}

func (c *testClock) Now() time.Time      { return time.Unix(0, c.ns.Load()) }
func (c *testClock) Add(d time.Duration) { c.ns.Add(int64(d)) }
func quickBackoff(int) time.Duration     { return 2 * time.Millisecond }
func abuseReport(id string) notify.Report {
	r := fixedReport()
	r.Identity, r.MessageID, r.Action = id, "", "HOLD rcptguard: "+id+" blocked"
	return r
}
func relayConfig(r *test.Relay) notify.Config {
	return notify.Config{
		To:       []string{"abuse@example.com"},
		From:     "rcptguard@mail1.example.net",
		Relay:    r.Addr,
		StartTLS: notify.StartTLSOpportunistic,
		Hostname: "mail1.example.net",
		Backoff:  quickBackoff,
	}
}

// newMailer makes a Mailer with a fresh spool (unless cfg has one) and a
// log buffer.
func newMailer(t *testing.T, cfg notify.Config) (*notify.Mailer, *logBuffer) {
	t.Helper()
	if cfg.Spool == "" {
		cfg.Spool = filepath.Join(t.TempDir(), "spool")
	}
	logs := &logBuffer{}
	cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	m, err := notify.New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if strings.Contains(logs.String(), testPassword) {
			t.Errorf("the password appears in the log:\n%s", logs)
		}
	})
	return m, logs
}

// flush waits until every report Enqueue took is in the spool.
func flush(t *testing.T, m *notify.Mailer) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitLong)
	defer cancel()
	if err := m.Flush(ctx); err != nil {
		t.Fatal(err)
	}
}

// run starts m.Run and stops it at cleanup, failing if it does not return.
func run(t *testing.T, m *notify.Mailer) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(waitLong):
			t.Error("Run did not return after cancel")
		}
	})
}

// eventually polls cond every millisecond until it holds or fails t.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitLong)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestMailerDeliversReport(t *testing.T) {
	relay := test.StartRelay(t, test.RelayConfig{})
	cfg := relayConfig(relay)
	cfg.To = []string{"abuse@example.com", "Desk <desk@example.com>"}
	m, logs := newMailer(t, cfg)
	r := fixedReport()
	r.MessageID = ""
	if err := m.Enqueue(context.Background(), r); err != nil {
		t.Fatal(err)
	}
	if m.Pending() != 1 {
		t.Fatalf("Pending = %d before Run, want 1", m.Pending())
	}
	run(t, m)
	msg := relay.WaitMessages(t, 1, waitLong)[0]
	if msg.From != "rcptguard@mail1.example.net" || strings.Join(msg.To, ",") != "abuse@example.com,desk@example.com" {
		t.Errorf("envelope %q → %q", msg.From, msg.To)
	}
	p := parseReport(t, msg.Data)
	if got := p.header.Get("Subject"); got != "[rcptguard] blocked alice@example.com: 101 invalid recipients in 1h" {
		t.Errorf("Subject %q", got)
	}
	if p.header.Get("Message-ID") == "" || p.header.Get("Auto-Submitted") != "auto-generated" {
		t.Errorf("headers %v", p.header)
	}
	if j := decodeJSON(t, p.json); j.Identity != "alice@example.com" || j.Count != 101 {
		t.Errorf("JSON %+v", j)
	}
	eventually(t, "an empty spool", func() bool { return m.Pending() == 0 })
	if got := relay.Helos(); len(got) == 0 || got[len(got)-1] != "mail1.example.net" {
		t.Errorf("EHLO names %q", got)
	}
	// The file goes before QUIT, the log line after it.
	eventually(t, "a delivery log", func() bool { return strings.Contains(logs.String(), `msg="report delivered"`) })
}

func TestMailerAuth(t *testing.T) {
	for _, mech := range []string{"PLAIN", "LOGIN"} {
		t.Run(mech, func(t *testing.T) {
			relay := test.StartRelay(t, test.RelayConfig{AuthUser: "reports", AuthPass: testPassword, AuthMechanisms: []string{mech}, AllowInsecureAuth: true})
			cfg := relayConfig(relay)
			cfg.Username, cfg.Password = "reports", testPassword
			m, _ := newMailer(t, cfg)
			if err := m.SendNow(context.Background(), abuseReport("alice@example.com")); err != nil {
				t.Fatal(err)
			}
			msg := relay.Messages()[0]
			if msg.AuthMechanism != mech || msg.AuthUser != "reports" {
				t.Errorf("authenticated with %q as %q", msg.AuthMechanism, msg.AuthUser)
			}
		})
	}

	t.Run("PLAIN preferred", func(t *testing.T) {
		relay := test.StartRelay(t, test.RelayConfig{AuthUser: "reports", AuthPass: testPassword, AllowInsecureAuth: true})
		cfg := relayConfig(relay)
		cfg.Username, cfg.Password = "reports", testPassword
		m, _ := newMailer(t, cfg)
		if err := m.SendNow(context.Background(), abuseReport("alice@example.com")); err != nil {
			t.Fatal(err)
		}
		if got := relay.Messages()[0].AuthMechanism; got != "PLAIN" {
			t.Errorf("mechanism %q, want PLAIN", got)
		}
	})

	t.Run("wrong password", func(t *testing.T) {
		relay := test.StartRelay(t, test.RelayConfig{AuthUser: "reports", AuthPass: "other", AllowInsecureAuth: true})
		cfg := relayConfig(relay)
		cfg.Username, cfg.Password = "reports", testPassword
		m, _ := newMailer(t, cfg)
		err := m.SendNow(context.Background(), abuseReport("alice@example.com"))
		var se *smtp.SMTPError
		if !errors.As(err, &se) || se.Code != 535 {
			t.Fatalf("got %v, want 535", err)
		}
		if strings.Contains(err.Error(), testPassword) {
			t.Errorf("the password appears in the error: %v", err)
		}
		if len(relay.Messages()) != 0 {
			t.Error("delivered without AUTH")
		}
	})

	t.Run("no AUTH offered", func(t *testing.T) {
		relay := test.StartRelay(t, test.RelayConfig{})
		cfg := relayConfig(relay)
		cfg.Username, cfg.Password = "reports", testPassword
		m, _ := newMailer(t, cfg)
		if err := m.SendNow(context.Background(), abuseReport("alice@example.com")); err == nil || !strings.Contains(err.Error(), "AUTH") {
			t.Fatalf("got %v, want an AUTH error", err)
		}
	})
}

// farConn makes a loopback connection look like one to another machine.
type farConn struct{ net.Conn }

func (farConn) RemoteAddr() net.Addr { return &net.TCPAddr{IP: net.ParseIP("192.0.2.25"), Port: 25} }

// routeDialer connects to the address a name stands for.
type routeDialer map[string]string

func (r routeDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	if to, ok := r[addr]; ok {
		addr = to
	}
	return d.DialContext(ctx, network, addr)
}

type farDialer struct{}

func (farDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return farConn{c}, nil
}

func TestMailerNoClearTextPasswordOverNetwork(t *testing.T) {
	relay := test.StartRelay(t, test.RelayConfig{AuthUser: "reports", AuthPass: testPassword, AllowInsecureAuth: true, TLS: true})
	cfg := relayConfig(relay)
	cfg.Username, cfg.Password = "reports", testPassword
	cfg.Dialer = farDialer{}
	cfg.StartTLS = notify.StartTLSOff
	m, _ := newMailer(t, cfg)
	if err := m.SendNow(context.Background(), abuseReport("alice@example.com")); !errors.Is(err, notify.ErrInsecureAuth) {
		t.Fatalf("got %v, want ErrInsecureAuth", err)
	}

	// Over TLS the same relay is fine.
	cfg.StartTLS = notify.StartTLSRequired
	cfg.TLSConfig = &tls.Config{RootCAs: relay.RootCAs()}
	m, _ = newMailer(t, cfg)
	if err := m.SendNow(context.Background(), abuseReport("alice@example.com")); err != nil {
		t.Fatal(err)
	}
	if msgs := relay.Messages(); len(msgs) != 1 || !msgs[0].TLS || msgs[0].AuthUser != "reports" {
		t.Fatalf("messages %+v", msgs)
	}
}

func TestMailerStartTLS(t *testing.T) {
	for _, tc := range []struct {
		name      string
		relayTLS  bool
		mode      string
		trust     bool // RootCAs given
		skip      bool // TLSSkipVerify
		wantErr   string
		wantTLS   bool
		wantHello int  // EHLO sessions with our name
		remote    bool // the relay is named "relay.test", not a loopback address
	}{
		{name: "required, absent", mode: notify.StartTLSRequired, wantErr: "does not offer STARTTLS"},
		{name: "opportunistic, absent", mode: notify.StartTLSOpportunistic},
		{name: "off, absent", mode: notify.StartTLSOff},
		{name: "required, offered", relayTLS: true, mode: notify.StartTLSRequired, trust: true, wantTLS: true},
		{name: "opportunistic, offered", relayTLS: true, mode: notify.StartTLSOpportunistic, trust: true, wantTLS: true},
		{name: "off, offered", relayTLS: true, mode: notify.StartTLSOff},
		{name: "required, untrusted", relayTLS: true, mode: notify.StartTLSRequired, wantErr: "certificate is not trusted", remote: true},
		{name: "opportunistic, untrusted", relayTLS: true, mode: notify.StartTLSOpportunistic, wantErr: "certificate is not trusted", remote: true},
		// A relay on loopback (a local Postfix with its self-signed
		// certificate) is not verified: the connection stays on the host.
		{name: "loopback, untrusted", relayTLS: true, mode: notify.StartTLSRequired, wantTLS: true},
		{name: "required, skip verify", relayTLS: true, mode: notify.StartTLSRequired, skip: true, wantTLS: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			relay := test.StartRelay(t, test.RelayConfig{TLS: tc.relayTLS})
			cfg := relayConfig(relay)
			cfg.StartTLS = tc.mode
			cfg.TLSSkipVerify = tc.skip
			if tc.remote {
				_, port, _ := net.SplitHostPort(relay.Addr)
				cfg.Relay = "relay.test:" + port
				cfg.Dialer = routeDialer{"relay.test:" + port: relay.Addr}
			}
			if tc.trust {
				cfg.TLSConfig = &tls.Config{RootCAs: relay.RootCAs()}
			}
			m, _ := newMailer(t, cfg)
			err := m.SendNow(context.Background(), abuseReport("alice@example.com"))
			msgs := relay.Messages()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %v, want %q", err, tc.wantErr)
				}
				if len(msgs) != 0 {
					t.Fatalf("delivered anyway")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(msgs) != 1 || msgs[0].TLS != tc.wantTLS {
				t.Fatalf("messages %d, TLS %v; want 1, %v", len(msgs), len(msgs) > 0 && msgs[0].TLS, tc.wantTLS)
			}
			// Every EHLO, the one before STARTTLS included, says our
			// name: never go-smtp's "localhost".
			for _, got := range relay.Helos() {
				if got != "mail1.example.net" {
					t.Errorf("EHLOs %q, want our host name in each", relay.Helos())
				}
			}
		})
	}
}

func TestMailerRelayDownThenUp(t *testing.T) {
	relay := test.StartRelay(t, test.RelayConfig{})
	relay.SetDown(true)
	m, logs := newMailer(t, relayConfig(relay))
	run(t, m)
	if err := m.Enqueue(context.Background(), abuseReport("alice@example.com")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "three failed attempts", func() bool { return relay.Refused() >= 3 })
	if m.Pending() != 1 {
		t.Fatalf("Pending = %d while the relay is down, want 1", m.Pending())
	}
	if !strings.Contains(logs.String(), "will retry") {
		t.Errorf("no retry log:\n%s", logs)
	}
	relay.SetDown(false)
	relay.WaitMessages(t, 1, waitLong)
	eventually(t, "an empty spool", func() bool { return m.Pending() == 0 })
	// Nudge the sender: nothing is left to send.
	if err := m.Enqueue(context.Background(), abuseReport("bob@example.com")); err != nil {
		t.Fatal(err)
	}
	msgs := relay.WaitMessages(t, 2, waitLong)
	eventually(t, "an empty spool", func() bool { return m.Pending() == 0 })
	if n := len(relay.Messages()); n != 2 {
		t.Fatalf("%d messages, want 2 (each report exactly once)", n)
	}
	if !strings.Contains(string(msgs[0].Data), "alice@example.com") || !strings.Contains(string(msgs[1].Data), "bob@example.com") {
		t.Errorf("wrong messages")
	}
}

func TestMailerTemporaryThenAccepted(t *testing.T) {
	relay := test.StartRelay(t, test.RelayConfig{DataReplies: []*smtp.SMTPError{
		{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "try again later"},
	}})
	m, logs := newMailer(t, relayConfig(relay))
	run(t, m)
	if err := m.Enqueue(context.Background(), abuseReport("alice@example.com")); err != nil {
		t.Fatal(err)
	}
	relay.WaitMessages(t, 1, waitLong)
	eventually(t, "an empty spool", func() bool { return m.Pending() == 0 })
	if n, d := len(relay.Messages()), relay.DataCommands(); n != 1 || d != 2 {
		t.Fatalf("%d messages after %d DATA, want 1 after 2", n, d)
	}
	if l := logs.String(); !strings.Contains(l, "level=WARN") || !strings.Contains(l, "451") {
		t.Errorf("4xx not logged as a warning:\n%s", l)
	}
}

func TestMailerPermanentErrorLoggedAndRetried(t *testing.T) {
	reject := &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "Relay access denied"}
	relay := test.StartRelay(t, test.RelayConfig{DataReply: reject})
	m, logs := newMailer(t, relayConfig(relay))
	run(t, m)
	if err := m.Enqueue(context.Background(), abuseReport("alice@example.com")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "two rejected attempts", func() bool { return relay.DataCommands() >= 2 })
	if l := logs.String(); !strings.Contains(l, "level=ERROR") || !strings.Contains(l, "Relay access denied") {
		t.Errorf("5xx not logged as an error:\n%s", l)
	}
	if m.Pending() != 1 {
		t.Fatalf("Pending = %d, want the report kept", m.Pending())
	}
	relay.Set(test.RelayConfig{}) // the administrator fixes the relay
	relay.WaitMessages(t, 1, waitLong)
	eventually(t, "an empty spool", func() bool { return m.Pending() == 0 })
}

func TestMailerRecipientRejectedOthersDelivered(t *testing.T) {
	relay := test.StartRelay(t, test.RelayConfig{RcptReply: map[string]*smtp.SMTPError{
		"desk@example.com": {Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"},
	}})
	cfg := relayConfig(relay)
	cfg.To = []string{"abuse@example.com", "desk@example.com"}
	m, logs := newMailer(t, cfg)
	run(t, m)
	if err := m.Enqueue(context.Background(), abuseReport("alice@example.com")); err != nil {
		t.Fatal(err)
	}
	first := relay.WaitMessages(t, 1, waitLong)[0]
	if strings.Join(first.To, ",") != "abuse@example.com" {
		t.Fatalf("first delivery to %q", first.To)
	}
	eventually(t, "a retry for the rejected recipient", func() bool {
		return strings.Count(logs.String(), "desk@example.com") >= 2
	})
	if m.Pending() != 1 {
		t.Fatalf("Pending = %d, want 1 (desk@ still to do)", m.Pending())
	}
	relay.Set(test.RelayConfig{})
	msgs := relay.WaitMessages(t, 2, waitLong)
	eventually(t, "an empty spool", func() bool { return m.Pending() == 0 })
	if strings.Join(msgs[1].To, ",") != "desk@example.com" {
		t.Fatalf("second delivery to %q, want desk@ only", msgs[1].To)
	}
	if !bytes.Equal(msgs[0].Data, msgs[1].Data) {
		t.Error("the two deliveries differ")
	}
	if n := len(relay.Messages()); n != 2 {
		t.Fatalf("%d messages, want 2", n)
	}
}

func TestMailerRestartDeliversSpool(t *testing.T) {
	relay := test.StartRelay(t, test.RelayConfig{})
	cfg := relayConfig(relay)
	cfg.Spool = filepath.Join(t.TempDir(), "spool")

	// The first process queues two reports and dies before sending them,
	// one of them in the middle of writing a third.
	first, _ := newMailer(t, cfg)
	for _, id := range []string{"alice@example.com", "bob@example.com"} {
		if err := first.Enqueue(context.Background(), abuseReport(id)); err != nil {
			t.Fatal(err)
		}
	}
	flush(t, first)
	partial := filepath.Join(cfg.Spool, ".tmp-123456")
	if err := os.WriteFile(partial, []byte(`{"version":1,"fr`), 0o600); err != nil {
		t.Fatal(err)
	}

	second, logs := newMailer(t, cfg)
	if second.Pending() != 2 {
		t.Fatalf("Pending = %d after restart, want 2", second.Pending())
	}
	run(t, second)
	msgs := relay.WaitMessages(t, 2, waitLong)
	eventually(t, "an empty spool", func() bool { return second.Pending() == 0 })
	if !strings.Contains(string(msgs[0].Data), "alice@example.com") || !strings.Contains(string(msgs[1].Data), "bob@example.com") {
		t.Error("not delivered in order")
	}
	if _, err := os.Stat(filepath.Join(cfg.Spool, "corrupt", ".tmp-123456")); err != nil {
		t.Errorf("partial file not moved aside: %v", err)
	}
	if !strings.Contains(logs.String(), "replaying report spool") {
		t.Errorf("no replay log:\n%s", logs)
	}
}

func TestMailerGivesUpAfterMaxAge(t *testing.T) {
	relay := test.StartRelay(t, test.RelayConfig{})
	relay.SetDown(true)
	clock := newClock(time.Date(2024, 3, 5, 14, 0, 0, 0, time.UTC))
	cfg := relayConfig(relay)
	cfg.Now = clock.Now
	cfg.MaxAge = 24 * time.Hour
	cfg.Spool = filepath.Join(t.TempDir(), "spool")
	m, logs := newMailer(t, cfg)
	run(t, m)
	if err := m.Enqueue(context.Background(), abuseReport("alice@example.com")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a failed attempt", func() bool { return relay.Refused() >= 1 })
	clock.Add(24*time.Hour + time.Minute)
	eventually(t, "an error log giving the report up", func() bool {
		return strings.Contains(logs.String(), `level=ERROR msg="report given up after max age, not delivered"`)
	})
	if m.Pending() != 0 {
		t.Fatalf("Pending = %d, want 0", m.Pending())
	}
	failed, err := os.ReadDir(filepath.Join(cfg.Spool, "failed"))
	if err != nil || len(failed) != 1 {
		t.Fatalf("failed/: %v, %v", failed, err)
	}
	relay.SetDown(false)
	if err := m.Enqueue(context.Background(), abuseReport("bob@example.com")); err != nil {
		t.Fatal(err)
	}
	msgs := relay.WaitMessages(t, 1, waitLong)
	if strings.Contains(string(msgs[0].Data), "alice@example.com") {
		t.Error("the given-up report was sent")
	}
}

func TestMailerCorruptSpoolFiles(t *testing.T) {
	relay := test.StartRelay(t, test.RelayConfig{})
	cfg := relayConfig(relay)
	cfg.Spool = filepath.Join(t.TempDir(), "spool")
	m, logs := newMailer(t, cfg)
	if err := m.Enqueue(context.Background(), abuseReport("alice@example.com")); err != nil {
		t.Fatal(err)
	}
	flush(t, m)
	names, _ := filepath.Glob(filepath.Join(cfg.Spool, "*.msg"))
	good, err := os.ReadFile(names[0])
	if err != nil {
		t.Fatal(err)
	}
	bad := map[string][]byte{
		"0000000000000000001-garbage.msg":   []byte("\x00\x01garbage"),
		"0000000000000000002-truncated.msg": good[:len(good)-10],
		"0000000000000000003-noheader.msg":  []byte(`{"version":1}`),
		"0000000000000000004-empty.msg":     nil,
		"0000000000000000005-badjson.msg":   append([]byte(`{"version":"x"}`+"\n"), good...),
	}
	for name, data := range bad {
		if err := os.WriteFile(filepath.Join(cfg.Spool, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	run(t, m)
	relay.WaitMessages(t, 1, waitLong)
	eventually(t, "an empty spool", func() bool { return m.Pending() == 0 })
	for name := range bad {
		if _, err := os.Stat(filepath.Join(cfg.Spool, "corrupt", name)); err != nil {
			t.Errorf("%s not moved aside: %v", name, err)
		}
	}
	eventually(t, "a log line for each corrupt file", func() bool {
		return strings.Count(logs.String(), `level=ERROR msg="corrupt spool file moved aside"`) == len(bad)
	})
	if n := len(relay.Messages()); n != 1 {
		t.Errorf("%d messages, want 1", n)
	}
}

func TestMailerWarnUser(t *testing.T) {
	relay := test.StartRelay(t, test.RelayConfig{})
	cfg := relayConfig(relay)
	cfg.WarnUser = true
	cfg.UserDomains = []string{"example.com"}
	m, _ := newMailer(t, cfg)
	warn := abuseReport("alice@example.com")
	warn.Kind, warn.Count, warn.Action = notify.KindWarning, 75, ""
	if err := m.Enqueue(context.Background(), warn); err != nil {
		t.Fatal(err)
	}
	if m.Pending() != 2 {
		t.Fatalf("Pending = %d, want 2 (desk and user)", m.Pending())
	}
	// A block report and an IP identity get no user message.
	if err := m.Enqueue(context.Background(), abuseReport("alice@example.com")); err != nil {
		t.Fatal(err)
	}
	ip := warn
	ip.Identity = "192.0.2.55"
	if err := m.Enqueue(context.Background(), ip); err != nil {
		t.Fatal(err)
	}
	run(t, m)
	msgs := relay.WaitMessages(t, 4, waitLong)
	eventually(t, "an empty spool", func() bool { return m.Pending() == 0 })
	var user []test.RelayMessage
	for _, msg := range msgs {
		if strings.Join(msg.To, ",") == "alice@example.com" {
			user = append(user, msg)
		}
	}
	if len(user) != 1 || len(relay.Messages()) != 4 {
		t.Fatalf("%d user warnings of %d messages, want 1 of 4", len(user), len(relay.Messages()))
	}
	if !strings.Contains(string(user[0].Data), "Subject: Your email account") {
		t.Errorf("user warning:\n%s", user[0].Data)
	}
}

func TestMailerNoToAddresses(t *testing.T) {
	relay := test.StartRelay(t, test.RelayConfig{})
	cfg := relayConfig(relay)
	cfg.To = nil
	m, _ := newMailer(t, cfg)
	if err := m.Enqueue(context.Background(), abuseReport("alice@example.com")); err != nil {
		t.Fatal(err)
	}
	if m.Pending() != 0 {
		t.Fatalf("Pending = %d, want 0", m.Pending())
	}
	if err := m.SendNow(context.Background(), abuseReport("alice@example.com")); err == nil {
		t.Fatal("SendNow without To worked")
	}

	cfg.WarnUser = true
	cfg.UserDomains = []string{"example.com"}
	m, _ = newMailer(t, cfg)
	warn := abuseReport("alice@example.com")
	warn.Kind = notify.KindWarning
	if err := m.Enqueue(context.Background(), warn); err != nil {
		t.Fatal(err)
	}
	if m.Pending() != 1 {
		t.Fatalf("Pending = %d, want 1 (the user warning)", m.Pending())
	}
}

// TestMailerWarnUserLocalOnly checks that user warnings go only to the
// site's own users (Config.UserDomains), at most once per period each:
// identities naming third-party addresses, as forged requests can, get
// nothing.
func TestMailerWarnUserLocalOnly(t *testing.T) {
	clock := newClock(time.Date(2024, 3, 5, 14, 0, 0, 0, time.UTC))
	cfg := notify.Config{
		To: nil, From: "rcptguard@mail1.example.net", Relay: "127.0.0.1:1", Hostname: "mail1.example.net",
		WarnUser: true, UserDomains: []string{"Customer.Example.", "other.example"}, UserWarnPeriod: time.Hour, Now: clock.Now,
	}
	m, logs := newMailer(t, cfg)
	warn := func(id string) {
		t.Helper()
		r := abuseReport(id)
		r.Kind, r.Count, r.Action = notify.KindWarning, 75, ""
		if err := m.Enqueue(context.Background(), r); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 200 {
		warn(fmt.Sprintf("victim%d@third-party.example", i))
	}
	warn("x@customer.example.evil")
	warn("x@sub.customer.example")
	if n := m.Pending(); n != 0 {
		t.Fatalf("%d user warnings to third-party addresses", n)
	}
	if !strings.Contains(logs.String(), "not in detector.local_domains") {
		t.Errorf("no log line for the refused warnings:\n%s", logs)
	}
	for _, tt := range []struct {
		id      string
		advance time.Duration
		pending int
	}{
		{"alice@customer.example", 0, 1},
		{"alice@customer.example", 10 * time.Minute, 1}, // within the period
		{"Alice@Customer.EXAMPLE", 10 * time.Minute, 1}, // the same user
		{"bob@other.example", 0, 2},                     // another user
		{"alice@customer.example", 41 * time.Minute, 3}, // a period after the first
		{"alice@customer.example", 59 * time.Minute, 3},
		{"alice@customer.example", 2 * time.Minute, 4},
	} {
		clock.Add(tt.advance)
		warn(tt.id)
		if n := m.Pending(); n != tt.pending {
			t.Fatalf("after a warning for %s: %d pending, want %d", tt.id, n, tt.pending)
		}
	}
	flush(t, m) // the spool writes end before the test's directory goes
}

func TestMailerSpoolFiles(t *testing.T) {
	relay := test.StartRelay(t, test.RelayConfig{})
	cfg := relayConfig(relay)
	cfg.Spool = filepath.Join(t.TempDir(), "a", "spool")
	m, _ := newMailer(t, cfg)
	fi, err := os.Stat(cfg.Spool)
	if err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("spool dir: %v, %v", fi.Mode(), err)
	}
	for range 3 {
		if err := m.Enqueue(context.Background(), abuseReport("alice@example.com")); err != nil {
			t.Fatal(err)
		}
	}
	flush(t, m)
	entries, err := os.ReadDir(cfg.Spool)
	// Three messages and the record of the block reports (the ledger).
	if err != nil || len(entries) != 4 {
		t.Fatalf("spool holds %v, %v; want 4 files", entries, err)
	}
	for _, e := range entries {
		fi, _ := e.Info()
		if !(strings.HasSuffix(e.Name(), ".msg") || e.Name() == "reported") || fi.Mode().Perm() != 0o600 {
			t.Errorf("spool file %s mode %v", e.Name(), fi.Mode())
		}
	}
}

func TestNewValidates(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  notify.Config
		want string
	}{
		{"from", notify.Config{From: "not an address"}, "from"},
		{"to", notify.Config{To: []string{"ok@example.com", "bad"}}, "to[1]"},
		{"to-8bit", notify.Config{To: []string{"ü@example.com"}}, "non-ASCII"},
		{"relay", notify.Config{Relay: "localhost"}, "relay"},
		// Port, TLS policy and password are the configuration's to check
		// (cmd/rcptguard/app), with the key that set them.
	} {
		_, err := notify.New(tc.cfg)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want an error naming %q", tc.name, err, tc.want)
		}
	}
	m, err := notify.New(notify.Config{})
	if err != nil {
		t.Fatalf("defaults: %v", err)
	}
	if err := m.Enqueue(context.Background(), fixedReport()); !errors.Is(err, notify.ErrNoSpool) {
		t.Errorf("Enqueue without spool: %v", err)
	}
	if err := m.Run(context.Background()); !errors.Is(err, notify.ErrNoSpool) {
		t.Errorf("Run without spool: %v", err)
	}
}

func TestMailerRunTwice(t *testing.T) {
	relay := test.StartRelay(t, test.RelayConfig{})
	m, _ := newMailer(t, relayConfig(relay))
	run(t, m)
	if err := m.Enqueue(context.Background(), abuseReport("alice@example.com")); err != nil {
		t.Fatal(err)
	}
	relay.WaitMessages(t, 1, waitLong) // the first Run is running
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := m.Run(ctx); err == nil {
		t.Fatal("a second Run was allowed")
	}
}
