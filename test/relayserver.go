package test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"log"
	"math/big"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// RelayConfig says how a test relay behaves. The zero value accepts every
// message from anyone, without TLS or AUTH.
type RelayConfig struct {
	// AuthUser and AuthPass, when AuthUser is set, make the relay offer
	// AUTH and refuse MAIL FROM with 530 5.7.0 until the client
	// authenticated with these credentials.
	AuthUser, AuthPass string
	// AuthMechanisms are the mechanisms offered, from "PLAIN" and
	// "LOGIN"; empty: both. The relay accepts LOGIN with and without an
	// initial response.
	AuthMechanisms []string
	// AllowInsecureAuth offers AUTH without TLS too. Without it, AUTH is
	// offered only after STARTTLS, as a careful relay does.
	AllowInsecureAuth bool
	// TLS offers STARTTLS with a self-signed certificate for 127.0.0.1
	// and "relay.test"; RootCAs returns a pool that trusts it.
	TLS bool
	// RcptReply refuses the recipients it names (lower case keys) with
	// the given reply; a nil reply accepts.
	RcptReply map[string]*smtp.SMTPError
	// DataReplies are the replies at the end of the first DATA commands,
	// one each, in order; a nil entry accepts the message.
	DataReplies []*smtp.SMTPError
	// DataReply is the reply at the end of DATA once DataReplies are used
	// up; nil accepts the message.
	DataReply *smtp.SMTPError
	// AtDataEnd, when set, is called when a message's end of DATA has
	// arrived, before the relay answers; when it returns false the relay
	// drops the message with a 451, as a relay does whose client was
	// gone before it took the message.
	AtDataEnd func() bool
}

// RelayMessage is one message the relay accepted.
type RelayMessage struct {
	From string   // MAIL FROM
	To   []string // RCPT TO, the accepted ones
	Data []byte   // as received, CRLF line endings, dots unstuffed
	// TLS says the session was encrypted (STARTTLS).
	TLS bool
	// AuthMechanism and AuthUser are the SASL mechanism and user the
	// client authenticated with; "" without AUTH.
	AuthMechanism, AuthUser string
}

// Relay is an in-process SMTP relay (a go-smtp server) on 127.0.0.1 for
// tests of mail submission. It stores the messages it accepts. All methods
// are safe for concurrent use.
type Relay struct {
	// Addr is the "127.0.0.1:port" address the relay listens on.
	Addr string

	pool *x509.CertPool

	mu       sync.Mutex
	cfg      RelayConfig
	down     bool
	conns    int
	refused  int
	datas    int
	helos    []string
	msgs     []RelayMessage
	received chan struct{} // closed and replaced when a message arrives
	done     chan struct{}
}

// StartRelay starts a relay on 127.0.0.1:0 that runs until t's cleanup.
func StartRelay(t testing.TB, cfg RelayConfig) *Relay {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("test relay: listen: %v", err)
	}
	r := &Relay{Addr: ln.Addr().String(), cfg: cfg, received: make(chan struct{}), done: make(chan struct{})}
	s := smtp.NewServer(smtp.BackendFunc(r.newSession))
	s.Domain = "relay.test"
	s.ReadTimeout = 30 * time.Second
	s.WriteTimeout = 30 * time.Second
	s.MaxMessageBytes = 10 << 20
	s.ErrorLog = log.New(io.Discard, "", 0)
	s.AllowInsecureAuth = cfg.AllowInsecureAuth
	if cfg.TLS {
		cert, pool := relayCertificate(t)
		r.pool = pool
		s.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}}
	}
	go func() { _ = s.Serve(&relayListener{Listener: ln, r: r}) }()
	t.Cleanup(func() {
		close(r.done)
		_ = s.Close()
	})
	return r
}

// RootCAs returns a pool that trusts the relay's certificate; nil when the
// relay does not offer TLS.
func (r *Relay) RootCAs() *x509.CertPool {
	return r.pool
}

// Set replaces the relay's behaviour for the commands that follow. TLS and
// AllowInsecureAuth keep the values StartRelay was given.
func (r *Relay) Set(cfg RelayConfig) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cfg = cfg
}

// SetDown makes the relay unavailable (true) or available again (false).
// While it is down it accepts TCP connections and closes them before the
// greeting, as a relay that is restarting does; Refused counts them.
func (r *Relay) SetDown(down bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.down = down
}

// Messages returns the messages accepted so far, in order.
func (r *Relay) Messages() []RelayMessage {
	return locked(&r.mu, func() []RelayMessage { return slices.Clone(r.msgs) })
}

// WaitMessages waits until the relay has accepted at least n messages, or
// fails the test after timeout, and returns the messages.
func (r *Relay) WaitMessages(t testing.TB, n int, timeout time.Duration) []RelayMessage {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		r.mu.Lock()
		msgs, ch := slices.Clone(r.msgs), r.received
		r.mu.Unlock()
		if len(msgs) >= n {
			return msgs
		}
		select {
		case <-ch:
		case <-deadline.C:
			t.Fatalf("test relay: %d messages after %v, want %d", len(msgs), timeout, n)
			return nil
		}
	}
}

// Conns counts the connections accepted while the relay was up.
func (r *Relay) Conns() int { return locked(&r.mu, func() int { return r.conns }) }

// Refused counts the connections closed because the relay was down.
func (r *Relay) Refused() int { return locked(&r.mu, func() int { return r.refused }) }

