package callout

import (
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
type facts = ttlMap[string, Result]

func newFacts(max int) *facts { return newTTLMap[string, Result](max) }

// fact and learn read and write the fact store by the verifier's clock.
// The fleet's facts ([cluster]) come second and are told what was learnt.
func (v *Verifier) fact(key string) (Result, bool) {
	if res, ok := v.facts.get(key, v.cfg.Now()); ok {
		res.Cached = true
		return res, true
	}
	return v.sharedFact(key)
}

func (v *Verifier) learn(key string, res Result, ttl time.Duration) {
	if ttl <= 0 {
		return
	}
	now := v.cfg.Now()
	res.Cached = false
	v.facts.put(key, res, now.Add(ttl), now)
	v.shareFact(key, res, ttl)
}
