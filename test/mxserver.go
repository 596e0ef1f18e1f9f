package test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"log"
	"math/big"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// MXConfig says how a fake MX answers. The zero value accepts nothing: every
// recipient not in Mailboxes gets Unknown (by default 550 5.1.1).
type MXConfig struct {
	// Mailboxes are the recipients accepted with 250, compared case-insensitively.
	Mailboxes []string
	// CatchAll accepts every recipient.
	CatchAll bool
	// Unknown is the reply for recipients that are not mailboxes.
	// Nil means 550 5.1.1 "no such user".
	Unknown *smtp.SMTPError
	// Rcpt overrides the reply for individual recipients (lower case keys).
	// A nil value accepts the recipient.
	Rcpt map[string]*smtp.SMTPError
	// Mail, when set, refuses MAIL FROM with this reply.
	Mail *smtp.SMTPError
	// Banner, when set, is sent instead of the 220 greeting and the
	// connection is closed after it (e.g. 554 go away, 421 busy).
	Banner *smtp.SMTPError
	// BannerDelay holds the greeting back this long (a tarpit).
	BannerDelay time.Duration
	// RcptDelay holds every RCPT reply back this long.
	RcptDelay time.Duration
	// DropAt closes the connection when this command arrives: "mail" or
	// "rcpt". "banner" closes right after accepting the connection.
	DropAt string
	// MaxRcptsPerSession refuses the RCPT commands past this count in one
	// connection with 452 4.5.3 (0: no limit).
	MaxRcptsPerSession int
	// TLS offers STARTTLS with a self-signed certificate.
	TLS bool
	// IdleTimeout closes a connection that sends nothing for this long,
	// with "421 Idle timeout" (default 30s).
	IdleTimeout time.Duration
}

// MX is an in-process SMTP server, listening on 127.0.0.1, playing a
// recipient's mail exchanger for probe tests. It never accepts DATA.
type MX struct {
	Addr string // "127.0.0.1:port"

	mu      sync.Mutex
	cfg     MXConfig
	conns   int
	rcpts   []string
	mails   []string
	datas   int
	tlsUsed int
	helos   []string
	done    chan struct{}
}

// StartMX starts a fake MX on 127.0.0.1:0 that runs until t's cleanup.
func StartMX(t testing.TB, cfg MXConfig) *MX {
	t.Helper()
	return StartMXAt(t, "127.0.0.1:0", cfg)
}

// StartMXAt starts a fake MX on the given loopback address.
func StartMXAt(t testing.TB, addr string, cfg MXConfig) *MX {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("fake MX: listen %s: %v", addr, err)
	}
	m := &MX{Addr: ln.Addr().String(), cfg: cfg, done: make(chan struct{})}
	s := smtp.NewServer(smtp.BackendFunc(m.newSession))
	s.Domain = "mx.test"
	s.ReadTimeout = 30 * time.Second
	if cfg.IdleTimeout > 0 {
		s.ReadTimeout = cfg.IdleTimeout
	}
	s.WriteTimeout = 30 * time.Second
	s.ErrorLog = log.New(io.Discard, "", 0)
	s.EnableSMTPUTF8 = true
	if cfg.TLS {
		s.TLSConfig = &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}}
	}
	go func() { _ = s.Serve(&mxListener{Listener: ln, m: m}) }()
	t.Cleanup(func() {
		close(m.done)
		_ = s.Close()
	})
	return m
}

// Set replaces the server's behaviour for new commands.
func (m *MX) Set(cfg MXConfig) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.cfg = cfg
}

// Conns is the number of connections accepted so far.
func (m *MX) Conns() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.conns
}

// Rcpts lists every RCPT TO argument received so far, in order.
func (m *MX) Rcpts() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]string(nil), m.rcpts...)
}

// Mails lists every MAIL FROM argument received so far, in order.
func (m *MX) Mails() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]string(nil), m.mails...)
}

// Helos lists the EHLO/HELO names clients introduced themselves with.
func (m *MX) Helos() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]string(nil), m.helos...)
}

// Datas counts DATA commands that reached the backend: a prober must never
// send one.
func (m *MX) Datas() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.datas
}

// TLSSessions counts sessions that issued MAIL FROM over TLS.
func (m *MX) TLSSessions() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.tlsUsed
}

func (m *MX) config() MXConfig {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.cfg
}

// pause waits d, or less when the server stops.
func (m *MX) pause(d time.Duration) {
	if d <= 0 {
		return
	}
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-tm.C:
	case <-m.done:
	}
}

