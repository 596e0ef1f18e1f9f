package detector

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	ident "github.com/rcptguard/rcptguard/blocklist/identity"
	"github.com/rcptguard/rcptguard/callout"
	"github.com/rcptguard/rcptguard/callout/textfmt"
)

// Verifier gives the verdict on one recipient. It must keep verifying
// after ctx ends so that a later call for the same address gets the
// result (the callout package does).
type Verifier interface {
	Verify(ctx context.Context, addr string) callout.Result
}

// CachedVerifier is a Verifier that can also answer from its cache alone,
// without blocking; the detector then skips the timer a wait needs.
type CachedVerifier interface {
	Cached(addr string) (callout.Result, bool)
}

// Blocklist is the list of blocked identities.
type Blocklist interface {
	// Blocked returns the Postfix action for a blocked identity. For a
	// block not yet on disk it may wait a little (about a second) for the
	// write in progress: an identity answered blocked must still be
	// blocked after a crash.
	Blocked(identity string) (action string, ok bool)
	// Block adds identity with the Postfix action word and its text. The
	// blocklist bounds its own wait for the disk; an error means the
	// entry is not written yet: the block holds in memory, and the
	// blocklist writes it as soon as the disk takes it.
	Block(ctx context.Context, identity, action, text string) error
}

// Notifier tells people about blocks and warnings. It must not block for
// long: the answer to Postfix waits for it.
type Notifier interface {
	Notify(ctx context.Context, ev Event) error
}

// EventKind says what an Event is about.
type EventKind string

// Event kinds.
const (
	EventBlock      EventKind = "block"       // the identity was blocked
	EventWouldBlock EventKind = "would-block" // monitor mode: it would have been blocked
	EventWarning    EventKind = "warning"     // the identity reached warn_at of its limit
)

// Event is what a Notifier is told: the facts of one block or warning.
type Event struct {
	Kind     EventKind
	Identity string
	Time     time.Time
	Mode     Mode
	Trigger  Trigger       // the limit that was passed (blocks only)
	Count    int           // invalid recipients in the window (for the ratio: dead domains once)
	Limit    int           // the limit passed (for the ratio: ratio_min)
	Judged   int           // ratio trigger: valid and invalid recipients in the window
	Period   time.Duration // the window
	Action   string        // the action answered from now on ("" for warnings)
	Evidence Evidence
}

// Mode is enforce or monitor.
type Mode string

// Modes.
const (
	ModeEnforce Mode = "enforce" // block: blocklist entry and the block action
	ModeMonitor Mode = "monitor" // log and notify only, always DUNNO
)

// Config holds a Detector's options.
type Config struct {
	Verifier  Verifier  // required
	Blocklist Blocklist // required
	Notifier  Notifier  // nil: nobody is told
	Logger    *slog.Logger
	Metrics   *Metrics // nil: none
	Now       func() time.Time

	Limit         int           // distinct invalid recipients per identity per Period; 0: unlimited
	Period        time.Duration // default 1h
	WarnAt        float64       // fraction of the limit that triggers one warning per period; 0: none
	Action        string        // Postfix action for blocked identities; default "HOLD"
	Mode          Mode          // default enforce
	Wait          time.Duration // longest a policy answer waits for a verification; default 5s
	RelayNetworks []netip.Prefix
	LocalDomains  []string
	Exempt        []string
	// Limits overrides Limit per identity ("user@example.com") or per
	// domain of the identity ("*@example.com").
	Limits map[string]int
	// LongPeriod is a second, longer window (say 24h) with its own limit,
	// LongLimit, for senders slow enough to stay under Limit per Period;
	// 0: none. LongLimit 0 means three times the identity's limit.
	LongPeriod time.Duration
	LongLimit  int
	// Ratio and RatioMin: block also when, in the Period window, at least
	// RatioMin invalid recipients make up at least Ratio of the judged
	// (valid and invalid) recipients; recipients at a domain that takes
	// no mail at all count once per domain. Ratio 0: off.
	Ratio    float64
	RatioMin int
	// ProbeRate caps the verifications per identity that the cache cannot
	// answer, in any sliding minute; past it the answer is DeferAction
	// (the client retries later, nothing is accepted unjudged). 0: no cap.
	ProbeRate int
	// MaxIdentities is the ceiling of tracked identities past which the
	// least recently active unblocked ones are dropped; 0: the default.
	MaxIdentities int
	// Shared counts with the other servers of a fleet; nil: alone.
	Shared SharedCounter
	// SharedTimeout bounds one call of Shared (the fleet's own deadline,
	// cluster.timeout); 0: DefaultSharedTimeout.
	SharedTimeout time.Duration
}

