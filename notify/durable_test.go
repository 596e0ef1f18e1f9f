package notify_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/mail"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/notify"
	"github.com/rcptguard/rcptguard/test"
)

// reportCounts counts the relay's messages by subject, and the subjects
// that arrived more than once.
func reportCounts(t *testing.T, relay *test.Relay) (map[string]int, int) {
	t.Helper()
	counts := map[string]int{}
	dups := 0
	for _, m := range relay.Messages() {
		msg, err := mail.ReadMessage(strings.NewReader(string(m.Data)))
		if err != nil {
			t.Fatal(err)
		}
		s := msg.Header.Get("Subject")
		if counts[s]++; counts[s] > 1 {
			dups++
		}
	}
	return counts, dups
}

// burst enqueues n block reports and n warnings and returns their
// subjects.
func burst(t *testing.T, m *notify.Mailer, n int) []string {
	t.Helper()
	var subjects []string
	for i := range n {
		b := abuseReport(fmt.Sprintf("b%02d@example.com", i))
		w := abuseReport(fmt.Sprintf("w%02d@example.com", i))
		w.Kind, w.Count, w.Limit, w.Action = notify.KindWarning, 75, 100, ""
		start := time.Now()
		for _, r := range []notify.Report{b, w} {
			if err := m.Enqueue(context.Background(), r); err != nil {
				t.Fatal(err)
			}
		}
		// Enqueue never waits for the disk: two reports in far less than
		// one spool retry round or write wait (1 s), even on a loaded CI box.
		if took := time.Since(start); took > 500*time.Millisecond {
			t.Errorf("Enqueue took %v while the spool refuses writes", took)
		}
	}
	for i := range n {
		subjects = append(subjects, fmt.Sprintf("[rcptguard] blocked b%02d@example.com: 101 invalid recipients in 1h", i),
			fmt.Sprintf("[rcptguard] warning w%02d@example.com: 75 of 100", i))
	}
	return subjects
}

// checkOnce fails unless every subject arrived exactly once, and nothing
// else did; it returns the figures.
func checkOnce(t *testing.T, relay *test.Relay, subjects []string) (delivered, dups int) {
	t.Helper()
	counts, dups := reportCounts(t, relay)
	for _, s := range subjects {
		if counts[s] != 1 {
			t.Errorf("%q arrived %d times, want once", s, counts[s])
		}
	}
	if len(counts) != len(subjects) {
		t.Errorf("%d distinct reports arrived, want %d: %v", len(counts), len(subjects), counts)
	}
	return len(relay.Messages()), dups
}

// refusingSpool checks 12 blocks and 12 warnings made while the spool
// refuses writes (refuse) and the relay is down: Enqueue does not wait,
// the reports wait in memory (Unspooled), and once space (undo) and the
// relay are back, each arrives exactly once.
func refusingSpool(t *testing.T, spool string, refuse func(*notify.Mailer) (undo func())) {
	relay := test.StartRelay(t, test.RelayConfig{})
	relay.SetDown(true)
	cfg := relayConfig(relay)
	cfg.Spool = spool
	cfg.SpoolRetry = 20 * time.Millisecond
	m, logs := newMailer(t, cfg)
	run(t, m)
	undo := refuse(m)
	subjects := burst(t, m, 12)
	eventually(t, "the spool's refusal to show", func() bool { n, _, err := m.Unspooled(); return n > 0 && err != nil })
	time.Sleep(100 * time.Millisecond) // several retries, all refused
	n, since, err := m.Unspooled()
	if n == 0 || since.IsZero() || err == nil {
		t.Fatalf("Unspooled = %d %v %v while the spool refuses writes", n, since, err)
	}
	if m.Pending() != 24 {
		t.Errorf("Pending = %d, want 24", m.Pending())
	}
	if !strings.Contains(logs.String(), "the spool refuses reports") {
		t.Errorf("no log of the refusal:\n%s", logs)
	}
	t.Logf("while the spool refuses: %d reports in memory, %d in the spool: %v", n, m.Pending()-n, err)
	undo()
	eventually(t, "every report in the spool", func() bool { n, _, _ := m.Unspooled(); return n == 0 })
	relay.SetDown(false)
	relay.WaitMessages(t, 24, waitLong)
	eventually(t, "an empty spool", func() bool { return m.Pending() == 0 })
	time.Sleep(50 * time.Millisecond) // a duplicate would come now
	delivered, dups := checkOnce(t, relay, subjects)
	t.Logf("full disk: 12 blocks + 12 warnings, %d reports spooled after the space came back, %d delivered, %d duplicates", 24, delivered, dups)
}

