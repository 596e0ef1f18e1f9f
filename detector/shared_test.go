package detector

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/callout"
)

// fakeFleet is a SharedCounter kept in memory, as Redis's script keeps
// it: distinct invalid recipients per identity, verifications in flight,
// and a crossing mark so that exactly one verdict is First.
type fakeFleet struct {
	mu      sync.Mutex
	rcpts   map[string]map[string]bool
	pending map[string]map[string]bool
	crossed map[string]bool
	down    bool
	calls   int
	budget  time.Duration // the deadline the last call was given
}

func newFakeFleet() *fakeFleet {
	return &fakeFleet{rcpts: map[string]map[string]bool{}, pending: map[string]map[string]bool{}, crossed: map[string]bool{}}
}

func (f *fakeFleet) Reserve(ctx context.Context, id, key string, _ time.Time, lim Thresholds) (Standing, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	f.noteBudget(ctx)
	if f.down {
		return Standing{}, errors.New("redis down")
	}
	if key != "" {
		if f.pending[id] == nil {
			f.pending[id] = map[string]bool{}
		}
		f.pending[id][key] = true
	}
	return f.standing(id, lim), nil
}

func (f *fakeFleet) Record(ctx context.Context, id, key string, res *callout.Result, _ time.Time, lim Thresholds) (Standing, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	f.noteBudget(ctx)
	if f.down {
		return Standing{}, errors.New("redis down")
	}
	delete(f.pending[id], key)
	if res == nil || res.Status != callout.StatusInvalid {
		return f.standing(id, lim), nil
	}
	if f.rcpts[id] == nil {
		f.rcpts[id] = map[string]bool{}
	}
	f.rcpts[id][res.Address] = true
	st := f.standing(id, lim)
	if st.Crossed != TriggerNone && !f.crossed[id] {
		f.crossed[id] = true
		st.First = true
	}
	return st, nil
}

func (f *fakeFleet) noteBudget(ctx context.Context) {
	if dl, ok := ctx.Deadline(); ok {
		f.budget = time.Until(dl)
	}
}

func (f *fakeFleet) standing(id string, lim Thresholds) Standing {
	st := Standing{Count: len(f.rcpts[id]), Pending: len(f.pending[id])}
	if lim.Count > 0 && st.Count > lim.Count {
		st.Crossed = TriggerCount
	}
	return st
}

// Two detectors sharing a counter: an identity alternating between them
// is blocked at limit+1 in total, by one of them, with one report; the
// other answers blocked for its next invalid recipient, without a report.
func TestSharedCounterOneJudgement(t *testing.T) {
	fleet := newFakeFleet()
	a := newHarness(t, Config{Limit: 3, Shared: fleet})
	b := newHarness(t, Config{Limit: 3, Shared: fleet})
	hs := []*harness{a, b}
	for i := range 3 {
		if got := hs[i%2].ask(rcptRequest("alice@example.com", fmt.Sprintf("nobody%d@elsewhere.test", i))); got != ActionDunno {
			t.Fatalf("request %d: %q", i+1, got)
		}
	}
	// Seen before, on the other server: not counted again.
	if got := b.ask(rcptRequest("alice@example.com", "nobody0@elsewhere.test")); got != ActionDunno {
		t.Fatalf("a recipient seen on the other server: %q", got)
	}
	want := Action("HOLD rcptguard: alice@example.com blocked: 4 invalid recipients within 1h")
	if got := b.ask(rcptRequest("alice@example.com", "nobody3@elsewhere.test")); got != want {
		t.Fatalf("4th distinct invalid recipient on server b: %q, want %q", got, want)
	}
	if got := a.ask(rcptRequest("alice@example.com", "nobody4@elsewhere.test")); !strings.HasPrefix(string(got), "HOLD") {
		t.Fatalf("next invalid recipient on server a: %q", got)
	}
	if len(b.n.kinds()) != 1 || len(a.n.kinds()) != 0 {
		t.Fatalf("reports: a %v, b %v; want one, from b", a.n.kinds(), b.n.kinds())
	}
	if _, ok := a.bl.entries["alice@example.com"]; !ok {
		t.Fatal("server a did not block locally")
	}
}

// With the shared counter down, each detector counts alone, and every
// request is answered.
func TestSharedCounterDownCountsLocally(t *testing.T) {
	fleet := newFakeFleet()
	fleet.down = true
	h := newHarness(t, Config{Limit: 2, Shared: fleet})
	for i := range 2 {
		if got := h.ask(rcptRequest("bob@example.com", fmt.Sprintf("x%d@elsewhere.test", i))); got != ActionDunno {
			t.Fatalf("request %d: %q", i+1, got)
		}
	}
	if got := h.ask(rcptRequest("bob@example.com", "x2@elsewhere.test")); !strings.HasPrefix(string(got), "HOLD") {
		t.Fatalf("3rd invalid recipient, counter down: %q", got)
	}
	if fleet.calls == 0 {
		t.Fatal("the shared counter was never asked")
	}
	if len(h.n.kinds()) != 1 {
		t.Fatalf("reports %v", h.n.kinds())
	}
}

// A fleet call gets the configured deadline (cluster.timeout), not a
// fixed one: a postmaster who gives Redis 800ms gets 800ms.
func TestSharedTimeoutConfigured(t *testing.T) {
	for _, tt := range []struct {
		set, want time.Duration
	}{{0, DefaultSharedTimeout}, {800 * time.Millisecond, 800 * time.Millisecond}} {
		fleet := newFakeFleet()
		h := newHarness(t, Config{Limit: 3, Shared: fleet, SharedTimeout: tt.set})
		h.ask(rcptRequest("carol@example.com", "nobody@elsewhere.test"))
		fleet.mu.Lock()
		got := fleet.budget
		fleet.mu.Unlock()
		if got <= tt.want-200*time.Millisecond || got > tt.want {
			t.Errorf("SharedTimeout %v: a fleet call had %v left, want about %v", tt.set, got, tt.want)
		}
	}
}
