package test_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/rcptguard/rcptguard/cmd/rcptguard/app"
	"github.com/rcptguard/rcptguard/detector"
	"github.com/rcptguard/rcptguard/test"
)

// world is the outside the daemon sees: a DNS server and MX hosts on
// loopback addresses sharing one port.
//
//	good.test  MX 127.0.0.2  knows alice, bob, carol
//	grey.test  MX 127.0.0.3  greylists every recipient (451)
//	slow.test  MX 127.0.0.4  answers RCPT after 2 s, past callout.timeout
//	block.test MX 127.0.0.5  refuses everything with 5.7.1 (our IP listed)
type world struct {
	dns  *test.DNSServer
	port string
	dir  string
}

// worldZone is the zone newWorld serves; faultWorld adds to it.
const worldZone = `
good.test. 300 IN MX 10 mx.good.test.
mx.good.test. 300 IN A 127.0.0.2
grey.test. 300 IN MX 10 mx.grey.test.
mx.grey.test. 300 IN A 127.0.0.3
slow.test. 300 IN MX 10 mx.slow.test.
mx.slow.test. 300 IN A 127.0.0.4
block.test. 300 IN MX 10 mx.block.test.
mx.block.test. 300 IN A 127.0.0.5
`

func newWorld(t *testing.T) *world {
	t.Helper()
	good := test.StartMXAt(t, "127.0.0.2:0", test.MXConfig{Mailboxes: []string{"alice@good.test", "bob@good.test", "carol@good.test"}})
	_, port, _ := net.SplitHostPort(good.Addr)
	test.StartMXAt(t, "127.0.0.3:"+port, test.MXConfig{Unknown: &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 1}, Message: "Greylisted, try again in 5 minutes"}})
	test.StartMXAt(t, "127.0.0.4:"+port, test.MXConfig{RcptDelay: 2 * time.Second})
	test.StartMXAt(t, "127.0.0.5:"+port, test.MXConfig{Unknown: &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "Service unavailable; client host blocked using zen.spamhaus.org"}})
	dns := test.StartDNS(t, worldZone)
	return &world{dns: dns, port: port, dir: t.TempDir()}
}

// config writes the daemon's configuration file. [notify] comes last: some
// tests cut it off and write their own.
func (w *world) config(t *testing.T, extra string) string {
	t.Helper()
	text := fmt.Sprintf(`
[policy]
listen = ["127.0.0.1:0"]

[detector]
limit = 5
period = "1h"
wait = "300ms"
%s

[callout]
resolver = %q
port = %s
timeout = "1s"
helo = "rcptguard.test"
allow_private = true

[blocklist]
path = %q

[queue]
requests = %q

[notify]
spool = %q
`, extra, w.dns.Addr, w.port, filepath.Join(w.dir, "state", "blocklist"), filepath.Join(w.dir, "state", "hold-requests"), filepath.Join(w.dir, "state", "spool"))
	p := filepath.Join(w.dir, "rcptguard.toml")
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// daemon is a running `rcptguard serve`, in process.
type daemon struct {
	addr    string
	metrics string
	stop    func()
	logs    *syncBuffer
	det     atomic.Pointer[detector.Detector]
}

func startDaemon(t *testing.T, configPath string) *daemon {
	t.Helper()
	d := &daemon{logs: &syncBuffer{}}
	d.addr, d.metrics, d.stop = serveWith(t, configPath, d.logs, app.Hooks{Detector: func(det *detector.Detector) { d.det.Store(det) }})
	return d
}

// inFlight is the number of verifications the daemon runs in the
// background: requests answered before their verdict, whose verdict still
// counts when it comes.
func (d *daemon) inFlight() int {
	if det := d.det.Load(); det != nil {
		return det.InFlight()
	}
	return 0
}

// serveInProcess runs `rcptguard serve` with the configuration file in
// this process, logging to logs, and returns the policy and metrics
// addresses and a stop function (also called at the test's cleanup).
func serveInProcess(t *testing.T, configPath string, logs io.Writer) (addr, metrics string, stop func()) {
	t.Helper()
	return serveWith(t, configPath, logs, app.Hooks{})
}

// serveWith is serveInProcess with hooks (its Ready is serveWith's own).
func serveWith(t *testing.T, configPath string, logs io.Writer, hooks app.Hooks) (addr, metrics string, stop func()) {
	t.Helper()
	cfg, err := app.LoadConfig(configPath)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan [2]string, 1)
	done := make(chan error, 1)
	go func() {
		hooks.Ready = func(policy []string, metrics string) { ready <- [2]string{policy[0], metrics} }
		done <- app.Serve(ctx, cfg, logs, hooks)
	}()
	select {
	case a := <-ready:
		addr, metrics = a[0], a[1]
	case err := <-done:
		cancel()
		t.Fatalf("serve ended before it was ready: %v\n%s", err, logs)
	case <-time.After(10 * time.Second):
		cancel()
		t.Fatal("serve not ready in 10s")
	}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("serve: %v", err)
				}
			case <-time.After(20 * time.Second):
				t.Error("serve did not stop in 20s")
			}
		})
	}
	t.Cleanup(stop)
	return addr, metrics, stop
}

