package callout

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"unicode/utf8"

	"golang.org/x/net/idna"
)

// ErrSyntax is wrapped by every error ParseAddress returns. The wrapping
// error names what is wrong, e.g. "callout: bad address syntax: local part
// longer than 64 octets".
var ErrSyntax = errors.New("callout: bad address syntax")

// Address is a recipient mailbox split into its parts.
//
// The zero Address is not a valid mailbox; ParseAddress never returns it
// without an error.
type Address struct {
	// Local is the local part in canonical form. A quoted local part whose
	// content is a valid dot-atom is stored unquoted (RFC 5321 §4.1.2 says
	// the unquoted form SHOULD be used); any other quoted local part is
	// stored as its content, without the quotes and with quoted-pairs
	// unescaped. String quotes and escapes it again.
	Local string

	// Domain is the domain in lower-case A-label (punycode) form, without
	// a trailing dot. It is "" for address literals.
	Domain string

	// Literal is set instead of Domain for address literals such as
	// user@[192.0.2.1] and user@[IPv6:2001:db8::1].
	Literal netip.Addr

	// UTF8 reports that the local part has non-ASCII characters, so a probe
	// needs the SMTPUTF8 extension (RFC 6531). A non-ASCII domain does not
	// set it: the domain is kept as an A-label.
	UTF8 bool
}

// Limits from RFC 5321 §4.5.3.1 and RFC 1035 §2.3.4. The path limit of 256
// octets includes the angle brackets, which leaves 254 for the address (RFC
// 3696 errata 1690).
const (
	addrMaxLocal   = 64
	addrMaxLabel   = 63
	addrMaxDomain  = 253 // 255 octets on the wire, less the root label and a length octet
	addrMaxAddress = 254
)

// addrIDNA converts internationalised domain names to A-labels the way a
// resolver would look them up (RFC 5891 §5, UTS #46 non-transitional).
// The hyphen rules are checked by addrCheckULabels instead, because UTS #46
// CheckHyphens also rejects ASCII labels such as "r3--sn-abc" that are in
// use in the DNS, in any domain that has an internationalised label.
var addrIDNA = idna.New(
	idna.MapForLookup(),
	idna.Transitional(false),
	idna.StrictDomainName(true),
	idna.BidiRule(),
	idna.ValidateLabels(true),
	idna.CheckHyphens(false),
)

// addrAtext marks the ASCII characters allowed in a dot-atom (RFC 5322
// §3.2.3 atext). Non-ASCII characters are handled apart (RFC 6531 §3.3).
var addrAtext = func() (t [128]bool) {
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
	}
	for c := 'A'; c <= 'Z'; c++ {
		t[c] = true
	}
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for _, c := range "!#$%&'*+-/=?^_`{|}~" {
		t[c] = true
	}
	return t
}()

// addrErr returns an error wrapping ErrSyntax with detail.
func addrErr(detail string) error {
	return fmt.Errorf("%w: %s", ErrSyntax, detail)
}

// ParseAddress parses a recipient mailbox (RFC 5321 §4.1.2 Mailbox, with
// the UTF-8 extensions of RFC 6531).
//
// Surrounding spaces and tabs are trimmed and one pair of angle brackets
// is removed. The null path "<>", source routes, address literals other
// than IPv4 and IPv6, and anything over the lengths of RFC 5321 §4.5.3.1
// are rejected. Every error wraps ErrSyntax. ParseAddress uses no network.
func ParseAddress(s string) (Address, error) {
	s = strings.Trim(s, " \t")
	if strings.HasPrefix(s, "<") {
		if !strings.HasSuffix(s, ">") {
			return Address{}, addrErr("unbalanced angle bracket")
		}
		s = s[1 : len(s)-1]
		if s == "" {
			return Address{}, addrErr("null path <>")
		}
	} else if strings.HasSuffix(s, ">") {
		return Address{}, addrErr("unbalanced angle bracket")
	}
	if s == "" {
		return Address{}, addrErr("empty address")
	}
	if len(s) > 4*addrMaxAddress {
		// Canonicalisation can shorten an address (quoted-pairs, IDNA
		// mapping), but input this long is not a real address; don't
		// spend time on it.
		return Address{}, addrErr("address longer than 254 octets")
	}
	if s[0] == '@' {
		if strings.IndexByte(s, ':') >= 0 {
			return Address{}, addrErr("source route")
		}
		return Address{}, addrErr("empty local part")
	}

	var a Address
	var rest string
	var err error
	if s[0] == '"' {
		a.Local, a.UTF8, rest, err = addrParseQuoted(s)
	} else {
		a.Local, a.UTF8, rest, err = addrParseDotAtom(s)
	}
	if err != nil {
		return Address{}, err
	}
	if rest == "" || rest[0] != '@' {
		return Address{}, addrErr("missing @")
	}
	dom := rest[1:]
	if dom == "" {
		return Address{}, addrErr("empty domain")
	}
	localLen := addrLocalLen(a.Local)
	if localLen > addrMaxLocal {
		return Address{}, addrErr("local part longer than 64 octets")
	}
	domLen := 0
	if dom[0] == '[' {
		if a.Literal, err = addrParseLiteral(dom); err == nil {
			domLen = addrLiteralLen(a.Literal)
		}
	} else if a.Domain, err = addrParseDomain(dom); err == nil {
		domLen = len(a.Domain)
	}
	if err != nil {
		return Address{}, err
	}
	if localLen+1+domLen > addrMaxAddress {
		return Address{}, addrErr("address longer than 254 octets")
	}
	return a, nil
}

