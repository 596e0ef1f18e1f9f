package app

import (
	"bytes"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/test"
)

// TestMain lets the CLI tests run rcptguard as a process of its own: the
// test binary, executed again with RCPTGUARD_APP_MAIN=1, is rcptguard.
// The tests themselves fail the run when they wrote into rcptguard's
// system state directories (a configuration left on a default path).
func TestMain(m *testing.M) {
	if os.Getenv("RCPTGUARD_APP_MAIN") == "1" {
		os.Exit(Main(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(test.GuardSystemState(m, os.Stderr))
}

// rcptguard starts the command line args as a process; wait ends it.
func rcptguard(t *testing.T, args ...string) (*exec.Cmd, *bytes.Buffer, *bytes.Buffer) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "RCPTGUARD_APP_MAIN=1", "RCPTGUARD_CONFIG=")
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd, &out, &errOut
}

// run runs rcptguard to its end and returns its output and exit status.
func run(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	cmd, out, errOut := rcptguard(t, args...)
	code := exitCode(t, cmd.Wait())
	return out.String(), errOut.String(), code
}

func exitCode(t *testing.T, err error) int {
	t.Helper()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		t.Fatal(err)
	}
	return 0
}

func TestCLIErrors(t *testing.T) {
	bl := filepath.Join(t.TempDir(), "blocklist")
	cfg := writeConfig(t, "[blocklist]\npath = \""+bl+"\"\n[queue]\nrequests = \""+filepath.Join(filepath.Dir(bl), "hold-requests")+"\"\n")
	missing := filepath.Join(t.TempDir(), "nonexistent.toml")
	tests := []struct {
		name   string
		args   []string
		status int
		stderr []string // substrings
		not    []string // substrings that must not be there
		once   string   // a substring that must be there exactly once
	}{
		{name: "a missing file is not a usage error", args: []string{"list", "-config", missing},
			status: 2, stderr: []string{"rcptguard: config: open " + missing}, not: []string{"usage"}},
		{name: "a bad file is not a usage error", args: []string{"list", "-config", writeConfig(t, "[detector]\nlimit = -1\n")},
			status: 2, stderr: []string{"detector.limit"}, not: []string{"usage"}},
		{name: "-config without a value", args: []string{"list", "-config"},
			status: 2, once: "flag needs an argument: -config"},
		{name: "an unknown flag", args: []string{"verify", "-nosuchflag", "a@b.c"},
			status: 2, once: "flag provided but not defined: -nosuchflag"},
		{name: "a missing argument", args: []string{"block", "-config", cfg},
			status: 2, stderr: []string{"exactly one IDENTITY"}},
		{name: "an unknown command", args: []string{"frobnicate"},
			status: 2, stderr: []string{`unknown command "frobnicate"`}},
		{name: "version takes no arguments", args: []string{"version", "extra"},
			status: 2, stderr: []string{`version takes no arguments, got "extra"`}},
		{name: "flags after the argument", args: []string{"block", "alice@example.com", "-config", cfg, "-reason", "ticket 42"},
			status: 0},
		{name: "-- ends the flags", args: []string{"unblock", "-config", cfg, "--", "alice@example.com"},
			status: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, errOut, code := run(t, tt.args...)
			if code != tt.status {
				t.Errorf("exit %d, want %d; stderr %q", code, tt.status, errOut)
			}
			for _, s := range tt.stderr {
				if !strings.Contains(errOut, s) {
					t.Errorf("stderr %q lacks %q", errOut, s)
				}
			}
			for _, s := range tt.not {
				if strings.Contains(errOut, s) {
					t.Errorf("stderr %q says %q", errOut, s)
				}
			}
			if tt.once != "" && strings.Count(errOut, tt.once) != 1 {
				t.Errorf("stderr %q says %q %d times, want once", errOut, tt.once, strings.Count(errOut, tt.once))
			}
		})
	}
	// The flag after the argument was taken.
	data, err := os.ReadFile(bl)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(data), "alice@example.com") {
		t.Errorf("alice is still blocked after unblock:\n%s", data)
	}
}

