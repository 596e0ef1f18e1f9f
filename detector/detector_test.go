package detector

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/callout"
)

// fakeVerifier answers from a table; addresses not in it are invalid.
// A non-nil gate holds every verification until it is closed.
type fakeVerifier struct {
	mu      sync.Mutex
	results map[string]callout.Result
	calls   int
	gate    chan struct{}
}

func (f *fakeVerifier) Verify(ctx context.Context, addr string) callout.Result {
	f.mu.Lock()
	f.calls++
	gate := f.gate
	res, ok := f.results[addr]
	f.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return callout.Result{Address: addr, Status: callout.StatusUnknown, Reason: callout.ReasonCanceled}
		}
	}
	if !ok {
		res = callout.Result{Status: callout.StatusInvalid, Reason: callout.ReasonNoMailbox, Host: "mx.test",
			Reply: callout.Reply{Code: 550, Enhanced: [3]int{5, 1, 1}, Text: "no such user"}}
	}
	res.Address = strings.ToLower(addr)
	return res
}

func (f *fakeVerifier) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

type fakeBlocklist struct {
	mu      sync.Mutex
	entries map[string]string
	adds    int
}

func (f *fakeBlocklist) Blocked(id string) (string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	a, ok := f.entries[id]
	return a, ok
}

func (f *fakeBlocklist) Block(_ context.Context, id, action, text string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.entries[id] = action + " " + text
	f.adds++
	return nil
}

type fakeNotifier struct {
	mu     sync.Mutex
	events []Event
}

func (f *fakeNotifier) Notify(_ context.Context, ev Event) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.events = append(f.events, ev)
	return nil
}

func (f *fakeNotifier) kinds() []EventKind {
	f.mu.Lock()
	defer f.mu.Unlock()
	var k []EventKind
	for _, e := range f.events {
		k = append(k, e.Kind)
	}
	return k
}

type harness struct {
	d  *Detector
	v  *fakeVerifier
	bl *fakeBlocklist
	n  *fakeNotifier
	t  *time.Time
}

func newHarness(t *testing.T, cfg Config) *harness {
	t.Helper()
	now := t0
	h := &harness{
		v:  &fakeVerifier{results: map[string]callout.Result{}},
		bl: &fakeBlocklist{entries: map[string]string{}},
		n:  &fakeNotifier{},
		t:  &now,
	}
	cfg.Verifier, cfg.Blocklist, cfg.Notifier = h.v, h.bl, h.n
	var mu sync.Mutex
	cfg.Now = func() time.Time { mu.Lock(); defer mu.Unlock(); return *h.t }
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close(0) })
	h.d = d
	return h
}

func rcptRequest(user, rcpt string) *Request {
	return &Request{Request: "smtpd_access_policy", ProtocolState: "RCPT", SASLUsername: user,
		Sender: user, Recipient: rcpt, ClientAddress: "198.51.100.7", ClientName: "pc.example.net", QueueID: "4F2A1C0E3B"}
}

// ask asks one question and lets the verifications it started end, so
// that sequential tests see every verdict counted before the next request.
func (h *harness) ask(req *Request) Action {
	a := h.d.Decide(context.Background(), req)
	settle(h.d)
	return a
}

// settle waits until d has no verification running in the background.
func settle(d *Detector) {
	for d.InFlight() > 0 {
		time.Sleep(100 * time.Microsecond)
	}
}

func TestDecideIgnoresWhatIsNotOurs(t *testing.T) {
	h := newHarness(t, Config{Limit: 1})
	tests := []*Request{
		{Request: "smtpd_access_policy", ProtocolState: "MAIL", SASLUsername: "u@x", Sender: "u@x"},
		{Request: "junk", ProtocolState: "RCPT", SASLUsername: "u@x", Sender: "u@x", Recipient: "a@b"},
		{Request: "smtpd_access_policy", ProtocolState: "RCPT", ClientAddress: "203.0.113.9", Sender: "u@x", Recipient: "a@b"},
		{Request: "smtpd_access_policy", ProtocolState: "RCPT", SASLUsername: "bad user", Sender: "u@x", Recipient: "a@b"},
		{Request: "smtpd_access_policy", ProtocolState: "RCPT", SASLUsername: "bad\r\nuser", Sender: "u@x", Recipient: "a@b"},
		{Request: "smtpd_access_policy", ProtocolState: "RCPT", SASLUsername: "#comment", Sender: "u@x", Recipient: "a@b"},
		{Request: "smtpd_access_policy", ProtocolState: "RCPT", SASLUsername: "moc.elpmaxe@\u202eevil", Sender: "u@x", Recipient: "a@b"},
	}
	for _, r := range tests {
		if a := h.ask(r); a != ActionDunno {
			t.Errorf("%+v: %q", r, a)
		}
	}
	if h.v.count() != 0 {
		t.Errorf("%d verifications for requests that are not ours", h.v.count())
	}
}

