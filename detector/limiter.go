package detector

import (
	"hash/maphash"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/rcptguard/rcptguard/callout"
	"github.com/rcptguard/rcptguard/callout/window"
	"github.com/rcptguard/rcptguard/notify"
)

// Limiter counts, per identity, the distinct invalid recipients that fall
// inside a sliding window of Period (and of a longer second window, when
// there is one), the valid verdicts of the short window for the ratio
// trigger, the verifications still in flight, and the uncached probes of
// the last minute; and it keeps the evidence a report needs. It is a plain
// sharded map behind mutexes: a cache with an admission policy could
// silently drop a counter, and a dropped counter is an abuser let through.
//
// Its size is bounded all the same: past a ceiling of tracked identities
// (setMaxIdentities) the least recently active identities are dropped,
// never one that is blocked or has a verification in flight or a request
// waiting, and each drop is counted and logged.
//
// Time is always passed in, so tests control it. The zero Limiter is not
// usable; call NewLimiter.
type Limiter struct {
	period int64 // nanoseconds
	long   int64 // nanoseconds of the long window; 0: none
	keep   int64 // max(period, long): how long a hit is kept
	seed   maphash.Seed
	shards [limiterShards]limiterShard

	max      atomic.Int64 // tracked identities past which idle ones are dropped
	n        atomic.Int64 // tracked identities
	log      *slog.Logger
	metrics  *Metrics
	dropped  atomic.Int64 // identities dropped at the ceiling, not yet logged
	loggedAt atomic.Int64 // unix ns of the last drop log line
}

const limiterShards = 64

// DefaultMaxIdentities is the default ceiling of tracked identities.
const DefaultMaxIdentities = 1_000_000

// dropLogEvery is the least time between two log lines about identities
// dropped at the ceiling.
const dropLogEvery = int64(time.Minute)

type limiterShard struct {
	mu sync.Mutex
	m  map[string]*track
	// noScanBelow: a scan for identities to drop found too few; the next
	// one waits until the shard holds this many.
	noScanBelow int
}

// track is the state of one identity. Most of the tracked identities at
// any time are honest users with a verdict or two: what only a few need
// (a warning, a block, requests waiting; evidence) is apart, so that a
// track fits in 80 bytes.
type track struct {
	hits    []hit         // distinct invalid recipients in the longer window, oldest first
	probes  window.Events // the uncached probes of the last minute
	valid   *validRing
	x       *trackExtra // nil: none of it
	last    uint32      // time of the last activity, unix seconds (to 2106)
	pending int32       // verifications reserved and not yet settled
	ev      *evidence   // nil: none kept
}

// trackExtra is the state few identities have.
type trackExtra struct {
	change  chan struct{}
	warned  int64 // time of the last warning, unix ns; 0 none
	waiters int32 // requests waiting for a change
	blocked Mode  // the mode a block was acted on in ("" none)
}

// extra returns tr.x, created when missing.
func (tr *track) extra() *trackExtra {
	if tr.x == nil {
		tr.x = &trackExtra{}
	}
	return tr.x
}

func (tr *track) waiters() int32 {
	if tr.x == nil {
		return 0
	}
	return tr.x.waiters
}

func (tr *track) blocked() Mode {
	if tr.x == nil {
		return ""
	}
	return tr.x.blocked
}

// touch records activity at t (unix ns).
func (tr *track) touch(t int64) {
	tr.last = max(tr.last, unixSeconds(t))
}

// unixSeconds returns t (unix ns) in unix seconds, as a track keeps them.
func unixSeconds(t int64) uint32 {
	return uint32(min(max(t/int64(time.Second), 0), 1<<32-1))
}

// hit is one distinct invalid recipient: a hash of the address, when it
// was last seen invalid and, for a recipient at a domain that does not
// take mail at all (NXDOMAIN, null MX, no mail host), a hash of the domain
// (never 0), so the ratio counts such a domain once.
type hit struct {
	h   uint64
	t   int64
	dom uint32
}

