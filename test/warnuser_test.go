package test_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/test"
)

// TestWarnUserLocalDomainsOnly: with notify.warn_user, the warning at
// warn_at goes to the identity itself only when its domain is in
// detector.local_domains; a foreign identity (what a forged request would
// name) gets none, and the abuse desk still gets both warnings.
func TestWarnUserLocalDomainsOnly(t *testing.T) {
	w := newWorld(t)
	relay := test.StartRelay(t, test.RelayConfig{})
	cfgPath := w.config(t, `local_domains = ["customer.test"]`)
	text, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	base, _, _ := strings.Cut(string(text), "[notify]")
	extra := fmt.Sprintf(`
[notify]
to = ["abuse@isp.test"]
from = "rcptguard@isp.test"
relay = %q
starttls = "off"
warn_user = true
spool = %q
`, relay.Addr, filepath.Join(w.dir, "state", "spool"))
	if err := os.WriteFile(cfgPath, []byte(base+extra), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, cfgPath)
	c := test.DialPolicy(t, d.addr)
	// limit 5, warn_at 0.75: the warning comes with the 4th invalid recipient.
	for _, user := range []string{"alice@customer.test", "victim@third-party.test"} {
		for i := range 4 {
			if a := c.Must(rcpt(user, fmt.Sprintf("nobody%d@good.test", i))); a != "DUNNO" {
				t.Fatalf("%s: %q", user, a)
			}
		}
	}
	relay.WaitMessages(t, 3, 10*time.Second)
	time.Sleep(300 * time.Millisecond) // a fourth message would be a wrong one
	msgs := relay.Messages()
	var desk, alice int
	for _, m := range msgs {
		switch to := strings.Join(m.To, ","); to {
		case "abuse@isp.test":
			desk++
		case "alice@customer.test":
			alice++
		default:
			t.Errorf("message to %s", to)
		}
	}
	if desk != 2 || alice != 1 || len(msgs) != 3 {
		t.Fatalf("%d messages: %d to the desk (want 2), %d to alice (want 1)", len(msgs), desk, alice)
	}
	if !strings.Contains(d.logs.String(), "not in detector.local_domains") {
		t.Error("the refused user warning is not logged")
	}
}
