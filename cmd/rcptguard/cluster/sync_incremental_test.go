package cluster_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/rcptguard/rcptguard/blocklist"
	"github.com/rcptguard/rcptguard/cmd/rcptguard/cluster"
	"github.com/rcptguard/rcptguard/test"
)

// seedFleet puts n blocks in Redis, as a fleet that has run a while has
// them, and returns the blocklist file that holds the same n.
func seedFleet(t *testing.T, r *test.RedisServer, n int) string {
	t.Helper()
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:" + strconv.Itoa(r.Port)})
	defer func() { _ = rdb.Close() }()
	var file strings.Builder
	file.WriteString(blocklist.Header + "\n")
	fields := map[string]any{}
	now := time.Now().Add(-time.Hour).UnixMilli()
	for i := range n {
		id := fmt.Sprintf("user%06d@customer.test", i)
		fields[id] = fmt.Sprintf("%d\tHOLD\trcptguard: %s blocked", now, id)
		fmt.Fprintf(&file, "%s\tHOLD rcptguard: %s blocked\n", id, id)
	}
	if err := rdb.HSet(context.Background(), "rg-test:blocks{blocklist}", fields).Err(); err != nil {
		t.Fatal(err)
	}
	return file.String()
}

// newMemberWith is newMember with a blocklist file that starts as text,
// and forget and learned calls recorded.
func newMemberWith(t *testing.T, r *test.RedisServer, now func() time.Time, text string) (m *member, forgot, learned *[]string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "blocklist")
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	f, _, err := blocklist.Open(blocklist.Config{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	c := newCluster(t, r.URL(), now)
	forgot, learned = &[]string{}, &[]string{}
	s := c.NewSync(f, path, func(id string) { *forgot = append(*forgot, id) }, 0)
	s.OnLearned(func(id string) { *learned = append(*learned, id) })
	return &member{c: c, f: f, path: path, s: s}, forgot, learned
}

// twoMembers starts a redis-server and two servers of a fleet on it,
// sharing one clock.
func twoMembers(t *testing.T) (*test.RedisServer, *test.Clock, *member, *member) {
	t.Helper()
	r := test.StartRedis(t)
	clock := &test.Clock{}
	return r, clock, newMember(t, r, clock.Now), newMember(t, r, clock.Now)
}

// redisOut returns the bytes Redis sent its clients so far.
func redisOut(t *testing.T, r *test.RedisServer) int64 {
	t.Helper()
	st, err := r.Info("stats")
	if err != nil {
		t.Fatal(err)
	}
	return st["total_net_output_bytes"]
}

func ids(m *member) []string {
	var out []string
	for _, e := range m.f.Entries() {
		out = append(out, e.Identity)
	}
	slices.Sort(out)
	return out
}

func wantRounds(t *testing.T, m *member, full, inc int64) {
	t.Helper()
	if f, i := m.s.Rounds(); f != full || i != inc {
		t.Fatalf("rounds: %d full, %d incremental; want %d and %d", f, i, full, inc)
	}
}

// A block and an unblock made on another server reach this one through
// an incremental round, which reads those two identities and not the
// 2,000 blocks of the fleet; the learned block is not reported here, and
// the lifted one's counts are forgotten.
func TestSyncIncrementalRound(t *testing.T) {
	r := test.StartRedis(t)
	clock := &test.Clock{}
	ctx := context.Background()
	text := seedFleet(t, r, 2000)
	a, _, _ := newMemberWith(t, r, clock.Now, text)
	b, forgot, learned := newMemberWith(t, r, clock.Now, text)
	a.s.Once(ctx)
	before := redisOut(t, r)
	b.s.Once(ctx)
	full := redisOut(t, r) - before
	wantRounds(t, b, 1, 0)

	a.block(t, "new@isp.test", clock.Now())
	a.unblock(t, "user000007@customer.test", clock.Now().Add(time.Second))
	a.s.Once(ctx)
	before = redisOut(t, r)
	b.s.Once(ctx)
	inc := redisOut(t, r) - before
	wantRounds(t, b, 1, 1)
	if !b.has("new@isp.test") || b.has("user000007@customer.test") || b.f.Len() != 2000 {
		t.Fatalf("after the incremental round: new@ %v, user000007@ %v, %d entries; want true, false, 2000",
			b.has("new@isp.test"), b.has("user000007@customer.test"), b.f.Len())
	}
	if !slices.Equal(*forgot, []string{"user000007@customer.test"}) || !slices.Equal(*learned, []string{"new@isp.test"}) {
		t.Errorf("forgot %v, learned %v", *forgot, *learned)
	}
	t.Logf("full round %d bytes from redis, incremental %d", full, inc)
	if full < 100_000 || inc > 5_000 {
		t.Errorf("full round read %d bytes, incremental %d: want the full round to read the fleet (>100 kB) and the incremental only the changes (<5 kB)", full, inc)
	}
	b.s.Once(ctx)
	wantRounds(t, b, 1, 1) // nothing changed: no round at all
}

// A server further behind than the log reaches compares in full, and
// converges.
func TestSyncIncrementalLogTrimmed(t *testing.T) {
	r, clock, a, b := twoMembers(t)
	ctx := context.Background()
	a.block(t, "x@isp.test", clock.Now())
	a.s.Once(ctx)
	b.s.Once(ctx)
	wantRounds(t, b, 1, 0)
	for i := range 3 {
		a.block(t, fmt.Sprintf("y%d@isp.test", i), clock.Now())
	}
	a.unblock(t, "x@isp.test", clock.Now().Add(time.Second))
	a.s.Once(ctx)
	// The oldest of the four changes is trimmed off the log.
	if _, err := r.Do("ZREMRANGEBYRANK", "rg-test:changes{blocklist}", "0", "1"); err != nil {
		t.Fatal(err)
	}
	b.s.Once(ctx)
	wantRounds(t, b, 2, 0)
	if got := ids(b); !slices.Equal(got, ids(a)) || len(got) != 3 {
		t.Fatalf("server 2 has %v, server 1 %v", got, ids(a))
	}
}

// The log keeps the last ChangeLogLen changes.
func TestSyncChangeLogBounded(t *testing.T) {
	r := test.StartRedis(t)
	clock := &test.Clock{}
	ctx := context.Background()
	args := []string{"ZADD", "rg-test:changes{blocklist}"}
	for g := 1; g <= cluster.ChangeLogLen; g++ {
		args = append(args, strconv.Itoa(g), fmt.Sprintf("%d:old%d@isp.test", g, g))
	}
	if _, err := r.Do(args...); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Do("SET", "rg-test:gen{blocklist}", strconv.Itoa(cluster.ChangeLogLen)); err != nil {
		t.Fatal(err)
	}
	a := newMember(t, r, clock.Now)
	a.block(t, "x@isp.test", clock.Now())
	a.s.Once(ctx)
	if n, _ := r.Do("ZCARD", "rg-test:changes{blocklist}"); n != ":"+strconv.Itoa(cluster.ChangeLogLen) {
		t.Fatalf("the log holds %s changes, want %d", n, cluster.ChangeLogLen)
	}
	if n, _ := r.Do("ZSCORE", "rg-test:changes{blocklist}", "1:old1@isp.test"); n != "$-1" {
		t.Fatalf("the oldest change is still there (score %q)", n)
	}
	g := strconv.Itoa(cluster.ChangeLogLen + 1)
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:" + strconv.Itoa(r.Port)})
	defer func() { _ = rdb.Close() }()
	m, err := rdb.ZRangeArgs(ctx, redis.ZRangeArgs{Key: "rg-test:changes{blocklist}", Start: g, Stop: g, ByScore: true}).Result()
	if err != nil || len(m) != 1 || !strings.HasPrefix(m[0], g+":") || !strings.HasSuffix(m[0], ":x@isp.test") {
		t.Fatalf("the log at the block's generation %s holds %q (%v), want one change of x@isp.test", g, m, err)
	}
	if n, err := r.Do("MEMORY", "USAGE", "rg-test:changes{blocklist}"); err == nil {
		t.Logf("a full log of %d changes takes %s bytes of Redis memory", cluster.ChangeLogLen, n)
	}
}

// Another data set (a Redis that lost its data, or a new one) means a
// full comparison.
func TestSyncIncrementalEpochChange(t *testing.T) {
	r, clock, a, b := twoMembers(t)
	ctx := context.Background()
	a.block(t, "x@isp.test", clock.Now())
	a.s.Once(ctx)
	b.s.Once(ctx)
	a.block(t, "y@isp.test", clock.Now())
	a.s.Once(ctx)
	b.s.Once(ctx)
	wantRounds(t, b, 1, 1)
	if _, err := r.Do("SET", "rg-test:epoch{blocklist}", "another"); err != nil {
		t.Fatal(err)
	}
	a.block(t, "z@isp.test", clock.Now())
	a.s.Once(ctx)
	b.s.Once(ctx)
	wantRounds(t, b, 2, 1)
	if got := ids(b); !slices.Equal(got, []string{"x@isp.test", "y@isp.test", "z@isp.test"}) {
		t.Fatalf("server 2 has %v", got)
	}
}

// Every FullEvery the comparison is in full, changed or not: the safety
// net for edits of Redis by hand, which the log does not see.
func TestSyncFullEvery(t *testing.T) {
	r, clock, a, b := twoMembers(t)
	ctx := context.Background()
	a.block(t, "x@isp.test", clock.Now())
	a.s.Once(ctx)
	b.s.Once(ctx)
	// By hand: a block with its generation but no log entry.
	if _, err := r.Do("HSET", "rg-test:blocks{blocklist}", "hand@isp.test", fmt.Sprintf("%d\tHOLD\tby hand", clock.Now().UnixMilli())); err != nil {
		t.Fatal(err)
	}
	clock.Add(cluster.FullEvery - time.Second)
	b.s.Once(ctx)
	wantRounds(t, b, 1, 0)
	clock.Add(time.Second)
	b.s.Once(ctx)
	wantRounds(t, b, 2, 0)
	if !b.has("hand@isp.test") {
		t.Error("the full comparison did not find the block made by hand")
	}
}

// Any mix of blocks and unblocks on three servers, synced in any order
// by incremental rounds, leaves every server with the file a full
// comparison gives: the fleet's blocks.
func TestSyncIncrementalConvergesLikeFull(t *testing.T) {
	for seed := range uint64(8) {
		t.Run(strconv.FormatUint(seed, 10), func(t *testing.T) {
			r := test.StartRedis(t)
			clock := &test.Clock{}
			ctx := context.Background()
			rnd := rand.New(rand.NewPCG(seed, 16))
			fleet := []*member{newMember(t, r, clock.Now), newMember(t, r, clock.Now), newMember(t, r, clock.Now)}
			for _, m := range fleet {
				m.s.Once(ctx)
			}
			for range 120 {
				clock.Add(time.Second)
				m := fleet[rnd.IntN(len(fleet))]
				id := fmt.Sprintf("u%d@isp.test", rnd.IntN(25))
				switch rnd.IntN(4) {
				case 0, 1:
					if !m.has(id) {
						m.block(t, id, clock.Now())
					}
				case 2:
					m.unblock(t, id, clock.Now())
				case 3:
					m.s.Once(ctx)
				}
			}
			for range 2 {
				for _, m := range fleet {
					m.s.Once(ctx)
				}
			}
			fresh := newMember(t, r, clock.Now)
			fresh.s.Once(ctx)
			want := ids(fresh)
			for i, m := range fleet {
				if got := ids(m); !slices.Equal(got, want) {
					t.Errorf("server %d has %v, a full comparison gives %v", i+1, got, want)
				}
				if full, inc := m.s.Rounds(); full != 1 || inc == 0 {
					t.Errorf("server %d made %d full and %d incremental rounds; want 1 full, the rest incremental", i+1, full, inc)
				}
			}
		})
	}
}

// A block or unblock the fleet refuses (a later unblock or block is
// known) leaves the server that pushed it disagreeing with the fleet; the
// refusal is logged, so its next incremental round settles it.
func TestSyncIncrementalRefusedPush(t *testing.T) {
	_, clock, a, b := twoMembers(t)
	ctx := context.Background()
	now := clock.Now()
	b.unblock(t, "x@isp.test", now.Add(10*time.Second))
	a.block(t, "y@isp.test", now.Add(10*time.Second))
	for _, m := range []*member{a, b, a, b} {
		m.s.Once(ctx)
	}
	a.block(t, "x@isp.test", now) // before the unblock the fleet knows
	b.unblock(t, "y@isp.test", now)
	a.s.Once(ctx)
	b.s.Once(ctx)
	if a.has("x@isp.test") || !b.has("y@isp.test") {
		t.Errorf("after refused pushes: server 1 blocks x@ %v (want false), server 2 blocks y@ %v (want true)",
			a.has("x@isp.test"), b.has("y@isp.test"))
	}
	wantRounds(t, a, 1, 2)
	wantRounds(t, b, 1, 1)
}

// A generation number used twice with the data set's name kept (gen
// deleted by hand or evicted, Redis restored from an older dump, a
// lagging replica promoted) makes the log look complete for the range a
// server asks: the anchor, the change it saw last, tells it otherwise,
// and it compares in full instead of missing the first changes. The new
// changes, scored lower than the old ones, are the ones the log keeps.
func TestSyncGenerationUsedTwice(t *testing.T) {
	r, clock, a, b := twoMembers(t)
	ctx := context.Background()
	a.s.Once(ctx)
	b.s.Once(ctx)
	for i := range 3 {
		a.block(t, fmt.Sprintf("old%d@isp.test", i), clock.Now())
	}
	a.s.Once(ctx)
	b.s.Once(ctx) // agreed at generation 3
	wantRounds(t, b, 1, 1)
	if _, err := r.Do("DEL", "rg-test:gen{blocklist}"); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		clock.Add(time.Second)
		a.block(t, fmt.Sprintf("new%d@isp.test", i), clock.Now())
	}
	a.s.Once(ctx) // generations 1 to 5 again
	if n, _ := r.Do("ZCARD", "rg-test:changes{blocklist}"); n != ":5" {
		t.Errorf("the log holds %s changes after the reset, want the 5 new ones", n)
	}
	b.s.Once(ctx)
	wantRounds(t, b, 2, 1)
	if got, want := ids(b), ids(a); !slices.Equal(got, want) || len(got) != 8 {
		t.Fatalf("server 2 has %v, server 1 %v", got, want)
	}
}