// syncBuffer is where an in-process daemon logs.
type syncBuffer struct{ test.Buffer }

// String returns what was logged. The daemon writes routine decision
// lines in batches, at most 100ms late, so it first waits a little longer
// than that: every request answered before the call is in the text.
func (s *syncBuffer) String() string {
	time.Sleep(150 * time.Millisecond)
	return s.Buffer.String()
}

func rcpt(user, to string) map[string]string {
	return test.RcptRequest(user, user, to, "")
}

func TestHonestUserNeverBlocked(t *testing.T) {
	w := newWorld(t)
	d := startDaemon(t, w.config(t, ""))
	c := test.DialPolicy(t, d.addr)
	// Valid recipients, one typo, and many at greylisting, slow and
	// policy-refusing MX hosts: far more than the limit of 5, none counts
	// but the typo.
	var rcpts []string
	rcpts = append(rcpts, "alice@good.test", "bob@good.test", "alcie@good.test")
	for i := range 8 {
		rcpts = append(rcpts, fmt.Sprintf("user%d@grey.test", i), fmt.Sprintf("user%d@slow.test", i), fmt.Sprintf("user%d@block.test", i))
	}
	for _, r := range rcpts {
		a := c.Must(rcpt("honest@customer.test", r))
		// A slow probe with more in flight than the limit of 5 could be
		// the crossing one: deferred (the client retries), never held.
		if a != "DUNNO" && !(strings.HasSuffix(r, "@slow.test") && strings.HasPrefix(a, "DEFER_IF_PERMIT ")) {
			t.Fatalf("%s: %q for an honest user", r, a)
		}
	}
	time.Sleep(1200 * time.Millisecond) // let the slow probes time out (they must not count)
	if a := c.Must(rcpt("honest@customer.test", "carol@good.test")); a != "DUNNO" {
		t.Fatalf("honest user answered %q after slow probes finished", a)
	}
	out := runCLI(t, "list", "-config", w.dir+"/rcptguard.toml")
	if strings.Contains(out, "honest@") {
		t.Fatalf("honest user in the blocklist:\n%s", out)
	}
	if !strings.Contains(d.logs.String(), "queue_id=") {
		t.Error("decision log lines lack queue_id")
	}
}