// FleetMark ends the blocklist text of a block a server made because
// another server of the fleet crossed the limit first: that one reports it.
const FleetMark = "[blocked by another server]"

// DeferAction is the answer for a recipient rcptguard could not judge in
// time for an identity that could be crossing a limit with it, or past
// the identity's probe cap: Postfix answers 450 to that RCPT only, and the
// client retries later. Nothing is accepted unjudged, nothing is lost.
const DeferAction Action = "DEFER_IF_PERMIT 4.7.1 rcptguard: recipient not verified yet, try again later"

// Detector makes the decision for each policy request. Create it with New;
// it is safe for concurrent use.
type Detector struct {
	cfg           atomicConfig
	verify        Verifier
	cached        CachedVerifier // verify, when it can answer from a cache; else nil
	block         Blocklist
	notify        Notifier
	log           *slog.Logger
	metrics       *Metrics
	now           func() time.Time
	limiter       *Limiter
	shared        SharedCounter
	sharedTimeout time.Duration // bounds one call of shared
	keys          atomic.Uint64 // numbers the reservations with shared
	keyBase       string        // this detector's prefix of reservation keys
	busy          atomic.Int64  // verifications running in the background

	// sleep waits d or until ctx ends (false); tests replace it.
	sleep func(ctx context.Context, d time.Duration) bool

	ctx    context.Context // ends at Close: background verifications
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// policyConfig is the part of Config that SIGHUP can change.
type policyConfig struct {
	limit    int
	warnAt   float64
	action   string
	mode     Mode
	wait     time.Duration
	relays   []netip.Prefix
	local    map[string]bool
	exempt   map[string]bool
	limits   map[string]int
	probe    int
	period   time.Duration
	periodTx string
	long     time.Duration
	longTx   string
	longLim  int
	ratio    float64
	ratioMin int
}

type atomicConfig struct {
	mu sync.RWMutex
	c  *policyConfig
}

func (a *atomicConfig) load() *policyConfig {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.c
}

// New validates cfg and returns a Detector.
func New(cfg Config) (*Detector, error) {
	if cfg.Verifier == nil || cfg.Blocklist == nil {
		return nil, errors.New("detector: Verifier and Blocklist are required")
	}
	if cfg.Period == 0 {
		cfg.Period = time.Hour
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	pc, err := newPolicyConfig(cfg)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	d := &Detector{
		verify:        cfg.Verifier,
		block:         cfg.Blocklist,
		notify:        cfg.Notifier,
		log:           cfg.Logger,
		metrics:       cfg.Metrics,
		now:           cfg.Now,
		limiter:       newLimiter(cfg.Period, cfg.LongPeriod),
		shared:        cfg.Shared,
		sharedTimeout: cmp.Or(cfg.SharedTimeout, DefaultSharedTimeout),
		keyBase:       reservationBase(),
		sleep:         sleepCtx,
		ctx:           ctx,
		cancel:        cancel,
	}
	d.limiter.setMaxIdentities(cfg.MaxIdentities, cfg.Logger, cfg.Metrics)
	d.cached, _ = cfg.Verifier.(CachedVerifier)
	d.cfg.c = pc
	return d, nil
}

func newPolicyConfig(cfg Config) (*policyConfig, error) {
	// The values are checked where they are read, with the key that set
	// them (cmd/rcptguard's configuration); what is left here are the
	// invariants the counting relies on.
	if cfg.MaxIdentities < 0 {
		return nil, fmt.Errorf("detector: max identities %d is negative", cfg.MaxIdentities)
	}
	if cfg.Action == "" {
		cfg.Action = "HOLD"
	}
	if cfg.Mode != ModeMonitor {
		cfg.Mode = ModeEnforce // what is not monitoring blocks
	}
	if cfg.Wait <= 0 {
		cfg.Wait = 5 * time.Second
	}
	if cfg.LongPeriod < 0 || (cfg.LongPeriod > 0 && cfg.LongPeriod <= cfg.Period) {
		return nil, fmt.Errorf("detector: long_period %s is not longer than period %s", cfg.LongPeriod, cfg.Period)
	}
	pc := &policyConfig{
		limit:    cfg.Limit,
		warnAt:   cfg.WarnAt,
		action:   cfg.Action,
		mode:     cfg.Mode,
		wait:     cfg.Wait,
		relays:   cfg.RelayNetworks,
		local:    map[string]bool{},
		exempt:   map[string]bool{},
		limits:   map[string]int{},
		probe:    cfg.ProbeRate,
		period:   cfg.Period,
		periodTx: textfmt.FormatPeriod(cfg.Period),
		long:     cfg.LongPeriod,
		longLim:  cfg.LongLimit,
		ratio:    cfg.Ratio,
		ratioMin: cfg.RatioMin,
	}
	if cfg.LongPeriod > 0 {
		pc.longTx = textfmt.FormatPeriod(cfg.LongPeriod)
	}
	for _, d := range cfg.LocalDomains {
		pc.local[strings.ToLower(strings.TrimSuffix(d, "."))] = true
	}
	for _, e := range cfg.Exempt {
		pc.exempt[ident.Fold(e)] = true
	}
	for k, v := range cfg.Limits {
		if v < 0 {
			return nil, fmt.Errorf("detector: limit for %s is negative", k)
		}
		pc.limits[ident.Fold(k)] = v
	}
	return pc, nil
}

// Reload replaces the limits, exemptions, local domains, relay networks,
// warn_at, action, mode, wait, ratio and long_limit. The periods cannot
// change while running.
func (d *Detector) Reload(cfg Config) error {
	cur := d.cfg.load()
	if cfg.Period == 0 {
		cfg.Period = cur.period
	}
	if cfg.Period != cur.period {
		return fmt.Errorf("detector: period cannot change without a restart (%s → %s)", cur.period, cfg.Period)
	}
	if cfg.LongPeriod != cur.long {
		return fmt.Errorf("detector: long_period cannot change without a restart (%s → %s)", cur.long, cfg.LongPeriod)
	}
	pc, err := newPolicyConfig(cfg)
	if err != nil {
		return err
	}
	d.cfg.mu.Lock()
	d.cfg.c = pc
	d.cfg.mu.Unlock()
	d.limiter.setMax(cfg.MaxIdentities)
	return nil
}

// cachedVerdict asks the verifier's cache, when it has one.
func (d *Detector) cachedVerdict(rcpt string) (callout.Result, bool) {
	if d.cached == nil {
		return callout.Result{}, false
	}
	return d.cached.Cached(rcpt)
}

// Close lets background verifications (those that outlived their policy
// answer) end and count, waiting at most grace, then cancels the rest and
// waits for them.
func (d *Detector) Close(grace time.Duration) {
	done := make(chan struct{})
	go func() { d.wg.Wait(); close(done) }()
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
	}
	d.cancel()
	<-done
}

// Limiter gives access to the per-identity state, for the wiring
// (sweeping, forgetting unblocked identities).
func (d *Detector) Limiter() *Limiter { return d.limiter }

// Decide answers one policy request. It is the whole decision, top to
// bottom (the design's "Decision, per policy request"); decide takes it,
// and the one exit here logs, counts and returns the answer.
func (d *Detector) Decide(ctx context.Context, req *Request) Action {
	req.logDropped(d.log)
	return d.answer(req, d.decide(ctx, req))
}

// decision is the answer to one request and what its decision line says.
type decision struct {
	action Action
	id     string
	res    *callout.Result // the recipient's verdict; nil: none
	note   string
	count  int
	quiet  bool // no decision line: the request is not ours, or its line comes with the late verdict
}

// dunnoQuiet answers DUNNO with no decision line.
var dunnoQuiet = decision{action: ActionDunno, quiet: true}

// decide takes the steps of the decision in order; each step that settles
// the request returns its decision.
func (d *Detector) decide(ctx context.Context, req *Request) decision {
	// Only recipient checks are ours.
	if req.Request != "smtpd_access_policy" || !strings.EqualFold(req.ProtocolState, "RCPT") {
		return dunnoQuiet
	}
	pc := d.cfg.load()

	// Who is sending: the SASL login, or a client in relay_networks.
	id, ok := identity(req, pc.relays)
	if !ok {
		return dunnoQuiet
	}
	if id == "" {
		d.log.Warn("identity refused", slog.Any("reason", ident.Check(req.SASLUsername)),
			slog.String("identity", strconv.Quote(textfmt.Cut(req.SASLUsername, 200))),
			slog.String("client", req.ClientAddress), slog.String("queue_id", req.QueueID))
		return dunnoQuiet
	}
	rcpt := req.Recipient

	// A blocked identity gets the block action, whatever the recipient.
	if action, blocked := d.block.Blocked(id); blocked {
		d.limiter.Note(id, d.now(), func(e *evidence) {
			e.addClient(req.ClientAddress, req.ClientName)
			e.addQueueID(req.QueueID)
		})
		if pc.mode == ModeMonitor {
			return decision{action: ActionDunno, id: id, note: "blocked-monitor"}
		}
		return decision{action: Action(action), id: id, note: "blocked"}
	}

	// Not counted: exempt identities and local recipients. A null sender
	// is judged like any other: bounces and auto-replies the server
	// makes itself are not authenticated and never get here, while a
	// stolen login can send with MAIL FROM:<> (the design's step 4).
	switch {
	case pc.exempt[id]:
		return decision{action: ActionDunno, id: id, note: "exempt"}
	case pc.local[recipientDomain(rcpt)]:
		return decision{action: ActionDunno, id: id, note: "local-domain"}
	}
	lim := pc.limitsFor(id)

	// A verdict at hand is judged now; any other recipient is a probe.
	if res, ok := d.cachedVerdict(rcpt); ok && !unjudged(res.Reason) {
		return d.judgeCached(ctx, req, id, res, pc, lim)
	}
	return d.startProbe(ctx, req, id, pc, lim)
}

// judgeCached counts a verdict at hand now. Only an invalid one can make
// this request the one that crosses a limit, and then only if it cannot be
// sure that the verifications still in flight will not: then it waits.
func (d *Detector) judgeCached(ctx context.Context, req *Request, id string, res callout.Result, pc *policyConfig, lim Thresholds) decision {
	d.metrics.verified(res, 0)
	st := d.shareVerdict(ctx, id, "", &res, d.limiter.judge(id, &res, d.now(), lim), lim)
	a, count := d.record(ctx, req, id, res, st, lim)
	d.limiter.wake(id)
	if a != ActionDunno || res.Status != callout.StatusInvalid || st.Safe || pc.mode == ModeMonitor {
		return decision{action: a, id: id, res: &res, count: count}
	}
	return d.await(ctx, req, id, &res, nil, pc, lim)
}

// startProbe verifies an uncached recipient in the background: within the
// identity's probe cap, or deferred (the client retries; nothing is
// accepted unjudged).
func (d *Detector) startProbe(ctx context.Context, req *Request, id string, pc *policyConfig, lim Thresholds) decision {
	rcpt := req.Recipient
	if !d.takeProbe(ctx, id, pc.probe) {
		res := callout.Result{Address: rcpt, Status: callout.StatusUnknown, Reason: reasonProbeCap,
			Detail: fmt.Sprintf("more than %d verifications within a minute for this identity (callout.per_identity_rate)", pc.probe)}
		if pc.mode == ModeMonitor {
			return decision{action: ActionDunno, id: id, res: &res, note: "probe-rate-monitor"}
		}
		return decision{action: DeferAction, id: id, res: &res, note: "probe-rate"}
	}
	p := &probe{done: make(chan struct{})}
	st := d.shareReserve(ctx, id, p, d.limiter.Reserve(id, d.now(), lim), lim)
	// Far from every limit even if everything in flight turns out invalid:
	// the request is accepted before the probe starts, so whatever comes
	// back — even a cap's instant "rate-limited" — is owed and judged late
	// (retried in the background), never turned into a defer by a race.
	early := (st.Safe || pc.mode == ModeMonitor) && p.accept()
	d.busy.Add(1)
	d.wg.Add(1)
	go d.run(*req, id, rcpt, p, lim) // *req: the server reuses it for the next request
	if early {
		// The verdict counts when it arrives. Its decision line is
		// written then, with the verdict (note "late").
		return dunnoQuiet
	}
	return d.await(ctx, req, id, nil, p, pc, lim)
}

// probe is one verification running in the background for a request.
type probe struct {
	mu       sync.Mutex
	accepted bool // the request was answered DUNNO before the verdict
	answered bool // the request was answered otherwise (defer, block)
	done     chan struct{}
	res      callout.Result // set before done is closed
	key      string         // its reservation with the fleet's shared counter, "" none
}

// accept marks the request answered DUNNO before its verdict; false when
// the verdict is in already (the caller must look at it).
func (p *probe) accept() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.done:
		return false
	default:
	}
	p.accepted = true
	return true
}

