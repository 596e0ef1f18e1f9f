package cluster

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/rcptguard/rcptguard/callout"
	"github.com/rcptguard/rcptguard/detector"
)

// countScript counts one verdict of an identity and returns its standing,
// atomically: Redis runs one script at a time, so the verdict that takes
// a count past its limit is exactly one, fleet-wide, and it alone gets
// first = 1.
//
// KEYS[1] sorted set of distinct invalid recipients (member: 8 bytes of
// SHA-256 of the address, plus 4 of the domain's when the whole domain
// takes no mail; score: last seen, unix ms), KEYS[2] hash of valid
// verdicts per bucket of period/12, KEYS[3] the crossing mark (the mode
// the crossing was acted on in), KEYS[4] sorted set of the verifications
// in flight (member: reservation key; score: when it expires, unix ms).
// ARGV: now ms, period ms, long period ms (0 none), op ("i" invalid, "v"
// valid, "r" reserve, "" look or end a reservation), member, the
// member's other form (to drop), limit, long limit, ratio, ratio_min, act
// ("" none, enforce, monitor), reservation key ("" none), its expiry ms,
// "1" to drop the counts and the crossing mark first (ForgetCounts).
// Returns {count, long count, ratio's invalid, valid, crossed, first,
// pending}.
var countScript = redis.NewScript(`
local now = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local long = tonumber(ARGV[3])
local keep = math.max(period, long)
local op = ARGV[4]
if ARGV[14] == '1' then redis.call('DEL', KEYS[1], KEYS[2], KEYS[3]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - keep)
if ARGV[12] ~= '' then
  if op == 'r' then
    redis.call('ZADD', KEYS[4], ARGV[13], ARGV[12])
    redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[13]) - now)
  else
    redis.call('ZREM', KEYS[4], ARGV[12])
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local pending = redis.call('ZCARD', KEYS[4])
local width = math.max(math.floor(period / 12), 1)
local b = math.floor(now / width)
if op == 'i' then
  if ARGV[6] ~= '' then redis.call('ZREM', KEYS[1], ARGV[6]) end
  redis.call('ZADD', KEYS[1], 'GT', now, ARGV[5])
  redis.call('PEXPIRE', KEYS[1], keep)
elseif op == 'v' then
  redis.call('HINCRBY', KEYS[2], tostring(b), 1)
  redis.call('PEXPIRE', KEYS[2], period + width)
end
local count = redis.call('ZCOUNT', KEYS[1], '(' .. (now - period), '+inf')
local longc = 0
if long > 0 then longc = redis.call('ZCOUNT', KEYS[1], '(' .. (now - long), '+inf') end
local inv, valid = count, 0
local ratio = tonumber(ARGV[9])
-- Below ratio_min even with every verification in flight invalid, the
-- ratio cannot pass: count stands for its invalid (an upper bound) and
-- the valid verdicts are not read.
if ratio > 0 and count + pending >= tonumber(ARGV[10]) then
  inv = 0
  local dead, nd = {}, 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. (now - period), '+inf')) do
    if #m > 8 then
      local d = string.sub(m, 9)
      if not dead[d] then dead[d] = true; nd = nd + 1 end
    else
      inv = inv + 1
    end
  end
  inv = inv + nd
  local vs = redis.call('HGETALL', KEYS[2])
  for i = 1, #vs, 2 do
    if tonumber(vs[i]) > b - 12 then valid = valid + tonumber(vs[i + 1]) else redis.call('HDEL', KEYS[2], vs[i]) end
  end
end
local lim, llim, rmin = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[10])
local crossed = ''
if lim > 0 and count > lim then crossed = 'count'
elseif llim > 0 and long > 0 and longc > llim then crossed = 'long'
elseif ratio > 0 and rmin > 0 and inv >= rmin and inv >= ratio * (inv + valid) then crossed = 'ratio' end
local first = 0
local act = ARGV[11]
if crossed ~= '' and op == 'i' and act ~= '' then
  local m = redis.call('GET', KEYS[3])
  if m ~= 'enforce' and m ~= act then
    redis.call('SET', KEYS[3], act, 'PX', keep)
    first = 1
  end
end
return {count, longc, inv, valid, crossed, first, pending}
`)

// reservationTTL is how long a verification in flight counts for the
// fleet at most, should its server never end it (a crash).
const reservationTTL = time.Minute

