package detector

import (
	"bytes"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/rcptguard/rcptguard/callout"
)

func invalidFor(rcpt string) *callout.Result {
	return &callout.Result{Address: rcpt, Status: callout.StatusInvalid, Reason: callout.ReasonNoMailbox}
}

// ceilingLimiter returns a limiter with a ceiling of max identities, its
// metrics and what it logs.
func ceilingLimiter(t *testing.T, max int) (*Limiter, *Metrics, *bytes.Buffer) {
	t.Helper()
	var buf bytes.Buffer
	m := NewMetrics(prometheus.NewRegistry())
	l := NewLimiter(time.Hour)
	l.setMaxIdentities(max, slog.New(slog.NewTextHandler(&buf, nil)), m)
	return l, m, &buf
}

// tracked reports whether the limiter holds state for id.
func (l *Limiter) tracked(id string) bool {
	s := l.shard(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.m[id] != nil
}

// TestCeilingDropsLeastRecentlyActive: past the ceiling, each shard keeps
// its most recently active identities, the total stays at the ceiling, and
// every drop is counted and logged (once a minute, with the count).
func TestCeilingDropsLeastRecentlyActive(t *testing.T) {
	const max = 64 * 40
	l, m, logs := ceilingLimiter(t, max)
	const n = 4 * max
	at := func(i int) time.Time { return t0.Add(time.Duration(i) * time.Second) }
	for i := range n {
		l.Add("user"+strconv.Itoa(i), "rcpt", at(i))
		if got := l.Len(); got > max {
			t.Fatalf("after %d identities: %d tracked, ceiling %d", i+1, got, max)
		}
	}
	// Within each shard, every identity kept was active after every one
	// dropped.
	minKept, maxDropped := map[*limiterShard]int{}, map[*limiterShard]int{}
	kept := 0
	for i := n - 1; i >= 0; i-- {
		id := "user" + strconv.Itoa(i)
		if l.tracked(id) {
			kept++
			minKept[l.shard(id)] = i
		} else if _, ok := maxDropped[l.shard(id)]; !ok {
			maxDropped[l.shard(id)] = i
		}
	}
	for s, d := range maxDropped {
		if k, ok := minKept[s]; !ok || d > k {
			t.Fatalf("a shard dropped identity %d and kept an older one, %d", d, k)
		}
	}
	dropped := n - kept
	if kept < max*3/4 {
		t.Fatalf("%d kept of a ceiling of %d: drops far more than needed", kept, max)
	}
	if got := testutil.ToFloat64(m.identitiesDropped); got != float64(dropped) {
		t.Fatalf("dropped metric %v, want %d", got, dropped)
	}
	// At most one line a minute, each with the count since the last one;
	// the first sweep a minute after the last drop tells the rest.
	l.Sweep(at(n).Add(time.Minute))
	lines := strings.Count(logs.String(), "dropped the least recently active")
	if span := n / 60; lines == 0 || lines > span+2 {
		t.Fatalf("%d log lines over %d minutes", lines, span)
	}
	if got := logDropCount(t, logs.String()); got != int64(dropped) {
		t.Fatalf("log lines tell %d dropped, metric %d", got, dropped)
	}
	if l.Dropped() != 0 {
		t.Fatalf("%d dropped left untold after the sweep", l.Dropped())
	}
	// The count the ceiling is checked against follows drops, sweeps and
	// forgets.
	l.Forget("user" + strconv.Itoa(n-1))
	l.Forget("nobody")
	if got := l.n.Load(); got != int64(l.Len()) {
		t.Fatalf("count %d, tracked %d", got, l.Len())
	}
	l.Sweep(at(n).Add(2 * time.Hour))
	if got := l.n.Load(); got != 0 || l.Len() != 0 {
		t.Fatalf("count %d, tracked %d after all expired", got, l.Len())
	}
}

// logDropCount sums the dropped= of the log lines in s.
func logDropCount(t *testing.T, s string) int64 {
	t.Helper()
	var sum int64
	for _, part := range strings.Split(s, "dropped=")[1:] {
		n, err := strconv.ParseInt(strings.Fields(part)[0], 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		sum += n
	}
	return sum
}

// TestCeilingKeepsBlockedAndInFlight: the oldest identities are blocked,
// hold a reservation or have a request waiting: a flood of ten times the
// ceiling of newer identities drops none of them, and the reserved
// verdict that takes an identity to limit+1 is still the one that acts.
func TestCeilingKeepsBlockedAndInFlight(t *testing.T) {
	const max = 64 * 8
	l, _, _ := ceilingLimiter(t, max)
	lim := Thresholds{Count: 2, Act: ModeEnforce}
	// Blocked: three invalid recipients, limit 2.
	for i, r := range []string{"a", "b", "c"} {
		st := l.judge("blocked@x", invalidFor(r), t0, lim)
		if st.First != (i == 2) {
			t.Fatalf("blocked@x verdict %d: First %v", i, st.First)
		}
	}
	// In flight: two invalid recipients, then a reservation for a third.
	l.judge("inflight@x", invalidFor("a"), t0, lim)
	l.judge("inflight@x", invalidFor("b"), t0, lim)
	if st := l.Reserve("inflight@x", t0, lim); st.Safe {
		t.Fatal("reservation at the limit reported safe")
	}
	// Waiting.
	l.judge("waiting@x", invalidFor("a"), t0, lim)
	l.changed("waiting@x")
	// Blocked by the file: only the queue IDs of its held mail are known.
	l.Note("held@x", t0, func(e *evidence) { e.addQueueID("4F2A1C0E3B") })

	for i := range 10 * max {
		l.Add("flood"+strconv.Itoa(i), "r", t0.Add(time.Duration(i+1)*time.Millisecond))
	}
	if got := l.Len(); got > max+4 {
		t.Fatalf("%d tracked, ceiling %d and 4 kept", got, max)
	}
	for _, id := range []string{"blocked@x", "inflight@x", "waiting@x", "held@x"} {
		if !l.tracked(id) {
			t.Fatalf("%s was dropped", id)
		}
	}
	if ev := l.Evidence("held@x"); len(ev.QueueIDs) != 1 {
		t.Fatalf("held@x evidence %+v", ev)
	}
	now := t0.Add(time.Hour / 2)
	st := l.settle("inflight@x", invalidFor("c"), now, lim)
	if st.Count != 3 || st.Crossed != TriggerCount || !st.First {
		t.Fatalf("the reserved verdict at limit+1: %+v, want count 3, crossed, first", st)
	}
	if st := l.judge("blocked@x", invalidFor("d"), now, lim); st.First {
		t.Fatal("blocked@x acted on its crossing twice")
	}
	// Once settled and no longer waited on, they are droppable again.
	l.unwait("waiting@x")
	for i := range 2 * max {
		l.Add("later"+strconv.Itoa(i), "r", now.Add(time.Duration(i+1)*time.Millisecond))
	}
	if l.tracked("waiting@x") {
		t.Fatal("waiting@x kept once nothing waits on it")
	}
	if !l.tracked("inflight@x") || !l.tracked("blocked@x") {
		t.Fatal("a blocked identity was dropped")
	}
}

// TestCeilingAllPinned: a shard whose identities can none be dropped
// takes new ones (nothing is dropped that must stay) without scanning for
// each.
func TestCeilingAllPinned(t *testing.T) {
	l, m, _ := ceilingLimiter(t, 64)
	lim := Thresholds{Count: 100}
	for i := range 64 * 10 {
		l.Reserve("p"+strconv.Itoa(i), t0, lim)
	}
	if got := l.Len(); got != 640 {
		t.Fatalf("%d tracked, want all 640 in flight", got)
	}
	if got := testutil.ToFloat64(m.identitiesDropped); got != 0 {
		t.Fatalf("%v dropped", got)
	}
}

// BenchmarkLimiterAtCeiling is the cost of a new identity when the
// limiter is full: amortized, a batch drop per 1/32 of a shard.
var ceilingBench = 100_000

func BenchmarkLimiterAtCeiling(b *testing.B) {
	l := NewLimiter(time.Hour)
	l.setMaxIdentities(ceilingBench, nil, nil)
	ids := make([]string, 1<<20)
	for i := range ids {
		ids[i] = "user" + strconv.Itoa(i) + "@example.com"
	}
	for i := range 100_000 {
		l.Add(ids[i], "r", t0.Add(time.Duration(i)))
	}
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		l.Add(ids[i%len(ids)], "r", t0.Add(time.Duration(100_000+i)))
	}
}

func TestNthSmallest(t *testing.T) {
	for _, a := range [][]int64{{5}, {3, 1, 2}, {1, 1, 1, 1}, {9, 8, 7, 6, 5, 4, 3, 2, 1, 0}, {2, 7, 2, 7, 2, 7, 1, 8}} {
		for k := range a {
			sorted := slices.Clone(a)
			slices.Sort(sorted)
			if got := nthSmallest(slices.Clone(a), k); got != sorted[k] {
				t.Fatalf("nthSmallest(%v, %d) = %d, want %d", a, k, got, sorted[k])
			}
		}
	}
}

func TestStandingGathers(t *testing.T) {
	lim := Thresholds{Count: 100, Long: 300, Ratio: 0.5, RatioMin: 30, Act: ModeEnforce}
	tests := []struct {
		name string
		st   Standing
		lim  Thresholds
		warn int
		want bool
	}{
		{"far from every limit", Standing{Count: 1, Long: 1, Invalid: 1}, lim, 75, false},
		{"the count 21 short of the limit", Standing{Count: 80, Long: 80, Invalid: 1}, lim, 0, false},
		{"the count 20 short", Standing{Count: 81, Long: 81, Invalid: 1}, lim, 0, true},
		{"near the warning", Standing{Count: 56, Long: 56, Invalid: 1}, lim, 75, true},
		{"the warning 21 away", Standing{Count: 54, Long: 54, Invalid: 1}, lim, 75, false},
		{"near the long limit", Standing{Count: 5, Long: 290, Invalid: 1}, lim, 0, true},
		{"near ratio_min", Standing{Count: 10, Long: 10, Invalid: 10}, lim, 0, true},
		{"ratio off", Standing{Count: 10, Long: 10, Invalid: 10}, Thresholds{Count: 100}, 0, false},
		{"crossed", Standing{Count: 1, Crossed: TriggerCount}, lim, 0, true},
		{"unlimited identity", Standing{Count: 5000, Long: 5000, Invalid: 5000}, Thresholds{}, 0, false},
		{"small per-identity limit", Standing{Count: 1, Long: 1, Invalid: 1}, Thresholds{Count: 5}, 4, true},
	}
	for _, tt := range tests {
		if got := tt.st.gathers(tt.lim, tt.warn); got != tt.want {
			t.Errorf("%s: Gathers %v, want %v", tt.name, got, tt.want)
		}
	}
}

// TestReportEvidenceNearTheLimit: an identity far from its limits keeps
// no evidence, and the reports of its warning and block still have the
// maxRecipients most recent recipients and their clients: for the count
// trigger (warning at 75, block at 101) and the ratio (block at 30).
func TestReportEvidenceNearTheLimit(t *testing.T) {
	for _, tc := range []struct {
		name  string
		cfg   Config
		kinds []EventKind
		count int
		first int // the first request whose evidence is kept: 21 before the warning, or ratio_min
	}{
		{"count", Config{Limit: 100, WarnAt: 0.75, LongPeriod: 24 * time.Hour}, []EventKind{EventWarning, EventBlock}, 101, 55},
		{"ratio", Config{Limit: 100, WarnAt: 0.75, Ratio: 0.5, RatioMin: 30, LongPeriod: 24 * time.Hour}, []EventKind{EventBlock}, 30, 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, tc.cfg)
			id := "spammer@customer.example"
			for i := range tc.count {
				r := rcptRequest(id, "nobody"+strconv.Itoa(i)+"@elsewhere.example")
				r.ClientAddress = "198.51.100." + strconv.Itoa(i+1)
				h.ask(r)
				if i == 0 {
					if ev := h.d.Limiter().Evidence(id); len(ev.Recipients)+len(ev.Clients) != 0 {
						t.Fatalf("evidence far from the limits: %+v", ev)
					}
				}
			}
			if !slices.Equal(h.n.kinds(), tc.kinds) {
				t.Fatalf("events %v, want %v", h.n.kinds(), tc.kinds)
			}
			for _, ev := range h.n.events {
				rs, cs := ev.Evidence.Recipients, ev.Evidence.Clients
				if len(rs) != maxRecipients || len(cs) != maxRecipients {
					t.Fatalf("%s report: %d recipients, %d clients, want %d", ev.Kind, len(rs), len(cs), maxRecipients)
				}
				for j := range rs {
					n := ev.Count - maxRecipients + j // the recipient sent at this count
					if want := "nobody" + strconv.Itoa(n) + "@elsewhere.example"; rs[j].Address != want {
						t.Fatalf("%s report: recipient %d is %s, want %s", ev.Kind, j, rs[j].Address, want)
					}
				}
				// The clients are the first maxClients of the requests
				// near a limit.
				for j, c := range cs {
					if n, _ := strconv.Atoi(strings.TrimPrefix(c.Address, "198.51.100.")); n != tc.first+j {
						t.Fatalf("%s report at %d: client %s", ev.Kind, ev.Count, c.Address)
					}
				}
			}
		})
	}
}

