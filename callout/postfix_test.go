package callout

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/test"
)

// TestRealPostfixGateway probes a real, stock Postfix set up as a gateway
// with relay_recipient_maps, at its default error limits
// (smtpd_soft_error_limit 10 with a 1s sleep, smtpd_hard_error_limit 20).
// Its maillog must show one EHLO and a QUIT in every session, no "lost
// connection" and no error limit reached; every verdict is definite. It
// needs Postfix and root, and is skipped without them unless
// RCPTGUARD_E2E=1.
func TestRealPostfixGateway(t *testing.T) {
	if missing := test.MissingPrograms("postfix", "postconf"); len(missing) > 0 || os.Geteuid() != 0 {
		msg := fmt.Sprintf("needs Postfix (missing: %v) and root (euid %d)", missing, os.Geteuid())
		if os.Getenv("RCPTGUARD_E2E") == "1" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	dir := test.SharedTempDir(t)
	table := filepath.Join(dir, "relay_recipients")
	if err := os.WriteFile(table, []byte("alice@dest.test OK\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	pf := test.StartPostfix(t, test.PostfixConfig{Name: "gw", Main: map[string]string{
		"myhostname":           "gw.dest.test",
		"mynetworks":           "192.0.2.1/32", // the probe is not a trusted client
		"relay_domains":        "dest.test",
		"relay_recipient_maps": "texthash:" + table,
		"relay_transport":      "discard:never delivered in this test",
	}})
	zone := `
dest.test. 300 IN MX 10 gw.dest.test.
gw.dest.test. 300 IN A 127.0.0.2
`
	r := newRig(t, zone, test.RouteDialer{"127.0.0.2": pf.Addr}, func(c *Config) { c.Timeout = 5 * time.Second })
	if res := r.verify("alice@dest.test"); res.Status != StatusValid {
		t.Errorf("alice: %s", res)
	}
	var wg sync.WaitGroup
	for i := range 30 {
		wg.Go(func() {
			res := r.v.Verify(context.Background(), fmt.Sprintf("nobody%d@dest.test", i))
			if res.Status != StatusInvalid || res.Reason != ReasonNoMailbox ||
				!strings.Contains(res.Reply.Text, "User unknown in relay recipient table") {
				t.Errorf("nobody%d: %s", i, res)
			}
		})
	}
	wg.Wait()
	r.v.Close()

	disconnect := regexp.MustCompile(`disconnect from \S+ (.*)`)
	var sessions []string
	test.Eventually(t, 5*time.Second, "every session's disconnect line in the maillog", func() bool {
		b, _ := os.ReadFile(pf.Maillog)
		sessions = sessions[:0]
		for _, m := range disconnect.FindAllStringSubmatch(string(b), -1) {
			sessions = append(sessions, m[1])
		}
		return len(sessions) > 0 && len(sessions) == int(r.v.Stats().Sessions)
	})
	b, _ := os.ReadFile(pf.Maillog)
	for _, bad := range []string{"lost connection", "too many errors", "timeout after"} {
		if strings.Contains(string(b), bad) {
			t.Errorf("maillog says %q:\n%s", bad, b)
		}
	}
	for _, s := range sessions {
		if !strings.Contains(s, "ehlo=1 ") || !strings.Contains(s, "quit=1") {
			t.Errorf("session %q: want ehlo=1 and quit=1", s)
		}
	}
	t.Logf("%d sessions: %s", len(sessions), strings.Join(sessions, " | "))
}
