package notify

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestOpenSpoolPermissions: the spool is 0700 whether it is new or was
// left wider, a link is refused, and a write fails with the fix.
func TestOpenSpoolPermissions(t *testing.T) {
	base := t.TempDir()
	fresh := filepath.Join(base, "a", "spool")
	if _, err := openSpool(fresh); err != nil {
		t.Fatal(err)
	}
	wide := filepath.Join(base, "wide")
	if err := os.Mkdir(wide, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(wide, 0o777); err != nil {
		t.Fatal(err)
	}
	if _, err := openSpool(wide); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{fresh, wide} {
		fi, err := os.Stat(dir)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o700 {
			t.Errorf("%s: mode %04o, want 0700", dir, fi.Mode().Perm())
		}
		if names, _ := os.ReadDir(dir); len(names) != 0 {
			t.Errorf("%s: the write probe was left behind: %v", dir, names)
		}
	}
	link := filepath.Join(base, "link")
	if err := os.Symlink(wide, link); err != nil {
		t.Fatal(err)
	}
	if _, err := openSpool(link); err == nil || !strings.Contains(err.Error(), link) || !strings.Contains(err.Error(), "fix:") {
		t.Errorf("openSpool(link) = %v, want a refusal naming %s with the fix", err, link)
	}
	// A spool file that is a link is not read.
	s, _ := openSpool(wide)
	if err := os.Symlink("/etc/passwd", filepath.Join(wide, "x.msg")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.load("x.msg"); err == nil {
		t.Error("load followed a symbolic link")
	}
}
