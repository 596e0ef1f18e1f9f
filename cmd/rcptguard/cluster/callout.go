package cluster

import (
	"context"
	"encoding/json"
	"math/rand/v2"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/rcptguard/rcptguard/callout"
)

// What the fleet's verifiers share: verdicts (callout.SharedCache), facts
// about domains and MX hosts (callout.SharedFacts), and the probe caps
// (callout.SharedCaps).

// storedResult is a verdict or a fact as Redis keeps it.
type storedResult struct {
	Res     callout.Result `json:"r"`
	Expires int64          `json:"e"` // unix ms
}

// maxResultJSON bounds a stored result read back: the fleet's own writes
// are far smaller.
const maxResultJSON = 8 << 10

// loadResult reads the result under the Redis key k.
func (c *Cluster) loadResult(ctx context.Context, k string) (callout.Result, time.Time, bool) {
	var raw string
	err := c.call(ctx, func(ctx context.Context) error {
		var err error
		raw, err = c.rdb.Get(ctx, k).Result()
		return err
	})
	if err != nil || raw == "" || len(raw) > maxResultJSON {
		return callout.Result{}, time.Time{}, false
	}
	var sr storedResult
	if json.Unmarshal([]byte(raw), &sr) != nil {
		return callout.Result{}, time.Time{}, false
	}
	return sr.Res, time.UnixMilli(sr.Expires), true
}

// storeResult keeps res under the Redis key k until expires.
func (c *Cluster) storeResult(ctx context.Context, k string, res callout.Result, expires time.Time) {
	ttl := expires.Sub(c.now())
	if ttl <= 0 {
		return
	}
	b, err := json.Marshal(storedResult{Res: res, Expires: expires.UnixMilli()})
	if err != nil {
		return
	}
	_ = c.call(ctx, func(ctx context.Context) error {
		return c.rdb.Set(ctx, k, b, ttl).Err()
	})
}

// LoadVerdict returns the fleet's cached verdict on key
// (callout.SharedCache).
func (c *Cluster) LoadVerdict(ctx context.Context, key string) (callout.Result, time.Time, bool) {
	return c.loadResult(ctx, c.prefix+"verdict:"+key)
}

// StoreVerdict keeps a verdict for the fleet until expires
// (callout.SharedCache).
func (c *Cluster) StoreVerdict(ctx context.Context, key string, res callout.Result, expires time.Time) {
	c.storeResult(ctx, c.prefix+"verdict:"+key, res, expires)
}

// LoadFact returns the fleet's fact under key: a domain is a catch-all,
// an MX host refuses probes (callout.SharedFacts).
func (c *Cluster) LoadFact(ctx context.Context, key string) (callout.Result, time.Time, bool) {
	return c.loadResult(ctx, c.prefix+"fact:"+key)
}

// StoreFact keeps a fact for the fleet until expires
// (callout.SharedFacts).
func (c *Cluster) StoreFact(ctx context.Context, key string, res callout.Result, expires time.Time) {
	c.storeResult(ctx, c.prefix+"fact:"+key, res, expires)
}

// capScript counts one event in every cap's sliding window, or in none
// when one of them is full, as the verifier's own window does: KEYS are
// sorted sets of events (score: unix ms), ARGV now ms, span ms, the
// event's member, then each key's maximum. Returns the index of the full
// cap, or -1.
var capScript = redis.NewScript(`
local now, per = tonumber(ARGV[1]), tonumber(ARGV[2])
for i, k in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now - per)
  if redis.call('ZCARD', k) >= tonumber(ARGV[3 + i]) then return i - 1 end
end
for _, k in ipairs(KEYS) do
  redis.call('ZADD', k, now, ARGV[3])
  redis.call('PEXPIRE', k, per)
end
return -1
`)

// TakeCaps counts one probe event against the fleet's caps
// (callout.SharedCaps). All cap keys share one Redis Cluster slot, so one
// script sees them together; they carry a few thousand events a minute at
// most.
func (c *Cluster) TakeCaps(ctx context.Context, now time.Time, per time.Duration, caps []callout.Cap) (int, error) {
	keys := make([]string, len(caps))
	args := make([]any, 0, 3+len(caps))
	args = append(args, now.UnixMilli(), per.Milliseconds(), strconv.FormatInt(now.UnixMilli(), 36)+"."+strconv.FormatUint(rand.Uint64(), 36))
	for i, cp := range caps {
		keys[i] = c.prefix + "cap{probe}:" + cp.Key
		args = append(args, cp.Max)
	}
	var n int64
	err := c.call(ctx, func(ctx context.Context) error {
		var err error
		n, err = capScript.Run(ctx, c.rdb, keys, args...).Int64()
		return err
	})
	if err != nil {
		return -1, err
	}
	return int(n), nil
}
