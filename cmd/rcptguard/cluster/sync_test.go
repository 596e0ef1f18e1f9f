package cluster_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/blocklist"
	"github.com/rcptguard/rcptguard/cmd/rcptguard/cluster"
	"github.com/rcptguard/rcptguard/detector"
	"github.com/rcptguard/rcptguard/test"
)

// member is one server of a test fleet: its file and its syncer.
type member struct {
	c    *cluster.Cluster
	f    *blocklist.File
	path string
	s    *cluster.Sync
}

func newMember(t *testing.T, r *test.RedisServer, now func() time.Time) *member {
	t.Helper()
	path := filepath.Join(t.TempDir(), "blocklist")
	f, _, err := blocklist.Open(blocklist.Config{Path: path, Create: true})
	if err != nil {
		t.Fatal(err)
	}
	c := newCluster(t, r.URL(), now)
	return &member{c: c, f: f, path: path, s: c.NewSync(f, path, nil, 0)}
}

// restart gives m a new syncer, as a restart of the daemon does: it
// knows only what the file and the state file beside it say.
func (m *member) restart() { m.s = m.c.NewSync(m.f, m.path, nil, 0) }

func (m *member) block(t *testing.T, id string, now time.Time) {
	t.Helper()
	e := blocklist.Entry{Identity: id, Action: "HOLD", Text: "test"}
	if err := m.f.Add(context.Background(), e); err != nil {
		t.Fatal(err)
	}
	m.s.Blocked(e, now)
}

func (m *member) unblock(t *testing.T, id string, now time.Time) {
	t.Helper()
	if _, err := m.f.Remove(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	m.s.Unblocked(id, now)
}

func (m *member) has(id string) bool { _, ok := m.f.Lookup(id); return ok }

// An unblock is remembered for TombstoneRetention, then forgotten. A
// server cut off from Redis for longer — running all along, or restarted
// with its file untouched — does not block the fleet again with a block
// lifted meanwhile: it drops it; a block it made while cut off is pushed.
func TestSyncForgetsOldUnblocks(t *testing.T) {
	r := test.StartRedis(t)
	clock := &test.Clock{}
	ctx := context.Background()
	a, b, c := newMember(t, r, clock.Now), newMember(t, r, clock.Now), newMember(t, r, clock.Now)
	a.block(t, "x@isp.test", clock.Now())
	for _, m := range []*member{a, b, c} {
		m.s.Once(ctx)
	}
	if !b.has("x@isp.test") || !c.has("x@isp.test") {
		t.Fatal("the block did not reach servers 2 and 3")
	}
	if _, err := os.Stat(c.path + ".cluster"); err != nil {
		t.Fatalf("no state file: %v", err)
	}

	// Servers 2 and 3 are cut off; server 1 lifts the block.
	clock.Add(time.Minute)
	a.unblock(t, "x@isp.test", clock.Now())
	a.s.Once(ctx)
	if n, _ := r.Do("HLEN", "rg-test:unblocks{blocklist}"); n != ":1" {
		t.Fatalf("tombstones: %s, want 1", n)
	}
	clock.Add(cluster.TombstoneRetention - 2*time.Hour)
	a.s.Once(ctx)
	if n, _ := r.Do("HLEN", "rg-test:unblocks{blocklist}"); n != ":1" {
		t.Fatalf("tombstones before the retention passed: %s, want 1", n)
	}
	clock.Add(3 * time.Hour)
	a.s.Once(ctx)
	if n, _ := r.Do("HLEN", "rg-test:unblocks{blocklist}"); n != ":0" {
		t.Fatalf("tombstones after the retention: %s, want 0", n)
	}

	// Server 2 comes back, having blocked y@ meanwhile; server 3 comes
	// back restarted.
	b.block(t, "y@isp.test", clock.Now())
	b.s.Once(ctx)
	c.restart()
	c.s.Once(ctx)
	a.s.Once(ctx)
	if n, _ := r.Do("HEXISTS", "rg-test:blocks{blocklist}", "x@isp.test"); n != ":0" {
		t.Fatal("a stale block was pushed back to the fleet")
	}
	for i, m := range []*member{a, b, c} {
		if m.has("x@isp.test") {
			t.Errorf("server %d still blocks x@isp.test", i+1)
		}
		if !m.has("y@isp.test") {
			t.Errorf("server %d lacks y@isp.test, blocked by server 2 while cut off", i+1)
		}
	}
}

// A server cut off for longer than the retention still refills a Redis
// that lost its data: an empty Redis never unblocks anyone.
func TestSyncStaleServerRefillsEmptyRedis(t *testing.T) {
	r := test.StartRedis(t)
	clock := &test.Clock{}
	ctx := context.Background()
	a := newMember(t, r, clock.Now)
	a.block(t, "x@isp.test", clock.Now())
	a.s.Once(ctx)
	clock.Add(cluster.TombstoneRetention + time.Hour)
	r.Stop()
	r.Start()
	a.restart()
	a.s.Once(ctx)
	if n, _ := r.Do("HEXISTS", "rg-test:blocks{blocklist}", "x@isp.test"); n != ":1" || !a.has("x@isp.test") {
		t.Fatalf("an empty redis lost x@isp.test (in redis: %s, in the file: %v)", n, a.has("x@isp.test"))
	}
}

// A server that learns of an unblock finds the fleet's counts already
// reset: its next verdict of the identity is not judged on the counts
// that blocked it (PushUnblock resets, then publishes), and its local
// counts go before the entry leaves its file.
func TestUnblockLearnedAfterCountsReset(t *testing.T) {
	r := test.StartRedis(t)
	now := time.Unix(1_800_000_000, 0)
	clock := func() time.Time { return now }
	a := newMember(t, r, clock)
	path := filepath.Join(t.TempDir(), "blocklist")
	f, _, err := blocklist.Open(blocklist.Config{Path: path, Create: true})
	if err != nil {
		t.Fatal(err)
	}
	bc := newCluster(t, r.URL(), clock)
	const id = "x@isp.test"
	lim := detector.Thresholds{Count: 5, Act: detector.ModeEnforce}
	type seen struct {
		st     detector.Standing
		err    error
		inFile bool
	}
	learned := make(chan seen, 1)
	b := bc.NewSync(f, path, func(got string) {
		if got != id {
			return
		}
		st, err := bc.Reserve(context.Background(), id, "", now, lim)
		_, in := f.Lookup(id)
		learned <- seen{st, err, in}
	}, time.Hour)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); b.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })

	for i := range 6 {
		if _, err := a.c.Record(ctx, id, "", invalid(fmt.Sprintf("u%d@dest.test", i)), now, lim); err != nil {
			t.Fatal(err)
		}
	}
	a.block(t, id, now)
	a.s.Once(ctx)
	deadline := time.Now().Add(5 * time.Second)
	for _, ok := f.Lookup(id); !ok; _, ok = f.Lookup(id) {
		if time.Now().After(deadline) {
			t.Fatal("the block did not reach server 2")
		}
		time.Sleep(10 * time.Millisecond)
	}
	a.unblock(t, id, now.Add(time.Second))
	a.s.Once(ctx)
	select {
	case s := <-learned:
		if s.err != nil || s.st.Count != 0 || s.st.Crossed != "" {
			t.Errorf("server 2 learned of the unblock with the fleet's standing %+v (%v), want the counts reset", s.st, s.err)
		}
		if !s.inFile {
			t.Error("server 2's local counts were forgotten after the entry left its file")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("server 2 did not learn of the unblock")
	}
}
