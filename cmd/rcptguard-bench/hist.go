package main

import (
	"math"
	"math/bits"
	"time"
)

// Histogram records latencies in log-linear buckets, as HdrHistogram
// does: each power of two is split into histSub equal sub-buckets, so a
// recorded value is known to within 1/histSub (1.6 %) of itself, from 1 ns
// to histMax, in fixed memory whatever the number of samples. Values below
// 2*histSub nanoseconds get a bucket each.
//
// A Histogram is not safe for concurrent use: give each goroutine its own
// and Merge them at the end.
type Histogram struct {
	counts [histBuckets]int64
	n      int64
	sum    int64 // nanoseconds, for the mean
	min    int64
	max    int64
}

const (
	histSubBits = 6
	histSub     = 1 << histSubBits // sub-buckets per power of two
	histMaxBits = 40               // largest value: 2^40 ns, about 18 minutes
	histMax     = 1<<histMaxBits - 1
	// Values below 2*histSub are exact; each higher power of two, up to
	// 2^histMaxBits, has histSub buckets.
	histBuckets = 2*histSub + (histMaxBits-histSubBits-1)*histSub
)

// histIndex returns the bucket of v (0 <= v <= histMax).
func histIndex(v int64) int {
	if v < 2*histSub {
		return int(v)
	}
	shift := bits.Len64(uint64(v)) - histSubBits - 1 // v>>shift is in [histSub, 2*histSub)
	return 2*histSub + (shift-1)*histSub + int(v>>shift) - histSub
}

// histUpper returns the largest value that falls into bucket i.
func histUpper(i int) int64 {
	if i < 2*histSub {
		return int64(i)
	}
	i -= 2 * histSub
	shift := i/histSub + 1
	m := int64(i%histSub + histSub)
	return (m+1)<<shift - 1
}

// Record adds one latency. Negative durations count as 0, durations past
// histMax as histMax.
func (h *Histogram) Record(d time.Duration) {
	v := min(max(int64(d), 0), histMax)
	h.counts[histIndex(v)]++
	if h.n == 0 || v < h.min {
		h.min = v
	}
	if v > h.max {
		h.max = v
	}
	h.n++
	h.sum += v
}

// Merge adds the samples of o to h.
func (h *Histogram) Merge(o *Histogram) {
	if o.n == 0 {
		return
	}
	for i, c := range o.counts {
		h.counts[i] += c
	}
	if h.n == 0 || o.min < h.min {
		h.min = o.min
	}
	h.max = max(h.max, o.max)
	h.n += o.n
	h.sum += o.sum
}

// Count returns the number of samples.
func (h *Histogram) Count() int64 { return h.n }

// Max returns the largest sample, exactly.
func (h *Histogram) Max() time.Duration { return time.Duration(h.max) }

// Mean returns the mean of the samples, exactly.
func (h *Histogram) Mean() time.Duration {
	if h.n == 0 {
		return 0
	}
	return time.Duration(h.sum / h.n)
}

// Quantile returns the q-quantile (0 < q <= 1) of the samples: the
// smallest recorded value v such that at least q of the samples are <= v,
// rounded up to the end of its bucket (but never past the largest sample),
// so it is at most 1/histSub above the exact quantile and never below it.
// It is 0 without samples.
func (h *Histogram) Quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	// The rank of the quantile, 1-based; the epsilon keeps q*n that is a
	// hair above an integer (0.99*100) from rounding up.
	rank := int64(math.Ceil(q*float64(h.n) - 1e-9))
	rank = min(max(rank, 1), h.n)
	var seen int64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			return time.Duration(min(histUpper(i), h.max))
		}
	}
	return time.Duration(h.max)
}
