package app

import (
	"context"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/rcptguard/rcptguard/blocklist"
	"github.com/rcptguard/rcptguard/cmd/rcptguard/queue"
	"github.com/rcptguard/rcptguard/detector"
	"github.com/rcptguard/rcptguard/notify"
)

// fakeClock is a settable clock for the hold requester.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// TestLearnedBlockRequestsHold: a block learned through the cluster asks
// for this server's retroactive hold once the entry is in the blocklist
// file, never before (queue-hold would refuse it); one that never reaches
// the file is given up and logged; what queue-hold then held for a learned
// block is logged and counted, not reported, while a result for a block
// made here is reported as always.
func TestLearnedBlockRequestsHold(t *testing.T) {
	state := t.TempDir()
	requests := filepath.Join(state, "hold-requests")
	cfg := &Config{Queue: QueueConfig{Requests: requests}, Detector: DetectorConfig{Period: Duration(time.Hour)}}
	logs := &lockedBuffer{}
	log := slog.New(slog.NewTextHandler(logs, nil))
	fb := &fakeBlocklist{}
	hooked, h, err := withBlockHooks(cfg, fb, log)
	if err != nil || h == nil {
		t.Fatalf("withBlockHooks: %v, requester %v", err, h)
	}
	clock := &fakeClock{t: time.Now()}
	h.now = clock.now
	bl, _, err := blocklist.Open(blocklist.Config{Path: filepath.Join(state, "blocklist"), Create: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); h.runLearned(ctx, bl, time.Millisecond) }()
	defer func() { cancel(); <-done }()

	const learned, local, lost = "spammer@customer.test", "other@customer.test", "ghost@customer.test"
	h.learnedBlock(learned)
	h.learnedBlock(lost)
	time.Sleep(30 * time.Millisecond) // many rounds: nothing in the file yet
	if reqs, _, _ := queue.TakeRequests(requests, time.Now(), time.Hour); len(reqs) != 0 {
		t.Fatalf("requests %+v written before the block was in the file", reqs)
	}
	if err := bl.Add(ctx, blocklist.Entry{Identity: learned, Action: "HOLD", Text: "blocked elsewhere"}); err != nil {
		t.Fatal(err)
	}
	var reqs []queue.HoldRequest
	deadline := time.Now().Add(5 * time.Second)
	for len(reqs) == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
		reqs, _, _ = queue.TakeRequests(requests, time.Now(), time.Hour)
	}
	if len(reqs) != 1 || reqs[0].Identity != learned {
		t.Fatalf("requests %+v, want one for %s", reqs, learned)
	}
	clock.add(learnedWait + time.Second)
	for !strings.Contains(logs.String(), "the learned block is not in the blocklist file") {
		if time.Now().After(deadline) {
			t.Fatalf("the lost learned block was not given up:\n%s", logs)
		}
		time.Sleep(5 * time.Millisecond)
	}
	// A block made here asks at once, and its result is reported.
	if err := hooked.Block(ctx, local, "HOLD", ""); err != nil {
		t.Fatal(err)
	}
	localReqs, _, _ := queue.TakeRequests(requests, time.Now(), time.Hour)
	if len(localReqs) != 1 || localReqs[0].Identity != local {
		t.Fatalf("requests %+v, want one for %s", localReqs, local)
	}

	spool := filepath.Join(state, "spool")
	m, err := notify.New(notify.Config{To: []string{"abuse@example.com"}, From: "rcptguard@mail.example.net", Relay: "127.0.0.1:1", Spool: spool, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	msgs := []queue.Message{{ID: "4Xk2Lf1ZqQRz9vWx", Arrival: time.Now().Add(-time.Minute), Size: 2817, Recipients: 3}}
	dir := queue.ResultsDir(requests)
	for _, r := range []queue.HoldRequest{reqs[0], localReqs[0]} {
		if err := queue.WriteResult(dir, queue.NewHoldResult(r.Identity, r.Time, time.Now(), msgs)); err != nil {
			t.Fatal(err)
		}
	}
	wctx, wcancel := context.WithCancel(context.Background())
	wdone := make(chan struct{})
	go func() {
		defer close(wdone)
		watchHoldResults(wctx, dir, time.Millisecond, reportNotifier{log: log, mailer: m, space: &queueSpaceNow{}}, h)
	}()
	for len(spooled(t, spool)) == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond)
	wcancel()
	<-wdone
	got := spooled(t, spool)
	if len(got) != 1 || !strings.Contains(got[0], "of "+local) {
		t.Fatalf("%d reports spooled, want one, for %s:\n%s", len(got), local, got)
	}
	if n := testutil.ToFloat64(h.learnedHeld); n != 1 {
		t.Errorf("learned held messages counted %v, want 1", n)
	}
	if !strings.Contains(logs.String(), "block learned through the cluster") || !strings.Contains(logs.String(), "identity="+learned) {
		t.Errorf("no log line for the learned block's hold:\n%s", logs)
	}
}

// TestFleetMarkedBlockIsLearned: a block this server makes only because
// another server crossed first (detector.FleetMark) asks for the hold at
// once, as a learned one: its result is not reported; a later block made
// here is reported again.
func TestFleetMarkedBlockIsLearned(t *testing.T) {
	requests := filepath.Join(t.TempDir(), "hold-requests")
	cfg := &Config{Queue: QueueConfig{Requests: requests}, Detector: DetectorConfig{Period: Duration(time.Hour), UnblockAfter: Duration(time.Hour)}}
	hooked, h, err := withBlockHooks(cfg, &fakeBlocklist{}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	const id = "spammer@customer.test"
	if err := hooked.Block(context.Background(), id, "HOLD", "rcptguard: "+id+" blocked: 4 invalid recipients within 1h "+detector.FleetMark); err != nil {
		t.Fatal(err)
	}
	reqs, _, err := queue.TakeRequests(requests, time.Now(), time.Hour)
	if err != nil || len(reqs) != 1 || reqs[0].Identity != id {
		t.Fatalf("requests %+v, %v; want one for %s", reqs, err, id)
	}
	if !h.wasLearned(id, reqs[0].Time) {
		t.Error("the hold of a fleet-marked block is reported as this server's own")
	}
	if err := hooked.Block(context.Background(), id, "HOLD", "rcptguard: "+id+" blocked: 4 invalid recipients within 1h"); err != nil {
		t.Fatal(err)
	}
	if h.wasLearned(id, time.Now()) {
		t.Error("the hold of a block made here is taken for a learned one")
	}
}
