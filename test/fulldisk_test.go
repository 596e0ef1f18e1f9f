package test_test

// A block and its report are one durable step (issue 13), end to end: the
// state directory (blocklist and report spool) on a small tmpfs, filled
// to the last byte, and the report relay down.

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/mail"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/blocklist"
	"github.com/rcptguard/rcptguard/test"
)

// healthz returns the status and body of the daemon's /healthz.
func healthz(t *testing.T, metricsAddr string) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + metricsAddr + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestFullDiskBlocksAndReports: 12 identities each pass warn_at and then
// the limit while the disk is full and the relay down: 12 blocks and 12
// warnings. The blocks hold from memory and the reports wait in memory,
// both shown on /healthz and the gauges. Once space is back, the blocks
// reach the file and the reports the spool; once the relay is back, every
// report arrives exactly once, and every block on file has its report.
func TestFullDiskBlocksAndReports(t *testing.T) {
	w := newWorld(t)
	state := filepath.Join(w.dir, "state")
	if err := os.MkdirAll(state, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", state, "tmpfs", 0, "size=512k,mode=0755"); err != nil {
		t.Skipf("cannot mount a tmpfs (%v): notify and blocklist test the full disk with injected errors", err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(state, syscall.MNT_DETACH) })
	relay := test.StartRelay(t, test.RelayConfig{})
	relay.SetDown(true)
	cfg := w.suiteConfig(t, "fulldisk.toml", map[string]string{
		"detector.limit":   "4",
		"detector.warn_at": "0.5",
		"detector.wait":    `"5s"`,
		"notify.to":        `["abuse@isp.test"]`,
		"notify.from":      `"rcptguard@isp.test"`,
		"notify.relay":     strconv.Quote(relay.Addr),
		"notify.starttls":  `"off"`,
		"metrics.listen":   `"127.0.0.1:0"`,
	})
	d := startDaemon(t, cfg)
	filler := filepath.Join(state, "filler")
	fd, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	for buf := make([]byte, 4096); ; {
		if _, err := fd.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			break
		}
	}
	fd.Close()

	c := test.DialPolicy(t, d.addr)
	const n = 12
	for i := range n {
		id := fmt.Sprintf("full%02d@customer.test", i)
		var a string
		for k := range 5 {
			start := time.Now()
			a = c.Must(rcpt(id, fmt.Sprintf("nobody-%d-%d@good.test", i, k)))
			if el := time.Since(start); el > 2*time.Second {
				t.Errorf("%s: an answer took %v on a full disk", id, el)
			}
		}
		if !strings.HasPrefix(a, "HOLD ") {
			t.Fatalf("%s at its 5th invalid recipient: %q", id, a)
		}
	}
	pollUntil(t, 10*time.Second, "/healthz does not show the unwritten blocks and reports", func() bool {
		code, body := healthz(t, d.metrics)
		return code == http.StatusServiceUnavailable && strings.Contains(body, "blocklist: 12 blocks not on disk") &&
			strings.Contains(body, "notify: 24 reports not in the spool")
	})
	_, body := healthz(t, d.metrics)
	unwritten, unspooled := metricValue(t, d.metrics, "rcptguard_blocklist_unwritten"), metricValue(t, d.metrics, "rcptguard_reports_unspooled")
	t.Logf("disk full: %v blocks unwritten, %v reports unspooled; /healthz:\n%s", unwritten, unspooled, body)
	if unwritten != n || unspooled != 2*n {
		t.Errorf("gauges: %v blocks unwritten, %v reports unspooled; want %d and %d", unwritten, unspooled, n, 2*n)
	}

	// Space comes back: blocks reach the file, reports the spool.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	pollUntil(t, 20*time.Second, "blocks and reports not written after the space came back", func() bool {
		code, _ := healthz(t, d.metrics)
		return code == http.StatusOK && spoolFiles(t, filepath.Join(state, "spool")) == 2*n
	})
	data, err := os.ReadFile(w.blocklistPath())
	if err != nil {
		t.Fatal(err)
	}
	entries, _, err := blocklist.Parse(bytes.NewReader(data))
	if err != nil || len(entries) != n {
		t.Fatalf("%d entries on file, want %d: %v", len(entries), n, err)
	}
	spooled := spoolFiles(t, filepath.Join(state, "spool"))

	// The relay comes back; a restart makes the mailer try at once (its
	// own retry comes after a minute).
	d.stop()
	relay.SetDown(false)
	startDaemon(t, cfg)
	relay.WaitMessages(t, 2*n, 20*time.Second)
	time.Sleep(500 * time.Millisecond) // a duplicate would come now
	counts := map[string]int{}
	dups := 0
	for _, m := range relay.Messages() {
		msg, err := mail.ReadMessage(bytes.NewReader(m.Data))
		if err != nil {
			t.Fatal(err)
		}
		s := msg.Header.Get("Subject")
		if counts[s]++; counts[s] > 1 {
			dups++
			t.Errorf("%q arrived %d times", s, counts[s])
		}
	}
	for _, e := range entries {
		if counts[fmt.Sprintf("[rcptguard] blocked %s: 5 invalid recipients in 1h", e.Identity)] != 1 {
			t.Errorf("block of %s: no report, or not one", e.Identity)
		}
	}
	for i := range n {
		if s := fmt.Sprintf("[rcptguard] warning full%02d@customer.test: 2 of 4", i); counts[s] != 1 {
			t.Errorf("%q arrived %d times, want once", s, counts[s])
		}
	}
	t.Logf("full disk: %d blocks, %d warnings; %d blocks on file and %d reports spooled once space was back; %d reports delivered, %d duplicates",
		n, n, len(entries), spooled, len(relay.Messages()), dups)
}
