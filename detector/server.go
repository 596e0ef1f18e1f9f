package detector

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
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
	// listeners the Server serves. A new connection beyond it takes the
	// place of the connection that has waited longest for its next
	// request, which is closed (Postfix reconnects by itself); when every
	// connection is busy with a request, the new one is closed as soon as
	// it is accepted. Default DefaultMaxConns (1000).
	MaxConns int

	// MaxConnsPerPeer is the most connections one peer holds at once: one
	// local user (all its processes together) or one remote address. Past
	// it, the peer's own connection idle longest makes room, as for
	// MaxConns. Default MaxConns/4. It does not apply to UncappedUIDs.
	MaxConnsPerPeer int

	// UncappedUIDs are the local users MaxConnsPerPeer does not apply to:
	// Postfix's mail_owner, whose smtpd processes each hold a connection
	// (up to default_process_limit per smtpd service). Only MaxConns
	// bounds them, and their idle connections make room for their new
	// ones.
	UncappedUIDs []uint32

	// AllowUIDs are the local users whose processes may connect: over a
	// unix socket (by SO_PEERCRED) or over TCP from this host (by the
	// owner of the client's socket). The user the server runs as is
	// always allowed. Empty: root.
	AllowUIDs []uint32

	// AllowNetworks are the remote TCP clients allowed, by address. A
	// client on this host, over loopback or not, is judged by its user,
	// never by its address. Empty: no remote client.
	AllowNetworks []netip.Prefix

	// Peers identifies the peer of each connection. Default SystemPeers.
	Peers PeerIdentifier

	// Metrics counts refused and evicted connections. Nil counts nothing.
	Metrics *Metrics

	// ShutdownGrace is how long decisions in flight may still run once
	// Serve's context is done. Past it their context is cancelled and the
	// remaining connections are closed. Default DefaultShutdownGrace (10s).
	ShutdownGrace time.Duration
}

// Server answers Postfix policy requests on one or more listeners, one
// goroutine per connection. Create it with NewServer.
//
// Every connection is identified first (see PeerIdentifier): one from a
// local user not in AllowUIDs, from a remote address not in
// AllowNetworks, or whose peer cannot be told, is closed at once without
// a word, counted, and logged at most once a second per reason.
type Server struct {
	cfg      ServerConfig
	log      *slog.Logger
	access   atomic.Pointer[peerAccess]
	uncapped map[uint32]bool

	// identifying bounds the connections accepted but not yet identified;
	// when it is full, accepting waits.
	identifying chan struct{}

	mu      sync.Mutex
	conns   map[*srvConn]struct{} // admitted, over all listeners
	perPeer map[Peer]int          // admitted, by Peer.key

	refusals  map[string]*logLimiter // by reason; the map is fixed
	evictions logLimiter
}

// maxIdentifying is how many accepted connections are identified at
// once.
const maxIdentifying = 16

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
		{"MaxConnsPerPeer", int64(cfg.MaxConnsPerPeer)},
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
	if cfg.MaxConnsPerPeer == 0 {
		cfg.MaxConnsPerPeer = max(1, cfg.MaxConns/4)
	}
	if cfg.Peers == nil {
		cfg.Peers = SystemPeers{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		cfg:         cfg,
		log:         cfg.Logger,
		uncapped:    map[uint32]bool{},
		identifying: make(chan struct{}, maxIdentifying),
		conns:       map[*srvConn]struct{}{},
		perPeer:     map[Peer]int{},
		refusals:    map[string]*logLimiter{},
		evictions:   logLimiter{interval: time.Second},
	}
	for _, u := range cfg.UncappedUIDs {
		s.uncapped[u] = true
	}
	for _, r := range refuseReasons {
		s.refusals[r] = &logLimiter{interval: time.Second}
	}
	s.SetAccess(cfg.AllowUIDs, cfg.AllowNetworks)
	return s, nil
}

// SetAccess replaces AllowUIDs and AllowNetworks, as a configuration
// reload does. It applies to connections accepted from then on.
func (s *Server) SetAccess(uids []uint32, networks []netip.Prefix) {
	s.access.Store(newPeerAccess(uids, networks))
}

// activeConns returns the number of connections being served, over all
// listeners.
func (s *Server) activeConns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
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
	peer   Peer

	mu        sync.Mutex
	idle      bool      // waiting for the first byte of a request
	idleSince time.Time // when it was accepted, or its last answer was written
	evicted   bool      // closed to make room for a new connection
}

