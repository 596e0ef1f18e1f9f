package callout

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

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

// TestPolitenessPer100Addresses counts EHLO, QUIT and random-name probes
// per session and per domain. Before issue 11 the same run cost 10
// sessions, 119 EHLOs (up to 12 in one session: one more after every
// RSET) and 9 QUITs.
func TestPolitenessPer100Addresses(t *testing.T) {
	p := measurePoliteness(t)
	t.Logf("per 100 verified addresses at 10 domains: %d sessions, %d EHLOs (at most %d in one session), %d QUITs, %d random-name probes %v",
		p.sessions, p.ehlos, p.maxEHLOPerSession, p.quits, p.probes, p.probesPerDomain)
	if p.maxEHLOPerSession != 1 {
		t.Errorf("up to %d EHLOs in one session, want exactly one", p.maxEHLOPerSession)
	}
	if p.ehlos != p.sessions || p.quits != p.sessions {
		t.Errorf("%d sessions, %d EHLOs, %d QUITs: want one EHLO and one QUIT per session", p.sessions, p.ehlos, p.quits)
	}
	if p.sessions > 10 {
		t.Errorf("%d sessions for 10 domains asked one recipient after another", p.sessions)
	}
	for d := range 10 {
		if n := p.probesPerDomain[fmt.Sprintf("d%d.test", d)]; n != 1 {
			t.Errorf("d%d.test: %d random-name probes, want 1", d, n)
		}
	}
}

// TestPolitenessWithTLS: over STARTTLS a session has the EHLO RFC 3207
// requires after it, and no other.
func TestPolitenessWithTLS(t *testing.T) {
	mx := test.StartMX(t, test.MXConfig{TLS: true, Mailboxes: []string{"a@example.test"}})
	r := newRig(t, zoneOneMX, route("127.0.0.2", mx))
	for _, a := range []string{"a@example.test", "b@example.test", "c@example.test"} {
		r.verify(a)
	}
	r.v.Close()
	for _, s := range mx.Sessions() {
		if !s.TLS || s.EHLOs != 2 || !s.Quit {
			t.Errorf("session %+v: want TLS, two EHLOs (before and after STARTTLS) and QUIT", s)
		}
	}
}

// TestPolitenessPostfixErrorLimits: stock Postfix sleeps 1s before every
// reply line once a session has had 10 errors and hangs up at 20. Thirty
// unknown recipients of one domain must all get their definite verdict,
// with no error sleep and no 421: a session ends before 8 errors.
func TestPolitenessPostfixErrorLimits(t *testing.T) {
	// The error sleep is longer than the verification timeout: one sleep
	// would turn the verdict into a timeout.
	mx := test.StartMX(t, test.MXConfig{SoftErrorLimit: 10, ErrorSleep: 5 * time.Second, HardErrorLimit: 20})
	r := newRig(t, zoneOneMX, route("127.0.0.2", mx), func(c *Config) { c.Timeout = 4 * time.Second })
	var wg sync.WaitGroup
	for i := range 30 {
		wg.Go(func() {
			if res := r.v.Verify(context.Background(), fmt.Sprintf("nobody%d@example.test", i)); res.Status != StatusInvalid {
				t.Errorf("nobody%d: %s", i, res)
			}
		})
	}
	wg.Wait()
	r.v.Close()
	t.Logf("30 unknown recipients: %d sessions", len(mx.Sessions()))
	for _, s := range mx.Sessions() {
		if s.Errors > sessionErrorLimit || s.ErrorSleeps > 0 || s.EHLOs != 1 || !s.Quit {
			t.Errorf("session %+v: want at most %d errors, no sleep, one EHLO, QUIT", s, sessionErrorLimit)
		}
	}
}

// TestPolitenessOpenSMTPD: OpenSMTPD answers a second EHLO with 503
// "Already identified"; with one EHLO it gives real verdicts.
func TestPolitenessOpenSMTPD(t *testing.T) {
	for _, tls := range []bool{false, true} {
		mx := test.StartMX(t, test.MXConfig{
			OneEHLO:   true,
			TLS:       tls,
			Mailboxes: []string{"alice@example.test"},
			Accepted:  &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 1, 5}, Message: "Destination address valid"},
			Unknown:   &smtp.SMTPError{Code: 550, EnhancedCode: smtp.NoEnhancedCode, Message: "Invalid recipient: <nobody@example.test>"},
		})
		r := newRig(t, zoneOneMX, route("127.0.0.2", mx))
		if res := r.verify("alice@example.test"); res.Status != StatusValid || res.Reply.String() != "250 2.1.5 Destination address valid" {
			t.Errorf("tls %v: alice: %s", tls, res)
		}
		if res := r.verify("nobody@example.test"); res.Status != StatusInvalid || res.Reason != ReasonNoMailbox {
			t.Errorf("tls %v: nobody: %s", tls, res)
		}
		r.v.Close()
		for _, s := range mx.Sessions() {
			if s.Errors > 2 || !s.Quit {
				t.Errorf("tls %v: session %+v", tls, s)
			}
		}
	}
}

