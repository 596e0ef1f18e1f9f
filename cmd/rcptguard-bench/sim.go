package main

import (
	"cmp"
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rcptguard/rcptguard/callout"
	"github.com/rcptguard/rcptguard/cmd/rcptguard/app"
	"github.com/rcptguard/rcptguard/cmd/rcptguard/cluster"
	"github.com/rcptguard/rcptguard/detector"
)

// The simulation plays honest and compromised identities against the real
// detector (its defaults, as rcptguard serve would run it: limit 100 per
// hour, ratio 0.5 from 30, 300 per 24h, probe cap 120 per sliding minute,
// wait 5s) and a modelled Internet: a verifier that answers by the kind of
// the recipient's domain, after a fixed latency, with a verdict cache.
// Time is virtual (an injected clock); each virtual tick's requests are
// sent at once, one goroutine per Postfix connection, and the tick ends
// when every answer is in and every verification has ended. Deferred
// recipients come back, as a client retries, after the scenario's retry
// delay. The seed makes the recipient lists reproducible.
//
// Domain kinds, by the first label of the domain:
//
//	store*     mailbox store: local parts "v…" exist, others are 550 5.1.1
//	catchall*  accepts everything: unknown (catch-all)
//	grey*      greylists: unknown (temporary)
//	acceptall* accepts, bounces later: unknown (accept-all)
//	flaky*     one verification in three times out (unknown), else a store
//	dead*      NXDOMAIN: invalid
//	nullmx*    null MX: invalid

// simConfig is a simulation run's settings.
type simConfig struct {
	Seed         uint64
	HonestLat    time.Duration // MX latency for honest identities' recipients
	AbuseLat     time.Duration // MX latency in the abuse scenarios
	Honest       int           // identities in the honest cohort
	Ratio        float64       // detector.ratio; <0: the default
	Quick        bool          // smaller volumes (go test)
	DetectorBase *app.Config   // nil: defaults
	Redis        string        // cluster.redis: play against Servers detectors sharing it; "" one detector
	Servers      int           // detectors with Redis (at least 2)
}

// simWorld is the modelled Internet: a Verifier with a cache.
type simWorld struct {
	lat   time.Duration
	mu    sync.Mutex
	cache map[string]callout.Result
	n     map[string]int // verifications per address (for flaky domains)
}

func newSimWorld(lat time.Duration) *simWorld {
	return &simWorld{lat: lat, cache: map[string]callout.Result{}, n: map[string]int{}}
}

func (w *simWorld) verdict(addr string) callout.Result {
	at := strings.LastIndexByte(addr, '@')
	local, domain := addr[:at], addr[at+1:]
	r := callout.Result{Address: addr}
	kind := domain
	if i := strings.IndexAny(kind, "0123456789."); i >= 0 {
		kind = kind[:i]
	}
	store := func() {
		if strings.HasPrefix(local, "v") {
			r.Status, r.Reason = callout.StatusValid, callout.ReasonAccepted
		} else {
			r.Status, r.Reason = callout.StatusInvalid, callout.ReasonNoMailbox
			r.Reply = callout.Reply{Code: 550, Enhanced: [3]int{5, 1, 1}, Text: "no such user"}
		}
	}
	switch kind {
	case "catchall":
		r.Status, r.Reason = callout.StatusUnknown, callout.ReasonCatchAll
	case "grey":
		r.Status, r.Reason = callout.StatusUnknown, callout.ReasonTemporary
	case "acceptall":
		r.Status, r.Reason = callout.StatusUnknown, callout.ReasonAcceptAll
	case "dead":
		r.Status, r.Reason = callout.StatusInvalid, callout.ReasonNXDomain
	case "nullmx":
		r.Status, r.Reason = callout.StatusInvalid, callout.ReasonNullMX
	case "flaky":
		w.mu.Lock()
		w.n[addr]++
		k := w.n[addr]
		w.mu.Unlock()
		if k%3 == 1 {
			r.Status, r.Reason = callout.StatusUnknown, callout.ReasonTimeout
		} else {
			store()
		}
	default:
		store()
	}
	return r
}