// refuse marks the request answered with a defer or a block.
func (p *probe) refuse() {
	p.mu.Lock()
	p.answered = true
	p.mu.Unlock()
}

// finish publishes the verdict and tells whether the request was
// answered before it (so the verdict's decision line is still to write).
func (p *probe) finish(res callout.Result) (answeredBefore bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.res = res
	close(p.done)
	return p.accepted || p.answered
}

// owed reports whether the request was answered DUNNO before its
// verdict, which res (no verdict) cannot settle: the verification must be
// made again. When it was not, res is published at once, so the request
// can no longer be accepted and defers.
func (p *probe) owed(res callout.Result) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.accepted {
		return true
	}
	p.res = res
	close(p.done)
	return false
}

// reasonProbeCap is the reason of a recipient not verified because its
// identity passed callout.per_identity_rate; the verifier's own caps give
// callout.ReasonRateLimited.
const reasonProbeCap callout.Reason = "probe-cap"

// unjudged reports whether a verification could not be made because of one
// of the verifier's caps: no verdict at all.
func unjudged(r callout.Reason) bool { return r == callout.ReasonRateLimited }

// run verifies rcpt for req in the background, counts the verdict and
// acts on it, then wakes the requests of id waiting for it. A request
// already answered DUNNO whose recipient could not be verified because of
// a cap is retried, backing off, for up to a period: what was accepted is
// judged late rather than never.
func (d *Detector) run(req Request, id, rcpt string, p *probe, lim Thresholds) {
	defer d.wg.Done()
	defer d.busy.Add(-1)
	start := time.Now()
	backoff := time.Minute
	for {
		res := d.verify.Verify(d.ctx, rcpt)
		if res.Reason == callout.ReasonCanceled || res.Reason == callout.ReasonShutdown {
			d.settleNone(id, p, lim)
			p.finish(res)
			d.limiter.wake(id)
			return // shutting down
		}
		if unjudged(res.Reason) {
			if !p.owed(res) {
				// Not accepted: the waiting request defers.
				d.settleNone(id, p, lim)
				d.limiter.wake(id)
				return
			}
			// Accepted already: the verdict is owed. Try again later,
			// keeping the reservation, for up to a period.
			if time.Since(start)+backoff <= d.cfg.load().period && d.sleep(d.ctx, backoff) {
				backoff *= 2
				continue
			}
			d.settleNone(id, p, lim)
			p.finish(res)
			if d.ctx.Err() == nil {
				d.log.Warn("recipient accepted and never verified: the verifier's caps held for a whole period",
					slog.String("identity", id), slog.String("recipient", textfmt.Cut(rcpt, 320)), slog.String("queue_id", req.QueueID))
			}
			d.limiter.wake(id)
			return
		}
		d.metrics.verified(res, time.Since(start))
		st := d.shareVerdict(d.ctx, id, p.key, &res, d.limiter.settle(id, &res, d.now(), lim), lim)
		a, count := d.record(d.ctx, &req, id, res, st, lim)
		if p.finish(res) {
			d.logDecision(&req, id, &res, "late", a, count)
		}
		d.limiter.wake(id)
		return
	}
}

