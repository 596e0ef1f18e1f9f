package cluster

import (
	"context"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rcptguard/rcptguard/blocklist"
	"github.com/rcptguard/rcptguard/detector"
)

// Sync keeps a server's blocklist file and the fleet's in step: local
// blocks and unblocks are pushed, the fleet's pulled, at once on a
// change (pub/sub) and checked every Interval. Create it with NewSync.
//
// A check costs one small round trip while nothing changed: the fleet's
// blocklist is read in full only when its version moved (any block or
// unblock anywhere), after Redis answered again, and every FullEvery.
//
// A server that was cut off from the fleet's Redis for longer than
// TombstoneRetention may hold blocks the fleet lifted so long ago that
// the unblock is forgotten. When it finds such a block missing from
// Redis — the same data set it last agreed with, so not a Redis that
// lost its data — it drops the block instead of pushing it back: the
// fleet's decision stands. Blocks it made since it was cut off are
// pushed as usual; and a Redis that lost its data is refilled from every
// server's file, stale or not.
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

	// Owned by the goroutine that runs Once.
	last     version   // of the last full comparison
	lastFull time.Time // when it was made
	ups      atomic.Int64
	upsDone  int64     // ups when the last full comparison began
	state    syncState // this server's last agreement with the fleet, as saved
	atStart  bool      // the entries in the file at start were there at state.Synced
	pruned   time.Time // the last tombstone pruning
}

type op struct {
	block bool
	entry blocklist.Entry
	t     time.Time
}

// DefaultSyncInterval is how often a server checks its blocklist against
// the fleet's.
const DefaultSyncInterval = 2 * time.Second

// FullEvery is how often a server compares its blocklist with the fleet's
// in full even when the fleet's version did not move: a safety net for
// changes made to Redis by hand. At 100,000 blocks a full comparison
// reads some 13 MB.
const FullEvery = 10 * time.Minute

// pruneEvery is how often a server prunes the fleet's old tombstones.
const pruneEvery = time.Hour

// staleMargin is taken off TombstoneRetention when a server judges its
// own view too old: clocks of the fleet differ, and a pruning may run a
// little early.
const staleMargin = 24 * time.Hour

// NewSync returns the syncer of f, the blocklist file at path. forget is
// called for each identity an unblock elsewhere lifted here (its local
// counts are dropped); interval 0 means DefaultSyncInterval. With a path,
// the server's last agreement with the fleet is kept in path+".cluster".
func (c *Cluster) NewSync(f *blocklist.File, path string, forget func(id string), interval time.Duration) *Sync {
	if interval <= 0 {
		interval = DefaultSyncInterval
	}
	s := &Sync{c: c, f: f, path: path, forget: forget, interval: interval, log: c.log,
		pending: map[string]op{}, since: map[string]int64{}, kick: make(chan struct{}, 1), last: version{gen: -1}}
	if path != "" {
		s.state = loadSyncState(path + stateSuffix)
		fi, err := os.Stat(path)
		s.atStart = err == nil && s.state.matches(fi)
	}
	c.OnUp(func() {
		s.ups.Add(1)
		s.wake()
	})
	return s
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

// Once pushes the local changes, then, when all are pushed and the
// fleet's blocklist changed (or a full comparison is due), makes the file
// agree with the fleet.
func (s *Sync) Once(ctx context.Context) {
	s.reloadIfEdited()
	if !s.pushPending(ctx) {
		return
	}
	v, err := s.c.version(ctx)
	if err != nil || !s.due(v) {
		return
	}
	ups := s.ups.Load()
	blocks, tombs, err := s.c.state(ctx)
	if err != nil {
		return
	}
	changed := s.pull(ctx, blocks)
	ok, removed := s.reconcile(ctx, blocks, tombs, v)
	if !ok {
		return
	}
	s.last, s.lastFull, s.upsDone = v, s.c.now(), ups
	s.saveState(v, changed || removed)
	s.prune(ctx, tombs)
}

// reloadIfEdited reads the file again when it changed on disk. Outside
// edits (rcptguard block/unblock, by hand) come first: an entry just
// removed by hand must be pushed as an unblock, not pulled back.
func (s *Sync) reloadIfEdited() {
	fi, err := os.Stat(s.path)
	if s.path != "" && err == nil && s.seen != nil && fi.Size() == s.seen.Size() && fi.ModTime().Equal(s.seen.ModTime()) &&
		os.SameFile(fi, s.seen) && time.Since(fi.ModTime()) >= 2*time.Second {
		return
	}
	_, _ = s.f.Reload()
	s.seen = fi
}

// pushPending pushes the local changes; false when one could not be
// (it is kept for the next round).
func (s *Sync) pushPending(ctx context.Context) bool {
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
			return false
		}
		s.mu.Lock()
		if cur, ok := s.pending[o.entry.Identity]; ok && cur.t.Equal(o.t) && cur.block == o.block {
			delete(s.pending, o.entry.Identity)
		}
		s.mu.Unlock()
	}
	return true
}