// TestDetectorMaxIdentities: Config.MaxIdentities reaches the limiter,
// with the detector's logger and metrics, and a reload changes it.
func TestDetectorMaxIdentities(t *testing.T) {
	var logs bytes.Buffer
	m := NewMetrics(prometheus.NewRegistry())
	cfg := Config{Limit: 100, MaxIdentities: 640, Logger: slog.New(slog.NewTextHandler(&logs, nil)), Metrics: m}
	h := newHarness(t, cfg)
	for i := range 1280 {
		h.ask(rcptRequest("user"+strconv.Itoa(i)+"@customer.example", "nobody@elsewhere.example"))
	}
	if got := h.d.Limiter().Len(); got > 640 || got < 600 {
		t.Fatalf("%d tracked, ceiling 640", got)
	}
	if got := testutil.ToFloat64(m.identitiesDropped); got < 640 {
		t.Fatalf("%v dropped", got)
	}
	if !strings.Contains(logs.String(), "detector.max_identities") {
		t.Fatalf("no log line:\n%s", logs.String())
	}
	cfg.MaxIdentities = 2000
	if err := h.d.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	for i := range 1280 {
		h.ask(rcptRequest("later"+strconv.Itoa(i)+"@customer.example", "nobody@elsewhere.example"))
	}
	if got := h.d.Limiter().Len(); got <= 1280 || got > 2000 {
		t.Fatalf("%d tracked after raising the ceiling to 2000", got)
	}
	cfg.Verifier, cfg.Blocklist, cfg.MaxIdentities = h.v, h.bl, -1
	if _, err := New(cfg); err == nil || !strings.Contains(err.Error(), "max identities") {
		t.Fatalf("a negative ceiling: %v", err)
	}
}

