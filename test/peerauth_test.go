package test_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/cmd/rcptguard/app"
	"github.com/rcptguard/rcptguard/test"
)

// forgerEnv, set to a policy address, makes TestPeerAuthForger the
// hostile local user of TestForgedRequestsFromAnotherUser.
const forgerEnv = "RCPTGUARD_TEST_FORGE_AT"

// honestEnv makes the child an honest smtpd instead: one request, for
// its own user, then it exits.
const honestEnv = "RCPTGUARD_TEST_HONEST"

// The forged requests: another customer's login, a forged client
// address, recipients that do not exist.
const forgedVictim = "victim@customer.example"

func forgedRequest(i int) map[string]string {
	req := test.RcptRequest(forgedVictim, forgedVictim, fmt.Sprintf("nobody%d@good.test", i), "")
	req["client_address"] = "203.0.113.66"
	return req
}

const (
	forgedRequests = 101  // past the daemon's limit of 5 many times over
	forgedIdle     = 2000 // idle connections, twice max_connections
)

// TestPeerAuthForger is not a test of its own: run by
// TestForgedRequestsFromAnotherUser as uid 65534 with forgerEnv set, it
// does what a hostile local user would, and prints what it got.
func TestPeerAuthForger(t *testing.T) {
	addr := os.Getenv(forgerEnv)
	if addr == "" {
		t.Skip("the hostile user of TestForgedRequestsFromAnotherUser; runs only as its child")
	}
	network := "tcp"
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		network, addr = "unix", p
	}
	fmt.Printf("forger uid=%d\n", os.Geteuid())
	if os.Getenv(honestEnv) != "" {
		c, err := net.DialTimeout(network, addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, test.Render(test.RcptRequest("honest@customer.example", "honest@customer.example", "alice@good.test", ""))); err != nil {
			t.Fatal(err)
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		fmt.Printf("honest answer=%q err=%v\n", line, err)
		return
	}

	// Forged requests, reconnecting whenever the connection is closed.
	answered, dialed := 0, 0
	var conn net.Conn
	var r *bufio.Reader
	for i := range forgedRequests {
		if conn == nil {
			c, err := net.DialTimeout(network, addr, 5*time.Second)
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			dialed++
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			conn, r = c, bufio.NewReader(c)
		}
		_, err := io.WriteString(conn, test.Render(forgedRequest(i)))
		if err == nil {
			var line string
			line, err = r.ReadString('\n')
			if err == nil {
				answered++
				fmt.Printf("forger answer=%q\n", line)
			}
		}
		if err != nil {
			_ = conn.Close()
			conn = nil
		}
	}
	if conn != nil {
		_ = conn.Close()
	}
	fmt.Printf("forger dialed=%d answered=%d\n", dialed, answered)

	// Idle connections: how many does the daemon keep open?
	conns := make([]net.Conn, 0, forgedIdle)
	for range forgedIdle {
		c, err := net.DialTimeout(network, addr, 5*time.Second)
		if err != nil {
			t.Fatalf("dial idle connection %d: %v", len(conns), err)
		}
		conns = append(conns, c)
	}
	// Each gets until the common deadline, and at least a moment: with a
	// deadline already past, Read would not look at the socket.
	deadline := time.Now().Add(3 * time.Second)
	open := 0
	for _, c := range conns {
		_ = c.SetReadDeadline(later(deadline, time.Now().Add(10*time.Millisecond)))
		if _, err := c.Read(make([]byte, 1)); os.IsTimeout(err) {
			open++
		}
		_ = c.Close()
	}
	fmt.Printf("forger idle_open=%d\n", open)
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// TestForgedRequestsFromAnotherUser runs a real process as uid 65534
// (nobody) against the daemon's loopback TCP and unix socket listeners:
// its forged requests are never answered, its idle connections are
// closed, the victim is never blocked, while the same requests from root
// are answered.
func TestForgedRequestsFromAnotherUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root, to run the hostile process as uid 65534 (nobody)")
	}
	w := newWorld(t)
	// A directory nobody can enter, holding a socket anybody may connect
	// to: only the peer check stands in the way.
	dir, err := os.MkdirTemp("", "rcptguard-peerauth-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(w.dir, "rcptguard.toml")
	cfg := fmt.Sprintf(`
[policy]
listen = ["127.0.0.1:0", "unix:%s"]
socket_mode = "0666"
max_connections = 1000

[detector]
limit = 5
wait = "2s"

[callout]
resolver = %q
port = %s
timeout = "1s"
allow_private = true

[blocklist]
path = %q

[notify]
spool = %q

[queue]
requests = %q

[metrics]
listen = "127.0.0.1:0"
`, filepath.Join(dir, "policy.sock"), w.dns.Addr, w.port, filepath.Join(w.dir, "state", "blocklist"), filepath.Join(w.dir, "state", "spool"), filepath.Join(w.dir, "state", "hold-requests"))
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	addrs, metrics := servePeerAuth(t, cfgPath, logs)
	if len(addrs) != 2 || !strings.HasPrefix(addrs[1], "unix:") {
		t.Fatalf("listeners %v", addrs)
	}

	forger := copyTestBinary(t, dir)
	for _, addr := range addrs {
		name := "tcp"
		if strings.HasPrefix(addr, "unix:") {
			name = "unix"
		}
		t.Run(name, func(t *testing.T) {
			out := runAs(t, forger, addr, 65534, 65534, "")
			for _, want := range []string{
				"forger uid=65534",
				fmt.Sprintf("forger dialed=%d answered=0", forgedRequests),
				"forger idle_open=0",
			} {
				if !strings.Contains(out, want) {
					t.Errorf("the forger's output lacks %q:\n%s", want, out)
				}
			}
		})
	}

	// The victim is not blocked and nothing was decided for it.
	if list := runCLI(t, "list", "-config", cfgPath); strings.Contains(list, forgedVictim) {
		t.Fatalf("the victim was blocked by forged requests:\n%s", list)
	}
	text := logs.String()
	if strings.Contains(text, forgedVictim) {
		t.Errorf("a forged request reached the detector:\n%s", grepLines(text, forgedVictim))
	}
	refusals := grepLines(text, "local user not allowed")
	if !strings.Contains(refusals, "uid=65534") {
		t.Errorf("no refusal line names uid 65534:\n%s", refusals)
	}
	// Rate-limited: 2 x (101 + 2,000) refusals, a few lines.
	if n := strings.Count(refusals, "\n"); n > 20 {
		t.Errorf("%d refusal lines for one user's flood:\n%s", n, refusals)
	}
	want := 2 * (forgedRequests + forgedIdle)
	if got := refusedMetric(t, metrics, "user"); got != want {
		t.Errorf("rcptguard_policy_connections_refused_total{reason=\"user\"} = %d, want %d", got, want)
	}

	// The same requests from root are answered, and do block.
	c := test.DialPolicy(t, addrs[0])
	for i := range 5 {
		if a := c.Must(forgedRequest(i)); a != "DUNNO" {
			t.Fatalf("root's request %d: %q", i, a)
		}
	}
	if a := c.Must(forgedRequest(5)); !strings.HasPrefix(a, "HOLD") {
		t.Fatalf("root's 6th request: %q, want HOLD", a)
	}
	u := test.DialPolicy(t, addrs[1])
	if a := u.Must(forgedRequest(6)); !strings.HasPrefix(a, "HOLD") {
		t.Fatalf("root's request on the unix socket: %q, want HOLD", a)
	}

	// Postfix's own user (the default mail_owner) is answered on both.
	pf, err := user.Lookup("postfix")
	if err != nil {
		t.Logf("no postfix user here: %v", err)
		return
	}
	uid, _ := strconv.ParseUint(pf.Uid, 10, 32)
	gid, _ := strconv.ParseUint(pf.Gid, 10, 32)
	for _, addr := range addrs {
		out := runAs(t, forger, addr, uint32(uid), uint32(gid), honestEnv+"=1")
		if want := fmt.Sprintf(`forger uid=%d`, uid); !strings.Contains(out, want) || !strings.Contains(out, `honest answer="action=DUNNO\n" err=<nil>`) {
			t.Errorf("postfix on %s not answered DUNNO:\n%s", addr, out)
		}
	}
}

