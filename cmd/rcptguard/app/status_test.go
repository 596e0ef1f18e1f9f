package app

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/test"
)

// TestStatus: `rcptguard status` shows the blocked identities with since
// when, why and their count, and the identities closest to their limit,
// live from the running daemon; without it, the blocked ones alone, saying
// so. The gauges move at once.
func TestStatus(t *testing.T) {
	dns := test.StartDNS(t, "nullmx.test. 300 IN MX 0 .\n")
	dir := t.TempDir()
	cfgPath := writeConfig(t, fmt.Sprintf(`
[policy]
listen = ["127.0.0.1:0"]
[detector]
limit = 5
[callout]
resolver = %q
[blocklist]
path = %q
[queue]
requests = %q
[notify]
spool = %q
[metrics]
listen = "127.0.0.1:0"
`, dns.Addr, filepath.Join(dir, "blocklist"), filepath.Join(dir, "hold-requests"), filepath.Join(dir, "spool")))
	cfg, err := LoadConfig(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	status := func() (string, string) {
		t.Helper()
		var out, errOut bytes.Buffer
		if err := Run(context.Background(), []string{"status", "-config", cfgPath}, &out, &errOut); err != nil {
			t.Fatalf("status: %v\n%s", err, errOut.String())
		}
		return out.String(), errOut.String()
	}
	runCmd := func(args ...string) {
		t.Helper()
		var out, errOut bytes.Buffer
		if err := Run(context.Background(), append(args[:1:1], append([]string{"-config", cfgPath}, args[1:]...)...), &out, &errOut); err != nil {
			t.Fatalf("%q: %v\n%s", args, err, errOut.String())
		}
	}
	runCmd("block", "-reason", "ticket 7", "mallory@example.com")

	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan [2]string, 1)
	done := make(chan error, 1)
	go func() {
		done <- Serve(ctx, cfg, io.Discard, Hooks{Ready: func(p []string, m string) { ready <- [2]string{p[0], m} }})
	}()
	var addrs [2]string
	select {
	case addrs = <-ready:
	case err := <-done:
		t.Fatalf("serve: %v", err)
	}
	metric := func(name string) string {
		t.Helper()
		resp, err := http.Get("http://" + addrs[1] + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, name+" "); ok {
				return v
			}
		}
		return ""
	}

	c := test.DialPolicy(t, addrs[0])
	for i := range 3 {
		c.Must(test.RcptRequest("alice@example.com", "alice@example.com", fmt.Sprintf("x%d@nullmx.test", i), ""))
	}
	c.Must(test.RcptRequest("bob@example.com", "bob@example.com", "y@nullmx.test", ""))
	if v := metric("rcptguard_tracked_identities"); v != "2" {
		t.Errorf("rcptguard_tracked_identities %q right after the requests, want 2", v)
	}
	// A block by hand reaches the daemon within 2 s (the file is
	// watched); the gauge says so at the next scrape, not 30 s later.
	runCmd("block", "eve@example.com")
	for deadline := time.Now().Add(3 * time.Second); metric("rcptguard_blocked_identities") != "2"; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("rcptguard_blocked_identities %q 3 s after a block, want 2", metric("rcptguard_blocked_identities"))
		}
	}

	out, errOut := status()
	for _, want := range []string{"BLOCKED (2)", "eve@example.com", "mallory@example.com", "ticket 7",
		"CLOSEST TO THEIR LIMIT (2 identities tracked)", "alice@example.com  3/5", "bob@example.com    1/5", "COUNT/LIMIT (1h)"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	if strings.Index(out, "alice@") > strings.LastIndex(out, "bob@") {
		t.Errorf("alice, closer to her limit, is not first:\n%s", out)
	}
	if errOut != "" {
		t.Errorf("stderr %q", errOut)
	}
	today := time.Now().UTC().Format("2006-01-02")
	if strings.Count(out, today) != 2 {
		t.Errorf("status does not say since when both are blocked:\n%s", out)
	}

	// Only the daemon's user (and root) may ask.
	if fi, err := os.Stat(filepath.Dir(statusSocket(cfg))); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("status socket directory: %v, %v; want mode 0700", fi, err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	out, errOut = status()
	if !strings.Contains(errOut, "blocked identities only") || !strings.Contains(errOut, "is rcptguard serve running") ||
		!strings.Contains(out, "mallory@example.com") || strings.Contains(out, "CLOSEST") {
		t.Errorf("without the daemon: stdout\n%s\nstderr %q", out, errOut)
	}
}

// TestStatusHint: a socket the caller may not open is a matter of who
// asks; one that is missing or refuses, of the daemon not running.
func TestStatusHint(t *testing.T) {
	for _, tt := range []struct {
		err  error
		want string
	}{
		{fmt.Errorf("dial: %w", os.ErrPermission), "run as root or the daemon's user"},
		{fmt.Errorf("dial: %w", os.ErrNotExist), "is rcptguard serve running"},
		{fmt.Errorf("dial: %w", syscall.ECONNREFUSED), "is rcptguard serve running"},
		{fmt.Errorf("dial: %w", syscall.EACCES), "run as root or the daemon's user"},
	} {
		if got := statusHint(tt.err); !strings.Contains(got, tt.want) {
			t.Errorf("statusHint(%v) = %q, want %q", tt.err, got, tt.want)
		}
	}
}
