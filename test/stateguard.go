package test

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// SystemStateDirs are the state directories of rcptguard's defaults
// (blocklist.path's, queue.requests and its hold-results beside it,
// notify.spool): a test must point its configuration elsewhere, into its
// own temporary directory.
var SystemStateDirs = []string{"/var/lib/rcptguard", "/var/lib/rcptguard/hold-requests", "/var/lib/rcptguard/hold-results", "/var/lib/rcptguard/spool"}

// GuardSystemState runs the tests (m.Run) and fails the run when entries
// appeared in SystemStateDirs during it: names that were not there
// before, modified since it started. Nothing is removed: what is there
// may be the machine's own. A directory that does not exist is fine, and
// one created by the run is an entry of its parent. Another process
// writing there at the same time fails the run too: the guard cannot
// tell whose an entry is, and no test may write there anyway.
func GuardSystemState(m interface{ Run() int }, stderr io.Writer) int {
	// A test binary that a guarded run executes again (a child playing
	// another user or the daemon) is covered by its parent's check: the
	// child's own would only repeat it, and fail it for its parent's
	// writes.
	if os.Getenv(StateGuardedEnv) == "1" {
		return m.Run()
	}
	_ = os.Setenv(StateGuardedEnv, "1")
	return GuardDirs(m, SystemStateDirs, stderr)
}

// StateGuardedEnv, set to "1", marks the processes a guarded test run
// started; one that starts a child with an environment of its own passes
// it on.
const StateGuardedEnv = "RCPTGUARD_TEST_STATE_GUARDED"

// GuardDirs is GuardSystemState for the directories dirs.
func GuardDirs(m interface{ Run() int }, dirs []string, stderr io.Writer) int {
	start := time.Now().Add(-time.Second) // modification times are coarse on some file systems
	before := map[string]bool{}
	for _, d := range dirs {
		for _, name := range dirNames(d) {
			before[filepath.Join(d, name)] = true
		}
	}
	code := m.Run()
	var added []string
	for _, d := range dirs {
		for _, name := range dirNames(d) {
			p := filepath.Join(d, name)
			if before[p] {
				continue
			}
			if fi, err := os.Lstat(p); err == nil && !fi.ModTime().Before(start) {
				added = append(added, p)
			}
		}
	}
	if len(added) == 0 {
		return code
	}
	n := len(added)
	if n > 10 {
		added = append(added[:10], "…")
	}
	fmt.Fprintf(stderr, "FAIL: %d entries appeared in rcptguard's system state directories during this test run "+
		"(a test configuration uses a default path; point it into the test's temporary directory): %s\n",
		n, strings.Join(added, ", "))
	return max(code, 1)
}

// dirNames returns the names in dir; none when it cannot be read.
func dirNames(dir string) []string {
	f, err := os.Open(dir)
	if err != nil {
		return nil
	}
	defer f.Close()
	names, _ := f.Readdirnames(-1)
	return names
}