func (m *MX) newSession(c *smtp.Conn) (smtp.Session, error) {
	m.mu.Lock()
	m.helos = append(m.helos, c.Hostname())
	m.mu.Unlock()
	return &mxSession{m: m, c: c}, nil
}

type mxSession struct {
	m     *MX
	c     *smtp.Conn
	rcpts int
}

func (s *mxSession) Reset()        {}
func (s *mxSession) Logout() error { return nil }

func (s *mxSession) Mail(from string, _ *smtp.MailOptions) error {
	cfg := s.m.config()
	s.m.mu.Lock()
	s.m.mails = append(s.m.mails, from)
	if _, ok := s.c.TLSConnectionState(); ok {
		s.m.tlsUsed++
	}
	s.m.mu.Unlock()
	if cfg.DropAt == "mail" {
		_ = s.c.Conn().Close()
		return errors.New("dropped")
	}
	if cfg.Mail != nil {
		return cfg.Mail
	}
	return nil
}

func (s *mxSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	cfg := s.m.config()
	s.m.mu.Lock()
	s.m.rcpts = append(s.m.rcpts, to)
	s.m.mu.Unlock()
	s.rcpts++
	if cfg.DropAt == "rcpt" {
		_ = s.c.Conn().Close()
		return errors.New("dropped")
	}
	s.m.pause(cfg.RcptDelay)
	if cfg.MaxRcptsPerSession > 0 && s.rcpts > cfg.MaxRcptsPerSession {
		return &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 5, 3}, Message: "Too many recipients"}
	}
	key := strings.ToLower(to)
	if reply, ok := cfg.Rcpt[key]; ok {
		if reply == nil {
			return nil
		}
		return reply
	}
	if cfg.CatchAll {
		return nil
	}
	for _, mb := range cfg.Mailboxes {
		if strings.EqualFold(mb, to) {
			return nil
		}
	}
	if cfg.Unknown != nil {
		return cfg.Unknown
	}
	return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "<" + to + ">: no such user"}
}

func (s *mxSession) Data(io.Reader) error {
	s.m.mu.Lock()
	s.m.datas++
	s.m.mu.Unlock()
	return &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 5, 1}, Message: "a probe must not send DATA"}
}

// mxListener counts connections and plays the banner-stage behaviours
// (delay, refusal, drop) before go-smtp greets.
type mxListener struct {
	net.Listener
	m *MX
}

func (l *mxListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		l.m.mu.Lock()
		l.m.conns++
		cfg := l.m.cfg
		l.m.mu.Unlock()
		switch {
		case cfg.DropAt == "banner":
			_ = c.Close()
			continue
		case cfg.Banner != nil:
			go func() {
				l.m.pause(cfg.BannerDelay)
				b := cfg.Banner
				_, _ = io.WriteString(c, bannerLine(b))
				_ = c.Close()
			}()
			continue
		case cfg.BannerDelay > 0:
			return &delayedConn{Conn: c, m: l.m, delay: cfg.BannerDelay}, nil
		}
		return c, nil
	}
}

func bannerLine(e *smtp.SMTPError) string {
	line := strconv.Itoa(e.Code) + " "
	if e.EnhancedCode != smtp.EnhancedCodeNotSet && e.EnhancedCode != smtp.NoEnhancedCode {
		line += strconv.Itoa(e.EnhancedCode[0]) + "." + strconv.Itoa(e.EnhancedCode[1]) + "." + strconv.Itoa(e.EnhancedCode[2]) + " "
	}
	return line + e.Message + "\r\n"
}

// delayedConn holds back its first write (the greeting).
type delayedConn struct {
	net.Conn
	m       *MX
	delay   time.Duration
	delayed sync.Once
}

func (c *delayedConn) Write(b []byte) (int, error) {
	c.delayed.Do(func() { c.m.pause(c.delay) })
	return c.Conn.Write(b)
}

// selfSigned makes a throwaway certificate for STARTTLS tests.
func selfSigned(t testing.TB) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("fake MX: key: %v", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "mx.test"},
		DNSNames:     []string{"mx.test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatalf("fake MX: certificate: %v", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// RouteDialer sends connections for an IP address to a test server
// elsewhere on loopback: "127.0.0.2" → "127.0.0.1:40123". Connections to
// any other address are refused, so nothing leaves the machine.
type RouteDialer map[string]string

// DialContext implements the dialer interface the prober takes.
func (r RouteDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		return nil, err
	}
	target, ok := r[host]
	if !ok {
		return nil, &net.OpError{Op: "dial", Net: network, Err: errors.New("connection refused (no test route for " + address + ")")}
	}
	var d net.Dialer
	return d.DialContext(ctx, network, target)
}
