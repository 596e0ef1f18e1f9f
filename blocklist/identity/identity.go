// Package identity is the one rule for sender identities, used wherever an
// identity is read: policy requests (the detector), the blocklist file, the
// limits file and the configuration. An identity is a SASL user name or a
// client IP address; it is stored, compared and printed in its folded form.
//
// The rule, in the order it is checked:
//   - not empty, at most [Max] bytes (folding keeps the length, so the bound
//     holds for the stored form too);
//   - valid UTF-8;
//   - no white space, no control characters (C0, DEL, C1), no format
//     characters (Unicode Cf: bidirectional controls, zero-width
//     characters) and no line or paragraph separators, which would make a
//     log line, a table line or a report lie about what it shows;
//   - not starting with '#' (a comment in a Postfix table);
//   - no "=?": an RFC 2047 encoded word, which a mail client decodes into
//     arbitrary text (bidi overrides included) when it is put in a Subject.
//
// Case is folded for ASCII letters only, as Postfix folds table keys:
// "Bob@Example.COM" is "bob@example.com", but "\u212Aelly@x" (Kelvin sign)
// stays distinct from "kelly@x".
package identity

import (
	"errors"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Max is the longest identity in bytes: a 64-byte local part, '@' and a
// 255-byte domain.
const Max = 320

// ErrInvalid is wrapped by every error of [Check] and [Canonical]. It is
// permanent: the same input is always refused.
var ErrInvalid = errors.New("invalid identity")

// Fold returns s with the ASCII letters A to Z in lower case and every
// other byte as it is. It returns s itself, without allocating, when there
// is nothing to fold.
func Fold(s string) string {
	i := 0
	for i < len(s) && (s[i] < 'A' || s[i] > 'Z') {
		i++
	}
	if i == len(s) {
		return s
	}
	b := []byte(s)
	for ; i < len(b); i++ {
		if c := b[i]; 'A' <= c && c <= 'Z' {
			b[i] = c + ('a' - 'A')
		}
	}
	return string(b)
}

// Check returns nil when s is a valid identity (in any case), else an
// error wrapping [ErrInvalid] that says what is wrong, such as
// "invalid identity: contains white space".
func Check(s string) error {
	if p := problem(s); p != "" {
		return fmt.Errorf("%w: %s", ErrInvalid, p)
	}
	return nil
}

// Canonical checks s and returns its stored form, [Fold](s).
func Canonical(s string) (string, error) {
	if err := Check(s); err != nil {
		return "", err
	}
	return Fold(s), nil
}

// problem says what is wrong with s, "" when nothing is. It does not
// allocate for a valid identity.
func problem(s string) string {
	switch {
	case s == "":
		return "empty"
	case len(s) > Max:
		return fmt.Sprintf("longer than %d bytes", Max)
	case s[0] == '#':
		return "starts with '#'"
	case !utf8.ValidString(s):
		return "not valid UTF-8"
	case strings.Contains(s, "=?"):
		return `contains "=?" (an RFC 2047 encoded word)`
	}
	ascii := true
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c >= utf8.RuneSelf:
			ascii = false
		case c == ' ' || ('\t' <= c && c <= '\r'):
			return "contains white space"
		case c < ' ' || c == 0x7f:
			return fmt.Sprintf("contains control character %U", rune(c))
		}
	}
	if ascii {
		return ""
	}
	for _, r := range s {
		switch {
		case r < utf8.RuneSelf:
		case unicode.IsSpace(r): // NEL, NBSP, U+2028, U+2029 and the other Z
			return "contains white space"
		case unicode.IsControl(r):
			return fmt.Sprintf("contains control character %U", r)
		case unicode.Is(unicode.Cf, r):
			return fmt.Sprintf("contains format character %U", r)
		}
	}
	return ""
}
