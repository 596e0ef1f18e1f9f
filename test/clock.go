package test

import (
	"sync/atomic"
	"time"
)

// Clock is the real clock moved by an offset the test sets: the servers
// of a test fleet share one and jump days ahead together.
type Clock struct{ off atomic.Int64 }

// Now is the real time plus the offset.
func (c *Clock) Now() time.Time { return time.Now().Add(time.Duration(c.off.Load())) }

// Add moves the clock d ahead.
func (c *Clock) Add(d time.Duration) { c.off.Add(int64(d)) }