// invalid is the ground truth: does addr not exist?
func (w *simWorld) invalid(addr string) bool {
	r := w.verdict(addr)
	if strings.Contains(addr, "@flaky") {
		return !strings.HasPrefix(addr, "v")
	}
	return r.Status == callout.StatusInvalid
}

func (w *simWorld) Verify(ctx context.Context, addr string) callout.Result {
	if w.lat > 0 {
		t := time.NewTimer(w.lat)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return callout.Result{Address: addr, Status: callout.StatusUnknown, Reason: callout.ReasonCanceled}
		}
	}
	r := w.verdict(addr)
	if r.Status != callout.StatusUnknown || r.Reason == callout.ReasonCatchAll || r.Reason == callout.ReasonAcceptAll {
		w.mu.Lock()
		w.cache[addr] = r
		w.mu.Unlock()
	}
	return r
}

func (w *simWorld) Cached(addr string) (callout.Result, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	r, ok := w.cache[addr]
	r.Cached = true
	return r, ok
}

// simEvent is one RCPT: who, from where, to whom, when (virtual offset).
type simEvent struct {
	at     time.Duration
	seq    int
	id     string
	client string
	sender string
	rcpt   string
}

// simScenario is one row of the table.
type simScenario struct {
	name   string
	honest bool // its identities must never be blocked
	retry  time.Duration
	events []simEvent
	lat    time.Duration
}

// simRow is the outcome of a scenario.
type simRow struct {
	Name            string
	Identities      int
	Blocked         int
	FalseBlocks     int
	Accepted        int // recipients answered DUNNO before the identity's block (all, for honest)
	AcceptedInvalid int // of those, recipients that do not exist
	Deferred        int
	BlockCounts     []string // trigger:count at each block
	Reports         int      // block reports (one per block event, fleet-wide)
	BlockedAfter    time.Duration
	P99             time.Duration // answer latency p99
	Honest          bool
}

type simNotifier struct {
	mu     sync.Mutex
	events []detector.Event
}

func (n *simNotifier) Notify(_ context.Context, ev detector.Event) error {
	n.mu.Lock()
	n.events = append(n.events, ev)
	n.mu.Unlock()
	return nil
}

type simBlocklist struct {
	mu sync.Mutex
	m  map[string]string
}

func (b *simBlocklist) Blocked(id string) (string, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	a, ok := b.m[id]
	return a, ok
}

func (b *simBlocklist) Block(_ context.Context, id, action, text string) error {
	b.mu.Lock()
	b.m[id] = action + " " + text
	b.mu.Unlock()
	return nil
}

// simDetectorConfig returns the detector configuration of rcptguard's
// defaults (or of base).
func simDetectorConfig(sc simConfig) (detector.Config, error) {
	cfg := sc.DetectorBase
	if cfg == nil {
		c, err := app.LoadConfig("")
		if err != nil {
			return detector.Config{}, err
		}
		cfg = c
	}
	dc := cfg.Detector
	c := detector.Config{Limit: dc.Limit, Period: dc.Period.D(), WarnAt: dc.WarnAt, Action: dc.Action,
		Mode: detector.Mode(dc.Mode), Wait: dc.Wait.D(), Ratio: dc.Ratio, RatioMin: dc.RatioMin,
		LongPeriod: dc.LongPeriod.D(), LongLimit: dc.LongLimit, ProbeRate: cfg.Callout.PerIdentityRate}
	if sc.Ratio >= 0 {
		c.Ratio = sc.Ratio
	}
	return c, nil
}

