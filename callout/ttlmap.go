package callout

import (
	"sync"
	"time"
)

// ttlMap is a bounded map whose entries expire by an injected clock. It
// holds the verifier's facts and the resolver's DNS answers, which need
// what the ristretto verdict cache does not give: a put is seen by the next
// get at once (ristretto buffers its Sets, so a lookup that follows a CNAME
// or an implicit MX would ask the DNS again), and nothing is refused by an
// admission policy (a dropped fact means one more random-name probe at a
// domain). When full, it drops the expired entries, then arbitrary ones
// (map order) down to nine tenths, so that the next puts are cheap:
// forgetting an entry costs one more lookup or probe, later.
//
// A nil *ttlMap holds nothing: get finds nothing, put keeps nothing.
type ttlMap[K comparable, V any] struct {
	mu  sync.RWMutex
	m   map[K]ttlEntry[V]
	max int
}

type ttlEntry[V any] struct {
	v       V
	expires time.Time
}

// newTTLMap returns a map of at most max entries; nil when max <= 0.
func newTTLMap[K comparable, V any](max int) *ttlMap[K, V] {
	if max <= 0 {
		return nil
	}
	return &ttlMap[K, V]{m: map[K]ttlEntry[V]{}, max: max}
}

// get returns the value under k unless it has expired at now.
func (t *ttlMap[K, V]) get(k K, now time.Time) (V, bool) {
	var zero V
	if t == nil {
		return zero, false
	}
	t.mu.RLock()
	e, ok := t.m[k]
	t.mu.RUnlock()
	if !ok || !now.Before(e.expires) {
		return zero, false
	}
	return e.v, true
}

// put keeps v under k until expires, making room first when full.
func (t *ttlMap[K, V]) put(k K, v V, expires, now time.Time) {
	if t == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.m[k]; !ok && len(t.m) >= t.max {
		for k, e := range t.m {
			if !now.Before(e.expires) {
				delete(t.m, k)
			}
		}
		for k := range t.m {
			if len(t.m) < t.max-t.max/10 {
				break
			}
			delete(t.m, k)
		}
	}
	t.m[k] = ttlEntry[V]{v: v, expires: expires}
}

// len returns the entries held, expired ones included.
func (t *ttlMap[K, V]) len() int {
	if t == nil {
		return 0
	}
	t.mu.RLock()
	defer t.mu.RUnlock()
	return len(t.m)
}