// TestSweepForgetsIdleBlocked: an identity blocked in memory and idle for
// a period with nothing left in its windows is forgotten by the sweep (the
// blocklist keeps the block), and one with hits left keeps its block mark,
// so its crossing is not acted on twice.
func TestSweepForgetsIdleBlocked(t *testing.T) {
	l := newLimiter(time.Hour, 24*time.Hour)
	lim := Thresholds{Count: 1, Act: ModeEnforce}
	for _, id := range []string{"idle@x", "hits@x"} {
		l.judge(id, invalidFor("a"), t0, lim)
		if st := l.judge(id, invalidFor("b"), t0, lim); !st.First {
			t.Fatalf("%s: no crossing", id)
		}
	}
	l.Warn("idle@x", t0)
	later := t0.Add(23 * time.Hour)
	l.judge("hits@x", invalidFor("c"), later, lim) // keeps hits in the long window
	l.Sweep(later.Add(2 * time.Hour))
	if l.tracked("idle@x") {
		t.Fatal("idle@x, blocked and idle for a day, still tracked")
	}
	if !l.tracked("hits@x") {
		t.Fatal("hits@x dropped with hits in its long window")
	}
	if st := l.judge("hits@x", invalidFor("d"), later.Add(2*time.Hour), lim); st.First {
		t.Fatal("hits@x acted on its crossing twice after a sweep")
	}
}
