package app

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/cmd/rcptguard/queue"
)

func TestQueueCommandsNeedRoot(t *testing.T) {
	old := geteuid
	geteuid = func() int { return 1000 }
	t.Cleanup(func() { geteuid = old })
	dir := t.TempDir()
	cfg := writeConfig(t, "[blocklist]\npath = \""+filepath.Join(dir, "blocklist")+"\"\n[queue]\nrequests = \""+dir+"\"\n")
	for _, args := range [][]string{
		{"held", "-config", cfg},
		{"release", "-config", cfg, "-n", "a@example.com"},
		{"purge", "-config", cfg, "a@example.com"},
		{"queue-hold", "-config", cfg},
	} {
		var out, errOut bytes.Buffer
		err := Run(context.Background(), args, &out, &errOut)
		if !errors.Is(err, errNotRoot) || !strings.Contains(err.Error(), "must run as root") {
			t.Errorf("%v: error %v, want the root refusal", args, err)
		}
	}
}

func TestQueueConfigValidation(t *testing.T) {
	_, err := LoadConfig(writeConfig(t, "[queue]\npostfix_config = \"etc/postfix\"\nrequests = \"spool\"\n"))
	if err == nil || !strings.Contains(err.Error(), "queue.postfix_config") || !strings.Contains(err.Error(), "queue.requests") {
		t.Fatalf("relative queue paths accepted or not named: %v", err)
	}
	cfg, err := LoadConfig(writeConfig(t, "[queue]\nrequests = \"\"\n"))
	if err != nil || cfg.Queue.Requests != "" {
		t.Fatalf("an empty queue.requests (off) refused: %v", err)
	}
}

// fakeBlocklist records blocks; it fails when err is set.
type fakeBlocklist struct {
	err        error
	blocked    []string
	lastAction string
}

func (f *fakeBlocklist) Blocked(string) (string, bool) { return "", false }
func (f *fakeBlocklist) Block(_ context.Context, id, action, text string) error {
	f.blocked = append(f.blocked, id)
	f.lastAction = action + " " + text
	return f.err
}

// TestHoldRequestAfterBlock: a block the detector makes writes one hold
// request for the identity, and a block not in the file yet writes none
// (the root side would refuse it).
func TestHoldRequestAfterBlock(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "requests")
	cfg := &Config{Queue: QueueConfig{Requests: dir}}
	fb := &fakeBlocklist{}
	b, _, err := withBlockHooks(cfg, fb, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Block(context.Background(), "spammer@customer.test", "HOLD", ""); err != nil {
		t.Fatal(err)
	}
	fb.err = errors.New("disk full")
	if err := b.Block(context.Background(), "other@customer.test", "HOLD", ""); err == nil {
		t.Fatal("the blocklist's error was lost")
	}
	reqs, problems, err := queue.TakeRequests(dir, time.Now(), time.Hour)
	if err != nil || len(problems) > 0 {
		t.Fatal(err, problems)
	}
	if len(reqs) != 1 || reqs[0].Identity != "spammer@customer.test" {
		t.Fatalf("requests %+v, want one for spammer@customer.test", reqs)
	}

	// Off: the blocklist is used as it is.
	off, _, err := withBlockHooks(&Config{}, fb, nil)
	if err != nil || off != fb {
		t.Fatalf("queue.requests empty: got %T %v, want the blocklist itself", off, err)
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatal(err)
	}
}

// TestStaleHoldRequestTempsRemovedAtStart: the daemon's set-up removes
// the temporary request files a killed writer left next to
// queue.requests once they are stale, and says so; a fresh one stays.
func TestStaleHoldRequestTempsRemovedAtStart(t *testing.T) {
	parent := t.TempDir()
	dir := filepath.Join(parent, "requests")
	stale := filepath.Join(parent, ".rcptguard-hold-request-1-aa")
	fresh := filepath.Join(parent, ".rcptguard-hold-request-2-bb")
	for _, p := range []string{stale, fresh} {
		if err := os.WriteFile(p, []byte("spammer@cust"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	old := time.Now().Add(-2 * queue.StaleTempAge)
	if err := os.Chtimes(stale, old, old); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	if _, _, err := withBlockHooks(&Config{Queue: QueueConfig{Requests: dir}}, &fakeBlocklist{}, slog.New(slog.NewTextHandler(&logs, nil))); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(stale); !os.IsNotExist(err) {
		t.Errorf("stale temporary file still there: %v", err)
	}
	if _, err := os.Lstat(fresh); err != nil {
		t.Errorf("fresh temporary file removed: %v", err)
	}
	if !strings.Contains(logs.String(), "dead writer") || !strings.Contains(logs.String(), "count=1") {
		t.Errorf("no log line naming the removal:\n%s", logs.String())
	}
}
