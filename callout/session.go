package callout

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/textproto"
	"strconv"
	"strings"
	"time"

	"github.com/emersion/go-smtp"
)

// Dialer opens network connections; *net.Dialer satisfies it and tests
// substitute one that routes to in-process servers.
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// session is one SMTP connection to one MX host, used for one or more
// probe transactions. It is owned by a single worker goroutine.
type session struct {
	host    Host
	ip      netip.Addr
	conn    net.Conn
	c       *smtp.Client
	utf8    bool // the server offered SMTPUTF8
	rcpts   int  // RCPT commands sent over the connection
	started bool // a MAIL transaction is open
}

// stageError is a failure at one stage of the dialogue, with the server's
// reply when there was one.
type stageError struct {
	stage Stage
	reply Reply // zero when the failure was not an SMTP reply
	err   error
}

func (e *stageError) Error() string {
	if !e.reply.IsZero() {
		return fmt.Sprintf("%s: %s", e.stage, e.reply)
	}
	return fmt.Sprintf("%s: %v", e.stage, e.err)
}

func (e *stageError) Unwrap() error { return e.err }

// maxPreTLSBytes bounds what an MX may send before the SMTP client takes
// over (greeting and EHLO response).
const maxPreTLSBytes = 64 << 10

// dialSession connects to ip and brings the session to the point where
// MAIL FROM can be sent: greeting, EHLO, STARTTLS when offered, EHLO again.
//
// go-smtp's client can only start TLS from its constructor, and that
// constructor greets with "EHLO localhost", which some MX hosts refuse. So
// the first part of the dialogue, up to and including STARTTLS, is spoken
// here with net/textproto, and the go-smtp client then starts on the
// (possibly encrypted) connection with a replayed greeting.
func (v *Verifier) dialSession(ctx context.Context, host Host, ip netip.Addr, cmdTimeout time.Duration) (*session, error) {
	addr := net.JoinHostPort(ip.String(), strconv.Itoa(v.cfg.Port))
	conn, err := v.cfg.Dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, &stageError{stage: StageConnect, err: fmt.Errorf("dial %s (%s): %w", host.Name, addr, err)}
	}
	tr := v.transcript(host.Name)
	fail := func(e *stageError) (*session, error) {
		_ = conn.Close()
		return nil, e
	}
	// The context bounds the whole pre-TLS phase.
	stop := context.AfterFunc(ctx, func() { _ = conn.Close() })
	defer stop()

	_ = conn.SetDeadline(time.Now().Add(cmdTimeout))
	br := bufio.NewReader(io.LimitReader(conn, maxPreTLSBytes))
	tp := textproto.NewReader(br)
	code, msg, err := tp.ReadResponse(220)
	tr.read(code, msg)
	if err != nil {
		return fail(replyStageError(StageConnect, code, msg, err))
	}
	_ = conn.SetDeadline(time.Now().Add(cmdTimeout))
	if err := writeLine(conn, tr, "EHLO "+v.cfg.Helo); err != nil {
		return fail(&stageError{stage: StageHelo, err: err})
	}
	code, msg, err = tp.ReadResponse(250)
	tr.read(code, msg)
	if err != nil {
		// Servers that do not know EHLO are rare; go-smtp falls back to
		// HELO by itself below, so only a refusal that is not "unknown
		// command" ends the session here.
		if code != 500 && code != 502 {
			return fail(replyStageError(StageHelo, code, msg, err))
		}
	}
	offersTLS := false
	for _, line := range strings.Split(msg, "\n")[1:] {
		if strings.EqualFold(strings.TrimSpace(line), "STARTTLS") {
			offersTLS = true
		}
	}
	if br.Buffered() > 0 {
		return fail(&stageError{stage: StageHelo, err: errors.New("server sent data ahead of the dialogue")})
	}
	c := conn
	const greeting = "220 greeting already received\r\n"
	if offersTLS && !v.cfg.NoTLS {
		_ = conn.SetDeadline(time.Now().Add(cmdTimeout))
		if err := writeLine(conn, tr, "STARTTLS"); err != nil {
			return fail(&stageError{stage: StageHelo, err: err})
		}
		code, msg, err = tp.ReadResponse(220)
		tr.read(code, msg)
		if err == nil && br.Buffered() == 0 {
			// A probe is not a delivery: an expired or self-signed
			// certificate must not stop it, so the certificate is not
			// verified. Nothing secret is sent over this connection.
			tc := tls.Client(conn, &tls.Config{ServerName: host.Name, InsecureSkipVerify: true, MinVersion: tls.VersionTLS10}) //nolint:gosec // see above
			if err := tc.HandshakeContext(ctx); err != nil {
				return fail(&stageError{stage: StageHelo, err: fmt.Errorf("TLS handshake: %w", err)})
			}
			c = tc
			tr.note("TLS established")
		}
		// A refused STARTTLS leaves the session in plain text, which is
		// fine for a probe.
	}
	_ = conn.SetDeadline(time.Time{})
	// go-smtp reads a greeting first: replay it. After STARTTLS the
	// client's EHLO is the mandatory new one; in plain text it is a
	// harmless repetition (RFC 5321 §4.1.4 allows it).
	client := smtp.NewClient(&replayConn{Conn: c, pending: []byte(greeting)})
	client.CommandTimeout = cmdTimeout
	if tr != nil {
		client.DebugWriter = tr
	}
	if err := client.Hello(v.cfg.Helo); err != nil {
		_ = client.Close()
		return nil, replyErr(StageHelo, err)
	}
	s := &session{host: host, ip: ip, conn: conn, c: client}
	s.utf8, _ = client.Extension("SMTPUTF8")
	return s, nil
}