// validRing counts valid verdicts in validBuckets buckets that together
// span the short window. The oldest bucket may reach up to one bucket
// width before the window: valid verdicts are overcounted, never
// undercounted, which only lowers the invalid share the ratio trigger sees.
type validRing struct {
	head int64 // index (time / width) of the newest bucket
	n    [validBuckets]uint16
}

const validBuckets = 12

// Evidence is what a report tells about an identity: where it connected
// from, which invalid recipients it tried (the most recent, at most
// maxRecipients, oldest first) and the queue IDs of its mail that was held.
type Evidence struct {
	Clients    []ClientSeen
	Recipients []InvalidRecipient
	QueueIDs   []string
}

// ClientSeen is one client address an identity connected from.
type ClientSeen struct {
	Address string
	Name    string // reverse name as Postfix reported it, "" if unknown
	Count   int
}

// InvalidRecipient is one recipient that turned out not to exist, with the
// MX reply that said so.
type InvalidRecipient struct {
	Address string
	Time    time.Time
	Reason  string
	MX      string
	Reply   string
}

// evidence is Evidence as the limiter keeps it for every tracked
// identity: compact, sharing its strings with the verdict cache and the
// requests, the reply kept as its parts and formatted only for a report.
type evidence struct {
	clients  []ClientSeen
	rcpts    []evRecipient
	queueIDs *[]string // only blocked identities have any
}

type evRecipient struct {
	addr   string
	mx     string
	text   string    // the reply's text
	t      uint32    // unix seconds (to 2106)
	code   uint16    // the reply's code
	enh    [3]uint16 // the reply's enhanced code
	reason uint8     // index in invalidReasons
}

// invalidReasons are the reasons an invalid verdict can have; evidence
// keeps an index (one byte) rather than the string (sixteen), which
// brings the entry into a smaller allocation size class.
var invalidReasons = []callout.Reason{
	"invalid", // any other
	callout.ReasonNoMailbox, callout.ReasonNXDomain, callout.ReasonNullMX,
	callout.ReasonNoMailHost, callout.ReasonBadSyntax,
}

func reasonIndex(r callout.Reason) uint8 {
	for i, x := range invalidReasons {
		if x == r {
			return uint8(i)
		}
	}
	return 0
}

// Evidence bounds: what a report shows (package notify's, so the evidence,
// the report and its JSON part have one set).
const (
	maxRecipients = notify.MaxRecipients
	maxClients    = notify.MaxClients
	maxQueueIDs   = notify.MaxQueueIDs
)

// Evidence bounds in bytes, so that what a sender or a recipient's MX
// chooses to say costs at most this much per tracked identity (strings
// only; the entries themselves are bounded by the counts above):
//   - maxEvidenceString: one recipient address, MX host or reply text is
//     cut to this many bytes (a copy, so the cut does not pin the rest);
//   - maxClientBytes: the client addresses and names of an identity; past
//     it a new client's name is not kept, then no new client;
//   - maxRecipientBytes: its invalid recipients' addresses, MX hosts and
//     reply texts; past it the oldest recipients are dropped (the newest
//     is always kept).
const (
	maxEvidenceString = 256
	maxClientBytes    = 1024
	maxRecipientBytes = 2048
)

// evidenceString returns s cut to maxEvidenceString bytes, at the start
// of a UTF-8 sequence, as a copy when it was cut.
func evidenceString(s string) string {
	if len(s) <= maxEvidenceString {
		return s
	}
	n := maxEvidenceString
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return strings.Clone(s[:n])
}

func (r *evRecipient) size() int { return len(r.addr) + len(r.mx) + len(r.text) }

// NewLimiter returns a limiter with the given window length.
func NewLimiter(period time.Duration) *Limiter { return newLimiter(period, 0) }

// newLimiter returns a limiter with a short and a long window (0: none).
func newLimiter(period, long time.Duration) *Limiter {
	l := &Limiter{period: int64(period), long: int64(long), keep: int64(max(period, long)), seed: maphash.MakeSeed()}
	for i := range l.shards {
		l.shards[i].m = make(map[string]*track)
	}
	l.setMaxIdentities(DefaultMaxIdentities, nil, nil)
	return l
}

