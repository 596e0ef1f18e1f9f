package app

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/cmd/rcptguard/queue"
	"github.com/rcptguard/rcptguard/detector"
	"github.com/rcptguard/rcptguard/notify"
)

// The report's commands name an identity starting with '-' after "--":
// every command must read it as the identity, and without "--" as a flag.
func TestCommandsTakeDoubleDash(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "blocklist")
	cfg := writeConfig(t, fmt.Sprintf("[blocklist]\npath = %q\n[queue]\nrequests = %q\n", path, filepath.Join(dir, "requests")))
	run := func(args ...string) (string, error) {
		var out, errOut bytes.Buffer
		err := Run(context.Background(), args, &out, &errOut)
		return out.String() + errOut.String(), err
	}
	if out, err := run("block", "-config", cfg, "--", "-x@example.com"); err != nil {
		t.Fatalf("block -- -x@example.com: %v\n%s", err, out)
	}
	blocked, err := isBlocked(&Config{Blocklist: BlocklistConfig{Path: path}}, "-x@example.com")
	if err != nil || !blocked {
		t.Fatalf("-x@example.com not blocked: %v", err)
	}

	old := geteuid
	geteuid = func() int { return 1000 }
	t.Cleanup(func() { geteuid = old })
	for _, args := range [][]string{
		{"held", "-config", cfg, "--", "-x@example.com"},
		{"release", "-config", cfg, "-n", "--", "-x@example.com"},
		{"release", "-config", cfg, "--", "-x@example.com"},
		{"purge", "-config", cfg, "-n", "--", "-x@example.com"},
		{"purge", "-config", cfg, "--", "-x@example.com"},
	} {
		// Parsed, identity accepted: it gets as far as the root check.
		if _, err := run(args...); !errors.Is(err, errNotRoot) {
			t.Errorf("%q: %v, want the root refusal (arguments accepted)", args, err)
		}
		// Without "--" the identity is an unknown flag.
		noDash := append([]string{}, args[:len(args)-2]...)
		noDash = append(noDash, args[len(args)-1])
		if _, err := run(noDash...); err == nil || errors.Is(err, errNotRoot) {
			t.Errorf("%q: %v, want a usage error", noDash, err)
		}
	}
	geteuid = old

	if out, err := run("unblock", "-config", cfg, "--", "-x@example.com"); err != nil || !strings.Contains(out, "-x@example.com") {
		t.Fatalf("unblock -- -x@example.com: %v\n%s", err, out)
	}
	if blocked, _ := isBlocked(&Config{Blocklist: BlocklistConfig{Path: path}}, "-x@example.com"); blocked {
		t.Error("still blocked after unblock -- -x@example.com")
	}
}

// TestHoldResultsReported: a result queue-hold wrote becomes one "held"
// report in the spool, with the queue IDs and the queue disk's state, and
// is never reported again.
func TestHoldResultsReported(t *testing.T) {
	state := t.TempDir()
	requests := filepath.Join(state, "hold-requests")
	if err := makeResultsDir(requests); err != nil {
		t.Fatal(err)
	}
	dir := queue.ResultsDir(requests)
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("results directory: %v %v, want mode 0700", fi, err)
	}
	spool := filepath.Join(state, "spool")
	// The mailer's spool writer logs from its own goroutine.
	logs := &lockedBuffer{}
	log := slog.New(slog.NewTextHandler(logs, nil))
	m, err := notify.New(notify.Config{To: []string{"abuse@example.com"}, From: "rcptguard@mail.example.net", Relay: "127.0.0.1:1", Spool: spool, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	space := &queueSpaceNow{}
	space.set(queue.Space{Free: 1 << 30, Total: 100 << 30}, nil)
	n := reportNotifier{log: log, mailer: m, space: space, retroactive: true}

	t0 := time.Now().Add(-time.Minute)
	held := []queue.Message{
		{ID: "4Xk2Lf1ZqQRz9vWx", Arrival: t0.Add(-time.Hour), Size: 2817, Recipients: 3},
		{ID: "3F2B7C10D4", Arrival: t0.Add(-time.Minute), Size: 1024, Recipients: 1},
	}
	if err := queue.WriteResult(dir, queue.NewHoldResult("spammer@customer.test", t0, t0.Add(2*time.Second), held)); err != nil {
		t.Fatal(err)
	}
	// A forged file in the directory is refused, not reported.
	if err := os.WriteFile(filepath.Join(dir, "held-forged.json"), []byte(`{"version":1,"identity":"x","op":"release"}`), 0o600); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); watchHoldResults(ctx, dir, 5*time.Millisecond, n, nil) }()
	var msgs []string
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		msgs = spooled(t, spool)
		if len(msgs) > 0 {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond) // several more rounds of the watcher
	cancel()
	<-done
	msgs = spooled(t, spool)
	if len(msgs) != 1 {
		t.Fatalf("%d reports spooled, want 1\n%s", len(msgs), logs.String())
	}
	msg := msgs[0]
	for _, want := range []string{"X-Rcptguard-Kind: held", "[rcptguard] held 2 messages already queued of spammer@customer.test",
		"4Xk2Lf1ZqQRz9vWx", "3F2B7C10D4", "nearly full", "rcptguard purge -n 'spammer@customer.test'"} {
		if !strings.Contains(strings.ReplaceAll(msg, "=\r\n", ""), want) {
			t.Errorf("report lacks %q:\n%s", want, msg)
		}
	}
	if !strings.Contains(logs.String(), "retroactive hold result refused") {
		t.Errorf("the forged result was not logged as refused:\n%s", logs.String())
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Errorf("left in the results directory: %v", left)
	}
}

// spooled returns the messages in a notify spool.
func spooled(t *testing.T, spool string) []string {
	t.Helper()
	entries, err := os.ReadDir(spool)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".msg") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(spool, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, string(b))
	}
	return out
}

// TestBlockReportSaysQueueDiskAndFollowUp: a block report made while the
// queue file system is nearly full says so, and announces the "held"
// follow-up when retroactive holds are on; a warning announces nothing.
func TestBlockReportSaysQueueDiskAndFollowUp(t *testing.T) {
	spool := filepath.Join(t.TempDir(), "spool")
	log := slog.New(slog.NewTextHandler(new(bytes.Buffer), nil))
	m, err := notify.New(notify.Config{To: []string{"abuse@example.com"}, From: "rcptguard@mail.example.net", Relay: "127.0.0.1:1", Spool: spool, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	space := &queueSpaceNow{}
	space.set(queue.Space{Free: 3 << 30, Total: 100 << 30}, nil)
	n := reportNotifier{log: log, mailer: m, space: space, retroactive: true}
	ev := detector.Event{Kind: detector.EventBlock, Identity: "spammer@customer.test", Time: time.Now(), Mode: "enforce", Count: 3, Limit: 2, Period: time.Hour, Action: "HOLD x"}
	if err := n.Notify(context.Background(), ev); err != nil {
		t.Fatal(err)
	}
	if err := m.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	msgs := spooled(t, spool)
	if len(msgs) != 1 {
		t.Fatalf("%d reports", len(msgs))
	}
	text := strings.ReplaceAll(msgs[0], "=\r\n", "")
	for _, want := range []string{"nearly full: 3.0 GiB free", "follow-up report", `"low": true`, `"retroactive_hold": true`} {
		if !strings.Contains(text, want) {
			t.Errorf("block report lacks %q:\n%s", want, text)
		}
	}
}

// lockedBuffer is a bytes.Buffer safe for concurrent use.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
