package detector

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/test"
)

// srvTestWait bounds every wait in these tests, so that a bug fails a test
// instead of hanging it.
const srvTestWait = 5 * time.Second

// srvLogBuffer collects a server's log lines for assertions.
type srvLogBuffer = test.Buffer

// srvWaitFor polls cond until it holds, failing the test after srvTestWait.
func srvWaitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(srvTestWait)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// srvTestServer is a Server serving a loopback listener.
type srvTestServer struct {
	*Server
	addr string
	logs *srvLogBuffer
	stop func() error // cancels Serve's context and returns what Serve returned
	done chan error
	ln   *srvClosingListener
}

// srvClosingListener records that the listener Serve was given is closed.
// A dial tells it only while nobody else takes the freed port: on a busy
// machine another process's listener may get it.
type srvClosingListener struct {
	net.Listener
	closed atomic.Bool
}

func (l *srvClosingListener) Close() error {
	l.closed.Store(true)
	return l.Listener.Close()
}

// srvStart starts a Server with cfg on 127.0.0.1:0. When cfg has no
// Logger, the server logs at debug level into srvTestServer.logs.
func srvStart(t testing.TB, cfg ServerConfig) *srvTestServer {
	t.Helper()
	logs := &srvLogBuffer{}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	srv, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := &srvClosingListener{Listener: tl}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	var once sync.Once
	var serveErr error
	stop := func() error {
		once.Do(func() {
			cancel()
			select {
			case serveErr = <-done:
			case <-time.After(srvTestWait):
				serveErr = errors.New("Serve did not return")
			}
		})
		return serveErr
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return &srvTestServer{Server: srv, addr: ln.Addr().String(), logs: logs, stop: stop, done: done, ln: ln}
}

// srvClient is Postfix's side of a policy connection.
type srvClient struct {
	net.Conn
	r *bufio.Reader
}

func srvDial(t testing.TB, network, addr string) *srvClient {
	t.Helper()
	c, err := net.DialTimeout(network, addr, srvTestWait)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(srvTestWait))
	t.Cleanup(func() { _ = c.Close() })
	return &srvClient{Conn: c, r: bufio.NewReader(c)}
}

// ask sends one request and reads its answer, returning the action.
func (c *srvClient) ask(req string) (string, error) {
	if _, err := io.WriteString(c, req); err != nil {
		return "", err
	}
	return c.answer()
}

// answer reads one "action=...\n\n" answer.
func (c *srvClient) answer() (string, error) {
	line, err := c.r.ReadString('\n')
	if err != nil {
		return "", err
	}
	action, ok := strings.CutPrefix(line, "action=")
	if !ok {
		return "", fmt.Errorf("answer line %q has no action=", line)
	}
	end, err := c.r.ReadString('\n')
	if err != nil {
		return "", err
	}
	if end != "\n" {
		return "", fmt.Errorf("answer not ended by an empty line: %q", end)
	}
	return strings.TrimSuffix(action, "\n"), nil
}

// expectClosed checks that the server closes the connection without
// sending anything.
func (c *srvClient) expectClosed(t testing.TB) {
	t.Helper()
	b, err := c.r.ReadByte()
	if err == nil {
		t.Fatalf("server sent %q, want the connection closed", b)
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("server did not close the connection")
	}
}

// srvRequestFor is policyFullRequest for another recipient.
func srvRequestFor(rcpt string) string {
	return strings.Replace(policyFullRequest, "recipient=bob@example.org\n", "recipient="+rcpt+"\n", 1)
}

// srvEcho answers "OK <recipient> <sasl_username>".
var srvEcho = HandlerFunc(func(_ context.Context, req *Request) Action {
	return Action("OK " + req.Recipient + " " + req.SASLUsername)
})

func TestServerManyRequestsOneConnection(t *testing.T) {
	ts := srvStart(t, ServerConfig{Handler: srvEcho})
	c := srvDial(t, "tcp", ts.addr)
	for i := range 500 {
		rcpt := fmt.Sprintf("r%d@example.org", i)
		got, err := c.ask(srvRequestFor(rcpt))
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		if want := "OK " + rcpt + " alice@example.com"; got != want {
			t.Fatalf("request %d: action %q, want %q", i, got, want)
		}
	}
}

