package callout

import "net/netip"

// safeV4Unsafe lists the IPv4 ranges the verifier must not connect to
// unless private targets are allowed: nothing in them is a public mail
// server, and several of them reach the verifier's own host or network
// (RFC 6890 and the IANA special-purpose address registry).
var safeV4Unsafe = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),       // "this network", unspecified
	netip.MustParsePrefix("10.0.0.0/8"),      // RFC 1918
	netip.MustParsePrefix("100.64.0.0/10"),   // shared address space (CGNAT), RFC 6598
	netip.MustParsePrefix("127.0.0.0/8"),     // loopback
	netip.MustParsePrefix("169.254.0.0/16"),  // link-local, cloud metadata services
	netip.MustParsePrefix("172.16.0.0/12"),   // RFC 1918
	netip.MustParsePrefix("192.0.0.0/24"),    // IETF protocol assignments
	netip.MustParsePrefix("192.0.2.0/24"),    // documentation (TEST-NET-1)
	netip.MustParsePrefix("192.168.0.0/16"),  // RFC 1918
	netip.MustParsePrefix("198.18.0.0/15"),   // benchmarking
	netip.MustParsePrefix("198.51.100.0/24"), // documentation (TEST-NET-2)
	netip.MustParsePrefix("203.0.113.0/24"),  // documentation (TEST-NET-3)
	netip.MustParsePrefix("224.0.0.0/4"),     // multicast
	netip.MustParsePrefix("240.0.0.0/4"),     // reserved, and 255.255.255.255 broadcast
}

var (
	// safeV6Global is the only IPv6 space IANA allocates for global
	// unicast. Everything outside it (::/8 with the IPv4-compatible
	// forms, 100::/64 discard-only, fc00::/7 unique local, fe80::/10
	// link-local, fec0::/10 site-local, ff00::/8 multicast, ...) is unsafe,
	// except NAT64, which is judged by the IPv4 address it embeds.
	safeV6Global = netip.MustParsePrefix("2000::/3")

	// safeV6NAT64 is the well-known NAT64 prefix (RFC 6052); the IPv4
	// address is in the last 32 bits.
	safeV6NAT64 = netip.MustParsePrefix("64:ff9b::/96")

	// safeV66to4 is 6to4 (RFC 3056); the IPv4 address follows the
	// prefix, in bits 16 to 47.
	safeV66to4 = netip.MustParsePrefix("2002::/16")

	// safeV6Unsafe are special-purpose ranges inside 2000::/3.
	safeV6Unsafe = []netip.Prefix{
		netip.MustParsePrefix("2001::/23"),     // IETF protocol assignments: Teredo 2001::/32, benchmarking, ORCHID
		netip.MustParsePrefix("2001:db8::/32"), // documentation
		netip.MustParsePrefix("3fff::/20"),     // documentation, RFC 9637
	}
)

// safeAddr reports whether the verifier may connect to ip when private
// targets are not allowed (callout.allow_private = false). It only looks at
// the address; nothing is contacted.
//
// safeAddr is false for the invalid zero Addr, for zoned addresses, and for
// loopback, private (RFC 1918, fc00::/7), link-local (169.254.0.0/16,
// fe80::/10), multicast, unspecified, shared (CGNAT, 100.64.0.0/10),
// 0.0.0.0/8, 192.0.0.0/24, benchmarking (198.18.0.0/15), documentation
// (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32,
// 3fff::/20), reserved (240.0.0.0/4) and broadcast addresses. IPv6 is safe
// only inside the global unicast space 2000::/3, without Teredo (2001::/32)
// and the rest of 2001::/23. IPv4-mapped addresses (::ffff:a.b.c.d), NAT64
// addresses (64:ff9b::/96) and 6to4 addresses (2002::/16) are judged by the
// IPv4 address they embed. IPv4-compatible addresses (::a.b.c.d) and the
// discard-only prefix 100::/64 lie outside 2000::/3 and are never safe.
func safeAddr(ip netip.Addr) bool {
	if !ip.IsValid() || ip.Zone() != "" {
		return false
	}
	ip = ip.Unmap()
	if ip.Is4() {
		return safeV4(ip)
	}
	b := ip.As16()
	switch {
	case safeV6NAT64.Contains(ip):
		return safeV4(netip.AddrFrom4([4]byte(b[12:16])))
	case safeV66to4.Contains(ip):
		return safeV4(netip.AddrFrom4([4]byte(b[2:6])))
	case !safeV6Global.Contains(ip):
		return false
	}
	for _, p := range safeV6Unsafe {
		if p.Contains(ip) {
			return false
		}
	}
	return true
}

// safeV4 reports whether the IPv4 address ip is outside every unsafe range.
func safeV4(ip netip.Addr) bool {
	for _, p := range safeV4Unsafe {
		if p.Contains(ip) {
			return false
		}
	}
	return true
}