// setMaxIdentities sets the ceiling of tracked identities (n <= 0: the
// default) and where drops at the ceiling are logged and counted (nil:
// nowhere). A new identity that finds n tracked makes room in its own
// shard: the identities are spread evenly over the shards, so the oldest
// of a shard are about the oldest of all. The total stays at or under n,
// except for identities that cannot be dropped: blocked, or with a
// verification in flight or a request waiting. Call it before the
// Limiter is used; setMax changes the ceiling later.
func (l *Limiter) setMaxIdentities(n int, log *slog.Logger, m *Metrics) {
	l.setMax(n)
	l.log, l.metrics = log, m
}

// setMax sets the ceiling of tracked identities (n <= 0: the default).
// A lower one drops the surplus as new identities come.
func (l *Limiter) setMax(n int) {
	if n <= 0 {
		n = DefaultMaxIdentities
	}
	l.max.Store(int64(n))
}

func (l *Limiter) shard(id string) *limiterShard {
	return &l.shards[maphash.String(l.seed, id)%limiterShards]
}

// track returns the state of id, created when missing, at t; the caller
// holds s.mu. Creating one in a shard at its ceiling first drops the
// least recently active identities that may be dropped.
func (l *Limiter) track(s *limiterShard, id string, t int64) *track {
	tr := s.m[id]
	if tr == nil {
		if l.n.Load() >= l.max.Load() && len(s.m) >= s.noScanBelow {
			l.drop(s, t)
		}
		tr = &track{}
		s.m[id] = tr
		l.n.Add(1)
	}
	return tr
}

