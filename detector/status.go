package detector

import "slices"

// Counted is one identity's count of distinct invalid recipients in the
// window, and its limit (0: unlimited).
type Counted struct {
	Identity string `json:"identity"`
	Count    int    `json:"count"`
	Limit    int    `json:"limit"`
}

// closer reports whether a is closer to its limit than b: the larger share
// of its limit first, unlimited identities after every limited one, then
// the larger count, then by name.
func closer(a, b Counted) int {
	// a.Count/a.Limit > b.Count/b.Limit, without division.
	switch {
	case a.Limit > 0 && b.Limit == 0:
		return -1
	case a.Limit == 0 && b.Limit > 0:
		return 1
	case a.Limit > 0 && a.Count*b.Limit != b.Count*a.Limit:
		if a.Count*b.Limit > b.Count*a.Limit {
			return -1
		}
		return 1
	case a.Count != b.Count:
		return b.Count - a.Count
	case a.Identity < b.Identity:
		return -1
	case a.Identity > b.Identity:
		return 1
	}
	return 0
}

// Closest returns at most n identities with an invalid recipient in the
// window now, closest to their limit first: what an abuse desk asks
// first. It holds one shard's lock at a time and keeps n entries, however
// many identities are tracked.
func (d *Detector) Closest(n int) []Counted {
	if n <= 0 {
		return nil
	}
	pc := d.cfg.load()
	cutoff := d.now().UnixNano() - d.limiter.period
	top := make([]Counted, 0, n+1)
	for i := range d.limiter.shards {
		s := &d.limiter.shards[i]
		s.mu.Lock()
		for id, tr := range s.m {
			c := Counted{Identity: id, Count: tr.countSince(cutoff)}
			if c.Count == 0 {
				continue
			}
			c.Limit = pc.limitFor(id)
			if len(top) == n && closer(c, top[n-1]) >= 0 {
				continue
			}
			at, _ := slices.BinarySearchFunc(top, c, closer)
			top = slices.Insert(top, at, c)
			if len(top) > n {
				top = top[:n]
			}
		}
		s.mu.Unlock()
	}
	return top
}

// CountOf returns id's count of distinct invalid recipients in the window
// now, and its limit.
func (d *Detector) CountOf(id string) Counted {
	return Counted{Identity: id, Count: d.limiter.Count(id, d.now()), Limit: d.cfg.load().limitFor(id)}
}
