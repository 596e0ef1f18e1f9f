package test_test

// kill -9 of the daemon during a burst of blocks (issue 7): the blocklist
// is always a whole version of the file, and every block acknowledged
// (answered with HOLD) before the kill is on file. The daemon runs as a
// separate process: the test binary itself, re-executed (see TestMain).

import (
	"bytes"
	"fmt"
	"net"
	"net/mail"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/blocklist"
	"github.com/rcptguard/rcptguard/test"
)

// childDaemon is `rcptguard serve` running in a child process.
type childDaemon struct {
	cmd     *exec.Cmd
	addr    string
	logPath string
	exited  chan struct{}
}

// freeAddr returns a loopback address whose port was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// startChild runs `rcptguard serve -config cfgPath` in a child process
// and waits until it accepts connections on addr. Its output is appended
// to logPath. The child is killed at the end of the test if still running.
func startChild(t *testing.T, cfgPath, addr, logPath string) *childDaemon {
	t.Helper()
	out, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "RCPTGUARD_TEST_DAEMON=1", "RCPTGUARD_TEST_ARGS=serve -config "+cfgPath)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		out.Close()
		t.Fatal(err)
	}
	c := &childDaemon{cmd: cmd, addr: addr, logPath: logPath, exited: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		out.Close()
		close(c.exited)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-c.exited
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			conn.Close()
			return c
		}
		select {
		case <-c.exited:
			t.Fatalf("the daemon exited before it listened on %s (%v):\n%s", addr, cmd.ProcessState, c.output())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the daemon does not listen on %s after 20s:\n%s", addr, c.output())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (c *childDaemon) output() string {
	b, _ := os.ReadFile(c.logPath)
	return string(b)
}

// kill sends SIGKILL and waits for the process to be gone.
func (c *childDaemon) kill(t *testing.T) {
	t.Helper()
	if err := c.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Logf("SIGKILL: %v", err)
	}
	<-c.exited
}

// checkBlocklistIntact parses the blocklist as it is after a crash: it
// must be a whole file (no problem, no cut last line) holding every
// identity in acked. It returns the entries and the temporary files left
// next to it.
func checkBlocklistIntact(t *testing.T, path string, acked []string) ([]blocklist.Entry, []string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	if len(data) > 0 && data[len(data)-1] != '\n' {
		t.Errorf("the blocklist's last line is cut: %q", data[max(0, len(data)-80):])
	}
	entries, problems, err := blocklist.Parse(strings.NewReader(string(data)))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("the blocklist has a bad line after the kill: %v", p)
	}
	on := map[string]bool{}
	for _, e := range entries {
		on[e.Identity] = true
	}
	for _, id := range acked {
		if !on[id] {
			t.Errorf("%s was answered HOLD before the kill but is not in the blocklist", id)
		}
	}
	leftovers, _ := filepath.Glob(filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*"))
	return entries, leftovers
}