// update runs fn under the identity's lock with its state, created when
// missing and marked active at now (t is now in Unix nanoseconds).
func update[T any](l *Limiter, id string, now time.Time, fn func(tr *track, t int64) T) T {
	t := now.UnixNano()
	s := l.shard(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	tr := l.track(s, id, t)
	tr.touch(t)
	return fn(tr, t)
}

// peek runs fn under the identity's lock with its state, nil when there
// is none (none is created).
func peek[T any](l *Limiter, id string, fn func(tr *track) T) T {
	s := l.shard(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	return fn(s.m[id])
}

// droppable reports whether the ceiling may drop tr: not blocked (nor
// holding the queue IDs of a blocked identity's mail), no verification in
// flight (its verdict must find the count it was reserved against, so the
// one at limit+1 acts), no request waiting for a change.
func (tr *track) droppable() bool {
	return tr.blocked() == "" && (tr.ev == nil || tr.ev.queueIDs == nil) && tr.pending == 0 && tr.waiters() == 0
}

// drop makes room in s when the limiter is at the ceiling: it drops the
// least recently active droppable identities of s, a batch of a 32nd of
// a shard's share at once, so that the scan it takes (O(shard)) is paid
// once per batch of new identities: amortized, a few entries per new
// identity. The caller holds s.mu.
func (l *Limiter) drop(s *limiterShard, t int64) {
	batch := max(int(l.max.Load()/limiterShards/32), 1)
	lasts := make([]int64, 0, len(s.m))
	for _, tr := range s.m {
		if tr.droppable() {
			lasts = append(lasts, int64(tr.last))
		}
	}
	n := 0
	if len(lasts) > 0 {
		cutoff := nthSmallest(lasts, min(batch, len(lasts))-1)
		for id, tr := range s.m {
			if n < batch && int64(tr.last) <= cutoff && tr.droppable() {
				delete(s.m, id)
				n++
			}
		}
		l.n.Add(-int64(n))
	}
	if n < batch {
		// Too few to drop: do not scan again for each new identity.
		s.noScanBelow = len(s.m) + batch
	} else {
		s.noScanBelow = 0
	}
	if n == 0 {
		return
	}
	if l.metrics != nil {
		l.metrics.identitiesDropped.Add(float64(n))
	}
	l.dropped.Add(int64(n))
	l.logDropped(t)
}

// nthSmallest returns the k-th smallest of a (k from 0), reordering a;
// quickselect: O(len(a)) on average.
func nthSmallest(a []int64, k int) int64 {
	lo, hi := 0, len(a)-1
	for lo < hi {
		p := a[lo+(hi-lo)/2]
		i, j := lo, hi
		for i <= j {
			for a[i] < p {
				i++
			}
			for a[j] > p {
				j--
			}
			if i <= j {
				a[i], a[j] = a[j], a[i]
				i++
				j--
			}
		}
		switch {
		case k <= j:
			hi = j
		case k >= i:
			lo = i
		default:
			return a[k]
		}
	}
	return a[k]
}

// logDropped logs the identities dropped at the ceiling since the last
// line, at most once per dropLogEvery.
func (l *Limiter) logDropped(t int64) {
	last := l.loggedAt.Load()
	if t-last < dropLogEvery || !l.loggedAt.CompareAndSwap(last, t) {
		return
	}
	n := l.dropped.Swap(0)
	if n == 0 || l.log == nil {
		return
	}
	l.log.Warn("tracked identities at the ceiling (detector.max_identities): dropped the least recently active",
		slog.Int64("dropped", n), slog.Int64("max_identities", l.max.Load()))
}

// Dropped returns how many identities the ceiling dropped and no log line
// has told yet.
func (l *Limiter) Dropped() int64 { return l.dropped.Load() }

// Add records that rcpt, a recipient of id, does not exist, and returns the
// number of distinct invalid recipients of id in the window ending at now.
// A recipient already in the window is not counted again; its time moves
// to now. rcpt is compared as given: the caller normalises it.
func (l *Limiter) Add(id, rcpt string, now time.Time) int {
	return update(l, id, now, func(tr *track, t int64) int {
		l.addHit(tr, maphash.String(l.seed, rcpt), 0, t)
		return tr.countSince(t - l.period)
	})
}

// addHit records one invalid recipient (hash h, dead domain hash dom or 0)
// at t, once per recipient.
func (l *Limiter) addHit(tr *track, h uint64, dom uint32, t int64) {
	tr.expire(t - l.keep)
	if i := slices.IndexFunc(tr.hits, func(x hit) bool { return x.h == h }); i >= 0 {
		tr.hits = slices.Delete(tr.hits, i, i+1)
	}
	// Keep the slice ordered by time even when calls arrive slightly out
	// of order from concurrent requests.
	i := len(tr.hits)
	for i > 0 && tr.hits[i-1].t > t {
		i--
	}
	tr.hits = slices.Insert(tr.hits, i, hit{h: h, t: t, dom: dom})
}

// countSince returns the hits after cutoff.
func (tr *track) countSince(cutoff int64) int {
	i, _ := slices.BinarySearchFunc(tr.hits, cutoff, func(x hit, c int64) int {
		if x.t <= c {
			return -1
		}
		return 1
	})
	return len(tr.hits) - i
}

// ratioCount returns the invalid recipients after cutoff as the ratio
// trigger counts them: each dead domain once.
func (tr *track) ratioCount(cutoff int64) int {
	n := 0
	var dead []uint32
	var buf [8]uint32
	dead = buf[:0]
	for i := len(tr.hits) - 1; i >= 0 && tr.hits[i].t > cutoff; i-- {
		d := tr.hits[i].dom
		if d == 0 {
			n++
		} else if !slices.Contains(dead, d) {
			dead = append(dead, d)
		}
	}
	return n + len(dead)
}

// addValid counts one valid verdict at t, bucket width w.
func (tr *track) addValid(t, w int64) {
	if tr.valid == nil {
		tr.valid = &validRing{head: t / w}
	}
	tr.valid.advance(t / w)
	if b := &tr.valid.n[(t/w)%validBuckets]; *b < 0xffff && t/w > tr.valid.head-validBuckets {
		*b++
	}
}

// advance moves the newest bucket to b, clearing the ones that leave.
func (r *validRing) advance(b int64) {
	if b <= r.head {
		return
	}
	for i := r.head + 1; i <= b && i <= r.head+validBuckets; i++ {
		r.n[i%validBuckets] = 0
	}
	r.head = b
}

// validCount returns the valid verdicts of the window ending at t.
func (tr *track) validCount(t, w int64) int {
	if tr.valid == nil {
		return 0
	}
	tr.valid.advance(t / w)
	n := 0
	for _, v := range tr.valid.n {
		n += int(v)
	}
	return n
}

// expire drops hits at or before cutoff.
func (tr *track) expire(cutoff int64) {
	n := 0
	for n < len(tr.hits) && tr.hits[n].t <= cutoff {
		n++
	}
	if n > 0 {
		tr.hits = slices.Delete(tr.hits, 0, n)
	}
}

// Count returns the distinct invalid recipients of id in the window ending
// at now.
func (l *Limiter) Count(id string, now time.Time) int {
	return peek(l, id, func(tr *track) int {
		if tr == nil {
			return 0
		}
		return tr.countSince(now.UnixNano() - l.period)
	})
}

// Warn reports whether a warning for id is due at now: true at most once
// per period. It records that one was given.
func (l *Limiter) Warn(id string, now time.Time) bool {
	return update(l, id, now, func(tr *track, t int64) bool {
		x := tr.extra()
		if x.warned != 0 && t-x.warned < l.period {
			return false
		}
		x.warned = t
		return true
	})
}

// wake wakes the requests waiting for a change of id.
func (l *Limiter) wake(id string) {
	peek(l, id, func(tr *track) struct{} {
		if tr != nil {
			tr.wake()
		}
		return struct{}{}
	})
}

// Note updates the evidence kept for id: fn runs with the identity's
// evidence under the identity's lock, so it must be quick and must not
// call back into the Limiter.
func (l *Limiter) Note(id string, now time.Time, fn func(*evidence)) {
	update(l, id, now, func(tr *track, _ int64) struct{} {
		if tr.ev == nil {
			tr.ev = &evidence{}
		}
		fn(tr.ev)
		return struct{}{}
	})
}

// Evidence returns what is known about id, for a report.
func (l *Limiter) Evidence(id string) Evidence {
	return peek(l, id, func(tr *track) Evidence {
		if tr == nil || tr.ev == nil {
			return Evidence{}
		}
		return tr.ev.export()
	})
}

// export copies the evidence out, for a report.
func (e *evidence) export() Evidence {
	out := Evidence{Clients: slices.Clone(e.clients)}
	if e.queueIDs != nil {
		out.QueueIDs = slices.Clone(*e.queueIDs)
	}
	for _, r := range e.rcpts {
		reply := callout.Reply{Code: int(r.code), Enhanced: [3]int{int(r.enh[0]), int(r.enh[1]), int(r.enh[2])}, Text: r.text}
		out.Recipients = append(out.Recipients, InvalidRecipient{Address: r.addr, Time: time.Unix(int64(r.t), 0),
			Reason: string(invalidReasons[r.reason]), MX: r.mx, Reply: reply.String()})
	}
	return out
}

// Sweep forgets identities with no activity for a whole period and no
// invalid recipient left in the long window, logs the identities the
// ceiling dropped that no line has told yet (at most once a minute), and
// returns how many identities are still tracked.
func (l *Limiter) Sweep(now time.Time) int {
	t := now.UnixNano()
	cutoff := t - l.keep
	n := 0
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		for id, tr := range s.m {
			tr.expire(cutoff)
			// The rare state can go once nothing waits and the warning is
			// a period old; the block mark only with the whole identity.
			idle := tr.x == nil || tr.x.change == nil && tr.x.waiters == 0 && tr.x.warned <= t-l.period
			if idle && tr.last <= unixSeconds(t-l.period) && len(tr.hits) == 0 && tr.pending == 0 {
				delete(s.m, id)
				l.n.Add(-1)
				continue
			}
			if idle && tr.x != nil && tr.x.blocked == "" {
				tr.x = nil
			}
			if len(tr.hits) == 0 && cap(tr.hits) > 4 {
				tr.hits = nil
			}
			tr.probes.Expire(now.UnixNano() - int64(probeWindow))
		}
		n += len(s.m)
		s.mu.Unlock()
	}
	l.logDropped(t)
	return n
}

// Forget drops everything known about id, as after an unblock. Requests
// and verifications of id still in progress keep their own state.
func (l *Limiter) Forget(id string) {
	s := l.shard(id)
	s.mu.Lock()
	if tr := s.m[id]; tr != nil && (tr.pending > 0 || tr.waiters() > 0) {
		// Keep the gate; drop the counts and the evidence.
		var x *trackExtra
		if tr.x != nil {
			x = &trackExtra{change: tr.x.change, waiters: tr.x.waiters}
		}
		*tr = track{pending: tr.pending, x: x, last: tr.last}
	} else if tr != nil {
		delete(s.m, id)
		l.n.Add(-1)
	}
	s.mu.Unlock()
}

// Len returns the number of tracked identities.
func (l *Limiter) Len() int {
	n := 0
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		n += len(s.m)
		s.mu.Unlock()
	}
	return n
}

