package detector

import (
	"fmt"
	"slices"
	"testing"
	"time"
)

func TestClosest(t *testing.T) {
	t0 := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	d := &Detector{limiter: newLimiter(time.Hour, 0), now: func() time.Time { return t0 }}
	d.cfg.c = &policyConfig{limit: 10, limits: map[string]int{"vip@example.com": 0, "small@example.com": 4, "*@big.example": 100}}
	add := func(id string, n int, at time.Time) {
		for i := range n {
			d.limiter.Add(id, fmt.Sprintf("x%d@%s", i, id), at)
		}
	}
	add("a@example.com", 5, t0)                     // 5/10
	add("small@example.com", 3, t0)                 // 3/4
	add("vip@example.com", 50, t0)                  // unlimited
	add("b@big.example", 20, t0)                    // 20/100
	add("c@example.com", 5, t0)                     // 5/10, after a@ by name
	add("old@example.com", 9, t0.Add(-2*time.Hour)) // out of the window
	got := d.Closest(10)
	want := []Counted{
		{"small@example.com", 3, 4}, {"a@example.com", 5, 10}, {"c@example.com", 5, 10},
		{"b@big.example", 20, 100}, {"vip@example.com", 50, 0},
	}
	if !slices.Equal(got, want) {
		t.Errorf("Closest(10) = %v, want %v", got, want)
	}
	if got := d.Closest(2); !slices.Equal(got, want[:2]) {
		t.Errorf("Closest(2) = %v, want %v", got, want[:2])
	}
	if got := d.CountOf("A@example.com"); got.Count != 0 {
		t.Errorf("CountOf takes the folded identity; got %v", got)
	}
	if got := d.CountOf("a@example.com"); got != (Counted{"a@example.com", 5, 10}) {
		t.Errorf("CountOf = %v", got)
	}
}