// Record ends the reservation key ("" none) and counts a verdict of id in
// Redis, and returns the fleet's standing with it
// (detector.SharedCounter). Only invalid verdicts, and valid ones when
// the ratio trigger is on, are written.
func (c *Cluster) Record(ctx context.Context, id, key string, res *callout.Result, now time.Time, lim detector.Thresholds) (detector.Standing, error) {
	op, member, alt := "", "", ""
	switch {
	case res == nil:
	case res.Status == callout.StatusInvalid:
		op = "i"
		member, alt = members(res)
	case res.Status == callout.StatusValid && lim.Ratio > 0:
		if key == "" {
			// A valid verdict never makes a crossing: counted in the
			// next batch, off the answer's path.
			c.queueValid(id, now)
			return detector.Standing{}, nil
		}
		op = "v"
	}
	return c.run(ctx, id, op, member, alt, key, now, lim)
}

// Reserve records a verification of id in flight under key and returns
// the fleet's standing with it; key "" only looks.
func (c *Cluster) Reserve(ctx context.Context, id, key string, now time.Time, lim detector.Thresholds) (detector.Standing, error) {
	return c.run(ctx, id, "r", "", "", key, now, lim)
}

func (c *Cluster) run(ctx context.Context, id, op, member, alt, key string, now time.Time, lim detector.Thresholds) (detector.Standing, error) {
	var st detector.Standing
	long := c.long
	if lim.Long == 0 {
		long = 0
	}
	keys := []string{c.key("c", id), c.key("v", id), c.key("x", id), c.key("p", id)}
	reset := ""
	mark, marked := c.forgotten.Load(id)
	if marked {
		reset = "1"
	}
	var out []any
	err := c.call(ctx, func(ctx context.Context) error {
		var err error
		out, err = countScript.Run(ctx, c.rdb, keys, now.UnixMilli(), c.period.Milliseconds(), long.Milliseconds(), op, member, alt,
			lim.Count, lim.Long, strconv.FormatFloat(lim.Ratio, 'g', -1, 64), lim.RatioMin, string(lim.Act), key, now.Add(reservationTTL).UnixMilli(), reset).Slice()
		return err
	})
	if err != nil {
		return st, fmt.Errorf("cluster: counting %s: %w", id, err)
	}
	if marked {
		c.forgotten.CompareAndDelete(id, mark) // not a mark made meanwhile
	}
	if len(out) != 7 {
		return st, fmt.Errorf("cluster: counting %s: script returned %d values", id, len(out))
	}
	n := func(i int) int { v, _ := out[i].(int64); return int(v) }
	st.Count, st.Long, st.Invalid, st.Valid = n(0), n(1), n(2), n(3)
	s, _ := out[4].(string)
	st.Crossed = detector.Trigger(s)
	st.First = n(5) == 1
	st.Pending = n(6)
	return st, nil
}

// members returns the set member of an invalid recipient and its other
// form: with the domain's hash when the whole domain takes no mail.
func members(res *callout.Result) (member, alt string) {
	h := sha256.Sum256([]byte(res.Address))
	base := string(h[:8])
	dom := ""
	if at := strings.LastIndexByte(res.Address, '@'); at >= 0 {
		d := sha256.Sum256([]byte(strings.ToLower(strings.TrimSuffix(res.Address[at+1:], "."))))
		dom = string(d[:4])
	}
	switch res.Reason {
	case callout.ReasonNXDomain, callout.ReasonNullMX, callout.ReasonNoMailHost:
		return base + dom, base
	}
	return base, base + dom
}

// queueValid counts a valid verdict of id at now in the next batch.
func (c *Cluster) queueValid(id string, now time.Time) {
	b := now.UnixMilli() / max(c.period.Milliseconds()/12, 1)
	c.vmu.Lock()
	c.valid[validKey{id, b}]++
	n := len(c.valid)
	c.vmu.Unlock()
	if n >= maxBatch {
		select {
		case c.flushNow <- struct{}{}:
		default:
		}
	}
}

// maxBatch is the batch size that makes Run write at once.
const maxBatch = 4096

// flushEvery is how often Run writes the valid verdicts counted since.
const flushEvery = 100 * time.Millisecond

type validKey struct {
	id string
	b  int64 // bucket: unix ms / (period/12)
}

