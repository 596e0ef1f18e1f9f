package blocklist_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/blocklist"
)

// refuseWrites makes every write of the table at path fail, by putting a
// directory where its lock file goes (as a broken or full disk would, but
// also for root and without a mount); the returned function undoes it.
func refuseWrites(t *testing.T, path string) func() {
	t.Helper()
	if err := os.Mkdir(path+".lock", 0o700); err != nil {
		t.Fatal(err)
	}
	return func() {
		if err := os.Remove(path + ".lock"); err != nil {
			t.Fatal(err)
		}
	}
}

// checkPendingBlock drives one block through a disk that refuses writes:
// Block returns within the bound with a *WriteError, the block holds in
// memory, Blocked answers at once, Health reports it; once the disk is
// back, Watch writes it, Health is clear and a new process sees it.
func checkPendingBlock(t *testing.T, path string, refuse func() (undo func())) {
	const wait = 150 * time.Millisecond
	f, _, err := blocklist.Open(blocklist.Config{Path: path, Logger: testLogger(t), WriteWait: wait})
	if err != nil {
		t.Fatal(err)
	}
	undo := refuse()
	start := time.Now()
	err = f.Block(context.Background(), "Spammer@Example.com", "hold", "rcptguard: spammer@example.com blocked: 3 invalid recipients within 1h")
	took := time.Since(start)
	var we *blocklist.WriteError
	if !errors.As(err, &we) {
		t.Fatalf("Block on a refusing disk: %v, want a *WriteError", err)
	}
	if took > wait+500*time.Millisecond {
		t.Errorf("Block took %v on a refusing disk, the bound is %v", took, wait)
	}
	start = time.Now()
	a, ok := f.Blocked("spammer@example.com")
	if !ok || a != "HOLD rcptguard: spammer@example.com blocked: 3 invalid recipients within 1h" {
		t.Errorf("Blocked = %q %v", a, ok)
	}
	if took := time.Since(start); took > wait/2 {
		t.Errorf("Blocked waited %v while the disk refuses writes", took)
	}
	time.Sleep(wait) // the entry is now older than the wait
	h := f.Health()
	if h.Unwritten != 1 || h.Err == nil || h.Since.IsZero() {
		t.Errorf("Health while the disk refuses = %+v, want 1 unwritten with an error", h)
	}
	if data, _ := os.ReadFile(path); strings.Contains(string(data), "spammer@example.com") {
		t.Fatalf("the entry is on disk although the write failed: %q", data)
	}

	undo()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.Watch(ctx, 50*time.Millisecond) }()
	deadline := time.Now().Add(5 * time.Second)
	for f.Health().Unwritten > 0 || f.Pending() > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the pending block is not written 5s after the disk came back: %+v", f.Health())
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	<-done
	if h := f.Health(); h != (blocklist.Health{}) {
		t.Errorf("Health after the write = %+v, want zero", h)
	}
	again := open(t, path)
	if e, ok := again.Lookup("spammer@example.com"); !ok || e.Line == 0 {
		t.Errorf("after a restart the block is %+v %v, want it on disk", e, ok)
	}
	// Now that writes work, Block waits for the disk and succeeds.
	if err := f.Block(context.Background(), "next@example.com", "HOLD", ""); err != nil {
		t.Errorf("Block on a working disk: %v", err)
	}
	if e, ok := f.Lookup("next@example.com"); !ok || e.Line == 0 {
		t.Errorf("Block returned before the entry was on disk: %+v", e)
	}
}

func TestBlockPendingUntilWritten(t *testing.T) {
	path := filepath.Join(t.TempDir(), "blocklist")
	checkPendingBlock(t, path, func() func() { return refuseWrites(t, path) })
}

// TestBlockFullDisk fills a small tmpfs: the block waits at most the
// bound, stays pending, and is written once space is freed.
func TestBlockFullDisk(t *testing.T) {
	dir := mountTmpfs(t, "64k")
	path := filepath.Join(dir, "blocklist")
	checkPendingBlock(t, path, func() func() {
		filler := fillDisk(t, dir)
		return func() {
			if err := os.Remove(filler); err != nil {
				t.Fatal(err)
			}
		}
	})
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
