package test_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/test"
)

// fleetMember is one submission server of a fleet: a real Postfix (with
// Dovecot for SASL and a greylisting MX behind it, so accepted mail waits
// in its deferred queue), its own rcptguard daemon with [cluster] on the
// fleet's Redis, and a stand-in for its rcptguard-hold.path unit.
type fleetMember struct {
	name     string
	s        *test.DeferringSubmission
	d        *daemon
	config   string
	blocks   string // its blocklist file
	requests string
	policy   *test.PolicyClient
}

// fleetWorld is what the members share: the callout MX and its DNS, the
// abuse desk's relay and Redis.
type fleetWorld struct {
	dns         *test.DNSServer
	calloutPort string
	relay       *test.Relay
	redis       *test.RedisServer
	users       map[string]string
}

const fleetLimit = 3

// startFleetMember starts member name of the fleet.
func startFleetMember(t *testing.T, w *fleetWorld, name string) *fleetMember {
	t.Helper()
	policyAddr := fmt.Sprintf("127.0.0.1:%d", test.FreePort(t))
	s := test.StartDeferringSubmissionNamed(t, name, "dest.test", w.users, map[string]string{
		"smtpd_recipient_restrictions": "check_policy_service { inet:" + policyAddr + ", timeout=10s, default_action=DUNNO }, " +
			"permit_sasl_authenticated, reject_unauth_destination",
	})
	state := test.SharedTempDir(t)
	m := &fleetMember{name: name, s: s, config: filepath.Join(state, "rcptguard.toml"),
		blocks: filepath.Join(state, "blocklist"), requests: filepath.Join(state, "hold-requests")}
	config := fmt.Sprintf(`
[policy]
listen = [%q]

[detector]
limit = %d
period = "1h"
wait = "5s"
warn_at = 0.0

[callout]
resolver = %q
port = %s
timeout = "5s"
helo = "rcptguard.test"
allow_private = true

[blocklist]
path = %q

[notify]
spool = %q
to = ["abuse@isp.test"]
from = "rcptguard@isp.test"
relay = %q
starttls = "off"

[queue]
postfix_config = %q
requests = %q

[cluster]
redis = %q
key_prefix = "postfix-fleet:"
`, policyAddr, fleetLimit, w.dns.Addr, w.calloutPort, m.blocks, filepath.Join(state, "spool"), w.relay.Addr,
		s.ConfigDir, m.requests, w.redis.URL())
	if err := os.WriteFile(m.config, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	m.d = startDaemon(t, m.config)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("rcptguard %s log:\n%s", name, m.d.logs)
		}
	})
	m.policy = test.DialPolicy(t, m.d.addr)
	m.runHoldUnit(t)
	return m
}

