package test

import (
	"bufio"
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
	// CatchAll accepts every recipient, as a backup MX that relays
	// whatever it gets does.
	CatchAll bool
	// Unknown is the reply for recipients that are not mailboxes.
	// Nil means 550 5.1.1 "no such user".
	Unknown *smtp.SMTPError
	// Accepted, when set, is the reply to accepted recipients instead of
	// go-smtp's own 250 (e.g. OpenSMTPD's "250 2.1.5 Destination address
	// valid").
	Accepted *smtp.SMTPError
	// Rcpt overrides the reply for individual recipients (lower case keys).
	// A nil value accepts the recipient.
	Rcpt map[string]*smtp.SMTPError
	// Mail, when set, refuses MAIL FROM with this reply.
	Mail *smtp.SMTPError
	// Banner, when set, is sent instead of the 220 greeting. After a 2xx
	// or 421 banner the connection is closed at once; after any other
	// (554 as Postfix's postscreen sends) the server answers 503 to every
	// command but QUIT, as RFC 5321 §3.1 says, until the client quits.
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

	// SoftErrorLimit, ErrorSleep and HardErrorLimit play Postfix's
	// smtpd_soft_error_limit (10), smtpd_error_sleep_time (1s) and
	// smtpd_hard_error_limit (20): once a connection has had
	// SoftErrorLimit error replies (4xx or 5xx), every reply line is held
	// back ErrorSleep; at HardErrorLimit errors the server says "421 4.7.0
	// Error: too many errors" and hangs up. Zero limits are off.
	SoftErrorLimit int
	ErrorSleep     time.Duration
	HardErrorLimit int
	// OneEHLO answers a second EHLO or HELO in the same phase (plain text,
	// or after STARTTLS) with OpenSMTPD's "503 5.5.1 Invalid command:
	// Already identified".
	OneEHLO bool
}

// MXSession is what one connection to a fake MX did.
type MXSession struct {
	EHLOs       int      // EHLO and HELO commands
	Quit        bool     // the client said QUIT
	Rsets       int      // RSET commands
	Rcpts       []string // RCPT TO arguments, in order
	Errors      int      // 4xx and 5xx replies sent
	ErrorSleeps int      // reply lines held back for the error limit
	TLS         bool     // STARTTLS was completed
	Commands    []string // every command verb, in order
}

// MX is an in-process SMTP server, listening on 127.0.0.1, playing a
// recipient's mail exchanger for probe tests. It never accepts DATA.
//
// go-smtp speaks the protocol; a thin front in this file sits between the
// client and go-smtp, line by line, to count commands per connection, do
// STARTTLS itself and play the behaviours of real servers that go-smtp does
// not have (error sleeps, one EHLO only, the 554 greeting).
type MX struct {
	Addr string // "127.0.0.1:port"

	mu       sync.Mutex
	cfg      MXConfig
	conns    int
	rcpts    []string
	mails    []string
	datas    int
	tlsUsed  int
	helos    []string
	sessions []*MXSession
	done     chan struct{}
	pipes    chan net.Conn
	tlsCfg   *tls.Config
	wg       sync.WaitGroup
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
	m := &MX{Addr: ln.Addr().String(), cfg: cfg, done: make(chan struct{}), pipes: make(chan net.Conn)}
	if cfg.TLS {
		m.tlsCfg = &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}}
	}
	s := smtp.NewServer(smtp.BackendFunc(m.newSession))
	s.Domain = "mx.test"
	s.ReadTimeout = 5 * time.Minute // the front times idle clients out
	s.WriteTimeout = 30 * time.Second
	s.ErrorLog = log.New(io.Discard, "", 0)
	s.EnableSMTPUTF8 = true
	go func() { _ = s.Serve(&pipeListener{m: m, addr: ln.Addr()}) }()
	m.wg.Go(func() { m.accept(ln) })
	t.Cleanup(func() {
		close(m.done)
		_ = ln.Close()
		_ = s.Close()
		m.wg.Wait()
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
func (m *MX) Conns() int { return locked(&m.mu, func() int { return m.conns }) }

// Sessions returns a copy of what every connection did so far, in the
// order they were accepted.
func (m *MX) Sessions() []MXSession {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]MXSession, len(m.sessions))
	for i, s := range m.sessions {
		out[i] = *s
		out[i].Rcpts = append([]string(nil), s.Rcpts...)
		out[i].Commands = append([]string(nil), s.Commands...)
	}
	return out
}

