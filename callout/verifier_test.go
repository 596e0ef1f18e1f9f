package callout

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/rcptguard/rcptguard/test"
)

// fakeClock is an injectable clock for cache expiry.
type fakeClock struct{ ns atomic.Int64 }

func newFakeClock() *fakeClock {
	c := &fakeClock{}
	c.ns.Store(time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC).UnixNano())
	return c
}
func (c *fakeClock) Now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

// rig is a verifier wired to an in-process DNS server and MX hosts that
// are reached through a routing dialer.
type rig struct {
	t     *testing.T
	dns   *test.DNSServer
	v     *Verifier
	clock *fakeClock
}

type rigOption func(*Config)

// newRig starts DNS with zone and a verifier; routes maps the A record
// addresses used in zone to MX servers.
func newRig(t *testing.T, zone string, routes test.RouteDialer, opts ...rigOption) *rig {
	t.Helper()
	d := test.StartDNS(t, zone)
	res, err := NewResolver(ResolverConfig{Servers: []string{d.Addr}, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	clock := newFakeClock()
	cfg := Config{
		Resolver:      res,
		Dialer:        routes,
		Port:          25,
		Timeout:       3 * time.Second,
		Helo:          "probe.test",
		AllowPrivate:  true,
		CatchAllProbe: true,
		SessionIdle:   DefaultSessionIdle, // as the configuration's default
		Now:           clock.Now,
	}
	for _, o := range opts {
		o(&cfg)
	}
	v, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	return &rig{t: t, dns: d, v: v, clock: clock}
}

func (r *rig) verify(addr string) Result {
	r.t.Helper()
	res := r.v.Verify(context.Background(), addr)
	r.v.cache.Wait()
	return res
}

func route(ip string, mx *test.MX) test.RouteDialer { return test.RouteDialer{ip: mx.Addr} }

// zoneFor is a zone with example.test's MX at 127.0.0.2.
const zoneOneMX = `
example.test. 300 IN MX 10 mx1.example.test.
mx1.example.test. 300 IN A 127.0.0.2
`

func TestVerifyVerdicts(t *testing.T) {
	tests := []struct {
		name       string
		mx         test.MXConfig
		addr       string
		wantStatus Status
		wantReason Reason
		wantCode   int
	}{
		{"accepted", test.MXConfig{Mailboxes: []string{"alice@example.test"}}, "alice@example.test", StatusValid, ReasonAccepted, 250},
		{"accepted, mixed case", test.MXConfig{Mailboxes: []string{"alice@example.test"}}, "Alice@Example.TEST", StatusValid, ReasonAccepted, 250},
		{"5.1.1 no such user", test.MXConfig{Mailboxes: []string{"alice@example.test"}}, "nobody@example.test", StatusInvalid, ReasonNoMailbox, 550},
		{"5.7.1 policy", test.MXConfig{Unknown: &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "Service unavailable; Client host blocked using zen.spamhaus.org"}}, "bob@example.test", StatusUnknown, ReasonRejected, 554},
		{"451 greylisting", test.MXConfig{Unknown: &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 1}, Message: "Greylisted, try again later"}}, "bob@example.test", StatusUnknown, ReasonTemporary, 451},
		{"MAIL FROM refused", test.MXConfig{Mail: &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "null sender not accepted"}}, "bob@example.test", StatusUnknown, ReasonMailFromRefused, 550},
		{"catch-all", test.MXConfig{CatchAll: true}, "anyone@example.test", StatusUnknown, ReasonCatchAll, 250},
		{"554 banner", test.MXConfig{Banner: &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "go away"}}, "bob@example.test", StatusUnknown, ReasonSessionRefused, 554},
		{"421 banner", test.MXConfig{Banner: &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "busy"}}, "bob@example.test", StatusUnknown, ReasonSessionRefused, 421},
		{"drop at RCPT", test.MXConfig{DropAt: "rcpt"}, "bob@example.test", StatusUnknown, ReasonUnreachable, 0},
		{"drop at MAIL", test.MXConfig{DropAt: "mail"}, "bob@example.test", StatusUnknown, ReasonUnreachable, 0},
		{"drop at banner", test.MXConfig{DropAt: "banner"}, "bob@example.test", StatusUnknown, ReasonUnreachable, 0},
		{"STARTTLS self-signed, accepted", test.MXConfig{TLS: true, Mailboxes: []string{"alice@example.test"}}, "alice@example.test", StatusValid, ReasonAccepted, 250},
		{"STARTTLS self-signed, 5.1.1", test.MXConfig{TLS: true}, "nobody@example.test", StatusInvalid, ReasonNoMailbox, 550},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mx := test.StartMX(t, tt.mx)
			r := newRig(t, zoneOneMX, route("127.0.0.2", mx))
			res := r.verify(tt.addr)
			if res.Status != tt.wantStatus || res.Reason != tt.wantReason || res.Reply.Code != tt.wantCode {
				t.Fatalf("got %s, want %s %s code %d", res, tt.wantStatus, tt.wantReason, tt.wantCode)
			}
			if tt.wantCode != 0 && res.Host != "mx1.example.test" {
				t.Errorf("host %q, want mx1.example.test", res.Host)
			}
			if res.Cached {
				t.Error("first verdict marked cached")
			}
			if mx.Datas() != 0 {
				t.Error("the probe sent DATA")
			}
			if tt.mx.TLS && mx.TLSSessions() == 0 {
				t.Error("STARTTLS offered but not used")
			}
			for _, h := range mx.Helos() {
				if h != "probe.test" {
					t.Errorf("EHLO %q, want probe.test", h)
				}
			}
			for _, m := range mx.Mails() {
				if m != "" {
					t.Errorf("MAIL FROM:<%s>, want the null sender", m)
				}
			}
		})
	}
}

