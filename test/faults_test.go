package test_test

// The faults half of issue 7: a resolver that is down or fails, MX hosts
// that tarpit, hang up or greylist, a relay that is down, a blocklist that
// cannot be written or is edited to garbage. Each test states the
// behaviour it expects. (SIGHUP with a broken configuration is covered by
// TestReloadOnSIGHUPAndMetrics in e2e_test.go.)

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/rcptguard/rcptguard/blocklist"
	"github.com/rcptguard/rcptguard/test"
)

// faultMX is an MX host with a misbehaviour, at its own loopback address
// and domain.
type faultMX struct {
	domain string
	ip     string
	cfg    test.MXConfig
}

// faultMXs are the misbehaving MX hosts: each must never get a sender
// counted, whatever the number of recipients.
var faultMXs = []faultMX{
	{"tarpit.test", "127.0.0.21", test.MXConfig{BannerDelay: 10 * time.Second}},
	{"bannerclose.test", "127.0.0.22", test.MXConfig{Banner: &smtp.SMTPError{Code: 220, Message: "mx.test ESMTP ready"}}},
	{"dropconnect.test", "127.0.0.23", test.MXConfig{DropAt: "banner"}},
	{"dropmail.test", "127.0.0.24", test.MXConfig{DropAt: "mail"}},
	{"droprcpt.test", "127.0.0.25", test.MXConfig{DropAt: "rcpt"}},
	{"greymail.test", "127.0.0.26", test.MXConfig{Mail: &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 1}, Message: "Greylisted, try again later"}}},
	{"busy.test", "127.0.0.27", test.MXConfig{Banner: &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "Too busy, try later"}}},
}

// faultWorld is newWorld plus the misbehaving MX hosts (on the world's
// port) and the domains down.test (its queries dropped) and sf.test
// (SERVFAIL).
func faultWorld(t *testing.T) (*world, map[string]*test.MX) {
	t.Helper()
	w := newWorld(t)
	zone := worldZone + "down.test. 300 IN MX 10 mx.down.test.\nmx.down.test. 300 IN A 127.0.0.2\n" +
		"sf.test. 300 IN MX 10 mx.sf.test.\nmx.sf.test. 300 IN A 127.0.0.2\n"
	mxs := map[string]*test.MX{}
	for _, f := range faultMXs {
		mxs[f.domain] = test.StartMXAt(t, f.ip+":"+w.port, f.cfg)
		zone += fmt.Sprintf("%s. 300 IN MX 10 mx.%s.\nmx.%s. 300 IN A %s\n", f.domain, f.domain, f.domain, f.ip)
	}
	w.dns.Set(zone)
	w.dns.Drop("down.test.")
	w.dns.Drop("mx.down.test.")
	w.dns.ServFail("sf.test.")
	return w, mxs
}

// neverCounted sends n distinct recipients at domain for identity (limit
// 5, wait 300ms) over 5 connections at once, as several smtpd processes
// would, checks that each answer is DUNNO within wait + 200ms, waits for
// the verifications to end, and checks that every verdict is unknown and
// the identity was not blocked.
func neverCounted(t *testing.T, d *daemon, identity, domain string, n int) {
	t.Helper()
	const conns = 5
	var (
		mu      sync.Mutex
		slowest time.Duration
		wg      sync.WaitGroup
	)
	for ci := range conns {
		c := test.DialPolicy(t, d.addr)
		wg.Go(func() {
			for i := ci; i < n; i += conns {
				start := time.Now()
				a, err := c.Ask(rcpt(identity, fmt.Sprintf("user%d@%s", i, domain)))
				el := time.Since(start)
				mu.Lock()
				slowest = max(slowest, el)
				mu.Unlock()
				switch {
				case err != nil:
					t.Errorf("%s, recipient %d: %v", domain, i+1, err)
					return
				case a != "DUNNO" && !strings.HasPrefix(a, "DEFER_IF_PERMIT "):
					// More in flight than the limit: deferred, never held.
					t.Errorf("%s, recipient %d: answered %q", domain, i+1, a)
				case el > 500*time.Millisecond:
					t.Errorf("%s, recipient %d: answered after %v, past wait (300ms) + 200ms", domain, i+1, el)
				}
			}
		})
	}
	wg.Wait()
	// Every verification ends within callout.timeout (1s) of its start.
	pollUntil(t, 5*time.Second, fmt.Sprintf("%s: fewer than %d final verdicts", domain, n), func() bool {
		return len(finalDecisions(t, d.logs.String(), identity)) >= n
	})
	reasons := map[string]int{}
	for _, m := range finalDecisions(t, d.logs.String(), identity) {
		if m["verdict"] != "unknown" {
			t.Errorf("%s: verdict %v (%v) for %v, want unknown", domain, m["verdict"], m["reason"], m["recipient"])
		}
		reasons[fmt.Sprint(m["reason"])]++
	}
	c := test.DialPolicy(t, d.addr)
	if a := c.Must(rcpt(identity, "alice@good.test")); a != "DUNNO" {
		t.Errorf("%s: after %d recipients the sender is answered %q", domain, n, a)
	}
	t.Logf("%s: %d recipients, slowest answer %v, verdicts unknown by reason %v", domain, n, slowest.Round(time.Millisecond), reasons)
}

