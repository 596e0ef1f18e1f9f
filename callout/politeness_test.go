package callout

import (
	"fmt"
	"strings"
	"testing"

	"github.com/rcptguard/rcptguard/test"
)

// politeness is what a run of verifications cost the MX hosts.
type politeness struct {
	sessions, ehlos, quits, probes int
	probesPerDomain                map[string]int
	maxEHLOPerSession              int
}

// measurePoliteness verifies 100 addresses at 10 domains (5 existing and 5
// not at each), one after the other, interleaving the domains as mail to
// many people does, each domain with its own MX host, and counts sessions,
// EHLOs, QUITs and random-name probes seen by the MX hosts.
func measurePoliteness(t *testing.T, opts ...rigOption) politeness {
	t.Helper()
	var zone strings.Builder
	routes := test.RouteDialer{}
	mxs := map[string]*test.MX{}
	asked := map[string]bool{}
	for d := range 10 {
		dom := fmt.Sprintf("d%d.test", d)
		ip := fmt.Sprintf("127.0.1.%d", d+1)
		fmt.Fprintf(&zone, "%s. 300 IN MX 10 mx.%s.\nmx.%s. 300 IN A %s\n", dom, dom, dom, ip)
		var boxes []string
		for i := range 5 {
			boxes = append(boxes, fmt.Sprintf("user%d@%s", i, dom))
		}
		mxs[dom] = test.StartMX(t, test.MXConfig{Mailboxes: boxes})
		routes[ip] = mxs[dom].Addr
	}
	r := newRig(t, zone.String(), routes, opts...)
	for i := range 10 {
		for d := range 10 {
			local := fmt.Sprintf("user%d", i) // user5..user9 do not exist
			addr := fmt.Sprintf("%s@d%d.test", local, d)
			asked[addr] = true
			res := r.verify(addr)
			want := StatusValid
			if i >= 5 {
				want = StatusInvalid
			}
			if res.Status != want {
				t.Errorf("%s: %s, want %s", addr, res, want)
			}
		}
	}
	r.v.Close() // ends the lingering sessions
	p := politeness{probesPerDomain: map[string]int{}}
	for dom, mx := range mxs {
		for _, s := range mx.Sessions() {
			p.sessions++
			p.ehlos += s.EHLOs
			p.maxEHLOPerSession = max(p.maxEHLOPerSession, s.EHLOs)
			if s.Quit {
				p.quits++
			}
			for _, rc := range s.Rcpts {
				if !asked[strings.ToLower(rc)] {
					p.probes++
					p.probesPerDomain[dom]++
				}
			}
		}
	}
	return p
}

func TestPolitenessPer100Addresses(t *testing.T) {
	p := measurePoliteness(t)
	t.Logf("per 100 verified addresses at 10 domains: %d sessions, %d EHLOs (at most %d in one session), %d QUITs, %d random-name probes %v",
		p.sessions, p.ehlos, p.maxEHLOPerSession, p.quits, p.probes, p.probesPerDomain)
}