// mail opens a transaction with our MAIL FROM.
func (s *session) mail(from string, utf8 bool) error {
	var opts *smtp.MailOptions
	if utf8 {
		opts = &smtp.MailOptions{UTF8: true}
	}
	if err := s.c.Mail(from, opts); err != nil {
		return replyErr(StageMail, err)
	}
	s.started = true
	return nil
}

// rcpt sends one RCPT TO and returns the reply; err is set only when there
// was no reply (network failure), which ends the session.
func (s *session) rcpt(addr string) (Reply, error) {
	s.rcpts++
	err := s.c.Rcpt(addr, nil)
	if err == nil {
		return Reply{Code: 250}, nil
	}
	if r, ok := ReplyFromError(err); ok {
		return r, nil
	}
	return Reply{}, &stageError{stage: StageRcpt, err: err}
}

// reset ends the open transaction so the connection can be reused.
func (s *session) reset() error {
	if !s.started {
		return nil
	}
	s.started = false
	return s.c.Reset()
}

// close says QUIT politely when it can and always closes the connection.
func (s *session) close() {
	if s == nil {
		return
	}
	s.c.CommandTimeout = 2 * time.Second
	if err := s.c.Quit(); err != nil {
		_ = s.c.Close()
	}
}

// setDeadline makes the connection fail at the deadline whatever the
// client's own command timeouts say, by closing it.
func (s *session) bound(ctx context.Context) (stop func() bool) {
	return context.AfterFunc(ctx, func() { _ = s.conn.Close() })
}

func replyErr(stage Stage, err error) error {
	if r, ok := ReplyFromError(err); ok {
		return &stageError{stage: stage, reply: r, err: err}
	}
	return &stageError{stage: stage, err: err}
}

func replyStageError(stage Stage, code int, msg string, err error) *stageError {
	var perr *textproto.Error
	if errors.As(err, &perr) {
		return replyErr(stage, &smtp.SMTPError{Code: code, Message: msg}).(*stageError)
	}
	return &stageError{stage: stage, err: err}
}

func writeLine(w io.Writer, tr *transcript, line string) error {
	tr.write(line)
	_, err := io.WriteString(w, line+"\r\n")
	return err
}

// replayConn hands out pending bytes before reading from the connection.
type replayConn struct {
	net.Conn
	pending []byte
}

func (c *replayConn) Read(b []byte) (int, error) {
	if len(c.pending) > 0 {
		n := copy(b, c.pending)
		c.pending = c.pending[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}