// await holds the answer of a request that could be the one crossing a
// limit until that is settled: the identity is blocked (the block
// action), or no limit can be passed any more by the verifications in
// flight (DUNNO), or its own verdict is not invalid (DUNNO). Past
// pc.wait, or when its recipient could not be verified, the answer is
// DeferAction: the client retries, and the verification still counts.
// own is the request's verdict when it was at hand, p its verification.
func (d *Detector) await(ctx context.Context, req *Request, id string, own *callout.Result, p *probe, pc *policyConfig, lim Thresholds) decision {
	if pc.mode == ModeMonitor {
		// Monitor mode never blocks nor defers: nothing to wait for.
		if own == nil && !p.accept() {
			own = &p.res
		}
		return decision{action: ActionDunno, id: id, res: own}
	}
	t := time.NewTimer(pc.wait)
	defer t.Stop()
	poll := d.sharedPoll()
	defer poll.Stop()
	for {
		ch := d.limiter.changed(id)
		dec, done := d.settled(id, own, p, lim)
		if done {
			d.limiter.unwait(id)
			return dec
		}
		select {
		case <-ch:
			d.limiter.unwait(id)
		case <-poll.C:
			d.limiter.unwait(id) // the other servers' verdicts wake nobody here: look again
		case <-t.C:
			d.limiter.unwait(id)
			return d.timedOut(id, own, p, lim, "wait-exceeded")
		case <-ctx.Done():
			d.limiter.unwait(id)
			return d.timedOut(id, own, p, lim, "request-ended")
		}
	}
}

