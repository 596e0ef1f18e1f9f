package test_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net/mail"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	gosmtp "github.com/emersion/go-smtp"

	"github.com/rcptguard/rcptguard/cmd/rcptguard/queue"
	"github.com/rcptguard/rcptguard/notify"
	"github.com/rcptguard/rcptguard/test"
)

// TestReportCommandsOnRealQueue runs, word for word, the commands a block
// report prints against a real Postfix queue: the held mail of an
// identity that starts with '-' (a SASL name may) is listed, released
// and deleted by rcptguard held, release and purge, each -n first, and
// nothing else in the queue is touched, not even mail another customer
// sent with the abuser's address as envelope sender. Queue IDs that are
// not Postfix queue IDs ("-dALL", which once made a printed
// `postsuper -H -- -dALL` delete the whole queue) are not printed at all.
func TestReportCommandsOnRealQueue(t *testing.T) {
	requireRealPostfix(t)
	if missing := test.MissingPrograms("sh"); len(missing) > 0 {
		if os.Getenv("RCPTGUARD_E2E") == "1" {
			t.Fatalf("missing %v (RCPTGUARD_E2E=1 is set)", missing)
		}
		t.Skipf("missing %v", missing)
	}
	const (
		abuser = "-x@customer.test"
		other  = "other@customer.test"
	)
	// allow_min_user lets an envelope sender start with '-' (Postfix
	// refuses it by default, but a site may allow it).
	s := test.StartDeferringSubmission(t, "dest.test", map[string]string{abuser: "abuser-secret", other: "other-secret"},
		map[string]string{"allow_min_user": "yes"})
	var abusers, others []string
	for i := range 3 {
		// Not swaks: it takes a user name starting with '-' for an option.
		abusers = append(abusers, submitAs(t, s.Addr, abuser, "abuser-secret", "x@customer.test", fmt.Sprintf("r%d@dest.test", i)))
	}
	others = append(others, submitAs(t, s.Addr, other, "other-secret", abuser, "f@dest.test"), submitAs(t, s.Addr, other, "other-secret", other, "o@dest.test"))
	s.WaitDeferred(t, append(slices.Clone(abusers), others...)...)

	state := test.SharedTempDir(t)
	requests := filepath.Join(state, "hold-requests")
	if err := os.Mkdir(requests, 0o755); err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(state, "rcptguard.toml")
	cfg := fmt.Sprintf("[detector]\nperiod = \"1h\"\n[blocklist]\npath = %q\n[queue]\npostfix_config = %q\nrequests = %q\n",
		filepath.Join(state, "blocklist"), s.ConfigDir, requests)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	// The block and the retroactive hold, as the daemon and the path
	// unit do them.
	hold := func() {
		t.Helper()
		runCLI(t, "block", "-config", cfgPath, "--", abuser)
		if err := (queue.Requester{Dir: requests}).Request(abuser); err != nil {
			t.Fatal(err)
		}
		if out, err := queueHoldProcess(t, cfgPath); err != nil {
			t.Fatalf("queue-hold: %v\n%s", err, out)
		}
	}
	inQueue := func(ids []string, want string) bool {
		in := s.QueueNames(t)
		for _, id := range ids {
			if in[id] != want {
				return false
			}
		}
		return true
	}
	hold()
	if !inQueue(abusers, "hold") || !inQueue(others, "deferred") {
		t.Fatalf("after the hold: %v", s.QueueNames(t))
	}

	text := reportText(t, notify.Report{
		Kind: notify.KindBlock, Identity: abuser, Time: time.Now(), Mode: "enforce",
		Count: 3, Limit: 2, Period: time.Hour, Action: "HOLD rcptguard: blocked",
		QueueIDs: append([]string{"-dALL", "ALL", "--", "-d", "$(id)"}, abusers...),
		Hostname: "mx.test",
	})
	for _, bad := range []string{"dALL", "-- -d", "$(id)", "'ALL'", "postsuper", "postqueue"} {
		if strings.Contains(text, bad) {
			t.Errorf("the report prints %q:\n%s", bad, text)
		}
	}
	cmds := map[string]string{}
	_, todo, _ := strings.Cut(strings.ReplaceAll(text, "\r\n", "\n"), "\nWhat to do\n")
	for _, l := range strings.Split(todo, "\n") {
		l, ok := strings.CutPrefix(l, "   rcptguard ")
		if !ok {
			continue
		}
		l = "rcptguard " + l
		argv := shellWords(t, l)
		name := argv[1]
		if argv[2] == "-n" {
			name += " -n"
		}
		if _, dup := cmds[name]; dup {
			t.Fatalf("%q printed twice", name)
		}
		cmds[name] = l
		// No value can be read as an option: the identity, last,
		// follows "--"; every other word is a fixed one.
		if len(argv) < 4 || argv[len(argv)-1] != abuser || argv[len(argv)-2] != "--" {
			t.Errorf("%q: argv %q", l, argv)
		}
	}
	for _, want := range []string{"held", "release -n", "release", "purge -n", "purge", "unblock"} {
		if cmds[want] == "" {
			t.Fatalf("the report has no %q command:\n%s", want, text)
		}
	}
	// run runs a printed line: its words, with -config after the
	// subcommand, through rcptguard's own argument parsing.
	run := func(line string) string {
		t.Helper()
		argv := shellWords(t, line)
		return runCLI(t, append([]string{argv[1], "-config", cfgPath}, argv[2:]...)...)
	}

	if out := run(cmds["held"]); !sameSet(idsOfHeld(out), abusers) {
		t.Errorf("%s\nlists %v, want %v:\n%s", cmds["held"], idsOfHeld(out), abusers, out)
	}
	dry := run(cmds["release -n"])
	if !sameSet(idsIn(dry), abusers) || !inQueue(abusers, "hold") {
		t.Fatalf("%s:\n%s\nwant %v listed, nothing moved", cmds["release -n"], dry, abusers)
	}
	out := run(cmds["release"])
	if !slices.Equal(idsIn(out), idsIn(dry)) || !strings.Contains(out, "unblocked "+abuser) {
		t.Fatalf("%s did:\n%s\n-n said:\n%s", cmds["release"], out, dry)
	}
	in := s.QueueNames(t)
	for _, id := range abusers {
		if in[id] == "hold" || in[id] == "" {
			t.Errorf("released message %s is in queue %q", id, in[id])
		}
	}
	if !inQueue(others, "deferred") {
		t.Errorf("release touched other mail: %v", in)
	}

	hold()
	dry = run(cmds["purge -n"])
	if !sameSet(idsIn(dry), abusers) || !inQueue(abusers, "hold") {
		t.Fatalf("%s:\n%s\nwant %v listed, nothing deleted", cmds["purge -n"], dry, abusers)
	}
	out = run(cmds["purge"])
	if !slices.Equal(idsIn(out), idsIn(dry)) || !strings.Contains(out, "kept "+abuser+" blocked") {
		t.Fatalf("%s did:\n%s\n-n said:\n%s", cmds["purge"], out, dry)
	}
	test.Eventually(t, 10*time.Second, "only the other customer's messages left", func() bool {
		return sameSet(ids(s.Queue(t)), others) && inQueue(others, "deferred")
	})

	// The printed unblock command frees the identity, although it starts
	// with '-'.
	if out := run(cmds["unblock"]); out != "unblocked "+abuser+"\n" {
		t.Errorf("%q: %q", cmds["unblock"], out)
	}
}

