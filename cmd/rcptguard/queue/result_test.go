package queue

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestResultRoundTrip(t *testing.T) {
	dir := t.TempDir()
	t0 := time.Date(2026, 11, 29, 23, 0, 0, 0, time.UTC)
	msgs := []Message{
		{ID: "4Xk2Lf1ZqQRz9vWx", Arrival: t0.Add(-47 * time.Minute), Size: 2817, Recipients: 3, Subject: "x"},
		{ID: "3F2B7C10D4", Arrival: t0.Add(-2 * time.Minute), Size: 1024, Recipients: 1},
	}
	want := NewHoldResult("-spammer@customer.test", t0, t0.Add(2*time.Second), msgs)
	if err := WriteResult(dir, want); err != nil {
		t.Fatal(err)
	}
	if err := WriteResult(dir, NewHoldResult("other@customer.test", t0, t0, msgs[:1])); err != nil {
		t.Fatal(err)
	}
	got, problems, err := TakeResults(dir, time.Now())
	if err != nil || len(problems) != 0 {
		t.Fatalf("TakeResults: %v %v", err, problems)
	}
	if len(got) != 2 {
		t.Fatalf("got %d results, want 2: %+v", len(got), got)
	}
	var r HoldResult
	for _, g := range got {
		if g.Identity == want.Identity {
			r = g
		}
	}
	if r.Count != 2 || len(r.Held) != 2 || !r.Requested.Equal(t0) || !r.Done.Equal(t0.Add(2*time.Second)) {
		t.Fatalf("read back %+v, want %+v", r, want)
	}
	for i, h := range r.Held {
		w := want.Held[i]
		if h.ID != w.ID || !h.Arrival.Equal(w.Arrival) || h.Size != w.Size || h.Recipients != w.Recipients {
			t.Errorf("message %d: %+v, want %+v", i, h, w)
		}
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Errorf("left after TakeResults: %v", left)
	}
	// Taken once: a second call finds nothing.
	if again, _, _ := TakeResults(dir, time.Now()); len(again) != 0 {
		t.Errorf("results returned twice: %+v", again)
	}
}

func TestNewHoldResultCapsTheList(t *testing.T) {
	msgs := make([]Message, MaxResultHeld+5)
	for i := range msgs {
		msgs[i] = Message{ID: "ABCDEF0123", Size: 1}
	}
	r := NewHoldResult("a@customer.test", time.Now(), time.Now(), msgs)
	if len(r.Held) != MaxResultHeld || r.Count != MaxResultHeld+5 {
		t.Fatalf("%d listed, count %d", len(r.Held), r.Count)
	}
	dir := t.TempDir()
	if err := WriteResult(dir, r); err != nil {
		t.Fatal(err)
	}
	got, problems, err := TakeResults(dir, time.Now())
	if err != nil || len(problems) != 0 || len(got) != 1 || got[0].Count != MaxResultHeld+5 || len(got[0].Held) != MaxResultHeld {
		t.Fatalf("%d results, problems %v, err %v", len(got), problems, err)
	}
}

// TestWriteResultRefusesALink: root never writes through a symbolic link
// the directory's owner put in the directory's place.
func TestWriteResultRefusesALink(t *testing.T) {
	target := t.TempDir()
	link := filepath.Join(t.TempDir(), "hold-results")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	r := NewHoldResult("a@customer.test", time.Now(), time.Now(), nil)
	if err := WriteResult(link, r); err == nil {
		t.Error("WriteResult wrote through a symbolic link")
	}
	if err := WriteResult(filepath.Join(t.TempDir(), "missing"), r); err == nil {
		t.Error("WriteResult wrote into a missing directory")
	}
	if left, _ := os.ReadDir(target); len(left) != 0 {
		t.Errorf("written in the link's target: %v", left)
	}
	if err := WriteResult(target, HoldResult{Identity: "a b"}); err == nil {
		t.Error("WriteResult accepted an identity with white space")
	}
	if err := WriteResult(target, HoldResult{Identity: "a@customer.test", Held: []HeldMessage{{ID: "-rf"}}}); err == nil {
		t.Error("WriteResult accepted a queue ID that is not one")
	}
}

// TestTakeResultsRefuses: everything that is not a well-formed result
// file is removed and described, never reported; symbolic links and FIFOs
// are never opened; a fresh temporary file is left for its writer.
func TestTakeResultsRefuses(t *testing.T) {
	dir := t.TempDir()
	outside := filepath.Join(t.TempDir(), "secret")
	good := `{"version":1,"identity":"victim@customer.test","requested":"2026-11-29T23:00:00Z","done":"2026-11-29T23:00:02Z","count":1,"held":[{"id":"ABCDEF0123","arrival":"2026-11-29T22:00:00Z","size":10,"recipients":1}]}` + "\n"
	if err := os.WriteFile(outside, []byte(good), 0o600); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
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
	swap := func(old, new string) string { return strings.Replace(good, old, new, 1) }
	write("held-good.json", good, now)
	write("held-version.json", swap(`"version":1`, `"version":2`), now)
	write("held-unknown.json", swap(`"count":1`, `"count":1,"op":"release"`), now)
	write("held-badid.json", swap(`ABCDEF0123`, `-rf`), now)
	write("held-space.json", swap(`victim@customer.test`, `victim@customer.test\n`), now)
	write("held-negative.json", swap(`"size":10`, `"size":-10`), now)
	write("held-count.json", swap(`"count":1`, `"count":0`), now)
	write("held-notime.json", swap(`"requested":"2026-11-29T23:00:00Z",`, ``), now)
	write("held-trailing.json", good+"{}", now)
	write("held-big.json", good+strings.Repeat(" ", maxResultSize), now)
	write("other-name", good, now)
	write(".tmp-held-fresh.json", good, now)
	write(".tmp-held-stale.json", good, now.Add(-2*time.Hour))
	if err := os.Symlink(outside, filepath.Join(dir, "held-link.json")); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(filepath.Join(dir, "held-fifo.json"), 0o644); err != nil {
		t.Fatal(err)
	}
	got, problems, err := TakeResults(dir, now)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Identity != "victim@customer.test" || got[0].Held[0].ID != "ABCDEF0123" {
		t.Fatalf("accepted %+v, want only held-good.json", got)
	}
	if len(problems) != 13 {
		t.Errorf("%d problems, want 13 (all but good and the fresh temporary file):\n%v", len(problems), problems)
	}
	left, _ := os.ReadDir(dir)
	if len(left) != 1 || left[0].Name() != ".tmp-held-fresh.json" {
		t.Errorf("left in the directory: %v, want only the fresh temporary file", left)
	}
	if b, err := os.ReadFile(outside); err != nil || string(b) != good {
		t.Errorf("the link's target was changed: %q %v", b, err)
	}
}