func TestDecideBlocksAfterLimit(t *testing.T) {
	h := newHarness(t, Config{Limit: 3, WarnAt: 0.75})
	for i := range 3 {
		if a := h.ask(rcptRequest("Alice@Example.COM", fmt.Sprintf("nobody%d@elsewhere.test", i))); a != ActionDunno {
			t.Fatalf("request %d: %q before the limit", i, a)
		}
		// Postfix retries a timed-out policy request: the same recipient
		// again does not count.
		h.ask(rcptRequest("alice@example.com", fmt.Sprintf("nobody%d@elsewhere.test", i)))
	}
	if got := h.n.kinds(); len(got) != 1 || got[0] != EventWarning {
		t.Fatalf("events before the limit %v, want one warning", got)
	}
	a := h.ask(rcptRequest("alice@example.com", "nobody3@elsewhere.test"))
	want := Action("HOLD rcptguard: alice@example.com blocked: 4 invalid recipients within 1h")
	if a != want {
		t.Fatalf("action %q, want %q", a, want)
	}
	if h.bl.entries["alice@example.com"] != string(want) {
		t.Fatalf("blocklist %v", h.bl.entries)
	}
	// Every later request gets the same action, whatever the recipient.
	h.v.results["friend@example.org"] = callout.Result{Status: callout.StatusValid, Reason: callout.ReasonAccepted}
	calls := h.v.count()
	for _, rcpt := range []string{"friend@example.org", "nobody9@elsewhere.test"} {
		if a := h.ask(rcptRequest("alice@example.com", rcpt)); a != want {
			t.Fatalf("%s after block: %q", rcpt, a)
		}
	}
	if h.v.count() != calls {
		t.Error("a blocked identity's recipients were still verified")
	}
	kinds := h.n.kinds()
	if len(kinds) != 2 || kinds[1] != EventBlock || h.bl.adds != 1 {
		t.Fatalf("events %v, blocklist adds %d", kinds, h.bl.adds)
	}
	ev := h.n.events[1]
	if ev.Count != 4 || ev.Limit != 3 || ev.Period != time.Hour || len(ev.Evidence.Recipients) != 4 ||
		len(ev.Evidence.Clients) != 1 || ev.Evidence.Clients[0].Address != "198.51.100.7" {
		t.Fatalf("event %+v", ev)
	}
	if e := h.d.Limiter().Evidence("alice@example.com"); len(e.QueueIDs) != 1 || e.QueueIDs[0] != "4F2A1C0E3B" {
		t.Fatalf("held queue IDs %v", e.QueueIDs)
	}
}

func TestDecideUnknownNeverCounts(t *testing.T) {
	h := newHarness(t, Config{Limit: 2})
	for i := range 50 {
		rcpt := fmt.Sprintf("user%d@slow.test", i)
		h.v.results[rcpt] = callout.Result{Status: callout.StatusUnknown, Reason: callout.ReasonTemporary}
		if a := h.ask(rcptRequest("bob@example.com", rcpt)); a != ActionDunno {
			t.Fatalf("unknown verdict answered %q", a)
		}
	}
	if h.d.Limiter().Count("bob@example.com", t0) != 0 || len(h.n.kinds()) != 0 {
		t.Fatal("unknown verdicts counted")
	}
}

func TestDecideNotCounted(t *testing.T) {
	h := newHarness(t, Config{Limit: 1, LocalDomains: []string{"Example.COM"}, Exempt: []string{"Newsletter@Example.com"}})
	for range 2 {
		for i, r := range []*Request{
			rcptRequest("newsletter@example.com", "x1@elsewhere.test"),
			rcptRequest("u@example.com", "colleague@EXAMPLE.com"),
		} {
			if a := h.ask(r); a != ActionDunno {
				t.Fatalf("case %d: %q", i, a)
			}
		}
	}
	if h.v.count() != 0 {
		t.Fatalf("%d verifications of requests that must not be counted", h.v.count())
	}
}

func TestDecideRelayNetworks(t *testing.T) {
	h := newHarness(t, Config{Limit: 1, RelayNetworks: mustPrefixes("192.0.2.0/24")})
	req := func(rcpt string) *Request {
		return &Request{Request: "smtpd_access_policy", ProtocolState: "RCPT", ClientAddress: "192.0.2.10", Sender: "app@example.com", Recipient: rcpt}
	}
	h.ask(req("a@x.test"))
	if a := h.ask(req("b@x.test")); !strings.HasPrefix(string(a), "HOLD rcptguard: 192.0.2.10 blocked: 2 ") {
		t.Fatalf("relay client not limited: %q", a)
	}
}