// addrParseDotAtom reads an unquoted local part from the start of s, up to
// the first "@". It returns the local part, whether it has non-ASCII
// characters, and the rest of s starting at the "@".
func addrParseDotAtom(s string) (local string, utf8Local bool, rest string, err error) {
	i := 0
	prevDot := true // a leading dot is as bad as a double one
	for i < len(s) {
		c := s[i]
		if c == '@' {
			break
		}
		if c == '.' {
			if prevDot {
				if i == 0 {
					return "", false, "", addrErr("local part starts with a dot")
				}
				return "", false, "", addrErr("local part has consecutive dots")
			}
			prevDot = true
			i++
			continue
		}
		prevDot = false
		if c < utf8.RuneSelf {
			if !addrAtext[c] {
				return "", false, "", addrErr(addrCharDetail("local part", c))
			}
			i++
			continue
		}
		n, ok := addrNonASCII(s[i:])
		if !ok {
			return "", false, "", addrErr("invalid UTF-8 or control character in local part")
		}
		utf8Local = true
		i += n
	}
	if i == 0 {
		return "", false, "", addrErr("empty local part")
	}
	if prevDot {
		return "", false, "", addrErr("local part ends with a dot")
	}
	return s[:i], utf8Local, s[i:], nil
}

// addrParseQuoted reads a quoted-string local part (RFC 5321 Quoted-string,
// RFC 6531 §3.3) from the start of s, which begins with '"'. It returns the
// canonical local part, whether it has non-ASCII characters, and the rest of
// s after the closing quote.
func addrParseQuoted(s string) (local string, utf8Local bool, rest string, err error) {
	var b []byte // unescaped content, only allocated when there is an escape
	start := 1
	i := 1
	for {
		if i >= len(s) {
			return "", false, "", addrErr("unterminated quoted string")
		}
		c := s[i]
		switch {
		case c == '"':
			content := s[start:i]
			if b != nil {
				content = string(append(b, content...))
			}
			// The content is the canonical form either way: String
			// leaves a dot-atom unquoted and quotes anything else.
			return content, utf8Local, s[i+1:], nil
		case c == '\\':
			if i+1 >= len(s) {
				return "", false, "", addrErr("unterminated quoted string")
			}
			e := s[i+1]
			if e < 0x20 || e > 0x7e {
				return "", false, "", addrErr("bad quoted-pair in local part")
			}
			if b == nil {
				b = make([]byte, 0, len(s))
			}
			b = append(b, s[start:i]...)
			b = append(b, e)
			i += 2
			start = i
		case c < 0x20 || c == 0x7f:
			return "", false, "", addrErr(addrCharDetail("quoted local part", c))
		case c < utf8.RuneSelf:
			i++
		default:
			n, ok := addrNonASCII(s[i:])
			if !ok {
				return "", false, "", addrErr("invalid UTF-8 or control character in local part")
			}
			utf8Local = true
			i += n
		}
	}
}

