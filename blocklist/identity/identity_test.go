package identity_test

import (
	"errors"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/rcptguard/rcptguard/blocklist/identity"
)

func TestCanonical(t *testing.T) {
	tests := []struct {
		name, in string
		want     string // "" when refused
		problem  string // substring of the error
	}{
		{name: "address", in: "user@example.com", want: "user@example.com"},
		{name: "upper case folds", in: "User@Example.COM", want: "user@example.com"},
		{name: "plain user", in: "plainuser", want: "plainuser"},
		{name: "IPv4", in: "192.0.2.1", want: "192.0.2.1"},
		{name: "IPv6", in: "2001:DB8::1", want: "2001:db8::1"},
		{name: "non-ASCII kept as is", in: "Jörg@Bücher.example", want: "jörg@bücher.example"},
		{name: "non-ASCII upper case is not folded", in: "ÄRGER@x", want: "Ärger@x"},
		{name: "Kelvin sign is not k", in: "\u212Aelly@x", want: "\u212Aelly@x"},
		{name: "dotless i is not folded", in: "\u0130stanbul@x", want: "\u0130stanbul@x"},
		// "Ⱥ" is 2 bytes and lower-cases (in Unicode) to 3: 160 of them are
		// 320 bytes, 480 lower-cased. Folding is ASCII only, so the stored
		// form is the same 320 bytes, within the bound.
		{name: "Ⱥ×160 at the bound", in: strings.Repeat("Ⱥ", 160), want: strings.Repeat("Ⱥ", 160)},
		{name: "Ⱥ×161 over the bound", in: strings.Repeat("Ⱥ", 161), problem: "longer than 320"},
		{name: "longest address", in: strings.Repeat("a", 64) + "@" + strings.Repeat("B", 255), want: strings.Repeat("a", 64) + "@" + strings.Repeat("b", 255)},
		{name: "321 bytes", in: strings.Repeat("a", 321), problem: "longer than 320"},
		{name: "hash inside", in: "a#b@example.com", want: "a#b@example.com"},
		{name: "leading dash is an identity", in: "-x@y", want: "-x@y"},
		{name: "equals sign alone", in: "a=b@example.com", want: "a=b@example.com"},
		{name: "empty", in: "", problem: "empty"},
		{name: "leading hash", in: "#user", problem: "starts with '#'"},
		{name: "space", in: "us er", problem: "white space"},
		{name: "tab", in: "user\t", problem: "white space"},
		{name: "LF", in: "user\n", problem: "white space"},
		{name: "CR", in: "us\rer", problem: "white space"},
		{name: "NUL", in: "us\x00er", problem: "control character"},
		{name: "ESC", in: "us\x1ber", problem: "control character"},
		{name: "DEL", in: "us\x7fer", problem: "control character"},
		{name: "C1", in: "us\u009ber", problem: "control character"},
		{name: "NEL", in: "us\u0085er", problem: "white space"},
		{name: "no-break space", in: "us\u00a0er", problem: "white space"},
		{name: "line separator", in: "us\u2028er", problem: "white space"},
		{name: "paragraph separator", in: "us\u2029er", problem: "white space"},
		{name: "ideographic space", in: "us\u3000er", problem: "white space"},
		{name: "RLO", in: "moc.elpmaxe@\u202eevil", problem: "format character"},
		{name: "RLI", in: "a\u2067b@x", problem: "format character"},
		{name: "LRM", in: "a\u200eb@x", problem: "format character"},
		{name: "zero width space", in: "zero\u200bwidth@example.com", problem: "format character"},
		{name: "zero width joiner", in: "a\u200db@x", problem: "format character"},
		{name: "BOM", in: "\ufeffuser@x", problem: "format character"},
		{name: "soft hyphen", in: "pay\u00adpal@x", problem: "format character"},
		{name: "tag character", in: "a\U000E0041@x", problem: "format character"},
		{name: "invalid UTF-8", in: "\xff\xfe", problem: "UTF-8"},
		{name: "truncated UTF-8", in: "a\xc3", problem: "UTF-8"},
		{name: "surrogate half", in: "a\xed\xa0\x80b", problem: "UTF-8"},
		{name: "encoded word", in: "=?utf-8?q?=E2=80=AEsecurity-team=40bank?=@x", problem: "=?"},
		{name: "encoded word inside", in: "a=?b@x", problem: "=?"},
		{name: "encoded word upper case", in: "=?UTF-8?B?4oCu?=@x", problem: "=?"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := identity.Canonical(tt.in)
			checkErr := identity.Check(tt.in)
			if (err == nil) != (checkErr == nil) {
				t.Fatalf("Canonical and Check disagree: %v, %v", err, checkErr)
			}
			if tt.problem != "" {
				if err == nil {
					t.Fatalf("Canonical(%q) = %q, want an error with %q", tt.in, got, tt.problem)
				}
				if !errors.Is(err, identity.ErrInvalid) || !strings.Contains(err.Error(), tt.problem) {
					t.Fatalf("Canonical(%q) error %v, want ErrInvalid with %q", tt.in, err, tt.problem)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("Canonical(%q) = %q, %v, want %q", tt.in, got, err, tt.want)
			}
			// The stored form is a fixed point: checking it again gives it back.
			if again, err := identity.Canonical(got); err != nil || again != got {
				t.Fatalf("Canonical(%q) = %q, %v, want the same", got, again, err)
			}
		})
	}
}