// TestHelpExitsZero: -h is a question, not a mistake, on every command.
func TestHelpExitsZero(t *testing.T) {
	commands := []string{"serve", "verify", "list", "block", "unblock", "health", "doctor", "held",
		"release", "purge", "queue-hold", "notify-test", "status"}
	var lines [][]string
	for _, c := range commands {
		lines = append(lines, []string{c, "-h"})
	}
	lines = append(lines, []string{"verify", "-help"}, []string{"verify", "--help"}, []string{"block", "alice", "-h"})
	for _, args := range lines {
		_, errOut, code := run(t, args...)
		if code != 0 || !strings.Contains(errOut, "usage: rcptguard "+args[0]) {
			t.Errorf("%q: exit %d, stderr %q", args, code, errOut)
		}
	}
	for _, args := range [][]string{{"-h"}, {"help"}, {"--help"}} {
		out, _, code := run(t, args...)
		if code != 0 || !strings.Contains(out, "Commands:") {
			t.Errorf("%q: exit %d, stdout %q", args, code, out)
		}
	}
}

// TestVerifyInterrupted: Ctrl-C during `verify` ends it with status 130
// and no verdict line for the addresses it did not verify.
func TestVerifyInterrupted(t *testing.T) {
	// A resolver that hears the question and never answers: verify
	// waits on it until the signal.
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	asked := make(chan struct{}, 16)
	go func() {
		buf := make([]byte, 512)
		for {
			if _, _, err := pc.ReadFrom(buf); err != nil {
				return
			}
			asked <- struct{}{}
		}
	}()
	cfg := writeConfig(t, "[callout]\nresolver = \""+pc.LocalAddr().String()+"\"\ntimeout = \"5m\"\n")
	cmd, out, errOut := rcptguard(t, "verify", "-config", cfg, "a@one.test", "b@two.test", "c@three.test")
	select {
	case <-asked:
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatalf("verify asked no DNS question; stderr %q", errOut)
	}
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if code := exitCode(t, err); code != 130 {
			t.Errorf("exit %d, want 130; stderr %q", code, errOut)
		}
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatal("verify did not end at SIGINT")
	}
	if out.Len() != 0 || errOut.Len() != 0 {
		t.Errorf("interrupted verify printed stdout %q stderr %q", out, errOut)
	}
}

// TestUsageListsEveryCommand: the synopsis `COMMAND -h` prints is in
// `rcptguard help` and in the README's Commands block, word for word, for
// every command Run knows; and neither lists a command Run does not know.
func TestUsageListsEveryCommand(t *testing.T) {
	collapse := func(s string) string { return strings.Join(strings.Fields(s), " ") }
	readme, err := os.ReadFile("../../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, block, _ := strings.Cut(string(readme), "\nCommands:\n\n```\n")
	block, _, _ = strings.Cut(block, "```")
	if block == "" {
		t.Fatal("README has no Commands block")
	}
	help, _, _ := run(t, "help")
	known := map[string]bool{"version": true}
	for _, c := range []string{"serve", "verify", "list", "block", "unblock", "status", "health", "doctor",
		"held", "release", "purge", "queue-hold", "notify-test"} {
		known[c] = true
		_, errOut, _ := run(t, c, "-h")
		first, _, _ := strings.Cut(errOut, "\n")
		synopsis, ok := strings.CutPrefix(first, "usage: rcptguard ")
		if !ok {
			t.Errorf("%s -h: %q", c, first)
			continue
		}
		if !strings.Contains(collapse(help), collapse(synopsis)) {
			t.Errorf("rcptguard help does not have %q", synopsis)
		}
		if !strings.Contains(collapse(block), "rcptguard "+collapse(synopsis)) {
			t.Errorf("README's Commands block does not have %q", "rcptguard "+synopsis)
		}
	}
	_, cmds, _ := strings.Cut(help, "Commands:\n")
	cmds, _, _ = strings.Cut(cmds, "\n\n")
	for _, l := range strings.Split(cmds, "\n") {
		if f := strings.Fields(l); len(f) > 0 && l[2] != ' ' && !known[f[0]] {
			t.Errorf("rcptguard help lists %q, which Run does not know", f[0])
		}
	}
	for _, l := range strings.Split(strings.TrimSpace(block), "\n") {
		if f := strings.Fields(l); len(f) < 2 || f[0] != "rcptguard" || !known[f[1]] {
			t.Errorf("README's Commands block has %q", l)
		}
	}
	if _, _, code := run(t, "version"); code != 0 || !strings.Contains(collapse(block), "rcptguard version") || !strings.Contains(help, "\n  version ") {
		t.Errorf("version: exit %d, or missing from help or README", code)
	}
}
