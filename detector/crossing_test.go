package detector

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/callout"
)

// gatedVerifier holds each verification until the test releases its
// address, so verdicts complete in the order the test chooses.
type gatedVerifier struct {
	mu      sync.Mutex
	gates   map[string]chan struct{}
	valid   map[string]bool
	started map[string]bool
}

func newGatedVerifier() *gatedVerifier {
	return &gatedVerifier{gates: map[string]chan struct{}{}, valid: map[string]bool{}, started: map[string]bool{}}
}

func (g *gatedVerifier) gate(addr string) chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	c := g.gates[addr]
	if c == nil {
		c = make(chan struct{})
		g.gates[addr] = c
	}
	return c
}

func (g *gatedVerifier) Verify(ctx context.Context, addr string) callout.Result {
	c := g.gate(addr)
	g.mu.Lock()
	g.started[addr] = true
	valid := g.valid[addr]
	g.mu.Unlock()
	select {
	case <-c:
	case <-ctx.Done():
		return callout.Result{Address: addr, Status: callout.StatusUnknown, Reason: callout.ReasonCanceled}
	}
	if valid {
		return callout.Result{Address: addr, Status: callout.StatusValid, Reason: callout.ReasonAccepted}
	}
	return callout.Result{Address: addr, Status: callout.StatusInvalid, Reason: callout.ReasonNoMailbox}
}

func (g *gatedVerifier) release(addr string) { close(g.gate(addr)) }

// conns plays several Postfix connections of one identity: each request
// is sent on its own goroutine and its answer collected by recipient.
type conns struct {
	t       *testing.T
	d       *Detector
	id      string
	mu      sync.Mutex
	answers map[string]Action
}

func (c *conns) send(client, rcpt string) {
	r := rcptRequest(c.id, rcpt)
	r.ClientAddress = client
	go func() {
		a := c.d.Decide(context.Background(), r)
		c.mu.Lock()
		c.answers[rcpt] = a
		c.mu.Unlock()
	}()
}

func (c *conns) answer(rcpt string) (Action, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	a, ok := c.answers[rcpt]
	return a, ok
}

// until waits for cond, failing the test after 5 seconds.
func (c *conns) until(what string, cond func() bool) {
	c.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			c.t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Microsecond)
	}
}

// answered waits for the answer to rcpt and checks it.
func (c *conns) answered(rcpt string, want func(Action) bool, desc string) {
	c.t.Helper()
	c.until("the answer for "+rcpt, func() bool { _, ok := c.answer(rcpt); return ok })
	if a, _ := c.answer(rcpt); !want(a) {
		c.t.Fatalf("%s answered %q, want %s", rcpt, a, desc)
	}
}

// waiting waits until n requests of the identity wait for a verdict.
func (c *conns) waiting(n int) {
	c.t.Helper()
	c.until("requests waiting", func() bool { return c.d.Limiter().waiting(c.id) == n })
}

func isDunno(a Action) bool { return a == ActionDunno }
func isHold(a Action) bool  { return strings.HasPrefix(string(a), "HOLD rcptguard: ") }