// addRecipient records an invalid recipient with the verdict that said
// so, keeping the most recent maxRecipients and one entry per address.
func (e *evidence) addRecipient(res callout.Result, now time.Time) {
	e.rcpts = slices.DeleteFunc(e.rcpts, func(x evRecipient) bool { return x.addr == res.Address })
	if len(e.rcpts) >= maxRecipients {
		e.rcpts = slices.Delete(e.rcpts, 0, len(e.rcpts)-maxRecipients+1)
	}
	r := evRecipient{addr: evidenceString(res.Address), t: uint32(max(now.Unix(), 0)), reason: reasonIndex(res.Reason),
		mx: evidenceString(res.Host), code: uint16(min(max(res.Reply.Code, 0), 999)), text: evidenceString(res.Reply.Text)}
	for i, v := range res.Reply.Enhanced {
		r.enh[i] = uint16(min(max(v, 0), 999))
	}
	size := r.size()
	for _, x := range e.rcpts {
		size += x.size()
	}
	drop := 0
	for drop < len(e.rcpts) && size > maxRecipientBytes {
		size -= e.rcpts[drop].size()
		drop++
	}
	e.rcpts = slices.Delete(e.rcpts, 0, drop)
	if e.rcpts == nil {
		// Most identities never get a second one: no spare capacity.
		e.rcpts = make([]evRecipient, 0, 1)
	}
	e.rcpts = append(e.rcpts, r)
}

