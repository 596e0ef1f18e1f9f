package blocklist_test

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/rcptguard/rcptguard/blocklist"
	"github.com/rcptguard/rcptguard/blocklist/identity"
)

// FuzzParse checks that Parse never panics, returns only valid entries, and
// that writing the entries and parsing them again gives the same entries.
func FuzzParse(f *testing.F) {
	seed, err := os.ReadFile(filepath.Join("testdata", "series.input"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(string(seed))
	f.Add("user@example.com\tHOLD text\n")
	f.Add("User@Example.COM  reject   spaced   text  \r\n")
	f.Add("# comment\n\n\tcontinuation\nnosep\n")
	f.Add("a\tHOLD\na\tDEFER\n")
	f.Add("İstanbul@example.com\t550 5.7.1 x\x00y\n")
	f.Add("k\x0bv\tHOLD\n")
	f.Fuzz(func(t *testing.T, in string) {
		entries, problems, err := blocklist.Parse(strings.NewReader(in))
		if err != nil {
			t.Fatal(err)
		}
		seen := map[string]bool{}
		for _, e := range entries {
			if err := blocklist.ValidIdentity(e.Identity); err != nil {
				t.Fatalf("entry %q: %v", e.Identity, err)
			}
			if e.Identity != identity.Fold(e.Identity) {
				t.Fatalf("identity %q not in lower case", e.Identity)
			}
			if seen[e.Identity] {
				t.Fatalf("identity %q twice", e.Identity)
			}
			seen[e.Identity] = true
			if len(e.Text) > blocklist.MaxText || strings.ContainsAny(e.Text, "\r\n\x00\t") {
				t.Fatalf("text %q not sanitized", e.Text)
			}
		}
		for _, p := range problems {
			if p.Line < 1 || p.Err == "" {
				t.Fatalf("bad problem %+v", p)
			}
		}
		var b strings.Builder
		for _, e := range entries {
			b.WriteString(e.String() + "\n")
		}
		again, problems2, err := blocklist.Parse(strings.NewReader(b.String()))
		if err != nil || len(problems2) != 0 {
			t.Fatalf("reparse: %v, problems %v\n%q", err, problems2, b.String())
		}
		for i := range again {
			again[i].Line = 0
		}
		for i := range entries {
			entries[i].Line = 0
		}
		if !slices.Equal(entries, again) {
			t.Fatalf("round trip changed entries:\n%q\n%q", entries, again)
		}
	})
}

// FuzzRewrite checks that rewriting any file through Add and Remove keeps
// it parseable, applies the change, and keeps every line that is not an
// entry for the changed identity.
func FuzzRewrite(f *testing.F) {
	f.Add("a@example.com\tHOLD x\n# c\nbad\n", "A@example.com", false)
	f.Add("a@example.com\tHOLD x\n\tcont\nb\tHOLD\n", "a@example.com", true)
	f.Add("", "new@example.com", false)
	f.Fuzz(func(t *testing.T, in, id string, remove bool) {
		if blocklist.ValidIdentity(id) != nil {
			return
		}
		low := identity.Fold(id)
		path := filepath.Join(t.TempDir(), "blocklist")
		if err := os.WriteFile(path, []byte(in), 0o644); err != nil {
			t.Fatal(err)
		}
		file, _, err := blocklist.Open(blocklist.Config{Path: path})
		if err != nil {
			t.Fatal(err)
		}
		if remove {
			_, err = file.Remove(context.Background(), id)
		} else {
			err = file.Add(context.Background(), blocklist.Entry{Identity: id, Action: "HOLD", Text: "fuzz"})
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile(path)
		entries, _, _ := blocklist.Parse(strings.NewReader(string(b)))
		var got *blocklist.Entry
		for i, e := range entries {
			if e.Identity == low {
				got = &entries[i]
			}
		}
		if remove != (got == nil) || (got != nil && (got.Action != "HOLD" || got.Text != "fuzz")) {
			t.Fatalf("after change of %q (remove %v): %+v\n%q", id, remove, got, b)
		}
		// Comments survive.
		for _, l := range strings.Split(in, "\n") {
			if strings.HasPrefix(l, "#") && !strings.Contains(string(b), l+"\n") {
				t.Fatalf("comment %q lost:\n%q", l, b)
			}
		}
	})
}