// TestFaultResolver: a resolver that drops the queries, one that nobody
// listens on, and SERVFAIL answers: every verdict is unknown, nothing is
// counted (20 recipients at limit 5 block nobody), and each answer comes
// within detector.wait.
func TestFaultResolver(t *testing.T) {
	w, _ := faultWorld(t)
	d := startDaemon(t, w.suiteConfig(t, "resolver.toml", map[string]string{"log.format": `"json"`}))
	t.Run("drop", func(t *testing.T) { neverCounted(t, d, "drop@customer.test", "down.test", 20) })
	t.Run("servfail", func(t *testing.T) { neverCounted(t, d, "servfail@customer.test", "sf.test", 20) })
	t.Run("nobody listens", func(t *testing.T) {
		// A port that was free a moment ago: UDP queries get ICMP port
		// unreachable, TCP connection refused.
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		dead := pc.LocalAddr().String()
		pc.Close()
		d := startDaemon(t, w.suiteConfig(t, "deadresolver.toml", map[string]string{
			"log.format": `"json"`, "callout.resolver": strconv.Quote(dead),
		}))
		neverCounted(t, d, "nodns@customer.test", "good.test", 20)
	})
	if out := runCLI(t, "list", "-config", filepath.Join(w.dir, "resolver.toml")); strings.Contains(out, "@customer.test") {
		t.Errorf("blocked with the resolver failing:\n%s", out)
	}
}

// calloutGoroutines counts the goroutines running the daemon's
// verification code (callout workers and probes, background
// verifications of the detector); the test servers' goroutines are left
// out.
func calloutGoroutines() int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	count := 0
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "rcptguard/rcptguard/callout.") || strings.Contains(g, "detector.(*Detector).Decide.func") {
			count++
		}
	}
	return count
}

// TestFaultMXTarpit: an MX that holds its banner back 10s, with
// callout.timeout 1s: answers within wait, nothing counted, and the
// daemon's probe goroutines end once the timeout has passed.
func TestFaultMXTarpit(t *testing.T) {
	w, mxs := faultWorld(t)
	d := startDaemon(t, w.suiteConfig(t, "tarpit.toml", map[string]string{"log.format": `"json"`}))
	before := calloutGoroutines()
	start := time.Now()
	neverCounted(t, d, "tarpit@customer.test", "tarpit.test", 20)
	during := calloutGoroutines()
	pollUntil(t, 5*time.Second, "the daemon's verification goroutines did not end", func() bool {
		return calloutGoroutines() <= before
	})
	t.Logf("verification goroutines: %d before, %d after the answers, back to %d after %v; %d connections to the tarpit",
		before, during, calloutGoroutines(), time.Since(start).Round(time.Millisecond), mxs["tarpit.test"].Conns())
}

// TestFaultMXMisbehaving: MX hosts that hang up after the banner, at
// connect, at MAIL or at RCPT, that greylist every MAIL FROM or every
// recipient, or that are too busy: never counted.
func TestFaultMXMisbehaving(t *testing.T) {
	w, _ := faultWorld(t)
	d := startDaemon(t, w.suiteConfig(t, "mx.toml", map[string]string{"log.format": `"json"`}))
	for _, domain := range []string{"bannerclose.test", "dropconnect.test", "dropmail.test", "droprcpt.test", "greymail.test", "grey.test", "busy.test"} {
		t.Run(domain, func(t *testing.T) {
			neverCounted(t, d, "u-"+domain+"@customer.test", domain, 12)
		})
	}
	if out := runCLI(t, "list", "-config", filepath.Join(w.dir, "mx.toml")); strings.Contains(out, "@customer.test") {
		t.Errorf("blocked by misbehaving MX hosts:\n%s", out)
	}
}