func TestAbuserBlockedAfterLimitAndRestartAndUnblock(t *testing.T) {
	w := newWorld(t)
	cfgPath := w.config(t, "")
	d := startDaemon(t, cfgPath)
	c := test.DialPolicy(t, d.addr)
	const user = "Spammer@Customer.test"
	for i := range 5 {
		if a := c.Must(rcpt(user, fmt.Sprintf("harvested%d@good.test", i))); a != "DUNNO" {
			t.Fatalf("invalid recipient %d (within the limit): %q", i+1, a)
		}
		// A retried request for the same recipient does not count twice.
		c.Must(rcpt(user, fmt.Sprintf("harvested%d@good.test", i)))
	}
	a := c.Must(rcpt(user, "harvested5@good.test"))
	want := "HOLD rcptguard: spammer@customer.test blocked: 6 invalid recipients within 1h"
	if a != want {
		t.Fatalf("6th distinct invalid recipient: %q, want %q", a, want)
	}
	for _, r := range []string{"alice@good.test", "whoever@grey.test"} {
		if a := c.Must(test.RcptRequest(user, user, r, "3F1B2C4D5E")); a != want {
			t.Fatalf("later request to %s: %q", r, a)
		}
	}
	// Another user is not affected.
	if a := c.Must(rcpt("other@customer.test", "alice@good.test")); a != "DUNNO" {
		t.Fatalf("other user: %q", a)
	}
	list := runCLI(t, "list", "-config", cfgPath)
	if !strings.Contains(list, "spammer@customer.test\tHOLD rcptguard: spammer@customer.test blocked") {
		t.Fatalf("blocklist:\n%s", list)
	}
	if !strings.Contains(d.logs.String(), "rcptguard blocked") {
		t.Errorf("no block log line:\n%s", d.logs)
	}
	// The fail2ban filter in contrib/ finds the client of the block line.
	re := fail2banRegex(t)
	found := false
	for _, line := range strings.Split(d.logs.String(), "\n") {
		if m := re.FindStringSubmatch(line); m != nil {
			found = true
			if host := m[re.SubexpIndex("host")]; host != "198.51.100.23" {
				t.Errorf("fail2ban filter found host %q in %q", host, line)
			}
		}
	}
	if !found {
		t.Error("the fail2ban filter matches no log line")
	}

	// The block survives a restart.
	d.stop()
	d = startDaemon(t, cfgPath)
	c = test.DialPolicy(t, d.addr)
	if a := c.Must(rcpt(user, "alice@good.test")); a != want {
		t.Fatalf("after restart: %q", a)
	}

	// Unblocked by the CLI while the daemon runs: DUNNO within 2 s.
	runCLI(t, "unblock", "-config", cfgPath, user)
	start := time.Now()
	for {
		a := c.Must(rcpt(user, "alice@good.test"))
		if a == "DUNNO" {
			break
		}
		if time.Since(start) > 2*time.Second {
			t.Fatalf("still %q 2s after unblock", a)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("unblock took effect after %s", time.Since(start).Round(time.Millisecond))
	// A block by hand is seen too.
	runCLI(t, "block", "-config", cfgPath, "-reason", "compromised, ticket 123", "other@customer.test")
	start = time.Now()
	for c.Must(rcpt("other@customer.test", "alice@good.test")) != "HOLD compromised, ticket 123" {
		if time.Since(start) > 2*time.Second {
			t.Fatal("block by hand not seen within 2s")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestGarbageDoesNotStopTheDaemon(t *testing.T) {
	w := newWorld(t)
	d := startDaemon(t, w.config(t, ""))
	garbage := []string{
		"\x00\x01\x02binary\xff\xfe\n\n",
		"no equals sign\n\n",
		"=value\n\n",
		"request=" + strings.Repeat("x", 100_000) + "\n\n",
		strings.Repeat("a=b\n", 1000) + "\n",
		"\n\n\n\n",
		"request=smtpd_access_policy\nprotocol_state=RCPT", // EOF mid-request
	}
	for _, g := range garbage {
		conn, err := net.Dial("tcp", d.addr)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = conn.Write([]byte(g))
		if tc, ok := conn.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		reply, _ := io.ReadAll(conn)
		conn.Close()
		if len(reply) > 0 {
			t.Errorf("garbage %.40q got an answer %q", g, reply)
		}
		c := test.DialPolicy(t, d.addr)
		if a := c.Must(rcpt("u@customer.test", "alice@good.test")); a != "DUNNO" {
			t.Fatalf("after garbage %.40q: %q", g, a)
		}
	}
}

func TestConcurrentSameAsSerial(t *testing.T) {
	// Identity uN sends to N distinct invalid recipients (each twice) and
	// one valid one; with limit 5, u6..u9 end up blocked.
	type req struct{ user, rcpt string }
	var reqs []req
	for n := range 10 {
		user := fmt.Sprintf("u%d@customer.test", n)
		reqs = append(reqs, req{user, "alice@good.test"})
		for i := range n {
			r := req{user, fmt.Sprintf("nobody%d-%d@good.test", n, i)}
			reqs = append(reqs, r, r)
		}
	}
	blocked := func(concurrent bool) string {
		w := newWorld(t)
		// The product's probe deadline, not the suite's 1s: 50
		// concurrent requests share 4 sessions to the one fake MX, and
		// on a loaded machine a 1s deadline can run out, an "unknown
		// timeout" verdict that rightly never counts.
		cfgPath := w.suiteConfig(t, "same.toml", map[string]string{"callout.timeout": `"10s"`})
		d := startDaemon(t, cfgPath)
		if !concurrent {
			c := test.DialPolicy(t, d.addr)
			for _, r := range reqs {
				c.Must(rcpt(r.user, r.rcpt))
			}
		} else {
			work := make(chan req)
			var wg sync.WaitGroup
			for range 50 {
				c := test.DialPolicy(t, d.addr)
				wg.Go(func() {
					for r := range work {
						if _, err := c.Ask(rcpt(r.user, r.rcpt)); err != nil {
							t.Error(err)
						}
					}
				})
			}
			for _, r := range reqs {
				work <- r
			}
			close(work)
			wg.Wait()
		}
		// Verdicts of requests answered before them (DUNNO at once, or
		// deferred past detector.wait) count when they arrive: wait until
		// none is in flight. A request may have two decision lines (its
		// answer, then its verdict, "late"), so the lines do not say it.
		pollUntil(t, 30*time.Second, "verifications still in flight", func() bool { return d.inFlight() == 0 })
		// A block answered HOLD is in the file, or on its way there when
		// the disk was slow (held in memory and retried).
		held := map[string]bool{}
		for _, line := range strings.Split(d.logs.String(), "\n") {
			if strings.Contains(line, "msg=decision") && strings.Contains(line, "verdict=unknown") {
				t.Errorf("concurrent=%v: a verdict that does not count:\n%s", concurrent, line)
			}
			if strings.Contains(line, "msg=decision") && strings.Contains(line, ` action="HOLD `) {
				if _, rest, ok := strings.Cut(line, " identity="); ok {
					id, _, _ := strings.Cut(rest, " ")
					held[id] = true
				}
			}
		}
		var ids []string
		pollUntil(t, 10*time.Second, "blocks answered HOLD are not in the blocklist file", func() bool {
			ids = nil
			for _, line := range strings.Split(strings.TrimSpace(runCLI(t, "list", "-config", cfgPath)), "\n") {
				id, _, _ := strings.Cut(line, "\t")
				ids = append(ids, id)
			}
			for id := range held {
				if !slices.Contains(ids, id) {
					return false
				}
			}
			return true
		})
		return strings.Join(ids, " ")
	}
	serial, concurrent := blocked(false), blocked(true)
	if serial != "u6@customer.test u7@customer.test u8@customer.test u9@customer.test" {
		t.Fatalf("serial run blocked %q", serial)
	}
	if concurrent != serial {
		t.Fatalf("50 concurrent connections blocked %q, serial %q", concurrent, serial)
	}
}

func TestMonitorModeNeverBlocks(t *testing.T) {
	w := newWorld(t)
	cfgPath := w.config(t, `mode = "monitor"`)
	d := startDaemon(t, cfgPath)
	c := test.DialPolicy(t, d.addr)
	for i := range 10 {
		if a := c.Must(rcpt("watched@customer.test", fmt.Sprintf("x%d@good.test", i))); a != "DUNNO" {
			t.Fatalf("monitor mode answered %q", a)
		}
	}
	if out := runCLI(t, "list", "-config", cfgPath); strings.TrimSpace(out) != "" {
		t.Fatalf("monitor mode wrote the blocklist:\n%s", out)
	}
	if !strings.Contains(d.logs.String(), "would block") {
		t.Error("no would-block log line")
	}
}

func runCLI(t *testing.T, args ...string) string {
	t.Helper()
	var out, errOut bytes.Buffer
	if err := app.Run(context.Background(), args, &out, &errOut); err != nil {
		t.Fatalf("rcptguard %s: %v\n%s", strings.Join(args, " "), err, errOut.String())
	}
	return out.String()
}

func TestReloadOnSIGHUPAndMetrics(t *testing.T) {
	w := newWorld(t)
	cfgPath := w.config(t, "")
	limits := filepath.Join(w.dir, "limits")
	if err := os.WriteFile(limits, []byte("# per-identity limits\nvip@customer.test 0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, w.config(t, fmt.Sprintf("limits_file = %q\n[metrics]\nlisten = \"127.0.0.1:0\"", limits)))
	c := test.DialPolicy(t, d.addr)
	c.Must(rcpt("small@customer.test", "x0@good.test"))
	c.Must(rcpt("small@customer.test", "x1@good.test"))

	// The limits file gets a line for small@: limit 1. A broken config
	// first: the reload fails and the old settings stay.
	if err := os.WriteFile(limits, []byte("vip@customer.test 0\nsmall@customer.test 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	good, _ := os.ReadFile(cfgPath)
	if err := os.WriteFile(cfgPath, append(good, "\n[detector]\nbogus = 1\n"...), 0o644); err != nil {
		t.Fatal(err)
	}
	hup(t, d, "reload failed")
	if a := c.Must(rcpt("small@customer.test", "x2@good.test")); a != "DUNNO" {
		t.Fatalf("broken config applied: %q", a)
	}
	if err := os.WriteFile(cfgPath, good, 0o644); err != nil {
		t.Fatal(err)
	}
	hup(t, d, "configuration reloaded")
	if a := c.Must(rcpt("small@customer.test", "x3@good.test")); !strings.HasPrefix(a, "HOLD ") {
		t.Fatalf("new limit not applied after SIGHUP: %q", a)
	}

	resp, err := http.Get("http://" + d.metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, m := range []string{`rcptguard_policy_requests_total{action="blocked"} 1`, `rcptguard_verdicts_total{source="smtp",verdict="invalid"}`,
		"rcptguard_probe_duration_seconds_bucket", "rcptguard_blocks_total 1", "rcptguard_blocked_identities", "rcptguard_tracked_identities"} {
		if !strings.Contains(string(body), m) {
			t.Errorf("metrics lack %q", m)
		}
	}
	if strings.Contains(string(body), "small@customer.test") {
		t.Error("an identity appears in the metrics")
	}
}

// hup sends SIGHUP to this process (the daemon runs in it) and waits for
// the log line that says how the reload went.
func hup(t *testing.T, d *daemon, want string) {
	t.Helper()
	before := strings.Count(d.logs.String(), want)
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for strings.Count(d.logs.String(), want) == before {
		if time.Now().After(deadline) {
			t.Fatalf("no %q log line after SIGHUP:\n%s", want, d.logs)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestHealthCommand(t *testing.T) {
	w := newWorld(t)
	d := startDaemon(t, w.config(t, ""))
	cfg := filepath.Join(w.dir, "health.toml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf("[policy]\nlisten = [%q]\n[blocklist]\npath = %q\n[queue]\nrequests = %q\n", d.addr, filepath.Join(w.dir, "state", "blocklist"), filepath.Join(w.dir, "state", "hold-requests"))), 0o644); err != nil {
		t.Fatal(err)
	}
	if out := runCLI(t, "health", "-config", cfg); !strings.HasPrefix(out, "ok ") || !strings.Contains(out, "action=DUNNO") {
		t.Fatalf("health: %q", out)
	}
	d.stop()
	var out, errOut bytes.Buffer
	if err := app.Run(context.Background(), []string{"health", "-config", cfg, "-timeout", "1s"}, &out, &errOut); err == nil {
		t.Fatalf("health succeeded with the daemon stopped: %q", out.String())
	}
}

// TestBlockReportMailed: a block sends exactly one report through the
// relay, authenticated, with both MIME parts; a report spooled while the
// relay is down is delivered after a restart of the daemon.
func TestBlockReportMailed(t *testing.T) {
	w := newWorld(t)
	relay := test.StartRelay(t, test.RelayConfig{AuthUser: "rcptguard@customer.test", AuthPass: "s3cret", AllowInsecureAuth: true})
	pw := filepath.Join(w.dir, "relay-password")
	if err := os.WriteFile(pw, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	extra := fmt.Sprintf(`
[notify]
to = ["abuse@isp.test"]
from = "rcptguard@isp.test"
relay = %q
username = "rcptguard@customer.test"
password_file = %q
starttls = "off"
spool = %q
`, relay.Addr, pw, filepath.Join(w.dir, "state", "spool"))
	cfgPath := w.config(t, "")
	text, _ := os.ReadFile(cfgPath)
	// The world's config has a [notify] section for the spool; replace it.
	base, _, _ := strings.Cut(string(text), "[notify]")
	if err := os.WriteFile(cfgPath, []byte(base+extra), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, cfgPath)
	c := test.DialPolicy(t, d.addr)
	for i := range 6 {
		c.Must(test.RcptRequest("mallory@customer.test", "mallory@customer.test", fmt.Sprintf("x%d@good.test", i), "ABC123"))
	}
	for range 3 { // more requests after the block: still one report
		c.Must(rcpt("mallory@customer.test", "alice@good.test"))
	}
	// A warning at 4 of 5 (warn_at 0.75), then the block report.
	msgs := relay.WaitMessages(t, 2, 10*time.Second)
	block := reportWith(t, msgs, "Subject: [rcptguard] blocked mallory@customer.test: 6 invalid recipients in 1h")
	if reportWith(t, msgs, "Subject: [rcptguard] warning mallory@customer.test: 4 of 5") == nil {
		t.Error("no warning report")
	}
	if block.AuthUser != "rcptguard@customer.test" || len(block.To) != 1 || block.To[0] != "abuse@isp.test" {
		t.Fatalf("report envelope: auth %q to %v", block.AuthUser, block.To)
	}
	for _, want := range []string{"Auto-Submitted: auto-generated", "application/json", "rcptguard unblock 'mallory@customer.test'",
		"x5@good.test", "- ABC123", "rcptguard release -n 'mallory@customer.test'", "rcptguard purge -n 'mallory@customer.test'"} {
		if !strings.Contains(string(block.Data), want) {
			t.Errorf("block report lacks %q", want)
		}
	}
	time.Sleep(200 * time.Millisecond)
	if n := len(relay.Messages()); n != 2 {
		t.Fatalf("%d reports, want one warning and one block", n)
	}

	// Relay down: the next block's reports wait in the spool, across a
	// restart, and are delivered once the relay is back.
	relay.SetDown(true)
	for i := range 6 {
		c.Must(rcpt("trudy@customer.test", fmt.Sprintf("y%d@good.test", i)))
	}
	d.stop()
	spooled, _ := os.ReadDir(filepath.Join(w.dir, "state", "spool"))
	if len(spooled) == 0 {
		t.Fatal("nothing in the spool while the relay is down")
	}
	relay.SetDown(false)
	startDaemon(t, cfgPath)
	msgs = relay.WaitMessages(t, 4, 10*time.Second)
	if reportWith(t, msgs, "Subject: [rcptguard] blocked trudy@customer.test") == nil {
		t.Fatal("spooled block report not delivered after the restart")
	}
	time.Sleep(200 * time.Millisecond)
	if n := len(relay.Messages()); n != 4 {
		t.Fatalf("%d reports after the restart, want 4 (each exactly once)", n)
	}
}

// reportWith returns the message containing s, failing the test when
// more than one does.
func reportWith(t *testing.T, msgs []test.RelayMessage, s string) *test.RelayMessage {
	t.Helper()
	var found *test.RelayMessage
	for i := range msgs {
		if strings.Contains(string(msgs[i].Data), s) {
			if found != nil {
				t.Fatalf("two messages contain %q", s)
			}
			found = &msgs[i]
		}
	}
	return found
}
