package queue

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestRequestRoundTrip(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "requests")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	r := Requester{Dir: dir}
	for _, id := range []string{"spammer@customer.test", "Spammer@Customer.test", "other@customer.test"} {
		if err := r.Request(id); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.Request("bad id\nnamed"); err == nil {
		t.Fatal("Request accepted an identity with white space")
	}
	now := time.Now()
	reqs, problems, err := TakeRequests(dir, now, time.Hour)
	if err != nil || len(problems) != 0 {
		t.Fatalf("TakeRequests: %v %v", err, problems)
	}
	if len(reqs) != 2 {
		t.Fatalf("got %d requests, want 2 (one per identity, case-insensitively): %+v", len(reqs), reqs)
	}
	for _, q := range reqs {
		if q.Time.After(now) || now.Sub(q.Time) > time.Minute {
			t.Errorf("request time %v, want about %v", q.Time, now)
		}
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Errorf("requests left after TakeRequests: %v", left)
	}
	if left, _ := os.ReadDir(filepath.Dir(dir)); len(left) != 1 {
		t.Errorf("temporary files left beside the request directory: %v", left)
	}
}

// TestTakeRequestsRefuses: everything that is not a fresh, well-formed
// request file is refused and removed, and symbolic links and FIFOs are
// never opened.
func TestTakeRequestsRefuses(t *testing.T) {
	dir := t.TempDir()
	outside := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(outside, []byte("victim@customer.test\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	write := func(name, content string, mtime time.Time) {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, mtime, mtime); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now()
	write("hold-stale.req", "old@customer.test\n", now.Add(-2*time.Hour))
	write("hold-two.req", "a@customer.test\nb@customer.test\n", now)
	write("hold-noeol.req", "a@customer.test", now)
	write("hold-big.req", strings.Repeat("a", 2000)+"\n", now)
	write("hold-space.req", "a b\n", now)
	write("other-name", "a@customer.test\n", now)
	write(".hidden", "a@customer.test\n", now)
	write("hold-future.req", "future@customer.test\n", now.Add(time.Hour))
	if err := os.Symlink(outside, filepath.Join(dir, "hold-link.req")); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(filepath.Join(dir, "hold-fifo.req"), 0o644); err != nil {
		t.Fatal(err)
	}
	reqs, problems, err := TakeRequests(dir, now, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	// Only the future-dated request is accepted, dated now.
	if len(reqs) != 1 || reqs[0].Identity != "future@customer.test" || !reqs[0].Time.Equal(now) {
		t.Fatalf("accepted %+v, want only future@customer.test dated now", reqs)
	}
	if len(problems) != 9 {
		t.Errorf("%d problems, want 9 (stale, two, noeol, big, space, other-name, hidden, link, fifo):\n%v", len(problems), problems)
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Errorf("left in the directory: %v, want nothing", left)
	}
	if b, err := os.ReadFile(outside); err != nil || string(b) != "victim@customer.test\n" {
		t.Errorf("the link's target was changed: %q %v", b, err)
	}
}

func TestTakeRequestsNotADirectory(t *testing.T) {
	dir := t.TempDir()
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(dir, link); err != nil {
		t.Fatal(err)
	}
	if _, _, err := TakeRequests(link, time.Now(), time.Hour); err == nil {
		t.Error("TakeRequests followed a symbolic link to a directory")
	}
}

func TestCappedBuffer(t *testing.T) {
	c := &cappedBuffer{max: 4}
	if n, err := c.Write([]byte("abcdef")); n != 4 || err == nil || c.buf.String() != "abcd" {
		t.Errorf("capped: %d %v %q", n, err, c.buf.String())
	}
	s := &cappedBuffer{max: 4, swallow: true}
	if n, err := s.Write([]byte("abcdef")); n != 6 || err != nil || s.buf.String() != "abcd" {
		t.Errorf("swallowing: %d %v %q", n, err, s.buf.String())
	}
}

// A dead writer's temporary files are removed once stale; fresh ones
// (a live writer's), other names, symbolic links (and their targets) and
// directories stay.
func TestRemoveStaleTemps(t *testing.T) {
	parent := t.TempDir()
	dir := filepath.Join(parent, "requests")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	old := now.Add(-2 * StaleTempAge)
	mk := func(name string, mtime time.Time) string {
		t.Helper()
		p := filepath.Join(parent, name)
		if err := os.WriteFile(p, []byte("x@y.test\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, mtime, mtime); err != nil {
			t.Fatal(err)
		}
		return p
	}
	stale := mk(tempPrefix+"1-aa", old)
	fresh := mk(tempPrefix+"2-bb", now)
	other := mk("rcptguard-hold-request-3", old)     // not the exact prefix
	target := mk("blocklist", old)                   // what a link points at
	link := filepath.Join(parent, tempPrefix+"4-cc") // a symbolic link with the prefix
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	sub := filepath.Join(parent, tempPrefix+"5-dd")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(sub, old, old); err != nil {
		t.Fatal(err)
	}
	removed, err := RemoveStaleTemps(dir, now)
	if err != nil {
		t.Fatal(err)
	}
	if len(removed) != 1 || removed[0] != filepath.Base(stale) {
		t.Fatalf("removed %q, want only %s", removed, filepath.Base(stale))
	}
	if _, err := os.Lstat(stale); !os.IsNotExist(err) {
		t.Errorf("stale temp file still there: %v", err)
	}
	for _, p := range []string{fresh, other, target, link, sub} {
		if _, err := os.Lstat(p); err != nil {
			t.Errorf("%s removed: %v", p, err)
		}
	}
	// No parent directory: an error, nothing else.
	if _, err := RemoveStaleTemps(filepath.Join(parent, "none", "requests"), now); err == nil {
		t.Error("no error for a missing directory")
	}
}

// A request that cannot be renamed into place leaves no temporary file.
func TestRequestFailureLeavesNoTemp(t *testing.T) {
	parent := t.TempDir()
	r := Requester{Dir: filepath.Join(parent, "missing")} // the rename fails
	if err := r.Request("spammer@customer.test"); err == nil {
		t.Fatal("request into a missing directory succeeded")
	}
	left, err := filepath.Glob(filepath.Join(parent, tempPrefix+"*"))
	if err != nil || len(left) != 0 {
		t.Fatalf("temporary files left: %v %v", left, err)
	}
}
