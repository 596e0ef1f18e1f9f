package queue

import "testing"

// TestSameIdentity: queue files are matched to a blocked identity by the
// one identity rule — ASCII letters without regard to case, nothing else
// folded — so blocking "\u212Aelly@x" (Kelvin sign) never touches the mail
// of kelly@x, whom the blocklist keeps apart.
func TestSameIdentity(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want bool
	}{
		{"Alice@Example.COM", "alice@example.com", true},
		{"alice@example.com", "alice@example.com", true},
		{"\u212Aelly@x.test", "kelly@x.test", false},
		{"\u212Aelly@x.test", "Kelly@x.test", false},
		{"\u212Aelly@x.test", "\u212Aelly@X.TEST", true},
		{"ÄRGER@x.test", "ärger@x.test", false},
		{"bob@x.test", "bob@x.tes", false},
	} {
		if got := SameIdentity(tc.a, tc.b); got != tc.want {
			t.Errorf("SameIdentity(%q, %q) = %v, want %v", tc.a, tc.b, got, tc.want)
		}
	}
}
