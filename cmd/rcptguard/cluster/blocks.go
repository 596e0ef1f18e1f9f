package cluster

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/rcptguard/rcptguard/blocklist"
)

// The fleet's blocklist lives in two hashes that share one Redis Cluster
// slot: blocks (identity → "unix ms<TAB>ACTION<TAB>text") and unblocks,
// the tombstones (identity → unix ms of the unblock). A tombstone is how
// a server tells an unblock from a Redis that lost its data: a block
// missing from Redis is pushed back, unless a later tombstone says it was
// lifted. So an empty Redis never unblocks anyone. Tombstones are kept
// for TombstoneRetention.
//
// Beside them: gen, a counter every change of the two hashes bumps, so a
// server reads them only when they changed; changes, the log of what each
// generation changed, so it reads only those identities; and epoch, a random
// name given to the data set when a server finds none, so a server tells
// a Redis that kept its data from one that lost it (or a new one).
func (c *Cluster) blocksKey() string   { return c.prefix + "blocks{blocklist}" }
func (c *Cluster) unblocksKey() string { return c.prefix + "unblocks{blocklist}" }
func (c *Cluster) eventsKey() string   { return c.prefix + "events{blocklist}" }
func (c *Cluster) genKey() string      { return c.prefix + "gen{blocklist}" }
func (c *Cluster) epochKey() string    { return c.prefix + "epoch{blocklist}" }
func (c *Cluster) changesKey() string  { return c.prefix + "changes{blocklist}" }

// The change log, changes: for each generation, the identity whose block
// or tombstone that generation changed, so a server that agreed with the
// fleet at generation g reads only what changed since (see Sync). It is a
// sorted set, score the generation and member "gen:time:identity" (one
// member per generation: an identity changed twice is there twice; time,
// Redis's clock in µs, makes each member unique), trimmed to the last
// changeLogLen. A sorted set rather than a stream: a stream's
// IDs must grow, so a gen counter reset by hand would make every block
// script fail; a sorted set takes any score, and a server that finds the
// log not covering its range just compares in full.
//
// Every script that changes blocks or unblocks bumps gen by one per
// identity changed and logs it with logChange, so a range (g, g'] is
// complete exactly when it holds g'-g members — and is the history that
// followed the server's view exactly when the member at g is still the
// one the server saw last (its anchor). A generation used twice (gen
// deleted or evicted, Redis restored from an older dump, a lagging
// replica promoted) changes that member, and the server compares in full.

// changeLogLen is how many changes the log keeps: a server more than that
// many changes behind (cut off, or restarted) compares in full, which is
// then about as cheap. At 100,000 blocks a full comparison reads some
// 13 MB; 10,000 changes, some 1.5 MB. The log itself takes about 1.3 MB
// of Redis memory when full (measured with 20-byte identities).
const changeLogLen = 10_000

// logChange is the Lua function the blocklist scripts log a change with:
// logchange(gen, id) records that generation gen changed id. KEYS[5] is
// the log.
var logChange = fmt.Sprintf(`
local function logchange(gen, id)
  local t = redis.call('TIME')
  redis.call('ZREMRANGEBYSCORE', KEYS[5], gen, '+inf')
  redis.call('ZADD', KEYS[5], gen, gen .. ':' .. t[1] .. t[2] .. ':' .. id)
  redis.call('ZREMRANGEBYRANK', KEYS[5], 0, -%d)
end
`, changeLogLen+1)

// TombstoneRetention is how long the fleet remembers an unblock. A server
// cut off from Redis for longer does not push back the blocks it had when
// it was cut off and that the fleet no longer has: see Sync.
const TombstoneRetention = 30 * 24 * time.Hour

// blockKeys are the keys of the block, unblock and prune scripts.
func (c *Cluster) blockKeys() []string {
	return []string{c.blocksKey(), c.unblocksKey(), c.eventsKey(), c.genKey(), c.changesKey()}
}