// addrNonASCII decodes the non-ASCII rune at the start of s. It reports its
// length and whether it is acceptable in a local part: valid UTF-8 and not
// a C1 control character.
func addrNonASCII(s string) (int, bool) {
	r, n := utf8.DecodeRuneInString(s)
	if r == utf8.RuneError && n <= 1 {
		return n, false
	}
	if r >= 0x80 && r <= 0x9f {
		return n, false
	}
	return n, true
}

// addrCharDetail describes a character that is not allowed in part.
func addrCharDetail(part string, c byte) string {
	switch c {
	case 0:
		return "NUL in " + part
	case '\r', '\n':
		return "line break in " + part
	}
	if c < 0x20 || c == 0x7f {
		return "control character in " + part
	}
	return fmt.Sprintf("character %q not allowed in %s", c, part)
}

// addrIsDotAtom reports whether local can be sent without quotes: a
// non-empty dot-atom whose characters are atext or non-ASCII.
func addrIsDotAtom(local string) bool {
	if local == "" || local[0] == '.' || local[len(local)-1] == '.' {
		return false
	}
	prevDot := false
	for i := 0; i < len(local); i++ {
		c := local[i]
		if c == '.' {
			if prevDot {
				return false
			}
			prevDot = true
			continue
		}
		prevDot = false
		if c < utf8.RuneSelf && !addrAtext[c] {
			return false
		}
	}
	return true
}

// addrLocalLen returns the length in octets of local as String sends it.
func addrLocalLen(local string) int {
	if addrIsDotAtom(local) {
		return len(local)
	}
	n := len(local) + 2
	for i := 0; i < len(local); i++ {
		if local[i] == '"' || local[i] == '\\' {
			n++
		}
	}
	return n
}

// addrParseLiteral parses an address literal, "[192.0.2.1]" or
// "[IPv6:2001:db8::1]" (RFC 5321 §4.1.3).
func addrParseLiteral(s string) (netip.Addr, error) {
	if len(s) < 2 || s[len(s)-1] != ']' {
		return netip.Addr{}, addrErr("unterminated address literal")
	}
	inner := s[1 : len(s)-1]
	if len(inner) >= 5 && strings.EqualFold(inner[:5], "IPv6:") {
		ip, err := netip.ParseAddr(inner[5:])
		if err != nil || !ip.Is6() || ip.Zone() != "" {
			return netip.Addr{}, addrErr("bad IPv6 address literal")
		}
		return ip, nil
	}
	if strings.IndexByte(inner, ':') >= 0 {
		return netip.Addr{}, addrErr("unsupported address literal")
	}
	ip, err := netip.ParseAddr(inner)
	if err != nil || !ip.Is4() {
		return netip.Addr{}, addrErr("bad IPv4 address literal")
	}
	return ip, nil
}

// addrLiteralLen returns the length of the bracketed literal String sends.
func addrLiteralLen(ip netip.Addr) int {
	if ip.Is4() {
		return len(ip.String()) + 2
	}
	return len(ip.String()) + len("[IPv6:]")
}

// addrParseDomain validates a domain and returns it as lower-case A-labels
// without a trailing dot.
func addrParseDomain(s string) (string, error) {
	ascii := true
	for i := 0; i < len(s); i++ {
		if s[i] >= utf8.RuneSelf {
			ascii = false
			break
		}
	}
	if !ascii {
		if !utf8.ValidString(s) {
			return "", addrErr("invalid UTF-8 in domain")
		}
		if len(s) > 4*addrMaxDomain {
			return "", addrErr("domain longer than 253 octets")
		}
		a, err := addrIDNA.ToASCII(s)
		if err != nil {
			return "", addrErr("bad internationalised domain: " + err.Error())
		}
		s = a
	}
	s = strings.TrimSuffix(s, ".")
	return addrCheckASCIIDomain(s)
}

// addrCheckASCIIDomain validates an ASCII domain without a trailing dot
// (RFC 5321 §4.1.2 Domain, RFC 1123 §2.1, RFC 5891 for A-labels) and returns
// it in lower case.
func addrCheckASCIIDomain(s string) (string, error) {
	if s == "" {
		return "", addrErr("empty domain")
	}
	if len(s) > addrMaxDomain {
		return "", addrErr("domain longer than 253 octets")
	}
	upper, ace := false, false
	last := ""
	for label := range strings.SplitSeq(s, ".") {
		u, a, err := addrCheckLabel(label)
		if err != nil {
			return "", err
		}
		upper, ace, last = upper || u, ace || a, label
	}
	if strings.Trim(last, "0123456789") == "" {
		return "", addrErr("all-numeric top-level domain")
	}
	if upper {
		s = strings.ToLower(s)
	}
	if ace {
		return addrCheckALabels(s)
	}
	return s, nil
}

