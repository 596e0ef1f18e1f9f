package detector

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// testGroup is a group this process may give its files: as root any, so
// the nobody/nogroup gid 65534; otherwise one of its own.
func testGroup() int {
	if os.Geteuid() == 0 {
		return 65534
	}
	return os.Getgid()
}

func statGID(t *testing.T, path string) (int, os.FileMode) {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	return int(fi.Sys().(*syscall.Stat_t).Gid), fi.Mode()
}

// TestListenSocketGroup: the socket's missing directory is made 0750 with
// the group, and the socket gets the group and the mode.
func TestListenSocketGroup(t *testing.T) {
	gid := testGroup()
	dir := filepath.Join(t.TempDir(), "rcptguard")
	path := filepath.Join(dir, "policy.sock")
	ln, err := ListenConfig{SocketMode: 0o660, SocketGroup: strconv.Itoa(gid)}.Listen("unix:" + path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if g, mode := statGID(t, dir); g != gid || mode.Perm() != 0o750 || !mode.IsDir() {
		t.Errorf("directory: group %d mode %v, want %d and 0750", g, mode, gid)
	}
	if g, mode := statGID(t, path); g != gid || mode.Perm() != 0o660 || mode&os.ModeSocket == 0 {
		t.Errorf("socket: group %d mode %v, want %d and 0660", g, mode, gid)
	}
	ln.Close()
	// A second start finds the directory and reuses it.
	ln, err = ListenConfig{SocketMode: 0o660, SocketGroup: strconv.Itoa(gid)}.Listen("unix:" + path)
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
}

// TestListenSetgidDirectory: in a setgid directory the socket inherits
// the group, so no chown is needed (the daemon need not be in the group).
func TestListenSetgidDirectory(t *testing.T) {
	gid := testGroup()
	dir := filepath.Join(t.TempDir(), "rcptguard")
	if err := os.Mkdir(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, -1, gid); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o2750); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "policy.sock")
	ln, err := ListenConfig{SocketMode: 0o660, SocketGroup: strconv.Itoa(gid)}.Listen("unix:" + path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if g, _ := statGID(t, path); g != gid {
		t.Errorf("socket group %d, want %d", g, gid)
	}
}

// TestListenRefusesOpenDirectory: a socket directory every user may write
// to is refused, sticky bit or not; an unknown group too.
func TestListenRefusesOpenDirectory(t *testing.T) {
	for _, mode := range []os.FileMode{0o777, 0o1777} {
		dir := filepath.Join(t.TempDir(), "open")
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, mode); err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, "policy.sock")
		_, err := ListenConfig{SocketMode: 0o660}.Listen("unix:" + path)
		if err == nil || !strings.Contains(err.Error(), "writable by every user") || !strings.Contains(err.Error(), "fix:") {
			t.Errorf("mode %v: Listen = %v, want a refusal with the fix", mode, err)
		}
		if _, err := os.Lstat(path); err == nil {
			t.Errorf("mode %v: socket created", mode)
		}
	}
	path := filepath.Join(t.TempDir(), "policy.sock")
	_, err := ListenConfig{SocketGroup: "no-such-group-rcptguard"}.Listen("unix:" + path)
	if err == nil || !strings.Contains(err.Error(), "no-such-group-rcptguard") {
		t.Errorf("unknown group: Listen = %v", err)
	}
}
