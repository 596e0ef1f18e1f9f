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
// A check costs one small round trip while nothing changed. When the
// fleet's version moved (a block or unblock anywhere) within the same
// data set, a second round trip reads the change log since the last
// agreement and only the blocks and tombstones of the identities in it
// (an incremental round). The whole blocklist is read and compared (a
// full round) on the first round, after Redis answered again, when the
// data set changed, when the log no longer reaches back to the last
// agreement (more than changeLogLen changes), and every FullEvery. Both
// kinds settle each identity with the same rules (settle).
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
	last     version   // of the last agreement, full or incremental
	lastFull time.Time // when the last full comparison was made
	ups      atomic.Int64
	upsDone  int64 // ups when the last full comparison began
	fulls    atomic.Int64
	incs     atomic.Int64
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
// agree with the fleet: from the change log when it covers what changed
// since the last agreement, else in full.
func (s *Sync) Once(ctx context.Context) {
	s.reloadIfEdited()
	if !s.pushPending(ctx) {
		return
	}
	v, err := s.c.version(ctx)
	if err != nil {
		return
	}
	ups := s.ups.Load()
	full := s.fullDue(ups)
	if !full && v == s.last {
		return
	}
	if !full && v.epoch == s.last.epoch && s.last.anchor != "" && v.gen > s.last.gen && v.gen-s.last.gen <= changeLogLen {
		ch, err := s.c.changesSince(ctx, s.last)
		if err != nil {
			return
		}
		if ch != nil {
			s.incremental(ctx, ch)
			return
		}
		// The log was trimmed past the last agreement, or the data set
		// changed since the version was read: compare in full.
	}
	s.full(ctx, v, ups)
}

// full compares the whole file with the fleet's blocklist, read after
// its version v, and settles every identity either holds; ups is s.ups
// when the round began.
func (s *Sync) full(ctx context.Context, v version, ups int64) {
	blocks, tombs, err := s.c.state(ctx)
	if err != nil {
		return
	}
	changed, removed := false, false
	for id, b := range blocks {
		t, lifted := tombs[id]
		_, c, _ := s.settle(ctx, id, &b, t, lifted, v)
		changed = changed || c
	}
	for _, e := range s.f.Entries() {
		if _, ok := blocks[e.Identity]; ok {
			continue
		}
		t, lifted := tombs[e.Identity]
		ok, _, r := s.settle(ctx, e.Identity, nil, t, lifted, v)
		removed = removed || r
		if !ok {
			return
		}
	}
	s.last, s.lastFull, s.upsDone = v, s.c.now(), ups
	s.fulls.Add(1)
	s.saveState(v, changed || removed)
	s.prune(ctx, tombs)
}

// incremental settles the identities the fleet changed since the last
// agreement, as of ch.v. Since the file agreed with the fleet then, local
// changes are pushed first, and a push the fleet refuses is logged as a
// change too, no other identity can disagree.
func (s *Sync) incremental(ctx context.Context, ch *changes) {
	changed := false
	for _, id := range ch.ids {
		var b *remoteBlock
		if rb, ok := ch.blocks[id]; ok {
			b = &rb
		}
		t, lifted := ch.tombs[id]
		ok, c, r := s.settle(ctx, id, b, t, lifted, ch.v)
		changed = changed || c || r
		if !ok {
			return // the next round starts from the same agreement
		}
	}
	s.last = ch.v
	s.incs.Add(1)
	s.saveState(ch.v, changed)
}

// Rounds returns how many full and incremental comparisons with the
// fleet's blocklist this syncer completed.
func (s *Sync) Rounds() (full, incremental int64) { return s.fulls.Load(), s.incs.Load() }

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

// fullDue reports whether the next comparison must be in full: none was
// made yet, Redis answered again since the last (ups: s.ups now), or
// FullEvery passed.
func (s *Sync) fullDue(ups int64) bool {
	return s.last.gen < 0 || ups != s.upsDone || s.c.now().Sub(s.lastFull) >= FullEvery
}

// settle makes id's entry here agree with the fleet, which has the block
// b (nil: none) and, when lifted, a tombstone of id at tomb (unix ms).
// The one set of rules of full and incremental rounds:
//
//   - a local change of id not pushed yet wins: left alone;
//   - a block of the fleet this file lacks is written to it (learned);
//   - a local block the fleet does not have is removed here when a later
//     unblock lifted it, or when it is too old to push back (see Sync);
//     else Redis lost it, or never had it, and it is pushed back.
//
// ok is false when a push failed; changed when a block was written,
// removed when one was removed.
func (s *Sync) settle(ctx context.Context, id string, b *remoteBlock, tomb int64, lifted bool, v version) (ok, changed, removed bool) {
	e, here := s.f.Lookup(id)
	s.mu.Lock()
	since, known := s.since[id]
	_, busy := s.pending[id]
	if b != nil && !here && !busy {
		s.since[id] = b.t
	}
	s.mu.Unlock()
	switch {
	case busy, b != nil && here, b == nil && !here:
	case b != nil:
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
		return true, true, false
	case lifted && tomb >= since:
		s.drop(ctx, id, "rcptguard unblocked through the cluster")
		return true, false, true
	case s.stale(since, known, v):
		s.drop(ctx, id, "rcptguard unblocked: the fleet lifted this block while this server was cut off from it for longer than unblocks are remembered")
		return true, false, true
	default:
		if _, err := s.c.PushBlock(ctx, e, time.UnixMilli(since)); err != nil {
			return false, false, false
		}
	}
	return true, false, false
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