// TestKill9DuringBlocks drives a burst of blocks (200 identities, each
// past limit 1) from 20 connections and kills the daemon with SIGKILL
// after the 1st, 60th and 150th acknowledged block, one run each on the
// same blocklist file. After each kill the file is whole and holds every
// acknowledged identity; a final start on the same state answers.
func TestKill9DuringBlocks(t *testing.T) {
	w := newWorld(t)
	addr := freeAddr(t)
	cfg := w.suiteConfig(t, "crash.toml", map[string]string{
		"policy.listen":    fmt.Sprintf("[%q]", addr),
		"detector.limit":   "1",
		"detector.warn_at": "0",
		"detector.wait":    `"5s"`,
		"callout.timeout":  `"5s"`,
	})
	logPath := filepath.Join(w.dir, "daemon.log")
	var allAcked []string
	for run, killAfter := range []int{1, 60, 150} {
		const identities, workers = 200, 20
		d := startChild(t, cfg, addr, logPath)
		clients := make([]*test.PolicyClient, workers)
		for i := range clients {
			clients[i] = test.DialPolicy(t, addr)
		}
		var (
			mu     sync.Mutex
			acked  []string
			acks   atomic.Int64
			killed sync.Once
			killAt time.Time
			wg     sync.WaitGroup
		)
		kill := func() {
			killed.Do(func() {
				killAt = time.Now()
				_ = d.cmd.Process.Signal(syscall.SIGKILL)
			})
		}
		start := time.Now()
		for wi, c := range clients {
			wg.Go(func() {
				for i := wi; i < identities; i += workers {
					id := fmt.Sprintf("r%d-u%03d@customer.test", run, i)
					var a string
					for k := range 2 {
						var err error
						a, err = c.Ask(rcpt(id, fmt.Sprintf("nobody-%d-%d-%d@good.test", run, i, k)))
						if err != nil {
							return // killed
						}
					}
					if strings.HasPrefix(a, "HOLD ") {
						mu.Lock()
						acked = append(acked, id)
						mu.Unlock()
						if acks.Add(1) == int64(killAfter) {
							kill()
						}
					}
				}
			})
		}
		wg.Wait()
		kill() // the burst ended before the target: kill now
		<-d.exited
		mu.Lock()
		got := append([]string(nil), acked...)
		mu.Unlock()
		entries, leftovers := checkBlocklistIntact(t, w.blocklistPath(), append(allAcked, got...))
		t.Logf("run %d: SIGKILL %v into the burst after %d acknowledged blocks; %d acknowledged in all, %d entries on file, %d temporary files left",
			run+1, killAt.Sub(start).Round(time.Millisecond), killAfter, len(got), len(entries), len(leftovers))
		allAcked = append(allAcked, got...)
	}

	// A start on the state the kills left: it answers, and the blocks hold.
	d := startChild(t, cfg, addr, logPath)
	c := test.DialPolicy(t, addr)
	if a := c.Must(rcpt("fresh@customer.test", "alice@good.test")); a != "DUNNO" {
		t.Errorf("after the kills, a new identity is answered %q", a)
	}
	for _, id := range allAcked {
		if a := c.Must(rcpt(id, "alice@good.test")); !strings.HasPrefix(a, "HOLD rcptguard: "+id+" blocked") {
			t.Errorf("after the kills, %s is answered %q", id, a)
		}
	}
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.exited:
	case <-time.After(20 * time.Second):
		t.Fatal("the daemon did not stop within 20s of SIGTERM")
	}
	if code := d.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("the daemon exited with status %d after SIGTERM:\n%s", code, d.output())
	}
}

