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
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/rcptguard/rcptguard/callout/textfmt"
)

// Dialer opens network connections; *net.Dialer satisfies it and tests
// substitute one that routes to in-process servers.
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// Bounds on what an MX may send, and on the probe's own politeness.
const (
	// maxReplyLine bounds one reply line, CRLF included. RFC 5321
	// §4.5.3.1.5 says 512; some servers send longer texts.
	maxReplyLine = 2048
	// maxReplyLines bounds the lines of one reply (an EHLO reply has one
	// per extension).
	maxReplyLines = 64
	// quitTimeout bounds the QUIT exchange that ends every session.
	quitTimeout = 2 * time.Second
	// sessionErrorLimit is the number of error replies (4xx and 5xx)
	// after which a session is ended and a fresh one started. Postfix
	// sleeps before every reply once a session has had
	// smtpd_soft_error_limit (10) errors and hangs up at
	// smtpd_hard_error_limit (20); other servers have similar limits.
	sessionErrorLimit = 8
)

// session is one SMTP connection to one MX host, used for one or more
// probe transactions. It is owned by a single worker goroutine.
//
// The dialogue is written here on net/textproto rather than with go-smtp's
// client, whose Reset forgets the EHLO (so it greets again after every
// RSET) and whose STARTTLS constructor greets as "localhost": a probe sends
// exactly one EHLO per session, plus the one RFC 3207 requires after
// STARTTLS, and ends every session with QUIT.
type session struct {
	host    Host
	ip      netip.Addr
	raw     net.Conn // the TCP connection
	conn    net.Conn // raw, or TLS over it
	r       *bufio.Reader
	w       *textproto.Writer
	tr      *transcript
	timeout time.Duration // longest wait for one reply

	utf8    bool // the server offered SMTPUTF8
	tls     bool // STARTTLS done
	rcpts   int  // RCPT commands sent over the connection
	errors  int  // 4xx and 5xx replies received over the connection
	started bool // a MAIL transaction is open
	broken  bool // a reply is missing: only QUIT may still be said
	dead    bool // the connection is gone: not even QUIT

	mu       sync.Mutex
	canceled bool  // the bound context ended: no more commands
	cause    error // why it ended: context.DeadlineExceeded is a timeout
	closing  bool  // close has begun: the bound context no longer interrupts
}

// stageError is a failure at one stage of the dialogue: the server's reply
// when there was one, else what went wrong, in words.
type stageError struct {
	stage   Stage
	reply   Reply  // zero when the failure was not an SMTP reply
	text    string // what went wrong, when there was no reply
	timeout bool   // the wait for a reply or connection ran out
	garbled bool   // the server's words are not SMTP
}

func (e *stageError) Error() string {
	if !e.reply.IsZero() {
		return fmt.Sprintf("%s: %s", stageCommand(e.stage), e.reply)
	}
	return e.text
}

// stageCommand names the command of a stage for people.
func stageCommand(s Stage) string {
	switch s {
	case StageConnect:
		return "greeting"
	case StageHelo:
		return "EHLO"
	case StageMail:
		return "MAIL FROM"
	case StageRcpt:
		return "RCPT TO"
	}
	return string(s)
}

// dialSession connects to ip and brings the session to the point where
// MAIL FROM can be sent: greeting, EHLO, STARTTLS when offered and wanted,
// EHLO again over TLS. On failure the session, when a connection was made,
// is returned too, for the caller to end with QUIT (closeSession): a
// server that refuses us still expects one.
func (v *Verifier) dialSession(ctx context.Context, host Host, ip netip.Addr) (*session, error) {
	addr := net.JoinHostPort(ip.String(), strconv.Itoa(v.cfg.Port))
	tr := v.transcript(host.Name)
	start := time.Now()
	conn, err := v.cfg.Dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		e := dialError(addr, err, time.Since(start))
		tr.note(e.text)
		return nil, e
	}
	s := &session{host: host, ip: ip, raw: conn, tr: tr, timeout: v.cfg.Timeout}
	s.attach(conn)
	stop := s.bind(ctx)
	defer stop()
	greeting, _, err := s.read(StageConnect, "greeting")
	if err != nil {
		return s, err
	}
	if greeting.Code/100 != 2 {
		return s, &stageError{stage: StageConnect, reply: greeting}
	}
	ext, err := s.hello(v.cfg.Helo)
	if err != nil {
		return s, err
	}
	if ext["STARTTLS"] && !v.cfg.NoTLS {
		r, _, err := s.cmd(StageHelo, "STARTTLS", "STARTTLS")
		if err != nil {
			return s, err
		}
		if r.Code == 220 {
			if err := s.startTLS(ctx); err != nil {
				return s, err
			}
			// RFC 3207 §4.2: the client must greet again.
			if ext, err = s.hello(v.cfg.Helo); err != nil {
				return s, err
			}
		}
		// A refused STARTTLS leaves the session in plain text, which is
		// fine for a probe.
	}
	s.utf8 = ext["SMTPUTF8"]
	return s, nil
}

