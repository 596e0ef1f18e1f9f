package detector

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/callout"
)

func verdict(addr string, st callout.Status, r callout.Reason) *callout.Result {
	return &callout.Result{Address: addr, Status: st, Reason: r}
}

// TestRatioTrigger: the ratio counts judged recipients only, and the
// recipients at one dead domain once.
func TestRatioTrigger(t *testing.T) {
	lim := Thresholds{Count: 100, Ratio: 0.5, RatioMin: 5}
	type step struct {
		n      int
		status callout.Status
		reason callout.Reason
		domain string // "" each recipient its own domain
	}
	tests := []struct {
		name  string
		steps []step
		want  Trigger
	}{
		{"five invalid, nothing else", []step{{5, callout.StatusInvalid, callout.ReasonNoMailbox, "x.test"}}, TriggerRatio},
		{"four invalid is under ratio_min", []step{{4, callout.StatusInvalid, callout.ReasonNoMailbox, "x.test"}}, TriggerNone},
		{"five invalid, six valid", []step{{6, callout.StatusValid, callout.ReasonAccepted, "x.test"}, {5, callout.StatusInvalid, callout.ReasonNoMailbox, "x.test"}}, TriggerNone},
		{"five invalid, five valid", []step{{5, callout.StatusValid, callout.ReasonAccepted, "x.test"}, {5, callout.StatusInvalid, callout.ReasonNoMailbox, "x.test"}}, TriggerRatio},
		{"unknown counts neither way", []step{{50, callout.StatusUnknown, callout.ReasonTemporary, "x.test"}, {5, callout.StatusInvalid, callout.ReasonNoMailbox, "x.test"}}, TriggerRatio},
		{"fifty at one dead domain count once", []step{{50, callout.StatusInvalid, callout.ReasonNXDomain, "defunct.test"}}, TriggerNone},
		{"null MX domain once, plus four", []step{{20, callout.StatusInvalid, callout.ReasonNullMX, "nullmx.test"}, {4, callout.StatusInvalid, callout.ReasonNoMailbox, "x.test"}}, TriggerRatio},
		{"five dead domains count five", []step{{5, callout.StatusInvalid, callout.ReasonNoMailHost, ""}}, TriggerRatio},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := NewLimiter(time.Hour)
			var st Standing
			k := 0
			for _, s := range tt.steps {
				for range s.n {
					k++
					dom := s.domain
					if dom == "" {
						dom = fmt.Sprintf("d%d.test", k)
					}
					st = l.judge("u", verdict(fmt.Sprintf("a%d@%s", k, dom), s.status, s.reason), t0, lim)
				}
			}
			if st.Crossed != tt.want {
				t.Fatalf("crossed %q, want %q (standing %+v)", st.Crossed, tt.want, st)
			}
		})
	}
}

// TestRatioValidWindowSlides: valid verdicts leave the ratio's window.
func TestRatioValidWindowSlides(t *testing.T) {
	lim := Thresholds{Count: 100, Ratio: 0.5, RatioMin: 3}
	l := NewLimiter(time.Hour)
	for i := range 10 {
		l.judge("u", verdict(fmt.Sprintf("v%d@x.test", i), callout.StatusValid, callout.ReasonAccepted), t0, lim)
	}
	for i := range 3 {
		if st := l.judge("u", verdict(fmt.Sprintf("n%d@x.test", i), callout.StatusInvalid, callout.ReasonNoMailbox), t0.Add(time.Minute), lim); st.Crossed != TriggerNone {
			t.Fatalf("crossed with ten valid in the window: %+v", st)
		}
	}
	// Two hours on the valid ones are gone, and so are the invalid ones.
	later := t0.Add(2 * time.Hour)
	for i := range 3 {
		st := l.judge("u", verdict(fmt.Sprintf("m%d@x.test", i), callout.StatusInvalid, callout.ReasonNoMailbox), later, lim)
		if want := map[bool]Trigger{true: TriggerRatio, false: TriggerNone}[i == 2]; st.Crossed != want {
			t.Fatalf("step %d: %+v", i, st)
		}
	}
}

// TestLongWindow: a sender under the short limit every hour passes the
// long one within the day.
func TestLongWindow(t *testing.T) {
	l := newLimiter(time.Hour, 24*time.Hour)
	lim := Thresholds{Count: 10, Long: 30}
	var st Standing
	for i := range 31 {
		at := t0.Add(time.Duration(i) * 10 * time.Minute) // 6 an hour
		st = l.judge("slow", verdict(fmt.Sprintf("n%d@x.test", i), callout.StatusInvalid, callout.ReasonNoMailbox), at, lim)
		if st.Count > 7 {
			t.Fatalf("short window holds %d", st.Count)
		}
		if i < 30 && st.Crossed != TriggerNone {
			t.Fatalf("crossed at %d: %+v", i+1, st)
		}
	}
	if st.Crossed != TriggerLong || st.Long != 31 {
		t.Fatalf("standing %+v, want long crossed at 31", st)
	}
	// A day later the long window is empty again.
	if st := l.Standing("slow", t0.Add(48*time.Hour), lim); st.Long != 0 || !st.Safe {
		t.Fatalf("after two days %+v", st)
	}
}