// TestKill9HoldBeforeWrite: a block whose write is still in progress (the
// file lock is held by someone else, as by a `rcptguard block` running at
// that moment; without it the window is the write and fsync) must not be
// acknowledged to another request of the same identity before it is on
// file: a kill -9 at that moment would lose a block Postfix was told of.
// TestKill9HoldBeforeWrite: while the block's write waits for the file
// lock (held here by another process for a moment), a second connection
// of the same identity is not told HOLD until the entry is on disk, so a
// SIGKILL right after that HOLD cannot lose the block. When the lock stays
// held past the bound (about a second), the block holds from memory and is
// written when possible: that case is TestFaultBlocklistLockHeld.
func TestKill9HoldBeforeWrite(t *testing.T) {
	w := newWorld(t)
	addr := freeAddr(t)
	cfg := w.suiteConfig(t, "crash.toml", map[string]string{
		"policy.listen":    fmt.Sprintf("[%q]", addr),
		"detector.limit":   "1",
		"detector.warn_at": "0",
		"detector.wait":    `"5s"`,
	})
	if err := os.MkdirAll(filepath.Dir(w.blocklistPath()), 0o755); err != nil {
		t.Fatal(err)
	}
	d := startChild(t, cfg, addr, filepath.Join(w.dir, "daemon.log"))
	lock := test.LockBlocklist(t, w.blocklistPath())
	const id = "racer@customer.test"
	a := test.DialPolicy(t, addr)
	if ans := a.Must(rcpt(id, "nobody0@good.test")); ans != "DUNNO" {
		t.Fatalf("first invalid recipient: %q", ans)
	}
	go func() { _, _ = a.Ask(rcpt(id, "nobody1@good.test")) }() // passes the limit; its write waits for the lock
	// Release the lock after 300ms, well within the bound.
	released := make(chan struct{})
	go func() {
		defer close(released)
		time.Sleep(300 * time.Millisecond)
		lock.Release()
	}()
	defer func() { <-released }()
	b := test.DialPolicy(t, addr)
	var ack string
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if ans := b.Must(rcpt(id, "alice@good.test")); strings.HasPrefix(ans, "HOLD ") {
			ack = ans
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if ack == "" {
		t.Fatal("no HOLD for the blocked identity within 5s")
	}
	d.kill(t)
	checkBlocklistIntact(t, w.blocklistPath(), nil)
	data, _ := os.ReadFile(w.blocklistPath())
	if !strings.Contains(string(data), id+"\t") {
		t.Errorf("%s was answered %q, then SIGKILL lost the block: blocklist %q", id, ack, data)
	}
}

// blockReportIdentity returns the identity a block report's subject
// names, and whether it is one recovered at start-up.
func blockReportIdentity(t *testing.T, data []byte) (id string, recovered bool) {
	t.Helper()
	msg, err := mail.ReadMessage(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	s, ok := strings.CutPrefix(msg.Header.Get("Subject"), "[rcptguard] blocked ")
	if !ok {
		return "", false
	}
	if id, ok := strings.CutSuffix(s, " (report recovered at start-up)"); ok {
		return id, true
	}
	id, _, _ = strings.Cut(s, ":")
	return id, false
}

// spooledBlocks counts the block reports waiting in the spool directory
// for identities that start with prefix.
func spooledBlocks(t *testing.T, spool, prefix string) int {
	t.Helper()
	names, _ := filepath.Glob(filepath.Join(spool, "*.msg"))
	n := 0
	for _, name := range names {
		b, err := os.ReadFile(name)
		if err != nil {
			continue
		}
		if head, _, _ := strings.Cut(string(b), "\n"); strings.Contains(head, `"kind":"block"`) && strings.Contains(head, `"identity":"`+prefix) {
			n++
		}
	}
	return n
}

// TestKill9BlocksAndReports: a block and its report are one durable step.
// A burst of 2,000 identities, each blocked at its 2nd invalid recipient,
// is cut by SIGKILL, three times, on the same state, with the report relay
// up; each start reports the blocks a kill left without a report. After
// the last start, every block on file has a report delivered. Reports are
// at least once: a kill while a report is with the relay (between the
// sender's mark before the end of DATA and the removal of its file after
// the 250) makes the next start send it again; the sender has one message
// on the wire at a time, so each kill makes at most one duplicate, and
// each start says so in its log.
func TestKill9BlocksAndReports(t *testing.T) {
	identities := 2000
	if testing.Short() {
		identities = 200
	}
	const workers = 40
	w := newWorld(t)
	relay := test.StartRelay(t, test.RelayConfig{})
	addr := freeAddr(t)
	cfg := w.suiteConfig(t, "crash-reports.toml", map[string]string{
		"policy.listen":    fmt.Sprintf("[%q]", addr),
		"detector.limit":   "1",
		"detector.warn_at": "0",
		"detector.wait":    `"5s"`,
		"callout.timeout":  `"5s"`,
		"notify.to":        `["abuse@isp.test"]`,
		"notify.from":      `"rcptguard@isp.test"`,
		"notify.relay":     strconv.Quote(relay.Addr),
		"notify.starttls":  `"off"`,
		// One MX answers every probe of the burst: no politeness cap.
		"callout.per_domain_rate":      "1000000",
		"callout.per_host_rate":        "1000000",
		"callout.per_domain_rcpt_rate": "1000000",
		"callout.per_host_rcpt_rate":   "1000000",
		"callout.session_rate":         "1000000",
	})
	spool := filepath.Join(w.dir, "state", "spool")
	logPath := filepath.Join(w.dir, "daemon.log")
	type figures struct{ acked, onFile, spooled, delivered, recovered, final, dups int }
	var runs []figures
	// delivered counts the block reports the relay has for identities
	// starting with prefix.
	delivered := func(prefix string) int {
		n := 0
		for _, m := range relay.Messages() {
			if id, _ := blockReportIdentity(t, m.Data); strings.HasPrefix(id, prefix) {
				n++
			}
		}
		return n
	}
	for run, killAfter := range []int{identities / 4, identities / 2, identities * 3 / 4} {
		d := startChild(t, cfg, addr, logPath)
		var (
			acks   atomic.Int64
			killed sync.Once
			wg     sync.WaitGroup
		)
		kill := func() { killed.Do(func() { _ = d.cmd.Process.Signal(syscall.SIGKILL) }) }
		for wi := range workers {
			c := test.DialPolicy(t, addr)
			wg.Go(func() {
				for i := wi; i < identities; i += workers {
					id := fmt.Sprintf("k%d-u%04d@customer.test", run, i)
					var a string
					for k := range 2 {
						var err error
						if a, err = c.Ask(rcpt(id, fmt.Sprintf("nobody-%d-%d-%d@good.test", run, i, k))); err != nil {
							return // killed
						}
					}
					if strings.HasPrefix(a, "HOLD ") && acks.Add(1) == int64(killAfter) {
						kill()
					}
				}
			})
		}
		wg.Wait()
		kill()
		<-d.exited
		entries, _ := checkBlocklistIntact(t, w.blocklistPath(), nil)
		prefix := fmt.Sprintf("k%d-", run)
		f := figures{acked: int(acks.Load()), spooled: spooledBlocks(t, spool, prefix), delivered: delivered(prefix)}
		for _, e := range entries {
			if strings.HasPrefix(e.Identity, prefix) {
				f.onFile++
			}
		}
		runs = append(runs, f)
	}

	// The last start: it reports what the last kill left without a report.
	d := startChild(t, cfg, addr, logPath)
	entries, _ := checkBlocklistIntact(t, w.blocklistPath(), nil)
	allReported := func() bool {
		have := map[string]bool{}
		for _, m := range relay.Messages() {
			id, _ := blockReportIdentity(t, m.Data)
			have[id] = true
		}
		for _, e := range entries {
			if !have[e.Identity] {
				return false
			}
		}
		return true
	}
	// The start sends some 1,500 reports, one SMTP session each, which
	// takes minutes on a loaded machine: wait as long as they keep coming.
	for last, lastAt := len(relay.Messages()), time.Now(); !allReported(); {
		if n := len(relay.Messages()); n != last {
			last, lastAt = n, time.Now()
		}
		if time.Since(lastAt) > 20*time.Second {
			break // stuck: the checks below say what is missing
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(time.Second) // a duplicate would come now
	defer func() {
		if t.Failed() {
			for _, line := range strings.Split(d.output(), "\n") {
				if strings.Contains(line, "sent again") || strings.Contains(line, "will retry") || strings.Contains(line, "level=ERROR") {
					t.Log(line)
				}
			}
		}
	}()
	// Each start says which report it sends again because a kill came
	// while it was with the relay.
	resent := strings.Count(d.output(), "it is sent again")
	kills := len(runs)
	reports := map[string]int{}
	dups := 0
	for _, m := range relay.Messages() {
		id, rec := blockReportIdentity(t, m.Data)
		var run int
		if _, err := fmt.Sscanf(id, "k%d-", &run); err != nil || run >= len(runs) {
			t.Errorf("a message that is not a block report of the burst:\n%s", m.Data)
			continue
		}
		runs[run].final++
		if reports[id]++; reports[id] > 1 {
			dups++
			runs[run].dups++
			if reports[id] > 2 {
				t.Errorf("%s: %d reports, want one, or two after a kill while it was with the relay", id, reports[id])
			}
		}
		if rec {
			runs[run].recovered++
		}
	}
	onFile := map[string]bool{}
	for _, e := range entries {
		onFile[e.Identity] = true
		if reports[e.Identity] == 0 {
			t.Errorf("%s is blocked on file with no report delivered", e.Identity)
		}
	}
	for id := range reports {
		if !onFile[id] {
			t.Logf("%s was reported but its block did not reach the file before the kill", id)
		}
	}
	for i, f := range runs {
		t.Logf("kill -9 run %d: %d blocks answered HOLD, %d on file at the kill, %d reports spooled (%d in the spool + %d delivered) at the kill, %d made at the next start; in the end %d delivered, %d duplicates",
			i+1, f.acked, f.onFile, f.spooled+f.delivered, f.spooled, f.delivered, f.recovered, f.final, f.dups)
	}
	t.Logf("after the last start: %d blocks on file, %d reports delivered for %d identities, %d duplicates, %d reports sent again after %d kills", len(entries), len(relay.Messages()), len(reports), dups, resent, kills)
	if resent > kills {
		t.Errorf("%d reports sent again after %d kills: the sender had more than one on the wire at a kill", resent, kills)
	}
	if dups > resent {
		t.Errorf("%d duplicate reports, %d sent again by a start: a duplicate that is not a kill's", dups, resent)
	}
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	<-d.exited
}

// TestKill9WhileReportWithRelay: the daemon is killed after it sent a
// report's end of DATA and before the relay answered, and the relay never
// took the message. The next start must send it: a report is delivered at
// least once, whatever instant the kill picks.
func TestKill9WhileReportWithRelay(t *testing.T) {
	w := newWorld(t)
	atDot := make(chan struct{})
	killed := make(chan struct{})
	var first atomic.Bool
	first.Store(true)
	relay := test.StartRelay(t, test.RelayConfig{AtDataEnd: func() bool {
		if !first.CompareAndSwap(true, false) {
			return true
		}
		close(atDot)
		<-killed
		return false // the client is gone: the relay never took it
	}})
	addr := freeAddr(t)
	cfg := w.suiteConfig(t, "crash-dot.toml", map[string]string{
		"policy.listen":    fmt.Sprintf("[%q]", addr),
		"detector.limit":   "1",
		"detector.warn_at": "0",
		"notify.to":        `["abuse@isp.test"]`,
		"notify.from":      `"rcptguard@isp.test"`,
		"notify.relay":     strconv.Quote(relay.Addr),
		"notify.starttls":  `"off"`,
	})
	spool := filepath.Join(w.dir, "state", "spool")
	logPath := filepath.Join(w.dir, "daemon.log")
	const id = "dot@customer.test"
	d := startChild(t, cfg, addr, logPath)
	c := test.DialPolicy(t, addr)
	var a string
	for k := range 2 {
		var err error
		if a, err = c.Ask(rcpt(id, fmt.Sprintf("nobody-dot-%d@good.test", k))); err != nil {
			t.Fatal(err)
		}
	}
	if !strings.HasPrefix(a, "HOLD ") {
		t.Fatalf("answer %q after 2 invalid recipients at limit 1, want HOLD", a)
	}
	select {
	case <-atDot:
	case <-time.After(30 * time.Second):
		t.Fatalf("the report's end of DATA did not reach the relay:\n%s", d.output())
	}
	_ = d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.exited
	close(killed)
	if marks, _ := filepath.Glob(filepath.Join(spool, "*.msg.sending")); len(marks) != 1 {
		t.Fatalf("%d marks of a report being sent at the kill, want 1", len(marks))
	}

	d = startChild(t, cfg, addr, logPath)
	relay.WaitMessages(t, 1, 30*time.Second)
	if got, _ := blockReportIdentity(t, relay.Messages()[0].Data); got != id {
		t.Errorf("the relay has a report for %q, want %q", got, id)
	}
	if !strings.Contains(d.output(), "it is sent again") {
		t.Errorf("the start does not say it sends the report again:\n%s", d.output())
	}
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	<-d.exited
	if n := len(relay.Messages()); n != 1 {
		t.Errorf("%d reports delivered, want 1", n)
	}
}
