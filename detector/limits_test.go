package detector

import (
	"strings"
	"testing"
)

func TestParseLimits(t *testing.T) {
	long := strings.Repeat("Ⱥ", 160)
	tests := []struct {
		name, in string
		want     map[string]int
		err      string
	}{
		{name: "entries fold ASCII case", in: "# c\n\nAlice@Example.COM 5\n*@Example.NET 0\n192.0.2.7 3\n",
			want: map[string]int{"alice@example.com": 5, "*@example.net": 0, "192.0.2.7": 3}},
		{name: "Kelvin sign stays distinct", in: "\u212Aelly@x 1\nkelly@x 2\n",
			want: map[string]int{"\u212Aelly@x": 1, "kelly@x": 2}},
		{name: "Ⱥ×160 is at the bound", in: long + " 1\n", want: map[string]int{long: 1}},
		{name: "Ⱥ×161 is over it", in: strings.Repeat("Ⱥ", 161) + " 1\n", err: "longer than 320"},
		{name: "same identity in two cases", in: "a@x 1\nA@X 2\n", err: "line 2: a@x is listed twice"},
		{name: "encoded word", in: "=?utf-8?q?=E2=80=AEx?=@x 1\n", err: "line 1: "},
		{name: "bidi override", in: "a\u202eb@x 1\n", err: "format character"},
		{name: "zero width space", in: "a\u200bb@x 1\n", err: "format character"},
		{name: "bad wildcard", in: "*x@y 1\n", err: "not an identity or"},
		{name: "negative", in: "a@x -1\n", err: "whole number"},
		{name: "three fields", in: "a@x 1 2\n", err: "want \"IDENTITY LIMIT\""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseLimits(strings.NewReader(tt.in))
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("ParseLimits = %v, %v; want error with %q", got, err, tt.err)
				}
				return
			}
			if err != nil || len(got) != len(tt.want) {
				t.Fatalf("ParseLimits = %v, %v; want %v", got, err, tt.want)
			}
			for k, v := range tt.want {
				if g, ok := got[k]; !ok || g != v {
					t.Errorf("limit of %q = %d, %v; want %d", k, g, ok, v)
				}
			}
		})
	}
}

// TestIdentityRule checks the detector reads identities by the one rule:
// the same stored form the blocklist uses, and refusal for the rest.
func TestIdentityRule(t *testing.T) {
	long := strings.Repeat("Ⱥ", 160)
	for _, tt := range []struct{ in, want string }{
		{"Alice@Example.COM", "alice@example.com"},
		{"\u212Aelly@x", "\u212Aelly@x"},
		{long, long},
		{"ÄRGER@X", "Ärger@x"},
		{strings.Repeat("Ⱥ", 161), ""},
		{"=?utf-8?q?=E2=80=AEsecurity-team=40bank?=@x", ""},
		{"a\u202eb@x", ""},
		{"#a@x", ""},
	} {
		id, ok := identity(&Request{SASLUsername: tt.in}, nil)
		if !ok || id != tt.want {
			t.Errorf("identity(%q) = %q, %v; want %q, true", tt.in, id, ok, tt.want)
		}
	}
}
