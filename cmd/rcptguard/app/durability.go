package app

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rcptguard/rcptguard/blocklist"
	"github.com/rcptguard/rcptguard/detector"
	"github.com/rcptguard/rcptguard/notify"
)

// daemonBlock reports whether e is a block the daemon made (its text says
// "rcptguard: IDENTITY blocked: WHY", maybe after an auto-unblock mark),
// not one made by hand ("... blocked by hand ...") or by another tool.
// A block made because another server of the fleet crossed first
// (detector.FleetMark) is that server's to report.
func daemonBlock(e blocklist.Entry) bool {
	return strings.Contains(e.Text, "rcptguard: "+e.Identity+" blocked: ") && !strings.HasSuffix(e.Text, detector.FleetMark)
}

// reconcileReports reports, at start-up, the daemon's blocks on the
// blocklist whose report a crash lost before it reached the spool (the
// block is written first; see notify.Mailer.Unreported). Each gets one
// block report saying so.
func reconcileReports(ctx context.Context, bl *blocklist.File, m *notify.Mailer, log *slog.Logger) {
	var ids []string
	entries := map[string]blocklist.Entry{}
	for _, e := range bl.Entries() {
		if daemonBlock(e) {
			ids = append(ids, e.Identity)
			entries[e.Identity] = e
		}
	}
	missing, err := m.Unreported(ids)
	if err != nil {
		log.Error("cannot tell which blocks were reported; blocks without a report are not reported now", slog.Any("error", err))
		return
	}
	host, _ := os.Hostname()
	for _, id := range missing {
		e := entries[id]
		log.Warn("block found without its report; reporting it now", slog.String("identity", id))
		r := notify.Report{Kind: notify.KindBlock, Identity: id, Time: time.Now(), Mode: "enforce",
			Action: e.Answer(), Hostname: host, Recovered: true}
		if err := m.Enqueue(ctx, r); err != nil {
			log.Error("block report not queued", slog.String("identity", id), slog.Any("error", err))
		}
	}
}

// durability is what /healthz and the metrics say about writes that did
// not reach the disk yet: blocks (the blocklist) and reports (the spool).
type durability struct {
	bl     *blocklist.File
	mailer *notify.Mailer // nil: no reports
}

// problems returns one line per kind of write still waiting for the disk.
func (d durability) problems() []string {
	var out []string
	if h := d.bl.Health(); h.Unwritten > 0 {
		out = append(out, fmt.Sprintf("blocklist: %d blocks not on disk since %s (held in memory, retried every second): %v",
			h.Unwritten, h.Since.UTC().Format(time.RFC3339), h.Err))
	}
	if d.mailer != nil {
		if n, since, err := d.mailer.Unspooled(); n > 0 && err != nil {
			out = append(out, fmt.Sprintf("notify: %d reports not in the spool since %s (held in memory, retried): %v",
				n, since.UTC().Format(time.RFC3339), err))
		}
	}
	return out
}

// ServeHTTP is /healthz: "ok", or 503 with what waits for the disk.
func (d durability) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	p := d.problems()
	if len(p) == 0 {
		_, _ = fmt.Fprint(w, "ok\n")
		return
	}
	w.WriteHeader(http.StatusServiceUnavailable)
	_, _ = fmt.Fprint(w, strings.Join(p, "\n")+"\n")
}

// register adds the gauges of writes waiting for the disk.
func (d durability) register(reg prometheus.Registerer) {
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "rcptguard_blocklist_unwritten",
		Help: "Blocks in force that did not reach the blocklist file within the write wait; retried until written."},
		func() float64 { return float64(d.bl.Health().Unwritten) }))
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "rcptguard_reports_unspooled",
		Help: "Reports waiting in memory because the spool did not take them yet (a full or read-only disk); retried."},
		func() float64 {
			if d.mailer == nil {
				return 0
			}
			n, _, _ := d.mailer.Unspooled()
			return float64(n)
		}))
}

// forgetBlock tells the spool's record that id was unblocked: its next
// block is a new event, with its own report.
func forgetBlock(m *notify.Mailer, id string, log *slog.Logger) {
	if m == nil {
		return
	}
	if err := m.Forget(id); err != nil {
		log.Warn("spool ledger not updated", slog.String("identity", id), slog.Any("error", err))
	}
}
