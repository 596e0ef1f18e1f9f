package callout

import (
	"context"
	"sync"
	"time"

	"github.com/rcptguard/rcptguard/callout/window"
)

// hostSlots bounds concurrent sessions per MX address.
type hostSlots struct {
	limit int
	mu    sync.Mutex
	used  map[string]*hostSlot
}

type hostSlot struct {
	n       int
	waiters []chan struct{}
	want    chan struct{} // closed when someone has to wait for a slot
}

// closedChan is always ready.
var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// wanted returns a channel that is closed once somebody waits for a slot
// to host, so that a holder idling on its slot can give it up.
func (hs *hostSlots) wanted(host string) <-chan struct{} {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	s := hs.used[host]
	switch {
	case s == nil:
		return nil
	case len(s.waiters) > 0:
		return closedChan
	case s.want == nil:
		s.want = make(chan struct{})
	}
	return s.want
}

// acquire takes a slot for host, waiting for one until ctx ends.
func (hs *hostSlots) acquire(ctx context.Context, host string) error {
	hs.mu.Lock()
	s := hs.used[host]
	if s == nil {
		s = &hostSlot{}
		hs.used[host] = s
	}
	if s.n < hs.limit {
		s.n++
		hs.mu.Unlock()
		return nil
	}
	ch := make(chan struct{})
	s.waiters = append(s.waiters, ch)
	if s.want != nil {
		close(s.want) // wake the holders idling on their slots
		s.want = nil
	}
	hs.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		hs.mu.Lock()
		defer hs.mu.Unlock()
		for i, w := range s.waiters {
			if w == ch {
				s.waiters = append(s.waiters[:i], s.waiters[i+1:]...)
				return ctx.Err()
			}
		}
		// The slot was handed over just as ctx ended: pass it on.
		hs.releaseLocked(host)
		return ctx.Err()
	}
}

// release gives back a slot taken by acquire.
func (hs *hostSlots) release(host string) {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	hs.releaseLocked(host)
}

func (hs *hostSlots) releaseLocked(host string) {
	s := hs.used[host]
	if s == nil {
		return
	}
	if len(s.waiters) > 0 {
		close(s.waiters[0])
		s.waiters = s.waiters[1:]
		return
	}
	s.n--
	if s.n <= 0 {
		delete(hs.used, host)
	}
}

// keyedWindow caps events per key in a sliding window (package window);
// keys with no event in the window are swept as the map grows.
type keyedWindow struct {
	per   time.Duration
	mu    sync.Mutex
	m     map[string]*window.Events
	sweep int // map size that triggers the next sweep
}

func newWindow(per time.Duration) *keyedWindow {
	return &keyedWindow{per: per, m: map[string]*window.Events{}, sweep: 1024}
}

type windowKey struct {
	key string
	max int
}

// takeAll counts one event for every key, or for none when one of them is
// at its cap, and returns the index of that key, or -1.
func (w *keyedWindow) takeAll(now time.Time, keys ...windowKey) int {
	t := now.UnixNano()
	w.mu.Lock()
	defer w.mu.Unlock()
	for n, k := range keys {
		ev := w.m[k.key]
		if ev == nil {
			ev = &window.Events{}
			w.m[k.key] = ev
		}
		if !ev.Room(t, w.per, k.max) {
			return n
		}
	}
	for _, k := range keys {
		w.m[k.key].Add(t)
	}
	if len(w.m) >= w.sweep {
		for key, ev := range w.m {
			if ev.Expire(t - int64(w.per)); ev.Len() == 0 {
				delete(w.m, key)
			}
		}
		w.sweep = max(1024, 2*len(w.m))
	}
	return -1
}