func TestVerifyDNSVerdicts(t *testing.T) {
	zone := `
nxmx.test. 300 IN SOA ns.test. host.test. 1 3600 600 86400 300
nullmx.test. 300 IN MX 0 .
nomail.test. 300 IN TXT "no mail here"
implicit.test. 300 IN A 127.0.0.2
alias.test. 300 IN CNAME example.test.
example.test. 300 IN MX 10 mx1.example.test.
mx1.example.test. 300 IN A 127.0.0.2
broken.test. 300 IN MX 10 mx1.example.test.
`
	mx := test.StartMX(t, test.MXConfig{Mailboxes: []string{"alice@implicit.test", "alice@alias.test"}})
	r := newRig(t, zone, route("127.0.0.2", mx))
	r.dns.ServFail("broken.test.")
	tests := []struct {
		addr   string
		status Status
		reason Reason
	}{
		{"a@doesnotexist.test", StatusInvalid, ReasonNXDomain},
		{"a@nullmx.test", StatusInvalid, ReasonNullMX},
		{"a@nomail.test", StatusInvalid, ReasonNoMailHost},
		{"alice@implicit.test", StatusValid, ReasonAccepted},
		{"alice@alias.test", StatusValid, ReasonAccepted},
		{"a@broken.test", StatusUnknown, ReasonDNSError},
		{"not an address", StatusInvalid, ReasonBadSyntax},
		{"a@[127.0.0.1]", StatusUnknown, ReasonAddressLiteral},
		{"a@yahoo.com", StatusUnknown, ReasonAcceptAll},
	}
	for _, tt := range tests {
		res := r.verify(tt.addr)
		if res.Status != tt.status || res.Reason != tt.reason {
			t.Errorf("%s: got %s, want %s %s", tt.addr, res, tt.status, tt.reason)
		}
	}
	if n := r.dns.QueriesFor("yahoo.com.", 15); n != 0 {
		t.Errorf("accept-all domain was looked up %d times", n)
	}
	// A permanent DNS fact is cached for the domain: another address there
	// needs no query.
	before := r.dns.Queries()
	if res := r.verify("b@nullmx.test"); res.Reason != ReasonNullMX || !res.Cached {
		t.Errorf("second null MX address: %s", res)
	}
	if r.dns.Queries() != before {
		t.Error("domain fact not cached")
	}
	if res := r.verify("a@nullmx.test"); res.Reply.EnhancedString() != "5.1.10" {
		t.Errorf("null MX reply %q, want 5.1.10", res.Reply)
	}
}

