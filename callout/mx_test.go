package callout

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/rcptguard/rcptguard/test"
)

// mxTestZone is the world the MX tests see. The SOA gives negative answers
// a TTL of 300s (its minimum field; its own TTL is 3600s).
const mxTestZone = `
example.com.            3600 IN SOA   ns.example.com. hostmaster.example.com. 1 7200 3600 1209600 300
example.com.            300  IN MX    20 mx2.example.com.
example.com.            300  IN MX    10 MX1.Example.com.
mx1.example.com.        300  IN A     192.0.2.1
mx1.example.com.        300  IN AAAA  2001:db8::1
mx1.example.com.        300  IN A     192.0.2.11
mx2.example.com.        600  IN A     192.0.2.2

equal.example.com.      300  IN MX    10 a.example.com.
equal.example.com.      300  IN MX    10 b.example.com.
equal.example.com.      300  IN MX    5  first.example.com.
equal.example.com.      300  IN MX    50 last.example.com.
a.example.com.          300  IN A     192.0.2.21
b.example.com.          300  IN A     192.0.2.22
first.example.com.      300  IN A     192.0.2.23
last.example.com.       300  IN A     192.0.2.24

dup.example.com.        300  IN MX    20 mx1.example.com.
dup.example.com.        300  IN MX    10 mx1.example.com.
dup.example.com.        300  IN MX    30 mx2.example.com.

null.example.com.       300  IN MX    0 .
nullmix.example.com.    300  IN MX    0 .
nullmix.example.com.    300  IN MX    10 mx2.example.com.

cname.example.com.      300  IN CNAME example.com.
mxcname.example.com.    300  IN MX    10 alias.example.com.
alias.example.com.      300  IN CNAME mx2.example.com.
loop.example.com.       300  IN CNAME loop2.example.com.
loop2.example.com.      300  IN CNAME loop.example.com.

implicit.example.com.   300  IN A     192.0.2.5
implicit.example.com.   300  IN AAAA  2001:db8::5
nomail.example.com.     300  IN TXT   "v=spf1 -all"
host.ent.example.com.   300  IN A     192.0.2.6

badhost.example.com.    300  IN MX    10 nxhost.example.com.
badhost.example.com.    300  IN MX    20 mx2.example.com.
noaddr.example.com.     300  IN MX    10 nomail.example.com.
allfail.example.com.    300  IN MX    10 sf1.example.com.
allfail.example.com.    300  IN MX    20 sf2.example.com.
sf1.example.com.        300  IN A     192.0.2.31
sf2.example.com.        300  IN A     192.0.2.32
`

// mxTestClock is a clock for the cache that only moves when told.
type mxTestClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *mxTestClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *mxTestClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// newMXTestResolver returns a Resolver asking s, on a clock of its own.
// edit may change the configuration first.
func newMXTestResolver(t testing.TB, s *test.DNSServer, edit func(*ResolverConfig)) (*Resolver, *mxTestClock) {
	t.Helper()
	clock := &mxTestClock{now: time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)}
	cfg := ResolverConfig{Servers: []string{s.Addr}, Timeout: time.Second, Now: clock.Now}
	if edit != nil {
		edit(&cfg)
	}
	r, err := NewResolver(cfg)
	if err != nil {
		t.Fatalf("NewResolver: %v", err)
	}
	return r, clock
}

