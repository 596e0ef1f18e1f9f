package detector

import (
	"hash/maphash"
	"slices"
	"sync"
	"time"

	"github.com/rcptguard/rcptguard/callout"
)

// Limiter counts, per identity, the distinct invalid recipients that fall
// inside a sliding window of Period, and keeps the evidence a report
// needs. It is a plain sharded map behind mutexes: a cache with an
// admission policy could silently drop a counter, and a dropped counter
// is an abuser let through.
//
// Time is always passed in, so tests control it. The zero Limiter is not
// usable; call NewLimiter.
type Limiter struct {
	period int64 // nanoseconds
	seed   maphash.Seed
	shards [limiterShards]limiterShard
}

const limiterShards = 64

type limiterShard struct {
	mu sync.Mutex
	m  map[string]*track
}

// track is the state of one identity.
type track struct {
	hits    []hit // distinct invalid recipients in the window, oldest first
	last    int64 // time of the last activity, unix ns
	warned  int64 // time of the last warning, unix ns; 0 none
	blocked Mode  // the mode a block was acted on in ("" none)
	ev      evidence
}

// hit is one distinct invalid recipient: a hash of the address and when it
// was last seen invalid.
type hit struct {
	h uint64
	t int64
}

// Evidence is what a report tells about an identity: where it connected
// from, which invalid recipients it tried (the most recent, at most
// MaxRecipients, oldest first) and the queue IDs of its mail that was held.
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

// Evidence bounds: what a report shows.
const (
	MaxRecipients = 20
	MaxClients    = 20
	MaxQueueIDs   = 100
)

// NewLimiter returns a limiter with the given window length.
func NewLimiter(period time.Duration) *Limiter {
	l := &Limiter{period: int64(period), seed: maphash.MakeSeed()}
	for i := range l.shards {
		l.shards[i].m = make(map[string]*track)
	}
	return l
}

func (l *Limiter) shard(id string) *limiterShard {
	return &l.shards[maphash.String(l.seed, id)%limiterShards]
}

// track returns the state of id, created when missing; the caller holds
// s.mu.
func (s *limiterShard) track(id string) *track {
	tr := s.m[id]
	if tr == nil {
		tr = &track{}
		s.m[id] = tr
	}
	return tr
}