func TestVerifyUnsafeAddresses(t *testing.T) {
	zone := `
loop.test. 300 IN MX 10 mx.loop.test.
mx.loop.test. 300 IN A 127.0.0.1
private.test. 300 IN MX 10 mx.private.test.
mx.private.test. 300 IN A 10.0.0.1
v6.test. 300 IN MX 10 mx.v6.test.
mx.v6.test. 300 IN AAAA ::1
meta.test. 300 IN MX 10 mx.meta.test.
mx.meta.test. 300 IN A 169.254.169.254
chain.test. 300 IN MX 10 mx.chain.test.
mx.chain.test. 300 IN CNAME inside.chain.test.
inside.chain.test. 300 IN A 10.1.2.3
`
	var dials atomic.Int32
	dialer := dialFunc(func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		return nil, fmt.Errorf("must not dial %s", addr)
	})
	r := newRig(t, zone, nil, func(c *Config) { c.AllowPrivate = false; c.Dialer = dialer })
	for _, addr := range []string{"a@loop.test", "a@private.test", "a@v6.test", "a@meta.test", "a@chain.test"} {
		res := r.verify(addr)
		if res.Status != StatusUnknown || res.Reason != ReasonUnsafeAddress {
			t.Errorf("%s: got %s, want unknown unsafe-address", addr, res)
		}
	}
	if dials.Load() != 0 {
		t.Errorf("%d dials to unsafe addresses", dials.Load())
	}
}

type dialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

func (f dialFunc) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return f(ctx, network, addr)
}

func TestVerifyFallbackToNextMX(t *testing.T) {
	zone := `
example.test. 300 IN MX 10 mx1.example.test.
example.test. 300 IN MX 20 mx2.example.test.
mx1.example.test. 300 IN A 127.0.0.2
mx2.example.test. 300 IN A 127.0.0.3
`
	t.Run("4xx on the first", func(t *testing.T) {
		grey := test.StartMX(t, test.MXConfig{Unknown: &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 1}, Message: "greylisted"}})
		good := test.StartMX(t, test.MXConfig{Mailboxes: []string{"alice@example.test"}})
		r := newRig(t, zone, test.RouteDialer{"127.0.0.2": grey.Addr, "127.0.0.3": good.Addr})
		if res := r.verify("alice@example.test"); res.Status != StatusValid || res.Host != "mx2.example.test" {
			t.Fatalf("got %s, want valid from mx2", res)
		}
	})
	t.Run("first unreachable", func(t *testing.T) {
		good := test.StartMX(t, test.MXConfig{})
		r := newRig(t, zone, test.RouteDialer{"127.0.0.3": good.Addr})
		if res := r.verify("nobody@example.test"); res.Status != StatusInvalid || res.Host != "mx2.example.test" {
			t.Fatalf("got %s, want invalid from mx2", res)
		}
	})
	t.Run("5xx on the first is final", func(t *testing.T) {
		first := test.StartMX(t, test.MXConfig{})
		second := test.StartMX(t, test.MXConfig{CatchAll: true})
		r := newRig(t, zone, test.RouteDialer{"127.0.0.2": first.Addr, "127.0.0.3": second.Addr})
		if res := r.verify("nobody@example.test"); res.Status != StatusInvalid || res.Host != "mx1.example.test" {
			t.Fatalf("got %s, want invalid from mx1", res)
		}
		if second.Conns() != 0 {
			t.Error("second MX tried after a 5xx")
		}
	})
	t.Run("all greylisting", func(t *testing.T) {
		grey := test.StartMX(t, test.MXConfig{Unknown: &smtp.SMTPError{Code: 450, EnhancedCode: smtp.EnhancedCode{4, 2, 0}, Message: "greylisted"}})
		r := newRig(t, zone, test.RouteDialer{"127.0.0.2": grey.Addr, "127.0.0.3": grey.Addr})
		if res := r.verify("x@example.test"); res.Status != StatusUnknown || res.Reason != ReasonTemporary {
			t.Fatalf("got %s, want unknown temporary", res)
		}
	})
}