// TestFaultRelayDown: the report relay is down when a block happens and
// for a while after: policy answers keep coming, the report stays in the
// spool, and once the relay is back it is delivered exactly once.
//
// The mailer retries a failed report after a minute (notify.DefaultBackoff)
// and at once when it starts; the short run restarts the daemon after the
// relay is back, the -soak run waits for the retry with the daemon up.
func TestFaultRelayDown(t *testing.T) {
	w := newWorld(t)
	relay := test.StartRelay(t, test.RelayConfig{})
	cfg := w.suiteConfig(t, "relay.toml", map[string]string{
		"detector.warn_at": "0",
		"notify.to":        `["abuse@isp.test"]`,
		"notify.from":      `"rcptguard@isp.test"`,
		"notify.relay":     strconv.Quote(relay.Addr),
		"notify.starttls":  `"off"`,
	})
	relay.SetDown(true)
	d := startDaemon(t, cfg)
	c := test.DialPolicy(t, d.addr)
	var a string
	for i := range 6 {
		a = c.Must(rcpt("mallory@customer.test", fmt.Sprintf("x%d@good.test", i)))
	}
	if !strings.HasPrefix(a, "HOLD ") {
		t.Fatalf("not blocked: %q", a)
	}
	pollUntil(t, 5*time.Second, "the mailer did not try the relay", func() bool { return relay.Refused() > 0 })
	spool := filepath.Join(w.dir, "state", "spool")
	// The relay stays down; the daemon answers on.
	for i := range 20 {
		start := time.Now()
		if a := c.Must(rcpt("mallory@customer.test", "alice@good.test")); !strings.HasPrefix(a, "HOLD ") {
			t.Fatalf("blocked identity answered %q while the relay is down", a)
		}
		if a := c.Must(rcpt(fmt.Sprintf("other%d@customer.test", i), "alice@good.test")); a != "DUNNO" {
			t.Fatalf("other identity answered %q while the relay is down", a)
		}
		if el := time.Since(start); el > 500*time.Millisecond {
			t.Errorf("answers took %v while the relay is down", el)
		}
	}
	if n := spoolFiles(t, spool); n != 1 {
		t.Fatalf("%d files in the spool while the relay is down, want 1", n)
	}
	if n := len(relay.Messages()); n != 0 {
		t.Fatalf("%d messages delivered while the relay is down", n)
	}
	relay.SetDown(false)
	start := time.Now()
	if *soakDuration == 0 {
		d.stop()
		startDaemon(t, cfg)
		relay.WaitMessages(t, 1, 10*time.Second)
	} else {
		relay.WaitMessages(t, 1, 3*time.Minute)
	}
	t.Logf("report delivered %v after the relay came back (%d connections refused while down)", time.Since(start).Round(time.Millisecond), relay.Refused())
	pollUntil(t, 5*time.Second, "the delivered report is still in the spool", func() bool { return spoolFiles(t, spool) == 0 })
	time.Sleep(300 * time.Millisecond)
	msgs := relay.Messages()
	if len(msgs) != 1 {
		t.Fatalf("%d reports delivered, want exactly 1", len(msgs))
	}
	if !strings.Contains(string(msgs[0].Data), "Subject: [rcptguard] blocked mallory@customer.test") {
		t.Errorf("the delivered message is not the block report:\n%s", msgs[0].Data)
	}
}

// spoolFiles counts the spooled messages (regular files at the top of
// the spool directory; temporary files and subdirectories left out).
func spoolFiles(t *testing.T, dir string) int {
	t.Helper()
	des, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	n := 0
	for _, de := range des {
		if de.Type().IsRegular() && !strings.HasPrefix(de.Name(), ".") && strings.HasSuffix(de.Name(), ".msg") {
			n++
		}
	}
	return n
}