// simFleet is what a scenario plays against: one detector, or with
// simConfig.Redis several sharing a real Redis, the requests alternating
// between them. The modelled Internet (with its verdict cache, standing
// for the fleet's shared one), the blocklist (standing for the fleet's,
// which Redis keeps in step within 2 s: a virtual tick is a second or
// more) and the abuse desk are one for all.
type simFleet struct {
	dets     []*detector.Detector
	clusters []*cluster.Cluster
	world    *simWorld
	notes    *simNotifier
	clock    atomic.Int64
	start    time.Time
}

func newSimFleet(sc simConfig, s simScenario) (*simFleet, error) {
	dc, err := simDetectorConfig(sc)
	if err != nil {
		return nil, err
	}
	f := &simFleet{world: newSimWorld(s.lat), notes: &simNotifier{}, start: time.Date(2026, 11, 23, 8, 0, 0, 0, time.UTC)}
	f.clock.Store(f.start.UnixNano())
	dc.Verifier, dc.Blocklist, dc.Notifier = f.world, &simBlocklist{m: map[string]string{}}, f.notes
	dc.Now = func() time.Time { return time.Unix(0, f.clock.Load()) }
	n := 1
	prefix := ""
	if sc.Redis != "" {
		n = max(sc.Servers, 2)
		var rnd [8]byte
		_, _ = crand.Read(rnd[:])
		prefix = "rcptguard-sim:" + hex.EncodeToString(rnd[:]) + ":" // a scenario's identities start afresh
	}
	for range n {
		if sc.Redis != "" {
			cl, err := cluster.New(cluster.Config{URL: sc.Redis, KeyPrefix: prefix, Period: dc.Period, LongPeriod: dc.LongPeriod,
				Logger: slog.New(slog.DiscardHandler), Now: dc.Now})
			if err != nil {
				f.close()
				return nil, err
			}
			f.clusters = append(f.clusters, cl)
			dc.Shared = cl
		}
		d, err := detector.New(dc)
		if err != nil {
			f.close()
			return nil, err
		}
		f.dets = append(f.dets, d)
	}
	return f, nil
}

func (f *simFleet) close() {
	for _, d := range f.dets {
		d.Close(0)
	}
	for _, c := range f.clusters {
		_ = c.Close()
	}
}

// detector returns the server that answers e: they take turns.
func (f *simFleet) detector(e simEvent) *detector.Detector { return f.dets[e.seq%len(f.dets)] }

// settle waits until every verification has ended and the batched valid
// verdicts are in Redis, so that a tick's outcome does not depend on
// wall-clock timing.
func (f *simFleet) settle(ctx context.Context) {
	for _, d := range f.dets {
		for d.InFlight() > 0 {
			time.Sleep(50 * time.Microsecond)
		}
	}
	for _, c := range f.clusters {
		c.Flush(ctx)
	}
}

// simPlay is a scenario being played: the row being filled and the
// identities' state.
type simPlay struct {
	s     simScenario
	f     *simFleet
	mu    sync.Mutex
	row   simRow
	ids   map[string]*simIDState
	lat   []time.Duration
	queue []simEvent
	seq   int
}

type simIDState struct {
	blockedAt time.Duration
	blocked   bool
}

// runScenario plays one scenario and returns its row.
func runScenario(ctx context.Context, sc simConfig, s simScenario) (simRow, error) {
	f, err := newSimFleet(sc, s)
	if err != nil {
		return simRow{}, err
	}
	defer f.close()
	p := &simPlay{s: s, f: f, row: simRow{Name: s.name, Honest: s.honest}, ids: map[string]*simIDState{},
		queue: slices.Clone(s.events), seq: len(s.events)}
	for _, e := range p.queue {
		if p.ids[e.id] == nil {
			p.ids[e.id] = &simIDState{}
		}
	}
	p.row.Identities = len(p.ids)
	for len(p.queue) > 0 {
		if err := ctx.Err(); err != nil {
			return p.row, err
		}
		p.tick(ctx)
	}
	return p.finish(), nil
}

