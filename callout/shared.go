package callout

import (
	"context"
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

// sharedTimeout bounds one call of the shared cache.
const sharedTimeout = 200 * time.Millisecond

// sharedLookup asks the shared cache for key's verdict and keeps a fresh
// one in the in-process cache too.
func (v *Verifier) sharedLookup(ctx context.Context, key string) (Result, bool) {
	if v.cfg.Shared == nil {
		return Result{}, false
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), sharedTimeout)
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
	ctx, cancel := context.WithTimeout(context.Background(), sharedTimeout)
	defer cancel()
	res.Cached = false
	v.cfg.Shared.StoreVerdict(ctx, key, res, v.cfg.Now().Add(ttl))
}