// due reports whether the fleet's blocklist must be read in full: it is
// at another version than at the last full comparison, Redis answered
// again since, or FullEvery passed.
func (s *Sync) due(v version) bool {
	return v != s.last || s.ups.Load() != s.upsDone || s.c.now().Sub(s.lastFull) >= FullEvery
}

// pull writes to the file the fleet's blocks it lacks, and reports
// whether it wrote any.
func (s *Sync) pull(ctx context.Context, blocks map[string]remoteBlock) bool {
	changed := false
	for id, b := range blocks {
		if _, ok := s.f.Lookup(id); ok {
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
		changed = true
	}
	return changed
}

// reconcile settles each local block the fleet does not have: lifted by
// a later unblock, or too old to push back (see Sync), it is removed
// here; else Redis lost it, or never had it, and it is pushed back. ok is
// false when a push failed.
func (s *Sync) reconcile(ctx context.Context, blocks map[string]remoteBlock, tombs map[string]int64, v version) (ok, removed bool) {
	for _, e := range s.f.Entries() {
		id := e.Identity
		if _, ok := blocks[id]; ok {
			continue
		}
		s.mu.Lock()
		since, known := s.since[id]
		_, busy := s.pending[id]
		s.mu.Unlock()
		switch tomb, lifted := tombs[id]; {
		case busy:
		case lifted && tomb >= since:
			s.drop(ctx, id, "rcptguard unblocked through the cluster")
			removed = true
		case s.stale(since, known, v):
			s.drop(ctx, id, "rcptguard unblocked: the fleet lifted this block while this server was cut off from it for longer than unblocks are remembered")
			removed = true
		default:
			if _, err := s.c.PushBlock(ctx, e, time.UnixMilli(since)); err != nil {
				return false, removed
			}
		}
	}
	return true, removed
}

// stale reports whether a local block that began at since (known: made
// or learned while running; else in the file at start) is older than
// what the fleet still remembers: the block was in force when this server
// last agreed with this very data set, and that is longer ago than
// tombstones are kept.
func (s *Sync) stale(since int64, known bool, v version) bool {
	st := s.state
	if st.Epoch != v.epoch || st.Synced <= 0 || since > st.Synced || !known && !s.atStart {
		return false
	}
	return s.c.now().Sub(time.UnixMilli(st.Synced)) > TombstoneRetention-staleMargin
}

// drop removes id from the file as the fleet unblocked it. The local
// counts go first: once the entry is gone the identity's requests are
// judged again, and on fresh counts.
func (s *Sync) drop(ctx context.Context, id, msg string) {
	if s.forget != nil {
		s.forget(id)
	}
	rctx, cancel := context.WithTimeout(ctx, time.Second)
	_, err := s.f.Remove(rctx, id)
	cancel()
	if err != nil {
		s.log.Error("blocklist: an unblock of the fleet could not be written here", slog.String("identity", id), slog.Any("error", err))
	}
	s.mu.Lock()
	delete(s.since, id)
	s.mu.Unlock()
	s.log.Info(msg, slog.String("identity", id))
}

// prune forgets the fleet's tombstones older than TombstoneRetention,
// once every pruneEvery.
func (s *Sync) prune(ctx context.Context, tombs map[string]int64) {
	now := s.c.now()
	if now.Sub(s.pruned) < pruneEvery {
		return
	}
	s.pruned = now
	n, err := s.c.pruneTombstones(ctx, tombs, now)
	if err != nil {
		s.log.Warn("old unblocks not forgotten; next try in an hour", slog.Any("error", err))
	}
	if n > 0 {
		s.log.Info("forgot old unblocks", slog.Int("count", n), slog.Duration("older_than", TombstoneRetention))
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