// TestFaultBlocklistUnwritable: the blocklist cannot be written (a
// directory sits where its lock file goes; chmod does not stop root).
// Policy answers keep coming and the abuser gets the block action from
// memory, the failure is logged and counted in a metric, and the entry is
// written within about 3s once writing works again.
func TestFaultBlocklistUnwritable(t *testing.T) {
	w := newWorld(t)
	d := startDaemon(t, w.suiteConfig(t, "unwritable.toml", map[string]string{"metrics.listen": `"127.0.0.1:0"`}))
	lock := w.blocklistPath() + ".lock"
	// serve made the lock file at start, when it checked it could write.
	if err := os.Remove(lock); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(lock, 0o755); err != nil {
		t.Fatal(err)
	}
	c := test.DialPolicy(t, d.addr)
	var a string
	for i := range 6 {
		start := time.Now()
		a = c.Must(rcpt("abuser@customer.test", fmt.Sprintf("x%d@good.test", i)))
		if el := time.Since(start); el > time.Second {
			t.Errorf("answer %d took %v with the blocklist unwritable", i+1, el)
		}
	}
	if !strings.HasPrefix(a, "HOLD rcptguard: abuser@customer.test blocked") {
		t.Fatalf("abuser answered %q with the blocklist unwritable", a)
	}
	for range 5 {
		if a := c.Must(rcpt("abuser@customer.test", "alice@good.test")); !strings.HasPrefix(a, "HOLD ") {
			t.Fatalf("abuser answered %q later (the block must hold in memory)", a)
		}
		if a := c.Must(rcpt("honest@customer.test", "alice@good.test")); a != "DUNNO" {
			t.Fatalf("honest user answered %q", a)
		}
	}
	if !strings.Contains(d.logs.String(), "blocklist write failed") {
		t.Errorf("no log line about the failed write:\n%s", d.logs)
	}
	if v := metricValue(t, d.metrics, "rcptguard_blocklist_write_errors_total"); v < 1 {
		t.Errorf("rcptguard_blocklist_write_errors_total = %v, want >= 1", v)
	}
	if data, _ := os.ReadFile(w.blocklistPath()); strings.Contains(string(data), "abuser@") {
		t.Fatalf("entry written although the lock file is a directory:\n%s", data)
	}
	// Writing works again: the watcher's retry writes the entry.
	if err := os.Remove(lock); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	pollUntil(t, 3500*time.Millisecond, "the pending entry was not written after the blocklist became writable", func() bool {
		data, _ := os.ReadFile(w.blocklistPath())
		return strings.Contains(string(data), "abuser@customer.test\tHOLD rcptguard: abuser@customer.test blocked")
	})
	t.Logf("entry written %v after the blocklist became writable", time.Since(start).Round(time.Millisecond))
}

// TestFaultBlocklistLockHeld: another process (an `rcptguard block` that
// hangs, a backup tool) holds the blocklist's lock while an identity
// passes its limit. The policy answer for that request must not wait for
// the lock: it comes within a bounded time, with the block action; the
// entry is written once the lock is free.
func TestFaultBlocklistLockHeld(t *testing.T) {
	w := newWorld(t)
	d := startDaemon(t, w.suiteConfig(t, "lockheld.toml", nil))
	lock := test.LockBlocklist(t, w.blocklistPath())
	release := lock.Release
	c := test.DialPolicy(t, d.addr)
	for i := range 5 {
		c.Must(rcpt("abuser@customer.test", fmt.Sprintf("x%d@good.test", i)))
	}
	type answer struct {
		a   string
		err error
	}
	got := make(chan answer, 1)
	start := time.Now()
	go func() {
		a, err := c.Ask(rcpt("abuser@customer.test", "x5@good.test"))
		got <- answer{a, err}
	}()
	select {
	case r := <-got:
		if r.err != nil || !strings.HasPrefix(r.a, "HOLD ") {
			t.Errorf("blocking request answered %q (%v) with the lock held", r.a, r.err)
		}
		t.Logf("blocking request answered after %v with the lock held", time.Since(start).Round(time.Millisecond))
	case <-time.After(3 * time.Second):
		t.Errorf("the request that passes the limit is not answered 3s after it was sent while another process holds %s.lock: the policy answer waits for the blocklist lock without bound (Postfix gives up after its policy timeout and carries on with DUNNO)", w.blocklistPath())
		release()
		r := <-got
		t.Logf("answered %q (%v) %v after it was sent, once the lock was released", r.a, r.err, time.Since(start).Round(time.Millisecond))
	}
	// A second connection is answered meanwhile either way.
	c2 := test.DialPolicy(t, d.addr)
	if a := c2.Must(rcpt("honest@customer.test", "alice@good.test")); a != "DUNNO" {
		t.Errorf("honest user answered %q", a)
	}
	// While the lock stays held, the blocked identity's next requests are
	// answered from memory at once: one bounded wait, not one per request.
	for i := range 3 {
		start := time.Now()
		if a := c2.Must(rcpt("abuser@customer.test", "alice@good.test")); !strings.HasPrefix(a, "HOLD ") {
			t.Errorf("blocked identity answered %q with the lock held", a)
		}
		if el := time.Since(start); el > 300*time.Millisecond {
			t.Errorf("request %d of the blocked identity took %v with the lock held", i, el)
		}
	}
	release()
	pollUntil(t, 3500*time.Millisecond, "the entry was not written after the lock was released", func() bool {
		data, _ := os.ReadFile(w.blocklistPath())
		return strings.Contains(string(data), "abuser@customer.test\tHOLD")
	})
}

