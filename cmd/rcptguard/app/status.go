package app

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	iofs "io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/rcptguard/rcptguard/blocklist"
	"github.com/rcptguard/rcptguard/callout/textfmt"
	"github.com/rcptguard/rcptguard/cmd/rcptguard/queue"
	"github.com/rcptguard/rcptguard/detector"
)

// The status socket: the daemon's live counts for `rcptguard status`. It
// lives in a directory of its own, next to the blocklist, that only the
// daemon's user (and root) may enter, so no other local user can ask who
// is counted how much. The daemon writes one JSON document to each
// connection and closes it; it reads nothing.

// statusSocket is the socket's path for cfg.
func statusSocket(cfg *Config) string {
	return filepath.Join(filepath.Dir(cfg.Blocklist.Path), "status", "status.sock")
}

// statusReport is the document the status socket writes.
type statusReport struct {
	Time    time.Time          `json:"time"`
	Period  string             `json:"period"`
	Tracked int                `json:"tracked"`
	Blocked []blockedStatus    `json:"blocked"`
	Closest []detector.Counted `json:"closest"`
}

// blockedStatus is one blocked identity as the daemon knows it.
type blockedStatus struct {
	detector.Counted
	Since time.Time `json:"since,omitzero"` // zero: blocked before this daemon started
}

// blockTimes remembers when the daemon saw each block made, by itself or
// by hand; the blocklist file does not say.
type blockTimes struct {
	mu  sync.Mutex
	m   map[string]time.Time
	now func() time.Time
}

func newBlockTimes() *blockTimes { return &blockTimes{m: map[string]time.Time{}, now: time.Now} }

func (b *blockTimes) note(ids ...string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, id := range ids {
		if _, ok := b.m[id]; !ok {
			b.m[id] = b.now()
		}
	}
}

func (b *blockTimes) forget(ids ...string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, id := range ids {
		delete(b.m, id)
	}
}

func (b *blockTimes) get(id string) time.Time {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.m[id]
}

// timedBlocklist notes the time of each block the detector makes.
type timedBlocklist struct {
	detector.Blocklist
	times *blockTimes
}

func (t timedBlocklist) Block(ctx context.Context, id, action, text string) error {
	t.times.note(id)
	return t.Blocklist.Block(ctx, id, action, text)
}

// statusOf is the daemon's status now, with the n identities closest to
// their limit.
func statusOf(d *detector.Detector, bl *blocklist.File, times *blockTimes, period time.Duration, n int) statusReport {
	r := statusReport{Time: time.Now().UTC(), Period: textfmt.FormatPeriod(period), Tracked: d.Limiter().Len(), Closest: d.Closest(n)}
	for _, e := range bl.Entries() {
		r.Blocked = append(r.Blocked, blockedStatus{Counted: d.CountOf(e.Identity), Since: times.get(e.Identity)})
	}
	return r
}

// listenStatus makes the status socket's private directory and listens
// on it.
func listenStatus(path string) (net.Listener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	// An existing directory is made private too: the socket's safety is
	// the directory's.
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, err
	}
	return detector.ListenConfig{SocketMode: 0o600}.Listen("unix:" + path)
}

// serveStatus answers each connection on ln with report() until ctx ends;
// one at a time, each within 2 seconds.
func serveStatus(ctx context.Context, ln net.Listener, report func() statusReport, log *slog.Logger) {
	stop := context.AfterFunc(ctx, func() { _ = ln.Close() })
	defer stop()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() == nil {
				log.Warn("status socket closed", slog.Any("error", err))
			}
			return
		}
		_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
		_ = json.NewEncoder(conn).Encode(report())
		_ = conn.Close()
	}
}