// runHoldUnit stands in for rcptguard-hold.path: queue-hold runs as its
// own process whenever the request directory is not empty, until the end
// of the test.
func (m *fleetMember) runHoldUnit(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for ctx.Err() == nil {
			if entries, _ := os.ReadDir(m.requests); len(entries) > 0 {
				if out, err := queueHoldProcess(t, m.config); err != nil {
					t.Errorf("queue-hold on %s: %v\n%s", m.name, err, out)
				}
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	t.Cleanup(func() { cancel(); <-stopped })
}

// send submits one message of user to the recipients and returns its
// queue ID.
func (m *fleetMember) send(t *testing.T, user, subject string, to ...string) string {
	t.Helper()
	return m.s.Send(t, user, user, subject, to...)
}

// blocked tells whether the member's daemon answers user blocked.
func (m *fleetMember) blocked(t *testing.T, user string) bool {
	return strings.HasPrefix(m.policy.Must(rcpt(user, "good@dest.test")), "HOLD ")
}

// entries returns the entry lines of the member's blocklist file, sorted.
func (m *fleetMember) entries() []string {
	b, _ := os.ReadFile(m.blocks)
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		if l != "" && !strings.HasPrefix(l, "#") {
			lines = append(lines, l)
		}
	}
	sort.Strings(lines)
	return lines
}

// waitQueue waits until every message of ids is in queue want.
func (m *fleetMember) waitQueue(t *testing.T, timeout time.Duration, want string, ids ...string) {
	t.Helper()
	test.Eventually(t, timeout, fmt.Sprintf("messages %v on %s in queue %s", ids, m.name, want), func() bool {
		in := m.s.QueueNames(t)
		for _, id := range ids {
			if in[id] != want {
				return false
			}
		}
		return true
	})
}

// reportKinds counts the reports at the relay by X-Rcptguard-Kind and
// identity ("block spammer@customer.test").
func reportKinds(t *testing.T, relay *test.Relay) map[string]int {
	t.Helper()
	n := map[string]int{}
	for _, m := range relay.Messages() {
		text := decodedReport(t, m.Data)
		kind, who := "", ""
		for _, line := range strings.Split(text, "\n") {
			if k, ok := strings.CutPrefix(line, "X-Rcptguard-Kind: "); ok && kind == "" {
				kind = strings.TrimSpace(k)
			}
			if id, ok := strings.CutPrefix(line, "X-Rcptguard-Identity: "); ok && who == "" {
				who = strings.TrimSpace(id)
			}
		}
		n[kind+" "+who]++
	}
	return n
}

// TestRealPostfixFleet runs two submission servers, each a real Postfix
// with its own rcptguard, sharing one Redis:
//
//	swaks ──AUTH──▶ Postfix "fleet-a" ──policy──▶ rcptguard A ─┐
//	      ──AUTH──▶ Postfix "fleet-b" ──policy──▶ rcptguard B ─┼─▶ redis-server
//	                  └─ dest.test → greylisting MX (deferred)  └──callouts──▶ fake MX (550 5.1.1 but good@)
//
// An abuser alternating between the two is blocked at exactly limit+1
// distinct invalid recipients in total, their mail accepted before the
// block is held on both queues, and the abuse desk gets one block report;
// an unblock on one server frees them on both within 2 s. Then Redis is
// killed: every request is still answered, each server counts alone, and
// the block one makes meanwhile reaches the other when Redis is back.
func TestRealPostfixFleet(t *testing.T) {
	requireRealPostfix(t)
	calloutMX := test.StartMX(t, test.MXConfig{Mailboxes: []string{"good@dest.test"}})
	_, calloutPort, _ := strings.Cut(calloutMX.Addr, ":")
	w := &fleetWorld{
		dns: test.StartDNS(t, `
dest.test. 300 IN MX 10 mx.dest.test.
mx.dest.test. 300 IN A 127.0.0.1
`),
		calloutPort: calloutPort,
		relay:       test.StartRelay(t, test.RelayConfig{}),
		redis:       test.StartRedis(t),
		users: map[string]string{"spammer@customer.test": "spammer-secret", "mallory@customer.test": "mallory-secret",
			"honest@customer.test": "honest-secret"},
	}
	a, b := startFleetMember(t, w, "fleet-a"), startFleetMember(t, w, "fleet-b")
	fleetBlockAndHold(t, w, a, b)
	fleetUnblock(t, a, b)
	fleetRedisOutage(t, w, a, b)
	for _, m := range []*fleetMember{a, b} {
		log := m.s.Log()
		for _, bad := range []string{"4.3.5", "unavailable", "problem talking to server"} {
			if strings.Contains(log, bad) {
				t.Errorf("postfix %s's maillog says %q: a policy request went unanswered\n%s", m.name, bad, m.s.LogTail(40))
			}
		}
	}
}

// fleetBlockAndHold: the abuser alternates between a and b; the block
// lands at limit+1 in total, on a, and both queues hold the mail accepted
// before it; one block report, one held report (from a; b logs its own).
func fleetBlockAndHold(t *testing.T, w *fleetWorld, a, b *fleetMember) {
	const spammer, honest = "spammer@customer.test", "honest@customer.test"
	honestA, honestB := a.send(t, honest, "honest a", "good@dest.test"), b.send(t, honest, "honest b", "good@dest.test")
	early := [][2]string{
		{"a", a.send(t, spammer, "spam 1", "bad1@dest.test", "good@dest.test")},
		{"b", b.send(t, spammer, "spam 2", "bad2@dest.test")},
		// bad2 again, on the other server: counts once.
		{"a", a.send(t, spammer, "spam 3", "bad2@dest.test")},
		{"b", b.send(t, spammer, "spam 4", "bad3@dest.test")}, // 3 in total: the limit, not past it
	}
	onA, onB := []string{honestA}, []string{honestB}
	for _, e := range early {
		if e[0] == "a" {
			onA = append(onA, e[1])
		} else {
			onB = append(onB, e[1])
		}
	}
	a.waitQueue(t, 30*time.Second, "deferred", onA...)
	b.waitQueue(t, 30*time.Second, "deferred", onB...)

	atBlock := a.send(t, spammer, "spam 5", "bad4@dest.test") // limit+1: blocked, held at RCPT
	blockedAt := time.Now()
	if q := a.s.QueueNames(t)[atBlock]; q != "hold" {
		t.Fatalf("the message with the %dth distinct invalid recipient is in queue %q, want hold", fleetLimit+1, q)
	}
	within(t, 2*time.Second, "b answers the abuser blocked", func() bool { return b.blocked(t, spammer) })
	within(t, 2*time.Second-time.Since(blockedAt), "b's blocklist file has the block", func() bool { return fileHas(b.blocks, spammer+"\tHOLD") })
	t.Logf("blocked on a at %d distinct invalid recipients; b answers blocked and has it in its file %s after", fleetLimit+1, time.Since(blockedAt).Round(time.Millisecond))

	a.waitQueue(t, 30*time.Second, "hold", onA[1:]...)
	b.waitQueue(t, 30*time.Second, "hold", onB[1:]...)
	t.Logf("retroactive hold on both queues %s after the block (a: %d messages, b: %d)", time.Since(blockedAt).Round(time.Millisecond), len(onA)-1, len(onB)-1)
	a.waitQueue(t, time.Second, "deferred", honestA)
	b.waitQueue(t, time.Second, "deferred", honestB)
	for _, m := range []*fleetMember{a, b} {
		out := runCLI(t, "held", "-config", m.config, spammer)
		if n := strings.Count(out, spammer); n < 2 {
			t.Errorf("rcptguard held on %s lists %d of the abuser's messages, want 2 or more:\n%s", m.name, n, out)
		}
	}
	test.Eventually(t, 10*time.Second, "b to log its hold of a learned block", func() bool {
		return strings.Contains(b.d.logs.String(), "held retroactively for a block learned through the cluster")
	})
	w.relay.WaitMessages(t, 2, 10*time.Second)
	time.Sleep(2500 * time.Millisecond) // a second round of b's results watcher: nothing more
	kinds := reportKinds(t, w.relay)
	if kinds["block "+spammer] != 1 || kinds["held "+spammer] != 1 || len(w.relay.Messages()) != 2 {
		t.Fatalf("reports at the relay %v, want one block and one held report (from a) for %s", kinds, spammer)
	}
	// The held report is a's: it lists a's messages, none of b's.
	for _, m := range w.relay.Messages() {
		text := decodedReport(t, m.Data)
		if !strings.Contains(text, "X-Rcptguard-Kind: held") {
			continue
		}
		for _, id := range onA[1:] {
			if !strings.Contains(text, id) {
				t.Errorf("the held report lacks a's message %s", id)
			}
		}
		for _, id := range onB {
			if strings.Contains(text, id) {
				t.Errorf("the held report lists b's message %s: b reported a learned block", id)
			}
		}
	}
}

// fleetUnblock: an unblock on b frees the abuser on both within 2 s, and
// both Postfix instances accept their mail again.
func fleetUnblock(t *testing.T, a, b *fleetMember) {
	const spammer = "spammer@customer.test"
	runCLI(t, "unblock", "-config", b.config, spammer)
	start := time.Now()
	for _, m := range []*fleetMember{b, a} {
		within(t, 2*time.Second-time.Since(start), m.name+" frees the abuser (answer and file)", func() bool {
			return !m.blocked(t, spammer) && !fileHas(m.blocks, spammer)
		})
	}
	t.Logf("unblock on b: both servers free in answers and files %s after it returned", time.Since(start).Round(time.Millisecond))
	for _, m := range []*fleetMember{a, b} {
		id := m.send(t, spammer, "after the unblock", "good@dest.test")
		m.waitQueue(t, 30*time.Second, "deferred", id)
	}
}

// fleetRedisOutage kills Redis while an abuser alternates: every request
// is answered, each server counts alone, a's block holds and reaches b
// when Redis is back (empty), and the files agree within 10 s.
func fleetRedisOutage(t *testing.T, w *fleetWorld, a, b *fleetMember) {
	const mallory = "mallory@customer.test"
	t0 := time.Now()
	mark := func(format string, args ...any) {
		t.Logf("fault timeline +%6s  %s", time.Since(t0).Round(time.Millisecond), fmt.Sprintf(format, args...))
	}
	send := func(m *fleetMember, subject, to string) string {
		start := time.Now()
		id := m.send(t, mallory, subject, to)
		q := m.s.QueueNames(t)[id]
		mark("%s: %s to %s answered in %s (swaks, whole session), queue %s", m.name, subject, to, time.Since(start).Round(time.Millisecond), q)
		return id
	}
	m1 := send(a, "mallory 1", "mbad1@dest.test")
	m2 := send(b, "mallory 2", "mbad2@dest.test")
	w.redis.Stop()
	mark("redis-server killed (fleet count for mallory: 2)")
	// Straight to each policy service: an invalid recipient (counted, the
	// fleet asked and unreachable) is answered within 1 s.
	for _, m := range []*fleetMember{a, b} {
		start := time.Now()
		if got := m.policy.Must(rcpt("prober@customer.test", "nobody-"+m.name+"@dest.test")); got != "DUNNO" {
			t.Fatalf("%s with Redis down: %q", m.name, got)
		}
		took := time.Since(start)
		mark("%s: policy answer to an invalid recipient with Redis down in %s", m.name, took.Round(time.Millisecond))
		if took > time.Second {
			t.Errorf("%s answered in %s with Redis down, want within 1 s", m.name, took)
		}
	}
	var onA []string
	for i := 3; i <= 5; i++ {
		onA = append(onA, send(a, fmt.Sprintf("mallory %d", i), fmt.Sprintf("mbad%d@dest.test", i)))
	}
	m6 := send(b, "mallory 6", "mbad6@dest.test")
	// a counted alone: 4 distinct invalid recipients (mbad1, 3, 4, 5)
	// blocked it; b, alone at 2, did not.
	if !a.blocked(t, mallory) || b.blocked(t, mallory) {
		t.Fatalf("with Redis down: a blocked %v (want true, its own count is %d), b blocked %v (want false)", a.blocked(t, mallory), fleetLimit+1, b.blocked(t, mallory))
	}
	if q := a.s.QueueNames(t)[onA[2]]; q != "hold" {
		t.Fatalf("a's blocking message is in %q, want hold", q)
	}
	mark("a blocked mallory on its own count; b still free (its count: 2)")
	w.redis.Start()
	mark("redis-server back, empty")
	start := time.Now()
	within(t, 10*time.Second, "both blocklist files equal, with mallory", func() bool {
		return fileHas(b.blocks, mallory+"\tHOLD") && slices.Equal(a.entries(), b.entries())
	})
	mark("converged: b's file has a's block, files equal (%s after Redis returned)", time.Since(start).Round(time.Millisecond))
	within(t, 2*time.Second, "b answers mallory blocked", func() bool { return b.blocked(t, mallory) })
	a.waitQueue(t, 30*time.Second, "hold", m1, onA[0], onA[1])
	b.waitQueue(t, 30*time.Second, "hold", m2, m6)
	mark("mallory's mail held on both queues")
	if kinds := reportKinds(t, w.relay); kinds["block "+mallory] != 1 {
		t.Errorf("block reports for mallory: %d, want 1 (%v)", kinds["block "+mallory], kinds)
	}
}