// blockScript records a block made at ARGV[2] unless a later unblock is
// known; a block already there stays as it is. A refused block is logged
// as a change all the same: the server that pushed it holds a block the
// fleet does not, and must settle the identity again (see Sync).
var blockScript = redis.NewScript(logChange + `
local u = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '')
if u and u >= tonumber(ARGV[2]) then
  logchange(redis.call('INCR', KEYS[4]), ARGV[1])
  return 0
end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  redis.call('HDEL', KEYS[2], ARGV[1])
  logchange(redis.call('INCR', KEYS[4]), ARGV[1])
  redis.call('PUBLISH', KEYS[3], ARGV[1])
end
return 1
`)

// unblockScript lifts a block unless it was made after ARGV[2], and
// leaves a tombstone. A refused unblock is logged as a change, as a
// refused block is.
var unblockScript = redis.NewScript(logChange + `
local v = redis.call('HGET', KEYS[1], ARGV[1])
local bt = v and tonumber(string.match(v, '^(%d+)'))
if bt and bt > tonumber(ARGV[2]) then
  logchange(redis.call('INCR', KEYS[4]), ARGV[1])
  return 0
end
local n = redis.call('HDEL', KEYS[1], ARGV[1])
local old = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '')
if not old or old < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  n = 1
end
if n > 0 then logchange(redis.call('INCR', KEYS[4]), ARGV[1]) end
redis.call('PUBLISH', KEYS[3], ARGV[1])
return 1
`)

// PushBlock records a block of the fleet, made at t. It returns false,
// with no error, when a later unblock is known.
func (c *Cluster) PushBlock(ctx context.Context, e blocklist.Entry, t time.Time) (bool, error) {
	val := strconv.FormatInt(t.UnixMilli(), 10) + "\t" + e.Action + "\t" + e.Text
	var n int64
	err := c.call(ctx, func(ctx context.Context) error {
		var err error
		n, err = blockScript.Run(ctx, c.rdb, c.blockKeys(), e.Identity, t.UnixMilli(), val).Int64()
		return err
	})
	if err != nil {
		return false, fmt.Errorf("cluster: block %s: %w", e.Identity, err)
	}
	return n == 1, nil
}

// PushUnblock resets the identity's shared counts and then lifts its
// block fleet-wide, as of t. In that order: a server that learns of the
// unblock must find the counts (and the crossing mark) gone, or its next
// verdict of the identity would be judged on the counts that blocked it.
// While the block still holds, the identity's requests are answered
// from the blocklist without counting, so nothing is counted in between.
func (c *Cluster) PushUnblock(ctx context.Context, id string, t time.Time) error {
	if err := c.ResetCounts(ctx, id); err != nil {
		return fmt.Errorf("cluster: unblock %s: resetting counts: %w", id, err)
	}
	err := c.call(ctx, func(ctx context.Context) error {
		return unblockScript.Run(ctx, c.rdb, c.blockKeys(), id, t.UnixMilli()).Err()
	})
	if err != nil {
		return fmt.Errorf("cluster: unblock %s: %w", id, err)
	}
	return nil
}

// remoteBlock is one block as Redis has it.
type remoteBlock struct {
	entry blocklist.Entry
	t     int64 // unix ms
}

