package test_test

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/rcptguard/rcptguard/callout"
	"github.com/rcptguard/rcptguard/cmd/rcptguard/cluster"
	"github.com/rcptguard/rcptguard/test"
)

// fleetVerifier is one server's verifier and its connection to the fleet.
type fleetVerifier struct {
	v *callout.Verifier
	c *cluster.Cluster
}

// newFleetVerifier builds a verifier of the fleet sharing r, against the
// fake MX on port, with the DNS at dns.
func newFleetVerifier(t *testing.T, r *test.RedisServer, prefix, dns, port string, now func() time.Time, set func(*callout.Config)) fleetVerifier {
	t.Helper()
	c, err := cluster.New(cluster.Config{URL: r.URL(), KeyPrefix: prefix, Period: time.Hour, Now: now, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	res, err := callout.NewResolver(callout.ResolverConfig{Servers: []string{dns}})
	if err != nil {
		t.Fatal(err)
	}
	p, _ := strconv.Atoi(port)
	cfg := callout.Config{Resolver: res, Port: p, Timeout: 5 * time.Second, Helo: "rcptguard.test", AllowPrivate: true,
		CatchAllProbe: true, SessionIdle: -1, NoTLS: true, Now: now,
		Shared: c, SharedFacts: c, SharedCaps: c, SharedTimeout: 5 * time.Second}
	if set != nil {
		set(&cfg)
	}
	v, err := callout.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = v.Close() })
	return fleetVerifier{v: v, c: c}
}

// randomNames counts the RCPTs the MX got that are none of the known
// recipients: the verifiers' random-name (catch-all) probes.
func randomNames(mx *test.MX, known ...string) int {
	n := 0
	for _, r := range mx.Rcpts() {
		r = strings.Trim(strings.ToLower(r), "<>")
		found := false
		for _, k := range known {
			found = found || r == k
		}
		if !found {
			n++
		}
	}
	return n
}

// A fact learnt by one server — a host refuses random names, a domain is
// a catch-all, a host refuses our probes — is used by the other: the MX
// sees one random-name probe and one refused MAIL FROM per fleet. With
// Redis down a server judges on its own facts, as a single host.
func TestClusterSharedFacts(t *testing.T) {
	mx := test.StartMXAt(t, "127.0.0.2:0", test.MXConfig{Mailboxes: []string{"alice@good.test", "bob@good.test", "carol@good.test"}})
	_, port, _ := net.SplitHostPort(mx.Addr)
	dns := test.StartDNS(t, "good.test. 300 IN MX 10 mx.good.test.\nmx.good.test. 300 IN A 127.0.0.2\n"+
		"all.test. 300 IN MX 10 mx.all.test.\nmx.all.test. 300 IN A 127.0.0.2\n"+
		"shy.test. 300 IN MX 10 mx.shy.test.\nmx.shy.test. 300 IN A 127.0.0.2\n")
	r := test.StartRedis(t)
	clock := &test.Clock{}
	a := newFleetVerifier(t, r, "facts:", dns.Addr, port, clock.Now, nil)
	b := newFleetVerifier(t, r, "facts:", dns.Addr, port, clock.Now, nil)
	ctx := context.Background()
	inRedis := func(key string) {
		t.Helper()
		within(t, 5*time.Second, "fact "+key+" in redis", func() bool {
			n, _ := r.Do("EXISTS", "facts:fact:"+key)
			return n == ":1"
		})
	}

	// good.test's MX refuses random names: server 1 asks once.
	if res := a.v.Verify(ctx, "alice@good.test"); res.Status != callout.StatusValid {
		t.Fatalf("server 1, alice: %s", res)
	}
	if n := randomNames(mx, "alice@good.test", "bob@good.test"); n != 1 {
		t.Fatalf("server 1 sent %d random-name probes, want 1: %v", n, mx.Rcpts())
	}
	inRedis("=good.test mx.good.test")
	if res := b.v.Verify(ctx, "bob@good.test"); res.Status != callout.StatusValid {
		t.Fatalf("server 2, bob: %s", res)
	}
	if n := randomNames(mx, "alice@good.test", "bob@good.test"); n != 1 || len(mx.Rcpts()) != 3 {
		t.Fatalf("server 2 probed a random name again (%d in all): %v", n, mx.Rcpts())
	}

	// all.test accepts everything: server 2 does not even ask.
	mx.Set(test.MXConfig{CatchAll: true})
	if res := a.v.Verify(ctx, "x@all.test"); res.Reason != callout.ReasonCatchAll {
		t.Fatalf("server 1, x@all.test: %s", res)
	}
	inRedis("~all.test")
	before := len(mx.Rcpts())
	if res := b.v.Verify(ctx, "y@all.test"); res.Status != callout.StatusUnknown || res.Reason != callout.ReasonCatchAll {
		t.Fatalf("server 2, y@all.test: %s", res)
	}
	if got := mx.Rcpts(); len(got) != before {
		t.Fatalf("server 2 probed a known catch-all: %v", got[before:])
	}

	// mx.shy.test refuses our MAIL FROM: server 2 leaves it alone.
	mx.Set(test.MXConfig{Mail: &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "no probes"}})
	if res := a.v.Verify(ctx, "x@shy.test"); res.Status != callout.StatusUnknown {
		t.Fatalf("server 1, x@shy.test: %s", res)
	}
	inRedis("!mx.shy.test")
	mails := len(mx.Mails())
	if res := b.v.Verify(ctx, "y@shy.test"); res.Reason != callout.ReasonRefusesProbes {
		t.Fatalf("server 2, y@shy.test: %s", res)
	}
	if len(mx.Mails()) != mails {
		t.Fatalf("server 2 tried a host that refused server 1: %v", mx.Mails())
	}

	// Redis down: a third server, with no fact of its own, still
	// verifies, on its own facts (one random-name probe of its own).
	mx.Set(test.MXConfig{Mailboxes: []string{"carol@good.test"}})
	c := newFleetVerifier(t, r, "facts:", dns.Addr, port, clock.Now, nil)
	r.Stop()
	start := time.Now()
	if res := c.v.Verify(ctx, "carol@good.test"); res.Status != callout.StatusValid {
		t.Fatalf("redis down, server 3, carol: %s", res)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("redis down: the verification took %s", d)
	}
	if n := randomNames(mx, "alice@good.test", "bob@good.test", "carol@good.test", "x@all.test") - 1; n != 2 { // one at all.test
		t.Fatalf("redis down: %d random-name probes at good.test in all, want 2: %v", n, mx.Rcpts())
	}
}