// tick plays the requests of the next virtual instant, one goroutine per
// connection (identity and client address), and waits for their ends.
func (p *simPlay) tick(ctx context.Context) {
	slices.SortFunc(p.queue, func(a, b simEvent) int {
		return cmp.Or(cmp.Compare(a.at, b.at), cmp.Compare(a.seq, b.seq))
	})
	now := p.queue[0].at
	n := 0
	for n < len(p.queue) && p.queue[n].at == now {
		n++
	}
	tick := p.queue[:n]
	p.queue = slices.Clone(p.queue[n:])
	p.f.clock.Store(p.f.start.Add(now).UnixNano())
	conns := map[string][]simEvent{}
	var order []string
	for _, e := range tick {
		k := e.id + " " + e.client
		if conns[k] == nil {
			order = append(order, k)
		}
		conns[k] = append(conns[k], e)
	}
	var wg sync.WaitGroup
	for _, k := range order {
		wg.Go(func() {
			for _, e := range conns[k] {
				if !p.ask(ctx, e, now) {
					return // the abuser's mail is held from now on
				}
			}
		})
	}
	wg.Wait()
	p.f.settle(ctx)
}

// ask sends one request and books its answer; false once the identity is
// blocked.
func (p *simPlay) ask(ctx context.Context, e simEvent, now time.Duration) bool {
	p.mu.Lock()
	st := p.ids[e.id]
	stop := st.blocked
	p.mu.Unlock()
	if stop {
		return false
	}
	req := &detector.Request{Request: "smtpd_access_policy", ProtocolState: "RCPT", SASLUsername: e.id,
		Sender: e.sender, Recipient: e.rcpt, ClientAddress: e.client}
	t0 := time.Now()
	a := p.f.detector(e).Decide(ctx, req)
	el := time.Since(t0)
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case a == detector.ActionDunno:
		p.row.Accepted++
		if p.f.world.invalid(e.rcpt) {
			p.row.AcceptedInvalid++
		}
		if p.s.honest {
			p.lat = append(p.lat, el)
		}
	case a == detector.DeferAction:
		p.row.Deferred++
		if p.s.honest {
			p.lat = append(p.lat, el)
		}
		p.seq++
		e.at, e.seq = now+p.s.retry, p.seq
		p.queue = append(p.queue, e)
	default:
		if !st.blocked {
			st.blocked, st.blockedAt = true, now
		}
	}
	return true
}

// finish fills the row's totals.
func (p *simPlay) finish() simRow {
	row := p.row
	for _, st := range p.ids {
		if st.blocked {
			row.Blocked++
			row.BlockedAfter = max(row.BlockedAfter, st.blockedAt)
		}
	}
	if p.s.honest {
		row.FalseBlocks = row.Blocked
	}
	for _, ev := range p.f.notes.events {
		if ev.Kind == detector.EventBlock {
			row.Reports++
			row.BlockCounts = append(row.BlockCounts, fmt.Sprintf("%s %d", ev.Trigger, ev.Count))
		}
	}
	slices.Sort(row.BlockCounts)
	row.BlockCounts = slices.Compact(row.BlockCounts)
	if len(p.lat) > 0 {
		slices.Sort(p.lat)
		row.P99 = p.lat[(len(p.lat)*99)/100]
	}
	return row
}

// simGen draws the scenarios' events from the seed, in a fixed order.
type simGen struct {
	sc  simConfig
	rng *rand.Rand
	seq int
}

func (g *simGen) ev(at time.Duration, id, client, sender, rcpt string) simEvent {
	g.seq++
	return simEvent{at: at, seq: g.seq, id: id, client: client, sender: sender, rcpt: rcpt}
}

func (g *simGen) pick(list []string) string { return list[g.rng.IntN(len(list))] }

func (g *simGen) storeValid() string {
	return fmt.Sprintf("v%d@store%d.test", g.rng.IntN(5000), g.rng.IntN(40))
}