// addClient counts one request from a client address.
func (e *evidence) addClient(addr, name string) {
	for i := range e.clients {
		if e.clients[i].Address == addr {
			e.clients[i].Count++
			if name != "" && name != e.clients[i].Name && e.clientBytes()-len(e.clients[i].Name)+len(name) <= maxClientBytes {
				e.clients[i].Name = name
			}
			return
		}
	}
	size := e.clientBytes() + len(addr) + len(name)
	if size > maxClientBytes {
		size -= len(name)
		name = ""
	}
	if len(e.clients) < maxClients && size <= maxClientBytes {
		if e.clients == nil {
			e.clients = make([]ClientSeen, 0, 1)
		}
		e.clients = append(e.clients, ClientSeen{Address: addr, Name: name, Count: 1})
	}
}

// clientBytes returns the bytes of the client addresses and names kept.
func (e *evidence) clientBytes() int {
	n := 0
	for _, c := range e.clients {
		n += len(c.Address) + len(c.Name)
	}
	return n
}

// addQueueID remembers a queue ID that was answered with the block action.
func (e *evidence) addQueueID(id string) {
	if id == "" {
		return
	}
	if e.queueIDs == nil {
		e.queueIDs = new([]string)
	}
	if slices.Contains(*e.queueIDs, id) || len(*e.queueIDs) >= maxQueueIDs {
		return
	}
	*e.queueIDs = append(*e.queueIDs, id)
}

// Thresholds are the limits an identity is judged against; a zero field
// turns its trigger off.
type Thresholds struct {
	Count    int     // distinct invalid recipients in the short window
	Long     int     // distinct invalid recipients in the long window
	Ratio    float64 // share of invalid among judged recipients in the short window
	RatioMin int     // invalid recipients (dead domains once) the ratio needs
	// Act is the mode a crossing is acted on in: the first verdict that
	// finds the identity past a limit, and not yet blocked in Act (or in
	// enforce), gets Standing.First. "": none does.
	Act Mode
}