// errEvicted ends a connection closed to make room.
var errEvicted = errors.New("closed to make room for a new connection")

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
			s.log.Warn("policy accept failed, retrying", slog.String("listen", ln.Addr().String()), slog.Any("error", err), slog.Duration("retry_in", backoff))
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

		select {
		case s.identifying <- struct{}{}:
		case <-ctx.Done():
			_ = nc.Close()
			return nil
		}
		l.wg.Go(func() { l.handle(nc) })
	}
}

// handle admits a connection just accepted and serves it.
func (l *srvListener) handle(nc net.Conn) {
	c := l.s.admit(l.ctx, nc)
	if c == nil {
		return
	}
	defer l.s.release(c)
	l.mu.Lock()
	l.conns[c] = struct{}{}
	l.mu.Unlock()
	defer func() {
		l.mu.Lock()
		delete(l.conns, c)
		l.mu.Unlock()
	}()
	l.serveConn(c)
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
	l.s.log.Warn("policy shutdown grace period over, closing connections", slog.Int("connections", n), slog.Duration("grace", l.s.cfg.ShutdownGrace))
	<-done
}

// admit identifies the peer of a connection just accepted and gives it a
// place, or closes it and returns nil.
func (s *Server) admit(ctx context.Context, nc net.Conn) *srvConn {
	ictx, cancel := context.WithTimeout(ctx, peerLookupTimeout)
	peer, err := s.cfg.Peers.Identify(ictx, nc)
	cancel()
	<-s.identifying
	reason := refuseUnidentified
	if err == nil {
		reason = s.access.Load().check(peer)
	}
	var c *srvConn
	if reason == "" {
		c = &srvConn{nc: nc, remote: srvAddr(nc.RemoteAddr()), peer: peer, idleSince: time.Now()}
		reason = s.place(c)
	}
	if reason != "" {
		s.refuse(nc, reason, peer, err)
		return nil
	}
	return c
}

// place counts c in. At MaxConnsPerPeer for c's peer, that peer's
// connection idle longest is closed to make room; at MaxConns, the
// connection idle longest. It returns why c has no place when every
// connection in the way is busy, "" when c was placed.
func (s *Server) place(c *srvConn) string {
	key := c.peer.key()
	s.mu.Lock()
	defer s.mu.Unlock()
	if !(key.Local && s.uncapped[key.UID]) && s.perPeer[key] >= s.cfg.MaxConnsPerPeer &&
		!s.evictIdle(func(o *srvConn) bool { return o.peer.key() == key }, refusePerPeer) {
		return refusePerPeer
	}
	if len(s.conns) >= s.cfg.MaxConns && !s.evictIdle(nil, refuseMaxConns) {
		return refuseMaxConns
	}
	s.conns[c] = struct{}{}
	s.perPeer[key]++
	return ""
}

// evictIdle closes the connection (among those match accepts; nil: all)
// that has waited longest for its next request, and reports whether there
// was one. s.mu is held.
func (s *Server) evictIdle(match func(*srvConn) bool, reason string) bool {
	for range 3 { // the one chosen may start a request meanwhile: choose again
		var v *srvConn
		var since time.Time
		for o := range s.conns {
			if match != nil && !match(o) {
				continue
			}
			o.mu.Lock()
			idle, t := o.idle && !o.evicted, o.idleSince
			o.mu.Unlock()
			if idle && (v == nil || t.Before(since)) {
				v, since = o, t
			}
		}
		if v == nil {
			return false
		}
		v.mu.Lock()
		ok := v.idle && !v.evicted
		if ok {
			// As at shutdown, a read deadline in the past wakes the
			// connection's reader, which sees evicted and closes.
			v.evicted = true
			_ = v.nc.SetReadDeadline(time.Unix(1, 0))
		}
		v.mu.Unlock()
		if !ok {
			continue
		}
		s.forget(v)
		s.cfg.Metrics.connEvicted(reason)
		if n, ok := s.evictions.allow(time.Now()); ok {
			s.log.Info("policy connection closed to make room for a new one",
				"reason", reason, "remote", v.remote, "peer", v.peer.String(),
				"idle", time.Since(since).Round(time.Millisecond), "evicted", n)
		}
		return true
	}
	return false
}

