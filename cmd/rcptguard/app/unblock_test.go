package app

import (
	"context"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/blocklist"
)

func TestAutoUnblockMark(t *testing.T) {
	at := time.Date(2026, 11, 30, 22, 0, 0, 0, time.UTC)
	cases := []struct{ text, want string }{
		{"", "[auto-unblock 2026-11-30T22:00:00Z]"},
		{"rcptguard: x blocked", "[auto-unblock 2026-11-30T22:00:00Z] rcptguard: x blocked"},
	}
	for _, c := range cases {
		text := markAutoUnblock(c.text, at)
		if text != c.want {
			t.Errorf("markAutoUnblock(%q) = %q, want %q", c.text, text, c.want)
		}
		if back, ok := autoUnblockAt(text); !ok || !back.Equal(at) {
			t.Errorf("autoUnblockAt(%q) = %v %v, want %v", text, back, ok, at)
		}
	}
	for _, text := range []string{"", "blocked by hand", "[auto-unblock never]", "[auto-unblock 2026-11-30T22:00:00Z", "x [auto-unblock 2026-11-30T22:00:00Z]"} {
		if _, ok := autoUnblockAt(text); ok {
			t.Errorf("autoUnblockAt(%q) found a mark", text)
		}
	}
}

// TestAutoUnblock: a daemon's block past its mark is lifted and its count
// forgotten; a block not due yet and a block by hand stay.
func TestAutoUnblock(t *testing.T) {
	dir := t.TempDir()
	bl, _, err := blocklist.Open(blocklist.Config{Path: filepath.Join(dir, "blocklist")})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	fb := &fakeBlocklist{}
	hooks, _, err := withBlockHooks(&Config{Detector: DetectorConfig{UnblockAfter: Duration(time.Hour)}}, fb, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	h := hooks.(blockHooks)
	h.now = func() time.Time { return now.Add(-2 * time.Hour) }
	add := func(id, action string) {
		t.Helper()
		word, text, _ := strings.Cut(action, " ")
		if err := bl.Add(context.Background(), blocklist.Entry{Identity: id, Action: word, Text: text}); err != nil {
			t.Fatal(err)
		}
	}
	// The hook marks the action it passes on.
	if err := h.Block(context.Background(), "due@example.com", "HOLD", "blocked"); err != nil {
		t.Fatal(err)
	}
	add("due@example.com", fb.lastAction)
	add("later@example.com", "HOLD "+markAutoUnblock("blocked", now.Add(time.Minute)))
	add("byhand@example.com", "HOLD blocked by hand")

	var mu sync.Mutex
	var forgotten, lifted []string
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		autoUnblock(ctx, bl, 10*time.Millisecond, func() time.Time { return now }, func(ids []string) {
			// The counts go while the block still answers.
			for _, id := range ids {
				if _, ok := bl.Lookup(id); !ok {
					t.Errorf("counts of %s forgotten after its entry went", id)
				}
			}
			mu.Lock()
			forgotten = append(forgotten, ids...)
			mu.Unlock()
		}, func(id string) {
			mu.Lock()
			lifted = append(lifted, id)
			mu.Unlock()
		}, slog.New(slog.DiscardHandler))
	}()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, ok := bl.Lookup("due@example.com"); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the due block was not lifted within 5s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	<-done
	for _, id := range []string{"later@example.com", "byhand@example.com"} {
		if _, ok := bl.Lookup(id); !ok {
			t.Errorf("%s was unblocked", id)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(forgotten, []string{"due@example.com"}) || !slices.Equal(lifted, forgotten) {
		t.Errorf("forgotten %v, lifted %v, want [due@example.com] for both", forgotten, lifted)
	}
}
