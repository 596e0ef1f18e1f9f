package cluster_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/detector"
	"github.com/rcptguard/rcptguard/test"
)

// Through Sentinel (master_name) the fleet counts and syncs as with one
// Redis: go-redis asks the Sentinel for the master.
func TestSentinel(t *testing.T) {
	r := test.StartRedisSentinel(t)
	countsAndSyncs(t, r, r.Master)
}

// On a Redis Cluster (one node holding every slot) the scripts' keys of
// one identity, and the blocklist's, share a slot.
func TestRedisCluster(t *testing.T) {
	r := test.StartRedisCluster(t)
	countsAndSyncs(t, r, r)
}

// countsAndSyncs: two servers on r block an identity at exactly limit+1,
// one of them acting; a block on one reaches the other's file within
// 2 s; the keys are on data, each with the prefix.
func countsAndSyncs(t *testing.T, r, data *test.RedisServer) {
	ctx := context.Background()
	servers := [2]*member{newMember(t, r, time.Now), newMember(t, r, time.Now)}
	lim := detector.Thresholds{Count: 5, Act: detector.ModeEnforce}
	firsts := 0
	for i := range 8 {
		st, err := servers[i%2].c.Record(ctx, "spam@isp.test", "", invalid(fmt.Sprintf("u%d@dest.test", i)), time.Now(), lim)
		if err != nil {
			t.Fatalf("invalid recipient %d: %v", i+1, err)
		}
		if st.Count != i+1 || (st.Crossed != "") != (i+1 > 5) {
			t.Fatalf("invalid recipient %d: count %d, crossed %q", i+1, st.Count, st.Crossed)
		}
		if st.First {
			firsts++
			if i+1 != 6 {
				t.Fatalf("the crossing was acted on at %d, want 6", i+1)
			}
		}
	}
	if firsts != 1 {
		t.Fatalf("%d servers acted on the crossing, want 1", firsts)
	}

	runCtx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer stop()
	for _, m := range servers {
		wg.Go(func() { m.s.Run(runCtx) })
	}
	time.Sleep(100 * time.Millisecond) // both subscribed
	start := time.Now()
	servers[0].block(t, "spam@isp.test", time.Now())
	for !servers[1].has("spam@isp.test") {
		if time.Since(start) > 2*time.Second {
			t.Fatal("the block did not reach server 2 within 2 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("block on server 2 after %s", time.Since(start).Round(time.Millisecond))
	keys, err := data.Do("DBSIZE")
	if err != nil || keys == ":0" {
		t.Fatalf("DBSIZE on the data node: %q %v", keys, err)
	}
	for _, k := range []string{"rg-test:blocks{blocklist}", "rg-test:c{spam@isp.test}"} {
		if n, _ := data.Do("EXISTS", k); n != ":1" {
			t.Errorf("%s is not on the data node", k)
		}
	}
}
