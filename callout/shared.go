package callout

import (
	"context"
	"strings"
	"time"
)

// SharedCache is a second verdict cache behind the in-process one, shared
// by several servers (rcptguard's [cluster]), so that one address is
// probed once per fleet per TTL. It is asked only when the in-process
// cache has no verdict, never for the verdicts it answers, and its
// failures only cost a probe.
type SharedCache interface {
	// LoadVerdict returns the verdict stored under key and when it
	// expires; ok is false when there is none or it cannot be asked.
	LoadVerdict(ctx context.Context, key string) (res Result, expires time.Time, ok bool)
	// StoreVerdict stores res under key until expires, if it can.
	StoreVerdict(ctx context.Context, key string, res Result, expires time.Time)
}

// sharedTimeout bounds one call of the shared cache, facts or caps
// unless Config.SharedTimeout says otherwise.
const sharedTimeout = 200 * time.Millisecond

// sharedLookup asks the shared cache for key's verdict and keeps a fresh
// one in the in-process cache too.
func (v *Verifier) sharedLookup(ctx context.Context, key string) (Result, bool) {
	if v.cfg.Shared == nil {
		return Result{}, false
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), v.cfg.SharedTimeout)
	defer cancel()
	res, exp, ok := v.cfg.Shared.LoadVerdict(ctx, key)
	if !ok || res.Reason == ReasonRateLimited || res.Reason == ReasonCanceled || res.Reason == ReasonShutdown {
		return Result{}, false
	}
	switch res.Status {
	case StatusValid, StatusInvalid, StatusUnknown:
	default:
		return Result{}, false
	}
	ttl := exp.Sub(v.cfg.Now())
	if ttl <= 0 {
		return Result{}, false
	}
	res.Address = key
	v.storeLocal(key, res, ttl)
	res.Cached = true
	return res, true
}

// sharedStore hands a fresh verdict to the shared cache.
func (v *Verifier) sharedStore(key string, res Result, ttl time.Duration) {
	if v.cfg.Shared == nil || ttl <= 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), v.cfg.SharedTimeout)
	defer cancel()
	res.Cached = false
	v.cfg.Shared.StoreVerdict(ctx, key, res, v.cfg.Now().Add(ttl))
}

// SharedFacts keeps, for several servers, what their verifiers learnt
// about domains and MX hosts: which accept every local part, which refuse
// our probes. So a domain's MX sees one random-name probe per fleet per
// CatchAllTTL, and a host that refused one server is left alone by all.
// The in-process fact store is asked first; a failure of the shared one
// only costs a probe.
type SharedFacts interface {
	// LoadFact returns the fact stored under key and when it expires; ok
	// is false when there is none or it cannot be asked.
	LoadFact(ctx context.Context, key string) (res Result, expires time.Time, ok bool)
	// StoreFact stores res under key until expires, if it can.
	StoreFact(ctx context.Context, key string, res Result, expires time.Time)
}

// sharedFactKind reports whether facts under key are shared: catch-all
// and random-name answers, refusing hosts. Permanent DNS facts are not:
// every server's resolver knows them as cheaply.
func sharedFactKind(key string) bool {
	return strings.HasPrefix(key, keyCatchAll) || strings.HasPrefix(key, keyHostAll) || strings.HasPrefix(key, keyRefusal)
}

// sharedFact asks the fleet for a fact the in-process store lacks and
// keeps a sound one locally, never longer than this server would have.
func (v *Verifier) sharedFact(key string) (Result, bool) {
	if v.cfg.SharedFacts == nil || !sharedFactKind(key) || strings.HasPrefix(key, keyHostAll) && !v.cfg.CatchAllProbe {
		return Result{}, false // without the random-name probe, its answers are not used
	}
	ctx, cancel := context.WithTimeout(v.ctx, v.cfg.SharedTimeout)
	defer cancel()
	res, exp, ok := v.cfg.SharedFacts.LoadFact(ctx, key)
	if !ok {
		return Result{}, false
	}
	switch res.Status {
	case StatusValid, StatusUnknown:
	default:
		return Result{}, false
	}
	longest := v.cfg.CatchAllTTL
	if strings.HasPrefix(key, keyRefusal) {
		longest = v.cfg.RefusalTTL
	}
	now := v.cfg.Now()
	ttl := min(exp.Sub(now), longest)
	if ttl <= 0 {
		return Result{}, false
	}
	v.facts.put(key, res, now.Add(ttl), now)
	res.Cached = true
	return res, true
}

// shareFact hands a fact just learnt to the fleet, off the answer's path:
// the verdict that taught it does not wait for Redis. It is called by a
// worker, so the Verifier's Close waits for it (SharedTimeout at most).
func (v *Verifier) shareFact(key string, res Result, ttl time.Duration) {
	if v.cfg.SharedFacts == nil || ttl <= 0 || !sharedFactKind(key) {
		return
	}
	res.Cached = false
	exp := v.cfg.Now().Add(ttl)
	v.wg.Go(func() {
		ctx, cancel := context.WithTimeout(context.Background(), v.cfg.SharedTimeout)
		defer cancel()
		v.cfg.SharedFacts.StoreFact(ctx, key, res, exp)
	})
}

// SharedCaps counts the probe caps (sessions, connections and RCPTs a
// minute, in all, per recipient domain and per MX address) for several
// servers together, so that N servers send no more to a domain or an
// address than one would. It is asked after this server's own caps, which
// always hold: when the fleet cannot be asked, or an event passed the
// local caps but not the fleet's, the local count keeps it (it errs on
// the side of sending less).
type SharedCaps interface {
	// TakeCaps counts one event at now for every cap, or for none when
	// one of them had Max events in the span per before now, and returns
	// the index of that cap, or -1. An error means the fleet could not
	// be asked.
	TakeCaps(ctx context.Context, now time.Time, per time.Duration, caps []Cap) (int, error)
}

// Cap is one probe cap: its key ("s" sessions in all, "d:domain",
// "c:ip" connections, "r:domain" and "q:ip" RCPTs) and its maximum.
type Cap struct {
	Key string
	Max int
}

// takeCaps counts one event against the caps of keys, this server's
// first, then the fleet's, and returns the index of the cap reached, or
// -1.
func (v *Verifier) takeCaps(now time.Time, keys ...windowKey) int {
	if n := v.win.takeAll(now, keys...); n >= 0 || v.cfg.SharedCaps == nil {
		return n
	}
	caps := make([]Cap, len(keys))
	for i, k := range keys {
		caps[i] = Cap{Key: k.key, Max: k.max}
	}
	ctx, cancel := context.WithTimeout(v.ctx, v.cfg.SharedTimeout)
	defer cancel()
	n, err := v.cfg.SharedCaps.TakeCaps(ctx, now, v.win.per, caps)
	if err != nil || n >= len(keys) {
		return -1 // the local caps held
	}
	return n
}
