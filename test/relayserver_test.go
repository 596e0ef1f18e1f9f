package test_test

import (
	"crypto/tls"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/rcptguard/rcptguard/test"
)

const relayTestMsg = "Subject: hi\r\n\r\n.leading dot\r\nbody\r\n"

// relayDial connects a go-smtp client to the relay, with STARTTLS when
// tlsConfig is set.
func relayDial(t *testing.T, r *test.Relay, tlsConfig *tls.Config) *smtp.Client {
	t.Helper()
	conn, err := net.DialTimeout("tcp", r.Addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_ = conn.SetDeadline(time.Now().Add(time.Minute))
	var c *smtp.Client
	if tlsConfig != nil {
		if c, err = smtp.NewClientStartTLS(conn, tlsConfig); err != nil {
			t.Fatal(err)
		}
	} else {
		c = smtp.NewClient(conn)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.Hello("client.test"); err != nil {
		t.Fatal(err)
	}
	return c
}

func relaySend(c *smtp.Client, to ...string) error {
	return c.SendMail("from@example.com", to, strings.NewReader(relayTestMsg))
}

func TestRelayStoresMessages(t *testing.T) {
	r := test.StartRelay(t, test.RelayConfig{})
	c := relayDial(t, r, nil)
	if err := relaySend(c, "a@example.com", "b@example.com"); err != nil {
		t.Fatal(err)
	}
	msgs := r.WaitMessages(t, 1, 5*time.Second)
	m := msgs[0]
	if m.From != "from@example.com" || strings.Join(m.To, ",") != "a@example.com,b@example.com" {
		t.Errorf("envelope %q %q", m.From, m.To)
	}
	if string(m.Data) != relayTestMsg {
		t.Errorf("data %q, want %q", m.Data, relayTestMsg)
	}
	if m.TLS || m.AuthMechanism != "" {
		t.Errorf("TLS %v, auth %q: want neither", m.TLS, m.AuthMechanism)
	}
	if got := r.Helos(); len(got) != 1 || got[0] != "client.test" {
		t.Errorf("helos %q", got)
	}
	if r.Conns() != 1 || r.DataCommands() != 1 {
		t.Errorf("conns %d, data %d", r.Conns(), r.DataCommands())
	}
}

func TestRelayAuth(t *testing.T) {
	cfg := test.RelayConfig{AuthUser: "user", AuthPass: "secret", AllowInsecureAuth: true}
	for _, tc := range []struct {
		name   string
		client sasl.Client
		mech   string
		ok     bool
	}{
		{"plain", sasl.NewPlainClient("", "user", "secret"), "PLAIN", true},
		{"plain-bad", sasl.NewPlainClient("", "user", "wrong"), "PLAIN", false},
		{"login-ir", sasl.NewLoginClient("user", "secret"), "LOGIN", true},
		{"login", &relayTestLogin{user: "user", pass: "secret"}, "LOGIN", true},
		{"login-bad", &relayTestLogin{user: "user", pass: "wrong"}, "LOGIN", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := test.StartRelay(t, cfg)
			c := relayDial(t, r, nil)
			if !c.SupportsAuth("PLAIN") || !c.SupportsAuth("LOGIN") {
				t.Fatal("AUTH PLAIN LOGIN not offered")
			}
			err := c.Auth(tc.client)
			if !tc.ok {
				var se *smtp.SMTPError
				if !errors.As(err, &se) || se.Code != 535 {
					t.Fatalf("auth: %v, want 535", err)
				}
				if err := relaySend(c, "a@example.com"); err == nil {
					t.Fatal("MAIL accepted without AUTH")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if err := relaySend(c, "a@example.com"); err != nil {
				t.Fatal(err)
			}
			m := r.Messages()[0]
			if m.AuthMechanism != tc.mech || m.AuthUser != "user" {
				t.Errorf("auth %q %q", m.AuthMechanism, m.AuthUser)
			}
		})
	}
}

// relayTestLogin is a LOGIN client without an initial response.
type relayTestLogin struct {
	user, pass string
	step       int
}

func (a *relayTestLogin) Start() (string, []byte, error) { return "LOGIN", nil, nil }

func (a *relayTestLogin) Next(challenge []byte) ([]byte, error) {
	a.step++
	if a.step == 1 && string(challenge) == "Username:" {
		return []byte(a.user), nil
	}
	if a.step == 2 && string(challenge) == "Password:" {
		return []byte(a.pass), nil
	}
	return nil, errors.New("unexpected challenge")
}

func TestRelayAuthOnlyOverTLS(t *testing.T) {
	r := test.StartRelay(t, test.RelayConfig{AuthUser: "user", AuthPass: "secret", AuthMechanisms: []string{"LOGIN"}, TLS: true})
	c := relayDial(t, r, nil)
	if ok, _ := c.Extension("AUTH"); ok {
		t.Fatal("AUTH offered without TLS")
	}
	if ok, _ := c.Extension("STARTTLS"); !ok {
		t.Fatal("STARTTLS not offered")
	}
	c.Close()

	c = relayDial(t, r, &tls.Config{RootCAs: r.RootCAs(), ServerName: "127.0.0.1"})
	if c.SupportsAuth("PLAIN") || !c.SupportsAuth("LOGIN") {
		t.Fatal("want LOGIN only")
	}
	if err := c.Auth(sasl.NewLoginClient("user", "secret")); err != nil {
		t.Fatal(err)
	}
	if err := relaySend(c, "a@example.com"); err != nil {
		t.Fatal(err)
	}
	if m := r.Messages()[0]; !m.TLS {
		t.Error("message not marked TLS")
	}
}

func TestRelayCertificateNotTrustedByDefault(t *testing.T) {
	r := test.StartRelay(t, test.RelayConfig{TLS: true})
	conn, err := net.Dial("tcp", r.Addr)
	if err != nil {
		t.Fatal(err)
	}
	c, err := smtp.NewClientStartTLS(conn, &tls.Config{ServerName: "127.0.0.1"})
	if err == nil {
		err = c.Hello("client.test")
		c.Close()
	}
	var cve *tls.CertificateVerificationError
	if !errors.As(err, &cve) {
		t.Fatalf("got %v, want a certificate verification error", err)
	}
}

func TestRelayFailures(t *testing.T) {
	r := test.StartRelay(t, test.RelayConfig{
		RcptReply:   map[string]*smtp.SMTPError{"bad@example.com": {Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no"}},
		DataReplies: []*smtp.SMTPError{{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "later"}},
	})
	c := relayDial(t, r, nil)
	err := relaySend(c, "Bad@example.com")
	var se *smtp.SMTPError
	if !errors.As(err, &se) || se.Code != 550 {
		t.Fatalf("rcpt: %v, want 550", err)
	}
	if err := c.Reset(); err != nil {
		t.Fatal(err)
	}
	if err := relaySend(c, "good@example.com"); !errors.As(err, &se) || se.Code != 451 {
		t.Fatalf("first data: %v, want 451", err)
	}
	if err := relaySend(c, "good@example.com"); err != nil {
		t.Fatalf("second data: %v", err)
	}
	if n := len(r.Messages()); n != 1 || r.DataCommands() != 2 {
		t.Fatalf("%d messages, %d DATA; want 1, 2", n, r.DataCommands())
	}

	r.Set(test.RelayConfig{DataReply: &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "never"}})
	if err := c.Reset(); err != nil {
		t.Fatal(err)
	}
	if err := relaySend(c, "good@example.com"); !errors.As(err, &se) || se.Code != 554 {
		t.Fatalf("data after Set: %v, want 554", err)
	}
}

func TestRelayDown(t *testing.T) {
	r := test.StartRelay(t, test.RelayConfig{})
	r.SetDown(true)
	conn, err := net.DialTimeout("tcp", r.Addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	c := smtp.NewClient(conn)
	if err := c.Hello("client.test"); err == nil {
		t.Fatal("EHLO worked while down")
	}
	c.Close()
	if r.Refused() != 1 || r.Conns() != 0 {
		t.Fatalf("refused %d, conns %d", r.Refused(), r.Conns())
	}
	r.SetDown(false)
	c = relayDial(t, r, nil)
	if err := relaySend(c, "a@example.com"); err != nil {
		t.Fatal(err)
	}
}
