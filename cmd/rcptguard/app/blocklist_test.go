package app

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/blocklist"
	"github.com/rcptguard/rcptguard/test"
)

// TestListOnAFreshMachine: no state directory yet; list prints nothing,
// succeeds, and leaves the table Postfix reads in place.
func TestListOnAFreshMachine(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "blocklist")
	cfg := writeConfig(t, fmt.Sprintf("[blocklist]\npath = %q\n", path))
	var stdout, stderr bytes.Buffer
	if err := Run(context.Background(), []string{"list", "-config", cfg}, &stdout, &stderr); err != nil {
		t.Fatalf("list: %v\n%s", err, stderr.String())
	}
	if stdout.Len() != 0 || stderr.Len() != 0 {
		t.Errorf("list printed %q, %q; want nothing", stdout.String(), stderr.String())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != blocklist.Header+"\n" {
		t.Errorf("blocklist %q, want the header only", b)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o644 {
		t.Errorf("blocklist mode %04o, want 0644", fi.Mode().Perm())
	}
}

// TestUnblockCreatesTheFile: unblock on a fresh machine says so and leaves
// the (empty) table behind.
func TestUnblockCreatesTheFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "blocklist")
	cfg := writeConfig(t, fmt.Sprintf("[blocklist]\npath = %q\n", path))
	var stdout, stderr bytes.Buffer
	if err := Run(context.Background(), []string{"unblock", "-config", cfg, "a@example.com"}, &stdout, &stderr); err != nil {
		t.Fatal(err)
	}
	if stdout.String() != "a@example.com was not blocked\n" {
		t.Errorf("stdout %q", stdout.String())
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != blocklist.Header+"\n" {
		t.Errorf("blocklist %q, %v; want the header only", b, err)
	}
}

// TestBlockGivesUpOnAHeldLock: another process holds the lock; block
// gives up after cliLockWait, names the holder, and does not claim the
// block holds anywhere.
func TestBlockGivesUpOnAHeldLock(t *testing.T) {
	old := cliLockWait
	cliLockWait = 200 * time.Millisecond
	defer func() { cliLockWait = old }()
	path := filepath.Join(t.TempDir(), "blocklist")
	cfg := writeConfig(t, fmt.Sprintf("[blocklist]\npath = %q\n", path))
	if err := Run(context.Background(), []string{"list", "-config", cfg}, new(bytes.Buffer), new(bytes.Buffer)); err != nil {
		t.Fatal(err)
	}
	test.LockBlocklist(t, path)
	start := time.Now()
	var stdout, stderr bytes.Buffer
	err := Run(context.Background(), []string{"block", "-config", cfg, "a@example.com"}, &stdout, &stderr)
	if err == nil {
		t.Fatal("block succeeded with the lock held")
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("block gave up after %s", d)
	}
	msg := err.Error()
	for _, want := range []string{"not blocked", path, fmt.Sprintf("held by pid %d", os.Getpid())} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q lacks %q", msg, want)
		}
	}
	if strings.Contains(msg, "memory") || stdout.Len() != 0 {
		t.Errorf("block claims something: %q, stdout %q", msg, stdout.String())
	}
	if b, _ := os.ReadFile(path); strings.Contains(string(b), "a@example.com") {
		t.Errorf("blocklist changed: %q", b)
	}
}