// simScenarios builds the scenarios from the seed.
func simScenarios(sc simConfig) []simScenario {
	g := &simGen{sc: sc, rng: rand.New(rand.NewPCG(sc.Seed, sc.Seed^0x9e3779b97f4a7c15))}
	out := []simScenario{g.honest(), g.marketing()}
	// Compromised accounts. The list: fresh addresses at many stores.
	out = append(out,
		g.burst("burst 1,000 in 50s, 50% invalid", 1000, 50*time.Second, 50, 5, "victim"),
		g.burst("burst 1,000 in 50s, 80% invalid", 1000, 50*time.Second, 80, 5, "victim"),
		g.burst("1,000/min for 90s, 80% invalid", 1500, 90*time.Second, 80, 10, "victim"),
		g.burst("botnet, 60 IPs, 50% invalid", 1000, 50*time.Second, 50, 60, "victim"),
		g.burst("null sender, 80% invalid", 1000, 50*time.Second, 80, 5, "<>"),
	)
	return append(out, g.ramp(), g.lowAndSlow())
}

// honest is the honest cohort: a working day compressed into two hours,
// messages of one to five recipients from a contact list, some mistakes.
func (g *simGen) honest() simScenario {
	honest := simScenario{name: "honest cohort", honest: true, retry: 5 * time.Minute, lat: g.sc.HonestLat}
	msgs := 12
	if g.sc.Quick {
		msgs = 6
	}
	for i := range g.sc.Honest {
		id := fmt.Sprintf("user%d@customer.test", i)
		client := fmt.Sprintf("198.51.100.%d", i%250+1)
		kind := i % 4
		contacts := g.contacts(kind)
		for m := range msgs {
			at := time.Duration(g.rng.Int64N(int64(2 * time.Hour))).Truncate(time.Minute)
			for range 1 + g.rng.IntN(5) {
				r := g.pick(contacts)
				if kind == 0 && g.rng.IntN(20) == 0 { // a typo: local part or domain
					if g.rng.IntN(2) == 0 {
						r = "x" + r[1:]
					} else {
						r = r[:strings.IndexByte(r, '@')] + fmt.Sprintf("@dead-typo%d.test", g.rng.IntN(100))
					}
				}
				honest.events = append(honest.events, g.ev(at, id, client, id, r))
			}
			honest.events = append(honest.events, g.oldLists(kind, i, m, at, id, client)...)
		}
	}
	return honest
}

// contacts returns an honest identity's contact list: at mailbox stores,
// or for kind 3 at domains that cannot be judged.
func (g *simGen) contacts(kind int) []string {
	contacts := make([]string, 30)
	for j := range contacts {
		switch {
		case kind == 3 && j%3 == 0:
			contacts[j] = fmt.Sprintf("v%d@%s%d.test", g.rng.IntN(5000), g.pick([]string{"grey", "catchall", "acceptall", "flaky"}), g.rng.IntN(20))
		case kind == 3:
			contacts[j] = fmt.Sprintf("v%d@%s%d.test", g.rng.IntN(5000), g.pick([]string{"grey", "catchall"}), g.rng.IntN(20))
		default:
			contacts[j] = g.storeValid()
		}
	}
	return contacts
}

// oldLists returns the honest mistakes that look most like abuse, sent
// with message m of identity i.
func (g *simGen) oldLists(kind, i, m int, at time.Duration, id, client string) []simEvent {
	var evs []simEvent
	// Departed colleagues: the old team list, 20 of whom 6 left, mailed
	// three times.
	if kind == 1 && m%4 == 0 {
		for k := range 20 {
			local := fmt.Sprintf("v%d", 9000+k+i*20)
			if k < 6 {
				local = fmt.Sprintf("x%d", 9000+k+i*20)
			}
			evs = append(evs, g.ev(at, id, client, id, local+"@store99.test"))
		}
	}
	// An old address book: 50 addresses at a company that is gone (its
	// domain no longer exists), and a few live ones.
	if kind == 2 && m == 0 {
		dead := fmt.Sprintf("dead-company%d.test", i)
		if i%8 == 6 {
			dead = fmt.Sprintf("nullmx-company%d.test", i)
		}
		for k := range 50 {
			evs = append(evs, g.ev(at, id, client, id, fmt.Sprintf("v%d@%s", k, dead)))
		}
		for range 10 {
			evs = append(evs, g.ev(at, id, client, id, g.storeValid()))
		}
	}
	return evs
}

