package callout

import (
	"testing"
	"time"
)

func TestTTLMap(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	m := newTTLMap[string, int](10)
	m.put("a", 1, now.Add(time.Minute), now)
	if v, ok := m.get("a", now.Add(59*time.Second)); !ok || v != 1 {
		t.Fatalf("get before expiry: %d %v", v, ok)
	}
	if _, ok := m.get("a", now.Add(time.Minute)); ok {
		t.Fatal("get at expiry found the entry")
	}
	// Full: the expired entry goes first, then arbitrary ones down to nine
	// tenths; the new entry is always kept.
	for i := range 20 {
		k := string(rune('b' + i))
		m.put(k, i, now.Add(time.Hour), now.Add(2*time.Minute))
		if m.len() > 10 {
			t.Fatalf("after %d puts: %d entries, bound 10", i+1, m.len())
		}
		if v, ok := m.get(k, now.Add(2*time.Minute)); !ok || v != i {
			t.Fatalf("the entry just put is gone: %d %v", v, ok)
		}
	}
	var none *ttlMap[string, int]
	none.put("a", 1, now.Add(time.Hour), now)
	if _, ok := none.get("a", now); ok || none.len() != 0 || newTTLMap[string, int](0) != nil {
		t.Fatal("a nil ttlMap holds something")
	}
}
