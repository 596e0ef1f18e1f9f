package main

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// exactQuantile is the definition Quantile approximates: the smallest
// sample such that at least q of the samples are <= it.
func exactQuantile(sorted []int64, q float64) int64 {
	rank := int(math.Ceil(q*float64(len(sorted)) - 1e-9))
	return sorted[min(max(rank, 1), len(sorted))-1]
}

func TestHistogramQuantilesOfKnownDistributions(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	dists := map[string]func() int64{
		"constant 250µs": func() int64 { return 250_000 },
		"uniform 1ns-1ms": func() int64 {
			return 1 + rng.Int64N(1_000_000)
		},
		"exponential mean 100µs": func() int64 {
			return int64(rng.ExpFloat64() * 100_000)
		},
		"bimodal 50µs and 20ms": func() int64 {
			if rng.IntN(100) < 98 {
				return 50_000 + rng.Int64N(5_000)
			}
			return 20_000_000 + rng.Int64N(1_000_000)
		},
		"small exact values": func() int64 { return rng.Int64N(2 * histSub) },
		"log-uniform 1µs-10s": func() int64 {
			return int64(math.Exp(rng.Float64()*math.Log(1e7)) * 1e3)
		},
	}
	for name, draw := range dists {
		t.Run(name, func(t *testing.T) {
			var h Histogram
			samples := make([]int64, 200_000)
			var sum int64
			for i := range samples {
				samples[i] = draw()
				sum += samples[i]
				h.Record(time.Duration(samples[i]))
			}
			slices.Sort(samples)
			if h.Count() != int64(len(samples)) {
				t.Fatalf("count %d, want %d", h.Count(), len(samples))
			}
			if h.Max() != time.Duration(samples[len(samples)-1]) {
				t.Errorf("max %v, want %v", h.Max(), time.Duration(samples[len(samples)-1]))
			}
			if want := time.Duration(sum / int64(len(samples))); h.Mean() != want {
				t.Errorf("mean %v, want %v", h.Mean(), want)
			}
			for _, q := range []float64{0.001, 0.25, 0.5, 0.9, 0.99, 0.999, 0.9999, 1} {
				exact := exactQuantile(samples, q)
				got := int64(h.Quantile(q))
				// Never below the exact quantile, at most one bucket
				// width (1/histSub of the value) above it.
				if got < exact || float64(got) > float64(exact)*(1+1.0/histSub)+1 {
					t.Errorf("q%v = %d ns, exact %d ns (allowed %d..%d)", q, got, exact, exact,
						int64(float64(exact)*(1+1.0/histSub)+1))
				}
			}
		})
	}
}

func TestHistogramBuckets(t *testing.T) {
	// Every bucket's upper bound maps to it and the next value to the next
	// bucket: the buckets tile [0, histMax] without gaps or overlaps.
	for i := range histBuckets - 1 {
		u := histUpper(i)
		if got := histIndex(u); got != i {
			t.Fatalf("histIndex(histUpper(%d) = %d) = %d", i, u, got)
		}
		if got := histIndex(u + 1); got != i+1 {
			t.Fatalf("histIndex(%d) = %d, want %d", u+1, got, i+1)
		}
		if i >= 2*histSub {
			// The relative width of a bucket is at most 1/histSub.
			lo := histUpper(i-1) + 1
			if w := float64(u-lo+1) / float64(lo); w > 1.0/histSub+1e-12 {
				t.Fatalf("bucket %d [%d, %d] is %.4f wide, relative", i, lo, u, w)
			}
		}
	}
	if got := histUpper(histBuckets - 1); got != histMax {
		t.Errorf("last bucket ends at %d, want %d", got, histMax)
	}
	var h Histogram
	h.Record(-time.Second)
	h.Record(1000 * time.Hour)
	if h.Quantile(0.5) != 0 || h.Max() != histMax {
		t.Errorf("out-of-range samples: q50 %v max %v, want 0 and %v", h.Quantile(0.5), h.Max(), time.Duration(histMax))
	}
}

func TestHistogramMergeAndEmpty(t *testing.T) {
	var empty Histogram
	if empty.Quantile(0.99) != 0 || empty.Mean() != 0 || empty.Max() != 0 {
		t.Error("an empty histogram reports nonzero values")
	}
	var a, b, all Histogram
	for i := range 10_000 {
		d := time.Duration(i*i) * time.Nanosecond
		all.Record(d)
		if i%3 == 0 {
			a.Record(d)
		} else {
			b.Record(d)
		}
	}
	var m Histogram
	m.Merge(&empty)
	m.Merge(&a)
	m.Merge(&b)
	if m != all {
		t.Error("merging the parts differs from recording everything in one")
	}
}

func TestHistogramRecordDoesNotAllocate(t *testing.T) {
	var h Histogram
	if n := testing.AllocsPerRun(1000, func() { h.Record(123 * time.Microsecond) }); n != 0 {
		t.Errorf("Record allocates %v times", n)
	}
}
