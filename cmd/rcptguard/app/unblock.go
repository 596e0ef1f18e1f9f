package app

import (
	"context"
	"log/slog"
	"strings"
	"time"

	"github.com/rcptguard/rcptguard/blocklist"
)

// Time-based auto-unblock (detector.unblock_after). A block the daemon
// makes carries its expiry at the start of the entry's text, so it is in
// the blocklist file itself — it survives restarts, and "rcptguard list"
// shows it:
//
//	spammer@example.com	HOLD [auto-unblock 2026-11-30T22:00:00Z] rcptguard: ... blocked: ...
//
// Blocks made by hand ("rcptguard block") have no such mark and stay until
// unblocked by hand. An auto-unblock only removes the entry: held mail
// stays on hold until an administrator releases or deletes it.

const autoUnblockMark = "[auto-unblock "

// markAutoUnblock puts the expiry in front of a block's text.
func markAutoUnblock(text string, at time.Time) string {
	mark := autoUnblockMark + at.UTC().Format(time.RFC3339) + "]"
	if text == "" {
		return mark
	}
	return mark + " " + text
}

// autoUnblockAt returns the expiry marked in an entry's text.
func autoUnblockAt(text string) (time.Time, bool) {
	rest, ok := strings.CutPrefix(text, autoUnblockMark)
	if !ok {
		return time.Time{}, false
	}
	stamp, _, ok := strings.Cut(rest, "]")
	if !ok {
		return time.Time{}, false
	}
	at, err := time.Parse(time.RFC3339, stamp)
	return at, err == nil
}

// autoUnblock removes the entries whose marked expiry has passed, every
// interval until ctx ends. forget is called with an identity before its
// entry goes, so that it starts with a clean count: a request between
// the two is still answered from the block, never judged on the counts
// that made it. lifted is called for each identity removed.
func autoUnblock(ctx context.Context, bl *blocklist.File, interval time.Duration, now func() time.Time, forget func([]string), lifted func(string), log *slog.Logger) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		for _, e := range bl.Entries() {
			at, ok := autoUnblockAt(e.Text)
			if !ok || now().Before(at) {
				continue
			}
			forget([]string{e.Identity})
			removed, err := bl.Remove(ctx, e.Identity)
			if err != nil {
				// A failed write leaves the removal in effect in memory,
				// and the blocklist writes it when it can: the unblock
				// has happened all the same, and is told on below.
				log.Error("auto-unblock not written to the blocklist file yet; it holds in memory and the write is retried",
					slog.String("identity", e.Identity), slog.Any("error", err))
			}
			if removed {
				lifted(e.Identity)
				log.Info("rcptguard auto-unblocked; its held mail stays on hold", slog.String("identity", e.Identity),
					slog.Time("due", at), slog.String("release", "rcptguard release "+e.Identity), slog.String("delete", "rcptguard purge "+e.Identity))
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