func TestVerifyTimeout(t *testing.T) {
	for _, mxc := range []test.MXConfig{
		{BannerDelay: 10 * time.Second},
		{RcptDelay: 10 * time.Second},
	} {
		mx := test.StartMX(t, mxc)
		r := newRig(t, zoneOneMX, route("127.0.0.2", mx), func(c *Config) { c.Timeout = 300 * time.Millisecond })
		start := time.Now()
		res := r.verify("bob@example.test")
		if el := time.Since(start); el > 2*time.Second {
			t.Errorf("%+v: took %s with a 300ms timeout", mxc, el)
		}
		if res.Status != StatusUnknown || res.Reason != ReasonTimeout {
			t.Errorf("%+v: got %s, want unknown timeout", mxc, res)
		}
	}
}

func TestVerifyCachedMakesNoNetworkCall(t *testing.T) {
	mx := test.StartMX(t, test.MXConfig{Mailboxes: []string{"alice@example.test"}})
	r := newRig(t, zoneOneMX, route("127.0.0.2", mx))
	for _, addr := range []string{"alice@example.test", "nobody@example.test"} {
		first := r.verify(addr)
		conns, rcpts, queries := mx.Conns(), len(mx.Rcpts()), r.dns.Queries()
		second := r.verify(strings.ToUpper(addr))
		if !second.Cached || second.Status != first.Status || second.Reason != first.Reason {
			t.Errorf("%s: second verdict %s, first %s", addr, second, first)
		}
		if mx.Conns() != conns || len(mx.Rcpts()) != rcpts || r.dns.Queries() != queries {
			t.Errorf("%s: cached verdict used the network", addr)
		}
	}
	// Past the negative TTL the verdict is probed again (perhaps over a
	// session still open, so count RCPTs, not connections).
	rcpts := len(mx.Rcpts())
	r.clock.Advance(2*time.Hour + time.Second)
	if res := r.verify("nobody@example.test"); res.Cached || len(mx.Rcpts()) == rcpts {
		t.Errorf("expired verdict not probed again: %s", res)
	}
}

func TestVerifyCoalesces(t *testing.T) {
	mx := test.StartMX(t, test.MXConfig{Mailboxes: []string{"alice@example.test"}, RcptDelay: 100 * time.Millisecond})
	r := newRig(t, zoneOneMX, route("127.0.0.2", mx))
	var wg sync.WaitGroup
	results := make([]Result, 100)
	for i := range results {
		wg.Go(func() { results[i] = r.v.Verify(context.Background(), "alice@example.test") })
	}
	wg.Wait()
	for _, res := range results {
		if res.Status != StatusValid {
			t.Fatalf("got %s", res)
		}
	}
	n := 0
	for _, rc := range mx.Rcpts() {
		if rc == "alice@example.test" {
			n++
		}
	}
	if n != 1 || mx.Conns() != 1 {
		t.Fatalf("100 concurrent verifications made %d RCPTs over %d connections, want 1 and 1", n, mx.Conns())
	}
}

func TestVerifySharesSessions(t *testing.T) {
	mx := test.StartMX(t, test.MXConfig{RcptDelay: 5 * time.Millisecond})
	r := newRig(t, zoneOneMX, route("127.0.0.2", mx), func(c *Config) { c.PerHost = 2; c.MaxRcpts = 5 })
	var wg sync.WaitGroup
	for i := range 40 {
		wg.Go(func() {
			res := r.v.Verify(context.Background(), fmt.Sprintf("user%d@example.test", i))
			if res.Status != StatusInvalid {
				t.Errorf("user%d: %s", i, res)
			}
		})
	}
	wg.Wait()
	if c := mx.Conns(); c > 10 {
		t.Errorf("40 recipients of one domain used %d connections; sessions are not shared", c)
	}
	t.Logf("40 recipients: %d connections, %d MAIL transactions", mx.Conns(), len(mx.Mails()))
}

func TestVerifyRefusingHostRemembered(t *testing.T) {
	mx := test.StartMX(t, test.MXConfig{Mail: &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "no probes"}})
	r := newRig(t, zoneOneMX, route("127.0.0.2", mx))
	if res := r.verify("a@example.test"); res.Reason != ReasonMailFromRefused {
		t.Fatalf("got %s", res)
	}
	conns := mx.Conns()
	if res := r.verify("b@example.test"); res.Status != StatusUnknown || res.Reason != ReasonRefusesProbes {
		t.Fatalf("got %s, want unknown refuses-probes", res)
	}
	if mx.Conns() != conns {
		t.Fatal("a host refusing probes was connected to again")
	}
}