// mxTestSummary formats hosts as "name/pref[ip ip]" for comparison.
func mxTestSummary(hosts []Host) string {
	var parts []string
	for _, h := range hosts {
		ips := make([]string, len(h.IPs))
		for i, ip := range h.IPs {
			ips[i] = ip.String()
		}
		s := fmt.Sprintf("%s/%d[%s]", h.Name, h.Pref, strings.Join(ips, " "))
		if h.Implicit {
			s += "implicit"
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, ", ")
}

func mustLookupMX(t *testing.T, r *Resolver, domain string) []Host {
	t.Helper()
	hosts, err := r.LookupMX(context.Background(), domain)
	if err != nil {
		t.Fatalf("LookupMX(%s): %v", domain, err)
	}
	return hosts
}

func TestLookupMX(t *testing.T) {
	s := test.StartDNS(t, mxTestZone)
	r, _ := newMXTestResolver(t, s, nil)
	tests := []struct {
		domain string
		want   string
	}{
		// Sorted by preference; names lower case; A before AAAA.
		{"example.com", "mx1.example.com/10[192.0.2.1 192.0.2.11 2001:db8::1], mx2.example.com/20[192.0.2.2]"},
		{"Example.COM.", "mx1.example.com/10[192.0.2.1 192.0.2.11 2001:db8::1], mx2.example.com/20[192.0.2.2]"},
		// A host named twice is kept once, at its best preference.
		{"dup.example.com", "mx1.example.com/10[192.0.2.1 192.0.2.11 2001:db8::1], mx2.example.com/30[192.0.2.2]"},
		// A null MX next to real ones is ignored.
		{"nullmix.example.com", "mx2.example.com/10[192.0.2.2]"},
		// A CNAME at the domain is followed.
		{"cname.example.com", "mx1.example.com/10[192.0.2.1 192.0.2.11 2001:db8::1], mx2.example.com/20[192.0.2.2]"},
		// A CNAME at the MX host name is followed; the host keeps its MX name.
		{"mxcname.example.com", "alias.example.com/10[192.0.2.2]"},
		// No MX: the domain's own addresses (RFC 5321 §5.1).
		{"implicit.example.com", "implicit.example.com/0[192.0.2.5 2001:db8::5]implicit"},
		// An MX host that does not exist stays, without addresses.
		{"badhost.example.com", "nxhost.example.com/10[], mx2.example.com/20[192.0.2.2]"},
		// So does an MX host without addresses.
		{"noaddr.example.com", "nomail.example.com/10[]"},
	}
	for _, tc := range tests {
		if got := mxTestSummary(mustLookupMX(t, r, tc.domain)); got != tc.want {
			t.Errorf("LookupMX(%s)\n got %s\nwant %s", tc.domain, got, tc.want)
		}
	}
}

func TestLookupMXErrors(t *testing.T) {
	s := test.StartDNS(t, mxTestZone)
	s.ServFail("sf1.example.com")
	s.ServFail("sf2.example.com")
	r, _ := newMXTestResolver(t, s, nil)
	tests := []struct {
		domain string
		want   error
	}{
		{"null.example.com", ErrNullMX},
		{"nope.example.com", ErrNXDomain},
		{"nomail.example.com", ErrNoMailHost},
		{"ent.example.com", ErrNoMailHost}, // empty non-terminal: exists, nothing there
		{"loop.example.com", ErrDNS},
		{"allfail.example.com", ErrDNS}, // every MX host's lookup failed
		{"a..example.com", ErrNXDomain}, // cannot exist
		{"", ErrNXDomain},
	}
	for _, tc := range tests {
		hosts, err := r.LookupMX(context.Background(), tc.domain)
		if !errors.Is(err, tc.want) {
			t.Errorf("LookupMX(%q) = %v, %v; want error %v", tc.domain, mxTestSummary(hosts), err, tc.want)
			continue
		}
		if tc.domain != "" && !strings.Contains(err.Error(), strings.Split(tc.domain, ".")[0]) {
			t.Errorf("LookupMX(%q): error %q does not name the domain", tc.domain, err)
		}
	}
}

func TestLookupMXCNAMEChainTooLong(t *testing.T) {
	var zone strings.Builder
	for i := range 10 {
		fmt.Fprintf(&zone, "c%d.example. 300 IN CNAME c%d.example.\n", i, i+1)
	}
	zone.WriteString("c10.example. 300 IN MX 10 mx.example.\nmx.example. 300 IN A 192.0.2.1\n")
	s := test.StartDNS(t, zone.String())
	r, _ := newMXTestResolver(t, s, nil)
	if _, err := r.LookupMX(context.Background(), "c0.example"); !errors.Is(err, ErrDNS) {
		t.Errorf("10 CNAMEs: err %v, want ErrDNS", err)
	}
	// 8 CNAMEs are fine.
	if got := mxTestSummary(mustLookupMX(t, r, "c2.example")); got != "mx.example/10[192.0.2.1]" {
		t.Errorf("8 CNAMEs: got %s", got)
	}
}

func TestLookupMXRandomAmongEqual(t *testing.T) {
	s := test.StartDNS(t, mxTestZone)
	r, _ := newMXTestResolver(t, s, nil)
	seen := make(map[string]int)
	for range 50 {
		hosts := mustLookupMX(t, r, "equal.example.com")
		var names []string
		for _, h := range hosts {
			names = append(names, h.Name)
		}
		seen[strings.Join(names, " ")]++
	}
	want := []string{
		"first.example.com a.example.com b.example.com last.example.com",
		"first.example.com b.example.com a.example.com last.example.com",
	}
	if len(seen) != 2 || seen[want[0]] == 0 || seen[want[1]] == 0 {
		t.Errorf("orders seen in 50 lookups: %v; want both of %q", seen, want)
	}
	// The shuffle is per call, also for cached answers: one MX query.
	if n := s.QueriesFor("equal.example.com", dns.TypeMX); n != 1 {
		t.Errorf("%d MX queries, want 1", n)
	}
}

func TestLookupMXServFailNotCached(t *testing.T) {
	s := test.StartDNS(t, mxTestZone)
	s.ServFail("example.com")
	r, _ := newMXTestResolver(t, s, nil)
	for i := range 2 {
		before := s.QueriesFor("example.com", dns.TypeMX)
		_, err := r.LookupMX(context.Background(), "example.com")
		if !errors.Is(err, ErrDNS) || !strings.Contains(err.Error(), "SERVFAIL") {
			t.Fatalf("lookup %d: err %v, want ErrDNS naming SERVFAIL", i, err)
		}
		if n := s.QueriesFor("example.com", dns.TypeMX) - before; n != 2 {
			t.Errorf("lookup %d: %d queries, want 2 (Attempts default, nothing cached)", i, n)
		}
	}
}

func TestLookupMXDropTimesOut(t *testing.T) {
	s := test.StartDNS(t, mxTestZone)
	s.Drop("example.com")
	const timeout = 200 * time.Millisecond
	r, _ := newMXTestResolver(t, s, func(c *ResolverConfig) { c.Timeout, c.Attempts = timeout, 1 })
	start := time.Now()
	_, err := r.LookupMX(context.Background(), "example.com")
	elapsed := time.Since(start)
	if !errors.Is(err, ErrDNS) {
		t.Fatalf("err %v, want ErrDNS", err)
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		t.Errorf("err %v wraps a context error; the caller's context was fine", err)
	}
	// Generous above: a loaded machine running -race is slow to wake up,
	// and the point is to stay well under the 2s default.
	if elapsed < timeout-20*time.Millisecond || elapsed > timeout+1500*time.Millisecond {
		t.Errorf("took %v, want about %v", elapsed, timeout)
	}
}

func TestLookupMXTruncatedRetriesTCP(t *testing.T) {
	s := test.StartDNS(t, mxTestZone)
	s.Truncate("example.com")
	r, _ := newMXTestResolver(t, s, nil)
	want := "mx1.example.com/10[192.0.2.1 192.0.2.11 2001:db8::1], mx2.example.com/20[192.0.2.2]"
	if got := mxTestSummary(mustLookupMX(t, r, "example.com")); got != want {
		t.Errorf("got %s, want %s", got, want)
	}
	if n := s.QueriesFor("example.com", dns.TypeMX); n != 2 {
		t.Errorf("%d MX queries, want 2 (UDP, then TCP)", n)
	}
}

func TestLookupMXCache(t *testing.T) {
	s := test.StartDNS(t, mxTestZone)
	r, clock := newMXTestResolver(t, s, nil)
	first := mustLookupMX(t, r, "example.com")
	want := mxTestSummary(first)
	queries := s.Queries()

	// The caller owns the slices.
	first[0].IPs[0] = netip.MustParseAddr("203.0.113.1")
	first[0], first[1] = first[1], first[0]

	if got := mxTestSummary(mustLookupMX(t, r, "example.com")); got != want {
		t.Errorf("cached lookup: got %s, want %s", got, want)
	}
	if n := s.Queries(); n != queries {
		t.Errorf("cached lookup made %d queries", n-queries)
	}

	// The MX and mx1 records have a TTL of 300s, mx2's A 600s.
	clock.Advance(299 * time.Second)
	mustLookupMX(t, r, "example.com")
	if n := s.Queries(); n != queries {
		t.Errorf("after 299s: %d queries, want none", n-queries)
	}
	clock.Advance(2 * time.Second)
	mustLookupMX(t, r, "example.com")
	if n := s.QueriesFor("example.com", dns.TypeMX); n != 2 {
		t.Errorf("after 301s: %d MX queries in all, want 2", n)
	}
	if n := s.QueriesFor("mx1.example.com", dns.TypeA); n != 2 {
		t.Errorf("after 301s: %d A queries for mx1 in all, want 2", n)
	}
	if n := s.QueriesFor("mx2.example.com", dns.TypeA); n != 1 {
		t.Errorf("after 301s: %d A queries for mx2 in all, want 1 (TTL 600s)", n)
	}

	// A changed zone shows once the TTL has passed.
	s.Set(strings.Replace(mxTestZone, "192.0.2.2\n", "192.0.2.99\n", 1))
	clock.Advance(600 * time.Second)
	if got := mxTestSummary(mustLookupMX(t, r, "example.com")); !strings.Contains(got, "192.0.2.99") {
		t.Errorf("after the change: got %s", got)
	}
}

func TestLookupMXNegativeCache(t *testing.T) {
	s := test.StartDNS(t, mxTestZone)
	r, clock := newMXTestResolver(t, s, nil)
	for _, tc := range []struct {
		domain string
		want   error
	}{
		{"nope.example.com", ErrNXDomain},
		{"nomail.example.com", ErrNoMailHost},
	} {
		lookup := func(when string) {
			t.Helper()
			if _, err := r.LookupMX(context.Background(), tc.domain); !errors.Is(err, tc.want) {
				t.Fatalf("%s %s: err %v, want %v", tc.domain, when, err, tc.want)
			}
		}
		lookup("first")
		queries := s.Queries()
		clock.Advance(299 * time.Second) // SOA minimum 300s, SOA TTL 3600s
		lookup("after 299s")
		if n := s.Queries() - queries; n != 0 {
			t.Errorf("%s after 299s: %d queries, want none", tc.domain, n)
		}
		clock.Advance(2 * time.Second)
		lookup("after 301s")
		if n := s.QueriesFor(tc.domain, dns.TypeMX); n != 2 {
			t.Errorf("%s after 301s: %d MX queries in all, want 2", tc.domain, n)
		}
	}
}

func TestLookupMXNegativeCacheWithoutSOA(t *testing.T) {
	s := test.StartDNS(t, "a.example. 300 IN A 192.0.2.1")
	r, clock := newMXTestResolver(t, s, nil)
	for _, advance := range []time.Duration{0, 59 * time.Second, 2 * time.Second} {
		clock.Advance(advance)
		if _, err := r.LookupMX(context.Background(), "b.example"); !errors.Is(err, ErrNXDomain) {
			t.Fatalf("err %v, want ErrNXDomain", err)
		}
	}
	if n := s.Queries(); n != 2 {
		t.Errorf("%d queries, want 2: cached 60s without an SOA", n)
	}
}

func TestLookupMXTTLClamp(t *testing.T) {
	s := test.StartDNS(t, "a.example. 0 IN MX 10 b.example.\nb.example. 999999 IN A 192.0.2.1")
	r, clock := newMXTestResolver(t, s, func(c *ResolverConfig) { c.MinTTL, c.MaxTTL = 10*time.Second, time.Minute })
	mustLookupMX(t, r, "a.example")
	clock.Advance(9 * time.Second)
	mustLookupMX(t, r, "a.example")
	if n := s.QueriesFor("a.example", dns.TypeMX); n != 1 {
		t.Errorf("TTL 0 cached for MinTTL: %d MX queries, want 1", n)
	}
	clock.Advance(52 * time.Second)
	mustLookupMX(t, r, "a.example")
	if n := s.QueriesFor("b.example", dns.TypeA); n != 2 {
		t.Errorf("huge TTL cut to MaxTTL: %d A queries, want 2", n)
	}
}

func TestLookupMXCacheDisabled(t *testing.T) {
	s := test.StartDNS(t, mxTestZone)
	r, _ := newMXTestResolver(t, s, func(c *ResolverConfig) { c.MaxCacheEntries = -1 })
	mustLookupMX(t, r, "example.com")
	mustLookupMX(t, r, "example.com")
	if n := s.QueriesFor("example.com", dns.TypeMX); n != 2 {
		t.Errorf("%d MX queries, want 2 without a cache", n)
	}
}

func TestResolverCacheBound(t *testing.T) {
	s := test.StartDNS(t, mxTestZone)
	r, _ := newMXTestResolver(t, s, func(c *ResolverConfig) { c.MaxCacheEntries = 3 })
	for _, d := range []string{"example.com", "equal.example.com", "implicit.example.com", "nope.example.com"} {
		if _, err := r.LookupMX(context.Background(), d); err != nil && !errors.Is(err, ErrNXDomain) {
			t.Fatalf("LookupMX(%s): %v", d, err)
		}
		n := r.answers.len()
		if n > 3 {
			t.Fatalf("after %s: %d cached answers, want at most 3", d, n)
		}
	}
}

func TestLookupMXContext(t *testing.T) {
	s := test.StartDNS(t, mxTestZone)
	s.Drop("example.com")
	r, _ := newMXTestResolver(t, s, func(c *ResolverConfig) { c.Timeout = 5 * time.Second })

	// Cancelled while waiting for an answer: the error wraps ErrDNS and
	// context.Canceled.
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	start := time.Now()
	_, err := r.LookupMX(ctx, "example.com")
	if !errors.Is(err, ErrDNS) || !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: err %v, want ErrDNS and context.Canceled", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("cancelled: returned after %v", d)
	}

	// A deadline shorter than Timeout bounds the attempt.
	ctx, cancel = context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start = time.Now()
	_, err = r.LookupMX(ctx, "example.com")
	if !errors.Is(err, ErrDNS) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("deadline: err %v, want ErrDNS and context.DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("deadline: returned after %v", d)
	}

	// Already cancelled: no query at all.
	ctx, cancel = context.WithCancel(context.Background())
	cancel()
	queries := s.Queries()
	if _, err := r.LookupMX(ctx, "mx1.example.com"); !errors.Is(err, ErrDNS) || !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled before: err %v, want ErrDNS and context.Canceled", err)
	}
	if n := s.Queries() - queries; n != 0 {
		t.Errorf("cancelled before: %d queries", n)
	}
}

