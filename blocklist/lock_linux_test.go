package blocklist_test

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rcptguard/rcptguard/blocklist"
)

// holdLock takes the blocklist's lock through a descriptor of its own, as
// another rcptguard process would, and returns the release.
func holdLock(t *testing.T, path string) func() {
	t.Helper()
	fd, err := os.OpenFile(path+".lock", os.O_RDWR|os.O_CREATE, 0o660)
	if err != nil {
		t.Fatal(err)
	}
	lk := unix.Flock_t{Type: unix.F_WRLCK}
	if err := unix.FcntlFlock(fd.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
		t.Fatal(err)
	}
	return func() { fd.Close() }
}

// TestLockWaitHonoursContext holds the lock as another process would and
// checks that Add gives up when its context ends, naming the holder, and
// Flush works later.
func TestLockWaitHonoursContext(t *testing.T) {
	path := filepath.Join(t.TempDir(), "blocklist")
	f := open(t, path)
	release := holdLock(t, path)
	blocklist.ResetHolderScan()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	err := f.Add(ctx, blocklist.Entry{Identity: "a@example.com", Action: "HOLD"})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Add = %v, want DeadlineExceeded", err)
	}
	// The holder is this very process, through another descriptor.
	if want := fmt.Sprintf("held by pid %d (", os.Getpid()); !strings.Contains(err.Error(), want) {
		t.Errorf("Add = %v, want it to say %q", err, want)
	}
	var we *blocklist.WriteError
	if !errors.As(err, &we) || we.Path != path || we.Pending != 1 {
		t.Errorf("Add = %#v, want a *WriteError for %s with 1 pending", err, path)
	}
	checkPending(t, f, path, "a@example.com")
	// A second timeout soon after does not search /proc again.
	ctx2, cancel2 := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel2()
	if err := f.Flush(ctx2); err == nil || strings.Contains(err.Error(), "held by pid") {
		t.Errorf("second timeout: %v, want one that names no pid", err)
	}
	release()
	if err := f.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	if f.Pending() != 0 || !strings.Contains(readFile(t, path), "a@example.com\tHOLD\n") {
		t.Error("Flush did not write the entry")
	}
}

// TestLockNeedsWriteAccess: the lock file is 0660, and a descriptor open
// only for reading cannot take the lock, so a user who can merely read the
// file cannot stall the writers.
func TestLockNeedsWriteAccess(t *testing.T) {
	path := filepath.Join(t.TempDir(), "blocklist")
	f := open(t, path)
	if err := f.Add(context.Background(), blocklist.Entry{Identity: "a@example.com", Action: "HOLD"}); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path + ".lock")
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o660 {
		t.Errorf("lock file mode %04o, want 0660", fi.Mode().Perm())
	}
	ro, err := os.Open(path + ".lock")
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK}
	if err := unix.FcntlFlock(ro.Fd(), unix.F_OFD_SETLK, &lk); !errors.Is(err, unix.EBADF) {
		t.Errorf("write lock through a read-only descriptor: %v, want EBADF", err)
	}
}

// TestLockFileNarrowed: a lock file left readable and writable by all (by
// an older version, or by hand) is narrowed to 0660 by its owner.
func TestLockFileNarrowed(t *testing.T) {
	path := filepath.Join(t.TempDir(), "blocklist")
	if err := os.WriteFile(path+".lock", nil, 0o666); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path+".lock", 0o666); err != nil {
		t.Fatal(err)
	}
	f := open(t, path)
	if err := f.Add(context.Background(), blocklist.Entry{Identity: "a@example.com", Action: "HOLD"}); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(path + ".lock"); fi.Mode().Perm() != 0o660 {
		t.Errorf("lock file mode %04o, want 0660", fi.Mode().Perm())
	}
}

// TestSymlinksNotFollowed: a link planted at the blocklist or its lock file
// is refused, never written through.
func TestSymlinksNotFollowed(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "target")
	if err := os.WriteFile(target, []byte("victim@example.com\tHOLD\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Run("blocklist", func(t *testing.T) {
		path := filepath.Join(dir, "bl1")
		if err := os.Symlink(target, path); err != nil {
			t.Fatal(err)
		}
		_, _, err := blocklist.Open(blocklist.Config{Path: path})
		if err == nil || !strings.Contains(err.Error(), "symbolic link") || !strings.Contains(err.Error(), path) {
			t.Fatalf("Open = %v, want a symbolic link error naming %s", err, path)
		}
	})
	t.Run("lock", func(t *testing.T) {
		path := filepath.Join(dir, "bl2")
		if err := os.Symlink(target, path+".lock"); err != nil {
			t.Fatal(err)
		}
		f := open(t, path)
		err := f.Add(context.Background(), blocklist.Entry{Identity: "a@example.com", Action: "HOLD"})
		if err == nil || !strings.Contains(err.Error(), "symbolic link") {
			t.Fatalf("Add = %v, want a symbolic link error", err)
		}
	})
	if got := readFile(t, target); got != "victim@example.com\tHOLD\n" {
		t.Errorf("the link's target changed: %q", got)
	}
}

// TestWorldWritableDirectoryRefused: a directory every user can write to
// (sticky or not) is refused, naming it and the fix.
func TestWorldWritableDirectoryRefused(t *testing.T) {
	for _, mode := range []fs.FileMode{0o777, 0o1777} {
		dir := filepath.Join(t.TempDir(), "state")
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, mode); err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, "blocklist")
		_, _, err := blocklist.Open(blocklist.Config{Path: path, Create: true})
		if err == nil || !strings.Contains(err.Error(), dir) || !strings.Contains(err.Error(), "writable by every user") || !strings.Contains(err.Error(), "fix:") {
			t.Errorf("mode %v: Open = %v, want a refusal naming %s and the fix", mode, err, dir)
		}
		if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("mode %v: the file was created", mode)
		}
	}
}

// TestOpenCreate: with Create, a missing file is written with the header
// only, mode 0644 whatever the umask; an existing file is left alone.
func TestOpenCreate(t *testing.T) {
	old := unix.Umask(0o077)
	defer unix.Umask(old)
	path := filepath.Join(t.TempDir(), "blocklist")
	f, problems, err := blocklist.Open(blocklist.Config{Path: path, Create: true})
	if err != nil || len(problems) > 0 || f.Len() != 0 {
		t.Fatalf("Open = %v, %v, %d entries", err, problems, f.Len())
	}
	if got := readFile(t, path); got != blocklist.Header+"\n" {
		t.Errorf("new file %q, want the header only", got)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o644 {
		t.Errorf("mode %04o, want 0644", fi.Mode().Perm())
	}
	replaceFile(t, path, "a@example.com\tHOLD\n")
	f, _, err = blocklist.Open(blocklist.Config{Path: path, Create: true})
	if err != nil || f.Len() != 1 || readFile(t, path) != "a@example.com\tHOLD\n" {
		t.Fatalf("Open of an existing file = %v, %d entries, %q", err, f.Len(), readFile(t, path))
	}
}