// askStatus reads the daemon's status from its socket.
func askStatus(ctx context.Context, path string) (statusReport, error) {
	var r statusReport
	var dialer net.Dialer
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	conn, err := dialer.DialContext(ctx, "unix", path)
	if err != nil {
		return r, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
	err = json.NewDecoder(io.LimitReader(conn, 64<<20)).Decode(&r)
	return r, err
}

// statusHint says what to do when the daemon's status socket did not
// answer: a refused permission is a matter of who asks; a missing or
// dead socket, of the daemon not running.
func statusHint(err error) string {
	if errors.Is(err, iofs.ErrPermission) {
		return "run as root or the daemon's user"
	}
	return "is rcptguard serve running with this configuration?"
}

// cmdStatus prints what an abuse desk asks first: the blocked identities,
// since when, why and with what count, and the identities closest to
// their limit. Without a running daemon it prints the blocked identities
// alone and says so.
func cmdStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, config := newFlags("status", "status [-config FILE] [-n N]", stderr)
	n := fs.Int("n", 10, "how many of the identities closest to their limit to show")
	cfg, err := parseNoArgs(fs, config, args)
	if err != nil {
		return err
	}
	var entries []blocklist.Entry
	if _, err := os.Lstat(cfg.Blocklist.Path); !errors.Is(err, iofs.ErrNotExist) {
		f, _, err := blocklist.Open(blocklist.Config{Path: cfg.Blocklist.Path})
		if err != nil {
			return fmt.Errorf("blocklist.path: %w", err)
		}
		entries = f.Entries()
	}
	sock := statusSocket(cfg)
	live, err := askStatus(ctx, sock)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		fmt.Fprintf(stderr, "rcptguard: no answer from the daemon on %s (%v): blocked identities only, without counts; %s\n", sock, err, statusHint(err))
		live = statusReport{Period: textfmt.FormatPeriod(cfg.Detector.Period.D()), Tracked: -1}
	}
	*n = max(*n, 0)
	if len(live.Closest) > *n {
		live.Closest = live.Closest[:*n]
	}
	return printStatus(stdout, entries, live)
}

// printStatus writes the two tables; live.Tracked < 0: no daemon.
func printStatus(w io.Writer, entries []blocklist.Entry, live statusReport) error {
	counts := map[string]blockedStatus{}
	for _, b := range live.Blocked {
		counts[b.Identity] = b
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "BLOCKED (%d)\n", len(entries))
	fmt.Fprintf(tw, "IDENTITY\tSINCE\tCOUNT/LIMIT (%s)\tREASON\n", live.Period)
	for _, e := range entries {
		b, ok := counts[e.Identity]
		count, since := "-", blockedSince(e, b.Since)
		if ok {
			count = countText(b.Counted)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", queue.Printable(e.Identity, 60), since, count, queue.Printable(e.Answer(), 120))
	}
	if live.Tracked >= 0 {
		fmt.Fprintf(tw, "\nCLOSEST TO THEIR LIMIT (%d identities tracked)\n", live.Tracked)
		fmt.Fprintf(tw, "IDENTITY\tCOUNT/LIMIT (%s)\n", live.Period)
		for _, c := range live.Closest {
			fmt.Fprintf(tw, "%s\t%s\n", queue.Printable(c.Identity, 60), countText(c))
		}
	}
	return tw.Flush()
}

func countText(c detector.Counted) string {
	if c.Limit == 0 {
		return fmt.Sprintf("%d/unlimited", c.Count)
	}
	return fmt.Sprintf("%d/%d", c.Count, c.Limit)
}

// blockedSince is when e was blocked: the daemon's note, else the date a
// block by hand writes in its text, else "-".
func blockedSince(e blocklist.Entry, noted time.Time) string {
	if !noted.IsZero() {
		return noted.UTC().Format("2006-01-02 15:04 MST")
	}
	if _, date, ok := strings.Cut(e.Text, " blocked by hand on "); ok {
		if t, err := time.Parse("2006-01-02 15:04 MST", date); err == nil {
			return t.UTC().Format("2006-01-02 15:04 MST")
		}
	}
	return "-"
}

// freshGauges is the /metrics handler h that first sets the gauges of
// tracked and blocked identities, so a scrape never sees them older than
// itself.
func freshGauges(h http.Handler, m *detector.Metrics, tracked, blocked func() int) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		m.Tracked.Set(float64(tracked()))
		m.Blocked.Set(float64(blocked()))
		h.ServeHTTP(w, r)
	})
}