// Run writes the batched valid verdicts every 100 ms until ctx ends. The
// fleet's valid counts (the ratio trigger's) are that much late; each
// server adds its own, so only other servers' newest valid verdicts can
// be missing, which never delays a block.
func (c *Cluster) Run(ctx context.Context) {
	t := time.NewTicker(flushEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-c.flushNow:
		}
		c.Flush(ctx)
	}
}

// Flush writes the batched valid verdicts; when Redis cannot take them
// they are dropped (counts err on the side of a block, and Redis is down).
//
// A hash's expiry is set only by the write that creates its bucket (the
// HINCRBY that returns exactly its own increment), anywhere in the fleet:
// that expiry outlasts the bucket's time in the window, and a hash lost
// (an unblock's reset, a Redis restart) gets one again with its next
// bucket's first write. So a flush costs one command per identity and
// bucket, plus one per bucket the fleet opens.
func (c *Cluster) Flush(ctx context.Context) {
	c.vmu.Lock()
	batch := c.valid
	c.valid = map[validKey]int{}
	c.vmu.Unlock()
	if len(batch) == 0 {
		return
	}
	ttl := c.period + c.period/12
	_ = c.call(ctx, func(ctx context.Context) error {
		type write struct {
			key string
			n   int64
			cmd *redis.IntCmd
		}
		writes := make([]write, 0, len(batch))
		p := c.rdb.Pipeline()
		for k, n := range batch {
			h := c.key("v", k.id)
			writes = append(writes, write{h, int64(n), p.HIncrBy(ctx, h, strconv.FormatInt(k.b, 10), int64(n))})
		}
		if _, err := p.Exec(ctx); err != nil {
			return err
		}
		p = c.rdb.Pipeline()
		for _, w := range writes {
			if w.cmd.Val() == w.n {
				p.PExpire(ctx, w.key, ttl)
			}
		}
		if p.Len() == 0 {
			return nil
		}
		_, err := p.Exec(ctx)
		return err
	})
}

// ResetCounts forgets the shared counts of id, as after an unblock.
func (c *Cluster) ResetCounts(ctx context.Context, id string) error {
	mark, marked := c.forgotten.Load(id)
	err := c.call(ctx, func(ctx context.Context) error {
		return c.rdb.Del(ctx, c.key("c", id), c.key("v", id), c.key("x", id)).Err() // not the verifications in flight
	})
	if err == nil && marked {
		c.forgotten.CompareAndDelete(id, mark) // not a mark made meanwhile
	}
	return err
}

// ForgetCounts marks the shared counts of id as those of a block being
// lifted here: the next count of id drops them first, in the same script,
// unless ResetCounts did so before. It never waits for Redis, so it may
// be called while the blocklist is locked, as an unblock takes effect:
// between the local unblock and its push to the fleet, a verdict of id
// is then judged on fresh counts, never re-blocked on those that blocked
// it.
func (c *Cluster) ForgetCounts(id string) { c.forgotten.Store(id, c.marks.Add(1)) }

// Register adds the cluster's metrics to reg.
func (c *Cluster) Register(reg prometheus.Registerer) error {
	if err := reg.Register(c.errs); err != nil {
		return err
	}
	return reg.Register(c.up)
}

// probeScript takes one verification of an identity from its fleet-wide
// cap, atomically: KEYS[1] sorted set of the identity's verifications
// (member unique; score unix ms); ARGV now ms, window ms, cap, member.
// Returns 1 when taken, 0 when the window already holds cap of them.
var probeScript = redis.NewScript(`
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
return 1
`)

// probeWindow is the per-identity probe cap's sliding window (the
// detector's own cap has the same).
const probeWindow = time.Minute

// TakeProbe records a verification of id at now unless the fleet made
// perMinute in the minute ending at now (detector.SharedProbes).
func (c *Cluster) TakeProbe(ctx context.Context, id string, now time.Time, perMinute int) (bool, error) {
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	var n int64
	err := c.call(ctx, func(ctx context.Context) error {
		var err error
		n, err = probeScript.Run(ctx, c.rdb, []string{c.key("q", id)}, now.UnixMilli(), probeWindow.Milliseconds(), perMinute, string(rnd[:])).Int64()
		return err
	})
	if err != nil {
		return false, fmt.Errorf("cluster: probe cap of %s: %w", id, err)
	}
	return n == 1, nil
}
