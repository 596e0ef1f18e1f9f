package callout

import (
	"net/netip"
	"testing"
)

func TestSafeAddr(t *testing.T) {
	tests := []struct {
		ip   string
		safe bool
	}{
		// IPv4, unsafe.
		{"127.0.0.1", false},
		{"127.255.255.254", false},
		{"10.0.0.1", false},
		{"172.16.0.1", false},
		{"172.31.255.255", false},
		{"192.168.1.1", false},
		{"169.254.169.254", false},
		{"100.64.1.1", false},
		{"100.127.255.255", false},
		{"0.0.0.0", false},
		{"0.1.2.3", false},
		{"192.0.0.8", false},
		{"192.0.2.10", false},
		{"198.18.0.1", false},
		{"198.19.255.255", false},
		{"198.51.100.7", false},
		{"203.0.113.99", false},
		{"224.0.0.251", false},
		{"239.255.255.250", false},
		{"240.0.0.1", false},
		{"255.255.255.255", false},

		// IPv4, safe: values only, nothing is contacted.
		{"8.8.8.8", true},
		{"1.1.1.1", true},
		{"172.32.0.1", true},
		{"100.128.0.1", true},
		{"198.20.0.1", true},
		{"192.0.1.1", true},
		{"11.0.0.1", true},

		// IPv6, unsafe.
		{"::1", false},
		{"::", false},
		{"fe80::1", false},
		{"fe80::1%eth0", false},
		{"fc00::1", false},
		{"fd12:3456:789a::1", false},
		{"fec0::1", false},
		{"ff02::1", false},
		{"100::1", false},
		{"2001:db8::1", false},
		{"2001::1", false},             // Teredo
		{"2001:0:4136:e378::1", false}, // Teredo
		{"2001:2::1", false},           // benchmarking
		{"3fff::1", false},             // documentation, RFC 9637
		{"5f00::1", false},             // outside 2000::/3

		// Embedded IPv4.
		{"::ffff:127.0.0.1", false},
		{"::ffff:10.1.2.3", false},
		{"::ffff:169.254.169.254", false},
		{"::ffff:8.8.8.8", true},
		{"::127.0.0.1", false}, // IPv4-compatible
		{"::8.8.8.8", false},   // IPv4-compatible: deprecated, never safe
		{"64:ff9b::7f00:1", false},
		{"64:ff9b::a00:1", false},
		{"64:ff9b::808:808", true},
		{"64:ff9b:1::808:808", false}, // local-use NAT64, RFC 8215
		{"2002:7f00:1::1", false},
		{"2002:c0a8:101::1", false},
		{"2002:808:808::1", true},

		// IPv6, safe.
		{"2a00:1450::1", true},
		{"2a00:1450:4001:82b::200e", true},
		{"2001:4860:4860::8888", true},
		{"2600::1", true},
	}
	for _, tc := range tests {
		ip := netip.MustParseAddr(tc.ip)
		if got := safeAddr(ip); got != tc.safe {
			t.Errorf("safeAddr(%s) = %v, want %v", tc.ip, got, tc.safe)
		}
	}
	if safeAddr(netip.Addr{}) {
		t.Error("safeAddr(zero Addr) = true, want false")
	}
}
