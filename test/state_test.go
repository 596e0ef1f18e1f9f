package test_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/blocklist"
	"github.com/rcptguard/rcptguard/cmd/rcptguard/app"
	"github.com/rcptguard/rcptguard/test"
)

// runAsNobody runs `rcptguard ARGS` (this test binary, see TestMain) as the
// user nobody and returns its output and exit status. It needs root.
func runAsNobody(t *testing.T, args ...string) (string, int) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a command as another user")
	}
	u, err := user.Lookup("nobody")
	if err != nil {
		t.Skipf("no user nobody: %v", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	bin := sharedTestBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin)
	cmd.Env = []string{"RCPTGUARD_TEST_DAEMON=1", "RCPTGUARD_TEST_ARGS=" + strings.Join(args, " "), "PATH=/usr/bin:/bin"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	cmd.Dir = "/"
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	code := cmd.ProcessState.ExitCode()
	if err != nil && code < 0 {
		t.Fatalf("rcptguard %s as nobody: %v\n%s", strings.Join(args, " "), err, out.String())
	}
	return out.String(), code
}

// sharedTestBinary copies this test binary (which is rcptguard, see
// TestMain) where every user can run it, and returns its path.
func sharedTestBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(test.SharedTempDir(t), "rcptguard.test")
	src, err := os.Open(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(bin, os.O_CREATE|os.O_WRONLY, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
	return bin
}

// stateAsRoot makes a state directory as a root-run rcptguard leaves it
// (0755, owned by root, with the blocklist and its lock file) and returns
// a configuration file pointing at it.
func stateAsRoot(t *testing.T) (config, state string) {
	t.Helper()
	state = filepath.Join(test.SharedTempDir(t), "state")
	config = filepath.Join(filepath.Dir(state), "rcptguard.toml")
	text := fmt.Sprintf("[policy]\nlisten = [\"127.0.0.1:%d\"]\n[blocklist]\npath = %q\n[notify]\nspool = %q\n[queue]\nrequests = %q\n",
		test.FreePort(t), filepath.Join(state, "blocklist"), filepath.Join(state, "spool"), filepath.Join(state, "hold-requests"))
	if err := os.WriteFile(config, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	runCLI(t, "block", "-config", config, "-reason", "by root", "first@customer.test")
	return config, state
}

// TestBlockByAUserWhoCannotWrite: block run by a user without write access
// says so, names the path and the fix, exits non-zero, and claims no
// block "in memory".
func TestBlockByAUserWhoCannotWrite(t *testing.T) {
	config, state := stateAsRoot(t)
	before, _ := os.ReadFile(filepath.Join(state, "blocklist"))
	out, code := runAsNobody(t, "block", "-config", config, "victim@customer.test")
	t.Logf("exit %d: %s", code, out)
	if code != 1 {
		t.Errorf("exit status %d, want 1", code)
	}
	for _, want := range []string{filepath.Join(state, "blocklist"), "fix:"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if strings.Contains(out, "memory") || strings.Contains(out, "blocked victim") {
		t.Errorf("output claims a block: %q", out)
	}
	if after, _ := os.ReadFile(filepath.Join(state, "blocklist")); !bytes.Equal(before, after) {
		t.Errorf("blocklist changed:\n%s", after)
	}
	// Reading is for everyone, Postfix included.
	out, code = runAsNobody(t, "list", "-config", config)
	if code != 0 || !strings.HasPrefix(out, "first@customer.test\tHOLD by root") {
		t.Errorf("list as nobody: exit %d, %q", code, out)
	}
}

// TestServeRefusesStateItCannotWrite: serve started by a user who cannot
// write the state left by a root run exits at once, naming the path and
// the fix, instead of losing its first block at shutdown.
func TestServeRefusesStateItCannotWrite(t *testing.T) {
	config, state := stateAsRoot(t)
	start := time.Now()
	out, code := runAsNobody(t, "serve", "-config", config)
	t.Logf("exit %d after %s: %s", code, time.Since(start).Round(time.Millisecond), out)
	if code == 0 {
		t.Fatal("serve ran")
	}
	if !strings.Contains(out, filepath.Join(state, "blocklist")) || !strings.Contains(out, "fix:") {
		t.Errorf("output lacks the path or the fix: %q", out)
	}
}

// TestServeCreatesTheBlocklist: from an empty state directory, serve
// leaves the table Postfix reads (header only, 0644) and a 0660 lock file.
func TestServeCreatesTheBlocklist(t *testing.T) {
	w := newWorld(t)
	startDaemon(t, w.config(t, ""))
	b, err := os.ReadFile(w.blocklistPath())
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != blocklist.Header+"\n" {
		t.Errorf("blocklist %q, want the header only", b)
	}
	if fi, _ := os.Stat(w.blocklistPath()); fi.Mode().Perm() != 0o644 {
		t.Errorf("blocklist mode %04o", fi.Mode().Perm())
	}
	if fi, err := os.Stat(w.blocklistPath() + ".lock"); err != nil || fi.Mode().Perm() != 0o660 {
		t.Errorf("lock file: %v, %v", fi, err)
	}
}

// TestDoctorAsksAsPostfix: doctor asks rcptguard as Postfix's user, so a
// socket Postfix cannot open is a finding, even though root (who runs
// doctor) can open it; with policy.socket_group = "postfix" it answers.
func TestDoctorAsksAsPostfix(t *testing.T) {
	requireRealPostfix(t)
	dir := test.SharedTempDir(t)
	conf, queue := filepath.Join(dir, "conf"), filepath.Join(dir, "queue")
	for _, d := range []string{conf, queue} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	blocklistPath := filepath.Join(dir, "state", "blocklist")
	mainCF := "queue_directory = " + queue + "\ncompatibility_level = 3.6\n" +
		strings.ReplaceAll(readRepoFile(t, "contrib/postfix/main.cf"), "/var/lib/rcptguard/blocklist", blocklistPath)
	old := time.Now().Add(-time.Minute)
	for name, text := range map[string]string{"main.cf": mainCF, "master.cf": readRepoFile(t, "contrib/postfix/master.cf")} {
		p := filepath.Join(conf, name)
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		_ = os.Chtimes(p, old, old) // postconf waits for files changed in the last second
	}
	bin := sharedTestBinary(t)
	for _, tt := range []struct {
		group string
		want  string
	}{
		{"", "FAIL  rcptguard at unix:" + queue + "/rcptguard/policy.sock does not answer user postfix: health: dial unix"},
		{"postfix", "ok    rcptguard at unix:" + queue + "/rcptguard/policy.sock answers user postfix: action=DUNNO"},
	} {
		_ = os.RemoveAll(filepath.Join(queue, "rcptguard"))
		config := filepath.Join(dir, "rcptguard.toml")
		text := fmt.Sprintf("[policy]\nlisten = [\"unix:%s/rcptguard/policy.sock\"]\nsocket_group = %q\n[blocklist]\npath = %q\n[notify]\nspool = %q\n[queue]\nrequests = %q\n",
			queue, tt.group, blocklistPath, filepath.Join(dir, "state", "spool"), filepath.Join(dir, "state", "hold-requests"))
		if err := os.WriteFile(config, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		d := startDaemon(t, config)
		var stdout, stderr bytes.Buffer
		err := app.Run(context.Background(), []string{"doctor", "-config", config, "-postfix-config", conf, "-rcptguard", bin}, &stdout, &stderr)
		t.Logf("socket_group %q: %v\n%s", tt.group, err, stdout.String())
		if !strings.Contains(stdout.String(), tt.want) {
			t.Errorf("socket_group %q: no line %q", tt.group, tt.want)
		}
		if (err == nil) != (tt.group == "postfix") {
			t.Errorf("socket_group %q: doctor returned %v", tt.group, err)
		}
		d.stop()
	}
}
