package callout

import (
	"sync"
	"time"
)

// cacheEntry is what the verdict cache keeps: a verdict and when it
// expires by the injected clock (ristretto's own TTL only reclaims memory).
type cacheEntry struct {
	res     Result
	expires int64 // unix nanoseconds
}

// lookup returns a cached verdict on an address that has not expired.
func (v *Verifier) lookup(key string) (Result, bool) {
	e, ok := v.cache.Get(key)
	if !ok || v.cfg.Now().UnixNano() >= e.expires {
		return Result{}, false
	}
	e.res.Cached = true
	return e.res, true
}

// store caches res under key for ttl. Ristretto may decline to keep it
// (admission): that costs one more probe of the address, nothing else.
func (v *Verifier) store(key string, res Result, ttl time.Duration) {
	v.storeLocal(key, res, ttl)
	v.sharedStore(key, res, ttl)
}

// storeLocal caches res under key for ttl in this process only.
func (v *Verifier) storeLocal(key string, res Result, ttl time.Duration) {
	if ttl <= 0 {
		return
	}
	res.Cached = false
	cost := int64(len(key)+len(res.Address)+len(res.Host)+len(res.Reply.Text)+len(res.Detail)) + 160
	v.cache.SetWithTTL(key, cacheEntry{res: res, expires: v.cfg.Now().Add(ttl).UnixNano()}, cost, ttl)
}

// Fact key prefixes. Facts are what the verifier learnt about a domain or
// an MX host rather than about one address.
const (
	keyDomain   = "@" // permanent DNS fact about a domain: "@domain"
	keyCatchAll = "~" // the domain's primary MX accepts every local part: "~domain"
	keyHostAll  = "=" // what a random-name probe showed: "=domain mxname"
	keyRefusal  = "!" // MX host refusing our MAIL FROM: "!mxname"
)

// maxFacts bounds the fact store. A fact is some 200 bytes.
const maxFacts = 200_000

// facts keeps what governs how often a domain or an MX host is probed
// (catch-all or not, refusing probes, domains that do not exist). These
// must be kept for as long as they say, so they are not in the verdict
// cache, whose admission policy may drop any entry: a dropped "not
// catch-all" would mean one more random-name probe at the domain, and a
// domain's log shows at most one of those from us a week.
type facts struct {
	mu  sync.Mutex
	m   map[string]factEntry
	max int
}

type factEntry struct {
	res     Result
	expires time.Time
}

func newFacts(max int) *facts { return &facts{m: map[string]factEntry{}, max: max} }

// get returns the fact under key unless it has expired at now.
func (f *facts) get(key string, now time.Time) (Result, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	e, ok := f.m[key]
	if !ok {
		return Result{}, false
	}
	if !now.Before(e.expires) {
		delete(f.m, key)
		return Result{}, false
	}
	e.res.Cached = true
	return e.res, true
}

// put keeps res under key until now+ttl. When the store is full, the
// expired facts go, and if none had, a tenth of the store, chosen at
// random (map order): forgetting a fact costs one more probe, later.
func (f *facts) put(key string, res Result, ttl time.Duration, now time.Time) {
	if ttl <= 0 {
		return
	}
	res.Cached = false
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.m[key]; !ok && len(f.m) >= f.max {
		for k, e := range f.m {
			if !now.Before(e.expires) {
				delete(f.m, k)
			}
		}
		for k := range f.m {
			if len(f.m) < f.max-f.max/10 {
				break
			}
			delete(f.m, k)
		}
	}
	f.m[key] = factEntry{res: res, expires: now.Add(ttl)}
}

// fact and learn read and write the fact store by the verifier's clock.
// The fleet's facts ([cluster]) come second and are told what was learnt.
func (v *Verifier) fact(key string) (Result, bool) {
	if res, ok := v.facts.get(key, v.cfg.Now()); ok {
		return res, true
	}
	return v.sharedFact(key)
}

func (v *Verifier) learn(key string, res Result, ttl time.Duration) {
	v.facts.put(key, res, ttl, v.cfg.Now())
	v.shareFact(key, res, ttl)
}
