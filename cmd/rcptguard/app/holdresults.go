package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/rcptguard/rcptguard/cmd/rcptguard/queue"
	"github.com/rcptguard/rcptguard/notify"
)

// The retroactive hold's results reach the abuse desk through the daemon:
// the root-run queue-hold writes what it held into queue.ResultsDir (see
// cmd/rcptguard/queue/result.go for why it neither mails nor touches the
// daemon's spool), and the daemon, which owns that directory and the
// mailer, sends one "held" report per result.

// makeResultsDir creates the results directory, 0700, owned by the
// daemon's user; queue-hold (root) writes into it but never creates it.
func makeResultsDir(requests string) error {
	dir := queue.ResultsDir(requests)
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("cannot create %s, next to queue.requests: %w", dir, err)
	}
	return nil
}

// watchHoldResults takes the results in dir every interval until ctx
// ends and hands each to n.held, or, when it answers a block learned
// through the cluster, to holds.heldLearned (logged, not reported).
// TakeResults removes each file as it reads it, so a result is reported
// once.
func watchHoldResults(ctx context.Context, dir string, interval time.Duration, n reportNotifier, holds *holdRequester) {
	t := time.NewTicker(interval)
	defer t.Stop()
	var warned bool
	for {
		results, problems, err := queue.TakeResults(dir, time.Now())
		switch {
		case err != nil && !warned:
			n.log.Warn("cannot read retroactive hold results", slog.String("dir", dir), slog.Any("error", err))
			warned = true
		case err == nil:
			warned = false
		}
		for _, p := range problems {
			n.log.Warn("retroactive hold result refused", slog.Any("error", p))
		}
		for _, r := range results {
			if holds.wasLearned(r.Identity, r.Requested) {
				holds.heldLearned(r)
				continue
			}
			n.held(ctx, r)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// held logs one retroactive hold and, with a mailer, spools its "held"
// report.
func (n reportNotifier) held(ctx context.Context, res queue.HoldResult) {
	var ids []string
	for _, m := range res.Held {
		ids = append(ids, m.ID)
	}
	n.log.Warn("rcptguard report", slog.String("event", string(notify.KindHeld)), slog.String("identity", res.Identity),
		slog.Int("held", res.Count), slog.Any("queue_ids", ids), slog.Time("blocked", res.Requested),
		slog.Duration("block_to_hold", res.Done.Sub(res.Requested)), slog.Bool("mailed", n.mailer != nil))
	if n.mailer == nil {
		return
	}
	if err := n.mailer.Enqueue(ctx, heldReport(res, n.space.get())); err != nil {
		n.log.Error("retroactive hold report not spooled", slog.String("identity", res.Identity), slog.Any("queue_ids", ids), slog.Any("error", err))
	}
}

// heldReport turns a hold result into the notify package's report.
func heldReport(res queue.HoldResult, space *notify.QueueSpace) notify.Report {
	host, _ := os.Hostname()
	r := notify.Report{
		Kind:       notify.KindHeld,
		Identity:   res.Identity,
		Time:       res.Done.Local(),
		BlockTime:  res.Requested.Local(),
		HeldCount:  res.Count,
		QueueSpace: space,
		Hostname:   host,
	}
	for _, m := range res.Held {
		r.Held = append(r.Held, notify.HeldMessage{QueueID: m.ID, Arrival: m.Arrival.Local(), Size: m.Size, Recipients: m.Recipients})
	}
	return r
}
