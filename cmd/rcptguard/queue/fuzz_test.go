package queue

import (
	"os"
	"strings"
	"testing"
	"unicode/utf8"
)

// FuzzParseEnvelope checks that the postcat parser never panics and that
// whatever it accepts is consistent: the ID asked for, a known queue, and
// an identity that is one clean line, found before the sender record.
func FuzzParseEnvelope(f *testing.F) {
	for _, name := range []string{"smtpd-short-id", "smtpd-long-id", "sendmail-newline-sender"} {
		out, err := os.ReadFile("testdata/" + name + ".envelope")
		if err != nil {
			f.Fatal(err)
		}
		id, err := os.ReadFile("testdata/" + name + ".id")
		if err != nil {
			f.Fatal(err)
		}
		f.Add(out, string(id))
	}
	f.Add([]byte("*** ENVELOPE RECORDS hold/ABCDEF ***\nnamed_attribute: sasl_username=a\nsender: \n"), "ABCDEF")
	f.Fuzz(func(t *testing.T, out []byte, id string) {
		env, err := ParseEnvelope(out, id)
		if err != nil {
			return
		}
		if env.ID != id || !ValidID(id) || !knownQueue(env.Queue) {
			t.Fatalf("accepted %+v for ID %q", env, id)
		}
		if env.Identity != "" {
			if !utf8.ValidString(env.Identity) || strings.ContainsAny(env.Identity, "\n\r\t \x00\x1b") {
				t.Fatalf("unclean identity %q", env.Identity)
			}
			s := string(out)
			at := strings.Index(s, saslAttr+env.Identity+"\n")
			sender := strings.Index(s, "\n"+senderRecord)
			if at < 0 || sender < 0 || at > sender {
				t.Fatalf("identity %q not taken from before the sender record:\n%q", env.Identity, s)
			}
		}
	})
}

// FuzzParseSubject checks that the subject parser never panics and that
// Printable's output of it is one line without control characters.
func FuzzParseSubject(f *testing.F) {
	f.Add([]byte("Subject: =?utf-8?q?caf=C3=A9?= \x1b]0;x\n"))
	f.Add([]byte("Subject: a\n b\n"))
	f.Fuzz(func(t *testing.T, out []byte) {
		p := Printable(ParseSubject(out), 60)
		for _, r := range p {
			if r < ' ' || r == 0x7f || r == '\u202e' {
				t.Fatalf("Printable left %U in %q", r, p)
			}
		}
	})
}

// FuzzParseRequest checks that a request accepted is one clean identity.
func FuzzParseRequest(f *testing.F) {
	f.Add([]byte("spammer@customer.test\n"))
	f.Add([]byte("a\nb\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseRequest(b)
		if err != nil {
			return
		}
		if !validIdentity(r.Identity) || string(b) != r.Identity+"\n" {
			t.Fatalf("accepted %q as %q", b, r.Identity)
		}
	})
}

// FuzzParseResult checks that a result accepted holds one clean identity
// and only valid queue IDs, and survives a round trip.
func FuzzParseResult(f *testing.F) {
	f.Add([]byte(`{"version":1,"identity":"a@b","requested":"2026-11-29T23:00:00Z","done":"2026-11-29T23:00:02Z","count":1,"held":[{"id":"ABCDEF0123","arrival":"2026-11-29T22:00:00Z","size":10,"recipients":1}]}`))
	f.Add([]byte(`{"version":1,"identity":"-x","requested":"2026-11-29T23:00:00Z","done":"2026-11-29T23:00:02Z","count":0,"held":[]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseResult(b)
		if err != nil {
			return
		}
		if !validIdentity(r.Identity) || r.Count < len(r.Held) || len(r.Held) > MaxResultHeld {
			t.Fatalf("accepted %q as %+v", b, r)
		}
		for _, h := range r.Held {
			if !ValidID(h.ID) || h.Size < 0 || h.Recipients < 0 {
				t.Fatalf("accepted message %+v", h)
			}
		}
		enc, err := encodeResult(r)
		if err != nil {
			t.Fatalf("accepted result does not encode: %v", err)
		}
		if _, err := ParseResult(enc); err != nil {
			t.Fatalf("round trip: %v", err)
		}
	})
}