// Add records that rcpt, a recipient of id, does not exist, and returns the
// number of distinct invalid recipients of id in the window ending at now.
// A recipient already in the window is not counted again; its time moves
// to now. rcpt is compared as given: the caller normalises it.
func (l *Limiter) Add(id, rcpt string, now time.Time) int {
	h := maphash.String(l.seed, rcpt)
	t := now.UnixNano()
	s := l.shard(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	tr := s.track(id)
	tr.last = max(tr.last, t)
	tr.expire(t - l.period)
	if i := slices.IndexFunc(tr.hits, func(x hit) bool { return x.h == h }); i >= 0 {
		tr.hits = slices.Delete(tr.hits, i, i+1)
	}
	// Keep the slice ordered by time even when calls arrive slightly out
	// of order from concurrent requests.
	i := len(tr.hits)
	for i > 0 && tr.hits[i-1].t > t {
		i--
	}
	tr.hits = slices.Insert(tr.hits, i, hit{h: h, t: t})
	return len(tr.hits)
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
	s := l.shard(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	tr := s.m[id]
	if tr == nil {
		return 0
	}
	tr.expire(now.UnixNano() - l.period)
	return len(tr.hits)
}

// Warn reports whether a warning for id is due at now: true at most once
// per period. It records that one was given.
func (l *Limiter) Warn(id string, now time.Time) bool {
	t := now.UnixNano()
	s := l.shard(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	tr := s.track(id)
	tr.last = max(tr.last, t)
	if tr.warned != 0 && t-tr.warned < l.period {
		return false
	}
	tr.warned = t
	return true
}

// MarkBlocked records that id was blocked in mode and reports whether the
// caller is the first to act on it: only one request per identity acts on
// a block. A would-block in monitor mode does not stand in the way of a
// real block once the mode is enforce.
func (l *Limiter) MarkBlocked(id string, mode Mode) bool {
	s := l.shard(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	tr := s.track(id)
	if tr.blocked == ModeEnforce || tr.blocked == mode {
		return false
	}
	tr.blocked = mode
	return true
}

// Note updates the evidence kept for id: fn runs with the identity's
// evidence under the identity's lock, so it must be quick and must not
// call back into the Limiter.
func (l *Limiter) Note(id string, now time.Time, fn func(*evidence)) {
	s := l.shard(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	tr := s.track(id)
	tr.last = max(tr.last, now.UnixNano())
	fn(&tr.ev)
}

// Evidence returns what is known about id, for a report.
func (l *Limiter) Evidence(id string) Evidence {
	s := l.shard(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	tr := s.m[id]
	if tr == nil {
		return Evidence{}
	}
	e := &tr.ev
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

// Sweep forgets identities with no activity for a whole period and returns
// how many identities are still tracked.
func (l *Limiter) Sweep(now time.Time) int {
	cutoff := now.UnixNano() - l.period
	n := 0
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		for id, tr := range s.m {
			if tr.last <= cutoff && tr.warned <= cutoff {
				delete(s.m, id)
				continue
			}
			tr.expire(cutoff)
			if len(tr.hits) == 0 && cap(tr.hits) > 4 {
				tr.hits = nil
			}
		}
		n += len(s.m)
		s.mu.Unlock()
	}
	return n
}

// Forget drops everything known about id, as after an unblock.
func (l *Limiter) Forget(id string) {
	s := l.shard(id)
	s.mu.Lock()
	delete(s.m, id)
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
// so, keeping the most recent MaxRecipients and one entry per address.
func (e *evidence) addRecipient(res callout.Result, now time.Time) {
	e.rcpts = slices.DeleteFunc(e.rcpts, func(x evRecipient) bool { return x.addr == res.Address })
	if len(e.rcpts) >= MaxRecipients {
		e.rcpts = slices.Delete(e.rcpts, 0, len(e.rcpts)-MaxRecipients+1)
	}
	r := evRecipient{addr: res.Address, t: uint32(max(now.Unix(), 0)), reason: reasonIndex(res.Reason), mx: res.Host,
		code: uint16(min(max(res.Reply.Code, 0), 999)), text: res.Reply.Text}
	for i, v := range res.Reply.Enhanced {
		r.enh[i] = uint16(min(max(v, 0), 999))
	}
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
			if name != "" {
				e.clients[i].Name = name
			}
			return
		}
	}
	if len(e.clients) < MaxClients {
		if e.clients == nil {
			e.clients = make([]ClientSeen, 0, 1)
		}
		e.clients = append(e.clients, ClientSeen{Address: addr, Name: name, Count: 1})
	}
}

// addQueueID remembers a queue ID that was answered with the block action.
func (e *evidence) addQueueID(id string) {
	if id == "" {
		return
	}
	if e.queueIDs == nil {
		e.queueIDs = new([]string)
	}
	if slices.Contains(*e.queueIDs, id) || len(*e.queueIDs) >= MaxQueueIDs {
		return
	}
	*e.queueIDs = append(*e.queueIDs, id)
}

// ProbeBudget caps, per identity, the verifications per minute that are
// not answered from the cache, so that rcptguard cannot be used as a probe
// oracle or a traffic amplifier by a sender with a long list. Counts are
// kept per fixed minute and forgotten when the minute ends.
type ProbeBudget struct {
	seed   maphash.Seed
	shards [limiterShards]probeShard
}

type probeShard struct {
	mu     sync.Mutex
	minute int64
	m      map[string]int
}

// NewProbeBudget returns an empty budget.
func NewProbeBudget() *ProbeBudget {
	return &ProbeBudget{seed: maphash.MakeSeed()}
}

// Take counts one probe for id at now and reports whether it stays within
// perMinute; perMinute <= 0 means no cap.
func (b *ProbeBudget) Take(id string, now time.Time, perMinute int) bool {
	if perMinute <= 0 {
		return true
	}
	minute := now.Unix() / 60
	s := &b.shards[maphash.String(b.seed, id)%limiterShards]
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.minute != minute || s.m == nil {
		s.m = make(map[string]int)
		s.minute = minute
	}
	if s.m[id] >= perMinute {
		return false
	}
	s.m[id]++
	return true
}