// TestCrossingUnderConcurrency plays four connections of one identity
// against a verifier whose verdicts complete out of order. Requests that
// cannot cross the limit are answered at once; the ones that could wait;
// the block lands exactly when the (limit+1)th distinct invalid recipient
// is counted, and the request still waiting then, the crossing one, gets
// the block action. At no time is more than the limit of invalid
// recipients accepted.
func TestCrossingUnderConcurrency(t *testing.T) {
	g := newGatedVerifier()
	bl := &fakeBlocklist{entries: map[string]string{}}
	n := &fakeNotifier{}
	d, err := New(Config{Verifier: g, Blocklist: bl, Notifier: n, Limit: 5, Wait: time.Minute,
		Now: func() time.Time { return t0 }})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, a := range []string{"r1@x.test", "r2@x.test", "r3@x.test", "r4@x.test", "r5@x.test", "r6@x.test", "ok@x.test", "r8@x.test"} {
			g.mu.Lock()
			c := g.gates[a]
			g.mu.Unlock()
			if c != nil {
				select {
				case <-c:
				default:
					close(c)
				}
			}
		}
		d.Close(time.Second)
	}()
	g.valid["ok@x.test"] = true
	c := &conns{t: t, d: d, id: "victim@example.com", answers: map[string]Action{}}
	clients := []string{"198.51.100.1", "198.51.100.2", "198.51.100.3", "198.51.100.4"}

	// Five verifications in flight: even if all are invalid the count
	// reaches the limit, not past it. Answered at once.
	for i, r := range []string{"r1@x.test", "r2@x.test", "r3@x.test", "r4@x.test", "r5@x.test"} {
		c.send(clients[i%4], r)
		c.answered(r, isDunno, "DUNNO at once")
	}
	// The sixth could be the crossing one: it waits. So does a seventh,
	// whatever its verdict turns out to be.
	c.send(clients[1], "r6@x.test")
	c.waiting(1)
	c.send(clients[2], "ok@x.test")
	c.waiting(2)

	// Verdicts complete out of order. r6 is invalid: count 1, but five
	// are still in flight, so it still could cross.
	g.release("r6@x.test")
	c.until("r6 counted", func() bool { return d.Limiter().Count(c.id, t0) == 1 })
	c.waiting(2)
	// ok@ is valid: that request cannot cross anything, it goes.
	g.release("ok@x.test")
	c.answered("ok@x.test", isDunno, "DUNNO (valid)")
	for i, r := range []string{"r3@x.test", "r1@x.test", "r5@x.test", "r2@x.test"} {
		g.release(r)
		c.until("count", func() bool { return d.Limiter().Count(c.id, t0) == 2+i })
		if _, ok := c.answer("r6@x.test"); ok {
			t.Fatalf("r6 answered at count %d with r4 still in flight", 2+i)
		}
	}
	if len(bl.entries) != 0 {
		t.Fatal("blocked at the limit")
	}
	// The last one in flight is invalid: the sixth distinct invalid
	// recipient, limit+1. The waiting request is the crossing one.
	g.release("r4@x.test")
	c.answered("r6@x.test", isHold, "the block action")
	if a := bl.entries[c.id]; a != "HOLD rcptguard: victim@example.com blocked: 6 invalid recipients within 1h" {
		t.Fatalf("blocklist entry %q", a)
	}
	if bl.adds != 1 {
		t.Fatalf("blocklist written %d times", bl.adds)
	}
	if k := n.kinds(); len(k) != 1 || k[0] != EventBlock || n.events[0].Count != 6 || len(n.events[0].Evidence.Clients) != 4 {
		t.Fatalf("events %+v", n.events)
	}
	// Everything after it is blocked without verification.
	c.send(clients[3], "r8@x.test")
	c.answered("r8@x.test", isHold, "the block action")
	g.mu.Lock()
	probed := g.started["r8@x.test"]
	g.mu.Unlock()
	if probed {
		t.Fatal("a blocked identity's recipient was verified")
	}
}

// TestWaitingRequestGoesWhenSafe: a waiting request whose own recipient is
// invalid is answered DUNNO as soon as the verdicts in flight can no
// longer take the identity past its limit, and the next one that can is
// the one blocked.
func TestWaitingRequestGoesWhenSafe(t *testing.T) {
	g := newGatedVerifier()
	bl := &fakeBlocklist{entries: map[string]string{}}
	d, err := New(Config{Verifier: g, Blocklist: bl, Limit: 3, Wait: time.Minute, Now: func() time.Time { return t0 }})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close(time.Second)
	g.valid["r1@x.test"] = true
	c := &conns{t: t, d: d, id: "busy@example.com", answers: map[string]Action{}}
	for _, r := range []string{"r1@x.test", "r2@x.test", "r3@x.test"} {
		c.send("198.51.100.1", r)
		c.answered(r, isDunno, "DUNNO at once")
	}
	c.send("198.51.100.2", "r4@x.test")
	c.waiting(1)
	g.release("r4@x.test") // invalid: count 1, two in flight
	c.until("r4 counted", func() bool { return d.Limiter().Count(c.id, t0) == 1 })
	if _, ok := c.answer("r4@x.test"); ok {
		t.Fatal("r4 answered while r2 and r3 could still take the count past 3")
	}
	g.release("r1@x.test") // valid: count 1 + 2 in flight = 3, the limit: safe
	c.answered("r4@x.test", isDunno, "DUNNO once safe")
	c.send("198.51.100.3", "r5@x.test")
	c.waiting(1)
	g.release("r5@x.test")
	g.release("r2@x.test")
	c.until("count", func() bool { return d.Limiter().Count(c.id, t0) == 3 })
	if _, ok := c.answer("r5@x.test"); ok || len(bl.entries) != 0 {
		t.Fatal("answered or blocked at the limit")
	}
	g.release("r3@x.test")
	c.answered("r5@x.test", isHold, "the block action")
	if a := bl.entries[c.id]; !strings.Contains(a, "blocked: 4 invalid recipients") {
		t.Fatalf("blocklist entry %q", a)
	}
}