func TestLookupMXConcurrent(t *testing.T) {
	s := test.StartDNS(t, mxTestZone)
	r, clock := newMXTestResolver(t, s, func(c *ResolverConfig) { c.MaxCacheEntries = 8 })
	domains := []string{"example.com", "equal.example.com", "dup.example.com", "implicit.example.com", "badhost.example.com"}
	var wg sync.WaitGroup
	for g := range 16 {
		wg.Go(func() {
			for i := range 20 {
				d := domains[(g+i)%len(domains)]
				hosts, err := r.LookupMX(context.Background(), d)
				if err != nil || len(hosts) == 0 {
					t.Errorf("LookupMX(%s) = %v, %v", d, hosts, err)
					return
				}
				if i%7 == 0 {
					clock.Advance(100 * time.Second)
				}
			}
		})
	}
	wg.Wait()
}

func TestResolverSecondServer(t *testing.T) {
	s := test.StartDNS(t, mxTestZone)
	// A UDP port on loopback with nobody listening: the kernel refuses.
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := pc.LocalAddr().String()
	pc.Close()

	r, _ := newMXTestResolver(t, s, func(c *ResolverConfig) {
		c.Servers, c.Attempts, c.Timeout = []string{dead, s.Addr}, 1, 300*time.Millisecond
	})
	if got := mxTestSummary(mustLookupMX(t, r, "example.com")); !strings.HasPrefix(got, "mx1.example.com/10") {
		t.Errorf("got %s", got)
	}

	// Only dead servers: the error names the last one.
	r, _ = newMXTestResolver(t, s, func(c *ResolverConfig) { c.Servers, c.Timeout = []string{dead}, 300*time.Millisecond })
	_, err = r.LookupMX(context.Background(), "example.com")
	if !errors.Is(err, ErrDNS) || !strings.Contains(err.Error(), dead) {
		t.Errorf("dead server: err %v, want ErrDNS naming %s", err, dead)
	}
}