func TestDecideLongAndRatioBlock(t *testing.T) {
	h := newHarness(t, Config{Limit: 100, LongPeriod: 24 * time.Hour, LongLimit: 4})
	var a Action
	for i := range 5 {
		*h.t = t0.Add(time.Duration(i) * 2 * time.Hour)
		a = h.ask(rcptRequest("slow@example.com", fmt.Sprintf("n%d@x.test", i)))
	}
	if a != "HOLD rcptguard: slow@example.com blocked: 5 invalid recipients within 1d" {
		t.Fatalf("long window: %q", a)
	}
	h = newHarness(t, Config{Limit: 100, Ratio: 0.5, RatioMin: 3})
	h.v.results["friend@x.test"] = callout.Result{Status: callout.StatusValid, Reason: callout.ReasonAccepted}
	h.ask(rcptRequest("r@example.com", "friend@x.test"))
	for i := range 3 {
		a = h.ask(rcptRequest("r@example.com", fmt.Sprintf("n%d@x.test", i)))
	}
	if a != "HOLD rcptguard: r@example.com blocked: 3 of 4 verified recipients within 1h do not exist" {
		t.Fatalf("ratio: %q", a)
	}
	if ev := h.n.events[len(h.n.events)-1]; ev.Trigger != TriggerRatio || ev.Count != 3 || ev.Judged != 4 {
		t.Fatalf("event %+v", ev)
	}
}

// rateLimitedVerifier answers "rate-limited" (the callout's own caps)
// until it is opened, then invalid.
type rateLimitedVerifier struct {
	fakeVerifier
	hold chan struct{} // every answer waits for it
	open chan struct{}
}

func (r *rateLimitedVerifier) Verify(ctx context.Context, addr string) callout.Result {
	select {
	case <-r.hold:
	case <-ctx.Done():
		return callout.Result{Address: addr, Status: callout.StatusUnknown, Reason: callout.ReasonCanceled}
	}
	select {
	case <-r.open:
		return r.fakeVerifier.Verify(ctx, addr)
	default:
		r.mu.Lock()
		r.calls++
		r.mu.Unlock()
		return callout.Result{Address: addr, Status: callout.StatusUnknown, Reason: callout.ReasonRateLimited}
	}
}

// TestDecideVerifierCapsNeverWaveThrough: a recipient the verifier could
// not judge because of its caps is deferred when it could cross a limit;
// one answered at once is retried in the background until judged, and
// then counts.
func TestDecideVerifierCapsNeverWaveThrough(t *testing.T) {
	v := &rateLimitedVerifier{fakeVerifier: fakeVerifier{results: map[string]callout.Result{}}, hold: make(chan struct{}), open: make(chan struct{})}
	bl := &fakeBlocklist{entries: map[string]string{}}
	d, err := New(Config{Verifier: v, Blocklist: bl, Limit: 2, Wait: time.Minute, Now: func() time.Time { return t0 }})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close(0)
	retry := make(chan struct{})
	d.sleep = func(ctx context.Context, _ time.Duration) bool {
		select {
		case <-retry:
			return true
		case <-ctx.Done():
			return false
		}
	}
	ctx := context.Background()
	for i := range 2 {
		if a := d.Decide(ctx, rcptRequest("u@example.com", fmt.Sprintf("n%d@x.test", i))); a != ActionDunno {
			t.Fatalf("request %d: %q, want DUNNO at once", i, a)
		}
	}
	close(v.hold) // both come back rate-limited, after their answers
	// Both are accepted and unjudged: their reservations hold, so the
	// third could cross, waits, is not verifiable: deferred.
	if a := d.Decide(ctx, rcptRequest("u@example.com", "n2@x.test")); a != DeferAction {
		t.Fatalf("third: %q, want a defer", a)
	}
	deadline := time.Now().Add(5 * time.Second)
	for d.InFlight() != 2 {
		if time.Now().After(deadline) {
			t.Fatalf("%d verifications in flight, want the two accepted ones retrying", d.InFlight())
		}
		time.Sleep(100 * time.Microsecond)
	}
	close(v.open)
	close(retry)
	settle(d)
	if got := d.Limiter().Count("u@example.com", t0); got != 2 {
		t.Fatalf("count %d after the retries, want 2", got)
	}
	// The deferred one comes back and is the crossing one.
	if a := d.Decide(ctx, rcptRequest("u@example.com", "n2@x.test")); !strings.HasPrefix(string(a), "HOLD ") {
		t.Fatalf("retried third: %q", a)
	}
}

