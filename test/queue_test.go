package test_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/cmd/rcptguard/queue"
	"github.com/rcptguard/rcptguard/test"
)

// queueHoldProcess runs "rcptguard queue-hold" as its own process (the
// test binary re-executed, see TestMain), as the systemd path unit would.
func queueHoldProcess(t *testing.T, configPath string) (string, error) {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "RCPTGUARD_TEST_DAEMON=1", "RCPTGUARD_TEST_ARGS=queue-hold -config "+configPath)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

var queueIDWord = regexp.MustCompile(`^(?:would )?(?:release|released|delete|deleted) ([0-9A-Za-z]+) `)

// idsIn returns the queue IDs of the message lines of a release or purge
// output, sorted.
func idsIn(out string) []string {
	var ids []string
	for _, line := range strings.Split(out, "\n") {
		if m := queueIDWord.FindStringSubmatch(line); m != nil {
			ids = append(ids, m[1])
		}
	}
	sort.Strings(ids)
	return ids
}

// TestRealPostfixQueue proves the held-mail commands and the retroactive
// hold against a real Postfix, whose mail for dest.test is greylisted and
// so waits in the deferred queue:
//
//	swaks ──AUTH──▶ Postfix "submission" ◀──SASL── Dovecot
//	                  └─ dest.test → fake MX answering 451 4.7.1 (deferred)
//
// spammer sends with its own and with honest's envelope sender; forger,
// another customer, sends with spammer's envelope sender; honest sends its
// own mail. Only the messages whose queue file says sasl_username=spammer
// are ever held, released or deleted.
func TestRealPostfixQueue(t *testing.T) {
	requireRealPostfix(t)
	const (
		spammer = "spammer@customer.test"
		honest  = "honest@customer.test"
		forger  = "forger@customer.test"
	)
	s := test.StartDeferringSubmission(t, "dest.test", map[string]string{
		spammer: "spammer-secret", honest: "honest-secret", forger: "forger-secret",
	}, nil)

	spam := []string{
		s.Send(t, spammer, spammer, "spam one", "a@dest.test", "b@dest.test"),
		s.Send(t, spammer, honest, "spam two \x1b[31mred\x1b[0m", "c@dest.test"),
		s.Send(t, spammer, "", "spam three", "d@dest.test", "e@dest.test", "f@dest.test"),
	}
	others := []string{
		s.Send(t, honest, honest, "honest mail", "g@dest.test"),
		s.Send(t, forger, spammer, "forged sender", "h@dest.test"),
	}
	s.WaitDeferred(t, append(slices.Clone(spam), others...)...)
	sort.Strings(spam)

	if dir, err := queue.Directory(context.Background(), s.ConfigDir); err != nil || dir != s.QueueDir {
		t.Errorf("queue.Directory = %q, %v; want %q", dir, err, s.QueueDir)
	}

	state := test.SharedTempDir(t)
	requests := filepath.Join(state, "hold-requests")
	if err := os.Mkdir(requests, 0o755); err != nil {
		t.Fatal(err)
	}
	configPath := filepath.Join(state, "rcptguard.toml")
	config := fmt.Sprintf(`
[detector]
period = "1h"

[blocklist]
path = %q

[queue]
postfix_config = %q
requests = %q
`, filepath.Join(state, "blocklist"), s.ConfigDir, requests)
	if err := os.WriteFile(configPath, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	req := queue.Requester{Dir: requests}
	queues := func() map[string]string { return s.QueueNames(t) }
	assertQueues := func(t *testing.T, ids []string, want string) {
		t.Helper()
		in := queues()
		for _, id := range ids {
			if in[id] != want {
				t.Errorf("message %s is in queue %q, want %q", id, in[id], want)
			}
		}
	}

	// A request for an identity that is not blocked is refused: nothing
	// moves, and the command fails.
	t.Run("request for a non-blocked identity is refused", func(t *testing.T) {
		for _, id := range []string{honest, spammer} {
			if err := req.Request(id); err != nil {
				t.Fatal(err)
			}
		}
		out, err := queueHoldProcess(t, configPath)
		if err == nil || !strings.Contains(out, "not in the blocklist") {
			t.Fatalf("queue-hold accepted requests for identities not blocked: %v\n%s", err, out)
		}
		assertQueues(t, append(slices.Clone(spam), others...), "deferred")
		if left, _ := os.ReadDir(requests); len(left) != 0 {
			t.Errorf("refused requests left in the directory: %v", left)
		}
	})

	// block + request → queue-hold: exactly spammer's messages are held.
	holdSpammer := func(t *testing.T) time.Duration {
		t.Helper()
		runCLI(t, "block", "-config", configPath, spammer)
		start := time.Now()
		if err := req.Request(spammer); err != nil {
			t.Fatal(err)
		}
		out, err := queueHoldProcess(t, configPath)
		if err != nil {
			t.Fatalf("queue-hold: %v\n%s", err, out)
		}
		took := time.Since(start)
		if !strings.Contains(out, fmt.Sprintf("held %d messages of %s", len(spam), spammer)) {
			t.Errorf("queue-hold output does not say it held %d messages:\n%s", len(spam), out)
		}
		for _, id := range spam {
			if !strings.Contains(out, "queue_id="+id) {
				t.Errorf("queue-hold did not log held message %s:\n%s", id, out)
			}
		}
		assertQueues(t, spam, "hold")
		assertQueues(t, others, "deferred")
		return took
	}
	t.Run("retroactive hold by sasl_username", func(t *testing.T) {
		took := holdSpammer(t)
		t.Logf("retroactive hold: %d messages held, %s from request to held (one queue-hold process, %d messages in the queue)", len(spam), took.Round(time.Millisecond), len(spam)+len(others))
		if took > 10*time.Second {
			t.Errorf("request to hold took %s, want seconds", took)
		}
	})

	t.Run("operations stay in their queues", func(t *testing.T) {
		q, err := queue.New(queue.Config{PostfixConfig: s.ConfigDir})
		if err != nil {
			t.Fatal(err)
		}
		// Delete limited to the hold queue does not touch deferred mail,
		// and release does not touch mail that is not held.
		if err := q.Apply(context.Background(), queue.OpDelete, others, "hold"); err != nil {
			t.Fatal(err)
		}
		if err := q.Apply(context.Background(), queue.OpRelease, others, "hold"); err != nil {
			t.Fatal(err)
		}
		assertQueues(t, others, "deferred")
		assertQueues(t, spam, "hold")
		// An ID that could be an option never reaches postsuper.
		if err := q.Apply(context.Background(), queue.OpDelete, []string{spam[0], "-s"}, "hold"); err == nil {
			t.Fatal("Apply accepted the queue ID \"-s\"")
		}
		assertQueues(t, spam, "hold")
	})

	t.Run("held lists the identity's held mail", func(t *testing.T) {
		out := runCLI(t, "held", "-config", configPath, spammer)
		for _, id := range spam {
			if !strings.Contains(out, id) {
				t.Errorf("held does not list %s:\n%s", id, out)
			}
		}
		if strings.Contains(out, "\x1b") || !strings.Contains(out, "spam two ?[31mred?[0m") {
			t.Errorf("held printed the subject unsafely:\n%q", out)
		}
		all := runCLI(t, "held", "-config", configPath)
		if n := strings.Count(all, spammer); n != len(spam) {
			t.Errorf("held without identity lists %d of spammer's messages, want %d:\n%s", n, len(spam), all)
		}
		if out := runCLI(t, "held", "-config", configPath, forger); !strings.Contains(out, "no held mail") {
			t.Errorf("held lists mail of forger, whose mail is not held:\n%s", out)
		}
	})

	t.Run("release does what -n said", func(t *testing.T) {
		dry := runCLI(t, "release", "-config", configPath, "-n", spammer)
		if !strings.Contains(dry, "would unblock "+spammer) || !slices.Equal(idsIn(dry), spam) {
			t.Fatalf("release -n says:\n%s\nwant unblock and release of %v", dry, spam)
		}
		assertQueues(t, spam, "hold") // -n changed nothing
		out := runCLI(t, "release", "-config", configPath, spammer)
		if !strings.Contains(out, "unblocked "+spammer) || !slices.Equal(idsIn(out), idsIn(dry)) {
			t.Fatalf("release did:\n%s\n-n said:\n%s", out, dry)
		}
		in := queues()
		for _, id := range spam {
			if in[id] == "hold" || in[id] == "" {
				t.Errorf("released message %s is in queue %q", id, in[id])
			}
		}
		assertQueues(t, others, "deferred")
		if list := runCLI(t, "list", "-config", configPath); strings.Contains(list, spammer) {
			t.Errorf("spammer still blocked after release:\n%s", list)
		}
	})

	t.Run("purge does what -n said", func(t *testing.T) {
		// The released messages went back to the queue: hold them again.
		holdSpammer(t)
		dry := runCLI(t, "purge", "-config", configPath, "-n", spammer)
		if !strings.Contains(dry, "would keep "+spammer+" blocked") || !slices.Equal(idsIn(dry), spam) {
			t.Fatalf("purge -n says:\n%s\nwant delete of %v, block kept", dry, spam)
		}
		assertQueues(t, spam, "hold")
		out := runCLI(t, "purge", "-config", configPath, spammer)
		if !strings.Contains(out, "kept "+spammer+" blocked") || !slices.Equal(idsIn(out), idsIn(dry)) {
			t.Fatalf("purge did:\n%s\n-n said:\n%s", out, dry)
		}
		in := queues()
		for _, id := range spam {
			if q, ok := in[id]; ok {
				t.Errorf("purged message %s is still in queue %q", id, q)
			}
		}
		assertQueues(t, others, "deferred")
		if list := runCLI(t, "list", "-config", configPath); !strings.Contains(list, spammer) {
			t.Errorf("purge lifted the block, want it kept:\n%s", list)
		}
	})
}

// TestRealPostfixBlockHoldsQueuedMail runs the whole chain: rcptguard
// (in process) behind the submission Postfix blocks a spammer at the
// limit, asks for a retroactive hold, and "rcptguard queue-hold" (started
// here as the systemd path unit would) holds the spammer's message that
// was already waiting in the deferred queue; later messages are held at
// RCPT until detector.hold_max, then rejected.
//
//	swaks ──AUTH──▶ Postfix "submission" ──policy──▶ rcptguard ──callouts──▶ fake MX (550 5.1.1 for unknown users)
//	                  └─ dest.test → greylisting fake MX (451: deferred)
func TestRealPostfixBlockHoldsQueuedMail(t *testing.T) {
	requireRealPostfix(t)
	const (
		spammer = "spammer@customer.test"
		honest  = "honest@customer.test"
	)
	calloutMX := test.StartMX(t, test.MXConfig{Mailboxes: []string{"good@dest.test"}})
	_, calloutPort, _ := strings.Cut(calloutMX.Addr, ":")
	dns := test.StartDNS(t, `
dest.test. 300 IN MX 10 mx.dest.test.
mx.dest.test. 300 IN A 127.0.0.1
`)
	policyAddr := fmt.Sprintf("127.0.0.1:%d", test.FreePort(t))
	s := test.StartDeferringSubmission(t, "dest.test", map[string]string{spammer: "spammer-secret", honest: "honest-secret"}, map[string]string{
		"smtpd_recipient_restrictions": "check_policy_service { inet:" + policyAddr + ", timeout=10s, default_action=DUNNO }, " +
			"permit_sasl_authenticated, reject_unauth_destination",
	})

	relay := test.StartRelay(t, test.RelayConfig{})
	state := test.SharedTempDir(t)
	requests := filepath.Join(state, "hold-requests")
	configPath := filepath.Join(state, "rcptguard.toml")
	config := fmt.Sprintf(`
[policy]
listen = [%q]

[detector]
limit = 2
period = "1h"
wait = "5s"
hold_max = 2

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
`, policyAddr, dns.Addr, calloutPort, filepath.Join(state, "blocklist"), filepath.Join(state, "spool"), relay.Addr, s.ConfigDir, requests)
	if err := os.WriteFile(configPath, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, configPath)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("rcptguard log:\n%s", d.logs)
		}
	})

	honestID := s.Send(t, honest, honest, "honest mail", "good@dest.test")
	// Two unknown recipients: counted, not past the limit; the message is
	// accepted and waits in the deferred queue.
	early := s.Send(t, spammer, honest, "spam before the block", "bad1@dest.test", "bad2@dest.test", "good@dest.test")
	s.WaitDeferred(t, honestID, early)

	// The path unit: start queue-hold whenever the directory is not empty.
	type run struct {
		requested, done time.Time
		out             string
		err             error
	}
	runs := make(chan run, 4)
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for ctx.Err() == nil {
			entries, _ := os.ReadDir(requests)
			if len(entries) > 0 {
				fi, _ := entries[0].Info()
				var requested time.Time
				if fi != nil {
					requested = fi.ModTime()
				}
				out, err := queueHoldProcess(t, configPath)
				runs <- run{requested: requested, done: time.Now(), out: out, err: err}
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	t.Cleanup(func() { cancel(); <-stopped })

	// The third unknown recipient passes the limit: blocked, this message
	// is held at RCPT, and the daemon asks for the retroactive hold.
	atBlock := s.Send(t, spammer, spammer, "spam that blocks", "bad3@dest.test")
	var r run
	select {
	case r = <-runs:
	case <-time.After(30 * time.Second):
		t.Fatalf("no hold request within 30s of the block; requests directory %s", requests)
	}
	if r.err != nil {
		t.Fatalf("queue-hold: %v\n%s", r.err, r.out)
	}
	in := s.QueueNames(t)
	if in[early] != "hold" || in[atBlock] != "hold" {
		t.Fatalf("after the block: early message in %q, blocking message in %q, want both in hold\nqueue-hold:\n%s", in[early], in[atBlock], r.out)
	}
	if in[honestID] != "deferred" {
		t.Errorf("honest's message is in %q, want deferred", in[honestID])
	}
	if !strings.Contains(r.out, "held retroactively") || !strings.Contains(r.out, "queue_id="+early) {
		t.Errorf("queue-hold did not log the retroactive hold of %s:\n%s", early, r.out)
	}
	t.Logf("retroactive hold: 1 deferred message held, %s from the daemon's request to held",
		r.done.Sub(r.requested).Round(time.Millisecond))

	// The abuse desk hears of it: the block report announces the
	// follow-up, and the follow-up, which the daemon sends from
	// queue-hold's result, lists the message held retroactively.
	var blockReport, heldReport *test.RelayMessage
	deadline := time.Now().Add(30 * time.Second)
	for (blockReport == nil || heldReport == nil) && time.Now().Before(deadline) {
		for _, m := range relay.Messages() {
			switch text := decodedReport(t, m.Data); {
			case strings.Contains(text, "X-Rcptguard-Kind: block"):
				blockReport = &m
			case strings.Contains(text, "X-Rcptguard-Kind: held"):
				if heldReport != nil {
					t.Fatalf("two held reports for one block:\n%s", text)
				}
				heldReport = &m
			}
		}
		if heldReport == nil {
			time.Sleep(50 * time.Millisecond)
		}
	}
	if blockReport == nil || heldReport == nil {
		t.Fatalf("reports at the relay: block %v, held %v, want both", blockReport != nil, heldReport != nil)
	}
	t.Logf("held report at the relay %s after the request", time.Since(r.requested).Round(time.Millisecond))
	if text := decodedReport(t, blockReport.Data); !strings.Contains(text, `"retroactive_hold": true`) {
		t.Errorf("the block report does not announce the follow-up:\n%s", text)
	}
	held := decodedReport(t, heldReport.Data)
	for _, want := range []string{"Subject: [rcptguard] held 1 message already queued of " + spammer,
		"- " + early + ", arrived ", "rcptguard purge -n '" + spammer + "'", `"queue_id": "` + early + `"`} {
		if !strings.Contains(held, want) {
			t.Errorf("held report lacks %q:\n%s", want, held)
		}
	}
	if strings.Contains(held, honestID) || strings.Contains(held, atBlock) {
		t.Errorf("held report lists a message not held retroactively (honest %s, held at RCPT %s):\n%s", honestID, atBlock, held)
	}

	// hold_max = 2: the blocking message was the first held at RCPT, this
	// one the second; the next is refused.
	second := s.Send(t, spammer, spammer, "second held", "good@dest.test")
	if q := s.QueueNames(t)[second]; q != "hold" {
		t.Errorf("second message after the block is in %q, want hold", q)
	}
	res, err := test.Swaks(t, test.SwaksMail{Server: s.Addr, User: spammer, Password: "spammer-secret",
		From: spammer, To: []string{"good@dest.test"}, Subject: "past hold_max", Body: "x"})
	if err == nil || !strings.Contains(res.Transcript, "account suspended") {
		t.Errorf("message past hold_max was not rejected with the guard's text: %v\n%s", err, res.Transcript)
	}
	if !strings.Contains(d.logs.String(), "hold queue guard") {
		t.Errorf("no guard log line:\n%s", d.logs)
	}
}

// decodedReport returns a report as received with its quoted-printable
// soft line breaks and line ends undone, for searching.
func decodedReport(t *testing.T, data []byte) string {
	t.Helper()
	s := strings.ReplaceAll(string(data), "=\r\n", "")
	s = strings.ReplaceAll(s, "=3D", "=")
	return strings.ReplaceAll(s, "\r\n", "\n")
}