// Trigger names the limit an identity crossed.
type Trigger string

// Triggers.
const (
	TriggerNone  Trigger = ""
	TriggerCount Trigger = "count" // more than Thresholds.Count in the short window
	TriggerLong  Trigger = "long"  // more than Thresholds.Long in the long window
	TriggerRatio Trigger = "ratio" // Thresholds.Ratio of judged, at least Thresholds.RatioMin
)

// Standing is what the limiter knows about an identity at one moment.
type Standing struct {
	Count   int     // distinct invalid recipients, short window
	Long    int     // distinct invalid recipients, long window
	Invalid int     // invalid recipients as the ratio counts them (dead domains once)
	Valid   int     // valid verdicts, short window
	Pending int     // verifications reserved and not settled
	Crossed Trigger // the first limit passed, TriggerNone when none
	// First is set for the one verdict that acts on the crossing: the one
	// that took the count past the limit (exactly limit+1), or the next
	// one after a switch from monitor to enforce.
	First bool
	// Safe is true when no limit can be passed even if every pending
	// verification turns out invalid: a request may be answered at once.
	Safe bool
}

// standing computes the Standing of tr at t; the caller holds the lock.
func (l *Limiter) standing(tr *track, t int64, lim Thresholds) Standing {
	tr.expire(t - l.keep)
	st := Standing{Count: tr.countSince(t - l.period), Pending: int(tr.pending)}
	if l.long > 0 {
		st.Long = tr.countSince(t - l.long)
	}
	if lim.Ratio > 0 {
		st.Invalid = tr.ratioCount(t - l.period)
		st.Valid = tr.validCount(t, l.period/validBuckets)
	}
	p := st.Pending
	switch {
	case lim.Count > 0 && st.Count > lim.Count:
		st.Crossed = TriggerCount
	case lim.Long > 0 && l.long > 0 && st.Long > lim.Long:
		st.Crossed = TriggerLong
	case ratioCrossed(lim, st.Invalid, st.Valid):
		st.Crossed = TriggerRatio
	}
	st.Safe = st.Crossed == TriggerNone &&
		(lim.Count == 0 || st.Count+p <= lim.Count) &&
		(lim.Long == 0 || l.long == 0 || st.Long+p <= lim.Long) &&
		!ratioCrossed(lim, st.Invalid+p, st.Valid)
	return st
}

// gathers reports whether the evidence of the invalid verdict that brought
// an identity to st is worth keeping: whether it could be among the
// maxRecipients most recent when a report is made, a block at lim or a
// warning at warn invalid recipients (0: none). Each recipient between st
// and a limit is an invalid verdict of its own, so one more than
// maxRecipients away from every limit never shows. Keeping evidence only
// near a limit spares most tracked identities its cost.
func (st Standing) gathers(lim Thresholds, warn int) bool {
	near := func(n, limit int) bool { return limit > 0 && n+maxRecipients > limit }
	return st.Crossed != TriggerNone || near(st.Count, lim.Count) || near(st.Count+1, warn) ||
		near(st.Long, lim.Long) || lim.Ratio > 0 && near(st.Invalid+1, lim.RatioMin)
}

// ratioCrossed reports whether invalid of invalid+valid judged passes the
// ratio trigger.
func ratioCrossed(lim Thresholds, invalid, valid int) bool {
	return lim.Ratio > 0 && lim.RatioMin > 0 && invalid >= lim.RatioMin &&
		float64(invalid) >= lim.Ratio*float64(invalid+valid)
}

// Reserve records that a verification for id starts whose verdict may
// count, and returns the identity's standing with it included.
func (l *Limiter) Reserve(id string, now time.Time, lim Thresholds) Standing {
	return update(l, id, now, func(tr *track, t int64) Standing {
		tr.pending++
		return l.standing(tr, t, lim)
	})
}

// settle ends a reservation with its verdict: an invalid one is counted
// (a dead domain once for the ratio), a valid one counts for the ratio,
// any other only ends the reservation; res nil ends it without a verdict.
// It returns the new standing; the caller acts on it, then calls wake.
func (l *Limiter) settle(id string, res *callout.Result, now time.Time, lim Thresholds) Standing {
	return update(l, id, now, func(tr *track, t int64) Standing {
		if tr.pending > 0 {
			tr.pending--
		}
		return l.count(tr, res, t, lim)
	})
}