// attach reads and writes over c from now on.
func (s *session) attach(c net.Conn) {
	s.conn = c
	s.r = bufio.NewReaderSize(c, maxReplyLine)
	s.w = textproto.NewWriter(bufio.NewWriter(c))
}

// startTLS runs the TLS handshake after the server's 220 to STARTTLS.
func (s *session) startTLS(ctx context.Context) error {
	if s.r.Buffered() > 0 {
		s.dead = true
		return &stageError{stage: StageHelo, text: "the server sent data ahead of the TLS handshake"}
	}
	// A probe is not a delivery: an expired or self-signed certificate
	// must not stop it, so the certificate is not verified. Nothing
	// secret is sent over this connection.
	tc := tls.Client(s.raw, &tls.Config{ServerName: s.host.Name, InsecureSkipVerify: true, MinVersion: tls.VersionTLS10}) //nolint:gosec // see above
	hctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	if err := tc.HandshakeContext(hctx); err != nil {
		s.dead = true
		text := "TLS handshake failed"
		if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() || hctx.Err() != nil {
			text = "no TLS handshake within " + roundDuration(s.timeout)
		}
		s.tr.note(text)
		return &stageError{stage: StageHelo, text: text}
	}
	s.attach(tc)
	s.tls = true
	s.tr.note("TLS established (" + tls.VersionName(tc.ConnectionState().Version) + ")")
	return nil
}

// hello sends EHLO, or HELO to a server that does not know EHLO, and
// returns the extensions offered. A 503 (OpenSMTPD's "Already identified")
// is no reason to give up: the server knows who we are.
func (s *session) hello(name string) (map[string]bool, error) {
	r, lines, err := s.cmd(StageHelo, "EHLO", "EHLO "+name)
	if err != nil {
		return nil, err
	}
	ext := map[string]bool{}
	switch {
	case r.Code/100 == 2:
		for _, l := range lines[1:] {
			kw, _, _ := strings.Cut(strings.TrimSpace(l), " ")
			ext[strings.ToUpper(kw)] = true
		}
		return ext, nil
	case r.Code == 503:
		return ext, nil
	case r.Code == 500 || r.Code == 502:
		r, _, err = s.cmd(StageHelo, "HELO", "HELO "+name)
		if err != nil {
			return nil, err
		}
		if r.Code/100 == 2 || r.Code == 503 {
			return ext, nil
		}
	}
	return nil, &stageError{stage: StageHelo, reply: r}
}

// mail opens a transaction with our MAIL FROM. A 503 (a transaction the
// server thinks still open) is met with one RSET and a second try.
func (s *session) mail(from string, utf8 bool) error {
	line := "MAIL FROM:<" + from + ">"
	if utf8 {
		line += " SMTPUTF8"
	}
	for try := 0; ; try++ {
		r, _, err := s.cmd(StageMail, "MAIL FROM", line)
		if err != nil {
			return err
		}
		switch {
		case r.Code/100 == 2:
			s.started = true
			return nil
		case r.Code == 503 && try == 0:
			s.started = true
			if err := s.reset(); err != nil {
				return err
			}
			continue
		}
		return &stageError{stage: StageMail, reply: r}
	}
}

// rcpt sends one RCPT TO and returns the reply; err is set only when there
// was no reply, which ends the session.
func (s *session) rcpt(addr string) (Reply, error) {
	s.rcpts++
	r, _, err := s.cmd(StageRcpt, "RCPT TO", "RCPT TO:<"+addr+">")
	return r, err
}

// reset ends the open transaction so the connection can be reused. No
// EHLO follows: RSET keeps the session's identity (RFC 5321 §4.1.1.5).
func (s *session) reset() error {
	if !s.started {
		return nil
	}
	s.started = false
	r, _, err := s.cmd(StageMail, "RSET", "RSET")
	if err != nil {
		return err
	}
	if r.Code/100 != 2 && r.Code != 503 { // 503: nothing to reset, which is fine
		return &stageError{stage: StageMail, reply: r}
	}
	return nil
}

// usable reports whether more commands may be sent.
func (s *session) usable() bool { return s != nil && !s.broken && !s.dead }

