package cluster_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/callout"
	"github.com/rcptguard/rcptguard/cmd/rcptguard/cluster"
	"github.com/rcptguard/rcptguard/detector"
	"github.com/rcptguard/rcptguard/test"
)

// newCluster connects to url with a deadline long enough for a loaded
// test machine: these tests are about counting, not about timeouts.
func newCluster(t testing.TB, url string, now func() time.Time) *cluster.Cluster {
	t.Helper()
	c, err := cluster.New(cluster.Config{URL: url, KeyPrefix: "rg-test:", Period: time.Hour, LongPeriod: 24 * time.Hour, Now: now, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func invalid(addr string) *callout.Result {
	return &callout.Result{Address: addr, Status: callout.StatusInvalid, Reason: callout.ReasonNoMailbox}
}

// Three servers count 40 distinct invalid recipients of one identity at
// once, some seen twice: the count is the distinct ones, exactly one
// verdict is First, and it is the one that made limit+1.
func TestSharedCountCrossesOnceAtLimitPlusOne(t *testing.T) {
	r := test.StartRedis(t)
	now := time.Unix(1_800_000_000, 0)
	clock := func() time.Time { return now }
	servers := []*cluster.Cluster{newCluster(t, r.URL(), clock), newCluster(t, r.URL(), clock), newCluster(t, r.URL(), clock)}
	lim := detector.Thresholds{Count: 10, Act: detector.ModeEnforce}
	var firsts, maxCount atomic.Int64
	var firstCount atomic.Int64
	var wg sync.WaitGroup
	for i := range 60 {
		wg.Go(func() {
			c := servers[i%3]
			st, err := c.Record(context.Background(), "spam@isp.test", "", invalid(fmt.Sprintf("u%d@dest.test", i%40)), now, lim)
			if err != nil {
				t.Error(err)
				return
			}
			if st.First {
				firsts.Add(1)
				firstCount.Store(int64(st.Count))
			}
			for {
				m := maxCount.Load()
				if int64(st.Count) <= m || maxCount.CompareAndSwap(m, int64(st.Count)) {
					break
				}
			}
		})
	}
	wg.Wait()
	if firsts.Load() != 1 || firstCount.Load() != 11 {
		t.Fatalf("first verdicts %d at count %d, want one at 11", firsts.Load(), firstCount.Load())
	}
	if maxCount.Load() != 40 {
		t.Fatalf("count %d, want 40 distinct", maxCount.Load())
	}
	st, err := servers[1].Reserve(context.Background(), "spam@isp.test", "", now, lim)
	if err != nil || st.Count != 40 || st.Crossed != detector.TriggerCount || st.First {
		t.Fatalf("standing %+v %v", st, err)
	}
	// The window slides: an hour later the short count is empty, the
	// long one is not.
	lim.Long = 100
	st, err = servers[2].Reserve(context.Background(), "spam@isp.test", "", now.Add(time.Hour), lim)
	if err != nil || st.Count != 0 || st.Long != 40 {
		t.Fatalf("an hour later: %+v %v", st, err)
	}
	// An unblock resets the counts; the next crossing is First again.
	if err := servers[0].ResetCounts(context.Background(), "spam@isp.test"); err != nil {
		t.Fatal(err)
	}
	lim.Long = 0
	for i := range 11 {
		st, err = servers[i%3].Record(context.Background(), "spam@isp.test", "", invalid(fmt.Sprintf("v%d@dest.test", i)), now, lim)
		if err != nil {
			t.Fatal(err)
		}
		if st.First != (i == 10) {
			t.Fatalf("after reset, verdict %d: %+v", i+1, st)
		}
	}
	keys, _ := r.Do("KEYS", "*")
	if n, _ := r.Do("DBSIZE"); n == ":0" {
		t.Fatalf("no keys written: %s", keys)
	}
}

// The ratio trigger counts a dead domain once and the valid verdicts of
// the window.
func TestSharedRatio(t *testing.T) {
	r := test.StartRedis(t)
	now := time.Unix(1_800_000_000, 0)
	c := newCluster(t, r.URL(), func() time.Time { return now })
	lim := detector.Thresholds{Ratio: 0.5, RatioMin: 3, Act: detector.ModeEnforce}
	ctx := context.Background()
	for i := range 4 {
		if _, err := c.Record(ctx, "u@isp.test", "", &callout.Result{Address: fmt.Sprintf("ok%d@good.test", i), Status: callout.StatusValid}, now, lim); err != nil {
			t.Fatal(err)
		}
	}
	// Valid verdicts are written in batches.
	if st, err := c.Reserve(ctx, "u@isp.test", "", now, lim); err != nil || st.Valid != 0 {
		t.Fatalf("before the batch: %+v %v", st, err)
	}
	c.Flush(ctx)
	for i := range 5 {
		st, err := c.Record(ctx, "u@isp.test", "", &callout.Result{Address: fmt.Sprintf("x%d@dead.test", i), Status: callout.StatusInvalid, Reason: callout.ReasonNXDomain}, now, lim)
		if i < 2 {
			// Below ratio_min: the count stands for the invalid ones.
			if err != nil || st.Invalid != i+1 || st.Count != i+1 || st.Crossed != "" {
				t.Fatalf("dead domain %d: %+v %v", i, st, err)
			}
			continue
		}
		if err != nil || st.Invalid != 1 || st.Valid != 4 || st.Count != i+1 || st.Crossed != "" {
			t.Fatalf("dead domain %d: %+v %v", i, st, err)
		}
	}
	var st detector.Standing
	for i := range 4 {
		var err error
		st, err = c.Record(ctx, "u@isp.test", "", invalid(fmt.Sprintf("n%d@good.test", i)), now, lim)
		if err != nil {
			t.Fatal(err)
		}
		if want := i == 2; st.First != want { // 4 of 8 judged
			t.Fatalf("invalid %d: %+v", i, st)
		}
	}
	if st.Invalid != 5 || st.Crossed != detector.TriggerRatio {
		t.Fatalf("ratio standing %+v", st)
	}
}

// Redis gone: calls fail within the deadline, and for a second after a
// failure fail at once; every key has the prefix.
func TestRedisDownFailsFast(t *testing.T) {
	r := test.StartRedis(t)
	c, err := cluster.New(cluster.Config{URL: r.URL(), KeyPrefix: "rg-test:", Period: time.Hour}) // the default deadline
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	lim := detector.Thresholds{Count: 3, Act: detector.ModeEnforce}
	if _, err := c.Record(ctx, "a@isp.test", "", invalid("x@dest.test"), time.Now(), lim); err != nil {
		t.Fatal(err)
	}
	keys, err := r.Do("KEYS", "*")
	if err != nil || !strings.HasPrefix(keys, "*") {
		t.Fatalf("KEYS: %q %v", keys, err)
	}
	r.Stop()
	start := time.Now()
	if _, err := c.Record(ctx, "a@isp.test", "", invalid("y@dest.test"), time.Now(), lim); err == nil {
		t.Fatal("no error with redis down")
	}
	if _, err := c.Reserve(ctx, "a@isp.test", "", time.Now(), lim); err == nil {
		t.Fatal("no error with redis down")
	}
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Fatalf("two calls took %s with redis down", d)
	}
	if c.Up() {
		t.Fatal("Up with redis down")
	}
}

func TestCheckURL(t *testing.T) {
	for _, tc := range []struct {
		url string
		ok  bool
	}{
		{"redis://127.0.0.1:6379/0", true},
		{"rediss://user:pw@redis.example:6380/2", true},
		{"unix:/run/redis/redis.sock", true},
		{"unix:///run/redis/redis.sock?db=3", true},
		{"redis://a:6379/0?addr=b:6379&addr=c:6379", true},
		{"redis://s1:26379/0?master_name=mymaster", true},
		{"unix:run/redis.sock", false},
		{"http://127.0.0.1:6379", false},
		{"127.0.0.1:6379", false},
		{"redis://127.0.0.1:6379/x", false},
		{"unix:/run/redis.sock?foo=1", false},
	} {
		if err := cluster.CheckURL(tc.url); (err == nil) != tc.ok {
			t.Errorf("CheckURL(%q) = %v, want ok %v", tc.url, err, tc.ok)
		}
	}
}

// A verification in flight on one server counts for every server until
// its verdict, and expires by itself should its server die.
func TestSharedReservations(t *testing.T) {
	r := test.StartRedis(t)
	now := time.Unix(1_800_000_000, 0)
	clock := func() time.Time { return now }
	a, b := newCluster(t, r.URL(), clock), newCluster(t, r.URL(), clock)
	ctx := context.Background()
	lim := detector.Thresholds{Count: 5, Act: detector.ModeEnforce}
	if st, err := a.Reserve(ctx, "u@isp.test", "a:1", now, lim); err != nil || st.Pending != 1 {
		t.Fatalf("reserve: %+v %v", st, err)
	}
	if st, err := b.Reserve(ctx, "u@isp.test", "b:1", now, lim); err != nil || st.Pending != 2 {
		t.Fatalf("second reserve: %+v %v", st, err)
	}
	st, err := a.Record(ctx, "u@isp.test", "a:1", invalid("x@dest.test"), now, lim)
	if err != nil || st.Pending != 1 || st.Count != 1 {
		t.Fatalf("verdict: %+v %v", st, err)
	}
	if st, err := a.Record(ctx, "u@isp.test", "b:1", nil, now, lim); err != nil || st.Pending != 0 || st.Count != 1 {
		t.Fatalf("ended without a verdict: %+v %v", st, err)
	}
	if _, err := b.Reserve(ctx, "u@isp.test", "b:2", now, lim); err != nil {
		t.Fatal(err)
	}
	if st, err := a.Reserve(ctx, "u@isp.test", "", now.Add(2*time.Minute), lim); err != nil || st.Pending != 0 {
		t.Fatalf("a reservation of a dead server after two minutes: %+v %v", st, err)
	}
}

// BenchmarkRecordInvalid counts invalid verdicts of new identities (the
// ratio and long window on, as by default): one recipient each, or ten,
// and reports Redis's memory per tracked identity (INFO memory,
// used_memory) and per verdict.
func BenchmarkRecordInvalid(b *testing.B) {
	for _, per := range []int{1, 10} {
		b.Run(fmt.Sprintf("recipients=%d", per), func(b *testing.B) { benchRecord(b, per) })
	}
}

func benchRecord(b *testing.B, per int) {
	r := test.StartRedis(b)
	c, err := cluster.New(cluster.Config{URL: r.URL(), KeyPrefix: "rcptguard:", Period: time.Hour, LongPeriod: 24 * time.Hour})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	used := func() int64 {
		out, err := r.Info("memory")
		if err != nil {
			b.Fatal(err)
		}
		return out["used_memory"]
	}
	ctx := context.Background()
	lim := detector.Thresholds{Count: 100, Long: 300, Ratio: 0.5, RatioMin: 30, Act: detector.ModeEnforce}
	before := used()
	now := time.Now()
	b.ResetTimer()
	for i := range b.N {
		id := fmt.Sprintf("user%d@customer.test", i/per)
		if _, err := c.Record(ctx, id, "", invalid(fmt.Sprintf("harvested%d@dest.test", i)), now, lim); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(used()-before)/float64((b.N+per-1)/per), "redis-B/identity")
}

// A flush sets a valid-count hash's expiry once, with the write that
// opens its bucket, and again when the hash was lost (an unblock's
// reset): never a hash without an expiry after a flush that created it.
func TestFlushExpiresOncePerBucket(t *testing.T) {
	r := test.StartRedis(t)
	now := time.Unix(1_800_000_000, 0)
	c := newCluster(t, r.URL(), func() time.Time { return now })
	lim := detector.Thresholds{Ratio: 0.5, RatioMin: 3, Act: detector.ModeEnforce}
	ctx := context.Background()
	valid := &callout.Result{Address: "ok@good.test", Status: callout.StatusValid}
	key := "rg-test:v{u@isp.test}"
	flush := func() {
		t.Helper()
		if _, err := c.Record(ctx, "u@isp.test", "", valid, now, lim); err != nil {
			t.Fatal(err)
		}
		c.Flush(ctx)
	}
	ttl := func() string {
		t.Helper()
		v, err := r.Do("PTTL", key)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	flush()
	if v := ttl(); v == ":-1" || v == ":-2" {
		t.Fatalf("new bucket: PTTL %s, want an expiry", v)
	}
	// The same bucket again: no second PEXPIRE (PERSIST shows it).
	if _, err := r.Do("PERSIST", key); err != nil {
		t.Fatal(err)
	}
	flush()
	if v := ttl(); v != ":-1" {
		t.Fatalf("same bucket: PTTL %s, want the expiry left alone (-1 after PERSIST)", v)
	}
	// The next bucket (period/12 later) sets it again.
	now = now.Add(5 * time.Minute)
	flush()
	if v := ttl(); v == ":-1" || v == ":-2" {
		t.Fatalf("next bucket: PTTL %s, want an expiry", v)
	}
	// Lost (the reset of an unblock) and written again in the same bucket.
	if err := c.ResetCounts(ctx, "u@isp.test"); err != nil {
		t.Fatal(err)
	}
	flush()
	if v := ttl(); v == ":-1" || v == ":-2" {
		t.Fatalf("after a reset: PTTL %s, want an expiry", v)
	}
	if st, err := c.Reserve(ctx, "u@isp.test", "", now, detector.Thresholds{Ratio: 0.5, RatioMin: 0, Act: detector.ModeEnforce}); err != nil || st.Valid != 1 {
		t.Fatalf("after a reset and one valid verdict: %+v %v, want Valid 1", st, err)
	}
}

// The per-identity probe cap is the fleet's: two servers taking turns get
// perMinute verifications of one identity in a sliding minute, not twice
// that; other identities have their own; the minute slides.
func TestSharedProbeCap(t *testing.T) {
	r := test.StartRedis(t)
	now := time.Unix(1_800_000_000, 0)
	clock := func() time.Time { return now }
	servers := []*cluster.Cluster{newCluster(t, r.URL(), clock), newCluster(t, r.URL(), clock)}
	ctx := context.Background()
	take := func(i int, id string) bool {
		t.Helper()
		ok, err := servers[i%2].TakeProbe(ctx, id, now, 3)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	for i := range 3 {
		if !take(i, "u@isp.test") {
			t.Fatalf("probe %d refused below the cap", i+1)
		}
		now = now.Add(10 * time.Second)
	}
	if take(3, "u@isp.test") || take(4, "u@isp.test") {
		t.Fatal("a fourth probe within the minute taken")
	}
	if !take(3, "other@isp.test") {
		t.Fatal("another identity refused")
	}
	// 60 s after the first probe it leaves the minute: one more.
	now = time.Unix(1_800_000_060, 0)
	if !take(5, "u@isp.test") || take(6, "u@isp.test") {
		t.Fatal("the minute does not slide by one probe")
	}
}

// An unblock taking effect on one server marks the identity's shared
// counts as forgotten before its push reaches Redis: the next verdict
// there is counted afresh, in the same script, not re-blocked on the
// counts that made the block; once a reset was done (the unblock's push),
// the mark is gone and fresh counts stay.
func TestForgetCountsDropsSharedCountsAtNextCount(t *testing.T) {
	r := test.StartRedis(t)
	now := time.Unix(1_800_000_000, 0)
	clock := func() time.Time { return now }
	a, b := newCluster(t, r.URL(), clock), newCluster(t, r.URL(), clock)
	lim := detector.Thresholds{Count: 3, Act: detector.ModeEnforce}
	ctx := context.Background()
	record := func(c *cluster.Cluster, addr string) detector.Standing {
		t.Helper()
		st, err := c.Record(ctx, "abuser@isp.test", "", invalid(addr), now, lim)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	for i := range 4 {
		record(b, fmt.Sprintf("old%d@dest.test", i))
	}
	a.ForgetCounts("abuser@isp.test")
	if st := record(a, "new0@dest.test"); st.Count != 1 || st.Crossed != "" {
		t.Fatalf("first verdict after ForgetCounts: %+v, want a fresh count of 1 and no crossing", st)
	}
	if st := record(a, "new1@dest.test"); st.Count != 2 {
		t.Fatalf("second verdict: %+v, want 2: the counts are dropped once", st)
	}
	// A reset (as the unblock's push makes) clears the mark: the counts
	// made after it stay.
	a.ForgetCounts("abuser@isp.test")
	if err := a.ResetCounts(ctx, "abuser@isp.test"); err != nil {
		t.Fatal(err)
	}
	record(b, "later0@dest.test")
	if st := record(a, "later1@dest.test"); st.Count != 2 {
		t.Fatalf("after a reset: %+v, want 2: a mark done by ResetCounts must not drop fresh counts", st)
	}
}