// state reads the fleet's blocks and tombstones.
func (c *Cluster) state(ctx context.Context) (map[string]remoteBlock, map[string]int64, error) {
	var bm, um map[string]string
	err := c.callWithin(ctx, max(c.timeout, bulkTimeout), func(ctx context.Context) error {
		p := c.rdb.Pipeline()
		b := p.HGetAll(ctx, c.blocksKey())
		u := p.HGetAll(ctx, c.unblocksKey())
		if _, err := p.Exec(ctx); err != nil {
			return err
		}
		bm, um = b.Val(), u.Val()
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("cluster: reading the blocklist: %w", err)
	}
	blocks := make(map[string]remoteBlock, len(bm))
	for id, v := range bm {
		if b, ok := parseBlock(id, v); ok {
			blocks[id] = b
		}
	}
	tombs := make(map[string]int64, len(um))
	for id, v := range um {
		if t, err := strconv.ParseInt(v, 10, 64); err == nil {
			tombs[id] = t
		}
	}
	return blocks, tombs, nil
}

// parseBlock reads the blocks hash's value v of id; false when it is not
// one rcptguard wrote (it is then left alone: not ours to judge).
func parseBlock(id, v string) (remoteBlock, bool) {
	ts, rest, _ := strings.Cut(v, "\t")
	action, text, _ := strings.Cut(rest, "\t")
	t, err := strconv.ParseInt(ts, 10, 64)
	if err != nil || action == "" {
		return remoteBlock{}, false
	}
	return remoteBlock{entry: blocklist.Entry{Identity: id, Action: action, Text: text}, t: t}, true
}

// changes is what the fleet's blocklist changed since a version: the
// identities, and their blocks and tombstones as of v.
type changes struct {
	v      version
	ids    []string
	blocks map[string]remoteBlock
	tombs  map[string]int64
}

// changesScript returns, when the data set is still ARGV[1], the log's
// member at generation ARGV[2] is still ARGV[4] (the server's anchor) and
// the log holds every generation after it, the generation now, the
// identities changed since ARGV[2], their blocks and tombstones (HMGET,
// in batches that Lua's stack takes), and the new anchor; else nothing.
// One script, so they agree.
var changesScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {} end
local gs = redis.call('GET', KEYS[2]) or '0'
local g, since = tonumber(gs), tonumber(ARGV[2])
if not g or g <= since or g - since > tonumber(ARGV[3]) then return {} end
if since == 0 then
  if ARGV[4] ~= '0' then return {} end
else
  local at = redis.call('ZRANGEBYSCORE', KEYS[3], ARGV[2], ARGV[2])
  if #at ~= 1 or at[1] ~= ARGV[4] then return {} end
end
local log = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[2], gs)
if #log ~= g - since then return {} end
local ids, seen = {}, {}
for _, m in ipairs(log) do
  local id = string.match(m, '^%d+:%d+:(.*)$')
  if id and not seen[id] then
    seen[id] = true
    ids[#ids + 1] = id
  end
end
local b, u = {}, {}
for i = 1, #ids, 500 do
  local batch = {unpack(ids, i, math.min(i + 499, #ids))}
  for _, v in ipairs(redis.call('HMGET', KEYS[4], unpack(batch))) do b[#b + 1] = v end
  for _, v in ipairs(redis.call('HMGET', KEYS[5], unpack(batch))) do u[#u + 1] = v end
end
return {gs, ids, b, u, log[#log]}
`)

// changesSince reads what the fleet's blocklist changed since the
// version since: nil, with no error, when that is not known (another
// data set, the log trimmed past it, or nothing changed).
func (c *Cluster) changesSince(ctx context.Context, since version) (*changes, error) {
	var out []any
	keys := []string{c.epochKey(), c.genKey(), c.changesKey(), c.blocksKey(), c.unblocksKey()}
	err := c.callWithin(ctx, max(c.timeout, bulkTimeout), func(ctx context.Context) error {
		var err error
		out, err = changesScript.Run(ctx, c.rdb, keys, since.epoch, since.gen, changeLogLen, since.anchor).Slice()
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: reading the blocklist's changes: %w", err)
	}
	if len(out) == 0 {
		return nil, nil
	}
	bad := fmt.Errorf("cluster: reading the blocklist's changes: script returned %d values", len(out))
	if len(out) != 5 {
		return nil, bad
	}
	gs, _ := out[0].(string)
	ids, _ := out[1].([]any)
	bs, _ := out[2].([]any)
	us, _ := out[3].([]any)
	anchor, _ := out[4].(string)
	g, err := strconv.ParseInt(gs, 10, 64)
	if err != nil || len(bs) != len(ids) || len(us) != len(ids) || anchor == "" {
		return nil, bad
	}
	ch := &changes{v: version{epoch: since.epoch, gen: g, anchor: anchor}, ids: make([]string, 0, len(ids)),
		blocks: map[string]remoteBlock{}, tombs: map[string]int64{}}
	for i, x := range ids {
		id, _ := x.(string)
		ch.ids = append(ch.ids, id)
		if v, ok := bs[i].(string); ok {
			if b, ok := parseBlock(id, v); ok {
				ch.blocks[id] = b
			}
		}
		if v, ok := us[i].(string); ok {
			if t, err := strconv.ParseInt(v, 10, 64); err == nil {
				ch.tombs[id] = t
			}
		}
	}
	return ch, nil
}

// Blocks returns the fleet's blocks, sorted by identity.
func (c *Cluster) Blocks(ctx context.Context) ([]blocklist.Entry, error) {
	blocks, _, err := c.state(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]blocklist.Entry, 0, len(blocks))
	for _, b := range blocks {
		out = append(out, b.entry)
	}
	slices.SortFunc(out, func(a, b blocklist.Entry) int { return cmp.Compare(a.Identity, b.Identity) })
	return out, nil
}

// versionScript returns the data set's epoch, naming it ARGV[1] when it
// has none, its generation, and the change log's member at that
// generation ("" when there is not exactly one; "0" at generation 0,
// before any change).
var versionScript = redis.NewScript(`
local e = redis.call('GET', KEYS[1])
if not e then
  e = ARGV[1]
  redis.call('SET', KEYS[1], e)
end
local g = redis.call('GET', KEYS[2]) or '0'
local at = redis.call('ZRANGEBYSCORE', KEYS[3], g, g)
local anchor = ''
if g == '0' then anchor = '0' elseif #at == 1 then anchor = at[1] end
return {e, g, anchor}
`)

// version says which state of the fleet's blocklist Redis holds: two
// equal versions mean the same blocks and tombstones. anchor, the change
// log's member at gen, tells a generation used twice apart.
type version struct {
	epoch  string
	gen    int64
	anchor string
}

// version reads the blocklist's version: one small round trip.
func (c *Cluster) version(ctx context.Context) (version, error) {
	var out []any
	err := c.call(ctx, func(ctx context.Context) error {
		var err error
		out, err = versionScript.Run(ctx, c.rdb, []string{c.epochKey(), c.genKey(), c.changesKey()}, newEpoch()).Slice()
		return err
	})
	if err != nil {
		return version{}, fmt.Errorf("cluster: reading the blocklist's version: %w", err)
	}
	if len(out) != 3 {
		return version{}, fmt.Errorf("cluster: reading the blocklist's version: script returned %d values", len(out))
	}
	e, _ := out[0].(string)
	g, _ := out[1].(string)
	anchor, _ := out[2].(string)
	n, err := strconv.ParseInt(g, 10, 64)
	if e == "" || err != nil {
		return version{}, fmt.Errorf("cluster: reading the blocklist's version: bad epoch %q or generation %q", e, g)
	}
	return version{epoch: e, gen: n, anchor: anchor}, nil
}

// newEpoch names a data set.
func newEpoch() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// pruneScript forgets the tombstones ARGV[2…] unless they changed since
// they were found older than ARGV[1] (unix ms).
var pruneScript = redis.NewScript(logChange + `
local n = 0
for i = 2, #ARGV do
  local v = tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '')
  if v and v <= tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[2], ARGV[i])
    logchange(redis.call('INCR', KEYS[4]), ARGV[i])
    n = n + 1
  end
end
return n
`)

// pruneBatch bounds the tombstones one prune script removes.
const pruneBatch = 1000

// pruneTombstones forgets the tombstones of tombs older than
// TombstoneRetention at now, and returns how many it removed.
func (c *Cluster) pruneTombstones(ctx context.Context, tombs map[string]int64, now time.Time) (int, error) {
	cut := now.Add(-TombstoneRetention).UnixMilli()
	args := []any{cut}
	removed := 0
	flush := func() error {
		if len(args) == 1 {
			return nil
		}
		err := c.callWithin(ctx, max(c.timeout, bulkTimeout), func(ctx context.Context) error {
			n, err := pruneScript.Run(ctx, c.rdb, c.blockKeys(), args...).Int()
			removed += n
			return err
		})
		args = args[:1]
		return err
	}
	for id, t := range tombs {
		if t > cut {
			continue
		}
		if args = append(args, id); len(args) > pruneBatch {
			if err := flush(); err != nil {
				return removed, fmt.Errorf("cluster: pruning tombstones: %w", err)
			}
		}
	}
	if err := flush(); err != nil {
		return removed, fmt.Errorf("cluster: pruning tombstones: %w", err)
	}
	return removed, nil
}