func TestFold(t *testing.T) {
	for in, want := range map[string]string{
		"":                     "",
		"abc":                  "abc",
		"ABC@Example.COM":      "abc@example.com",
		"[]^_`{}@AZaz09":       "[]^_`{}@azaz09",
		"\u212A":               "\u212A",
		"ÄÖÜ-É":                "ÄÖÜ-É",
		"\xffA\x00Z":           "\xffa\x00z",
		strings.Repeat("Ⱥ", 3): strings.Repeat("Ⱥ", 3),
	} {
		if got := identity.Fold(in); got != want {
			t.Errorf("Fold(%q) = %q, want %q", in, got, want)
		}
	}
	if n := testing.AllocsPerRun(100, func() { _ = identity.Fold("already@lower.case") }); n != 0 {
		t.Errorf("Fold of a folded identity allocates %v times", n)
	}
	if n := testing.AllocsPerRun(100, func() { _ = identity.Check("user@example.com") }); n != 0 {
		t.Errorf("Check of a valid identity allocates %v times", n)
	}
}

// FuzzCanonical checks the properties every user of the rule relies on:
// the stored form is valid, a fixed point, as long as the input, has no
// ASCII upper case and no byte a table line or a log line cannot hold; and
// an input is valid exactly when its folded form is, so that no two places
// can disagree about an identity.
func FuzzCanonical(f *testing.F) {
	for _, s := range []string{"user@example.com", "User@Example.COM", strings.Repeat("Ⱥ", 160),
		"\u212Aelly@x", "=?utf-8?q?x?=@x", "a\u202eb", "#x", "a b", "\xff", "-x@y", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := identity.Canonical(s)
		folded := identity.Fold(s)
		if len(folded) != len(s) || identity.Fold(folded) != folded {
			t.Fatalf("Fold(%q) = %q: length changed or not idempotent", s, folded)
		}
		if (identity.Check(folded) == nil) != (err == nil) {
			t.Fatalf("%q and its folded form %q are judged differently", s, folded)
		}
		if err != nil {
			if !errors.Is(err, identity.ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			return
		}
		if id != folded {
			t.Fatalf("Canonical(%q) = %q, want Fold = %q", s, id, folded)
		}
		if again, err := identity.Canonical(id); err != nil || again != id {
			t.Fatalf("stored form %q is not a fixed point: %q, %v", id, again, err)
		}
		if id == "" || len(id) > identity.Max || !utf8.ValidString(id) || id[0] == '#' || strings.Contains(id, "=?") {
			t.Fatalf("stored form %q breaks the rule", id)
		}
		for i := 0; i < len(id); i++ {
			if c := id[i]; c <= ' ' || c == 0x7f || ('A' <= c && c <= 'Z') {
				t.Fatalf("stored form %q holds byte %#x", id, c)
			}
		}
	})
}