func TestVerifyCatchAllCachedForDomain(t *testing.T) {
	mx := test.StartMX(t, test.MXConfig{CatchAll: true})
	r := newRig(t, zoneOneMX, route("127.0.0.2", mx))
	r.verify("a@example.test")
	conns := mx.Conns()
	if res := r.verify("b@example.test"); res.Reason != ReasonCatchAll {
		t.Fatalf("got %s", res)
	}
	if mx.Conns() != conns {
		t.Fatal("known catch-all domain probed again")
	}
	// Without the probe the acceptance stands.
	mx2 := test.StartMX(t, test.MXConfig{CatchAll: true})
	r2 := newRig(t, zoneOneMX, route("127.0.0.2", mx2), func(c *Config) { c.CatchAllProbe = false })
	if res := r2.verify("a@example.test"); res.Status != StatusValid || len(mx2.Rcpts()) != 1 {
		t.Fatalf("catch-all probe off: %s, rcpts %v", res, mx2.Rcpts())
	}
}

func TestVerifySingleRcptHosts(t *testing.T) {
	zone := `
m365.test. 300 IN MX 0 m365-test.mail.protection.outlook.com.
m365-test.mail.protection.outlook.com. 300 IN A 127.0.0.2
`
	mx := test.StartMX(t, test.MXConfig{Mailboxes: []string{"a@m365.test"}, MaxRcptsPerSession: 1})
	r := newRig(t, zone, route("127.0.0.2", mx))
	var wg sync.WaitGroup
	for _, a := range []string{"a@m365.test", "b@m365.test", "c@m365.test"} {
		wg.Go(func() { r.v.Verify(context.Background(), a) })
	}
	wg.Wait()
	r.v.cache.Wait()
	for _, a := range []string{"a@m365.test", "b@m365.test", "c@m365.test"} {
		res := r.verify(a)
		want := StatusInvalid
		if a == "a@m365.test" {
			want = StatusValid
		}
		if res.Status != want {
			t.Errorf("%s: got %s, want %s", a, res, want)
		}
	}
	// The acceptance of a@ is checked with a random name, in a session of
	// its own as the host takes one RCPT per session.
	if got := len(mx.Rcpts()); got != 4 {
		t.Errorf("%d RCPTs (%v), want 3 and one random name", got, mx.Rcpts())
	}
	r.v.Close() // ends the lingering session
	for _, s := range mx.Sessions() {
		if len(s.Rcpts) != 1 || !s.Quit {
			t.Errorf("session %+v: want one RCPT and QUIT", s)
		}
	}
}

func TestVerifyCanceledCallerDoesNotStopProbe(t *testing.T) {
	mx := test.StartMX(t, test.MXConfig{RcptDelay: 200 * time.Millisecond})
	r := newRig(t, zoneOneMX, route("127.0.0.2", mx))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if res := r.v.Verify(ctx, "x@example.test"); res.Reason != ReasonCanceled {
		t.Fatalf("got %s, want canceled", res)
	}
	// The same verification, still running, answers the next caller.
	if res := r.v.Verify(context.Background(), "x@example.test"); res.Status != StatusInvalid {
		t.Fatalf("got %s", res)
	}
	if n := len(mx.Rcpts()); n != 1 {
		t.Fatalf("%d RCPTs, want 1", n)
	}
}

func TestVerifyTranscript(t *testing.T) {
	mx := test.StartMX(t, test.MXConfig{TLS: true})
	var buf bytes.Buffer
	r := newRig(t, zoneOneMX, route("127.0.0.2", mx), func(c *Config) { c.Transcript = &syncWriter{w: &buf} })
	r.verify("x@example.test")
	r.v.Close() // the session's QUIT is written after the verdict
	out := buf.String()
	for _, want := range []string{"EHLO probe.test", "STARTTLS", "MAIL FROM:<>", "RCPT TO:<x@example.test>", "550"} {
		if !strings.Contains(out, want) {
			t.Errorf("transcript lacks %q:\n%s", want, out)
		}
	}
}

type syncWriter struct {
	mu sync.Mutex
	w  *bytes.Buffer
}

func (s *syncWriter) Write(b []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(b)
}

