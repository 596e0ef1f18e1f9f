package test

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

const dnsTestZoneText = `
; a small zone
example.com.        3600 IN SOA  ns.example.com. hostmaster.example.com. 1 7200 3600 1209600 300
example.com.        300  IN MX   10 mx1.example.com.
example.com.        300  IN MX   20 mx2.example.com.
mx1.example.com.    300  IN A    192.0.2.1
mx1.example.com.    300  IN AAAA 2001:db8::1
mx2.example.com.    300  IN CNAME real.example.com.
real.example.com.   300  IN A    192.0.2.2
host.sub.example.com. 300 IN A   192.0.2.3
loop1.example.com.  300  IN CNAME loop2.example.com.
loop2.example.com.  300  IN CNAME loop1.example.com.
dangling.example.com. 300 IN CNAME gone.example.com.
`

func dnsTestQuery(t *testing.T, network, addr, name string, qtype uint16, timeout time.Duration) (*dns.Msg, error) {
	t.Helper()
	c := &dns.Client{Net: network, Timeout: timeout}
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	r, _, err := c.Exchange(m, addr)
	return r, err
}

func dnsMustQuery(t *testing.T, network, addr, name string, qtype uint16) *dns.Msg {
	t.Helper()
	r, err := dnsTestQuery(t, network, addr, name, qtype, 2*time.Second)
	if err != nil {
		t.Fatalf("query %s %s over %s: %v", name, dns.TypeToString[qtype], network, err)
	}
	return r
}

func TestDNSServerAnswers(t *testing.T) {
	s := StartDNS(t, dnsTestZoneText)
	tests := []struct {
		name      string
		qtype     uint16
		rcode     int
		answer    []uint16 // types of the answer records, in order
		authority bool     // SOA in the authority section
	}{
		{"example.com", dns.TypeMX, dns.RcodeSuccess, []uint16{dns.TypeMX, dns.TypeMX}, false},
		{"mx1.example.com", dns.TypeA, dns.RcodeSuccess, []uint16{dns.TypeA}, false},
		{"MX1.Example.COM", dns.TypeAAAA, dns.RcodeSuccess, []uint16{dns.TypeAAAA}, false},
		{"mx2.example.com", dns.TypeA, dns.RcodeSuccess, []uint16{dns.TypeCNAME, dns.TypeA}, false},
		{"mx2.example.com", dns.TypeAAAA, dns.RcodeSuccess, []uint16{dns.TypeCNAME}, true},
		{"mx2.example.com", dns.TypeCNAME, dns.RcodeSuccess, []uint16{dns.TypeCNAME}, false},
		{"dangling.example.com", dns.TypeA, dns.RcodeNameError, []uint16{dns.TypeCNAME}, true},
		{"loop1.example.com", dns.TypeA, dns.RcodeSuccess, []uint16{dns.TypeCNAME, dns.TypeCNAME}, false},
		{"example.com", dns.TypeA, dns.RcodeSuccess, nil, true},         // NODATA
		{"sub.example.com", dns.TypeA, dns.RcodeSuccess, nil, true},     // empty non-terminal
		{"nope.example.com", dns.TypeMX, dns.RcodeNameError, nil, true}, // NXDOMAIN
		{"other.test", dns.TypeMX, dns.RcodeNameError, nil, true},       // outside the zone
		{"example.com", dns.TypeSOA, dns.RcodeSuccess, []uint16{dns.TypeSOA}, false},
	}
	for _, tc := range tests {
		for _, network := range []string{"udp", "tcp"} {
			r := dnsMustQuery(t, network, s.Addr, tc.name, tc.qtype)
			where := tc.name + " " + dns.TypeToString[tc.qtype] + " over " + network
			if r.Rcode != tc.rcode {
				t.Errorf("%s: rcode %s, want %s", where, dns.RcodeToString[r.Rcode], dns.RcodeToString[tc.rcode])
			}
			var got []uint16
			for _, rr := range r.Answer {
				got = append(got, rr.Header().Rrtype)
			}
			if len(got) != len(tc.answer) {
				t.Errorf("%s: answer %v, want types %v", where, r.Answer, tc.answer)
			} else {
				for i := range got {
					if got[i] != tc.answer[i] {
						t.Errorf("%s: answer %v, want types %v", where, r.Answer, tc.answer)
						break
					}
				}
			}
			hasSOA := len(r.Ns) == 1 && r.Ns[0].Header().Rrtype == dns.TypeSOA
			if hasSOA != tc.authority {
				t.Errorf("%s: authority %v, want SOA: %v", where, r.Ns, tc.authority)
			}
		}
	}
	if got, want := s.Queries(), 2*len(tests); got != want {
		t.Errorf("Queries() = %d, want %d", got, want)
	}
	if got := s.QueriesFor("EXAMPLE.com.", dns.TypeMX); got != 2 {
		t.Errorf("QueriesFor(example.com, MX) = %d, want 2", got)
	}
}

