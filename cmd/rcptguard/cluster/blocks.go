package cluster

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/rcptguard/rcptguard/blocklist"
	"github.com/rcptguard/rcptguard/detector"
)

// The fleet's blocklist lives in two hashes that share one Redis Cluster
// slot: blocks (identity → "unix ms<TAB>ACTION<TAB>text") and unblocks,
// the tombstones (identity → unix ms of the unblock). A tombstone is how
// a server tells an unblock from a Redis that lost its data: a block
// missing from Redis is pushed back, unless a later tombstone says it was
// lifted. So an empty Redis never unblocks anyone.
func (c *Cluster) blocksKey() string   { return c.prefix + "blocks{blocklist}" }
func (c *Cluster) unblocksKey() string { return c.prefix + "unblocks{blocklist}" }
func (c *Cluster) eventsKey() string   { return c.prefix + "events{blocklist}" }

// blockScript records a block made at ARGV[2] unless a later unblock is
// known; a block already there stays as it is.
var blockScript = redis.NewScript(`
local u = redis.call('HGET', KEYS[2], ARGV[1])
if u and tonumber(u) >= tonumber(ARGV[2]) then return 0 end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('PUBLISH', KEYS[3], ARGV[1])
end
return 1
`)

// unblockScript lifts a block unless it was made after ARGV[2], and
// leaves a tombstone.
var unblockScript = redis.NewScript(`
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v and tonumber(string.match(v, '^(%d+)')) > tonumber(ARGV[2]) then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local old = redis.call('HGET', KEYS[2], ARGV[1])
if not old or tonumber(old) < tonumber(ARGV[2]) then redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
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
		n, err = blockScript.Run(ctx, c.rdb, []string{c.blocksKey(), c.unblocksKey(), c.eventsKey()}, e.Identity, t.UnixMilli(), val).Int64()
		return err
	})
	if err != nil {
		return false, fmt.Errorf("cluster: block %s: %w", e.Identity, err)
	}
	return n == 1, nil
}

// PushUnblock lifts a block of the fleet, as of t, and resets the
// identity's shared counts.
func (c *Cluster) PushUnblock(ctx context.Context, id string, t time.Time) error {
	err := c.call(ctx, func(ctx context.Context) error {
		return unblockScript.Run(ctx, c.rdb, []string{c.blocksKey(), c.unblocksKey(), c.eventsKey()}, id, t.UnixMilli()).Err()
	})
	if err != nil {
		return fmt.Errorf("cluster: unblock %s: %w", id, err)
	}
	if err := c.ResetCounts(ctx, id); err != nil {
		return fmt.Errorf("cluster: unblock %s: resetting counts: %w", id, err)
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
	err := c.call(ctx, func(ctx context.Context) error {
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
		ts, rest, _ := strings.Cut(v, "\t")
		action, text, _ := strings.Cut(rest, "\t")
		t, err := strconv.ParseInt(ts, 10, 64)
		if err != nil || action == "" {
			continue // not ours to judge: left alone
		}
		blocks[id] = remoteBlock{entry: blocklist.Entry{Identity: id, Action: action, Text: text}, t: t}
	}
	tombs := make(map[string]int64, len(um))
	for id, v := range um {
		if t, err := strconv.ParseInt(v, 10, 64); err == nil {
			tombs[id] = t
		}
	}
	return blocks, tombs, nil
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

// Sync keeps a server's blocklist file and the fleet's in step: local
// blocks and unblocks are pushed, the fleet's pulled, at once on a
// change (pub/sub) and every Interval in full. Create it with NewSync.
type Sync struct {
	c        *Cluster
	f        *blocklist.File
	path     string      // f's path, "" to reload it every round
	seen     os.FileInfo // f's file when last reloaded
	forget   func(id string)
	learned  func(id string) // see OnLearned
	interval time.Duration
	log      *slog.Logger

	mu      sync.Mutex
	pending map[string]op    // local changes not pushed yet
	since   map[string]int64 // unix ms a local block began (0: in the file at start)
	kick    chan struct{}
}

type op struct {
	block bool
	entry blocklist.Entry
	t     time.Time
}

// DefaultSyncInterval is how often a server compares its blocklist with
// the fleet's in full.
const DefaultSyncInterval = 2 * time.Second

// NewSync returns the syncer of f, the blocklist file at path. forget is
// called for each identity an unblock elsewhere lifted here (its local
// counts are dropped); interval 0 means DefaultSyncInterval.
func (c *Cluster) NewSync(f *blocklist.File, path string, forget func(id string), interval time.Duration) *Sync {
	if interval <= 0 {
		interval = DefaultSyncInterval
	}
	return &Sync{c: c, f: f, path: path, forget: forget, interval: interval, log: c.log,
		pending: map[string]op{}, since: map[string]int64{}, kick: make(chan struct{}, 1)}
}

// OnLearned sets fn to be called with each identity blocked elsewhere in
// the fleet, before its entry is written to this server's file: the server
// that made the block sends its report, so this one records that none is
// owed here (a crash between the two then never makes a second report).
// Call it before Run.
func (s *Sync) OnLearned(fn func(id string)) { s.learned = fn }

// Blocked records a block this server made (or found added to its file)
// at t, to be pushed to the fleet.
func (s *Sync) Blocked(e blocklist.Entry, t time.Time) {
	s.mu.Lock()
	s.pending[e.Identity] = op{block: true, entry: e, t: t}
	s.since[e.Identity] = t.UnixMilli()
	s.mu.Unlock()
	s.wake()
}

// Unblocked records an unblock made on this server at t.
func (s *Sync) Unblocked(id string, t time.Time) {
	s.mu.Lock()
	s.pending[id] = op{entry: blocklist.Entry{Identity: id}, t: t}
	delete(s.since, id)
	s.mu.Unlock()
	s.wake()
}

func (s *Sync) wake() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// Run keeps the blocklists in step until ctx ends.
func (s *Sync) Run(ctx context.Context) {
	sub := s.c.rdb.Subscribe(ctx, s.c.eventsKey())
	defer func() { _ = sub.Close() }()
	events := sub.Channel()
	t := time.NewTicker(s.interval)
	defer t.Stop()
	for {
		s.Once(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.kick:
		case <-events:
		}
	}
}

// Once pushes the local changes, then, when all are pushed, makes the
// file agree with the fleet.
func (s *Sync) Once(ctx context.Context) {
	// Outside edits (rcptguard block/unblock, by hand) first: an entry
	// just removed by hand must be pushed as an unblock, not pulled back.
	// The file is read again only when it changed.
	if fi, err := os.Stat(s.path); s.path == "" || err != nil || s.seen == nil ||
		fi.Size() != s.seen.Size() || !fi.ModTime().Equal(s.seen.ModTime()) || !os.SameFile(fi, s.seen) ||
		time.Since(fi.ModTime()) < 2*time.Second {
		_, _ = s.f.Reload()
		s.seen = fi
	}
	s.mu.Lock()
	ops := make([]op, 0, len(s.pending))
	for _, o := range s.pending {
		ops = append(ops, o)
	}
	s.mu.Unlock()
	for _, o := range ops {
		var err error
		if o.block {
			_, err = s.c.PushBlock(ctx, o.entry, o.t)
		} else {
			err = s.c.PushUnblock(ctx, o.entry.Identity, o.t)
		}
		if err != nil {
			return // kept; the next round tries again
		}
		s.mu.Lock()
		if cur, ok := s.pending[o.entry.Identity]; ok && cur.t.Equal(o.t) && cur.block == o.block {
			delete(s.pending, o.entry.Identity)
		}
		s.mu.Unlock()
	}
	blocks, tombs, err := s.c.state(ctx)
	if err != nil {
		return
	}
	local := map[string]blocklist.Entry{}
	for _, e := range s.f.Entries() {
		local[e.Identity] = e
	}
	for id, b := range blocks {
		if _, ok := local[id]; ok {
			continue
		}
		s.mu.Lock()
		_, busy := s.pending[id]
		if !busy {
			s.since[id] = b.t
		}
		s.mu.Unlock()
		if busy {
			continue
		}
		if s.learned != nil {
			s.learned(id)
		}
		actx, cancel := context.WithTimeout(ctx, time.Second)
		err := s.f.Add(actx, b.entry)
		cancel()
		if err != nil {
			s.log.Error("blocklist: a block of the fleet could not be written here; it holds in memory", slog.String("identity", id), slog.Any("error", err))
		}
		s.log.Info("rcptguard blocked through the cluster", slog.String("identity", id))
	}
	for id, e := range local {
		if _, ok := blocks[id]; ok {
			continue
		}
		s.mu.Lock()
		since, _ := s.since[id]
		_, busy := s.pending[id]
		s.mu.Unlock()
		if busy {
			continue
		}
		if tomb, ok := tombs[id]; ok && tomb >= since {
			rctx, cancel := context.WithTimeout(ctx, time.Second)
			_, err := s.f.Remove(rctx, id)
			cancel()
			if err != nil {
				s.log.Error("blocklist: an unblock of the fleet could not be written here", slog.String("identity", id), slog.Any("error", err))
			}
			s.mu.Lock()
			delete(s.since, id)
			s.mu.Unlock()
			if s.forget != nil {
				s.forget(id)
			}
			s.log.Info("rcptguard unblocked through the cluster", slog.String("identity", id))
			continue
		}
		// Redis lost it, or never had it (it was down): push it back.
		if _, err := s.c.PushBlock(ctx, e, time.UnixMilli(since)); err != nil {
			return
		}
	}
}

// Blocklist wraps the detector's blocklist so that each block it makes
// is pushed to the fleet.
func (s *Sync) Blocklist(b detector.Blocklist) detector.Blocklist { return syncedBlocklist{b, s} }

type syncedBlocklist struct {
	detector.Blocklist
	s *Sync
}

func (b syncedBlocklist) Block(ctx context.Context, id, action, text string) error {
	err := b.Blocklist.Block(ctx, id, action, text)
	b.s.Blocked(blocklist.Entry{Identity: id, Action: strings.ToUpper(action), Text: text}, b.s.c.now())
	return err
}

// LocalChange takes the identities the blocklist file gained and lost by
// outside edits on this server (rcptguard block/unblock, by hand), to be
// pushed to the fleet.
func (s *Sync) LocalChange(added, removed []string) {
	now := s.c.now()
	for _, id := range added {
		if e, ok := s.f.Lookup(id); ok {
			s.Blocked(e, now)
		}
	}
	for _, id := range removed {
		s.Unblocked(id, now)
	}
}