func BenchmarkVerifyCached(b *testing.B) {
	mx := test.StartMX(b, test.MXConfig{Mailboxes: []string{"alice@example.test"}})
	d := test.StartDNS(b, zoneOneMX)
	res, _ := NewResolver(ResolverConfig{Servers: []string{d.Addr}})
	v, err := New(Config{Resolver: res, Dialer: route("127.0.0.2", mx), AllowPrivate: true, Helo: "probe.test"})
	if err != nil {
		b.Fatal(err)
	}
	defer v.Close()
	v.Verify(context.Background(), "alice@example.test")
	v.cache.Wait()
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if r := v.Verify(ctx, "alice@example.test"); !r.Cached {
			b.Fatal("not cached")
		}
	}
}

// BenchmarkVerifyProbe measures full probes against the in-process MX:
// every address is new, so each needs an RCPT; concurrent recipients of
// the domain share sessions.
func BenchmarkVerifyProbe(b *testing.B) {
	mx := test.StartMX(b, test.MXConfig{CatchAll: false})
	d := test.StartDNS(b, zoneOneMX)
	res, _ := NewResolver(ResolverConfig{Servers: []string{d.Addr}})
	v, err := New(Config{Resolver: res, Dialer: route("127.0.0.2", mx), AllowPrivate: true, Helo: "probe.test", NoTLS: true})
	if err != nil {
		b.Fatal(err)
	}
	defer v.Close()
	var n atomic.Int64
	b.SetParallelism(16)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			i := n.Add(1)
			if r := v.Verify(context.Background(), fmt.Sprintf("user%d@example.test", i)); r.Status != StatusInvalid {
				b.Errorf("got %s", r)
			}
		}
	})
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "probes/s")
	b.ReportMetric(float64(mx.Conns()), "conns")
}

func TestVerifyConnectionCaps(t *testing.T) {
	mx := test.StartMX(t, test.MXConfig{})
	// One recipient per session (as for Microsoft 365) makes every
	// recipient need its own connection: the cap must hold them back.
	zone := `
capped.test. 300 IN MX 0 capped-test.mail.protection.outlook.com.
capped-test.mail.protection.outlook.com. 300 IN A 127.0.0.2
`
	r := newRig(t, zone, route("127.0.0.2", mx), func(c *Config) { c.PerDomainRate = 5 })
	var wg sync.WaitGroup
	var limited atomic.Int32
	for i := range 50 {
		wg.Go(func() {
			if res := r.v.Verify(context.Background(), fmt.Sprintf("u%d@capped.test", i)); res.Reason == ReasonRateLimited {
				limited.Add(1)
			} else if res.Status != StatusInvalid {
				t.Errorf("u%d: %s", i, res)
			}
		})
	}
	wg.Wait()
	if c := mx.Conns(); c > 5 {
		t.Fatalf("%d connections to one domain with a cap of 5 a minute", c)
	}
	if limited.Load() != 45 {
		t.Fatalf("%d rate-limited verdicts, want 45", limited.Load())
	}
	// The next minute the cap starts afresh.
	r.clock.Advance(time.Minute)
	if res := r.verify("late@capped.test"); res.Status != StatusInvalid {
		t.Fatalf("after a minute: %s", res)
	}
}

func TestVerifyRefusesOwnAddresses(t *testing.T) {
	// A public address, as a value only: the dialer refuses everything,
	// nothing leaves the machine.
	zone := `
self.test. 300 IN MX 10 mx.self.test.
mx.self.test. 300 IN A 93.184.215.14
`
	var dials atomic.Int32
	dialer := dialFunc(func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		return nil, fmt.Errorf("test dialer: refusing %s", addr)
	})
	for _, tc := range []struct {
		local     []netip.Addr
		want      Reason
		wantDials int32
	}{
		{[]netip.Addr{netip.MustParseAddr("93.184.215.14")}, ReasonUnsafeAddress, 0},
		{[]netip.Addr{}, ReasonUnreachable, 1},
	} {
		dials.Store(0)
		r := newRig(t, zone, nil, func(c *Config) {
			c.AllowPrivate = false
			c.Dialer = dialer
			c.LocalAddrs = tc.local
		})
		if res := r.verify("a@self.test"); res.Reason != tc.want || dials.Load() != tc.wantDials {
			t.Errorf("local %v: %s after %d dials, want %s after %d", tc.local, res, dials.Load(), tc.want, tc.wantDials)
		}
	}
}