// Rcpts lists every RCPT TO argument received so far, in order.
func (m *MX) Rcpts() []string {
	return locked(&m.mu, func() []string { return append([]string(nil), m.rcpts...) })
}

// Mails lists every MAIL FROM argument received so far, in order.
func (m *MX) Mails() []string {
	return locked(&m.mu, func() []string { return append([]string(nil), m.mails...) })
}

// Helos lists the EHLO/HELO names clients introduced themselves with.
func (m *MX) Helos() []string {
	return locked(&m.mu, func() []string { return append([]string(nil), m.helos...) })
}

// Datas counts DATA commands that reached the backend: a prober must never
// send one.
func (m *MX) Datas() int { return locked(&m.mu, func() int { return m.datas }) }

// TLSSessions counts sessions that issued MAIL FROM over TLS.
func (m *MX) TLSSessions() int { return locked(&m.mu, func() int { return m.tlsUsed }) }

func (m *MX) config() MXConfig { return locked(&m.mu, func() MXConfig { return m.cfg }) }

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

// record runs f on the session record under the lock.
func (m *MX) record(rec *MXSession, f func(*MXSession)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	f(rec)
}

func (m *MX) newSession(c *smtp.Conn) (smtp.Session, error) {
	m.mu.Lock()
	m.helos = append(m.helos, c.Hostname())
	m.mu.Unlock()
	s := &mxSession{m: m, c: c}
	if p, ok := c.Conn().(*frontPipe); ok {
		s.front = p.front
	}
	return s, nil
}

type mxSession struct {
	m     *MX
	c     *smtp.Conn
	front *front
	rcpts int
}

func (s *mxSession) Reset()        {}
func (s *mxSession) Logout() error { return nil }

func (s *mxSession) Mail(from string, _ *smtp.MailOptions) error {
	cfg := s.m.config()
	s.m.mu.Lock()
	s.m.mails = append(s.m.mails, from)
	if s.front != nil && s.front.rec.TLS {
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
	if s.front != nil {
		s.front.rec.Rcpts = append(s.front.rec.Rcpts, to)
	}
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
			return cfg.accepted()
		}
		return reply
	}
	if cfg.CatchAll {
		return cfg.accepted()
	}
	for _, mb := range cfg.Mailboxes {
		if strings.EqualFold(mb, to) {
			return cfg.accepted()
		}
	}
	if cfg.Unknown != nil {
		return cfg.Unknown
	}
	return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "<" + to + ">: no such user"}
}

// accepted is the reply to an accepted recipient: nil lets go-smtp say
// 250; a configured 2xx reply is written as given.
func (cfg MXConfig) accepted() error {
	if cfg.Accepted != nil {
		return cfg.Accepted
	}
	return nil
}

func (s *mxSession) Data(io.Reader) error {
	s.m.mu.Lock()
	s.m.datas++
	s.m.mu.Unlock()
	return &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 5, 1}, Message: "a probe must not send DATA"}
}

// pipeListener hands go-smtp the server ends of the fronts' pipes.
type pipeListener struct {
	m    *MX
	addr net.Addr
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.m.pipes:
		return c, nil
	case <-l.m.done:
		return nil, net.ErrClosed
	}
}
func (l *pipeListener) Close() error   { return nil }
func (l *pipeListener) Addr() net.Addr { return l.addr }

// frontPipe is go-smtp's end of a front's pipe; the backend finds the
// connection's record through it.
type frontPipe struct {
	net.Conn
	front *front
}

