package callout

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/test"
)

// verifyAll verifies addrs concurrently, as requests from many identities
// arrive, and returns how many were rate-limited; every other verdict must
// be want.
func verifyAll(t *testing.T, v *Verifier, addrs []string, want Status) int {
	t.Helper()
	var limited atomic.Int32
	var wg sync.WaitGroup
	for _, a := range addrs {
		wg.Go(func() {
			res := v.Verify(context.Background(), a)
			switch {
			case res.Reason == ReasonRateLimited:
				if res.Status != StatusUnknown {
					t.Errorf("%s: %s", a, res)
				}
				limited.Add(1)
			case res.Status != want:
				t.Errorf("%s: %s, want %s", a, res, want)
			}
		})
	}
	wg.Wait()
	return int(limited.Load())
}

// TestCapsByMXAddress: a hundred domains whose MX names differ but resolve
// to one address get, together, no more connections and RCPTs in any
// minute than that address's caps; the window slides rather than
// restarting on the minute.
func TestCapsByMXAddress(t *testing.T) {
	var zone strings.Builder
	var addrs []string
	for d := range 101 {
		fmt.Fprintf(&zone, "d%d.test. 300 IN MX 10 mx.d%d.test.\nmx.d%d.test. 300 IN A 127.0.0.2\n", d, d, d)
		if d < 100 { // d100 is kept for the late recipient below
			addrs = append(addrs, fmt.Sprintf("u@d%d.test", d))
		}
	}
	mx := test.StartMX(t, test.MXConfig{})
	var logs bytes.Buffer
	r := newRig(t, zone.String(), route("127.0.0.2", mx), func(c *Config) {
		c.PerHostRate, c.PerHostRcptRate = 10, 20
		// No session lingers: the late recipient below must ask for a
		// new connection, not slip into one still open on a slow run.
		c.SessionIdle = -1
		c.Logger = slog.New(slog.NewTextHandler(&syncWriter{w: &logs}, nil))
	})
	limited := verifyAll(t, r.v, addrs, StatusInvalid)
	if c, n := mx.Conns(), len(mx.Rcpts()); c > 10 || n > 20 {
		t.Fatalf("%d connections and %d RCPTs to one address, caps 10 and 20 a minute", c, n)
	}
	if limited < 80 || r.v.Stats().RateLimited != uint64(limited) {
		t.Fatalf("%d rate-limited (Stats %+v), want at least 80", limited, r.v.Stats())
	}
	if n := strings.Count(logs.String(), "callout cap reached"); n != 1 {
		t.Errorf("%d cap log lines within 10s, want 1:\n%s", n, logs.String())
	}
	// Half a minute later the same events are still in the window. The
	// late recipient is at a domain the burst did not ask: a burst domain's
	// session may still be open, its random-name RCPT not yet sent, and a
	// recipient joining it would rightly take that last RCPT of the cap.
	conns := mx.Conns()
	r.clock.Advance(30 * time.Second)
	if res := r.verify("late@d100.test"); res.Reason != ReasonRateLimited {
		t.Fatalf("30s later: %s, want rate-limited", res)
	}
	if mx.Conns() != conns {
		t.Fatal("a connection past the cap")
	}
	r.clock.Advance(31 * time.Second)
	if res := r.verify("later@d1.test"); res.Status != StatusInvalid {
		t.Fatalf("61s later: %s, want a real verdict", res)
	}
}

// TestCapsPerDomainRcpts: recipients of one domain, however many asked and
// by whom, get no more RCPTs in a minute than the domain's cap, the
// random-name probe included.
func TestCapsPerDomainRcpts(t *testing.T) {
	mx := test.StartMX(t, test.MXConfig{})
	r := newRig(t, zoneOneMX, route("127.0.0.2", mx), func(c *Config) { c.PerDomainRcptRate = 15 })
	var addrs []string
	for i := range 60 {
		addrs = append(addrs, fmt.Sprintf("u%d@example.test", i))
	}
	limited := verifyAll(t, r.v, addrs, StatusInvalid)
	if n := len(mx.Rcpts()); n > 15 || limited != 60-n {
		t.Fatalf("%d RCPTs at one domain with a cap of 15 a minute, %d rate-limited", n, limited)
	}
}

// TestCapsGlobalSessions: the budget of new sessions holds across domains
// and addresses.
func TestCapsGlobalSessions(t *testing.T) {
	var zone strings.Builder
	routes := test.RouteDialer{}
	mx := test.StartMX(t, test.MXConfig{})
	var addrs []string
	for d := range 10 {
		ip := fmt.Sprintf("127.0.2.%d", d+1)
		fmt.Fprintf(&zone, "g%d.test. 300 IN MX 10 mx.g%d.test.\nmx.g%d.test. 300 IN A %s\n", d, d, d, ip)
		routes[ip] = mx.Addr
		addrs = append(addrs, fmt.Sprintf("u@g%d.test", d))
	}
	r := newRig(t, zone.String(), routes, func(c *Config) { c.SessionRate = 3 })
	limited := verifyAll(t, r.v, addrs, StatusInvalid)
	if c := mx.Conns(); c > 3 || limited != 10-c {
		t.Fatalf("%d sessions with a budget of 3 a minute, %d rate-limited", c, limited)
	}
}