// TestPolitenessRefusingGreeting: after a 554 greeting (postscreen) the
// probe says QUIT, as RFC 5321 §3.1 expects, rather than hanging up.
func TestPolitenessRefusingGreeting(t *testing.T) {
	mx := test.StartMX(t, test.MXConfig{Banner: &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "mx.example.test ESMTP not accepting connections"}})
	r := newRig(t, zoneOneMX, route("127.0.0.2", mx))
	if res := r.verify("a@example.test"); res.Reason != ReasonSessionRefused {
		t.Fatalf("got %s", res)
	}
	r.v.Close()
	if s := mx.Sessions(); len(s) != 1 || !s[0].Quit || s[0].EHLOs != 0 {
		t.Fatalf("sessions %+v: want one, ended with QUIT, no EHLO", s)
	}
}

// TestPolitenessQuitOnClose: a session kept open for more recipients is
// ended with QUIT when the verifier closes, even mid-linger.
func TestPolitenessQuitOnClose(t *testing.T) {
	mx := test.StartMX(t, test.MXConfig{})
	r := newRig(t, zoneOneMX, route("127.0.0.2", mx), func(c *Config) { c.SessionIdle = time.Minute })
	r.verify("a@example.test")
	start := time.Now()
	r.v.Close()
	if el := time.Since(start); el > time.Second {
		t.Errorf("Close took %v", el)
	}
	if s := mx.Sessions(); len(s) != 1 || !s[0].Quit {
		t.Fatalf("sessions %+v: want one, ended with QUIT", s)
	}
}

// TestPolitenessBackupAcceptsEverything: with the primary MX down, a backup
// that accepts every name does not make an address valid; its answer to a
// random name is learnt once for the week.
func TestPolitenessBackupAcceptsEverything(t *testing.T) {
	zone := `
example.test. 300 IN MX 10 mx1.example.test.
example.test. 300 IN MX 20 mx2.example.test.
mx1.example.test. 300 IN A 127.0.0.2
mx2.example.test. 300 IN A 127.0.0.3
`
	backup := test.StartMX(t, test.MXConfig{CatchAll: true, Accepted: &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 1, 5}, Message: "Ok"}})
	r := newRig(t, zone, test.RouteDialer{"127.0.0.3": backup.Addr}) // mx1 refuses connections
	for _, a := range []string{"alice@example.test", "bob@example.test"} {
		if res := r.verify(a); res.Status != StatusUnknown || res.Reason != ReasonCatchAll || res.Host != "mx2.example.test" {
			t.Errorf("%s: %s, want unknown catch-all from mx2", a, res)
		}
	}
	if n := len(backup.Rcpts()); n != 3 {
		t.Errorf("backup got %v, want the two addresses and one random name", backup.Rcpts())
	}
	// The primary is not known to be a catch-all: once it is back, its
	// acceptances can be valid.
	if _, ok := r.v.fact(keyCatchAll + "example.test"); ok {
		t.Error("the backup's acceptance of everything was taken for the domain's")
	}
}

// TestPolitenessOneRandomProbePerWeek: the random-name probe is made once
// per domain and MX host per CatchAllTTL, whatever its answer, even when
// the verdicts themselves expire.
func TestPolitenessOneRandomProbePerWeek(t *testing.T) {
	mx := test.StartMX(t, test.MXConfig{Mailboxes: []string{"a@example.test", "b@example.test", "c@example.test"}})
	r := newRig(t, zoneOneMX, route("127.0.0.2", mx))
	random := func() int {
		n := 0
		for _, rc := range mx.Rcpts() {
			if len(strings.Split(rc, "@")[0]) == 20 {
				n++
			}
		}
		return n
	}
	if res := r.verify("a@example.test"); res.Status != StatusValid {
		t.Fatalf("a: %s", res)
	}
	r.clock.Advance(6 * 24 * time.Hour) // the verdicts expired, the fact not
	for _, a := range []string{"a@example.test", "b@example.test"} {
		if res := r.verify(a); res.Status != StatusValid || res.Cached {
			t.Fatalf("%s after 6 days: %s", a, res)
		}
	}
	if n := random(); n != 1 {
		t.Fatalf("%d random-name probes in 6 days, want 1", n)
	}
	r.clock.Advance(24*time.Hour + time.Second)
	if res := r.verify("c@example.test"); res.Status != StatusValid {
		t.Fatalf("c: %s", res)
	}
	if n := random(); n != 2 {
		t.Fatalf("%d random-name probes after a week, want 2", n)
	}
	if st := r.v.Stats(); st.CatchAllProbes != 2 {
		t.Errorf("Stats %+v, want 2 random-name probes", st)
	}
}