// close ends the session: QUIT when the connection still works, waiting
// briefly for the 221 (and for the reply to an interrupted command before
// it), then the connection is closed. It does not depend on any context,
// so a verifier shutting down still says goodbye.
func (s *session) close() {
	if s == nil {
		return
	}
	defer func() {
		_ = s.conn.Close()
		_ = s.raw.Close()
	}()
	if s.dead {
		return
	}
	s.mu.Lock()
	s.canceled, s.closing = false, true
	_ = s.raw.SetDeadline(time.Now().Add(quitTimeout))
	s.mu.Unlock()
	if err := s.write("QUIT"); err != nil {
		return
	}
	// An interrupted command's reply may come before QUIT's.
	n := 1
	if s.broken {
		n = 3
	}
	for range n {
		r, _, err := s.readReply()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				s.tr.note("no reply to QUIT within " + roundDuration(quitTimeout))
			}
			return
		}
		if r.Code == 221 {
			return
		}
	}
}

// bind makes the end of ctx interrupt the command in progress and refuse
// further ones until the next bind; close still says QUIT.
func (s *session) bind(ctx context.Context) (stop func() bool) {
	s.mu.Lock()
	s.canceled = false
	s.mu.Unlock()
	return context.AfterFunc(ctx, func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.closing {
			return
		}
		s.canceled, s.cause = true, ctx.Err()
		_ = s.raw.SetDeadline(time.Now())
	})
}

// cmd sends one command and reads its reply.
func (s *session) cmd(stage Stage, what, line string) (Reply, []string, error) {
	if !s.usable() {
		return Reply{}, nil, &stageError{stage: stage, text: "the session is no longer usable"}
	}
	if err := s.arm(); err != nil {
		return Reply{}, nil, &stageError{stage: stage, text: "interrupted before " + what}
	}
	if err := s.write(line); err != nil {
		s.dead = true
		s.tr.note("connection lost while sending " + what)
		return Reply{}, nil, &stageError{stage: stage, text: "connection lost while sending " + what}
	}
	return s.read(stage, what)
}

// arm sets the deadline for the next exchange, unless the bound context
// has ended.
func (s *session) arm() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.canceled {
		return context.Canceled
	}
	return s.raw.SetDeadline(time.Now().Add(s.timeout))
}

// write sends one command line and records it in the transcript once it
// is sent.
func (s *session) write(line string) error {
	if strings.ContainsAny(line, "\r\n") {
		return errors.New("line break in a command")
	}
	if err := s.w.PrintfLine("%s", line); err != nil {
		return err
	}
	s.tr.line("C:", line)
	return nil
}

// read reads the reply to what, counting error replies. A missing reply
// leaves the session broken, or dead when the connection is gone.
func (s *session) read(stage Stage, what string) (Reply, []string, error) {
	if stage == StageConnect {
		if err := s.arm(); err != nil {
			return Reply{}, nil, &stageError{stage: stage, text: "interrupted before the greeting"}
		}
	}
	start := time.Now()
	r, lines, err := s.readReply()
	if err == nil {
		if r.Code/100 == 4 || r.Code/100 == 5 {
			s.errors++
		}
		return r, lines, nil
	}
	e := &stageError{stage: stage}
	reply := "the reply to " + what
	if stage == StageConnect {
		reply = "the greeting"
	}
	var ne net.Error
	var pe *replyError
	switch {
	case errors.As(err, &pe):
		s.broken, e.garbled = true, true
		e.text = fmt.Sprintf("%s is not SMTP: %s", reply, pe.text)
	case errors.As(err, &ne) && ne.Timeout():
		s.broken = true
		e.timeout = true
		s.mu.Lock()
		canceled := s.canceled && !errors.Is(s.cause, context.DeadlineExceeded)
		s.mu.Unlock()
		if canceled {
			e.text = "interrupted while waiting for " + reply
		} else {
			e.text = fmt.Sprintf("no %s within %s", strings.TrimPrefix(reply, "the "), roundDuration(time.Since(start)))
		}
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		s.dead = true
		e.text = "the server closed the connection instead of sending " + reply
	default:
		s.dead = true
		e.text = "connection lost while waiting for " + reply
	}
	s.tr.note(e.text)
	return Reply{}, nil, e
}

// replyError is a reply that does not follow RFC 5321 §4.2.
type replyError struct{ text string }

func (e *replyError) Error() string { return e.text }

