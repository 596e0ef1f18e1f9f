package callout

import (
	"bufio"
	"strings"
	"testing"
	"unicode/utf8"
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

// FuzzReadReply feeds arbitrary server output to the reply reader: it
// never panics, never returns more lines than the bound, and a reply it
// accepts has a code of 200 to 599 and a text safe to log.
func FuzzReadReply(f *testing.F) {
	for _, s := range []string{
		"220 mx.example ESMTP\r\n",
		"250-mx.example\r\n250-PIPELINING\r\n250 STARTTLS\r\n",
		"550-5.1.1 first\r\n550 5.1.1 second\r\n",
		"550 5.1.1 <x@y>: Recipient address rejected: User unknown in relay recipient table\r\n",
		"250-a\r\n251 b\r\n",
		"HTTP/1.1 200 OK\r\n",
		"999 \x00\x1b[31m\r\n",
		"2",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		s := &session{r: bufio.NewReaderSize(strings.NewReader(in), maxReplyLine)}
		r, lines, err := s.readReply()
		if err != nil {
			return
		}
		if r.Code < 200 || r.Code > 599 || len(lines) == 0 || len(lines) > maxReplyLines {
			t.Fatalf("reply %+v with %d lines from %q", r, len(lines), in)
		}
		if strings.ContainsAny(r.Text, "\r\n\x00\x1b") || !utf8.ValidString(r.Text) {
			t.Fatalf("unsafe text %q from %q", r.Text, in)
		}
	})
}