// addrCheckLabel checks one ASCII label of a domain: its characters first
// (letters, digits, hyphens), then its shape. It reports whether the label
// has upper-case letters and whether it is an A-label ("xn--").
func addrCheckLabel(label string) (upper, ace bool, err error) {
	for i := 0; i < len(label); i++ {
		switch c := label[i]; {
		case c >= '0' && c <= '9', c >= 'a' && c <= 'z', c == '-':
		case c >= 'A' && c <= 'Z':
			upper = true
		case c == '_':
			return false, false, addrErr("underscore in domain")
		default:
			return false, false, addrErr(addrCharDetail("domain", c))
		}
	}
	switch {
	case label == "":
		return false, false, addrErr("empty label in domain")
	case len(label) > addrMaxLabel:
		return false, false, addrErr("domain label longer than 63 octets")
	case label[0] == '-':
		return false, false, addrErr("domain label starts with a hyphen")
	case label[len(label)-1] == '-':
		return false, false, addrErr("domain label ends with a hyphen")
	}
	ace = len(label) >= 4 && label[2] == '-' && label[3] == '-' && strings.EqualFold(label[:2], "xn")
	return upper, ace, nil
}

// addrCheckALabels checks the A-labels of a lower-case ASCII domain: each
// must decode to a valid U-label and be its canonical encoding, so that
// "bücher.example" and "xn--bcher-kva.example" give the same Domain and
// re-parsing is stable.
func addrCheckALabels(s string) (string, error) {
	u, err := addrIDNA.ToUnicode(s)
	if err != nil {
		return "", addrErr("bad A-label in domain: " + err.Error())
	}
	if err := addrCheckULabels(u); err != nil {
		return "", err
	}
	if a, err := addrIDNA.ToASCII(u); err != nil || a != s {
		return "", addrErr("A-label in domain is not in canonical form")
	}
	return s, nil
}

// addrCheckULabels applies the hyphen rules of RFC 5891 §4.2.3.1 to the
// U-labels of a domain: no hyphen at the start or end, and none in both the
// third and fourth positions.
func addrCheckULabels(u string) error {
	for label := range strings.SplitSeq(u, ".") {
		if label == "" {
			continue
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return addrErr("internationalised domain label starts or ends with a hyphen")
		}
		ascii := true
		for i := 0; i < len(label); i++ {
			if label[i] >= utf8.RuneSelf {
				ascii = false
				break
			}
		}
		if ascii {
			continue // LDH label, checked already
		}
		var third, fourth rune
		n := 0
		for _, r := range label {
			n++
			if n == 3 {
				third = r
			} else if n == 4 {
				fourth = r
				break
			}
		}
		if third == '-' && fourth == '-' {
			return addrErr("internationalised domain label has hyphens in the third and fourth positions")
		}
	}
	return nil
}

// String returns the address as sent in RCPT TO, without angle brackets:
// local@domain or local@[literal]. A local part that is not a dot-atom is
// quoted, with '"' and '\' escaped. The zero Address gives "".
func (a Address) String() string {
	var dom string
	switch {
	case a.Domain != "":
		dom = a.Domain
	case a.Literal.Is4():
		dom = "[" + a.Literal.String() + "]"
	case a.Literal.IsValid():
		dom = "[IPv6:" + a.Literal.String() + "]"
	default:
		return ""
	}
	if addrIsDotAtom(a.Local) {
		return a.Local + "@" + dom
	}
	var b strings.Builder
	b.Grow(addrLocalLen(a.Local) + 1 + len(dom))
	b.WriteByte('"')
	for i := 0; i < len(a.Local); i++ {
		c := a.Local[i]
		if c == '"' || c == '\\' {
			b.WriteByte('\\')
		}
		b.WriteByte(c)
	}
	b.WriteString(`"@`)
	b.WriteString(dom)
	return b.String()
}

// Key returns String in lower case, the key under which verdicts are
// cached. Local parts are case-sensitive in theory (RFC 5321 §2.4) but
// practically never in use, so addresses that differ only in case share a
// verdict.
func (a Address) Key() string {
	return strings.ToLower(a.String())
}