func TestServerPipelinedRequestsAnsweredInOrder(t *testing.T) {
	ts := srvStart(t, ServerConfig{Handler: srvEcho})
	c := srvDial(t, "tcp", ts.addr)
	var all strings.Builder
	for i := range 20 {
		all.WriteString(srvRequestFor(fmt.Sprintf("p%d@example.org", i)))
	}
	if _, err := io.WriteString(c, all.String()); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		got, err := c.answer()
		if err != nil {
			t.Fatalf("answer %d: %v", i, err)
		}
		if want := fmt.Sprintf("OK p%d@example.org alice@example.com", i); got != want {
			t.Fatalf("answer %d: %q, want %q", i, got, want)
		}
	}
}

func TestServerConcurrentConnections(t *testing.T) {
	ts := srvStart(t, ServerConfig{Handler: srvEcho})
	const conns, reqs = 50, 20
	errs := make(chan error, conns)
	var wg sync.WaitGroup
	for n := range conns {
		c := srvDial(t, "tcp", ts.addr)
		wg.Go(func() {
			for i := range reqs {
				rcpt := fmt.Sprintf("c%d-r%d@example.org", n, i)
				got, err := c.ask(srvRequestFor(rcpt))
				if err != nil {
					errs <- fmt.Errorf("conn %d request %d: %w", n, i, err)
					return
				}
				if want := "OK " + rcpt + " alice@example.com"; got != want {
					errs <- fmt.Errorf("conn %d request %d: action %q, want %q", n, i, got, want)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := ts.activeConns(); n != conns {
		t.Errorf("ActiveConns() = %d, want %d", n, conns)
	}
}

func TestServerBadInputClosesConnection(t *testing.T) {
	tests := []struct {
		name      string
		in        string
		closeSend bool // half-close after sending, so the server sees EOF
		answered  bool // a valid request comes first and is answered
	}{
		{name: "garbage", in: "this is not a policy request\n\n"},
		{name: "empty request", in: "\n"},
		{name: "empty name", in: "=value\n\n"},
		{name: "NUL byte", in: "recipient=a\x00b\n\n"},
		{name: "line too long", in: "sasl_username=" + strings.Repeat("u", 10<<10) + "\n\n"},
		{name: "too many attributes", in: strings.Repeat("x=1\n", 300) + "\n"},
		{name: "cut off", in: "request=smtpd_access_policy\nrecipient=x", closeSend: true},
		{name: "valid request then garbage", in: srvRequestFor("ok@example.org") + "garbage\n\n", answered: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ts := srvStart(t, ServerConfig{Handler: srvEcho})
			c := srvDial(t, "tcp", ts.addr)
			// The server may close before it has read everything; a
			// failed write shows up as the closed connection below.
			_, _ = io.WriteString(c, tt.in)
			if tt.closeSend {
				_ = c.Conn.(*net.TCPConn).CloseWrite()
			}
			if tt.answered {
				if got, err := c.answer(); err != nil || got != "OK ok@example.org alice@example.com" {
					t.Fatalf("first request: %q, %v", got, err)
				}
			}
			c.expectClosed(t)
			srvWaitFor(t, "the warning", func() bool { return strings.Contains(ts.logs.String(), "bad policy request") })
			logs := ts.logs.String()
			local := c.LocalAddr().String()
			if !strings.Contains(logs, "level=WARN") || !strings.Contains(logs, "remote="+local) {
				t.Errorf("want a warning naming remote=%s, logs:\n%s", local, logs)
			}

			// The server goes on serving other connections.
			c2 := srvDial(t, "tcp", ts.addr)
			if got, err := c2.ask(srvRequestFor("next@example.org")); err != nil || got != "OK next@example.org alice@example.com" {
				t.Fatalf("next connection: %q, %v", got, err)
			}
		})
	}
}

func TestServerIdleTimeout(t *testing.T) {
	ts := srvStart(t, ServerConfig{Handler: srvEcho, IdleTimeout: 100 * time.Millisecond})
	c := srvDial(t, "tcp", ts.addr)
	if _, err := c.ask(policyFullRequest); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	c.expectClosed(t)
	if d := time.Since(start); d < 80*time.Millisecond || d > 2*time.Second {
		t.Errorf("idle connection closed after %v, want about 100ms", d)
	}
	srvWaitFor(t, "the idle log line", func() bool { return strings.Contains(ts.logs.String(), "policy connection idle") })
}

func TestServerSlowlorisBoundedByRequestTimeout(t *testing.T) {
	ts := srvStart(t, ServerConfig{
		Handler:        srvEcho,
		IdleTimeout:    time.Minute,
		RequestTimeout: 200 * time.Millisecond,
	})
	c := srvDial(t, "tcp", ts.addr)

	// Send the request one byte every 10ms: it would take seconds, and
	// every byte arrives well within any per-read timeout.
	stop := make(chan struct{})
	defer close(stop)
	start := time.Now()
	go func() {
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for i := range len(policyFullRequest) {
			if _, err := c.Write([]byte{policyFullRequest[i]}); err != nil {
				return
			}
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	c.expectClosed(t)
	if d := time.Since(start); d < 150*time.Millisecond || d > 2*time.Second {
		t.Errorf("trickling connection closed after %v, want about 200ms", d)
	}
	srvWaitFor(t, "the timeout log line", func() bool { return strings.Contains(ts.logs.String(), "policy request timed out") })
}

// srvBlocker is a handler that holds requests for "slow@example.org"
// until released, and echoes the others.
type srvBlocker struct {
	entered chan struct{}
	release chan struct{}
}

func newSrvBlocker() *srvBlocker {
	return &srvBlocker{entered: make(chan struct{}, 100), release: make(chan struct{})}
}

func (b *srvBlocker) Decide(ctx context.Context, req *Request) Action {
	if req.Recipient == "slow@example.org" {
		b.entered <- struct{}{}
		select {
		case <-b.release:
		case <-ctx.Done():
		}
	}
	return srvEcho.Decide(ctx, req)
}

func TestServerMaxConns(t *testing.T) {
	b := newSrvBlocker()
	ts := srvStart(t, ServerConfig{Handler: b, MaxConns: 2, MaxConnsPerPeer: 2, ShutdownGrace: 100 * time.Millisecond})
	c1 := srvDial(t, "tcp", ts.addr)
	c2 := srvDial(t, "tcp", ts.addr)
	for _, c := range []*srvClient{c1, c2} {
		if _, err := io.WriteString(c, srvRequestFor("slow@example.org")); err != nil {
			t.Fatal(err)
		}
		<-b.entered
	}
	if n := ts.activeConns(); n != 2 {
		t.Fatalf("ActiveConns() = %d, want 2", n)
	}

	// Both connections are busy: a third is closed at once.
	first := time.Now()
	c3 := srvDial(t, "tcp", ts.addr)
	_, _ = io.WriteString(c3, policyFullRequest) // may fail: the server may have closed already
	c3.expectClosed(t)
	srvWaitFor(t, "the refusal warning", func() bool { return strings.Contains(ts.logs.String(), "too many connections") })

	// More refusals within a second are not logged again.
	for range 3 {
		srvDial(t, "tcp", ts.addr).expectClosed(t)
	}
	if n := strings.Count(ts.logs.String(), "too many connections"); n != 1 && time.Since(first) < time.Second {
		t.Errorf("4 refusals within a second logged %d times, want once", n)
	}

	// Answered, both wait for their next request: a new connection takes
	// the place of the one idle longest.
	close(b.release)
	for _, c := range []*srvClient{c1, c2} {
		if got, err := c.answer(); err != nil || got != "OK slow@example.org alice@example.com" {
			t.Fatalf("held request: %q, %v", got, err)
		}
	}
	srvWaitFor(t, "both connections idle", func() bool { return srvIdle(ts.Server) == 2 })
	if _, err := c2.ask(srvRequestFor("c2@example.org")); err != nil { // c1 is now idle longest
		t.Fatal(err)
	}
	srvWaitFor(t, "both connections idle", func() bool { return srvIdle(ts.Server) == 2 })
	c5 := srvDial(t, "tcp", ts.addr)
	if got, err := c5.ask(srvRequestFor("again@example.org")); err != nil || got != "OK again@example.org alice@example.com" {
		t.Fatalf("new connection at MaxConns: %q, %v", got, err)
	}
	c1.expectClosed(t)
	if got, err := c2.ask(srvRequestFor("c2@example.org")); err != nil || got != "OK c2@example.org alice@example.com" {
		t.Fatalf("the other connection after an eviction: %q, %v", got, err)
	}
	if n := ts.activeConns(); n != 2 {
		t.Fatalf("ActiveConns() = %d, want 2", n)
	}
}

// srvIdle counts the server's connections waiting for a request.
func srvIdle(s *Server) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for c := range s.conns {
		c.mu.Lock()
		if c.idle {
			n++
		}
		c.mu.Unlock()
	}
	return n
}

func TestServerHandlerPanic(t *testing.T) {
	ts := srvStart(t, ServerConfig{Handler: HandlerFunc(func(ctx context.Context, req *Request) Action {
		if req.Recipient == "boom@example.org" {
			panic("handler bug")
		}
		return srvEcho(ctx, req)
	})})
	c := srvDial(t, "tcp", ts.addr)
	if got, err := c.ask(srvRequestFor("boom@example.org")); err != nil || got != "DUNNO" {
		t.Fatalf("panicking handler: %q, %v; want DUNNO", got, err)
	}
	if got, err := c.ask(srvRequestFor("fine@example.org")); err != nil || got != "OK fine@example.org alice@example.com" {
		t.Fatalf("after the panic: %q, %v", got, err)
	}
	logs := ts.logs.String()
	for _, want := range []string{"level=ERROR", "policy handler panicked", "handler bug", "stack=", "server_test.go"} {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %q:\n%s", want, logs)
		}
	}
}

func TestServerGracefulShutdown(t *testing.T) {
	entered := make(chan struct{})
	release := make(chan struct{})
	var ctxErrInFlight atomic.Value
	ts := srvStart(t, ServerConfig{Handler: HandlerFunc(func(ctx context.Context, req *Request) Action {
		if req.Recipient != "slow@example.org" {
			return ActionDunno
		}
		close(entered)
		<-release
		ctxErrInFlight.Store(fmt.Sprint(ctx.Err()))
		return "OK slow"
	})})

	idle := srvDial(t, "tcp", ts.addr)
	if _, err := idle.ask(policyFullRequest); err != nil {
		t.Fatal(err)
	}
	busy := srvDial(t, "tcp", ts.addr)
	if _, err := io.WriteString(busy, srvRequestFor("slow@example.org")); err != nil {
		t.Fatal(err)
	}
	<-entered

	stopped := make(chan error, 1)
	go func() { stopped <- ts.stop() }()

	// The idle connection is closed at once; the listener is closed
	// before it.
	idle.expectClosed(t)
	if !ts.ln.closed.Load() {
		t.Error("the listener is still open during shutdown")
	}
	select {
	case err := <-stopped:
		t.Fatalf("Serve returned (%v) while a request was in flight", err)
	default:
	}

	// The request in flight is answered, then its connection is closed.
	close(release)
	if got, err := busy.answer(); err != nil || got != "OK slow" {
		t.Fatalf("in-flight request: %q, %v", got, err)
	}
	busy.expectClosed(t)
	if err := <-stopped; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	if got := ctxErrInFlight.Load(); got != "<nil>" {
		t.Errorf("the in-flight decision's context was cancelled: %v", got)
	}
	if n := ts.activeConns(); n != 0 {
		t.Errorf("ActiveConns() = %d after Serve returned", n)
	}
}

func TestServerShutdownGrace(t *testing.T) {
	entered := make(chan struct{})
	cancelled := make(chan struct{})
	ts := srvStart(t, ServerConfig{
		ShutdownGrace: 50 * time.Millisecond,
		Handler: HandlerFunc(func(ctx context.Context, _ *Request) Action {
			close(entered)
			<-ctx.Done()
			close(cancelled)
			return ActionDunno
		}),
	})
	c := srvDial(t, "tcp", ts.addr)
	if _, err := io.WriteString(c, policyFullRequest); err != nil {
		t.Fatal(err)
	}
	<-entered
	start := time.Now()
	if err := ts.stop(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 40*time.Millisecond || d > 2*time.Second {
		t.Errorf("Serve returned %v after shutdown began, want about the 50ms grace", d)
	}
	select {
	case <-cancelled:
	default:
		t.Error("the decision's context was not cancelled after the grace period")
	}
	if !strings.Contains(ts.logs.String(), "grace period over") {
		t.Errorf("no grace log line:\n%s", ts.logs.String())
	}
}

func TestServeSeveralListeners(t *testing.T) {
	srv, err := NewServer(ServerConfig{Handler: srvEcho, MaxConns: 2, MaxConnsPerPeer: 2})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var addrs []string
	done := make(chan error, 2)
	for range 2 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addrs = append(addrs, ln.Addr().String())
		go func() { done <- srv.Serve(ctx, ln) }()
	}
	var first *srvClient
	for _, a := range addrs {
		c := srvDial(t, "tcp", a)
		if got, err := c.ask(srvRequestFor("x@" + a)); err != nil || got != "OK x@"+a+" alice@example.com" {
			t.Fatalf("listener %s: %q, %v", a, got, err)
		}
		if first == nil {
			first = c
		}
	}
	if n := srv.activeConns(); n != 2 {
		t.Errorf("ActiveConns() = %d, want 2", n)
	}
	// MaxConns counts over both listeners: a third connection takes the
	// place of the one idle longest, on the first listener.
	srvWaitFor(t, "both connections idle", func() bool { return srvIdle(srv) == 2 })
	c3 := srvDial(t, "tcp", addrs[1])
	if got, err := c3.ask(srvRequestFor("x@third")); err != nil || got != "OK x@third alice@example.com" {
		t.Fatalf("third connection: %q, %v", got, err)
	}
	first.expectClosed(t)

	cancel()
	for range 2 {
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(srvTestWait):
			t.Fatal("Serve did not return")
		}
	}
}

func TestServeContextValues(t *testing.T) {
	type key struct{}
	srv, err := NewServer(ServerConfig{Handler: HandlerFunc(func(ctx context.Context, _ *Request) Action {
		v, _ := ctx.Value(key{}).(string)
		return Action("OK " + v)
	})})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.WithValue(context.Background(), key{}, "value"))
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	c := srvDial(t, "tcp", ln.Addr().String())
	if got, err := c.ask(policyFullRequest); err != nil || got != "OK value" {
		t.Errorf("got %q, %v; want the value of Serve's context", got, err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestServeListenerFailure(t *testing.T) {
	srv, err := NewServer(ServerConfig{Handler: srvEcho})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(context.Background(), ln) }()
	c := srvDial(t, "tcp", ln.Addr().String())
	if _, err := c.ask(policyFullRequest); err != nil {
		t.Fatal(err)
	}
	_ = ln.Close() // not through the context
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("Serve: %v, want an error wrapping net.ErrClosed", err)
		}
	case <-time.After(srvTestWait):
		t.Fatal("Serve did not return")
	}
	c.expectClosed(t) // its connections are closed too
}

func TestNewServer(t *testing.T) {
	tests := []struct {
		name    string
		cfg     ServerConfig
		wantErr string
	}{
		{"no handler", ServerConfig{}, "Handler is required"},
		{"negative line limit", ServerConfig{Handler: srvEcho, Limits: Limits{MaxLine: -1}}, "Limits.MaxLine"},
		{"negative attrs limit", ServerConfig{Handler: srvEcho, Limits: Limits{MaxAttrs: -1}}, "Limits.MaxAttrs"},
		{"negative request limit", ServerConfig{Handler: srvEcho, Limits: Limits{MaxRequest: -1}}, "Limits.MaxRequest"},
		{"negative idle timeout", ServerConfig{Handler: srvEcho, IdleTimeout: -time.Second}, "IdleTimeout"},
		{"negative request timeout", ServerConfig{Handler: srvEcho, RequestTimeout: -time.Second}, "RequestTimeout"},
		{"negative max conns", ServerConfig{Handler: srvEcho, MaxConns: -1}, "MaxConns"},
		{"negative grace", ServerConfig{Handler: srvEcho, ShutdownGrace: -1}, "ShutdownGrace"},
		{"negative per-peer max", ServerConfig{Handler: srvEcho, MaxConnsPerPeer: -1}, "MaxConnsPerPeer"},
		{"all errors reported", ServerConfig{MaxConns: -1, IdleTimeout: -1}, "IdleTimeout must not be negative\ndetector: server: MaxConns"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewServer(tt.cfg)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("err = %v, want one containing %q", err, tt.wantErr)
			}
		})
	}

	srv, err := NewServer(ServerConfig{Handler: srvEcho})
	if err != nil {
		t.Fatal(err)
	}
	got := srv.cfg
	got.Handler = nil // a func is not comparable
	want := ServerConfig{
		Limits:          Limits{MaxLine: DefaultMaxLine, MaxAttrs: DefaultMaxAttrs, MaxRequest: DefaultMaxRequest},
		IdleTimeout:     5 * time.Minute,
		RequestTimeout:  30 * time.Second,
		MaxConns:        1000,
		MaxConnsPerPeer: 250,
		ShutdownGrace:   10 * time.Second,
		Peers:           SystemPeers{},
	}
	if got.Logger == nil {
		t.Error("no Logger was set: a nil Logger must be replaced by a discarding one")
	}
	got.Logger = nil
	if !reflect.DeepEqual(got, want) {
		t.Errorf("defaults: got %+v, want %+v", got, want)
	}
}