// settled looks whether a waiting request can be answered.
func (d *Detector) settled(id string, own *callout.Result, p *probe, lim Thresholds) (decision, bool) {
	if a, ok := d.blockedAction(id); ok {
		if p != nil {
			p.refuse()
		}
		return decision{action: Action(a), id: id, res: own, note: "crossed"}, true
	}
	if own == nil && p != nil {
		select {
		case <-p.done:
			own = &p.res
		default:
		}
	}
	if own != nil {
		switch {
		case unjudged(own.Reason) || own.Reason == callout.ReasonCanceled || own.Reason == callout.ReasonShutdown:
			return decision{action: DeferAction, id: id, res: own, note: "not-verified"}, true
		case own.Status != callout.StatusInvalid:
			return decision{action: ActionDunno, id: id, res: own}, true
		}
	}
	st := d.shareReserve(d.ctx, id, nil, d.limiter.Standing(id, d.now(), lim), lim)
	if st.Safe && own != nil {
		return decision{action: ActionDunno, id: id, res: own, note: "waited", count: st.Count}, true
	}
	if st.Safe && p.accept() {
		// Its decision line comes with the verdict (note "late").
		return dunnoQuiet, true
	}
	return decision{}, false
}

// timedOut answers a request whose wait ran out: the verdict, if it came
// in just now, else a defer.
func (d *Detector) timedOut(id string, own *callout.Result, p *probe, lim Thresholds, note string) decision {
	if dec, done := d.settled(id, own, p, lim); done {
		return dec
	}
	if p != nil {
		p.refuse()
	}
	return decision{action: DeferAction, id: id, res: own, note: note}
}