// TestSpoolFullInjected: the spool's writes fail with ENOSPC (injected).
func TestSpoolFullInjected(t *testing.T) {
	refusingSpool(t, filepath.Join(t.TempDir(), "spool"), func(m *notify.Mailer) func() {
		notify.SetSpoolFault(m, func(op, _ string) error {
			if op == "write" {
				return &os.PathError{Op: "write", Path: "spool", Err: syscall.ENOSPC}
			}
			return nil
		})
		return func() { notify.SetSpoolFault(m, nil) }
	})
}

// TestSpoolFullTmpfs: the spool is on a small tmpfs, filled to the last
// byte.
func TestSpoolFullTmpfs(t *testing.T) {
	dir := mountTmpfs(t, "256k")
	refusingSpool(t, filepath.Join(dir, "spool"), func(*notify.Mailer) func() {
		filler := fillDisk(t, dir)
		return func() {
			if err := os.Remove(filler); err != nil {
				t.Fatal(err)
			}
		}
	})
}

// readOnlySpool checks the two reports of one identity (its warning,
// spooled while the relay was down, and its block report, made once the
// spool was read-only): the warning is delivered but cannot be removed,
// and is not sent again; the block report waits in memory; once the spool
// is writable again, both have arrived exactly once.
func readOnlySpool(t *testing.T, spool string, readOnly func(*notify.Mailer) (undo func())) {
	relay := test.StartRelay(t, test.RelayConfig{})
	relay.SetDown(true)
	cfg := relayConfig(relay)
	cfg.Spool = spool
	cfg.SpoolRetry = 20 * time.Millisecond
	m, _ := newMailer(t, cfg)
	run(t, m)
	w := abuseReport("mallory@example.com")
	w.Kind, w.Count, w.Limit, w.Action = notify.KindWarning, 75, 100, ""
	if err := m.Enqueue(context.Background(), w); err != nil {
		t.Fatal(err)
	}
	flush(t, m)
	undo := readOnly(m)
	if err := m.Enqueue(context.Background(), abuseReport("mallory@example.com")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the block report waiting in memory", func() bool { n, _, err := m.Unspooled(); return n == 1 && err != nil })
	relay.SetDown(false)
	relay.WaitMessages(t, 1, waitLong)
	time.Sleep(200 * time.Millisecond) // many passes of the sender over the file it cannot remove
	if n := len(relay.Messages()); n != 1 {
		t.Fatalf("%d messages while the spool is read-only, want the warning once", n)
	}
	undo()
	relay.WaitMessages(t, 2, waitLong)
	eventually(t, "an empty spool", func() bool { return m.Pending() == 0 })
	time.Sleep(50 * time.Millisecond)
	checkOnce(t, relay, []string{"[rcptguard] warning mallory@example.com: 75 of 100",
		"[rcptguard] blocked mallory@example.com: 101 invalid recipients in 1h"})
}

func TestSpoolReadOnlyInjected(t *testing.T) {
	readOnlySpool(t, filepath.Join(t.TempDir(), "spool"), func(m *notify.Mailer) func() {
		notify.SetSpoolFault(m, func(op, name string) error {
			return &os.PathError{Op: op, Path: name, Err: syscall.EROFS}
		})
		return func() { notify.SetSpoolFault(m, nil) }
	})
}

func TestSpoolReadOnlyTmpfs(t *testing.T) {
	dir := mountTmpfs(t, "1m")
	readOnlySpool(t, filepath.Join(dir, "spool"), func(*notify.Mailer) func() {
		if err := syscall.Mount("", dir, "", syscall.MS_REMOUNT|syscall.MS_RDONLY, ""); err != nil {
			t.Fatalf("remount read-only: %v", err)
		}
		return func() {
			if err := syscall.Mount("", dir, "", syscall.MS_REMOUNT, ""); err != nil {
				t.Fatalf("remount read-write: %v", err)
			}
		}
	})
}

// TestUnreported: the spool's ledger tells which blocks have a report.
func TestUnreported(t *testing.T) {
	relay := test.StartRelay(t, test.RelayConfig{})
	cfg := relayConfig(relay)
	cfg.Spool = filepath.Join(t.TempDir(), "spool")
	first, _ := newMailer(t, cfg)
	// The first start with a ledger: the blocks already there predate it.
	if got, err := first.Unreported([]string{"old@example.com"}); err != nil || len(got) != 0 {
		t.Fatalf("first Unreported = %v, %v; want none", got, err)
	}
	// A block reported and sent, one spooled and not sent yet, one whose
	// report a crash lost before the spool, one unblocked since its report.
	for _, id := range []string{"sent@example.com", "spooled@example.com", "Again@example.com"} {
		if err := first.Enqueue(context.Background(), abuseReport(id)); err != nil {
			t.Fatal(err)
		}
	}
	flush(t, first)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- first.Run(ctx) }()
	relay.WaitMessages(t, 3, waitLong)
	eventually(t, "an empty spool", func() bool { return first.Pending() == 0 })
	cancel()
	<-done
	if err := first.Forget("again@example.com"); err != nil {
		t.Fatal(err)
	}
	relay.SetDown(true)
	if err := first.Enqueue(context.Background(), abuseReport("waiting@example.com")); err != nil {
		t.Fatal(err)
	}
	flush(t, first)

	second, _ := newMailer(t, cfg)
	blocked := []string{"old@example.com", "sent@example.com", "waiting@example.com", "lost@example.com", "again@example.com"}
	got, err := second.Unreported(blocked)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"lost@example.com", "again@example.com"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("Unreported = %v, want %v", got, want)
	}
	// Compacted: an identity no longer blocked leaves the ledger, and a
	// new block of it is reported.
	if got, _ := second.Unreported([]string{"lost@example.com"}); fmt.Sprint(got) != "[lost@example.com]" {
		t.Errorf("after compaction Unreported = %v", got)
	}
	if got, _ := second.Unreported([]string{"sent@example.com"}); fmt.Sprint(got) != "[sent@example.com]" {
		t.Errorf("a block made again after it left the ledger: Unreported = %v", got)
	}
}

