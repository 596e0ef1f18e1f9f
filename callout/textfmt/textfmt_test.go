package textfmt_test

import (
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/rcptguard/rcptguard/callout/textfmt"
)

func TestCut(t *testing.T) {
	for _, tc := range []struct {
		in   string
		n    int
		want string
	}{
		{"short", 10, "short"},
		{"exactly", 7, "exactly"},
		{"abcdef", 3, "abc"},
		{"abc", 0, ""},
		{"aé", 2, "a"},                  // é is two bytes: not split
		{"aéb", 3, "aé"},                // the cut falls after é
		{"a€", 3, "a"},                  // € is three bytes
		{"a😀", 4, "a"},                  // four bytes
		{"\xff\xfe\xfd", 2, "\xff\xfe"}, // not UTF-8: bytes
	} {
		got := textfmt.Cut(tc.in, tc.n)
		if got != tc.want {
			t.Errorf("Cut(%q, %d) = %q, want %q", tc.in, tc.n, got, tc.want)
		}
		if len(got) > tc.n {
			t.Errorf("Cut(%q, %d) is %d bytes", tc.in, tc.n, len(got))
		}
	}
	long := strings.Repeat("ü", 200)
	for n := range 50 {
		if got := textfmt.Cut(long, n); !utf8.ValidString(got) || len(got) > n {
			t.Fatalf("Cut(ü…, %d) = %q", n, got)
		}
	}
}

func FuzzCut(f *testing.F) {
	f.Add("aé€😀", 4)
	f.Fuzz(func(t *testing.T, s string, n int) {
		if n < 0 || n > 1000 {
			return
		}
		got := textfmt.Cut(s, n)
		if len(got) > n || !strings.HasPrefix(s, got) || len(s) <= n && got != s {
			t.Fatalf("Cut(%q, %d) = %q", s, n, got)
		}
		if utf8.ValidString(s) && !utf8.ValidString(got) {
			t.Fatalf("Cut(%q, %d) = %q: not UTF-8", s, n, got)
		}
		if len(got) < n-utf8.UTFMax+1 && len(s) > n {
			t.Fatalf("Cut(%q, %d) = %q: cut too much", s, n, got)
		}
	})
}

func TestFormatPeriod(t *testing.T) {
	for d, want := range map[time.Duration]string{
		0:                       "0s",
		time.Hour:               "1h",
		90 * time.Minute:        "90m",
		90 * time.Second:        "90s",
		48 * time.Hour:          "2d",
		24 * time.Hour:          "1d",
		36 * time.Hour:          "36h",
		45 * time.Second:        "45s",
		1500 * time.Millisecond: "1.5s",
	} {
		if got := textfmt.FormatPeriod(d); got != want {
			t.Errorf("FormatPeriod(%v) = %q, want %q", d, got, want)
		}
	}
}