// DataCommands counts the messages transferred with DATA, accepted or not.
func (r *Relay) DataCommands() int { return locked(&r.mu, func() int { return r.datas }) }

// Helos lists the names clients gave in EHLO or HELO, one per session
// (a STARTTLS session counts again after TLS).
func (r *Relay) Helos() []string {
	return locked(&r.mu, func() []string { return slices.Clone(r.helos) })
}

func (r *Relay) config() RelayConfig { return locked(&r.mu, func() RelayConfig { return r.cfg }) }

func (r *Relay) newSession(c *smtp.Conn) (smtp.Session, error) {
	r.mu.Lock()
	r.helos = append(r.helos, c.Hostname())
	r.mu.Unlock()
	return &relaySession{r: r, c: c}, nil
}

// relaySession is one SMTP session with the relay.
type relaySession struct {
	r        *Relay
	c        *smtp.Conn
	authUser string
	authMech string
	from     string
	to       []string
}

var _ smtp.AuthSession = (*relaySession)(nil)

func (s *relaySession) Reset() {
	s.from, s.to = "", nil
}

func (s *relaySession) Logout() error { return nil }

func (s *relaySession) AuthMechanisms() []string {
	cfg := s.r.config()
	if cfg.AuthUser == "" {
		return nil
	}
	if len(cfg.AuthMechanisms) > 0 {
		return cfg.AuthMechanisms
	}
	return []string{sasl.Plain, sasl.Login}
}

func (s *relaySession) Auth(mech string) (sasl.Server, error) {
	cfg := s.r.config()
	if !slices.Contains(s.AuthMechanisms(), mech) {
		return nil, smtp.ErrAuthUnknownMechanism
	}
	check := func(user, pass string) error {
		if user != cfg.AuthUser || pass != cfg.AuthPass {
			return smtp.ErrAuthFailed
		}
		s.authUser, s.authMech = user, mech
		return nil
	}
	switch mech {
	case sasl.Plain:
		return sasl.NewPlainServer(func(identity, user, pass string) error {
			if identity != "" && identity != user {
				return smtp.ErrAuthFailed
			}
			return check(user, pass)
		}), nil
	case sasl.Login:
		return &relayLoginServer{check: check}, nil
	}
	return nil, smtp.ErrAuthUnknownMechanism
}

func (s *relaySession) Mail(from string, _ *smtp.MailOptions) error {
	if s.r.config().AuthUser != "" && s.authUser == "" {
		return &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 0}, Message: "Authentication required"}
	}
	s.from = from
	return nil
}

func (s *relaySession) Rcpt(to string, _ *smtp.RcptOptions) error {
	if reply, ok := s.r.config().RcptReply[strings.ToLower(to)]; ok && reply != nil {
		return reply
	}
	s.to = append(s.to, to)
	return nil
}

func (s *relaySession) Data(body io.Reader) error {
	data, err := io.ReadAll(body)
	if err != nil {
		return err
	}
	r := s.r
	r.mu.Lock()
	atEnd := r.cfg.AtDataEnd
	r.mu.Unlock()
	if atEnd != nil && !atEnd() {
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "message dropped (test)"}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.datas++
	reply := r.cfg.DataReply
	if len(r.cfg.DataReplies) > 0 {
		reply = r.cfg.DataReplies[0]
		r.cfg.DataReplies = r.cfg.DataReplies[1:]
	}
	if reply != nil {
		return reply
	}
	_, isTLS := s.c.TLSConnectionState()
	r.msgs = append(r.msgs, RelayMessage{
		From: s.from, To: slices.Clone(s.to), Data: data,
		TLS: isTLS, AuthMechanism: s.authMech, AuthUser: s.authUser,
	})
	close(r.received)
	r.received = make(chan struct{})
	return nil
}

// relayLoginServer is the server side of SASL LOGIN, which go-sasl does
// not provide: "Username:", "Password:", with or without the user name as
// initial response.
type relayLoginServer struct {
	check func(user, pass string) error
	user  string
	step  int
}

func (a *relayLoginServer) Next(response []byte) (challenge []byte, done bool, err error) {
	switch a.step {
	case 0:
		if response == nil {
			a.step = 1
			return []byte("Username:"), false, nil
		}
		a.user, a.step = string(response), 2
		return []byte("Password:"), false, nil
	case 1:
		a.user, a.step = string(response), 2
		return []byte("Password:"), false, nil
	case 2:
		a.step = 3
		return nil, true, a.check(a.user, string(response))
	}
	return nil, false, sasl.ErrUnexpectedClientResponse
}

// relayListener counts connections and closes them at once while the
// relay is down.
type relayListener struct {
	net.Listener
	r *Relay
}

func (l *relayListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		l.r.mu.Lock()
		down := l.r.down
		if down {
			l.r.refused++
		} else {
			l.r.conns++
		}
		l.r.mu.Unlock()
		if !down {
			return c, nil
		}
		_ = c.Close()
	}
}

// relayCertificate makes a throwaway self-signed certificate valid for
// 127.0.0.1, ::1, "relay.test" and "localhost", and a pool trusting it.
func relayCertificate(t testing.TB) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("test relay: key: %v", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: "relay.test"},
		DNSNames:              []string{"relay.test", "localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatalf("test relay: certificate: %v", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("test relay: certificate: %v", err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool
}
