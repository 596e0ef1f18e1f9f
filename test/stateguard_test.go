package test_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/test"
)

type runFunc func() int

func (f runFunc) Run() int { return f() }

// The guard fails a run that added entries to a guarded directory (or
// created it), passes one that only found old ones or none, keeps the
// tests' own failure, and removes nothing.
func TestGuardDirs(t *testing.T) {
	root := t.TempDir()
	state := filepath.Join(root, "state")
	requests := filepath.Join(state, "hold-requests")
	dirs := []string{state, requests}
	write := func(p string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("x\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var out strings.Builder
	// Nothing there, nothing written.
	if code := test.GuardDirs(runFunc(func() int { return 0 }), dirs, &out); code != 0 || out.Len() != 0 {
		t.Fatalf("no directories: code %d, %q", code, out.String())
	}
	// The run creates the directories and a request: both reported.
	if code := test.GuardDirs(runFunc(func() int { write(filepath.Join(requests, "hold-1.req")); return 0 }), dirs, &out); code != 1 ||
		!strings.Contains(out.String(), requests) || !strings.Contains(out.String(), "2 entries") {
		t.Fatalf("created: code %d, %q", code, out.String())
	}
	// Entries there before, even changed, and old new-named ones are not this run's.
	old := filepath.Join(requests, "hold-old.req")
	write(old)
	past := time.Now().Add(-time.Hour)
	if err := os.Chtimes(old, past, past); err != nil {
		t.Fatal(err)
	}
	out.Reset()
	moved := filepath.Join(requests, "hold-moved.req")
	if code := test.GuardDirs(runFunc(func() int {
		write(filepath.Join(requests, "hold-1.req"))
		if err := os.Rename(old, moved); err != nil { // keeps its old time
			t.Fatal(err)
		}
		return 3
	}), dirs, &out); code != 3 || out.Len() != 0 {
		t.Fatalf("nothing new: code %d, %q", code, out.String())
	}
	// A failed run stays failed with its own code.
	out.Reset()
	if code := test.GuardDirs(runFunc(func() int { write(filepath.Join(state, ".rcptguard-hold-request-1")); return 2 }), dirs, &out); code != 2 || !strings.Contains(out.String(), ".rcptguard-hold-request-1") {
		t.Fatalf("failed run: code %d, %q", code, out.String())
	}
	for _, p := range []string{moved, filepath.Join(requests, "hold-1.req"), filepath.Join(state, ".rcptguard-hold-request-1")} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("the guard removed %s: %v", p, err)
		}
	}
}