// release uncounts c once its connection has ended.
func (s *Server) release(c *srvConn) {
	s.mu.Lock()
	s.forget(c)
	s.mu.Unlock()
}

// forget uncounts c, unless it was already (evicted). s.mu is held.
func (s *Server) forget(c *srvConn) {
	if _, ok := s.conns[c]; !ok {
		return
	}
	delete(s.conns, c)
	key := c.peer.key()
	if s.perPeer[key]--; s.perPeer[key] <= 0 {
		delete(s.perPeer, key)
	}
}

// refuseText words each refusal reason for the log.
var refuseText = map[string]string{
	refuseUnidentified: "policy connection refused: peer not identified",
	refuseUser:         "policy connection refused: local user not allowed",
	refuseNetwork:      "policy connection refused: remote address not allowed",
	refusePerPeer:      "policy connection refused: too many connections from this peer, all busy",
	refuseMaxConns:     "policy connection refused: too many connections, all busy",
}

// refuse closes a connection that may not be served and counts it. It
// logs at most one line a second per reason, with the number refused
// for that reason since the last line, so that a local user cannot flood
// the log.
func (s *Server) refuse(nc net.Conn, reason string, p Peer, err error) {
	_ = nc.Close()
	s.cfg.Metrics.connRefused(reason)
	n, ok := s.refusals[reason].allow(time.Now())
	if !ok {
		return
	}
	attrs := []any{"reason", reason, "remote", srvAddr(nc.RemoteAddr())}
	if p.Local {
		attrs = append(attrs, "uid", p.UID)
	}
	switch reason {
	case refuseUnidentified:
		attrs = append(attrs, "error", err)
	case refuseMaxConns:
		attrs = append(attrs, "max_conns", s.cfg.MaxConns)
	case refusePerPeer:
		attrs = append(attrs, "max_conns_per_peer", s.cfg.MaxConnsPerPeer)
	}
	s.log.Warn(refuseText[reason], append(attrs, "refused", n)...)
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
			s.log.Error("policy connection panicked", slog.String("remote", c.remote), slog.Any("panic", p), slog.String("stack", string(debug.Stack())))
		}
	}()
	s.log.Debug("policy connection opened", slog.String("remote", c.remote))

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
				s.log.Info("policy request timed out, closing connection", slog.String("remote", c.remote), slog.Duration("timeout", s.cfg.RequestTimeout), slog.Any("error", err))
			} else {
				s.log.Warn("bad policy request, closing connection", slog.String("remote", c.remote), slog.Any("error", err))
			}
			return
		}

		a := l.decide(c, &req)

		if err := c.nc.SetWriteDeadline(time.Now().Add(s.cfg.RequestTimeout)); err != nil {
			s.log.Debug("policy connection closed", slog.String("remote", c.remote), slog.Any("error", err))
			return
		}
		c.mu.Lock()
		c.idleSince = time.Now() // before the answer leaves: a client that has it sees this time passed
		c.mu.Unlock()
		if err := WriteAction(bw, a); err != nil {
			s.log.Info("policy answer not delivered, closing connection", slog.String("remote", c.remote), slog.Any("error", err))
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
		s.log.Debug("policy connection closed for shutdown", slog.String("remote", c.remote))
		return false
	}
	err := c.nc.SetReadDeadline(time.Now().Add(s.cfg.IdleTimeout))
	c.idle = err == nil
	c.mu.Unlock()
	if err != nil {
		s.log.Debug("policy connection closed", slog.String("remote", c.remote), slog.Any("error", err))
		return false
	}

	_, err = br.Peek(1)

	c.mu.Lock()
	c.idle = false
	if c.evicted {
		err = errEvicted // even when a request has begun: its place is taken
	} else if err == nil {
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
		s.log.Debug("policy connection closed by client", slog.String("remote", c.remote))
	case errors.Is(err, errEvicted):
		s.log.Debug("policy connection closed to make room", slog.String("remote", c.remote))
	case errors.Is(err, os.ErrDeadlineExceeded) && l.stopping.Load():
		s.log.Debug("policy connection closed for shutdown", slog.String("remote", c.remote))
	case errors.Is(err, os.ErrDeadlineExceeded):
		s.log.Debug("policy connection idle, closing", slog.String("remote", c.remote), slog.Duration("idle_timeout", s.cfg.IdleTimeout))
	default:
		s.log.Debug("policy connection closed", slog.String("remote", c.remote), slog.Any("error", err))
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
