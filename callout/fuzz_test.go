package callout

import (
	"strings"
	"testing"
)

// FuzzParseAddress checks that ParseAddress never panics, that what it
// accepts prints to a form that is safe to send and parses back to the same
// Address.
func FuzzParseAddress(f *testing.F) {
	for _, tt := range addrTests {
		f.Add(tt.in)
	}
	f.Fuzz(func(t *testing.T, s string) {
		a, err := ParseAddress(s)
		if err != nil {
			if a != (Address{}) {
				t.Fatalf("ParseAddress(%q) = %+v with error %v", s, a, err)
			}
			return
		}
		str := a.String()
		if strings.ContainsAny(str, "\r\n\x00") {
			t.Fatalf("ParseAddress(%q).String() = %q contains CR, LF or NUL", s, str)
		}
		if len(str) > addrMaxAddress {
			t.Fatalf("ParseAddress(%q).String() = %q is %d octets long", s, str, len(str))
		}
		again, err := ParseAddress(str)
		if err != nil {
			t.Fatalf("ParseAddress(%q) = %+v, but its String %q does not parse: %v", s, a, str, err)
		}
		if again != a {
			t.Fatalf("ParseAddress(%q) = %+v, but its String %q parses to %+v", s, a, str, again)
		}
		if again.String() != str {
			t.Fatalf("String not stable: %q then %q", str, again.String())
		}
	})
}
