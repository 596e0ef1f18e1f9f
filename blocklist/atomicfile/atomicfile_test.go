package atomicfile_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rcptguard/rcptguard/blocklist/atomicfile"
)

func TestWrite(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	if err := os.WriteFile(path, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	fi, err := atomicfile.Write(path, ".f.tmp-*", 0o644, []byte("new content"))
	if err != nil {
		t.Fatal(err)
	}
	if err := atomicfile.SyncDir(dir); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil || string(got) != "new content" {
		t.Fatalf("content %q, %v", got, err)
	}
	now, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(fi, now) || now.Mode().Perm() != 0o644 || fi.Size() != int64(len("new content")) {
		t.Fatalf("FileInfo %v %v, file %v %v", fi.Mode(), fi.Size(), now.Mode(), now.Size())
	}
	des, _ := os.ReadDir(dir)
	if len(des) != 1 {
		t.Fatalf("directory holds %d entries, want only the file", len(des))
	}
}

func TestWriteFailsCleanly(t *testing.T) {
	dir := t.TempDir()
	// The target is a non-empty directory: the rename fails, and the
	// temporary file must not stay behind.
	path := filepath.Join(dir, "d")
	if err := os.MkdirAll(filepath.Join(path, "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := atomicfile.Write(path, ".d.tmp-*", 0o644, []byte("x")); err == nil {
		t.Fatal("rename over a non-empty directory succeeded")
	}
	des, _ := os.ReadDir(dir)
	for _, de := range des {
		if strings.HasPrefix(de.Name(), ".d.tmp-") {
			t.Fatalf("temporary file %s left behind", de.Name())
		}
	}
	if _, err := atomicfile.Write(filepath.Join(dir, "missing", "f"), "t-*", 0o644, nil); err == nil {
		t.Fatal("write into a missing directory succeeded")
	}
	if err := atomicfile.SyncDir(filepath.Join(dir, "missing")); err == nil {
		t.Fatal("SyncDir of a missing directory succeeded")
	}
}