// mountTmpfs mounts a tmpfs of the given size on a new directory and
// unmounts it at the end of the test; it skips the test where mounting is
// not permitted (not root, or no CAP_SYS_ADMIN in a container).
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size="+size+",mode=0755"); err != nil {
		t.Skipf("cannot mount a tmpfs (%v): the injected-error tests cover this case", err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(dir, syscall.MNT_DETACH) })
	return dir
}

// fillDisk writes a file in dir until the file system is full and
// returns its path.
func fillDisk(t *testing.T, dir string) string {
	t.Helper()
	path := filepath.Join(dir, "filler")
	fd, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	buf := make([]byte, 4096)
	for {
		if _, err := fd.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("filling the disk: %v", err)
			}
			return path
		}
	}
}

// TestSpoolMarkedAtCrash: a message a crash left marked as being sent
// (its end of DATA was on its way, the relay may or may not have it) is
// sent again by the next start, with the same Message-ID, and the log
// says it may be a duplicate: at least once, never lost. The others are
// sent too, and a mark without its message is cleaned up.
func TestSpoolMarkedAtCrash(t *testing.T) {
	relay := test.StartRelay(t, test.RelayConfig{})
	cfg := relayConfig(relay)
	cfg.Spool = filepath.Join(t.TempDir(), "spool")
	first, _ := newMailer(t, cfg)
	for _, id := range []string{"sending@example.com", "waiting@example.com"} {
		if err := first.Enqueue(context.Background(), abuseReport(id)); err != nil {
			t.Fatal(err)
		}
	}
	flush(t, first)
	names, _ := filepath.Glob(filepath.Join(cfg.Spool, "*.msg"))
	if len(names) != 2 {
		t.Fatalf("%d spool files", len(names))
	}
	marked, err := os.ReadFile(names[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, mark := range []string{names[0] + ".sending", filepath.Join(cfg.Spool, "0000000000000000001-gone.msg.sending")} {
		if err := os.WriteFile(mark, nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	second, logs := newMailer(t, cfg)
	run(t, second)
	relay.WaitMessages(t, 2, waitLong)
	// The mark of a send goes just after its file: both must go.
	eventually(t, "an empty spool without marks", func() bool {
		left, _ := filepath.Glob(filepath.Join(cfg.Spool, "*.sending"))
		return second.Pending() == 0 && len(left) == 0
	})
	msgs := relay.Messages()
	ids := map[string]int{}
	for _, m := range msgs {
		for _, id := range []string{"sending@example.com", "waiting@example.com"} {
			if strings.Contains(string(m.Data), id) {
				ids[id]++
			}
		}
	}
	if len(msgs) != 2 || ids["sending@example.com"] != 1 || ids["waiting@example.com"] != 1 {
		t.Errorf("%d messages, %v; want each report once", len(msgs), ids)
	}
	head, _, _ := strings.Cut(string(marked), "\n")
	var spooled struct {
		MessageID string `json:"message_id"`
	}
	if err := json.Unmarshal([]byte(head), &spooled); err != nil || spooled.MessageID == "" {
		t.Fatalf("spool header %s: %v", head, err)
	}
	for _, m := range msgs {
		msg, err := mail.ReadMessage(strings.NewReader(string(m.Data)))
		if err != nil {
			t.Fatal(err)
		}
		if id := msg.Header.Get("Message-ID"); strings.Contains(string(m.Data), "sending@example.com") && id != spooled.MessageID {
			t.Errorf("the marked report was sent again as %s, its spool file says %s", id, spooled.MessageID)
		}
	}
	if !strings.Contains(logs.String(), "the relay may have it already, it is sent again") {
		t.Errorf("no log of the message sent again:\n%s", logs)
	}
}

// TestPendingCountsOnceWhileSpooled: a report the spool writer has placed
// in the spool but not yet taken from memory is one pending report, not
// two. The writer is held at that very point (its directory sync).
func TestPendingCountsOnceWhileSpooled(t *testing.T) {
	m, _ := newMailer(t, notify.Config{
		To: []string{"abuse@example.net"}, From: "rcptguard@mail1.example.net", Relay: "127.0.0.1:1", Hostname: "mail1.example.net",
	})
	atSync := make(chan struct{})
	release := make(chan struct{})
	notify.SetSpoolFault(m, func(op, _ string) error {
		if op == "sync" {
			atSync <- struct{}{}
			<-release
		}
		return nil
	})
	if err := m.Enqueue(context.Background(), abuseReport("alice@example.com")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-atSync:
	case <-time.After(waitLong):
		t.Fatal("the spool writer did not reach its directory sync")
	}
	n, _, _ := m.Unspooled()
	pending := m.Pending()
	close(release)
	if n != 1 {
		t.Fatalf("Unspooled = %d while the writer is between the spool and memory, want 1", n)
	}
	if pending != 1 {
		t.Errorf("Pending = %d for one report in the spool and still in memory, want 1", pending)
	}
	flush(t, m)
	notify.SetSpoolFault(m, nil)
	if n := m.Pending(); n != 1 {
		t.Errorf("Pending = %d after the write, want 1", n)
	}
}
