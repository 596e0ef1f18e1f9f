package detector

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"
)

// Handler decides one policy request.
//
// Decide is called from the goroutine of the connection the request came
// on, one request at a time per connection and concurrently across
// connections. req and everything it points to belong to the server and
// are reused for the next request on the connection once Decide returns:
// keep copies of the fields, never req itself. The strings are immutable
// and safe to keep.
//
// ctx carries the values of the context given to Serve but not its
// cancellation: when the server starts shutting down, a decision in
// flight can still finish. ctx is cancelled once the server's
// ShutdownGrace has passed after that. A panic in Decide is recovered,
// logged, and answered with ActionDunno.
type Handler interface {
	Decide(ctx context.Context, req *Request) Action
}

// HandlerFunc adapts a function to the Handler interface.
type HandlerFunc func(ctx context.Context, req *Request) Action

// Decide calls f(ctx, req).
func (f HandlerFunc) Decide(ctx context.Context, req *Request) Action {
	return f(ctx, req)
}

// Server defaults, used for the zero fields of ServerConfig.
const (
	DefaultIdleTimeout    = 5 * time.Minute
	DefaultRequestTimeout = 30 * time.Second
	DefaultMaxConns       = 1000
	DefaultShutdownGrace  = 10 * time.Second
)

// ServerConfig configures a Server. Zero fields take their defaults.
type ServerConfig struct {
	// Handler decides every request. It is required.
	Handler Handler

	// Logger receives the server's own log lines: bad input, timeouts,
	// refused connections, handler panics. Nil discards them.
	Logger *slog.Logger

	// Limits bounds every request read; see ReadRequest.
	Limits Limits

	// IdleTimeout closes a connection that has not started a request for
	// this long. Default DefaultIdleTimeout (5m); Postfix itself closes
	// an idle policy connection after smtpd_policy_service_max_idle (300s)
	// and keeps one open no longer than smtpd_policy_service_max_ttl.
	IdleTimeout time.Duration

	// RequestTimeout bounds the reading of one request from its first
	// byte to its empty line, so a client trickling bytes (slowloris)
	// cannot hold a connection; it also bounds the writing of the answer.
	// The time Handler takes is not included. Default
	// DefaultRequestTimeout (30s).
	RequestTimeout time.Duration

	// MaxConns is the most connections served at once, over all the
	// listeners the Server serves. A connection beyond it is closed as
	// soon as it is accepted, and a warning is logged at most once a
	// second. Default DefaultMaxConns (1000).
	MaxConns int

	// ShutdownGrace is how long decisions in flight may still run once
	// Serve's context is done. Past it their context is cancelled and the
	// remaining connections are closed. Default DefaultShutdownGrace (10s).
	ShutdownGrace time.Duration
}

// Server answers Postfix policy requests on one or more listeners, one
// goroutine per connection. Create it with NewServer.
type Server struct {
	cfg ServerConfig
	log *slog.Logger

	active     atomic.Int64 // connections being served, over all listeners
	refused    atomic.Int64 // connections refused since the last warning
	refusedLog atomic.Int64 // UnixNano of the last "too many connections" warning
}

