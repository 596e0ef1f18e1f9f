package app

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
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
	cfg := writeConfig(t, fmt.Sprintf("[blocklist]\npath = %q\n[queue]\nrequests = %q\n", path, filepath.Join(filepath.Dir(path), "hold-requests")))
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
	cfg := writeConfig(t, fmt.Sprintf("[blocklist]\npath = %q\n[queue]\nrequests = %q\n", path, filepath.Join(filepath.Dir(path), "hold-requests")))
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
	cfg := writeConfig(t, fmt.Sprintf("[blocklist]\npath = %q\n[queue]\nrequests = %q\n", path, filepath.Join(filepath.Dir(path), "hold-requests")))
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
	wants := []string{"not blocked", path}
	if runtime.GOOS == "linux" { // where the holder can be found
		wants = append(wants, fmt.Sprintf("held by pid %d", os.Getpid()))
	}
	for _, want := range wants {
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

// TestPasswordFileReadableByAllWarns: a relay password every local user
// can read is a start-up warning naming the file and the fix; a private
// one is not.
func TestPasswordFileReadableByAllWarns(t *testing.T) {
	for _, tt := range []struct {
		mode os.FileMode
		warn bool
	}{{0o644, true}, {0o600, false}, {0o640, false}} {
		dir := t.TempDir()
		pw := filepath.Join(dir, "password")
		if err := os.WriteFile(pw, []byte("secret\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(pw, tt.mode); err != nil {
			t.Fatal(err)
		}
		cfg, err := LoadConfig(writeConfig(t, fmt.Sprintf("[notify]\nto = [\"abuse@example.com\"]\nusername = \"u\"\npassword_file = %q\nspool = %q\n", pw, filepath.Join(dir, "spool"))))
		if err != nil {
			t.Fatal(err)
		}
		var logs bytes.Buffer
		if _, err := newMailer(cfg, slog.New(slog.NewTextHandler(&logs, nil)), true); err != nil {
			t.Fatal(err)
		}
		got := strings.Contains(logs.String(), "readable by every user") && strings.Contains(logs.String(), pw) && strings.Contains(logs.String(), "chmod")
		if got != tt.warn {
			t.Errorf("mode %04o: warned %v, want %v; log:\n%s", tt.mode, got, tt.warn, logs.String())
		}
		if fi, err := os.Stat(filepath.Join(dir, "spool")); err != nil || fi.Mode().Perm() != 0o700 {
			t.Errorf("spool: %v, %v; want a 0700 directory", fi, err)
		}
	}
}

// TestBlockRefusesWhatNeverMatches: block takes only identities a policy
// request can have, says what they look like, and a second block keeps
// the first reason unless -reason gives a new one.
func TestBlockRefusesWhatNeverMatches(t *testing.T) {
	bl := filepath.Join(t.TempDir(), "blocklist")
	cfg := writeConfig(t, fmt.Sprintf("[blocklist]\npath = %q\n[queue]\nrequests = %q\n[detector]\nrelay_networks = [\"192.0.2.0/24\", \"2001:db8::/32\"]\n", bl, filepath.Join(filepath.Dir(bl), "hold-requests")))
	tests := []struct {
		args []string
		want string // "" for blocked, else a substring of the error
	}{
		{[]string{"1.2.3.4/24"}, "a network is not an identity"},
		{[]string{"user@"}, "a part around '@' is empty"},
		{[]string{"@example.com"}, "a part around '@' is empty"},
		{[]string{"not-an-address"}, "needs -login"},
		{[]string{"user@bad domain"}, "white space"},
		{[]string{"user@exa/mple.com"}, "not a domain"},
		{[]string{"198.51.100.7"}, "only inside detector.relay_networks"},
		{[]string{"::ffff:192.0.2.7"}, "written 192.0.2.7 by Postfix"},
		{[]string{"2001:DB8::7"}, ""}, // folded to the form Postfix writes
		{[]string{"192.0.2.7"}, ""},
		{[]string{"-login", "not-an-address"}, ""},
		{[]string{"Alice@Example.com"}, ""},
	}
	for _, tt := range tests {
		var stdout, stderr bytes.Buffer
		err := Run(context.Background(), append([]string{"block", "-config", cfg}, tt.args...), &stdout, &stderr)
		switch {
		case tt.want == "" && err != nil:
			t.Errorf("%q: %v", tt.args, err)
		case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
			t.Errorf("%q: error %v, want %q", tt.args, err, tt.want)
		case tt.want != "" && !strings.Contains(err.Error(), "identities are a SASL login") && !strings.Contains(err.Error(), "by Postfix") && !strings.Contains(err.Error(), "relay_networks ("):
			t.Errorf("%q: error %v does not say what identities look like", tt.args, err)
		}
	}
	// Blocked again without -reason: the reason stays; with -reason it changes.
	block := func(args ...string) string {
		t.Helper()
		var stdout, stderr bytes.Buffer
		if err := Run(context.Background(), append([]string{"block", "-config", cfg}, args...), &stdout, &stderr); err != nil {
			t.Fatal(err)
		}
		f, _, err := blocklist.Open(blocklist.Config{Path: bl})
		if err != nil {
			t.Fatal(err)
		}
		e, _ := f.Lookup("bob@example.com")
		return e.Text
	}
	if got := block("-reason", "ticket 7", "bob@example.com"); got != "ticket 7" {
		t.Fatalf("reason %q", got)
	}
	if got := block("bob@example.com"); got != "ticket 7" {
		t.Errorf("blocked again without -reason: reason %q, want the first one", got)
	}
	if got := block("bob@example.com", "-reason", "ticket 8"); got != "ticket 8" {
		t.Errorf("blocked again with -reason: reason %q", got)
	}
}