func TestLookupIP(t *testing.T) {
	s := test.StartDNS(t, mxTestZone)
	r, _ := newMXTestResolver(t, s, nil)
	tests := []struct {
		host    string
		want    string
		wantErr error
	}{
		{"mx1.example.com", "[192.0.2.1 192.0.2.11 2001:db8::1]", nil},
		{"alias.example.com", "[192.0.2.2]", nil}, // via CNAME
		{"nomail.example.com", "[]", nil},         // exists, no address
		{"nxhost.example.com", "[]", ErrNXDomain},
		{"loop.example.com", "[]", ErrDNS},
	}
	for _, tc := range tests {
		ips, err := r.LookupIP(context.Background(), tc.host)
		if got := fmt.Sprint(ips); got != tc.want || !errors.Is(err, tc.wantErr) {
			t.Errorf("LookupIP(%s) = %s, %v; want %s, %v", tc.host, got, err, tc.want, tc.wantErr)
		}
	}
	// The CNAME chain of alias ends at mx2 without AAAA records: the
	// target itself is asked.
	if n := s.QueriesFor("mx2.example.com", dns.TypeAAAA); n != 1 {
		t.Errorf("%d AAAA queries for the CNAME target, want 1", n)
	}
}

func TestLookupIPServFail(t *testing.T) {
	s := test.StartDNS(t, mxTestZone)
	s.ServFail("mx1.example.com")
	r, _ := newMXTestResolver(t, s, nil)
	ips, err := r.LookupIP(context.Background(), "mx1.example.com")
	if !errors.Is(err, ErrDNS) || len(ips) != 0 {
		t.Errorf("SERVFAIL: %v, %v; want ErrDNS", ips, err)
	}
}