func TestDecideMonitorMode(t *testing.T) {
	h := newHarness(t, Config{Limit: 1, Mode: ModeMonitor})
	for i := range 5 {
		if a := h.ask(rcptRequest("carol@example.com", fmt.Sprintf("n%d@x.test", i))); a != ActionDunno {
			t.Fatalf("monitor mode answered %q", a)
		}
	}
	if len(h.bl.entries) != 0 {
		t.Fatal("monitor mode wrote the blocklist")
	}
	if k := h.n.kinds(); len(k) != 1 || k[0] != EventWouldBlock {
		t.Fatalf("events %v, want one would-block", k)
	}
}

// TestDecideWaitThenCountsLate: a request that cannot cross the limit is
// answered at once; one that could waits at most wait, then is deferred,
// and both verdicts still count when they arrive.
func TestDecideWaitThenCountsLate(t *testing.T) {
	h := newHarness(t, Config{Limit: 1, Wait: 20 * time.Millisecond})
	h.v.gate = make(chan struct{})
	start := time.Now()
	ctx := context.Background()
	if a := h.d.Decide(ctx, rcptRequest("dave@example.com", "n0@x.test")); a != ActionDunno {
		t.Fatalf("first answer %q: it cannot cross the limit of 1", a)
	}
	if el := time.Since(start); el > 10*time.Millisecond {
		t.Fatalf("a request that cannot cross the limit waited %s", el)
	}
	if a := h.d.Decide(ctx, rcptRequest("dave@example.com", "n1@x.test")); a != DeferAction {
		t.Fatalf("second answer %q, want a defer: it could be the crossing one", a)
	}
	if el := time.Since(start); el > time.Second {
		t.Fatalf("answers took %s with wait 20ms", el)
	}
	close(h.v.gate) // the probes end now and are counted in the background
	settle(h.d)
	if _, ok := h.bl.Blocked("dave@example.com"); !ok {
		t.Fatal("late verdicts were not counted")
	}
}

func TestDecideLimitsOverride(t *testing.T) {
	h := newHarness(t, Config{Limit: 1, Limits: map[string]int{"VIP@example.com": 0, "*@bulk.example": 3}})
	for i := range 3 {
		h.ask(rcptRequest("vip@example.com", fmt.Sprintf("v%d@x.test", i)))
		if a := h.ask(rcptRequest("someone@bulk.example", fmt.Sprintf("b%d@x.test", i))); a != ActionDunno {
			t.Fatalf("domain limit 3 blocked at %d", i+1)
		}
	}
	if _, ok := h.bl.Blocked("vip@example.com"); ok {
		t.Fatal("limit 0 (unlimited) blocked")
	}
	if a := h.ask(rcptRequest("someone@bulk.example", "b3@x.test")); a == ActionDunno {
		t.Fatal("domain limit not enforced")
	}
	// Reload lowers the default.
	if err := h.d.Reload(Config{Limit: 5}); err != nil {
		t.Fatal(err)
	}
	if err := h.d.Reload(Config{Limit: 5, Period: 2 * time.Hour}); err == nil {
		t.Fatal("period change accepted on reload")
	}
}

func TestDecideWindowSlides(t *testing.T) {
	h := newHarness(t, Config{Limit: 2})
	h.ask(rcptRequest("erin@example.com", "a@x.test"))
	h.ask(rcptRequest("erin@example.com", "b@x.test"))
	*h.t = t0.Add(61 * time.Minute) // a and b left the window
	h.ask(rcptRequest("erin@example.com", "c@x.test"))
	if a := h.ask(rcptRequest("erin@example.com", "d@x.test")); a != ActionDunno {
		t.Fatalf("blocked on hits outside the window: %q", a)
	}
	if a := h.ask(rcptRequest("erin@example.com", "e@x.test")); a == ActionDunno {
		t.Fatal("three in the window not blocked")
	}
}

func TestDecideConcurrentBlockOnce(t *testing.T) {
	h := newHarness(t, Config{Limit: 5})
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Go(func() { h.ask(rcptRequest("frank@example.com", fmt.Sprintf("n%d@x.test", i))) })
	}
	wg.Wait()
	if h.bl.adds != 1 {
		t.Fatalf("blocklist written %d times, want once", h.bl.adds)
	}
	blocks := 0
	for _, k := range h.n.kinds() {
		if k == EventBlock {
			blocks++
		}
	}
	if blocks != 1 {
		t.Fatalf("%d block notifications, want 1", blocks)
	}
}

func mustPrefixes(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range s {
		out = append(out, netip.MustParsePrefix(p))
	}
	return out
}

