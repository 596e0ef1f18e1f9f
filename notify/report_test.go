package notify

import (
	"slices"
	"strings"
	"testing"
	"time"
)

func TestHumanPeriod(t *testing.T) {
	for d, want := range map[time.Duration]string{
		time.Hour:        "hour",
		2 * time.Hour:    "2 hours",
		90 * time.Minute: "90 minutes",
		24 * time.Hour:   "day",
		72 * time.Hour:   "3 days",
		90 * time.Second: "90 seconds",
	} {
		if got := humanPeriod(d); got != want {
			t.Errorf("humanPeriod(%v) = %q, want %q", d, got, want)
		}
	}
}

func TestClean(t *testing.T) {
	for in, want := range map[string]string{
		"alice@example.com":   "alice@example.com",
		"a\r\nb":              `a\r\nb`,
		"tab\there":           `tab\there`,
		"nul\x00del\x7f":      `nul\x00del\x7f`,
		"bad\xffutf8":         `bad\xffutf8`,
		"ünïcödé":             "ünïcödé",
		"rtl\u202eoverride":   `rtl\u202eoverride`,
		"ls\u2028ps\u2029":    `ls\u2028ps\u2029`,
		"c1\u0085":            `c1\u0085`,
		"bom\ufeff":           `bom\ufeff`,
		"space is fine here ": "space is fine here ",
	} {
		if got := clean(in, 100); got != want {
			t.Errorf("clean(%q) = %q, want %q", in, got, want)
		}
	}
	if got := clean(strings.Repeat("ü", 50), 10); got != strings.Repeat("ü", 10)+"..." {
		t.Errorf("clean cut: %q", got)
	}
}

func TestShellQuote(t *testing.T) {
	for in, want := range map[string]string{
		"alice@example.com":      "'alice@example.com'",
		"a.b+c_d-e@x.example":    "'a.b+c_d-e@x.example'",
		"o'brien@example.com":    `'o'\''brien@example.com'`,
		"a b":                    "'a b'",
		"$(id)":                  "'$(id)'",
		"`id`":                   "'`id`'",
		"x;y":                    "'x;y'",
		"":                       "''",
		"ü@example.com":          "'ü@example.com'",
		"back\\slash":            `'back\slash'`,
		"\"double\"@example.com": `'"double"@example.com'`,
		"-x":                     "'-x'",
	} {
		if got := shellQuote(in); got != want {
			t.Errorf("shellQuote(%q) = %s, want %s", in, got, want)
		}
	}
	if got := rcptguardArg("-x@y"); got != "-- '-x@y'" {
		t.Errorf("rcptguardArg(-x@y) = %s", got)
	}
	if got := rcptguardArg("x@y"); got != "'x@y'" {
		t.Errorf("rcptguardArg(x@y) = %s", got)
	}
}

func TestQueueIDs(t *testing.T) {
	got := queueIDs([]string{"4F2A1C0E3B", "-dALL", "4Xk2Ln3HcPz9vWx", "", "ALL", "$(id)", "a b", "--", strings.Repeat("B", 33), "ABCDEF"})
	if want := []string{"4F2A1C0E3B", "4Xk2Ln3HcPz9vWx", "ABCDEF"}; !slices.Equal(got, want) {
		t.Errorf("queueIDs = %q, want %q", got, want)
	}
}

func TestSanitizeHostname(t *testing.T) {
	for in, want := range map[string]string{
		"mail1.example.net": "mail1.example.net",
		"":                  "localhost",
		"bad host":          "localhost",
		"a\r\nb":            "localhost",
		"-x":                "localhost",
		"x.":                "localhost",
		"a..b":              "localhost",
		"höst":              "localhost",
	} {
		if got := sanitizeHostname(in); got != want {
			t.Errorf("sanitizeHostname(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestDefaultBackoff(t *testing.T) {
	for attempt, base := range map[int]time.Duration{
		1: time.Minute, 2: 2 * time.Minute, 3: 4 * time.Minute, 6: 32 * time.Minute,
		7: time.Hour, 8: time.Hour, 1000: time.Hour,
	} {
		for range 100 {
			d := DefaultBackoff(attempt)
			if lo, hi := base*8/10, base*12/10; d < lo || d > hi {
				t.Fatalf("DefaultBackoff(%d) = %v, want %v..%v", attempt, d, lo, hi)
			}
		}
	}
}

func TestLoginClient(t *testing.T) {
	c := &loginClient{user: "u", pass: "p"}
	mech, ir, err := c.Start()
	if mech != "LOGIN" || ir != nil || err != nil {
		t.Fatalf("Start = %q %q %v", mech, ir, err)
	}
	for _, step := range []struct{ challenge, want string }{{"Username:", "u"}, {"Password:", "p"}} {
		got, err := c.Next([]byte(step.challenge))
		if err != nil || string(got) != step.want {
			t.Fatalf("Next(%q) = %q, %v", step.challenge, got, err)
		}
	}
	if _, err := c.Next([]byte("More:")); err == nil {
		t.Fatal("third challenge answered")
	}
}
