// Package window counts events in a sliding window: at most max events in
// any span of the given length, not per clock minute. It keeps the times of
// the events it let through, so it is exact.
//
// It is a leaf: it imports nothing of rcptguard's. The callout's caps (per
// domain, per MX address, in all) and the detector's per-identity probe cap
// both count with it; each keeps its Events under its own lock.
package window

import (
	"slices"
	"time"
)

// Events holds the times (Unix nanoseconds) of the events let through in
// the last span, oldest first. The zero value is empty and ready. It is not
// safe for concurrent use: the owner locks.
type Events struct {
	t []int64
}

// Take counts one event at now and reports whether it stays within max
// events in the span ending at now. A refused event is not counted.
func (e *Events) Take(now int64, span time.Duration, max int) bool {
	if !e.Room(now, span, max) {
		return false
	}
	e.Add(now)
	return true
}

// Room drops the events that left the span ending at now and reports
// whether one more stays within max.
func (e *Events) Room(now int64, span time.Duration, max int) bool {
	e.Expire(now - int64(span))
	return len(e.t) < max
}

// Add counts one event at now, in time order (a clock read before another
// goroutine's may come in late).
func (e *Events) Add(now int64) {
	i := len(e.t)
	for i > 0 && e.t[i-1] > now {
		i--
	}
	e.t = slices.Insert(e.t, i, now)
}

// Expire drops the events at or before cut; with none left it gives the
// memory back.
func (e *Events) Expire(cut int64) {
	n := 0
	for n < len(e.t) && e.t[n] <= cut {
		n++
	}
	switch {
	case n == len(e.t):
		e.t = nil
	case n > 0:
		e.t = slices.Delete(e.t, 0, n)
	}
}

// Len returns the events counted (expired ones included until Expire,
// Room or Take drops them).
func (e *Events) Len() int { return len(e.t) }