func BenchmarkDecideCached(b *testing.B) {
	v := &fakeVerifier{results: map[string]callout.Result{"friend@example.org": {Status: callout.StatusValid, Reason: callout.ReasonAccepted, Cached: true}}}
	d, err := New(Config{Verifier: v, Blocklist: &fakeBlocklist{entries: map[string]string{}}, Limit: 100})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close(0)
	req := rcptRequest("alice@example.com", "friend@example.org")
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if d.Decide(ctx, req) != ActionDunno {
			b.Fatal("not DUNNO")
		}
	}
}

// fakeCachingVerifier answers only from its "cache" the addresses in
// cached; others count as probes.
type fakeCachingVerifier struct {
	fakeVerifier
	cached map[string]bool
}

func (f *fakeCachingVerifier) Cached(addr string) (callout.Result, bool) {
	if !f.cached[addr] {
		return callout.Result{}, false
	}
	return callout.Result{Address: addr, Status: callout.StatusValid, Reason: callout.ReasonAccepted, Cached: true}, true
}

func TestDecideProbeRatePerIdentity(t *testing.T) {
	v := &fakeCachingVerifier{fakeVerifier: fakeVerifier{results: map[string]callout.Result{}}, cached: map[string]bool{"friend@x.test": true}}
	now := t0.Add(50 * time.Second)
	d, err := New(Config{Verifier: v, Blocklist: &fakeBlocklist{entries: map[string]string{}}, Limit: 1000, ProbeRate: 10,
		Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close(0)
	ask := func(id, rcpt string) Action {
		a := d.Decide(context.Background(), rcptRequest(id, rcpt))
		settle(d)
		return a
	}
	for i := range 30 {
		a := ask("lister@example.com", fmt.Sprintf("n%d@x.test", i))
		if want := map[bool]Action{true: ActionDunno, false: DeferAction}[i < 10]; a != want {
			t.Fatalf("request %d: %q, want %q", i, a, want)
		}
	}
	if v.count() != 10 {
		t.Fatalf("%d probes in a minute with a cap of 10", v.count())
	}
	if got := d.Limiter().Count("lister@example.com", now); got != 10 {
		t.Fatalf("count %d: deferred recipients are not counted", got)
	}
	// Cached verdicts are not probes and are still answered.
	if a := ask("lister@example.com", "friend@x.test"); a != ActionDunno {
		t.Fatalf("cached verdict past the cap: %q", a)
	}
	// Another identity has its own budget.
	ask("other@example.com", "m@x.test")
	// The window slides: a new clock minute brings no new budget...
	now = t0.Add(70 * time.Second)
	if a := ask("lister@example.com", "early@x.test"); a != DeferAction {
		t.Fatalf("a new clock minute reset the cap: %q", a)
	}
	// ...a minute after the probes, it does.
	now = t0.Add(110 * time.Second)
	if a := ask("lister@example.com", "late@x.test"); a != ActionDunno {
		t.Fatalf("a minute later: %q", a)
	}
	if v.count() != 12 {
		t.Fatalf("%d probes, want 12", v.count())
	}
}

// TestDecideNullSenderJudged: MAIL FROM:<> of an authenticated identity is
// verified and counted like any other mail.
func TestDecideNullSenderJudged(t *testing.T) {
	h := newHarness(t, Config{Limit: 2})
	var last Action
	for i := range 3 {
		r := rcptRequest("mallory@example.com", fmt.Sprintf("n%d@x.test", i))
		r.Sender = ""
		last = h.ask(r)
	}
	if !strings.HasPrefix(string(last), "HOLD rcptguard: mallory@example.com blocked: 3 ") {
		t.Fatalf("null sender not judged: %q", last)
	}
}

// TestDecideMonitorThenEnforce: an identity that passed its limit in
// monitor mode is blocked once the mode is switched to enforce, at its
// next invalid recipient.
func TestDecideMonitorThenEnforce(t *testing.T) {
	h := newHarness(t, Config{Limit: 2, Mode: ModeMonitor})
	for i := range 3 {
		h.ask(rcptRequest("grace@example.com", fmt.Sprintf("m%d@x.test", i)))
	}
	if err := h.d.Reload(Config{Limit: 2, Mode: ModeEnforce}); err != nil {
		t.Fatal(err)
	}
	if a := h.ask(rcptRequest("grace@example.com", "e0@x.test")); !strings.HasPrefix(string(a), "HOLD ") {
		t.Fatalf("after switching to enforce: %q", a)
	}
	if k := h.n.kinds(); len(k) != 2 || k[0] != EventWouldBlock || k[1] != EventBlock {
		t.Fatalf("events %v, want would-block then block", k)
	}
}