// TestFaultBlocklistGarbage: the blocklist is edited to garbage by hand
// while the daemon runs. The bad lines are skipped and logged with their
// line numbers; the good entries are answered with their action within 2s.
func TestFaultBlocklistGarbage(t *testing.T) {
	w := newWorld(t)
	cfg := w.suiteConfig(t, "garbage.toml", nil)
	d := startDaemon(t, cfg)
	c := test.DialPolicy(t, d.addr)
	if a := c.Must(rcpt("kept1@customer.test", "alice@good.test")); a != "DUNNO" {
		t.Fatalf("before the edit: %q", a)
	}
	garbage := strings.Join([]string{
		"# edited by hand, badly",
		"kept1@customer.test\tHOLD by hand, ticket 1",
		"\x00\x01\x02\xff\xfe binary",
		"no-action-at-all@customer.test",
		"bad@customer.test\tNOTANACTION text",
		"   continuation of nothing",
		"kept2@customer.test REJECT 5.7.1 by hand",
		"\xff\xfe@customer.test\tHOLD invalid utf-8 identity",
		"kept1@customer.test\tREJECT a duplicate",
		strings.Repeat("z", 5000) + "\tHOLD too long",
		"",
		"KEPT3@Customer.test\tDEFER mixed case",
		"truncated-last-line@customer.test\tHO",
	}, "\n")
	if err := os.WriteFile(w.blocklistPath(), []byte(garbage), 0o644); err != nil {
		t.Fatal(err)
	}
	entries, problems, err := blocklist.Parse(strings.NewReader(garbage))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 3 || len(problems) < 6 {
		t.Fatalf("the garbage parses to %d entries and %d problems; the test expects 3 and at least 6", len(entries), len(problems))
	}
	start := time.Now()
	want := map[string]string{
		"kept1@customer.test": "HOLD by hand, ticket 1",
		"kept2@customer.test": "REJECT 5.7.1 by hand",
		"kept3@customer.test": "DEFER mixed case",
	}
	for id, action := range want {
		pollUntil(t, 2*time.Second-time.Since(start)+100*time.Millisecond, id+" not answered with its action within 2s of the edit", func() bool {
			return c.Must(rcpt(id, "alice@good.test")) == action
		})
	}
	t.Logf("hand-edited entries answered %v after the edit", time.Since(start).Round(time.Millisecond))
	if a := c.Must(rcpt("bad@customer.test", "alice@good.test")); a != "DUNNO" {
		t.Errorf("an identity on a bad line answered %q", a)
	}
	pollUntil(t, 2*time.Second, "the bad lines were not all logged", func() bool {
		logs := d.logs.String()
		for _, p := range problems {
			if !strings.Contains(logs, "line="+strconv.Itoa(p.Line)+" ") {
				return false
			}
		}
		return true
	})
	// The daemon still writes its own blocks into the edited file and
	// keeps the lines it does not understand.
	for i := range 6 {
		c.Must(rcpt("abuser@customer.test", fmt.Sprintf("x%d@good.test", i)))
	}
	data, err := os.ReadFile(w.blocklistPath())
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"abuser@customer.test\tHOLD", "kept1@customer.test\tHOLD by hand", "bad@customer.test\tNOTANACTION"} {
		if !strings.Contains(string(data), s) {
			t.Errorf("after a block, the file lacks %q:\n%s", s, data)
		}
	}
	if out := runCLI(t, "list", "-config", cfg); !strings.Contains(out, "abuser@customer.test") || !strings.Contains(out, "kept2@customer.test") {
		t.Errorf("rcptguard list:\n%s", out)
	}
}