// NewServer checks cfg, fills in its defaults and returns a Server. It
// fails when Handler is nil or a limit, timeout or count is negative.
func NewServer(cfg ServerConfig) (*Server, error) {
	var errs []error
	if cfg.Handler == nil {
		errs = append(errs, errors.New("detector: server: Handler is required"))
	}
	for _, f := range []struct {
		name string
		v    int64
	}{
		{"Limits.MaxLine", int64(cfg.Limits.MaxLine)},
		{"Limits.MaxAttrs", int64(cfg.Limits.MaxAttrs)},
		{"Limits.MaxRequest", int64(cfg.Limits.MaxRequest)},
		{"IdleTimeout", int64(cfg.IdleTimeout)},
		{"RequestTimeout", int64(cfg.RequestTimeout)},
		{"MaxConns", int64(cfg.MaxConns)},
		{"ShutdownGrace", int64(cfg.ShutdownGrace)},
	} {
		if f.v < 0 {
			errs = append(errs, fmt.Errorf("detector: server: %s must not be negative", f.name))
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}

	cfg.Limits = cfg.Limits.policyWithDefaults()
	if cfg.IdleTimeout == 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	if cfg.RequestTimeout == 0 {
		cfg.RequestTimeout = DefaultRequestTimeout
	}
	if cfg.MaxConns == 0 {
		cfg.MaxConns = DefaultMaxConns
	}
	if cfg.ShutdownGrace == 0 {
		cfg.ShutdownGrace = DefaultShutdownGrace
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Server{cfg: cfg, log: cfg.Logger}, nil
}

// ActiveConns returns the number of connections being served, over all
// listeners.
func (s *Server) ActiveConns() int {
	return int(s.active.Load())
}

// srvListener is the state of one Serve call: the connections accepted on
// its listener, which it owns and waits for.
type srvListener struct {
	s        *Server
	ctx      context.Context // given to Handler.Decide
	stopping atomic.Bool     // set once Serve's context is done
	wg       sync.WaitGroup

	mu    sync.Mutex
	conns map[*srvConn]struct{}
}

// srvConn is one connection being served.
type srvConn struct {
	nc     net.Conn
	remote string

	mu   sync.Mutex
	idle bool // waiting for the first byte of a request
}

// Serve accepts connections on ln and answers their requests until ctx is
// done, then shuts down gracefully and returns nil: it closes ln, closes
// the connections waiting between requests at once, lets each request in
// flight be decided and answered, and returns when every connection it
// accepted is closed. Decisions still running ShutdownGrace after ctx is
// done get their context cancelled, and their connections are closed.
//
// Serve may be called concurrently with several listeners, one per
// listening address; each call owns the connections it accepted.
// MaxConns counts over all of them. Serve returns an error when ln fails
// for another reason than ctx; it still closes its connections first.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	if ln == nil {
		return errors.New("detector: serve: nil listener")
	}
	// Decisions get a context that keeps ctx's values but not its
	// cancellation: they are cancelled by the grace timer instead.
	decideCtx, cancelDecide := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelDecide()
	l := &srvListener{s: s, ctx: decideCtx, conns: make(map[*srvConn]struct{})}

	stopClose := context.AfterFunc(ctx, func() { _ = ln.Close() })
	defer stopClose()
	defer func() { _ = ln.Close() }()

	err := l.acceptLoop(ctx, ln)
	l.shutdown(cancelDecide)
	return err
}

// acceptLoop accepts connections until ln is closed. It returns nil when
// that was because ctx is done.
func (l *srvListener) acceptLoop(ctx context.Context, ln net.Listener) error {
	s := l.s
	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("detector: accept on %s: %w", ln.Addr(), err)
			}
			// Running out of file descriptors or memory passes: wait
			// and try again, as net/http does.
			if backoff == 0 {
				backoff = 5 * time.Millisecond
			} else {
				backoff = min(2*backoff, time.Second)
			}
			s.log.Warn("policy accept failed, retrying", "listen", ln.Addr().String(), "error", err, "retry_in", backoff)
			t := time.NewTimer(backoff)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil
			case <-t.C:
			}
			continue
		}
		backoff = 0

		if s.active.Add(1) > int64(s.cfg.MaxConns) {
			s.active.Add(-1)
			s.srvRefuse(nc)
			continue
		}
		c := &srvConn{nc: nc, remote: srvAddr(nc.RemoteAddr())}
		l.mu.Lock()
		l.conns[c] = struct{}{}
		l.mu.Unlock()
		l.wg.Go(func() {
			defer s.active.Add(-1)
			defer func() {
				l.mu.Lock()
				delete(l.conns, c)
				l.mu.Unlock()
			}()
			l.serveConn(c)
		})
	}
}

// shutdown wakes the idle connections, waits for the busy ones, and past
// the grace period cancels the decisions and closes what is left.
func (l *srvListener) shutdown(cancelDecide context.CancelFunc) {
	l.stopping.Store(true)
	l.mu.Lock()
	for c := range l.conns {
		c.mu.Lock()
		if c.idle {
			// A read deadline in the past wakes the connection's reader;
			// it sees stopping and closes. A busy connection sees stopping
			// after it has written its answer.
			_ = c.nc.SetReadDeadline(time.Unix(1, 0))
		}
		c.mu.Unlock()
	}
	l.mu.Unlock()

	done := make(chan struct{})
	go func() {
		l.wg.Wait()
		close(done)
	}()
	grace := time.NewTimer(l.s.cfg.ShutdownGrace)
	defer grace.Stop()
	select {
	case <-done:
		return
	case <-grace.C:
	}
	cancelDecide()
	l.mu.Lock()
	n := len(l.conns)
	for c := range l.conns {
		_ = c.nc.Close()
	}
	l.mu.Unlock()
	l.s.log.Warn("policy shutdown grace period over, closing connections", "connections", n, "grace", l.s.cfg.ShutdownGrace)
	<-done
}

// srvRefuse closes a connection over MaxConns and logs it, at most once a
// second, with the number refused since the last line.
func (s *Server) srvRefuse(nc net.Conn) {
	remote := srvAddr(nc.RemoteAddr())
	_ = nc.Close()
	s.refused.Add(1)
	now := time.Now().UnixNano()
	last := s.refusedLog.Load()
	if now-last < int64(time.Second) || !s.refusedLog.CompareAndSwap(last, now) {
		return
	}
	s.log.Warn("policy connection refused: too many connections",
		"remote", remote, "max_conns", s.cfg.MaxConns, "refused", s.refused.Swap(0))
}