// readReply reads one reply, all its lines, bounded in line length and
// line count. lines holds the text of each line after the code.
func (s *session) readReply() (Reply, []string, error) {
	var lines []string
	code := 0
	for {
		b, err := s.r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			return Reply{}, nil, &replyError{fmt.Sprintf("a line longer than %d bytes", maxReplyLine)}
		}
		if err != nil {
			if len(b) > 0 && errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return Reply{}, nil, err
		}
		line := strings.TrimRight(string(b), "\r\n")
		s.tr.line("S:", line)
		// RFC 5321 §4.2: three digits, the first 2 to 5, then a space, a
		// hyphen (more lines follow) or nothing.
		if len(line) < 3 || !isDigits(line[:3]) || line[0] < '2' || line[0] > '5' || len(line) > 3 && line[3] != ' ' && line[3] != '-' {
			return Reply{}, nil, &replyError{fmt.Sprintf("%q", textfmt.Cut(line, 80))}
		}
		c, _ := strconv.Atoi(line[:3])
		if code != 0 && c != code {
			return Reply{}, nil, &replyError{"reply lines with different codes"}
		}
		code = c
		text := ""
		if len(line) > 4 {
			text = line[4:]
		}
		lines = append(lines, text)
		if len(line) == 3 || line[3] == ' ' {
			break
		}
		if len(lines) >= maxReplyLines {
			return Reply{}, nil, &replyError{fmt.Sprintf("a reply of more than %d lines", maxReplyLines)}
		}
	}
	return newReply(code, lines), lines, nil
}

// newReply makes a Reply of the lines of one reply: the enhanced code is
// taken from the first line and dropped where the other lines repeat it,
// the text is made safe (see replyFromError).
func newReply(code int, lines []string) Reply {
	if len(lines) > 1 {
		first, _, ok := classifyLeadingEnhanced(lines[0])
		joined := make([]string, len(lines))
		copy(joined, lines)
		for i := 1; ok && i < len(joined); i++ {
			if e, rest, ok2 := classifyLeadingEnhanced(joined[i]); ok2 && e == first {
				joined[i] = rest
			}
		}
		lines = joined
	}
	r, ok := replyFromError(&textproto.Error{Code: code, Msg: strings.Join(lines, "\n")})
	if !ok {
		return Reply{Code: code}
	}
	return r
}

func isDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// dialError says in words why a connection could not be made.
func dialError(addr string, err error, took time.Duration) *stageError {
	e := &stageError{stage: StageConnect}
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		e.text = "connection to " + addr + " refused"
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &ne) && ne.Timeout():
		e.timeout = true
		e.text = "no connection to " + addr + " within " + roundDuration(took)
	case errors.Is(err, context.Canceled):
		e.text = "connecting to " + addr + " was interrupted"
	case errors.Is(err, syscall.ENETUNREACH) || errors.Is(err, syscall.EHOSTUNREACH):
		e.text = "no route to " + addr
	default:
		e.text = "cannot connect to " + addr + ": " + innermost(err)
	}
	return e
}

// innermost returns the text of the deepest error in err's chain, which
// is the cause without the layers of "dial tcp ...:" prefixes.
func innermost(err error) string {
	for {
		next := errors.Unwrap(err)
		if next == nil {
			return err.Error()
		}
		err = next
	}
}

// roundDuration prints d for people: "10s", "1.5s", "300ms".
func roundDuration(d time.Duration) string {
	switch {
	case d >= 10*time.Second:
		d = d.Round(time.Second)
	case d >= time.Second:
		d = d.Round(100 * time.Millisecond)
	default:
		d = d.Round(10 * time.Millisecond)
	}
	return d.String()
}

// transcript writes the SMTP dialogue of probes, one line per command
// ("C:"), reply line ("S:") or event ("*:"), each prefixed with the MX host
// name: only what was really sent and received, made safe to paste.
type transcript struct {
	v    *Verifier
	host string
}

func (v *Verifier) transcript(host string) *transcript {
	if v.cfg.Transcript == nil {
		return nil
	}
	return &transcript{v: v, host: host}
}

func (t *transcript) line(dir, s string) {
	if t == nil {
		return
	}
	t.v.trMu.Lock()
	defer t.v.trMu.Unlock()
	fmt.Fprintf(t.v.cfg.Transcript, "%s %s %s\n", t.host, dir, printable(s))
}

func (t *transcript) note(s string) { t.line("*:", s) }

// printable replaces control and format characters and invalid UTF-8 in s
// with '?', and cuts it to maxReplyLine bytes.
func printable(s string) string {
	s = textfmt.Cut(s, maxReplyLine)
	clean := true
	for _, r := range s {
		if r == utf8.RuneError || unicode.IsControl(r) || unicode.Is(unicode.Cf, r) {
			clean = false
			break
		}
	}
	if clean {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		if r == utf8.RuneError || unicode.IsControl(r) || unicode.Is(unicode.Cf, r) {
			r = '?'
		}
		b.WriteRune(r)
	}
	return b.String()
}

// slot is the key of the session's connection slot: its MX address.
func (s *session) slot() string { return s.ip.String() }