// accept runs a front for every client connection.
func (m *MX) accept(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		rec := &MXSession{}
		m.mu.Lock()
		m.conns++
		m.sessions = append(m.sessions, rec)
		cfg := m.cfg
		m.mu.Unlock()
		if cfg.DropAt == "banner" {
			_ = c.Close()
			continue
		}
		m.wg.Go(func() {
			f := &front{m: m, cfg: cfg, rec: rec, client: c}
			f.run()
		})
	}
}

// front is the line-by-line go-between of one client connection and
// go-smtp. The client speaks without pipelining, as a prober does.
type front struct {
	m      *MX
	cfg    MXConfig
	rec    *MXSession
	client net.Conn // the TCP connection, or TLS over it after STARTTLS
	cr     *bufio.Reader
	server net.Conn // the front's end of the pipe to go-smtp
	sr     *bufio.Reader
	hello  bool // EHLO/HELO done in this phase
}

func (f *front) run() {
	raw := f.client
	defer func() { _ = raw.Close() }()
	ended := make(chan struct{})
	defer close(ended)
	go func() {
		select {
		case <-f.m.done:
			_ = raw.Close()
		case <-ended:
		}
	}()
	f.cr = bufio.NewReader(f.client)
	f.m.pause(f.cfg.BannerDelay)
	if b := f.cfg.Banner; b != nil {
		f.refuse(b)
		return
	}
	ours, theirs := net.Pipe()
	f.server = ours
	defer func() { _ = f.server.Close() }()
	f.sr = bufio.NewReader(ours)
	select {
	case f.m.pipes <- &frontPipe{Conn: theirs, front: f}:
	case <-f.m.done:
		return
	}
	greeting, err := f.serverReply()
	if err != nil || f.send(greeting) != nil {
		return
	}
	for {
		line, verb, err := f.command()
		if err != nil {
			return
		}
		var reply []string
		switch verb {
		case "EHLO", "HELO":
			f.m.record(f.rec, func(r *MXSession) { r.EHLOs++ })
			if f.cfg.OneEHLO && f.hello {
				reply = []string{"503 5.5.1 Invalid command: Already identified"}
				break
			}
			f.hello = true
			if reply, err = f.forward(line); err != nil {
				return
			}
			if verb == "EHLO" && f.m.tlsCfg != nil && !f.rec.TLS && len(reply) > 0 && reply[0][0] == '2' {
				reply = addCapability(reply, "STARTTLS")
			}
		case "STARTTLS":
			if f.m.tlsCfg == nil || f.rec.TLS {
				reply = []string{"502 5.5.1 STARTTLS not offered"}
				break
			}
			if !f.startTLS() {
				return
			}
			continue
		case "QUIT":
			f.m.record(f.rec, func(r *MXSession) { r.Quit = true })
			if reply, err = f.forward(line); err != nil {
				return
			}
			_ = f.send(reply)
			return
		default:
			if verb == "RSET" {
				f.m.record(f.rec, func(r *MXSession) { r.Rsets++ })
			}
			if reply, err = f.forward(line); err != nil {
				return
			}
		}
		if f.send(reply) != nil {
			return
		}
		if f.cfg.HardErrorLimit > 0 && f.rec.Errors >= f.cfg.HardErrorLimit {
			_ = f.send([]string{"421 4.7.0 mx.test Error: too many errors"})
			return
		}
	}
}

// command reads the client's next command line and records its verb.
func (f *front) command() (line, verb string, err error) {
	if line, err = f.readCommand(); err != nil {
		return "", "", err
	}
	verb = strings.ToUpper(strings.SplitN(line, " ", 2)[0])
	f.m.record(f.rec, func(r *MXSession) { r.Commands = append(r.Commands, verb) })
	return line, verb, nil
}

// startTLS answers STARTTLS and runs the handshake; false: the session
// is over.
func (f *front) startTLS() bool {
	if f.send([]string{"220 2.0.0 Ready to start TLS"}) != nil {
		return false
	}
	tc := tls.Server(f.client, f.m.tlsCfg)
	_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
	if tc.Handshake() != nil {
		return false
	}
	_ = tc.SetDeadline(time.Time{})
	f.client, f.cr, f.hello = tc, bufio.NewReader(tc), false
	f.m.record(f.rec, func(r *MXSession) { r.TLS = true })
	return true
}