// TestVerifySessionLingers: recipients of one domain asked one after the
// other, as one smtpd process asks, share one connection; a session the
// MX closed while idle is replaced without a false verdict.
func TestVerifySessionLingers(t *testing.T) {
	mx := test.StartMX(t, test.MXConfig{Mailboxes: []string{"a@example.test"}, IdleTimeout: 150 * time.Millisecond})
	r := newRig(t, zoneOneMX, route("127.0.0.2", mx), func(c *Config) { c.SessionIdle = time.Second })
	for i := range 7 {
		if res := r.verify(fmt.Sprintf("serial%d@example.test", i)); res.Status != StatusInvalid {
			t.Fatalf("serial%d: %s", i, res)
		}
	}
	if c := mx.Conns(); c != 1 {
		t.Fatalf("7 serial recipients used %d connections, want 1", c)
	}
	// The MX drops the idle session after 150ms, before our 1s linger
	// ends; the next recipient is probed over a new connection and gets
	// its real verdict.
	time.Sleep(400 * time.Millisecond)
	if res := r.verify("a@example.test"); res.Status != StatusValid {
		t.Fatalf("after the MX closed the idle session: %s", res)
	}
	if mx.Conns() != 2 {
		t.Fatalf("%d connections, want a second one after the idle close", mx.Conns())
	}
}

// TestVerifyUnquotedLocalParts: Postfix passes the recipient in its
// internal form, without the quotes it had on the wire; such addresses are
// probed with the quotes restored (the MX accepts the quoted form and, like
// Postfix, records it unquoted), not called bad syntax.
func TestVerifyUnquotedLocalParts(t *testing.T) {
	mx := test.StartMX(t, test.MXConfig{Mailboxes: []string{"john doe@example.test", "john..doe@example.test"}})
	r := newRig(t, zoneOneMX, route("127.0.0.2", mx))
	for _, tc := range []struct {
		in         string
		wantStatus Status
		wantAddr   string
	}{
		{"john doe@example.test", StatusValid, `"john doe"@example.test`},
		{"john..doe@example.test", StatusValid, `"john..doe"@example.test`},
		{`a"b@example.test`, StatusInvalid, `"a\"b"@example.test`},
		{".lead@example.test", StatusInvalid, `".lead"@example.test`},
	} {
		res := r.verify(tc.in)
		if res.Status != tc.wantStatus || res.Reply.Code == 0 || res.Address != tc.wantAddr {
			t.Errorf("%q: %s, want %s for %s after a probe", tc.in, res, tc.wantStatus, tc.wantAddr)
		}
	}
	// What cannot be an address stays bad syntax, with no network use.
	rcpts := len(mx.Rcpts())
	for _, in := range []string{"no-at-sign", "@example.test", "user@", "user@exa mple.test"} {
		if res := r.verify(in); res.Reason != ReasonBadSyntax {
			t.Errorf("%q: %s, want bad-syntax", in, res)
		}
	}
	if len(mx.Rcpts()) != rcpts {
		t.Error("a bad address was probed")
	}
}

// TestVerifySharedMXNotStarved: idle sessions of some domains must not
// keep every connection slot of an MX host that other domains use too
// (one host serves thousands of hosted domains).
func TestVerifySharedMXNotStarved(t *testing.T) {
	zone := "mx.shared.test. 300 IN A 127.0.0.2\n"
	for _, d := range []string{"a1", "a2", "a3", "a4", "b"} {
		zone += d + ".test. 300 IN MX 10 mx.shared.test.\n"
	}
	mx := test.StartMX(t, test.MXConfig{})
	r := newRig(t, zone, route("127.0.0.2", mx), func(c *Config) { c.PerHost = 4; c.SessionIdle = 10 * time.Second })
	for _, d := range []string{"a1", "a2", "a3", "a4"} {
		r.verify("x@" + d + ".test") // each leaves a session idling on a slot
	}
	start := time.Now()
	if res := r.verify("someone@b.test"); res.Status != StatusInvalid {
		t.Fatalf("a fifth domain on the shared MX: %s", res)
	}
	if el := time.Since(start); el > time.Second {
		t.Fatalf("a fifth domain waited %v for a slot held by idle sessions", el)
	}
}