// act marks the track blocked in lim.Act when an invalid verdict finds it
// past a limit for the first time: under the identity's lock, so exactly
// one verdict, the one at limit+1, acts on a crossing.
func (l *Limiter) act(tr *track, st Standing, res *callout.Result, lim Thresholds) Standing {
	if st.Crossed == TriggerNone || res == nil || res.Status != callout.StatusInvalid || lim.Act == "" ||
		tr.blocked() == ModeEnforce || tr.blocked() == lim.Act {
		return st
	}
	tr.extra().blocked = lim.Act
	st.First = true
	return st
}

// judge counts a verdict that needed no reservation (one from the cache)
// and returns the standing with it; the caller acts on it, then calls wake.
func (l *Limiter) judge(id string, res *callout.Result, now time.Time, lim Thresholds) Standing {
	return update(l, id, now, func(tr *track, t int64) Standing { return l.count(tr, res, t, lim) })
}

// count counts a verdict at t and returns the standing with it, marked
// First when it is the one that crosses (see act).
func (l *Limiter) count(tr *track, res *callout.Result, t int64, lim Thresholds) Standing {
	switch {
	case res == nil:
	case res.Status == callout.StatusInvalid:
		l.addHit(tr, maphash.String(l.seed, res.Address), l.deadDomain(res), t)
	case res.Status == callout.StatusValid:
		tr.addValid(t, max(l.period/validBuckets, 1))
	}
	return l.act(tr, l.standing(tr, t, lim), res, lim)
}

// deadDomain returns the hash (never 0) of the recipient's domain when the
// verdict says the whole domain takes no mail, else 0.
func (l *Limiter) deadDomain(res *callout.Result) uint32 {
	switch res.Reason {
	case callout.ReasonNXDomain, callout.ReasonNullMX, callout.ReasonNoMailHost:
		return uint32(maphash.String(l.seed, recipientDomain(res.Address))) | 1
	}
	return 0
}

// Standing returns the standing of id at now.
func (l *Limiter) Standing(id string, now time.Time, lim Thresholds) Standing {
	return peek(l, id, func(tr *track) Standing {
		if tr == nil {
			return Standing{Safe: true}
		}
		return l.standing(tr, now.UnixNano(), lim)
	})
}

// changed returns a channel closed at the next change of id's counts; the
// caller must call unwait(id) once done waiting.
func (l *Limiter) changed(id string) <-chan struct{} {
	s := l.shard(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	tr := l.track(s, id, 0) // 0: no log line from here
	x := tr.extra()
	x.waiters++
	if x.change == nil {
		x.change = make(chan struct{})
	}
	return x.change
}

// unwait ends one Changed.
func (l *Limiter) unwait(id string) {
	peek(l, id, func(tr *track) struct{} {
		if tr != nil && tr.waiters() > 0 {
			tr.x.waiters--
		}
		return struct{}{}
	})
}

// waiting returns the requests of id waiting for a change.
func (l *Limiter) waiting(id string) int {
	return peek(l, id, func(tr *track) int {
		if tr == nil {
			return 0
		}
		return int(tr.waiters())
	})
}

// wake closes the change channel for those waiting on it.
func (tr *track) wake() {
	if tr.x != nil && tr.x.change != nil {
		close(tr.x.change)
		tr.x.change = nil
	}
}

// probeWindow is the sliding window of the per-identity probe cap.
const probeWindow = time.Minute

// takeProbe counts one uncached verification for id at now and reports
// whether it stays within perMinute in the minute ending at now (a sliding
// window); perMinute <= 0 means no cap. A refused probe is not counted.
func (l *Limiter) takeProbe(id string, now time.Time, perMinute int) bool {
	if perMinute <= 0 {
		return true
	}
	return update(l, id, now, func(tr *track, t int64) bool { return tr.probes.Take(t, probeWindow, perMinute) })
}