var queuedAs = regexp.MustCompile(`queued as ([0-9A-Za-z]+)`)

// submitAs submits one message authenticated as user (SASL PLAIN, to a
// loopback server) and returns its queue ID.
func submitAs(t *testing.T, addr, user, password, from, to string) string {
	t.Helper()
	c, err := gosmtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Hello("client.test"); err != nil {
		t.Fatal(err)
	}
	if err := c.Auth(sasl.NewPlainClient("", user, password)); err != nil {
		t.Fatalf("AUTH as %s: %v", user, err)
	}
	if err := c.Mail(from, nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt(to, nil); err != nil {
		t.Fatal(err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(w, "From: <%s>\r\nTo: <%s>\r\nSubject: from %s\r\n\r\nbody\r\n", from, to, user)
	resp, err := w.CloseWithResponse()
	if err != nil {
		t.Fatal(err)
	}
	m := queuedAs.FindStringSubmatch(resp.StatusText)
	if m == nil {
		t.Fatalf("no queue ID in %q", resp.StatusText)
	}
	_ = c.Quit()
	return m[1]
}

// idsOfHeld returns the queue IDs in the output of "rcptguard held".
func idsOfHeld(out string) []string {
	var ids []string
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) > 2 && queue.ValidID(f[1]) {
			ids = append(ids, f[1])
		}
	}
	return ids
}

// reportText composes r and returns its text/plain part.
func reportText(t *testing.T, r notify.Report) string {
	t.Helper()
	raw, err := notify.Compose(r, "rcptguard@mx.test", []string{"abuse@mx.test"})
	if err != nil {
		t.Fatal(err)
	}
	msg, err := mail.ReadMessage(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	_, params, err := mime.ParseMediaType(msg.Header.Get("Content-Type"))
	if err != nil {
		t.Fatal(err)
	}
	mr := multipart.NewReader(msg.Body, params["boundary"])
	for {
		part, err := mr.NextRawPart()
		if err != nil {
			t.Fatalf("no text/plain part: %v", err)
		}
		if strings.HasPrefix(part.Header.Get("Content-Type"), "text/plain") {
			b, err := io.ReadAll(quotedprintable.NewReader(part))
			if err != nil {
				t.Fatal(err)
			}
			return string(b)
		}
	}
}

// shellWords returns the words a POSIX shell makes of line.
func shellWords(t *testing.T, line string) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "sh", "-c", `printf '%s\0' `+line).Output()
	if err != nil {
		t.Fatalf("sh: %q: %v", line, err)
	}
	return strings.Split(strings.TrimSuffix(string(out), "\x00"), "\x00")
}

func ids(q []test.QueueEntry) []string {
	var out []string
	for _, e := range q {
		out = append(out, e.QueueID)
	}
	return out
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}