func TestMXMergeIPs(t *testing.T) {
	v4 := mxAnswer{ips: []netip.Addr{netip.MustParseAddr("192.0.2.1")}}
	v6 := mxAnswer{ips: []netip.Addr{netip.MustParseAddr("2001:db8::1")}}
	nx := mxAnswer{nx: true}
	errDNS := fmt.Errorf("%w: test", ErrDNS)
	tests := []struct {
		v4, v6     mxAnswer
		err4, err6 error
		want       string
		wantErr    error
	}{
		{v4, v6, nil, nil, "[192.0.2.1 2001:db8::1]", nil},
		{v4, mxAnswer{}, nil, errDNS, "[192.0.2.1]", nil}, // one family failing is no error
		{mxAnswer{}, v6, errDNS, nil, "[2001:db8::1]", nil},
		{mxAnswer{}, mxAnswer{}, errDNS, nil, "[]", ErrDNS},
		{mxAnswer{}, mxAnswer{}, nil, errDNS, "[]", ErrDNS},
		{nx, nx, nil, nil, "[]", ErrNXDomain},
		{nx, mxAnswer{}, nil, errDNS, "[]", ErrDNS},
		{mxAnswer{}, mxAnswer{}, nil, nil, "[]", nil},
	}
	for i, tc := range tests {
		ips, err := mxMergeIPs("h.example.", tc.v4, tc.err4, tc.v6, tc.err6)
		if got := fmt.Sprint(ips); got != tc.want || !errors.Is(err, tc.wantErr) {
			t.Errorf("case %d: got %s, %v; want %s, %v", i, got, err, tc.want, tc.wantErr)
		}
	}
	// The result is a new slice.
	ips, _ := mxMergeIPs("h.example.", v4, nil, mxAnswer{}, nil)
	ips[0] = netip.Addr{}
	if !v4.ips[0].IsValid() {
		t.Error("mxMergeIPs returned the cached slice")
	}
}