// refuse plays a refusing greeting.
func (f *front) refuse(b *smtp.SMTPError) {
	if f.send([]string{strings.TrimSuffix(bannerLine(b), "\r\n")}) != nil || b.Code/100 == 2 || b.Code == 421 {
		return
	}
	for {
		_, verb, err := f.command()
		if err != nil {
			return
		}
		if verb == "QUIT" {
			f.m.record(f.rec, func(r *MXSession) { r.Quit = true })
			_ = f.send([]string{"221 2.0.0 Bye"})
			return
		}
		if f.send([]string{"503 5.5.0 Error: command not allowed, the greeting refused you"}) != nil {
			return
		}
	}
}

// readCommand reads one client line, answering 421 when the client stays
// silent for the idle timeout.
func (f *front) readCommand() (string, error) {
	idle := f.cfg.IdleTimeout
	if idle <= 0 {
		idle = 30 * time.Second
	}
	_ = f.client.SetReadDeadline(time.Now().Add(idle))
	line, err := f.cr.ReadString('\n')
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		_ = f.send([]string{"421 4.4.2 mx.test Error: timeout exceeded"})
	}
	if err != nil {
		return "", err
	}
	return strings.TrimRight(line, "\r\n"), nil
}

// forward passes a command to go-smtp and returns its reply lines.
func (f *front) forward(line string) ([]string, error) {
	_ = f.server.SetWriteDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(f.server, line+"\r\n"); err != nil {
		return nil, err
	}
	return f.serverReply()
}

// serverReply reads one reply of go-smtp, all its lines. RCPT replies may
// be held back by RcptDelay, so there is no short deadline here: the pipe
// closes when the server stops.
func (f *front) serverReply() ([]string, error) {
	var lines []string
	for {
		l, err := f.sr.ReadString('\n')
		if err != nil {
			return nil, err
		}
		l = strings.TrimRight(l, "\r\n")
		lines = append(lines, l)
		if len(l) < 4 || l[3] != '-' {
			return lines, nil
		}
	}
}

// send writes a reply to the client, counting errors and holding every
// line back by the error sleep once the connection is past the soft limit.
func (f *front) send(lines []string) error {
	if len(lines) == 0 {
		return nil
	}
	var sleep bool
	f.m.record(f.rec, func(r *MXSession) {
		sleep = f.cfg.SoftErrorLimit > 0 && r.Errors >= f.cfg.SoftErrorLimit
		if c := lines[0][0]; c == '4' || c == '5' {
			r.Errors++
		}
	})
	for _, l := range lines {
		if sleep {
			f.m.record(f.rec, func(r *MXSession) { r.ErrorSleeps++ })
			f.m.pause(f.cfg.ErrorSleep)
		}
		_ = f.client.SetWriteDeadline(time.Now().Add(30 * time.Second))
		if _, err := io.WriteString(f.client, l+"\r\n"); err != nil {
			return err
		}
	}
	return nil
}

// addCapability adds an EHLO keyword as the last line of a 250 reply.
func addCapability(reply []string, kw string) []string {
	out := make([]string, 0, len(reply)+1)
	for _, l := range reply {
		if len(l) >= 4 {
			l = l[:3] + "-" + l[4:]
		}
		out = append(out, l)
	}
	return append(out, "250 "+kw)
}

func bannerLine(e *smtp.SMTPError) string {
	line := strconv.Itoa(e.Code) + " "
	if e.EnhancedCode != smtp.EnhancedCodeNotSet && e.EnhancedCode != smtp.NoEnhancedCode {
		line += strconv.Itoa(e.EnhancedCode[0]) + "." + strconv.Itoa(e.EnhancedCode[1]) + "." + strconv.Itoa(e.EnhancedCode[2]) + " "
	}
	return line + e.Message + "\r\n"
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
