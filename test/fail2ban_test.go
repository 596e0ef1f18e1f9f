package test_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rcptguard/rcptguard/test"
)

// TestFail2banFilter runs the real fail2ban-regex with the contrib filter
// over the daemon's own log, in the text and the JSON format, straight and
// with a syslog/journal prefix. The identity, the recipients, the queue ID
// and the client name all carry "client=203.0.113.99"; the filter must find
// the block line's own client field, once, and nothing else.
func TestFail2banFilter(t *testing.T) {
	if missing := test.MissingPrograms("fail2ban-regex"); len(missing) > 0 {
		if os.Getenv("RCPTGUARD_E2E") == "1" {
			t.Fatal("fail2ban-regex is missing (apt-get install fail2ban); RCPTGUARD_E2E=1 is set, so this is a failure")
		}
		t.Skip("fail2ban-regex is missing (apt-get install fail2ban)")
	}
	filter, err := filepath.Abs("../contrib/fail2ban/filter.d/rcptguard.conf")
	if err != nil {
		t.Fatal(err)
	}
	const (
		bait   = "client=203.0.113.99"
		user   = bait + "@customer.test"
		client = "198.51.100.23" // test.RcptRequest's client_address
	)
	for _, format := range []string{"text", "json"} {
		t.Run(format, func(t *testing.T) {
			w := newWorld(t)
			d := startDaemon(t, w.config(t, fmt.Sprintf("\n[log]\nformat = %q\n", format)))
			c := test.DialPolicy(t, d.addr)
			var last string
			for i := range 7 {
				req := test.RcptRequest(user, user, fmt.Sprintf("%s.%d@good.test", bait, i), "4F2A1C0E3B "+bait)
				req["client_name"] = bait
				req["reverse_client_name"] = "x " + bait
				last = c.Must(req)
			}
			if !strings.HasPrefix(last, "HOLD ") {
				t.Fatalf("not blocked: %q", last)
			}
			logs := d.logs.String()
			if n := strings.Count(logs, "rcptguard blocked"); n != 1 {
				t.Fatalf("%d block lines in:\n%s", n, logs)
			}
			// The bait is in the log: in the identity, the recipients and
			// the dropped queue ID and client names.
			if n := strings.Count(logs, "203.0.113.99"); n < 10 {
				t.Fatalf("the bait is in the log %d times only:\n%s", n, logs)
			}
			// A block line whose fields after the client hold the bait, as
			// rcptguard wrote it before queue IDs were checked.
			old := `time=2026-11-29T22:40:01.123+00:00 level=WARN msg="rcptguard blocked" identity="a ` + bait + ` b" count=6 limit=5 period=1h action=HOLD client=` + client + ` queue_id="4F2A1C0E3B ` + bait + ` x"` + "\n"
			if format == "json" {
				old = `{"time":"2026-11-29T22:40:01.123+00:00","level":"WARN","msg":"rcptguard blocked","identity":"a\",\"` + strings.Replace(bait, "=", `\":\"`, 1) + `","count":6,"limit":5,"period":"1h","action":"HOLD","client":"` + client + `","queue_id":"4F2A1C0E3B ` + bait + ` x"}` + "\n"
			}
			logs += old
			prefixed := ""
			for _, l := range strings.SplitAfter(logs, "\n") {
				if l != "" {
					prefixed += "Nov 29 22:40:01 mx rcptguard[4711]: " + l
				}
			}
			for name, text := range map[string]string{"plain": logs, "prefixed": prefixed} {
				path := filepath.Join(t.TempDir(), "rcptguard.log")
				if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
					t.Fatal(err)
				}
				out, err := exec.Command("fail2ban-regex", "-o", "ip", path, filter).CombinedOutput()
				if err != nil {
					t.Fatalf("fail2ban-regex: %v\n%s", err, out)
				}
				if got := strings.Fields(string(out)); len(got) != 2 || got[0] != client || got[1] != client {
					t.Errorf("%s: fail2ban-regex found %q, want %s twice (two block lines); log:\n%s", name, got, client, text)
				}
			}
		})
	}
}
