package test_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rcptguard/rcptguard/test"
)

// TestOneIdentityRule runs the cases through the daemon, its
// limits file, its blocklist file and a restart: each identity is either
// judged and blocked everywhere (memory, file, after a restart) or
// refused everywhere, never blocked in memory and let through later.
func TestOneIdentityRule(t *testing.T) {
	w := newWorld(t)
	long := strings.Repeat("Ⱥ", 160)     // 320 bytes; 480 if lower-cased the Unicode way
	kelvin := "\u212Aelly@customer.test" // Kelvin sign, not K
	encoded := "=?utf-8?q?=E2=80=AEsecurity-team=40bank?=@customer.test"
	limits := filepath.Join(w.dir, "limits")
	if err := os.WriteFile(limits, []byte(long+" 1\n"+kelvin+" 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfgPath := w.config(t, fmt.Sprintf("limits_file = %q", limits))
	d := startDaemon(t, cfgPath)
	c := test.DialPolicy(t, d.addr)
	answers := func(user string, n int) string {
		var out []string
		for i := range n {
			a := c.Must(rcpt(user, fmt.Sprintf("nobody%d@good.test", i)))
			out = append(out, strings.Fields(a)[0])
		}
		return strings.Join(out, " ")
	}
	for _, tt := range []struct{ user, want string }{
		{long, "DUNNO HOLD HOLD HOLD"},
		{kelvin, "DUNNO HOLD HOLD HOLD"},
		{"kelly@customer.test", "DUNNO DUNNO DUNNO DUNNO"}, // limit 5: not the Kelvin identity
		{encoded, "DUNNO DUNNO DUNNO DUNNO"},               // refused
		{strings.Repeat("Ⱥ", 161), "DUNNO DUNNO DUNNO DUNNO"},
	} {
		if got := answers(tt.user, 4); got != tt.want {
			t.Errorf("%q: %s, want %s", tt.user, got, tt.want)
		}
	}
	list := runCLI(t, "list", "-config", cfgPath)
	for _, id := range []string{long, kelvin} {
		if !strings.Contains(list, id+"\tHOLD ") {
			t.Errorf("%q not in the blocklist:\n%s", id, list)
		}
	}
	if strings.Contains(list, "kelly@") || strings.Contains(list, "=?") || strings.Count(list, "\n") != 2 {
		t.Errorf("blocklist:\n%s", list)
	}
	if logs := d.logs.String(); !strings.Contains(logs, "identity refused") || !strings.Contains(logs, "RFC 2047") {
		t.Errorf("the encoded word is not refused in the log:\n%s", logs)
	}
	d.stop()
	d = startDaemon(t, cfgPath)
	c = test.DialPolicy(t, d.addr)
	for _, tt := range []struct{ user, want string }{
		{long, "HOLD HOLD"},
		{kelvin, "HOLD HOLD"},
		{"kelly@customer.test", "DUNNO DUNNO"},
	} {
		if got := answers(tt.user, 2); got != tt.want {
			t.Errorf("after a restart, %q: %s, want %s", tt.user, got, tt.want)
		}
	}
}
