package callout

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

// addrTest is one ParseAddress case. When err is empty the input must
// parse to want, print as str (when set) and have the key key (when set).
// Otherwise the error must wrap ErrSyntax and contain err.
type addrTest struct {
	in   string
	want Address
	str  string
	key  string
	err  string
}

var addrTests = []addrTest{
	// Plain dot-atoms.
	{in: "john.doe@example.com", want: Address{Local: "john.doe", Domain: "example.com"}, str: "john.doe@example.com"},
	{in: "John.Doe@Example.COM", want: Address{Local: "John.Doe", Domain: "example.com"}, str: "John.Doe@example.com", key: "john.doe@example.com"},
	{in: "user+tag@example.com", want: Address{Local: "user+tag", Domain: "example.com"}},
	{in: "!#$%&'*+-/=?^_`{|}~@example.com", want: Address{Local: "!#$%&'*+-/=?^_`{|}~", Domain: "example.com"}},
	{in: "a@localhost", want: Address{Local: "a", Domain: "localhost"}},
	{in: "a@123.example", want: Address{Local: "a", Domain: "123.example"}},
	{in: "a@r3--sn-abc.example", want: Address{Local: "a", Domain: "r3--sn-abc.example"}},
	{in: "a@b.c.", want: Address{Local: "a", Domain: "b.c"}, str: "a@b.c"},

	// Angle brackets and surrounding blanks.
	{in: "<a@b.c>", want: Address{Local: "a", Domain: "b.c"}, str: "a@b.c"},
	{in: " \t<a@b.c> ", want: Address{Local: "a", Domain: "b.c"}, str: "a@b.c"},
	{in: "  a@b.c  ", want: Address{Local: "a", Domain: "b.c"}, str: "a@b.c"},

	// Quoted local parts.
	{in: `"john doe"@example.com`, want: Address{Local: "john doe", Domain: "example.com"}, str: `"john doe"@example.com`},
	{in: `"john\"doe"@example.com`, want: Address{Local: `john"doe`, Domain: "example.com"}, str: `"john\"doe"@example.com`},
	{in: `"a\\b"@example.com`, want: Address{Local: `a\b`, Domain: "example.com"}, str: `"a\\b"@example.com`},
	{in: `"john"@example.com`, want: Address{Local: "john", Domain: "example.com"}, str: "john@example.com"},
	{in: `"\j\o\h\n"@example.com`, want: Address{Local: "john", Domain: "example.com"}, str: "john@example.com"},
	{in: `"a..b"@x.com`, want: Address{Local: "a..b", Domain: "x.com"}, str: `"a..b"@x.com`},
	{in: `".a"@x.com`, want: Address{Local: ".a", Domain: "x.com"}, str: `".a"@x.com`},
	{in: `"a@b"@x.com`, want: Address{Local: "a@b", Domain: "x.com"}, str: `"a@b"@x.com`},
	{in: `""@x.com`, want: Address{Local: "", Domain: "x.com"}, str: `""@x.com`},
	{in: `"  "@x.com`, want: Address{Local: "  ", Domain: "x.com"}, str: `"  "@x.com`},

	// Internationalised addresses.
	{in: "user@bücher.example", want: Address{Local: "user", Domain: "xn--bcher-kva.example"}, str: "user@xn--bcher-kva.example"},
	{in: "user@xn--bcher-kva.example", want: Address{Local: "user", Domain: "xn--bcher-kva.example"}},
	{in: "user@XN--BCHER-KVA.Example", want: Address{Local: "user", Domain: "xn--bcher-kva.example"}},
	{in: "user@BÜCHER.example", want: Address{Local: "user", Domain: "xn--bcher-kva.example"}},
	{in: "user@bücher。example", want: Address{Local: "user", Domain: "xn--bcher-kva.example"}},
	{in: "user@例え.テスト", want: Address{Local: "user", Domain: "xn--r8jz45g.xn--zckzah"}},
	{in: "üser@example.com", want: Address{Local: "üser", Domain: "example.com", UTF8: true}},
	{in: "Üser@Bücher.example", want: Address{Local: "Üser", Domain: "xn--bcher-kva.example", UTF8: true}, key: "üser@xn--bcher-kva.example"},
	{in: `"üser x"@example.com`, want: Address{Local: "üser x", Domain: "example.com", UTF8: true}, str: `"üser x"@example.com`},
	{in: "用户@例子.广告", want: Address{Local: "用户", Domain: "xn--fsqu00a.xn--4rr70v", UTF8: true}},

	// Address literals.
	{in: "a@[127.0.0.1]", want: Address{Local: "a", Literal: netip.MustParseAddr("127.0.0.1")}, str: "a@[127.0.0.1]"},
	{in: "a@[IPv6:::1]", want: Address{Local: "a", Literal: netip.MustParseAddr("::1")}, str: "a@[IPv6:::1]"},
	{in: "a@[ipv6:2001:DB8::1]", want: Address{Local: "a", Literal: netip.MustParseAddr("2001:db8::1")}, str: "a@[IPv6:2001:db8::1]", key: "a@[ipv6:2001:db8::1]"},
	{in: "a@[IPv6:::ffff:192.0.2.1]", want: Address{Local: "a", Literal: netip.MustParseAddr("::ffff:192.0.2.1")}, str: "a@[IPv6:::ffff:192.0.2.1]"},

	// Lengths at the limit.
	{in: strings.Repeat("l", 64) + "@x.com", want: Address{Local: strings.Repeat("l", 64), Domain: "x.com"}},
	{in: "a@" + strings.Repeat("d", 63) + ".com", want: Address{Local: "a", Domain: strings.Repeat("d", 63) + ".com"}},
	{in: addrLong(254), want: Address{Local: strings.Repeat("l", 64), Domain: addrLong(254)[65:]}},

	// Empty and null.
	{in: "", err: "empty address"},
	{in: "   ", err: "empty address"},
	{in: "<>", err: "null path"},
	{in: "<a@b.c", err: "angle bracket"},
	{in: "a@b.c>", err: "angle bracket"},
	{in: "<<a@b.c>>", err: "not allowed in local part"},
	{in: "< a@b.c>", err: "not allowed in local part"},

	// Local part.
	{in: "a..b@x.com", err: "consecutive dots"},
	{in: ".a@x.com", err: "starts with a dot"},
	{in: "a.@x.com", err: "ends with a dot"},
	{in: "a b@x.com", err: "not allowed in local part"},
	{in: "a(b)@x.com", err: "not allowed in local part"},
	{in: `a"b@x.com`, err: "not allowed in local part"},
	{in: `"a"b@x.com`, err: "missing @"},
	{in: `"ab@x.com`, err: "unterminated"},
	{in: `"ab\`, err: "unterminated"},
	{in: "\"a\\\x01\"@x.com", err: "quoted-pair"},
	{in: "\"a\tb\"@x.com", err: "control character"},
	{in: strings.Repeat("l", 65) + "@x.com", err: "local part longer than 64"},
	{in: `"` + strings.Repeat("l", 63) + `"@x.com`, want: Address{Local: strings.Repeat("l", 63), Domain: "x.com"}},
	{in: `"` + strings.Repeat(" ", 63) + `"@x.com`, err: "local part longer than 64"},
	{in: `"` + strings.Repeat(`\"`, 31) + `"@x.com`, want: Address{Local: strings.Repeat(`"`, 31), Domain: "x.com"}, str: `"` + strings.Repeat(`\"`, 31) + `"@x.com`},
	{in: `"` + strings.Repeat(`\"`, 32) + `"@x.com`, err: "local part longer than 64"},
	{in: "@b.c", err: "empty local part"},
	{in: "@a,@b:user@d.example", err: "source route"},
	{in: "<@a:user@d.example>", err: "source route"},
	{in: "a", err: "missing @"},

	// NUL, CR, LF, invalid UTF-8 and other controls anywhere.
	{in: "a\x00b@x.com", err: "NUL"},
	{in: "a@x\x00.com", err: "NUL"},
	{in: "\"a\x00b\"@x.com", err: "NUL"},
	{in: "a\rb@x.com", err: "line break"},
	{in: "a@x.com\r\n", err: "line break"},
	{in: "a\n@x.com", err: "line break"},
	{in: "\"a\r\nb\"@x.com", err: "line break"},
	{in: "a@[127.0.0.1]\n", err: "unterminated address literal"},
	{in: "\xffa@x.com", err: "invalid UTF-8"},
	{in: "\"\xff\"@x.com", err: "invalid UTF-8"},
	{in: "a@b\xff.com", err: "invalid UTF-8"},
	{in: "a\u0085b@x.com", err: "control character"},
	{in: "a\x7fb@x.com", err: "control character"},

	// Domain.
	{in: "a@", err: "empty domain"},
	{in: "a@.", err: "empty domain"},
	{in: "a@b@c", err: `'@' not allowed in domain`},
	{in: "a@-x.com", err: "starts with a hyphen"},
	{in: "a@x-.com", err: "ends with a hyphen"},
	{in: "a@x..com", err: "empty label"},
	{in: "a@.x.com", err: "empty label"},
	{in: "a@x.com..", err: "empty label"},
	{in: "a@b_c.com", err: "underscore"},
	{in: "a@b c.com", err: "not allowed in domain"},
	{in: "a@1.2.3.4", err: "all-numeric"},
	{in: "a@x.123", err: "all-numeric"},
	{in: "a@123", err: "all-numeric"},
	{in: "a@" + strings.Repeat("d", 64) + ".com", err: "label longer than 63"},
	{in: "a@xn--bcher-kva-.example", err: "ends with a hyphen"},
	{in: "a@xn--a.example", err: "A-label"},
	{in: "a@xn--ab-.example", err: "ends with a hyphen"},
	{in: "a@xn--abc.example", err: "A-label"},
	{in: "a@b\u00fc_c.example", err: "internationalised"},
	{in: "a@bü-.example", err: "ends with a hyphen"},
	{in: "a@-bü.example", err: "starts or ends with a hyphen"},
	{in: "a@xn--b--xka.example", err: "ends with a hyphen"},
	{in: "a@bü--x.example", err: "third and fourth"},
	{in: "a@ab--cd.bücher.example", want: Address{Local: "a", Domain: "ab--cd.xn--bcher-kva.example"}},
	{in: "a@b\u00adc.example", want: Address{Local: "a", Domain: "bc.example"}},
	{in: "a@b\u2488.example", err: "internationalised"}, // ⒈ maps to "1."

	// Address literals.
	{in: "a@[300.1.1.1]", err: "IPv4"},
	{in: "a@[1.2.3]", err: "IPv4"},
	{in: "a@[01.2.3.4]", err: "IPv4"},
	{in: "a@[]", err: "IPv4"},
	{in: "a@[127.0.0.1", err: "unterminated address literal"},
	{in: "a@[127.0.0.1].", err: "unterminated address literal"},
	{in: "a@[IPv6:1.2.3.4]", err: "IPv6"},
	{in: "a@[IPv6:fe80::1%eth0]", err: "IPv6"},
	{in: "a@[IPv6:2001:db8::g]", err: "IPv6"},
	{in: "a@[::1]", err: "unsupported address literal"},
	{in: "a@[x400:foo]", err: "unsupported address literal"},

	// Whole-address length.
	{in: addrLong(255), err: "longer than 254"},
	{in: addrLong(256), err: "longer than 254"},
	{in: strings.Repeat("l", 64) + "@" + strings.Repeat("d", 63) + "." + strings.Repeat("d", 63) + "." + strings.Repeat("d", 63) + "." + strings.Repeat("d", 63), err: "longer than"},
	{in: strings.Repeat("a", 5000) + "@x.com", err: "longer than 254"},
}

// addrLong returns an address of n octets: a 64-octet local part and a
// domain of 63-octet labels.
func addrLong(n int) string {
	s := strings.Repeat("l", 64) + "@"
	for len(s) < n {
		if len(s) > 65 {
			s += "."
		}
		s += strings.Repeat("d", min(63, n-len(s)))
	}
	if s[len(s)-1] == '.' || len(s) != n {
		panic("addrLong: bad length")
	}
	return s
}

func TestParseAddress(t *testing.T) {
	for _, tt := range addrTests {
		got, err := ParseAddress(tt.in)
		if tt.err != "" {
			if err == nil {
				t.Errorf("ParseAddress(%q) = %+v, want error containing %q", tt.in, got, tt.err)
				continue
			}
			if !errors.Is(err, ErrSyntax) {
				t.Errorf("ParseAddress(%q) error %v does not wrap ErrSyntax", tt.in, err)
			}
			if !strings.Contains(err.Error(), tt.err) {
				t.Errorf("ParseAddress(%q) error %q, want it to contain %q", tt.in, err, tt.err)
			}
			if got != (Address{}) {
				t.Errorf("ParseAddress(%q) returned %+v with an error, want the zero Address", tt.in, got)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParseAddress(%q) error: %v", tt.in, err)
			continue
		}
		if got != tt.want {
			t.Errorf("ParseAddress(%q) = %+v, want %+v", tt.in, got, tt.want)
		}
		str := tt.str
		if str == "" {
			str = tt.want.Local + "@" + tt.want.Domain
		}
		if s := got.String(); s != str {
			t.Errorf("ParseAddress(%q).String() = %q, want %q", tt.in, s, str)
		}
		key := tt.key
		if key == "" {
			key = strings.ToLower(str)
		}
		if k := got.Key(); k != key {
			t.Errorf("ParseAddress(%q).Key() = %q, want %q", tt.in, k, key)
		}
		again, err := ParseAddress(got.String())
		if err != nil || again != got {
			t.Errorf("ParseAddress(%q) round trip via %q = %+v, %v", tt.in, got.String(), again, err)
		}
	}
}

func TestParseAddressUnicodeEqualsALabel(t *testing.T) {
	u, err := ParseAddress("info@münchen.de")
	if err != nil {
		t.Fatal(err)
	}
	a, err := ParseAddress("info@xn--mnchen-3ya.de")
	if err != nil {
		t.Fatal(err)
	}
	if u != a || u.Key() != a.Key() {
		t.Errorf("U-label %+v and A-label %+v differ", u, a)
	}
}

func TestAddressStringZero(t *testing.T) {
	if s := (Address{}).String(); s != "" {
		t.Errorf("Address{}.String() = %q, want \"\"", s)
	}
}

func BenchmarkParseAddress(b *testing.B) {
	for _, bb := range []struct{ name, in string }{
		{"ascii", "john.doe@example.com"},
		{"ascii-upper", "<John.Doe@Example.COM>"},
		{"idn", "user@bücher.example"},
	} {
		b.Run(bb.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := ParseAddress(bb.in); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