// blockedAction returns the action of an identity blocked in enforce mode.
func (d *Detector) blockedAction(id string) (string, bool) {
	if d.cfg.load().mode != ModeEnforce {
		return "", false
	}
	// The blocklist, not the limiter: it answers blocked only once the
	// entry is written or its write has had its bounded wait, so that an
	// identity answered blocked is still blocked after a crash.
	return d.block.Blocked(id)
}

// answer is the one exit of a decision: it writes the decision line
// (unless quiet), counts the answer and returns it.
func (d *Detector) answer(req *Request, dec decision) Action {
	if !dec.quiet {
		d.logDecision(req, dec.id, dec.res, dec.note, dec.action, dec.count)
	}
	switch dec.action {
	case ActionDunno:
		d.metrics.answered(answerDunno)
	case DeferAction:
		d.metrics.answered(answerDeferred)
	default:
		d.metrics.answered(answerBlocked)
	}
	return dec.action
}

// InFlight returns the verifications running in the background.
func (d *Detector) InFlight() int { return int(d.busy.Load()) }

func sleepCtx(ctx context.Context, dur time.Duration) bool {
	t := time.NewTimer(dur)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// record acts on the standing after a verdict of id: it keeps the
// evidence of an invalid one, blocks when a limit was passed (once) and
// warns at warn_at of the limit. It returns the action for the request
// and the count.
func (d *Detector) record(ctx context.Context, req *Request, id string, res callout.Result, st Standing, lim Thresholds) (Action, int) {
	if res.Status != callout.StatusInvalid {
		return ActionDunno, st.Count
	}
	pc := d.cfg.load()
	now := d.now()
	if st.gathers(lim, int(math.Ceil(pc.warnAt*float64(lim.Count)))) {
		d.limiter.Note(id, now, func(e *evidence) {
			e.addClient(req.ClientAddress, req.ClientName)
			e.addRecipient(res, now)
		})
	}
	if st.Crossed != TriggerNone {
		return d.crossed(ctx, req, id, st, lim, pc, now)
	}
	count := st.Count
	if pc.warnAt > 0 && lim.Count > 0 && count >= int(math.Ceil(pc.warnAt*float64(lim.Count))) && d.limiter.Warn(id, now) {
		d.log.Warn("rcptguard warning", slog.String("identity", id), slog.Int("count", count),
			slog.Int("limit", lim.Count), slog.String("period", pc.periodTx))
		d.tell(ctx, Event{Kind: EventWarning, Identity: id, Time: now, Mode: pc.mode, Count: count, Limit: lim.Count, Period: pc.period})
	}
	return ActionDunno, count
}

// crossed acts on a verdict that finds id past a limit: the first such
// verdict blocks (or, in monitor mode, reports a would-block); a later one
// answers as the block does.
func (d *Detector) crossed(ctx context.Context, req *Request, id string, st Standing, lim Thresholds, pc *policyConfig, now time.Time) (Action, int) {
	ev := Event{Kind: EventBlock, Identity: id, Time: now, Mode: pc.mode, Trigger: st.Crossed,
		Count: st.Count, Limit: lim.Count, Period: pc.period}
	what := fmt.Sprintf("%d invalid recipients within %s", st.Count, pc.periodTx)
	switch st.Crossed {
	case TriggerLong:
		ev.Count, ev.Limit, ev.Period = st.Long, lim.Long, pc.long
		what = fmt.Sprintf("%d invalid recipients within %s", st.Long, pc.longTx)
	case TriggerRatio:
		ev.Count, ev.Limit, ev.Judged = st.Invalid, lim.RatioMin, st.Invalid+st.Valid
		what = fmt.Sprintf("%d of %d verified recipients within %s do not exist", st.Invalid, st.Invalid+st.Valid, pc.periodTx)
	}
	word, own, _ := strings.Cut(pc.action, " ")
	text := strings.TrimSpace(own + " rcptguard: " + id + " blocked: " + what)
	action := word + " " + text
	if !st.First {
		// Another verdict crossed first: answer like it, once its
		// entry is written (the blocklist waits for that, bounded).
		if a, ok := d.block.Blocked(id); ok && pc.mode == ModeEnforce {
			return Action(a), ev.Count
		}
		if d.shared != nil && pc.mode == ModeEnforce {
			// Another server crossed first: block here too, at once,
			// without a report (it sends the one report).
			// The text says so, so that no start-up takes it for a
			// block of its own whose report a crash lost.
			if err := d.block.Block(context.WithoutCancel(ctx), id, word, text+" "+FleetMark); err != nil {
				d.log.Error("blocklist write failed; the block holds in memory and is written when possible",
					slog.String("identity", id), slog.Any("error", err))
			}
			return Action(action), ev.Count
		}
		return ActionDunno, ev.Count
	}
	if pc.mode == ModeMonitor {
		ev.Kind = EventWouldBlock
		d.log.Warn("rcptguard would block (monitor mode)", slog.String("identity", id), slog.String("trigger", string(st.Crossed)),
			slog.Int("count", ev.Count), slog.Int("limit", ev.Limit), slog.String("period", textfmt.FormatPeriod(ev.Period)))
		d.tell(ctx, ev)
		return ActionDunno, ev.Count
	}
	ev.Action = action
	// The blocklist bounds the wait for the disk; past it the block
	// holds in memory and is written as soon as possible.
	if err := d.block.Block(context.WithoutCancel(ctx), id, word, text); err != nil {
		d.log.Error("blocklist write failed; the block holds in memory and is written when possible",
			slog.String("identity", id), slog.Any("error", err))
		d.metrics.blocklistError()
	}
	d.log.Warn("rcptguard blocked", slog.String("identity", id), slog.String("trigger", string(st.Crossed)),
		slog.Int("count", ev.Count), slog.Int("limit", ev.Limit), slog.String("period", textfmt.FormatPeriod(ev.Period)),
		slog.String("action", pc.action), slog.String("client", req.ClientAddress), slog.String("queue_id", req.QueueID))
	d.metrics.blocked()
	d.limiter.Note(id, now, func(e *evidence) { e.addQueueID(req.QueueID) })
	d.tell(ctx, ev)
	return Action(action), ev.Count
}

// tell hands an event, with the evidence so far, to the notifier.
func (d *Detector) tell(ctx context.Context, ev Event) {
	if d.notify == nil {
		return
	}
	ev.Evidence = d.limiter.Evidence(ev.Identity)
	if err := d.notify.Notify(context.WithoutCancel(ctx), ev); err != nil {
		d.log.Error("notify failed", slog.String("identity", ev.Identity), slog.String("event", string(ev.Kind)), slog.Any("error", err))
	}
}

// limitsFor returns the thresholds of id: its limit, the long window's
// (long_limit, else three times its limit) and the ratio trigger. An
// identity with limit 0 is not limited at all.
func (pc *policyConfig) limitsFor(id string) Thresholds {
	n := pc.limitFor(id)
	if n == 0 {
		return Thresholds{}
	}
	lim := Thresholds{Count: n, Ratio: pc.ratio, RatioMin: pc.ratioMin, Act: pc.mode}
	if pc.long > 0 {
		lim.Long = pc.longLim
		if lim.Long == 0 {
			lim.Long = 3 * n
		}
	}
	return lim
}

// limitFor returns the identity's limit: its own line in limits_file, else
// its domain's "*@domain" line, else the default.
func (pc *policyConfig) limitFor(id string) int {
	if len(pc.limits) > 0 {
		if v, ok := pc.limits[id]; ok {
			return v
		}
		if at := strings.LastIndexByte(id, '@'); at >= 0 {
			if v, ok := pc.limits["*"+id[at:]]; ok {
				return v
			}
		}
	}
	return pc.limit
}

// identity returns who sends: the SASL username in its stored form (the
// one identity rule, package blocklist/identity), or the client address
// when it is inside a relay network. ok is false when the request is not
// ours to judge; id is "" (with ok true) when the identity breaks the rule
// and must never be written anywhere.
func identity(req *Request, relays []netip.Prefix) (id string, ok bool) {
	if u := req.SASLUsername; u != "" {
		id, err := ident.Canonical(u)
		if err != nil {
			return "", true
		}
		return id, true
	}
	if len(relays) == 0 || req.ClientAddress == "" {
		return "", false
	}
	ip, err := netip.ParseAddr(req.ClientAddress)
	if err != nil {
		return "", false
	}
	ip = ip.Unmap()
	for _, p := range relays {
		if p.Contains(ip) {
			return ip.String(), true
		}
	}
	return "", false
}

// recipientDomain returns the lower-cased domain of an address.
func recipientDomain(addr string) string {
	at := strings.LastIndexByte(addr, '@')
	if at < 0 {
		return ""
	}
	return strings.ToLower(strings.TrimSuffix(addr[at+1:], "."))
}

// logDecision writes the one line per tracked decision, with the fields
// that join it to Postfix's mail.log (queue_id) and the verdict.
func (d *Detector) logDecision(req *Request, id string, res *callout.Result, note string, a Action, count int) {
	if !d.log.Enabled(context.Background(), slog.LevelInfo) {
		return
	}
	// At most 13 attributes: room for them on the stack, so the line
	// costs no allocation beyond what slog itself does.
	var buf [14]slog.Attr
	attrs := append(buf[:0],
		slog.String("identity", id),
		slog.String("recipient", textfmt.Cut(req.Recipient, 320)),
		slog.String("queue_id", req.QueueID),
		slog.String("client", req.ClientAddress),
	)
	if r := res; r != nil {
		attrs = append(attrs, slog.String("verdict", string(r.Status)), slog.String("reason", string(r.Reason)),
			slog.Bool("cached", r.Cached))
		if r.Host != "" {
			attrs = append(attrs, slog.String("mx", r.Host))
		}
		if !r.Reply.IsZero() {
			attrs = append(attrs, slog.String("reply", r.Reply.String()))
		}
	} else {
		attrs = append(attrs, slog.String("verdict", "none"))
	}
	if note != "" {
		attrs = append(attrs, slog.String("note", note))
	}
	if count > 0 {
		attrs = append(attrs, slog.Int("count", count))
	}
	attrs = append(attrs, slog.String("action", string(a)))
	d.log.LogAttrs(context.Background(), slog.LevelInfo, "decision", attrs...)
}