func TestNewResolver(t *testing.T) {
	good := []struct {
		servers []string
		want    []string
	}{
		{[]string{"127.0.0.1:5353"}, []string{"127.0.0.1:5353"}},
		{[]string{"192.0.2.53", "::1"}, []string{"192.0.2.53:53", "[::1]:53"}},
		{[]string{"[::1]:53", "dns.example:53"}, []string{"[::1]:53", "dns.example:53"}},
	}
	for _, tc := range good {
		r, err := NewResolver(ResolverConfig{Servers: tc.servers})
		if err != nil {
			t.Errorf("NewResolver(%v): %v", tc.servers, err)
			continue
		}
		if !slices.Equal(r.servers, tc.want) {
			t.Errorf("NewResolver(%v): servers %v, want %v", tc.servers, r.servers, tc.want)
		}
		if r.timeout != 2*time.Second || r.attempts != 2 || r.answers == nil || r.answers.max != 10000 || r.minTTL != 5*time.Second || r.maxTTL != time.Hour {
			t.Errorf("defaults: %+v", r)
		}
	}
	bad := []ResolverConfig{
		{Servers: []string{"dns.example"}},
		{Servers: []string{"127.0.0.1:0"}},
		{Servers: []string{":53"}},
		{Servers: []string{"127.0.0.1:99999"}},
		{Servers: []string{"127.0.0.1:53"}, Timeout: -time.Second},
		{Servers: []string{"127.0.0.1:53"}, Attempts: -1},
		{Servers: []string{"127.0.0.1:53"}, MinTTL: 2 * time.Hour},
	}
	for _, cfg := range bad {
		if _, err := NewResolver(cfg); err == nil {
			t.Errorf("NewResolver(%+v) succeeded, want an error", cfg)
		}
	}
}

func BenchmarkLookupMXCached(b *testing.B) {
	s := test.StartDNS(b, mxTestZone)
	r, _ := newMXTestResolver(b, s, nil)
	ctx := context.Background()
	if _, err := r.LookupMX(ctx, "example.com"); err != nil {
		b.Fatal(err)
	}
	queries := s.Queries()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := r.LookupMX(ctx, "example.com"); err != nil {
			b.Fatal(err)
		}
	}
	if s.Queries() != queries {
		b.Fatal("the benchmark made queries")
	}
}
