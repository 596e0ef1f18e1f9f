package test

import (
	"bufio"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"

	"github.com/miekg/dns"
)

// DNSServer is an authoritative-style DNS server for tests. It listens on
// 127.0.0.1, UDP and TCP on the same port, and answers from a zone given as
// text. It answers like a recursive resolver that knows only that zone: it
// chases CNAMEs inside the zone, and a name the zone does not hold does not
// exist.
//
// All methods are safe for concurrent use.
type DNSServer struct {
	// Addr is the "127.0.0.1:port" address the server answers on, over
	// both UDP and TCP.
	Addr string

	t testing.TB

	mu       sync.Mutex
	zone     *dnsTestZone
	servfail map[string]bool
	drop     map[string]bool
	truncate map[string]bool
	total    int
	perQuery map[dnsTestKey]int
}

type dnsTestKey struct {
	name  string // canonical: lower case, trailing dot
	qtype uint16
}

// dnsTestZone is a parsed zone. It is never modified after parsing, so it
// may be read without the server's lock.
type dnsTestZone struct {
	rrs    map[string][]dns.RR // by canonical owner name
	exists map[string]bool     // owner names and empty non-terminals
	soas   []*dns.SOA          // in zone order
}

// dnsTestMaxChase bounds CNAME chasing in answers, so that a CNAME loop in a
// zone yields a finite answer.
const dnsTestMaxChase = 16

// StartDNS starts a DNS server on 127.0.0.1 that serves zone until the end
// of the test.
//
// The zone is RFC 1035 master-file text with one resource record a line and
// absolute names, each line parsed with dns.NewRR; blank lines and lines
// starting with ';' are ignored. The server answers
//
//   - the records of the asked type for the name;
//   - for a name that has a CNAME, the CNAME and the chase of its target
//     inside the zone, as a recursive resolver would; the response code is
//     that of the last name in the chain;
//   - NOERROR with no answers (NODATA) for a name that exists with other
//     types or is an empty non-terminal;
//   - NXDOMAIN for a name that is not in the zone.
//
// Negative answers carry the zone's SOA in the authority section when the
// zone has one: the SOA of the closest enclosing apex, else the first SOA.
// Wildcards are not supported. Over UDP, answers larger than the client's
// EDNS0 buffer (512 bytes without EDNS0) are truncated with TC set.
func StartDNS(t testing.TB, zone string) *DNSServer {
	t.Helper()
	z, err := parseDNSTestZone(zone)
	if err != nil {
		t.Fatalf("test.StartDNS: %v", err)
	}
	s := &DNSServer{
		t:        t,
		zone:     z,
		servfail: make(map[string]bool),
		drop:     make(map[string]bool),
		truncate: make(map[string]bool),
		perQuery: make(map[dnsTestKey]int),
	}

	pc, ln, err := listenDNSPair()
	if err != nil {
		t.Fatalf("test.StartDNS: %v", err)
	}
	s.Addr = pc.LocalAddr().String()

	handler := dns.HandlerFunc(s.serve)
	udp := &dns.Server{PacketConn: pc, Handler: handler}
	tcp := &dns.Server{Listener: ln, Handler: handler}
	var wg sync.WaitGroup
	for _, srv := range []*dns.Server{udp, tcp} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		errc := make(chan error, 1)
		wg.Go(func() { errc <- srv.ActivateAndServe() })
		select {
		case <-started:
		case err := <-errc:
			t.Fatalf("test.StartDNS: serve %s: %v", s.Addr, err)
		}
	}
	t.Cleanup(func() {
		// Shutdown closes the sockets; ActivateAndServe then returns.
		if err := udp.Shutdown(); err != nil {
			t.Errorf("test.StartDNS: shut down UDP on %s: %v", s.Addr, err)
		}
		if err := tcp.Shutdown(); err != nil {
			t.Errorf("test.StartDNS: shut down TCP on %s: %v", s.Addr, err)
		}
		wg.Wait()
	})
	return s
}

// listenDNSPair listens on a free UDP port of 127.0.0.1 and then on TCP on
// the same port. Another process may hold the TCP port; then it tries
// again with a new port.
func listenDNSPair() (net.PacketConn, net.Listener, error) {
	var lastErr error
	for range 10 {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			return nil, nil, fmt.Errorf("listen udp: %w", err)
		}
		ln, err := net.Listen("tcp", pc.LocalAddr().String())
		if err == nil {
			return pc, ln, nil
		}
		pc.Close()
		lastErr = err
	}
	return nil, nil, fmt.Errorf("listen tcp on the UDP port: %w", lastErr)
}

// ServFail makes the server answer SERVFAIL to every query for name from
// now on.
func (s *DNSServer) ServFail(name string) {
	s.mark(s.servfail, name)
}

// Drop makes the server ignore every query for name from now on, so that
// clients time out. Dropped queries are counted by Queries and QueriesFor.
func (s *DNSServer) Drop(name string) {
	s.mark(s.drop, name)
}

// Truncate makes the server answer queries for name over UDP with the TC
// flag set and no records, so that clients retry over TCP; over TCP it
// answers fully.
func (s *DNSServer) Truncate(name string) {
	s.mark(s.truncate, name)
}

// mark adds name to one of the server's sets of names (servfail, drop,
// truncate).
func (s *DNSServer) mark(set map[string]bool, name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	set[dns.CanonicalName(name)] = true
}