// TestDecideCachedInvalidWaits: an invalid verdict from the cache for an
// identity with verifications in flight waits for them like any other.
func TestDecideCachedInvalidWaits(t *testing.T) {
	v := &fakeCachingVerifier{fakeVerifier: fakeVerifier{results: map[string]callout.Result{}, gate: make(chan struct{})}, cached: map[string]bool{}}
	bl := &fakeBlocklist{entries: map[string]string{}}
	d, err := New(Config{Verifier: &cachedInvalid{v}, Blocklist: bl, Limit: 2, Wait: 30 * time.Millisecond, Now: func() time.Time { return t0 }})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close(0)
	ctx := context.Background()
	d.Decide(ctx, rcptRequest("u@example.com", "a@x.test"))
	d.Decide(ctx, rcptRequest("u@example.com", "b@x.test"))
	if a := d.Decide(ctx, rcptRequest("u@example.com", "cached-bad@x.test")); a != DeferAction {
		t.Fatalf("cached invalid with two in flight at limit 2: %q", a)
	}
	close(v.gate)
	settle(d)
	if _, ok := bl.Blocked("u@example.com"); !ok {
		t.Fatal("three invalid, limit 2, not blocked")
	}
}

// cachedInvalid has an invalid verdict cached for "cached-*" recipients.
type cachedInvalid struct{ *fakeCachingVerifier }

func (c *cachedInvalid) Cached(addr string) (callout.Result, bool) {
	if strings.HasPrefix(addr, "cached-") {
		return callout.Result{Address: addr, Status: callout.StatusInvalid, Reason: callout.ReasonNoMailbox, Cached: true}, true
	}
	return callout.Result{}, false
}

// TestSweepLongWindow: an identity with an invalid recipient in the long
// window stays tracked until it leaves; one with only valid verdicts goes
// after a period.
func TestSweepLongWindow(t *testing.T) {
	l := newLimiter(time.Hour, 24*time.Hour)
	lim := Thresholds{Count: 10, Long: 30}
	l.judge("bad", verdict("n@x.test", callout.StatusInvalid, callout.ReasonNoMailbox), t0, lim)
	l.judge("good", verdict("v@x.test", callout.StatusValid, callout.ReasonAccepted), t0, lim)
	if n := l.Sweep(t0.Add(2 * time.Hour)); n != 1 {
		t.Fatalf("%d tracked after 2h, want 1 (the one with a hit in the long window)", n)
	}
	if st := l.Standing("bad", t0.Add(2*time.Hour), lim); st.Long != 1 || st.Count != 0 {
		t.Fatalf("standing after 2h %+v", st)
	}
	if n := l.Sweep(t0.Add(24 * time.Hour)); n != 0 {
		t.Fatalf("%d tracked after 24h", n)
	}
}

// TestFirstCrossingIsLimitPlusOne: of many invalid verdicts settling at
// once, exactly one acts on the crossing, and it is the one that took the
// count to limit+1.
func TestFirstCrossingIsLimitPlusOne(t *testing.T) {
	for range 20 {
		l := NewLimiter(time.Hour)
		lim := Thresholds{Count: 10, Act: ModeEnforce}
		var mu sync.Mutex
		var firsts []int
		var wg sync.WaitGroup
		for i := range 40 {
			l.Reserve("u", t0, lim)
			wg.Go(func() {
				st := l.settle("u", verdict(fmt.Sprintf("n%d@x.test", i), callout.StatusInvalid, callout.ReasonNoMailbox), t0, lim)
				if st.First {
					mu.Lock()
					firsts = append(firsts, st.Count)
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		if len(firsts) != 1 || firsts[0] != 11 {
			t.Fatalf("first crossings at counts %v, want one at 11", firsts)
		}
	}
}

// TestDecideInstantCapNeverDefersSafeIdentity: a verifier whose caps
// answer "rate-limited" at once (before Decide could look) must not turn
// the requests of an identity far from every limit into defers: they are
// accepted, and their verdicts are owed and judged late.
func TestDecideInstantCapNeverDefersSafeIdentity(t *testing.T) {
	v := &rateLimitedVerifier{fakeVerifier: fakeVerifier{results: map[string]callout.Result{}}, hold: make(chan struct{}), open: make(chan struct{})}
	close(v.hold) // every answer comes back at once
	bl := &fakeBlocklist{entries: map[string]string{}}
	d, err := New(Config{Verifier: v, Blocklist: bl, Limit: 1000, Wait: time.Minute, Now: func() time.Time { return t0 }})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close(0)
	retry := make(chan struct{})
	d.sleep = func(ctx context.Context, _ time.Duration) bool {
		select {
		case <-retry:
			return true
		case <-ctx.Done():
			return false
		}
	}
	ctx := context.Background()
	for i := range 300 {
		runtime.Gosched() // let an earlier probe's goroutine run first, as on a busy machine
		if a := d.Decide(ctx, rcptRequest("u@example.com", fmt.Sprintf("n%d@x.test", i))); a != ActionDunno {
			t.Fatalf("request %d: %q, want DUNNO (the identity is far from its limit)", i, a)
		}
	}
	close(v.open)
	close(retry)
	settle(d)
	if got := d.Limiter().Count("u@example.com", t0); got != 300 {
		t.Fatalf("count %d after the retries, want 300 (every accepted recipient judged late)", got)
	}
}