// marketing is a marketing list: 1,500 recipients, 5% stale, sent by an
// MTA at 20 a second that retries deferred recipients after 5 minutes.
func (g *simGen) marketing() simScenario {
	mk := simScenario{name: "marketing list, 5% stale", honest: true, retry: 5 * time.Minute, lat: g.sc.AbuseLat}
	listN := 1500
	if g.sc.Quick {
		listN = 600
	}
	for k := range listN {
		local := fmt.Sprintf("v%d", k)
		if k%20 == 7 {
			local = fmt.Sprintf("x%d", k)
		}
		mk.events = append(mk.events, g.ev(time.Duration(k/20)*time.Second, "news@customer.test", "203.0.113.5", "news@customer.test",
			fmt.Sprintf("%s@store%d.test", local, k%40)))
	}
	return mk
}

// burst is a compromised account mailing n fresh addresses over per,
// invalidPct of them invalid, from clients addresses.
func (g *simGen) burst(name string, n int, per time.Duration, invalidPct int, clients int, sender string) simScenario {
	s := simScenario{name: name, retry: time.Minute, lat: g.sc.AbuseLat}
	id := "victim@customer.test"
	for k := range n {
		local := fmt.Sprintf("v%d", 100000+k)
		if g.rng.IntN(100) < invalidPct {
			local = fmt.Sprintf("x%d", 100000+k)
		}
		client := fmt.Sprintf("192.0.2.%d", k%clients+1)
		if clients > 250 {
			client = fmt.Sprintf("10.%d.%d.1", k%clients/250, k%clients%250)
		}
		snd := id
		if sender == "<>" {
			snd = ""
		}
		s.events = append(s.events, g.ev(time.Duration(k)*per/time.Duration(n)/time.Second*time.Second, id, client, snd,
			fmt.Sprintf("%s@store%d.test", local, g.rng.IntN(40))))
	}
	return s
}

// ramp is the smart ramp: 30% invalid (under the ratio), starting at one
// a minute and one more every minute, under the probe cap.
func (g *simGen) ramp() simScenario {
	ramp := simScenario{name: "smart ramp, 30% invalid", retry: time.Minute, lat: g.sc.AbuseLat}
	k := 0
	for m := range 110 {
		for j := range min(m+1, 110) {
			local := fmt.Sprintf("v%d", 200000+k)
			if g.rng.IntN(100) < 30 {
				local = fmt.Sprintf("x%d", 200000+k)
			}
			k++
			ramp.events = append(ramp.events, g.ev(time.Duration(m)*time.Minute+time.Duration(j*59/(m+1))*time.Second,
				"ramp@customer.test", "192.0.2.77", "ramp@customer.test", fmt.Sprintf("%s@store%d.test", local, g.rng.IntN(40))))
		}
	}
	return ramp
}

// lowAndSlow: 60 an hour, 80% invalid, for two days.
func (g *simGen) lowAndSlow() simScenario {
	slow := simScenario{name: "low and slow, 60/h, 80% invalid", retry: 10 * time.Minute, lat: g.sc.AbuseLat}
	for m := range 48 * 60 {
		local := fmt.Sprintf("v%d", 300000+m)
		if g.rng.IntN(100) < 80 {
			local = fmt.Sprintf("x%d", 300000+m)
		}
		slow.events = append(slow.events, g.ev(time.Duration(m)*time.Minute, "slow@customer.test", "192.0.2.99", "slow@customer.test",
			fmt.Sprintf("%s@store%d.test", local, g.rng.IntN(40))))
	}
	return slow
}

