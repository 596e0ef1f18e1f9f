package cluster_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/rcptguard/rcptguard/blocklist"
	"github.com/rcptguard/rcptguard/test"
)

// benchBlocks is the size of the fleet's blocklist in the benchmarks.
const benchBlocks = 100_000

// syncFleet fills Redis and a server's file with the same n blocks and
// returns the server's syncer and a client to change Redis with.
func syncFleet(b *testing.B, n int) (once func(), rdb *redis.Client, r *test.RedisServer) {
	b.Helper()
	r = test.StartRedis(b)
	rdb = redis.NewClient(&redis.Options{Addr: "127.0.0.1:" + strconv.Itoa(r.Port)})
	b.Cleanup(func() { _ = rdb.Close() })
	ctx := context.Background()
	var file strings.Builder
	file.WriteString(blocklist.Header + "\n")
	now := time.Now().UnixMilli()
	for lo := 0; lo < n; lo += 10_000 {
		fields := map[string]any{}
		for i := lo; i < min(lo+10_000, n); i++ {
			id := fmt.Sprintf("user%06d@customer.test", i)
			fields[id] = fmt.Sprintf("%d\tHOLD\trcptguard: %s blocked: 101 invalid recipients within 1h", now, id)
			fmt.Fprintf(&file, "%s\tHOLD rcptguard: %s blocked: 101 invalid recipients within 1h\n", id, id)
		}
		if err := rdb.HSet(ctx, "rg-test:blocks{blocklist}", fields).Err(); err != nil {
			b.Fatal(err)
		}
	}
	path := filepath.Join(b.TempDir(), "blocklist")
	if err := os.WriteFile(path, []byte(file.String()), 0o644); err != nil {
		b.Fatal(err)
	}
	old := time.Now().Add(-time.Minute) // not just written: no reload per round
	if err := os.Chtimes(path, old, old); err != nil {
		b.Fatal(err)
	}
	f, _, err := blocklist.Open(blocklist.Config{Path: path})
	if err != nil {
		b.Fatal(err)
	}
	if f.Len() != n {
		b.Fatalf("the file has %d entries, want %d", f.Len(), n)
	}
	c := newCluster(b, r.URL(), nil)
	s := c.NewSync(f, path, nil, 0)
	s.Once(ctx)
	s.Once(ctx)
	return func() { s.Once(ctx) }, rdb, r
}

// reportRedisBytes reports the bytes Redis sent per round.
func reportRedisBytes(b *testing.B, r *test.RedisServer, round func()) {
	b.Helper()
	before, err := r.Info("stats")
	if err != nil {
		b.Fatal(err)
	}
	n := 0
	for b.Loop() {
		round()
		n++
	}
	after, err := r.Info("stats")
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(after["total_net_output_bytes"]-before["total_net_output_bytes"])/float64(n), "redis-B/op")
}

// One round of a server's sync with 100,000 blocks in the fleet and
// nothing changed: what every server does every 2 s.
func BenchmarkSyncIdle100k(b *testing.B) {
	once, _, r := syncFleet(b, benchBlocks)
	reportRedisBytes(b, r, once)
}

// One round after one block changed by hand (gen bumped, the change not
// in the log, as an edit of Redis by hand): a full comparison, as every
// change cost before the change log.
func BenchmarkSyncChanged100k(b *testing.B) {
	once, rdb, r := syncFleet(b, benchBlocks)
	ctx := context.Background()
	i := 0
	reportRedisBytes(b, r, func() {
		i++
		rdb.Incr(ctx, "rg-test:gen{blocklist}")
		rdb.HSet(ctx, "rg-test:unblocks{blocklist}", fmt.Sprintf("gone%d@customer.test", i%100), time.Now().UnixMilli())
		once()
	})
}

// One round after another server unblocked one identity: an incremental
// round, which reads the change log and that identity only. The bytes
// include the other server's unblock (its replies are a few dozen bytes).
func BenchmarkSyncIncremental100k(b *testing.B) {
	once, _, r := syncFleet(b, benchBlocks)
	other := newCluster(b, r.URL(), nil)
	ctx := context.Background()
	i := 0
	reportRedisBytes(b, r, func() {
		i++
		if err := other.PushUnblock(ctx, fmt.Sprintf("gone%d@customer.test", i%100), time.Now()); err != nil {
			b.Fatal(err)
		}
		once()
	})
}
