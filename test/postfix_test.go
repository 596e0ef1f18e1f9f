package test_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/cmd/rcptguard/app"
	"github.com/rcptguard/rcptguard/test"
)

// requireRealPostfix skips the test, or fails it when RCPTGUARD_E2E=1 is
// set (as CI does), unless the programs it runs are installed and it runs
// as root.
func requireRealPostfix(t *testing.T) {
	t.Helper()
	e2e := os.Getenv("RCPTGUARD_E2E") == "1"
	stop := func(msg string) {
		t.Helper()
		if e2e {
			t.Fatal(msg + "\n(RCPTGUARD_E2E=1 is set, so this is a failure)")
		}
		t.Skip(msg + "\n(set RCPTGUARD_E2E=1 to make this a failure)")
	}
	if missing := test.MissingPrograms(test.RealPostfixPrograms...); len(missing) > 0 {
		stop(fmt.Sprintf("the real-Postfix test needs %s, missing here; install them as root with\n  %s",
			strings.Join(missing, ", "), test.RealPostfixInstall))
	}
	if os.Geteuid() != 0 {
		stop("the real-Postfix test must run as root: Postfix's master starts as root (run `sudo go test -run TestRealPostfix ./test/`)")
	}
}

// TestRealPostfix runs rcptguard behind a real Postfix, end to end, on
// loopback:
//
//	swaks ──AUTH PLAIN──▶ Postfix "submission" (127.0.0.1:S) ◀──SASL── Dovecot (passwd-file)
//	                         │ check_sasl_access texthash:BLOCKLIST,
//	                         │ check_policy_service rcptguard, permit_sasl_authenticated
//	                         ▼ transport_maps: dest.test → [127.0.0.1]:P
//	                      Postfix "mx" (127.0.0.1:P): alice, bob, carol, abuse @dest.test
//	                         ▲
//	rcptguard (in process) ──┘ callouts to mx.dest.test:P, found through the in-process DNS
//	          └──report, AUTH as rcptguard@customer.test──▶ submission ──▶ abuse@dest.test
//
// An honest user with a typo is not held; a user who mails more unknown
// addresses than the limit is held, listed in the blocklist and reported;
// Postfix enforces the blocklist alone while rcptguard is down; after
// "rcptguard unblock" the user's mail flows again, and held mail can be
// released.
func TestRealPostfix(t *testing.T) {
	requireRealPostfix(t)
	began := time.Now()

	const (
		honest   = "honest@customer.test"
		spammer  = "spammer@customer.test"
		stolen   = "stolen@customer.test"
		reporter = "rcptguard@customer.test"
		abuse    = "abuse@dest.test"
		limit    = 3
	)
	passwords := map[string]string{
		honest:   "honest-secret",
		spammer:  "spammer-secret",
		stolen:   "stolen-secret",
		reporter: "rcptguard-secret",
	}

	// The recipients' MX: a Postfix that knows four mailboxes and refuses
	// every other address of dest.test at RCPT with 550 5.1.1.
	mx := test.StartPostfix(t, test.PostfixConfig{
		Name:      "mx",
		Mailboxes: []string{"alice@dest.test", "bob@dest.test", "carol@dest.test", abuse},
		Main:      map[string]string{"myhostname": "mx.dest.test"},
	})
	// rcptguard finds it through DNS; it probes one port for every MX,
	// callout.port, which is the mx instance's smtpd port.
	dns := test.StartDNS(t, `
dest.test. 300 IN MX 10 mx.dest.test.
mx.dest.test. 300 IN A 127.0.0.1
`)

	// rcptguard's state starts empty, as on a fresh machine: rcptguard
	// itself must make the blocklist Postfix reads (Postfix refuses the
	// whole restriction list, 451 4.3.5, for a texthash: table that does
	// not exist).
	state := filepath.Join(test.SharedTempDir(t), "state")
	if err := os.Mkdir(state, 0o755); err != nil {
		t.Fatal(err)
	}
	blocklist := filepath.Join(state, "blocklist")
	blocklistTable := "texthash:" + blocklist

	// The submission server, configured with contrib/postfix/main.cf
	// word for word (the README's snippet) but for the blocklist's
	// directory: the blocklist (Postfix's own safety net), then rcptguard
	// on unix:rcptguard/policy.sock, a socket in the queue directory,
	// both before permit_sasl_authenticated; smtpd is chrooted there, as
	// on Debian. Mail for dest.test goes to the mx instance without DNS.
	main := test.ParseMainCF(readRepoFile(t, "contrib/postfix/main.cf"))
	if !strings.Contains(main["rcptguard_restrictions"], "texthash:/var/lib/rcptguard/blocklist") ||
		!strings.Contains(main["rcptguard_restrictions"], "unix:rcptguard/policy.sock") {
		t.Fatalf("contrib/postfix/main.cf: rcptguard_restrictions = %q, want the blocklist and the socket", main["rcptguard_restrictions"])
	}
	main["rcptguard_restrictions"] = strings.ReplaceAll(main["rcptguard_restrictions"], "/var/lib/rcptguard/blocklist", blocklist)
	for k, v := range map[string]string{
		"myhostname":                  "submission.customer.test",
		"transport_maps":              fmt.Sprintf("inline:{ dest.test=smtp:[127.0.0.1]:%d }", mx.Port),
		"smtpd_sasl_auth_enable":      "yes",
		"smtpd_sasl_type":             "dovecot",
		"smtpd_sasl_path":             "private/auth",
		"smtpd_sasl_security_options": "noanonymous",
		"smtpd_tls_auth_only":         "no",
	} {
		main[k] = v
	}
	sub := test.StartPostfix(t, test.PostfixConfig{Name: "submission", Main: main, Chroot: true})
	// rcptguard's socket, as contrib/rcptguard.toml has it, in this
	// instance's queue directory: rcptguard makes the directory (0750,
	// group postfix) and the socket (0660, group postfix).
	policyAddr := "unix:" + filepath.Join(sub.QueueDir, "rcptguard", "policy.sock")
	test.StartDovecotAuth(t, test.DovecotConfig{
		Users:      passwords,
		AuthSocket: filepath.Join(sub.QueueDir, "private", "auth"),
	})

	passwordFile := filepath.Join(state, "notify-password")
	if err := os.WriteFile(passwordFile, []byte(passwords[reporter]+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	configPath := filepath.Join(state, "rcptguard.toml")
	config := fmt.Sprintf(`
[policy]
listen = [%q]
socket_mode = "0660"
socket_group = "postfix"

[detector]
limit = %d
period = "1h"
wait = "5s"

[callout]
resolver = %q
port = %d
timeout = "5s"
helo = "rcptguard.test"
allow_private = true

[blocklist]
path = %q

[notify]
to = [%q]
from = %q
relay = %q
username = %q
password_file = %q
starttls = "off"
spool = %q

[queue]
requests = %q
`, policyAddr, limit, dns.Addr, mx.Port, blocklist, abuse, reporter, sub.Addr, reporter, passwordFile, filepath.Join(state, "spool"), filepath.Join(state, "hold-requests"))
	if err := os.WriteFile(configPath, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}

	// startRcptguard runs "rcptguard serve" in process on policyAddr and
	// logs its output when the test fails.
	startRcptguard := func() *daemon {
		t.Helper()
		d := startDaemon(t, configPath)
		if d.addr != policyAddr {
			t.Fatalf("rcptguard listens on %s, want %s", d.addr, policyAddr)
		}
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("rcptguard log:\n%s", d.logs)
			}
		})
		return d
	}
	d := startRcptguard()
	t.Logf("set up in %s: mx %s, submission %s, rcptguard %s, DNS %s", time.Since(began).Round(time.Millisecond), mx.Addr, sub.Addr, d.addr, dns.Addr)

	// send mails one message as user, which must be accepted.
	send := func(t *testing.T, user, subject string, to ...string) string {
		t.Helper()
		r, err := test.Swaks(t, test.SwaksMail{
			Server: sub.Addr, User: user, Password: passwords[user],
			From: user, To: to, Subject: subject, Body: "rcptguard real-Postfix test: " + subject,
		})
		if err != nil {
			t.Fatalf("swaks as %s: %v", user, err)
		}
		if r.QueueID == "" {
			t.Fatalf("swaks as %s: no queue ID in the transcript:\n%s", user, r.Transcript)
		}
		return r.QueueID
	}
	heldIDs := func(t *testing.T, sender string) []string {
		t.Helper()
		var ids []string
		for _, e := range sub.Held(t, sender) {
			ids = append(ids, e.QueueID)
		}
		return ids
	}
	inBlocklist := func(t *testing.T, id string) bool {
		t.Helper()
		b, err := os.ReadFile(blocklist)
		if err != nil {
			t.Fatal(err)
		}
		for line := range strings.SplitSeq(string(b), "\n") {
			if first, _, _ := strings.Cut(line, "\t"); strings.EqualFold(first, id) {
				return true
			}
		}
		return false
	}

	if !t.Run("fresh install: the blocklist exists, the socket is Postfix's", func(t *testing.T) {
		b, err := os.ReadFile(blocklist)
		if err != nil {
			t.Fatalf("rcptguard serve did not create the blocklist: %v", err)
		}
		if fi, _ := os.Stat(blocklist); fi.Mode().Perm() != 0o644 || !strings.HasPrefix(string(b), "# rcptguard blocklist") {
			t.Errorf("blocklist mode %v, content %q", fi.Mode().Perm(), b)
		}
		sock := strings.TrimPrefix(policyAddr, "unix:")
		for _, p := range []string{filepath.Dir(sock), sock} {
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: %v group %d", p, fi.Mode(), fi.Sys().(*syscall.Stat_t).Gid)
		}
	}) {
		t.FailNow()
	}

	// rcptguard doctor, as a postmaster runs it after the install, finds
	// nothing wrong, and asks rcptguard through the socket as user
	// postfix. Its output is logged.
	t.Run("doctor finds nothing wrong", func(t *testing.T) {
		var stdout, stderr strings.Builder
		err := app.Run(context.Background(), []string{"doctor", "-config", configPath, "-postfix-config", sub.ConfigDir, "-rcptguard", sharedTestBinary(t)}, &stdout, &stderr)
		t.Logf("rcptguard doctor:\n%s%s", stdout.String(), stderr.String())
		if err != nil {
			t.Errorf("doctor: %v", err)
		}
		if !strings.Contains(stdout.String(), "answers user postfix: action=DUNNO") {
			t.Error("doctor did not ask rcptguard as user postfix")
		}
	})

	if !t.Run("honest user's first mail is delivered", func(t *testing.T) {
		send(t, honest, "first mail", "alice@dest.test")
		mx.WaitMessage(t, "alice@dest.test", "first mail", 20*time.Second)
		for _, bad := range []string{"is unavailable", "Server configuration error", "4.3.5"} {
			if strings.Contains(sub.Log(), bad) {
				t.Errorf("the submission maillog has %q:\n%s", bad, sub.LogTail(20))
			}
		}
		// Postfix reached rcptguard through the socket, as user postfix.
		if !logHas(d.logs.String(), "msg=decision", "identity=honest@customer.test", "recipient=alice@dest.test", "verdict=valid") {
			t.Errorf("no decision for the first mail in rcptguard's log")
		}
	}) {
		t.FailNow()
	}

	if !t.Run("honest user with a typo is not held", func(t *testing.T) {
		id := send(t, honest, "honest 1", "alice@dest.test", "bob@dest.test", "alcie@dest.test")
		mx.WaitMessage(t, "alice@dest.test", "honest 1", 20*time.Second)
		mx.WaitMessage(t, "bob@dest.test", "honest 1", 20*time.Second)
		if held := heldIDs(t, honest); len(held) > 0 {
			t.Fatalf("honest user's mail held: %v (message %s)", held, id)
		}
		// rcptguard was asked for every recipient (the policy check sits
		// before permit_sasl_authenticated) and found the typo, which
		// counts but stays under the limit.
		if !logHas(d.logs.String(), "msg=decision", "identity=honest@customer.test", "recipient=alcie@dest.test", "verdict=invalid") {
			t.Errorf("no invalid-verdict decision for the typo alcie@dest.test in rcptguard's log")
		}
		if inBlocklist(t, honest) {
			t.Error("honest user in the blocklist")
		}
		if v, ok := sub.Postmap(t, honest, blocklistTable); ok {
			t.Errorf("postmap -q %s %s = %q, want not found", honest, blocklistTable, v)
		}
	}) {
		t.FailNow()
	}

	var spamIDs []string
	if !t.Run("abuser is held after the limit", func(t *testing.T) {
		// One unknown recipient a message: the first `limit` are under
		// the limit and go out; the next passes it and is held, and
		// every message after that too.
		for i := range limit + 2 {
			spamIDs = append(spamIDs, send(t, spammer, fmt.Sprintf("spam %d", i), fmt.Sprintf("harvested%d@dest.test", i)))
		}
		held := heldIDs(t, spammer)
		t.Logf("spammer's messages %v; held: %v", spamIDs, held)
		for i, id := range spamIDs {
			if want := i >= limit; slices.Contains(held, id) != want {
				t.Errorf("message %d (%s, to harvested%d@dest.test): held %v, want %v", i+1, id, i, !want, want)
			}
		}
		for _, e := range sub.Held(t, spammer) {
			if e.QueueName != "hold" || len(e.Recipients) != 1 || !strings.HasPrefix(e.Recipients[0].Address, "harvested") {
				t.Errorf("held entry %+v", e)
			}
		}
		if !inBlocklist(t, spammer) {
			b, _ := os.ReadFile(blocklist)
			t.Errorf("spammer not in the blocklist file:\n%s", b)
		}
		// The file is a Postfix access table: Postfix's own lookup says HOLD.
		if v, ok := sub.Postmap(t, spammer, blocklistTable); !ok || !strings.HasPrefix(v, "HOLD ") {
			t.Errorf("postmap -q %s %s = %q, %v; want HOLD ...", spammer, blocklistTable, v, ok)
		}
		if !strings.Contains(sub.Log(), "hold: RCPT from") {
			t.Error("no \"hold: RCPT from\" line in the submission maillog")
		}
	}) {
		t.FailNow()
	}

	// The report is sent by rcptguard's [notify] mailer through the
	// submission Postfix, authenticated as rcptguard@customer.test, and
	// lands in abuse@dest.test's Maildir at the mx instance. A failure
	// here does not stop the other checks.
	t.Run("abuse report reaches the abuse desk", func(t *testing.T) {
		const subject = "[rcptguard] blocked spammer@customer.test"
		deadline := time.Now().Add(30 * time.Second)
		for !mx.HasMessage(t, abuse, subject) {
			if time.Now().After(deadline) {
				note := ""
				if strings.Contains(d.logs.String(), "msg=\"rcptguard report\"") {
					note = "\nrcptguard logged the report instead of mailing it: the [notify] mailer is not wired into `rcptguard serve` yet"
				}
				t.Fatalf("no message with subject %q in %s's mailbox after 30s%s", subject, abuse, note)
			}
			time.Sleep(100 * time.Millisecond)
		}
		m := mx.WaitMessage(t, abuse, subject, time.Second)
		t.Logf("report: %q from %q", m.Subject, m.Header.Get("From"))
		if !strings.Contains(m.Header.Get("From"), reporter) {
			t.Errorf("report From: %q, want %s", m.Header.Get("From"), reporter)
		}
		for _, want := range []string{spammer, "harvested"} {
			if !strings.Contains(m.Body, want) {
				t.Errorf("report body lacks %q:\n%s", want, m.Body)
			}
		}
		if !strings.Contains(sub.Log(), "sasl_username="+reporter) {
			t.Errorf("the submission Postfix has no mail authenticated as %s in its log", reporter)
		}
	})

	// With rcptguard stopped, Postfix's policy client gets no answer and
	// falls back to default_action=DUNNO; only check_sasl_access can hold.
	d.stop()
	if !t.Run("postfix enforces the blocklist while rcptguard is down", func(t *testing.T) {
		runCLI(t, "block", "-config", configPath, "-reason", "compromised, ticket 42", stolen)
		if v, ok := sub.Postmap(t, stolen, blocklistTable); !ok || !strings.HasPrefix(v, "HOLD") {
			t.Fatalf("postmap -q %s = %q, %v; want HOLD ...", stolen, v, ok)
		}
		// texthash: tables are read when an smtpd process starts.
		sub.Reload(t)
		id := send(t, stolen, "stolen 1", "alice@dest.test")
		if held := heldIDs(t, stolen); !slices.Contains(held, id) {
			t.Errorf("blocked user's message %s not held; held: %v", id, held)
		}
		// Others' mail flows: the policy service being down stops nothing.
		send(t, honest, "honest while rcptguard is down", "carol@dest.test")
		mx.WaitMessage(t, "carol@dest.test", "honest while rcptguard is down", 20*time.Second)
		if held := heldIDs(t, honest); len(held) > 0 {
			t.Errorf("honest user's mail held while rcptguard is down: %v", held)
		}
		if !strings.Contains(sub.Log(), "connect to rcptguard/policy.sock: ") {
			t.Errorf("the submission Postfix did not find rcptguard down at %s", policyAddr)
		}
	}) {
		t.FailNow()
	}
	d = startRcptguard()

	t.Run("unblocked user's mail flows again", func(t *testing.T) {
		runCLI(t, "unblock", "-config", configPath, spammer)
		if v, ok := sub.Postmap(t, spammer, blocklistTable); ok {
			t.Fatalf("postmap -q %s = %q after unblock", spammer, v)
		}
		// The daemon sees the changed file within 2 seconds.
		c := test.DialPolicy(t, d.addr)
		start := time.Now()
		test.Eventually(t, 5*time.Second, "rcptguard to answer DUNNO for the unblocked user", func() bool {
			return c.Must(test.RcptRequest(spammer, spammer, "carol@dest.test", "")) == "DUNNO"
		})
		t.Logf("rcptguard saw the unblock after %s", time.Since(start).Round(time.Millisecond))
		// Postfix reads the texthash: blocklist when an smtpd process
		// starts: a reload makes new ones (see the README).
		sub.Reload(t)
		id := send(t, spammer, "after unblock", "carol@dest.test")
		if held := heldIDs(t, spammer); slices.Contains(held, id) {
			t.Fatalf("message %s held after unblock", id)
		}
		mx.WaitMessage(t, "carol@dest.test", "after unblock", 20*time.Second)
	})

	t.Run("held mail is released", func(t *testing.T) {
		held := heldIDs(t, spammer)
		if len(held) == 0 {
			t.Fatal("no held message to release")
		}
		sub.Release(t, held...)
		test.Eventually(t, 10*time.Second, fmt.Sprintf("messages %v to leave the hold queue", held), func() bool {
			for _, id := range heldIDs(t, spammer) {
				if slices.Contains(held, id) {
					return false
				}
			}
			return true
		})
	})
	t.Logf("real-Postfix test took %s", time.Since(began).Round(time.Millisecond))
}

// logHas reports whether one line of log holds every one of parts.
func logHas(log string, parts ...string) bool {
	for line := range strings.SplitSeq(log, "\n") {
		all := true
		for _, p := range parts {
			if !strings.Contains(line, p) {
				all = false
				break
			}
		}
		if all {
			return true
		}
	}
	return false
}