// serveConn answers the requests on one connection, in order, until the
// client closes it, it breaks the protocol, a timeout passes, or the
// server shuts down.
func (l *srvListener) serveConn(c *srvConn) {
	s := l.s
	defer func() { _ = c.nc.Close() }()
	defer func() {
		// ReadRequest and WriteAction do not panic (the fuzzer checks);
		// this is the last guard that keeps one connection from taking
		// the daemon down.
		if p := recover(); p != nil {
			s.log.Error("policy connection panicked", "remote", c.remote, "panic", p, "stack", string(debug.Stack()))
		}
	}()
	s.log.Debug("policy connection opened", "remote", c.remote)

	lim := s.cfg.Limits
	br := bufio.NewReaderSize(c.nc, lim.MaxLine+2) // a longest line and its CRLF fit: never copied
	bw := bufio.NewWriterSize(c.nc, 512)
	var req Request
	for {
		if !l.waitRequest(c, br) {
			return
		}
		var err error
		req, err = ReadRequest(br, lim)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				s.log.Info("policy request timed out, closing connection", "remote", c.remote, "timeout", s.cfg.RequestTimeout, "error", err)
			} else {
				s.log.Warn("bad policy request, closing connection", "remote", c.remote, "error", err)
			}
			return
		}

		a := l.decide(c, &req)

		if err := c.nc.SetWriteDeadline(time.Now().Add(s.cfg.RequestTimeout)); err != nil {
			s.log.Debug("policy connection closed", "remote", c.remote, "error", err)
			return
		}
		if err := WriteAction(bw, a); err != nil {
			s.log.Info("policy answer not delivered, closing connection", "remote", c.remote, "error", err)
			return
		}
	}
}

// waitRequest waits up to IdleTimeout for the first byte of the next
// request and sets the deadline for reading the request. It reports
// whether there is a request to read; when there is not, it has logged
// why.
func (l *srvListener) waitRequest(c *srvConn, br *bufio.Reader) bool {
	s := l.s
	// The idle flag and the deadline change together under c.mu, so that
	// shutdown either sees the connection idle and moves its deadline into
	// the past, or the connection sees stopping here.
	c.mu.Lock()
	if l.stopping.Load() {
		c.mu.Unlock()
		s.log.Debug("policy connection closed for shutdown", "remote", c.remote)
		return false
	}
	err := c.nc.SetReadDeadline(time.Now().Add(s.cfg.IdleTimeout))
	c.idle = err == nil
	c.mu.Unlock()
	if err != nil {
		s.log.Debug("policy connection closed", "remote", c.remote, "error", err)
		return false
	}

	_, err = br.Peek(1)

	c.mu.Lock()
	c.idle = false
	if err == nil {
		// A request has begun: it is read under RequestTimeout and
		// answered even when shutdown started meanwhile. This deadline
		// replaces one that shutdown may just have set.
		err = c.nc.SetReadDeadline(time.Now().Add(s.cfg.RequestTimeout))
	}
	c.mu.Unlock()

	switch {
	case err == nil:
		return true
	case errors.Is(err, io.EOF):
		s.log.Debug("policy connection closed by client", "remote", c.remote)
	case errors.Is(err, os.ErrDeadlineExceeded) && l.stopping.Load():
		s.log.Debug("policy connection closed for shutdown", "remote", c.remote)
	case errors.Is(err, os.ErrDeadlineExceeded):
		s.log.Debug("policy connection idle, closing", "remote", c.remote, "idle_timeout", s.cfg.IdleTimeout)
	default:
		s.log.Debug("policy connection closed", "remote", c.remote, "error", err)
	}
	return false
}

// decide calls the Handler. A panic is logged with its stack and answered
// with ActionDunno: rcptguard fails open.
func (l *srvListener) decide(c *srvConn, req *Request) (a Action) {
	defer func() {
		if p := recover(); p != nil {
			l.s.log.Error("policy handler panicked, answering DUNNO",
				"remote", c.remote, "panic", p, "stack", string(debug.Stack()))
			a = ActionDunno
		}
	}()
	return l.s.cfg.Handler.Decide(l.ctx, req)
}

// srvAddr formats a connection's address for logs. Unix socket clients
// have no address; they show as "unix".
func srvAddr(a net.Addr) string {
	if a == nil {
		return ""
	}
	if s := a.String(); s != "" && s != "@" {
		return s
	}
	return a.Network()
}
