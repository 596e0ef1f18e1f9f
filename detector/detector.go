package detector

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	ident "github.com/rcptguard/rcptguard/blocklist/identity"
	"github.com/rcptguard/rcptguard/callout"
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
	// Block adds identity with the action to answer. An error means the
	// entry could not be written yet; the block still holds in memory.
	Block(ctx context.Context, identity, action string) error
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
	Count    int           // distinct invalid recipients in the window
	Limit    int           // the identity's limit
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
	// ProbeRate caps the verifications per identity per minute that the
	// cache cannot answer; past it a recipient is not verified (DUNNO,
	// nothing counted). 0: no cap.
	ProbeRate int
}

// Detector makes the decision for each policy request. Create it with New;
// it is safe for concurrent use.
type Detector struct {
	cfg     atomicConfig
	verify  Verifier
	cached  CachedVerifier // verify, when it can answer from a cache; else nil
	block   Blocklist
	notify  Notifier
	log     *slog.Logger
	metrics *Metrics
	now     func() time.Time
	limiter *Limiter
	probes  *ProbeBudget

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
		verify:  cfg.Verifier,
		block:   cfg.Blocklist,
		notify:  cfg.Notifier,
		log:     cfg.Logger,
		metrics: cfg.Metrics,
		now:     cfg.Now,
		limiter: NewLimiter(cfg.Period),
		probes:  NewProbeBudget(),
		ctx:     ctx,
		cancel:  cancel,
	}
	d.cached, _ = cfg.Verifier.(CachedVerifier)
	d.cfg.c = pc
	return d, nil
}

