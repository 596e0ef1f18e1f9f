package test_test

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/test"
)

// clusterConfig writes the configuration of fleet member name: its own
// blocklist and spool, the world's DNS and MX, the shared Redis.
func (w *world) clusterConfig(t *testing.T, name, redisURL, relay string) string {
	t.Helper()
	dir := filepath.Join(w.dir, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	notify := ""
	if relay != "" {
		notify = fmt.Sprintf("to = [\"abuse@isp.test\"]\nrelay = %q\nstarttls = \"off\"\n", relay)
	}
	text := fmt.Sprintf(`
[policy]
listen = ["127.0.0.1:0"]

[detector]
limit = 5
period = "1h"
wait = "2s"
warn_at = 0.0

[callout]
resolver = %q
port = %s
timeout = "1s"
helo = "rcptguard.test"
allow_private = true

[blocklist]
path = %q

[notify]
%sspool = %q

[queue]
requests = %q

[cluster]
redis = %q
key_prefix = "fleet-test:"
# A loaded 2-core test machine can miss the 200ms default; a timeout would
# make a server judge alone and the exact counts below differ.
timeout = "1s"
`, w.dns.Addr, w.port, filepath.Join(dir, "blocklist"), notify, filepath.Join(dir, "spool"), filepath.Join(dir, "hold-requests"), redisURL)
	p := filepath.Join(dir, "rcptguard.toml")
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// within polls cond every 20ms for at most d, and returns how long it took.
func within(t *testing.T, d time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > d {
			t.Fatalf("%s: not within %s", what, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}

func fileHas(path, s string) bool {
	b, _ := os.ReadFile(path)
	return strings.Contains(string(b), s)
}

// An abuser spread over three servers is blocked at exactly limit+1
// distinct invalid recipients in total, on all three within 2 s, with one
// report; an unblock on one frees it on all within 2 s and resets counts.
func TestClusterOneJudgement(t *testing.T) {
	w := newWorld(t)
	r := test.StartRedis(t)
	relay := test.StartRelay(t, test.RelayConfig{})
	var cfgs []string
	var cs []*test.PolicyClient
	var ds []*daemon
	for i := range 3 {
		cfg := w.clusterConfig(t, fmt.Sprintf("mx%d", i+1), r.URL(), relay.Addr)
		cfgs = append(cfgs, cfg)
		d := startDaemon(t, cfg)
		ds = append(ds, d)
		cs = append(cs, test.DialPolicy(t, d.addr))
	}
	const user = "spammer@customer.test"
	want := "HOLD rcptguard: spammer@customer.test blocked: 6 invalid recipients within 1h"
	for i := range 5 {
		if a := cs[i%3].Must(rcpt(user, fmt.Sprintf("harvested%d@good.test", i))); a != "DUNNO" {
			t.Fatalf("invalid recipient %d on server %d: %q", i+1, i%3+1, a)
		}
	}
	// The same recipient seen by another server counts once.
	if a := cs[2].Must(rcpt(user, "harvested0@good.test")); a != "DUNNO" {
		t.Fatalf("a recipient seen before, on another server: %q", a)
	}
	if a := cs[1].Must(rcpt(user, "harvested5@good.test")); a != want {
		t.Fatalf("6th distinct invalid recipient, server 2: %q, want %q\n%s", a, want, ds[1].logs)
	}
	start := time.Now()
	for i, c := range cs {
		took := within(t, 2*time.Second, fmt.Sprintf("server %d answers blocked", i+1), func() bool {
			return strings.HasPrefix(c.Must(rcpt(user, "alice@good.test")), "HOLD rcptguard: spammer@customer.test blocked")
		})
		t.Logf("server %d answers blocked %s after the block", i+1, took.Round(time.Millisecond))
		within(t, 2*time.Second-time.Since(start), fmt.Sprintf("server %d's blocklist file", i+1), func() bool {
			return fileHas(filepath.Join(filepath.Dir(cfgs[i]), "blocklist"), user+"\tHOLD")
		})
	}
	relay.WaitMessages(t, 1, 10*time.Second)
	time.Sleep(time.Second)
	if n := len(relay.Messages()); n != 1 {
		t.Fatalf("%d reports, want exactly one", n)
	}
	if list := runCLI(t, "list", "-config", cfgs[0]); !strings.Contains(list, user+"\tHOLD") {
		t.Fatalf("list:\n%s", list)
	}

	// Unblock on server 3: free everywhere within 2 s, counts reset.
	runCLI(t, "unblock", "-config", cfgs[2], user)
	start = time.Now()
	for i, c := range cs {
		within(t, 2*time.Second-time.Since(start), fmt.Sprintf("server %d free", i+1), func() bool {
			return c.Must(rcpt(user, "alice@good.test")) == "DUNNO" && !fileHas(filepath.Join(filepath.Dir(cfgs[i]), "blocklist"), user)
		})
	}
	t.Logf("unblock on every server and file within %s", time.Since(start).Round(time.Millisecond))
	for i := range 5 {
		if a := cs[i%3].Must(rcpt(user, fmt.Sprintf("again%d@good.test", i))); a != "DUNNO" {
			t.Fatalf("after the unblock, invalid recipient %d: %q (counts not reset)", i+1, a)
		}
	}
	if keys, _ := r.Do("KEYS", "*"); !strings.HasPrefix(keys, "*") {
		t.Fatalf("KEYS: %q", keys)
	}

	// A block by hand on server 1 reaches the others; a line removed by
	// hand from server 2's file unblocks everywhere.
	runCLI(t, "block", "-config", cfgs[0], "-reason", "ticket 4711", "other@customer.test")
	start = time.Now()
	for i, c := range cs {
		within(t, 2*time.Second-time.Since(start), fmt.Sprintf("server %d has the block by hand", i+1), func() bool {
			return c.Must(rcpt("other@customer.test", "alice@good.test")) == "HOLD ticket 4711"
		})
	}
	path := filepath.Join(filepath.Dir(cfgs[1]), "blocklist")
	within(t, 2*time.Second, "server 2's file has the block", func() bool { return fileHas(path, "other@customer.test") })
	b, _ := os.ReadFile(path)
	var kept []string
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(line, "other@customer.test\t") {
			kept = append(kept, line)
		}
	}
	if err := os.WriteFile(path+".new", []byte(strings.Join(kept, "\n")), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".new", path); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	for i, c := range cs {
		within(t, 4*time.Second-time.Since(start), fmt.Sprintf("server %d free after the hand edit", i+1), func() bool {
			return c.Must(rcpt("other@customer.test", "alice@good.test")) == "DUNNO"
		})
	}
	t.Logf("a line removed by hand on server 2: free everywhere within %s", time.Since(start).Round(time.Millisecond))
}

// Redis dies mid-run: every request is answered within 1 s, counting is
// local, and a block made meanwhile reaches the other server when Redis
// comes back, empty; the block made before the outage is not lost.
func TestClusterRedisOutage(t *testing.T) {
	w := newWorld(t)
	r := test.StartRedis(t)
	cfg1 := w.clusterConfig(t, "a", r.URL(), "")
	cfg2 := w.clusterConfig(t, "b", r.URL(), "")
	d1, d2 := startDaemon(t, cfg1), startDaemon(t, cfg2)
	c1, c2 := test.DialPolicy(t, d1.addr), test.DialPolicy(t, d2.addr)
	t0 := time.Now()
	at := func() string { return time.Since(t0).Round(time.Millisecond).String() }

	// Before: early@ is blocked on server 1, seen on 2.
	for i := range 6 {
		c1.Must(rcpt("early@customer.test", fmt.Sprintf("e%d@good.test", i)))
	}
	within(t, 2*time.Second, "early block on server 2", func() bool {
		return strings.HasPrefix(c2.Must(rcpt("early@customer.test", "alice@good.test")), "HOLD")
	})
	t.Logf("%s early@ blocked on both", at())

	r.Stop()
	t.Logf("%s redis killed", at())
	ask := func(c *test.PolicyClient, user, to string) string {
		s := time.Now()
		a := c.Must(rcpt(user, to))
		if d := time.Since(s); d > time.Second {
			t.Fatalf("answer took %s with redis down", d)
		}
		return a
	}
	for i := range 5 {
		if a := ask(c2, "late@customer.test", fmt.Sprintf("l%d@good.test", i)); a != "DUNNO" {
			t.Fatalf("redis down, invalid %d: %q", i+1, a)
		}
	}
	if a := ask(c2, "late@customer.test", "l5@good.test"); !strings.HasPrefix(a, "HOLD rcptguard: late@customer.test blocked: 6") {
		t.Fatalf("redis down, 6th invalid recipient: %q (local counting)", a)
	}
	t.Logf("%s late@ blocked on server 2 by local counting", at())
	if a := ask(c1, "late@customer.test", "alice@good.test"); a != "DUNNO" {
		t.Logf("server 1 already answers %q for late@", a)
	}
	if a := ask(c1, "early@customer.test", "alice@good.test"); !strings.HasPrefix(a, "HOLD") {
		t.Fatalf("redis down: early@ on server 1: %q", a)
	}

	r.Start() // empty: persistence is off
	t.Logf("%s redis back, empty", at())
	took := within(t, 10*time.Second, "late@ on server 1 after redis came back", func() bool {
		return strings.HasPrefix(c1.Must(rcpt("late@customer.test", "alice@good.test")), "HOLD")
	})
	t.Logf("%s late@ blocked on server 1 (%s after redis came back)", at(), took.Round(time.Millisecond))
	for _, c := range []*test.PolicyClient{c1, c2} {
		if a := c.Must(rcpt("early@customer.test", "alice@good.test")); !strings.HasPrefix(a, "HOLD") {
			t.Fatalf("early@ lost after redis came back empty: %q", a)
		}
	}
	within(t, 10*time.Second, "both blocks back in redis", func() bool {
		n, _ := r.Do("HLEN", "fleet-test:blocks{blocklist}")
		return n == ":2"
	})
	t.Logf("%s both blocks in redis again", at())
}

// A recipient verified by one server is not probed again by another: the
// verdict cache has a second level in Redis.
func TestClusterSharedVerdicts(t *testing.T) {
	mx := test.StartMXAt(t, "127.0.0.2:0", test.MXConfig{Mailboxes: []string{"alice@good.test"}})
	_, port, _ := net.SplitHostPort(mx.Addr)
	w := &world{dns: test.StartDNS(t, "good.test. 300 IN MX 10 mx.good.test.\nmx.good.test. 300 IN A 127.0.0.2\n"), port: port, dir: t.TempDir()}
	r := test.StartRedis(t)
	d1 := startDaemon(t, w.clusterConfig(t, "a", r.URL(), ""))
	d2 := startDaemon(t, w.clusterConfig(t, "b", r.URL(), ""))
	c1, c2 := test.DialPolicy(t, d1.addr), test.DialPolicy(t, d2.addr)
	for _, to := range []string{"alice@good.test", "nobody@good.test"} {
		c1.Must(rcpt("user@customer.test", to))
		within(t, 5*time.Second, "verdict on "+to+" in redis", func() bool {
			n, _ := r.Do("EXISTS", "fleet-test:verdict:"+to)
			return n == ":1"
		})
	}
	// Server 1 probed each once (and a random name: the catch-all test).
	probed := len(mx.Rcpts())
	for _, to := range []string{"alice@good.test", "nobody@good.test"} {
		if n := strings.Count(strings.Join(mx.Rcpts(), " "), to); n != 1 {
			t.Fatalf("server 1 probed %s %d times: %v", to, n, mx.Rcpts())
		}
	}
	c2.Must(rcpt("user@customer.test", "alice@good.test"))
	c2.Must(rcpt("user@customer.test", "nobody@good.test"))
	if got := mx.Rcpts(); len(got) != probed {
		t.Fatalf("server 2 probed again: %v", got)
	}
	if !strings.Contains(d2.logs.String(), "recipient=nobody@good.test") || !strings.Contains(d2.logs.String(), "verdict=invalid") {
		t.Fatalf("server 2 did not judge nobody@good.test invalid:\n%s", d2.logs)
	}
}
