package window_test

import (
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/callout/window"
)

func TestEventsSliding(t *testing.T) {
	var e window.Events
	start := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC).UnixNano()
	sec := int64(time.Second)
	// Three a minute: three at 0s, 20s, 40s; a fourth at 50s is refused
	// and not counted.
	for i, tc := range []struct {
		at   int64
		want bool
	}{
		{0, true}, {20, true}, {40, true}, {50, false},
		{60, true},  // the one at 0s left the window (at or before the cut)
		{61, false}, // 20s, 40s, 60s are in it
		{80, true},  // 20s left
		{200, true}, // all gone
	} {
		if got := e.Take(start+tc.at*sec, time.Minute, 3); got != tc.want {
			t.Fatalf("step %d (t=%ds): Take %v, want %v", i, tc.at, got, tc.want)
		}
	}
	if e.Len() != 1 {
		t.Fatalf("Len %d, want 1", e.Len())
	}
	e.Expire(start + 300*sec)
	if e.Len() != 0 {
		t.Fatalf("Len %d after Expire, want 0", e.Len())
	}
}

func TestEventsOutOfOrder(t *testing.T) {
	var e window.Events
	sec := int64(time.Second)
	e.Add(10 * sec)
	e.Add(5 * sec) // a late clock read
	e.Add(12 * sec)
	// The cut at 6s must drop the 5s event even though it came second.
	e.Expire(6 * sec)
	if e.Len() != 2 {
		t.Fatalf("Len %d, want 2", e.Len())
	}
	if e.Room(12*sec, time.Minute, 2) {
		t.Fatal("room for a third with a cap of two")
	}
}

func TestEventsZeroMax(t *testing.T) {
	var e window.Events
	if e.Take(1, time.Minute, 0) {
		t.Fatal("a cap of 0 let an event through")
	}
}