// A value in the fleet's hashes that rcptguard did not write (an edit of
// Redis by hand) is left alone, never an error that stalls the sync: an
// unblock of that identity goes through, and the server goes on learning
// the fleet's blocks.
func TestSyncForeignValueInRedis(t *testing.T) {
	r, clock, a, b := twoMembers(t)
	ctx := context.Background()
	a.s.Once(ctx)
	b.s.Once(ctx)
	if _, err := r.Do("HSET", "rg-test:blocks{blocklist}", "x@isp.test", "by hand"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Do("HSET", "rg-test:unblocks{blocklist}", "z@isp.test", "soon"); err != nil {
		t.Fatal(err)
	}
	a.block(t, "x@isp.test", clock.Now())
	a.block(t, "z@isp.test", clock.Now())
	a.unblock(t, "x@isp.test", clock.Now())
	clock.Add(2 * time.Second)
	a.s.Once(ctx)
	b.block(t, "y@isp.test", clock.Now())
	b.s.Once(ctx)
	clock.Add(2 * time.Second)
	a.s.Once(ctx)
	if !a.has("y@isp.test") || !a.c.Up() {
		t.Fatalf("server 1 learned y@: %v, Redis up: %v; want both: a foreign value must not stall the sync", a.has("y@isp.test"), a.c.Up())
	}
	if a.has("x@isp.test") || !b.has("z@isp.test") {
		t.Errorf("x@ still blocked on server 1: %v; z@ learned by server 2: %v", a.has("x@isp.test"), b.has("z@isp.test"))
	}
}
