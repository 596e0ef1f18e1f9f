package app

import (
	"bytes"
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rcptguard/rcptguard/blocklist"
	"github.com/rcptguard/rcptguard/notify"
)

// TestHealthShowsUnwritten: /healthz and the metrics say when a block is
// not on disk and when reports wait in memory for the spool, and say "ok"
// again once both are written.
func TestHealthShowsUnwritten(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "blocklist")
	bl, _, err := blocklist.Open(blocklist.Config{Path: path, Create: true, WriteWait: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	spool := filepath.Join(dir, "spool")
	m, err := notify.New(notify.Config{To: []string{"abuse@example.com"}, Relay: "127.0.0.1:1", Spool: spool, SpoolRetry: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	d := durability{bl: bl, mailer: m}
	reg := prometheus.NewRegistry()
	d.register(reg)
	get := func() (int, string) {
		rec := httptest.NewRecorder()
		d.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/healthz", nil))
		return rec.Code, rec.Body.String()
	}
	if code, body := get(); code != http.StatusOK || body != "ok\n" {
		t.Fatalf("healthy: %d %q", code, body)
	}

	// The blocklist's lock file cannot be opened, and the spool is gone,
	// a file in its place.
	if err := os.Remove(path + ".lock"); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(path+".lock", 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(spool, spool+".away"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(spool, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := bl.Block(context.Background(), "spammer@example.com", "HOLD", "rcptguard: spammer@example.com blocked: 2 invalid recipients within 1h"); err == nil {
		t.Fatal("Block succeeded with the lock file unusable")
	}
	if err := m.Enqueue(context.Background(), notify.Report{Kind: notify.KindBlock, Identity: "spammer@example.com", Count: 2, Limit: 1, Period: time.Hour}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	code, body := get()
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "blocklist: 1 blocks not on disk") || !strings.Contains(body, "notify: 1 reports not in the spool") {
		t.Errorf("while writes fail: %d %q", code, body)
	}
	for _, name := range []string{"rcptguard_blocklist_unwritten", "rcptguard_reports_unspooled"} {
		if v := gaugeValue(t, reg, name); v != 1 {
			t.Errorf("%s = %v, want 1", name, v)
		}
	}

	if err := os.Remove(path + ".lock"); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(spool); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(spool+".away", spool); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := bl.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if err := m.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if code, body := get(); code != http.StatusOK {
		t.Errorf("after the writes: %d %q", code, body)
	}
}

// gaugeValue returns the value of the gauge name in reg.
func gaugeValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

// TestReconcileReports: at start-up the daemon's blocks without a report
// get one, saying so; blocks made by hand, and blocks whose report is on
// record, get none.
func TestReconcileReports(t *testing.T) {
	dir := t.TempDir()
	bl, _, err := blocklist.Open(blocklist.Config{Path: filepath.Join(dir, "blocklist"), Create: true})
	if err != nil {
		t.Fatal(err)
	}
	spool := filepath.Join(dir, "spool")
	m, err := notify.New(notify.Config{To: []string{"abuse@example.com"}, Relay: "127.0.0.1:1", Spool: spool})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Unreported(nil); err != nil { // the ledger's first start
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, e := range []blocklist.Entry{
		{Identity: "lost@example.com", Action: "HOLD", Text: "[auto-unblock 2026-11-30T22:00:00Z] rcptguard: lost@example.com blocked: 2 invalid recipients within 1h"},
		{Identity: "reported@example.com", Action: "HOLD", Text: "rcptguard: reported@example.com blocked: 2 invalid recipients within 1h"},
		{Identity: "byhand@example.com", Action: "HOLD", Text: "rcptguard: byhand@example.com blocked by hand on 2026-11-29 10:00 UTC"},
	} {
		if err := bl.Add(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.NoteReported("reported@example.com"); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	reconcileReports(ctx, bl, m, slog.New(slog.NewTextHandler(&logs, nil)))
	if err := m.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	msgs := spooled(t, spool)
	if len(msgs) != 1 {
		t.Fatalf("%d reports spooled, want 1 (lost@example.com)\n%s", len(msgs), logs.String())
	}
	text := strings.ReplaceAll(msgs[0], "=\r\n", "")
	for _, want := range []string{"Subject: [rcptguard] blocked lost@example.com (report recovered at start-up)", `"recovered": true`, "found this block on its blocklist"} {
		if !strings.Contains(text, want) {
			t.Errorf("recovered report lacks %q:\n%s", want, text)
		}
	}
	// A second start finds the report on record (spooled, not yet sent).
	m2, err := notify.New(notify.Config{To: []string{"abuse@example.com"}, Relay: "127.0.0.1:1", Spool: spool})
	if err != nil {
		t.Fatal(err)
	}
	reconcileReports(ctx, bl, m2, slog.New(slog.NewTextHandler(&logs, nil)))
	if err := m2.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if n := len(spooled(t, spool)); n != 1 {
		t.Errorf("after a second start %d reports spooled, want still 1", n)
	}
}