// servePeerAuth runs the daemon in process and returns every policy
// address and the metrics address.
func servePeerAuth(t *testing.T, cfgPath string, logs io.Writer) ([]string, string) {
	t.Helper()
	cfg, err := app.LoadConfig(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	type ready struct {
		policy  []string
		metrics string
	}
	readyc := make(chan ready, 1)
	done := make(chan error, 1)
	go func() {
		done <- app.Serve(ctx, cfg, logs, app.Hooks{Ready: func(p []string, m string) { readyc <- ready{p, m} }})
	}()
	t.Cleanup(func() {
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
	select {
	case r := <-readyc:
		return r.policy, r.metrics
	case err := <-done:
		t.Fatalf("serve ended before it was ready: %v\n%s", err, logs)
	case <-time.After(10 * time.Second):
		t.Fatal("serve not ready in 10s")
	}
	return nil, ""
}

// copyTestBinary copies this test binary into dir, where uid 65534 can
// run it (the go tool builds it in a directory only we can enter).
func copyTestBinary(t *testing.T, dir string) string {
	t.Helper()
	path := filepath.Join(dir, "forger.test")
	if err := copyExecutable(path); err != nil {
		t.Fatal(err)
	}
	return path
}

// copyExecutable copies the running test binary to path. The copy is
// written holding syscall.ForkLock for reading, which every fork waits
// for: a child forked by another goroutine while the file is open for
// writing would hold that open file until it execs, and an exec of the
// copy meanwhile fails with ETXTBSY ("text file busy"), whatever name
// the copy has by then.
func copyExecutable(path string) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	src, err := os.Open(self)
	if err != nil {
		return err
	}
	defer src.Close()
	syscall.ForkLock.RLock()
	defer syscall.ForkLock.RUnlock()
	dst, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(dst, src); err != nil {
		_ = dst.Close()
		return err
	}
	return dst.Close()
}

// runAs runs TestPeerAuthForger in bin as uid and gid against addr, with
// extra in its environment, and returns its output.
func runAs(t *testing.T, bin, addr string, uid, gid uint32, extra string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-test.run=^TestPeerAuthForger$", "-test.v")
	cmd.Dir = filepath.Dir(bin)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=/", forgerEnv + "=" + addr, extra, test.StateGuardedEnv + "=1"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("forger: %v\n%s", err, out)
	}
	return string(out)
}

func grepLines(text, s string) string {
	var b strings.Builder
	for _, line := range strings.Split(text, "\n") {
		if strings.Contains(line, s) {
			b.WriteString(line)
			b.WriteByte('\n')
		}
	}
	return b.String()
}

// refusedMetric reads rcptguard_policy_connections_refused_total for a
// reason from the metrics endpoint.
func refusedMetric(t *testing.T, addr, reason string) int {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(`(?m)^rcptguard_policy_connections_refused_total\{reason="` + reason + `"\} (\d+)$`)
	m := re.FindSubmatch(body)
	if m == nil {
		t.Fatalf("no refused metric for %s in:\n%s", reason, body)
	}
	n, _ := strconv.Atoi(string(m[1]))
	return n
}