// runSim plays every scenario and writes the table.
func runSim(ctx context.Context, sc simConfig, out io.Writer) ([]simRow, error) {
	var rows []simRow
	for _, s := range simScenarios(sc) {
		r, err := runScenario(ctx, sc, s)
		if err != nil {
			return rows, fmt.Errorf("%s: %w", s.name, err)
		}
		rows = append(rows, r)
	}
	writeSimTable(out, rows)
	return rows, nil
}

func writeSimTable(out io.Writer, rows []simRow) {
	fmt.Fprintln(out, "| scenario | identities | false blocks | blocked | accepted before block (invalid) | deferred | block at | blocked after | answer p99 |")
	fmt.Fprintln(out, "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
	for _, r := range rows {
		fb, blocked, at, after, p99 := "—", fmt.Sprint(r.Blocked), strings.Join(r.BlockCounts, ", "), "—", "—"
		if r.Honest {
			fb = fmt.Sprint(r.FalseBlocks)
		}
		if r.Blocked > 0 {
			after = r.BlockedAfter.String()
		}
		if at == "" {
			at = "—"
		}
		if r.Honest && r.P99 > 0 {
			p99 = fmt.Sprintf("%.2f ms", float64(r.P99.Microseconds())/1000)
		}
		fmt.Fprintf(out, "| %s | %d | %s | %s | %d (%d) | %d | %s | %s | %s |\n", r.Name, r.Identities, fb, blocked,
			r.Accepted, r.AcceptedInvalid, r.Deferred, at, after, p99)
	}
}

const simHelp = `Plays scenarios of honest and compromised identities against rcptguard's
detector with its default configuration, in virtual time, against a modelled
Internet (see sim.go), and prints one Markdown table row per scenario.
`

func cmdSim(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("sim", "sim [flags]", simHelp, stderr)
	var sc simConfig
	fs.Uint64Var(&sc.Seed, "seed", 1, "seed of the recipient lists")
	fs.DurationVar(&sc.HonestLat, "honest-mx-latency", 500*time.Millisecond, "MX latency for the honest cohort")
	fs.DurationVar(&sc.AbuseLat, "mx-latency", 2*time.Millisecond, "MX latency in the other scenarios")
	fs.IntVar(&sc.Honest, "honest", 312, "identities in the honest cohort")
	fs.Float64Var(&sc.Ratio, "ratio", -1, "detector.ratio (default: rcptguard's default)")
	config := fs.String("config", "", "rcptguard configuration whose [detector] and callout.per_identity_rate to use (default: the defaults)")
	fs.StringVar(&sc.Redis, "redis", "", "cluster.redis: play each scenario against -servers detectors sharing this Redis, requests taking turns (keys under \"rcptguard-sim:RANDOM:\", expiring with the window)")
	fs.IntVar(&sc.Servers, "servers", 2, "detectors sharing -redis")
	if err := parse(fs, args); err != nil {
		return err
	}
	if sc.Honest < 1 || sc.Honest > 100_000 || sc.HonestLat < 0 || sc.AbuseLat < 0 || sc.Ratio > 1 || sc.Servers < 2 || sc.Servers > 64 {
		return fmt.Errorf("%w: -honest 1..100000, latencies ≥ 0, -ratio ≤ 1, -servers 2..64", errUsage)
	}
	if sc.Redis != "" {
		if err := cluster.CheckURL(sc.Redis); err != nil {
			return fmt.Errorf("%w: -redis: %v", errUsage, err)
		}
	}
	if *config != "" {
		c, err := app.LoadConfig(*config)
		if err != nil {
			return err
		}
		sc.DetectorBase = c
	}
	_, err := runSim(ctx, sc, stdout)
	return err
}