func newPolicyConfig(cfg Config) (*policyConfig, error) {
	if cfg.Limit < 0 {
		return nil, fmt.Errorf("detector: limit %d is negative", cfg.Limit)
	}
	if cfg.WarnAt < 0 || cfg.WarnAt > 1 {
		return nil, fmt.Errorf("detector: warn_at %v is not between 0 and 1", cfg.WarnAt)
	}
	if cfg.Action == "" {
		cfg.Action = "HOLD"
	}
	if cfg.Mode == "" {
		cfg.Mode = ModeEnforce
	}
	if cfg.Mode != ModeEnforce && cfg.Mode != ModeMonitor {
		return nil, fmt.Errorf("detector: mode %q is not enforce or monitor", cfg.Mode)
	}
	if cfg.Wait <= 0 {
		cfg.Wait = 5 * time.Second
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
		periodTx: FormatPeriod(cfg.Period),
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
// warn_at, action, mode and wait. The period cannot change while running.
func (d *Detector) Reload(cfg Config) error {
	cur := d.cfg.load()
	if cfg.Period == 0 {
		cfg.Period = cur.period
	}
	if cfg.Period != cur.period {
		return fmt.Errorf("detector: period cannot change without a restart (%s → %s)", cur.period, cfg.Period)
	}
	pc, err := newPolicyConfig(cfg)
	if err != nil {
		return err
	}
	d.cfg.mu.Lock()
	d.cfg.c = pc
	d.cfg.mu.Unlock()
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
// bottom (DESIGN.md, "Decision, per policy request").
func (d *Detector) Decide(ctx context.Context, req *Request) Action {
	req.logDropped(d.log)
	// Only recipient checks are ours.
	if req.Request != "smtpd_access_policy" || !strings.EqualFold(req.ProtocolState, "RCPT") {
		d.metrics.answered(answerDunno)
		return ActionDunno
	}
	pc := d.cfg.load()

	// Who is sending: the SASL login, or a client in relay_networks.
	id, ok := identity(req, pc.relays)
	if !ok {
		d.metrics.answered(answerDunno)
		return ActionDunno
	}
	if id == "" {
		d.log.Warn("identity refused", slog.Any("reason", ident.Check(req.SASLUsername)),
			slog.String("identity", strconv.Quote(boundString(req.SASLUsername, 200))),
			slog.String("client", req.ClientAddress), slog.String("queue_id", req.QueueID))
		d.metrics.answered(answerDunno)
		return ActionDunno
	}
	rcpt := req.Recipient

	// A blocked identity gets the block action, whatever the recipient.
	if action, blocked := d.block.Blocked(id); blocked {
		now := d.now()
		d.limiter.Note(id, now, func(e *evidence) {
			e.addClient(req.ClientAddress, req.ClientName)
			e.addQueueID(req.QueueID)
		})
		if pc.mode == ModeMonitor {
			d.logDecision(req, id, nil, "blocked-monitor", ActionDunno, 0)
			d.metrics.answered(answerDunno)
			return ActionDunno
		}
		d.logDecision(req, id, nil, "blocked", Action(action), 0)
		d.metrics.answered(answerBlocked)
		return Action(action)
	}

	// Not counted: exempt identities, bounces and auto-replies, local
	// recipients.
	switch {
	case pc.exempt[id]:
		d.logDecision(req, id, nil, "exempt", ActionDunno, 0)
		d.metrics.answered(answerDunno)
		return ActionDunno
	case req.Sender == "":
		d.logDecision(req, id, nil, "null-sender", ActionDunno, 0)
		d.metrics.answered(answerDunno)
		return ActionDunno
	case pc.local[recipientDomain(rcpt)]:
		d.logDecision(req, id, nil, "local-domain", ActionDunno, 0)
		d.metrics.answered(answerDunno)
		return ActionDunno
	}

	// Verify: from the cache when the verifier has the verdict at hand,
	// else waiting at most pc.wait; a verification that takes longer goes
	// on and is counted when it ends.
	res, cached := d.cachedVerdict(rcpt)
	start := time.Now()
	if !cached && !d.probes.Take(id, d.now(), pc.probe) {
		res = callout.Result{Address: rcpt, Status: callout.StatusUnknown, Reason: callout.ReasonRateLimited,
			Detail: fmt.Sprintf("more than %d verifications this minute for this identity (callout.per_identity_rate)", pc.probe)}
		d.logDecision(req, id, &res, "probe-rate", ActionDunno, 0)
		d.metrics.answered(answerDunno)
		return ActionDunno
	}
	if !cached {
		wctx, cancel := context.WithTimeout(ctx, pc.wait)
		res = d.verify.Verify(wctx, rcpt)
		cancel()
	}
	d.metrics.verified(res, time.Since(start))
	if res.Reason == callout.ReasonCanceled {
		// The server reuses *req for the connection's next request.
		req := *req
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			res := d.verify.Verify(d.ctx, rcpt)
			if res.Reason == callout.ReasonCanceled {
				return // shutting down
			}
			d.metrics.verified(res, time.Since(start))
			a, count := d.record(d.ctx, &req, id, res)
			d.logDecision(&req, id, &res, "late", a, count)
		}()
		d.logDecision(&req, id, &res, "wait-exceeded", ActionDunno, 0)
		d.metrics.answered(answerDunno)
		return ActionDunno
	}
	action, count := d.record(ctx, req, id, res)
	d.logDecision(req, id, &res, "", action, count)
	if action != ActionDunno {
		d.metrics.answered(answerBlocked)
	} else {
		d.metrics.answered(answerDunno)
	}
	return action
}

// record counts an invalid verdict for id and blocks or warns when the
// count calls for it. It returns the action for the request and the count.
func (d *Detector) record(ctx context.Context, req *Request, id string, res callout.Result) (Action, int) {
	if res.Status != callout.StatusInvalid {
		return ActionDunno, 0
	}
	pc := d.cfg.load()
	now := d.now()
	count := d.limiter.Add(id, res.Address, now)
	d.limiter.Note(id, now, func(e *evidence) {
		e.addClient(req.ClientAddress, req.ClientName)
		e.addRecipient(res, now)
	})
	limit := pc.limitFor(id)
	if limit == 0 {
		return ActionDunno, count
	}
	if count > limit {
		if !d.limiter.MarkBlocked(id, pc.mode) {
			// Another request got here first and blocked: answer like it.
			if a, ok := d.block.Blocked(id); ok && pc.mode == ModeEnforce {
				return Action(a), count
			}
			return ActionDunno, count
		}
		ev := Event{Kind: EventBlock, Identity: id, Time: now, Mode: pc.mode, Count: count, Limit: limit, Period: pc.period}
		if pc.mode == ModeMonitor {
			ev.Kind = EventWouldBlock
			d.log.Warn("rcptguard would block (monitor mode)", slog.String("identity", id),
				slog.Int("count", count), slog.Int("limit", limit), slog.String("period", pc.periodTx))
			d.tell(ctx, ev)
			return ActionDunno, count
		}
		action := fmt.Sprintf("%s rcptguard: %s blocked: %d invalid recipients within %s", pc.action, id, count, pc.periodTx)
		ev.Action = action
		// The file lock may be held by a stuck `rcptguard block`, the disk
		// may hang: the answer to Postfix must not wait for long. The block
		// holds in memory meanwhile and is written as soon as possible.
		bctx, cancel := context.WithTimeout(ctx, time.Second)
		err := d.block.Block(bctx, id, action)
		cancel()
		if err != nil {
			d.log.Error("blocklist write failed; the block holds in memory and is written when possible",
				slog.String("identity", id), slog.Any("error", err))
			d.metrics.blocklistError()
		}
		d.log.Warn("rcptguard blocked", slog.String("identity", id), slog.Int("count", count),
			slog.Int("limit", limit), slog.String("period", pc.periodTx), slog.String("action", pc.action),
			slog.String("client", req.ClientAddress), slog.String("queue_id", req.QueueID))
		d.metrics.blocked()
		d.limiter.Note(id, now, func(e *evidence) { e.addQueueID(req.QueueID) })
		d.tell(ctx, ev)
		return Action(action), count
	}
	if pc.warnAt > 0 && count >= int(math.Ceil(pc.warnAt*float64(limit))) && d.limiter.Warn(id, now) {
		d.log.Warn("rcptguard warning", slog.String("identity", id), slog.Int("count", count),
			slog.Int("limit", limit), slog.String("period", pc.periodTx))
		d.tell(ctx, Event{Kind: EventWarning, Identity: id, Time: now, Mode: pc.mode, Count: count, Limit: limit, Period: pc.period})
	}
	return ActionDunno, count
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

func boundString(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
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
		slog.String("recipient", boundString(req.Recipient, 320)),
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

// FormatPeriod writes a duration the way people say it: "1h", "90m", "2d".
func FormatPeriod(p time.Duration) string {
	switch {
	case p >= 24*time.Hour && p%(24*time.Hour) == 0:
		return strconv.FormatInt(int64(p/(24*time.Hour)), 10) + "d"
	case p >= time.Hour && p%time.Hour == 0:
		return strconv.FormatInt(int64(p/time.Hour), 10) + "h"
	case p >= time.Minute && p%time.Minute == 0:
		return strconv.FormatInt(int64(p/time.Minute), 10) + "m"
	}
	return p.String()
}
