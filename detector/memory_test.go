package detector

import (
	"context"
	"os"
	"runtime"
	"strconv"
	"testing"
)

// TestTrackedIdentityMemory measures the heap held per tracked identity on
// the real decision path: each identity sent one request whose recipient
// does not exist, so it holds a window entry, the evidence (client and
// recipient with its MX reply). The requests, and so the identity strings
// the tracker shares with them, are allocated before the measurement and
// are not counted. Measured: 340 bytes at 200,000 identities (275 before
// the long window, the ratio's valid counts, the sliding probe window and
// the in-flight gate; the counting state alone, TestLimiterMemory: 203).
// It fails at 400, above, to catch regressions without flaking.
func TestTrackedIdentityMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("allocates a lot")
	}
	n := 200_000
	if v, err := strconv.Atoi(os.Getenv("RCPTGUARD_MEM_IDENTITIES")); err == nil && v > 0 {
		n = v // the README figure: RCPTGUARD_MEM_IDENTITIES=1000000
	}
	h := newHarness(t, Config{Limit: 100})
	reqs := make([]*Request, n)
	for i := range reqs {
		reqs[i] = rcptRequest("user"+strconv.Itoa(i)+"@customer.example", "nobody@elsewhere.example")
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for _, r := range reqs {
		h.d.Decide(context.Background(), r)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(reqs)
	per := float64(after.HeapAlloc-before.HeapAlloc) / float64(n)
	t.Logf("%.0f bytes of heap per tracked identity (window and evidence; plus the identity string, ~%d bytes here)", per, len(reqs[0].SASLUsername))
	if per > 400 {
		t.Fatalf("%.0f bytes per tracked identity", per)
	}
	runtime.KeepAlive(h)
}
