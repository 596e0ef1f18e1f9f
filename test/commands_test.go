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
	"net/smtp"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/notify"
	"github.com/rcptguard/rcptguard/test"
)

// TestReportCommandsOnRealQueue runs, word for word, the commands a block
// report prints against a scratch Postfix queue: the held mail of an
// identity that starts with '-' is listed, released and deleted, and
// nothing else in the queue is touched. Queue IDs that are not Postfix
// queue IDs ("-dALL", which once made the printed `postsuper -H -- -dALL`
// delete the whole queue) are not printed at all.
func TestReportCommandsOnRealQueue(t *testing.T) {
	requireRealPostfix(t)
	if missing := test.MissingPrograms("jq", "sh"); len(missing) > 0 {
		if os.Getenv("RCPTGUARD_E2E") == "1" {
			t.Fatalf("missing %v (RCPTGUARD_E2E=1 is set)", missing)
		}
		t.Skipf("missing %v", missing)
	}
	// Mail to any domain goes to the discard transport, which is
	// deferred: every message stays in the queue until the test acts.
	// allow_min_user lets a sender start with '-' (Postfix refuses it by
	// default, but a site may allow it, and a SASL name may start so).
	p := test.StartPostfix(t, test.PostfixConfig{Name: "cmds", Main: map[string]string{
		"defer_transports": "discard", "allow_min_user": "yes"}})
	const (
		abuser = "-x@customer.test"
		other  = "other@customer.test"
	)
	for i, from := range []string{abuser, other, abuser, other, abuser} {
		msg := fmt.Sprintf("From: <%s>\r\nTo: <r%d@dest.test>\r\nSubject: m%d\r\n\r\nbody\r\n", from, i, i)
		if err := smtp.SendMail(p.Addr, nil, from, []string{fmt.Sprintf("r%d@dest.test", i)}, []byte(msg)); err != nil {
			t.Fatalf("submit from %s: %v", from, err)
		}
	}
	var queue []test.QueueEntry
	test.Eventually(t, 20*time.Second, "5 deferred messages", func() bool {
		queue = p.Queue(t)
		return len(queue) == 5 && !slices.ContainsFunc(queue, func(e test.QueueEntry) bool { return e.QueueName != "deferred" })
	})
	var held, others []string
	for _, e := range queue {
		if e.Sender == abuser {
			held = append(held, e.QueueID)
		} else {
			others = append(others, e.QueueID)
		}
	}
	for _, id := range held {
		if out, err := exec.Command("postsuper", "-c", p.ConfigDir, "-h", id).CombinedOutput(); err != nil {
			t.Fatalf("postsuper -h %s: %v\n%s", id, err, out)
		}
	}
	if got := ids(p.Held(t, abuser)); !sameSet(got, held) {
		t.Fatalf("held %v, want %v", got, held)
	}

	text := reportText(t, notify.Report{
		Kind: notify.KindBlock, Identity: abuser, Time: time.Now(), Mode: "enforce",
		Count: 3, Limit: 2, Period: time.Hour, Action: "HOLD rcptguard: blocked",
		QueueIDs: append([]string{"-dALL", "ALL", "--", "-d", "$(id)"}, held...),
		Hostname: "mx.test",
	})
	for _, bad := range []string{"dALL", "-- -d", "$(id)", "'ALL'"} {
		if strings.Contains(text, bad) {
			t.Errorf("the report prints %q:\n%s", bad, text)
		}
	}
	var list, release, del, unblock []string
	for _, l := range strings.Split(text, "\n") {
		l = strings.TrimSpace(l)
		switch {
		case strings.HasPrefix(l, "postqueue -j |"):
			list = append(list, l)
		case strings.HasPrefix(l, "postsuper -H "):
			release = append(release, l)
		case strings.HasPrefix(l, "postsuper -d "):
			del = append(del, l)
		case strings.HasPrefix(l, "rcptguard unblock "):
			unblock = append(unblock, l)
		}
	}
	if len(list) != 1 || len(release) != len(held) || len(del) != len(held) || len(unblock) != 1 {
		t.Fatalf("commands: list %q, release %q, delete %q, unblock %q in:\n%s", list, release, del, unblock, text)
	}
	// No value argument can be read as an option: postsuper gets exactly
	// its flag and a queue ID; the sender reaches jq through the
	// environment.
	for _, l := range append(slices.Clone(release), del...) {
		if argv := shellWords(t, l); len(argv) != 3 || strings.HasPrefix(argv[2], "-") || !slices.Contains(held, argv[2]) {
			t.Errorf("%q: argv %q", l, argv)
		}
	}
	_, jq, _ := strings.Cut(list[0], " | ")
	for _, w := range shellWords(t, jq) {
		if strings.HasPrefix(w, "-") && w != "-j" && w != "-r" {
			t.Errorf("%q: argument %q", list[0], w)
		}
	}

	env := append(os.Environ(), "MAIL_CONFIG="+p.ConfigDir)
	run := func(line string) string {
		t.Helper()
		cmd := exec.Command("sh", "-c", line)
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v\n%s", line, err, out)
		}
		return string(out)
	}
	if got := strings.Fields(run(list[0])); !sameSet(got, held) {
		t.Errorf("%s\nlisted %q, want the held %q", list[0], got, held)
	}
	for _, l := range release {
		run(l)
	}
	queue = p.Queue(t)
	if len(queue) != 5 || len(p.Held(t, "")) != 0 {
		t.Fatalf("after the release commands: %+v", queue)
	}
	for _, l := range del {
		run(l)
	}
	test.Eventually(t, 10*time.Second, "only the other sender's messages left", func() bool {
		return sameSet(ids(p.Queue(t)), others)
	})

	// The printed unblock command frees the identity, although it starts
	// with '-'.
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "rcptguard.toml")
	cfg := fmt.Sprintf("[blocklist]\npath = %q\n", filepath.Join(dir, "blocklist"))
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	runCLI(t, "block", "-config", cfgPath, "--", abuser)
	argv := shellWords(t, unblock[0])
	if argv[0] != "rcptguard" || argv[1] != "unblock" {
		t.Fatalf("unblock argv %q", argv)
	}
	args := append([]string{"unblock", "-config", cfgPath}, argv[2:]...)
	if out := runCLI(t, args...); out != "unblocked "+abuser+"\n" {
		t.Errorf("%q: %q", unblock[0], out)
	}
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