// Set replaces the zone the server answers from, in the format StartDNS
// takes. ServFail, Drop and Truncate settings and query counts are kept.
func (s *DNSServer) Set(zone string) {
	s.t.Helper()
	z, err := parseDNSTestZone(zone)
	if err != nil {
		s.t.Fatalf("test.DNSServer.Set: %v", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.zone = z
}

// Queries returns the number of queries answered or dropped so far, over
// UDP and TCP together. A query is counted before it is answered, so the
// count includes every query a client has received an answer to.
func (s *DNSServer) Queries() int { return locked(&s.mu, func() int { return s.total }) }

// QueriesFor returns the number of queries for name and qtype (such as
// dns.TypeMX) answered or dropped so far, over UDP and TCP together.
func (s *DNSServer) QueriesFor(name string, qtype uint16) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.perQuery[dnsTestKey{dns.CanonicalName(name), qtype}]
}

// serve is the server's handler for UDP and TCP.
func (s *DNSServer) serve(w dns.ResponseWriter, req *dns.Msg) {
	resp := new(dns.Msg)
	if req.Opcode != dns.OpcodeQuery || len(req.Question) != 1 {
		resp.SetRcode(req, dns.RcodeFormatError)
		s.write(w, resp)
		return
	}
	q := req.Question[0]
	name := dns.CanonicalName(q.Name)
	_, isTCP := w.RemoteAddr().(*net.TCPAddr)

	s.mu.Lock()
	s.total++
	s.perQuery[dnsTestKey{name, q.Qtype}]++
	drop, servfail, truncate := s.drop[name], s.servfail[name], s.truncate[name]
	zone := s.zone
	s.mu.Unlock()

	if drop {
		return
	}
	resp.SetReply(req)
	resp.RecursionAvailable = true
	switch {
	case servfail:
		resp.Rcode = dns.RcodeServerFailure
	case truncate && !isTCP:
		resp.Truncated = true
	default:
		zone.answer(resp, name, q.Qtype)
	}

	size := dns.MinMsgSize
	if opt := req.IsEdns0(); opt != nil {
		size = max(int(opt.UDPSize()), dns.MinMsgSize)
		resp.SetEdns0(uint16(size), false)
	}
	if !isTCP {
		resp.Truncate(size)
	}
	s.write(w, resp)
}

func (s *DNSServer) write(w dns.ResponseWriter, resp *dns.Msg) {
	// A client that gave up has closed its socket; the error does not
	// matter to the test.
	_ = w.WriteMsg(resp)
}

// answer fills resp for the question (name, qtype). name is canonical.
func (z *dnsTestZone) answer(resp *dns.Msg, name string, qtype uint16) {
	seen := map[string]bool{name: true}
	cur := name
	for range dnsTestMaxChase {
		var cname *dns.CNAME
		found := false
		for _, rr := range z.rrs[cur] {
			if rr.Header().Rrtype == qtype {
				resp.Answer = append(resp.Answer, dns.Copy(rr))
				found = true
			} else if c, ok := rr.(*dns.CNAME); ok {
				cname = c
			}
		}
		if found || cname == nil {
			break
		}
		resp.Answer = append(resp.Answer, dns.Copy(cname))
		cur = dns.CanonicalName(cname.Target)
		if seen[cur] {
			// A loop: return the chain so far and let the client
			// notice.
			return
		}
		seen[cur] = true
	}
	if !z.exists[cur] {
		resp.Rcode = dns.RcodeNameError
	}
	if len(resp.Answer) > 0 && resp.Answer[len(resp.Answer)-1].Header().Rrtype == qtype {
		return
	}
	if soa := z.soaFor(cur); soa != nil {
		resp.Ns = append(resp.Ns, dns.Copy(soa))
	}
}

// soaFor returns the SOA of the closest zone apex enclosing name, else the
// first SOA of the zone, else nil.
func (z *dnsTestZone) soaFor(name string) *dns.SOA {
	for off, end := 0, false; !end; off, end = dns.NextLabel(name, off) {
		for _, rr := range z.rrs[name[off:]] {
			if soa, ok := rr.(*dns.SOA); ok {
				return soa
			}
		}
	}
	if len(z.soas) > 0 {
		return z.soas[0]
	}
	return nil
}

// parseDNSTestZone parses zone text for StartDNS and Set.
func parseDNSTestZone(text string) (*dnsTestZone, error) {
	z := &dnsTestZone{
		rrs:    make(map[string][]dns.RR),
		exists: make(map[string]bool),
	}
	sc := bufio.NewScanner(strings.NewReader(text))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, ";") {
			continue
		}
		rr, err := dns.NewRR(line)
		if err != nil {
			return nil, fmt.Errorf("zone line %d: %w", n, err)
		}
		if rr == nil {
			continue
		}
		owner := dns.CanonicalName(rr.Header().Name)
		rr.Header().Name = owner
		z.rrs[owner] = append(z.rrs[owner], rr)
		if soa, ok := rr.(*dns.SOA); ok {
			z.soas = append(z.soas, soa)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read zone: %w", err)
	}

	// Every owner exists, and so does every name between an owner and the
	// apex of its zone (or the root, without SOA): empty non-terminals.
	for owner := range z.rrs {
		apex := ""
		for _, soa := range z.soas {
			if dns.IsSubDomain(soa.Hdr.Name, owner) && len(soa.Hdr.Name) > len(apex) {
				apex = soa.Hdr.Name
			}
		}
		for off, end := 0, false; !end; off, end = dns.NextLabel(owner, off) {
			name := owner[off:]
			z.exists[name] = true
			if name == apex {
				break
			}
		}
	}
	delete(z.exists, ".")
	return z, nil
}