// Two servers together send an MX address, a domain, the world no more
// RCPTs or sessions a minute than the cap; with Redis down each server's
// own caps hold.
func TestClusterSharedCaps(t *testing.T) {
	for _, tc := range []struct {
		name string
		set  func(*callout.Config)
		addr func(i int) string
		sent func(mx *test.MX) int
	}{
		{"per_host_rcpt_rate", func(c *callout.Config) { c.PerHostRcptRate = 6 },
			func(i int) string { return fmt.Sprintf("u%d@d%d.test", i, i) }, func(mx *test.MX) int { return len(mx.Rcpts()) }},
		{"per_domain_rcpt_rate", func(c *callout.Config) { c.PerDomainRcptRate = 6 },
			func(i int) string { return fmt.Sprintf("u%d@d0.test", i) }, func(mx *test.MX) int { return len(mx.Rcpts()) }},
		{"session_rate", func(c *callout.Config) { c.SessionRate = 6 },
			func(i int) string { return fmt.Sprintf("u%d@d%d.test", i, i) }, func(mx *test.MX) int { return mx.Conns() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mx := test.StartMXAt(t, "127.0.0.2:0", test.MXConfig{})
			_, port, _ := net.SplitHostPort(mx.Addr)
			var zone strings.Builder
			for d := range 40 {
				fmt.Fprintf(&zone, "d%d.test. 300 IN MX 10 mx.test.\n", d)
			}
			zone.WriteString("mx.test. 300 IN A 127.0.0.2\n")
			dns := test.StartDNS(t, zone.String())
			r := test.StartRedis(t)
			clock := &test.Clock{}
			set := func(c *callout.Config) { c.CatchAllProbe = false; tc.set(c) }
			fleet := []fleetVerifier{newFleetVerifier(t, r, "caps:", dns.Addr, port, clock.Now, set),
				newFleetVerifier(t, r, "caps:", dns.Addr, port, clock.Now, set)}
			round := func(first int) (limited int) {
				var wg sync.WaitGroup
				var n atomic.Int32
				for i := range 20 {
					wg.Go(func() {
						res := fleet[i%2].v.Verify(context.Background(), tc.addr(first+i))
						switch {
						case res.Reason == callout.ReasonRateLimited && res.Status == callout.StatusUnknown:
							n.Add(1)
						case res.Status != callout.StatusInvalid:
							t.Errorf("%s: %s", tc.addr(first+i), res)
						}
					})
				}
				wg.Wait()
				return int(n.Load())
			}
			if l := round(0); tc.sent(mx) != 6 || l != 14 {
				t.Fatalf("two servers, cap 6 a minute: %d sent, %d rate-limited; want 6 and 14", tc.sent(mx), l)
			}
			clock.Add(61 * time.Second) // every window is empty again
			r.Stop()
			sent := tc.sent(mx)
			if l := round(20); tc.sent(mx)-sent != 12 || l != 8 {
				t.Fatalf("redis down: %d sent, %d rate-limited; want 6 per server and 8", tc.sent(mx)-sent, l)
			}
		})
	}
}
