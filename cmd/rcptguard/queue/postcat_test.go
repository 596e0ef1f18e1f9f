package queue

import (
	"errors"
	"os"
	"strings"
	"testing"
)

func readTestdata(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestParseEnvelope runs the parser on postcat -e output captured from a
// real Postfix 3.7 (testdata/*.envelope; see the comment of each case)
// and on hostile variations of it.
func TestParseEnvelope(t *testing.T) {
	short := readTestdata(t, "smtpd-short-id.envelope")
	long := readTestdata(t, "smtpd-long-id.envelope")
	local := readTestdata(t, "sendmail-newline-sender.envelope")
	const shortID, longID, localID = "95A3298456E", "4jd1xH4g2Fz1SCkh", "4jd1xH5xKfz1SCl3"
	cases := []struct {
		name, out, id string
		want          Envelope
		err           error
	}{
		// swaks as spammer with SASL PLAIN, envelope sender honest@.
		{"smtpd short ID", short, shortID, Envelope{Queue: "deferred", ID: shortID, Identity: "spammer@customer.test"}, nil},
		{"smtpd long ID", long, longID, Envelope{Queue: "deferred", ID: longID, Identity: "spammer@customer.test"}, nil},
		// sendmail -f "evil\nnamed_attribute: sasl_username=victim@...":
		// no SASL login, so nobody's.
		{"local submission", local, localID, Envelope{Queue: "deferred", ID: localID}, nil},
		{"other queue file", short, "95A3298456F", Envelope{}, ErrNotEnvelope},
		{"empty", "", shortID, Envelope{}, ErrNotEnvelope},
		{"not postcat", "hello\nsender: x\n", shortID, Envelope{}, ErrNotEnvelope},
		{"unknown queue", strings.ReplaceAll(short, "deferred/9/", "elsewhere/9/"), shortID, Envelope{}, ErrNotEnvelope},
		{"header path too deep", strings.Replace(short, "deferred/9/", "deferred/9/9/9/9/", 1), shortID, Envelope{}, ErrNotEnvelope},
		{"cut before the sender", short[:strings.Index(short, "sender:")], shortID, Envelope{}, ErrTruncated},
		{"content before any sender", strings.Replace(short, "sender: honest", "xender: honest", 1), shortID, Envelope{}, ErrTruncated},
		{"second sasl_username after the sender",
			strings.Replace(short, "sender: honest@customer.test\n", "sender: honest@customer.test\nnamed_attribute: sasl_username=victim@customer.test\n", 1),
			shortID, Envelope{}, ErrAmbiguous},
		{"second sasl_username before the sender",
			strings.Replace(short, "sender: honest", "named_attribute: sasl_username=victim@customer.test\nsender: honest", 1),
			shortID, Envelope{}, ErrAmbiguous},
		{"sasl_username only after the sender", strings.Replace(local, "recipient: z@dest.test\n", "recipient: z@dest.test\nnamed_attribute: sasl_username=victim@customer.test\n", 1),
			localID, Envelope{}, ErrAmbiguous},
		{"empty sasl_username", strings.Replace(short, "sasl_username=spammer@customer.test", "sasl_username=", 1), shortID, Envelope{}, ErrBadIdentity},
		{"sasl_username with a space", strings.Replace(short, "sasl_username=spammer@customer.test", "sasl_username=spammer @customer.test", 1), shortID, Envelope{}, ErrBadIdentity},
		{"sasl_username with an escape", strings.Replace(short, "sasl_username=spammer@customer.test", "sasl_username=spammer\x1b[2J", 1), shortID, Envelope{}, ErrBadIdentity},
		{"sasl_username with a bidi override", strings.Replace(short, "sasl_username=spammer@customer.test", "sasl_username=spammer\u202e@x", 1), shortID, Envelope{}, ErrBadIdentity},
		{"CRLF line ends", strings.ReplaceAll(short, "\n", "\r\n"), shortID, Envelope{}, ErrNotEnvelope},
		{"invalid requested ID", strings.ReplaceAll(short, shortID, "-d"), "-d", Envelope{}, ErrNotEnvelope},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := ParseEnvelope([]byte(c.out), c.id)
			if !errors.Is(err, c.err) {
				t.Fatalf("error %v, want %v", err, c.err)
			}
			if err == nil && got != c.want {
				t.Fatalf("got %+v, want %+v", got, c.want)
			}
		})
	}
}

func TestParseSubject(t *testing.T) {
	cases := []struct{ name, in, want string }{
		{"real, control character", readTestdata(t, "smtpd-short-id.header"), "Hello\x01 world"},
		{"real, encoded word and escape", readTestdata(t, "smtpd-long-id.header"), "café \x1b]0;x"},
		{"folded", "From: a\nSubject: one\n two\n\tthree\nTo: b\n", "one two\tthree"},
		{"case", "subject: low\n", "low"},
		{"none", "From: a\nTo: b\n", ""},
		{"in the body only", "From: a\n\nSubject: body\n", ""},
		{"first wins", "Subject: one\nSubject: two\n", "one"},
		{"empty", "", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := ParseSubject([]byte(c.in)); got != c.want {
				t.Fatalf("got %q, want %q", got, c.want)
			}
		})
	}
}

func TestPrintable(t *testing.T) {
	cases := []struct {
		in   string
		max  int
		want string
	}{
		{"plain", 80, "plain"},
		{"esc\x1b[31mred", 80, "esc?[31mred"},
		{"new\nline\r", 80, "new?line?"},
		{"bidi\u202eevil", 80, "bidi?evil"},
		{"bad\xffutf8", 80, "bad?utf8"},
		{"café", 80, "café"},
		{"abcdef", 3, "abc…"},
		{"abc", 3, "abc"},
	}
	for _, c := range cases {
		if got := Printable(c.in, c.max); got != c.want {
			t.Errorf("Printable(%q, %d) = %q, want %q", c.in, c.max, got, c.want)
		}
	}
}

func TestValidID(t *testing.T) {
	cases := []struct {
		id   string
		want bool
	}{
		{"95A3298456E", true},
		{"4jd1xH4g2Fz1SCkh", true},
		{"4jd1xH5xKfz1SCl3", true},
		{"4Q5DJ64Y9Lz2Gwvn", true},
		{"zzzzzzzzzzz1", true}, // 'z' is a time digit; the last one separates
		{"ABCDEF", true},
		{"ABCDE", false},                 // too short
		{"95a3298456e", false},           // short IDs are upper case
		{"-d", false},                    // an option
		{"-95A3298456E", false},          // an option
		{"95A3298456E\n", false},         // a line end
		{"4jd1xH4g2F1SCkh", false},       // long without separator
		{"4jd1xH4gz2F1SCkh", false},      // separator too early
		{"4jd1xH4g2F1SCkhz", false},      // nothing after the separator
		{"4jd1xH4g2Faz1SCkh", false},     // a vowel
		{"4jd1xH4g2F/z1SCkh", false},     // a slash
		{"../../etc/passwd", false},      // a path
		{strings.Repeat("A", 33), false}, // too long
		{"", false},
	}
	for _, c := range cases {
		if got := ValidID(c.id); got != c.want {
			t.Errorf("ValidID(%q) = %v, want %v", c.id, got, c.want)
		}
	}
}