func TestListenTCP(t *testing.T) {
	ln, err := Listen("127.0.0.1:0", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if ln.Addr().Network() != "tcp" {
		t.Errorf("network %q, want tcp", ln.Addr().Network())
	}
	for _, bad := range []string{"", "unix:", "127.0.0.1:notaport"} {
		if _, err := Listen(bad, 0); err == nil {
			t.Errorf("Listen(%q) succeeded", bad)
		}
	}
}

func TestListenUnix(t *testing.T) {
	path := filepath.Join(t.TempDir(), "policy.sock")
	ln, err := Listen("unix:"+path, 0o660)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket mode %v, want a socket with 0660", fi.Mode())
	}

	srv, err := NewServer(ServerConfig{Handler: srvEcho})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	c := srvDial(t, "unix", path)
	if got, err := c.ask(policyFullRequest); err != nil || got != "OK bob@example.org alice@example.com" {
		t.Fatalf("over the socket: %q, %v", got, err)
	}

	// While it is served, a second Listen must not take the socket away.
	if _, err := Listen("unix:"+path, 0o660); err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "another process") {
		t.Errorf("Listen on a socket in use: %v, want an error naming %s", err, path)
	}

	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket file left after Serve returned: %v", err)
	}
}

func TestListenUnixStaleSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stale.sock")
	old, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	old.SetUnlinkOnClose(false)
	_ = old.Close() // as if the previous run had crashed
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("no stale socket to test with: %v", err)
	}

	ln, err := Listen("unix:"+path, 0o600)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	defer ln.Close()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode().Perm())
	}
}

func TestListenUnixNotASocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(path, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := Listen("unix:"+path, 0o660)
	if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("err = %v, want one naming %s as not a socket", err, path)
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != "keep me" {
		t.Errorf("the file was touched: %q, %v", b, err)
	}

	missingDir := filepath.Join(t.TempDir(), "no", "such", "dir.sock")
	if _, err := Listen("unix:"+missingDir, 0o660); err == nil || !strings.Contains(err.Error(), missingDir) {
		t.Errorf("err = %v, want one naming %s", err, missingDir)
	}
}

// BenchmarkServerRoundTrip sends requests one after the other over one
// loopback connection to a server answering DUNNO.
func BenchmarkServerRoundTrip(b *testing.B) {
	ts := srvStart(b, ServerConfig{
		Handler: HandlerFunc(func(context.Context, *Request) Action { return ActionDunno }),
		Logger:  slog.New(slog.DiscardHandler),
	})
	c := srvDial(b, "tcp", ts.addr)
	_ = c.SetDeadline(time.Time{})
	req := []byte(policyFullRequest)
	b.ReportAllocs()
	start := time.Now()
	for b.Loop() {
		if err := srvBenchAsk(c, req); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "req/s")
}

// BenchmarkServer64Conns sends requests from 64 clients at once, each on
// its own persistent connection, and reports the throughput and the 99th
// percentile of the round-trip time.
func BenchmarkServer64Conns(b *testing.B) {
	const clients = 64
	ts := srvStart(b, ServerConfig{
		Handler: HandlerFunc(func(context.Context, *Request) Action { return ActionDunno }),
		Logger:  slog.New(slog.DiscardHandler),
	})
	conns := make([]*srvClient, clients)
	for i := range conns {
		conns[i] = srvDial(b, "tcp", ts.addr)
		_ = conns[i].SetDeadline(time.Time{})
	}
	req := []byte(policyFullRequest)
	var (
		left  atomic.Int64
		hists [clients]srvHistogram
		wg    sync.WaitGroup
		errs  = make(chan error, clients)
	)
	left.Store(int64(b.N))
	b.ResetTimer()
	start := time.Now()
	for i, c := range conns {
		wg.Go(func() {
			for left.Add(-1) >= 0 {
				t0 := time.Now()
				if err := srvBenchAsk(c, req); err != nil {
					errs <- err
					return
				}
				hists[i].add(time.Since(t0))
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	var all srvHistogram
	for i := range hists {
		all.merge(&hists[i])
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "req/s")
	b.ReportMetric(float64(all.quantile(0.99).Microseconds()), "p99-us")
}

// srvBenchAsk sends req and reads the answer without allocating.
func srvBenchAsk(c *srvClient, req []byte) error {
	if _, err := c.Write(req); err != nil {
		return err
	}
	line, err := c.r.ReadSlice('\n')
	if err != nil {
		return err
	}
	if !bytes.HasPrefix(line, []byte("action=")) {
		return fmt.Errorf("bad answer %q", line)
	}
	if line, err = c.r.ReadSlice('\n'); err != nil || len(line) != 1 {
		return fmt.Errorf("bad answer end %q: %v", line, err)
	}
	return nil
}

// srvHistogram counts durations in fixed buckets growing by a factor
// of 2^(1/8) (about 9%) from 1µs; a quantile is read as the upper bound of
// the bucket it falls into.
type srvHistogram struct {
	counts [srvHistBuckets]uint64
	total  uint64
}

const srvHistBuckets = 8 * 24 // up to 2^24 µs, about 17s

func (h *srvHistogram) add(d time.Duration) {
	us := float64(d) / float64(time.Microsecond)
	i := 0
	if us > 1 {
		i = min(int(math.Ceil(8*math.Log2(us))), srvHistBuckets-1)
	}
	h.counts[i]++
	h.total++
}

func (h *srvHistogram) merge(o *srvHistogram) {
	for i, n := range o.counts {
		h.counts[i] += n
	}
	h.total += o.total
}

// quantile returns the upper bound of the bucket holding quantile q.
func (h *srvHistogram) quantile(q float64) time.Duration {
	if h.total == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(h.total)))
	var seen uint64
	for i, n := range h.counts {
		seen += n
		if seen >= rank {
			return time.Duration(math.Pow(2, float64(i)/8) * float64(time.Microsecond))
		}
	}
	return time.Duration(math.Pow(2, float64(srvHistBuckets-1)/8) * float64(time.Microsecond))
}

func TestSrvHistogram(t *testing.T) {
	var h srvHistogram
	for range 990 {
		h.add(100 * time.Microsecond)
	}
	for range 10 {
		h.add(10 * time.Millisecond)
	}
	if p := h.quantile(0.99); p < 100*time.Microsecond || p > 110*time.Microsecond {
		t.Errorf("p99 = %v, want about 100µs", p)
	}
	if p := h.quantile(0.999); p < 10*time.Millisecond || p > 11*time.Millisecond {
		t.Errorf("p99.9 = %v, want about 10ms", p)
	}
}