func TestDNSServerNoSOA(t *testing.T) {
	s := StartDNS(t, "a.example. 60 IN A 192.0.2.1")
	r := dnsMustQuery(t, "udp", s.Addr, "b.example", dns.TypeA)
	if r.Rcode != dns.RcodeNameError || len(r.Ns) != 0 {
		t.Errorf("got rcode %s, authority %v; want NXDOMAIN without authority", dns.RcodeToString[r.Rcode], r.Ns)
	}
	r = dnsMustQuery(t, "udp", s.Addr, "example", dns.TypeA)
	if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 0 {
		t.Errorf("empty non-terminal: got rcode %s, answer %v; want NODATA", dns.RcodeToString[r.Rcode], r.Answer)
	}
}

func TestDNSServerServFail(t *testing.T) {
	s := StartDNS(t, dnsTestZoneText)
	s.ServFail("example.com")
	r := dnsMustQuery(t, "udp", s.Addr, "example.com", dns.TypeMX)
	if r.Rcode != dns.RcodeServerFailure {
		t.Errorf("rcode %s, want SERVFAIL", dns.RcodeToString[r.Rcode])
	}
	if r := dnsMustQuery(t, "udp", s.Addr, "mx1.example.com", dns.TypeA); r.Rcode != dns.RcodeSuccess {
		t.Errorf("other name: rcode %s, want NOERROR", dns.RcodeToString[r.Rcode])
	}
}

func TestDNSServerTruncate(t *testing.T) {
	s := StartDNS(t, dnsTestZoneText)
	s.Truncate("example.com")
	r := dnsMustQuery(t, "udp", s.Addr, "example.com", dns.TypeMX)
	if !r.Truncated || len(r.Answer) != 0 {
		t.Errorf("UDP: truncated %v with %d answers, want TC and none", r.Truncated, len(r.Answer))
	}
	r = dnsMustQuery(t, "tcp", s.Addr, "example.com", dns.TypeMX)
	if r.Truncated || len(r.Answer) != 2 {
		t.Errorf("TCP: truncated %v with %d answers, want 2 answers", r.Truncated, len(r.Answer))
	}
}

func TestDNSServerTruncatesLargeUDPAnswers(t *testing.T) {
	var zone strings.Builder
	for i := range 60 {
		fmt.Fprintf(&zone, "big.example. 60 IN A 192.0.2.%d\n", i+1)
	}
	s := StartDNS(t, zone.String())
	r := dnsMustQuery(t, "udp", s.Addr, "big.example", dns.TypeA)
	if !r.Truncated {
		t.Errorf("UDP without EDNS0: %d answers, no TC; want TC", len(r.Answer))
	}
	r = dnsMustQuery(t, "tcp", s.Addr, "big.example", dns.TypeA)
	if r.Truncated || len(r.Answer) != 60 {
		t.Errorf("TCP: truncated %v with %d answers, want 60", r.Truncated, len(r.Answer))
	}
}

func TestDNSServerDrop(t *testing.T) {
	s := StartDNS(t, dnsTestZoneText)
	s.Drop("example.com")
	start := time.Now()
	_, err := dnsTestQuery(t, "udp", s.Addr, "example.com", dns.TypeMX, 100*time.Millisecond)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Errorf("dropped query: err %v, want a timeout", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("dropped query took %v", d)
	}
	if got := s.QueriesFor("example.com", dns.TypeMX); got != 1 {
		t.Errorf("QueriesFor = %d, want 1 (dropped queries count)", got)
	}
}

func TestDNSServerSet(t *testing.T) {
	s := StartDNS(t, "a.example. 60 IN A 192.0.2.1")
	s.Set("a.example. 60 IN A 192.0.2.9")
	r := dnsMustQuery(t, "udp", s.Addr, "a.example", dns.TypeA)
	if len(r.Answer) != 1 || r.Answer[0].(*dns.A).A.String() != "192.0.2.9" {
		t.Errorf("after Set: answer %v, want 192.0.2.9", r.Answer)
	}
}

func TestParseDNSTestZoneError(t *testing.T) {
	if _, err := parseDNSTestZone("a.example. 60 IN A not-an-ip"); err == nil {
		t.Error("parseDNSTestZone accepted a bad A record")
	}
}
