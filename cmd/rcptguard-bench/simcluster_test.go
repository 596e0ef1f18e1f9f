package main

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/cmd/rcptguard/app"
	"github.com/rcptguard/rcptguard/test"
)

// TestSimulationTwoServersSameBlocks plays scenarios against one detector
// and against two sharing a real Redis, the requests taking turns: the
// blocks (how many, by which trigger, at which count) are the same, each
// block makes one report, and no run accepts as many invalid recipients
// as the count it blocked at, and they come at the same virtual time,
// with the per-identity probe cap (120 a minute, the default) on or off:
// the cap is counted fleet-wide in Redis.
func TestSimulationTwoServersSameBlocks(t *testing.T) {
	if testing.Short() {
		t.Skip("plays scenarios twice against a real Redis")
	}
	r := test.StartRedis(t)
	noCap, err := app.LoadConfig("")
	if err != nil {
		t.Fatal(err)
	}
	noCap.Callout.PerIdentityRate = 0
	want := []string{"burst 1,000 in 50s, 80% invalid", "botnet, 60 IPs, 50% invalid", "null sender, 80% invalid", "marketing list, 5% stale"}
	for _, c := range []struct {
		ratio float64
		base  *app.Config
	}{{-1, nil}, {0, nil}, {0, noCap}} {
		sc := simConfig{Seed: 1, HonestLat: 20 * time.Millisecond, AbuseLat: time.Millisecond, Honest: 8, Ratio: c.ratio, Quick: true, DetectorBase: c.base}
		fleet := sc
		fleet.Redis, fleet.Servers = r.URL(), 2
		played := 0
		for _, s := range simScenarios(sc) {
			if !slices.Contains(want, s.name) {
				continue
			}
			played++
			one, err := runScenario(context.Background(), sc, s)
			if err != nil {
				t.Fatal(err)
			}
			two, err := runScenario(context.Background(), fleet, s)
			if err != nil {
				t.Fatal(err)
			}
			what := fmt.Sprintf("ratio %v, probe cap %v, %s", c.ratio, c.base == nil, s.name)
			t.Logf("%s: one server blocks %d at %v after %s, %d invalid accepted; two: %d at %v after %s, %d invalid accepted, %d reports",
				what, one.Blocked, one.BlockCounts, one.BlockedAfter, one.AcceptedInvalid,
				two.Blocked, two.BlockCounts, two.BlockedAfter, two.AcceptedInvalid, two.Reports)
			if two.Blocked != one.Blocked || !slices.Equal(two.BlockCounts, one.BlockCounts) {
				t.Errorf("%s: two servers blocked %d at %v; one server %d at %v", what, two.Blocked, two.BlockCounts, one.Blocked, one.BlockCounts)
			}
			if two.Reports != one.Reports || two.Reports != one.Blocked {
				t.Errorf("%s: %d block reports with two servers, %d with one, for %d blocks", what, two.Reports, one.Reports, one.Blocked)
			}
			if two.BlockedAfter != one.BlockedAfter {
				t.Errorf("%s: two servers blocked after %s, one after %s", what, two.BlockedAfter, one.BlockedAfter)
			}
			for _, row := range []simRow{one, two} {
				if n := blockedAt(t, row); n > 0 && row.AcceptedInvalid >= n {
					t.Errorf("%s: %d invalid recipients accepted before the block at %d", what, row.AcceptedInvalid, n)
				}
			}
		}
		if played != len(want) {
			t.Fatalf("played %d of the scenarios %v", played, want)
		}
	}
}

// blockedAt returns the count of a row's single block, 0 without one.
func blockedAt(t *testing.T, r simRow) int {
	t.Helper()
	if len(r.BlockCounts) != 1 {
		return 0
	}
	var trigger string
	var n int
	if _, err := fmt.Sscan(r.BlockCounts[0], &trigger, &n); err != nil {
		t.Fatal(err)
	}
	return n
}
