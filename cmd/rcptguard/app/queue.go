package app

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/rcptguard/rcptguard/blocklist"
	ident "github.com/rcptguard/rcptguard/blocklist/identity"
	"github.com/rcptguard/rcptguard/cmd/rcptguard/queue"
	"github.com/rcptguard/rcptguard/detector"
)

// errNotRoot is returned by the queue commands run by another user.
var errNotRoot = errors.New("must run as root: postcat and postsuper read and change Postfix's queue, which only root may (try: sudo rcptguard ...)")

// geteuid is os.Geteuid; tests of the refusal replace it.
var geteuid = os.Geteuid

// openQueue checks for root and finds the Postfix commands.
func openQueue(cfg *Config) (*queue.Queue, error) {
	if geteuid() != 0 {
		return nil, errNotRoot
	}
	q, err := queue.New(queue.Config{PostfixConfig: cfg.Queue.PostfixConfig})
	if err != nil {
		return nil, fmt.Errorf("queue.postfix_config: %w", err)
	}
	return q, nil
}

// cmdHeld lists the held mail of one identity, or of every identity.
func cmdHeld(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, config := newFlags("held", "held [-config FILE] [IDENTITY]", stderr)
	cfg, err := parseFlags(fs, config, args)
	if err != nil {
		return err
	}
	id := ""
	switch fs.NArg() {
	case 0:
	case 1:
		if id, err = oneIdentity(fs.Args()); err != nil {
			return err
		}
	default:
		fs.Usage()
		return usageErrorf("at most one IDENTITY")
	}
	_, msgs, err := heldMail(ctx, cfg, id, stderr)
	if err != nil {
		return err
	}
	if len(msgs) == 0 {
		if id != "" {
			fmt.Fprintf(stdout, "no held mail of %s\n", queue.Printable(id, 80))
		} else {
			fmt.Fprintln(stdout, "no held mail submitted with a SASL login")
		}
		return nil
	}
	// Grouped by identity, oldest first in each group.
	slices.SortStableFunc(msgs, func(a, b queue.Message) int {
		return strings.Compare(ident.Fold(a.Identity), ident.Fold(b.Identity))
	})
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "IDENTITY\tQUEUE_ID\tAGE\tSIZE\tRCPTS\tSUBJECT")
	now := time.Now()
	for _, m := range msgs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%s\n", queue.Printable(m.Identity, 60), m.ID, age(now, m.Arrival), m.Size, m.Recipients, queue.Printable(m.Subject, 60))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%d held messages\n", len(msgs))
	return nil
}

// heldMail opens the queue (root only) and finds the held mail of id
// (every identity's when id is ""), telling stderr about queue files it
// could not judge.
func heldMail(ctx context.Context, cfg *Config, id string, stderr io.Writer) (*queue.Queue, []queue.Message, error) {
	q, err := openQueue(cfg)
	if err != nil {
		return nil, nil, err
	}
	msgs, problems, err := q.Find(ctx, queue.Filter{Identity: id, Queues: []string{"hold"}, Subject: true})
	if err != nil {
		return nil, nil, err
	}
	reportProblems(stderr, problems)
	return q, msgs, nil
}

// heldRun is a command on one identity's held mail: release or purge.
type heldRun struct {
	cfg  *Config
	id   string
	q    *queue.Queue
	msgs []queue.Message
	dry  bool // -n: print what would be done, change nothing
}

// startHeld adds -n to fs, parses the command line of one IDENTITY and
// finds its held mail.
func startHeld(ctx context.Context, fs *flag.FlagSet, config *string, args []string, stderr io.Writer) (heldRun, error) {
	dry := fs.Bool("n", false, "dry run: print what would be done, change nothing")
	cfg, id, err := parseIdentityFlags(fs, config, args)
	if err != nil {
		return heldRun{}, err
	}
	q, msgs, err := heldMail(ctx, cfg, id, stderr)
	return heldRun{cfg: cfg, id: id, q: q, msgs: msgs, dry: *dry}, err
}

// cmdRelease unblocks an identity and releases its held mail.
func cmdRelease(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, config := newFlags("release", "release [-config FILE] [-n] IDENTITY", stderr)
	h, err := startHeld(ctx, fs, config, args, stderr)
	if err != nil {
		return err
	}
	cfg, id, q, msgs := h.cfg, h.id, h.q, h.msgs
	if h.dry {
		if blocked, err := isBlocked(cfg, id); err != nil {
			return err
		} else if blocked {
			fmt.Fprintf(stdout, "would unblock %s\n", id)
		} else {
			fmt.Fprintf(stdout, "%s is not blocked\n", id)
		}
		printMessages(stdout, "would release", msgs)
		return nil
	}
	// Unblock first: if that fails, nothing is released.
	if err := unblockForQueue(ctx, cfg, id, stdout); err != nil {
		return err
	}
	released, err := q.Release(ctx, msgs)
	printMessages(stdout, "released", released)
	if err != nil {
		return fmt.Errorf("release: %w", err)
	}
	if len(released) < len(msgs) {
		return fmt.Errorf("release: %d of %d held messages were not released (gone meanwhile?)", len(msgs)-len(released), len(msgs))
	}
	return nil
}

// cmdPurge deletes an identity's held mail, and keeps or lifts its block.
func cmdPurge(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, config := newFlags("purge", "purge [-config FILE] [-n] [-keep-block=false] IDENTITY", stderr)
	keep := fs.Bool("keep-block", true, "keep the identity blocked (false: unblock it after deleting its mail)")
	h, err := startHeld(ctx, fs, config, args, stderr)
	if err != nil {
		return err
	}
	cfg, id, q, msgs := h.cfg, h.id, h.q, h.msgs
	if h.dry {
		printMessages(stdout, "would delete", msgs)
		blocked, err := isBlocked(cfg, id)
		switch {
		case err != nil:
			return err
		case !blocked:
			fmt.Fprintf(stdout, "%s is not blocked\n", id)
		case *keep:
			fmt.Fprintf(stdout, "would keep %s blocked\n", id)
		default:
			fmt.Fprintf(stdout, "would unblock %s\n", id)
		}
		return nil
	}
	deleted, err := q.Delete(ctx, msgs)
	printMessages(stdout, "deleted", deleted)
	if err != nil {
		return fmt.Errorf("purge: %w", err)
	}
	if !*keep {
		if err := unblockForQueue(ctx, cfg, id, stdout); err != nil {
			return err
		}
	} else if blocked, err := isBlocked(cfg, id); err == nil && blocked {
		fmt.Fprintf(stdout, "kept %s blocked\n", id)
	}
	if len(deleted) < len(msgs) {
		return fmt.Errorf("purge: %d of %d held messages were not deleted (gone meanwhile?)", len(msgs)-len(deleted), len(msgs))
	}
	return nil
}

// cmdQueueHold takes the daemon's hold requests and holds each blocked
// identity's recent mail. It runs as root, started by
// contrib/rcptguard-hold.path; it exits 1 when a request was refused.
func cmdQueueHold(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, config := newFlags("queue-hold", "queue-hold [-config FILE]", stderr)
	cfg, err := parseNoArgs(fs, config, args)
	if err != nil {
		return err
	}
	if cfg.Queue.Requests == "" {
		return usageErrorf("queue.requests is empty: retroactive holds are off")
	}
	log := newLogger(cfg.Log, stderr)
	q, err := openQueue(cfg)
	if err != nil {
		return err
	}
	window := cfg.Detector.Period.D()
	reqs, problems, err := queue.TakeRequests(cfg.Queue.Requests, time.Now(), window)
	if err != nil {
		return fmt.Errorf("queue.requests: %w", err)
	}
	refused := len(problems)
	for _, p := range problems {
		log.Warn("hold request refused", slog.Any("error", p))
	}
	for _, r := range reqs {
		blocked, err := isBlocked(cfg, r.Identity)
		if err != nil {
			return err
		}
		if !blocked {
			refused++
			log.Warn("hold request refused: identity is not in the blocklist", slog.String("identity", queue.Printable(r.Identity, 80)))
			continue
		}
		since := r.Time.Add(-window)
		held, problems, err := q.HoldIdentity(ctx, r.Identity, since)
		for _, p := range problems {
			log.Warn("queue file skipped", slog.String("identity", r.Identity), slog.Any("error", p))
		}
		for _, m := range held {
			log.Info("held retroactively", slog.String("identity", r.Identity), slog.String("queue_id", m.ID),
				slog.Time("arrival", m.Arrival), slog.Int("recipients", m.Recipients), slog.Int64("size", m.Size),
				slog.String("subject", queue.Printable(m.Subject, 80)))
		}
		// The daemon reports what was held (holdresults.go); a result
		// not written is logged, the hold itself stands.
		if len(held) > 0 {
			dir := queue.ResultsDir(cfg.Queue.Requests)
			if werr := queue.WriteResult(dir, queue.NewHoldResult(r.Identity, r.Time, time.Now(), held)); werr != nil {
				log.Error("retroactive hold not reported: result not written", slog.String("identity", r.Identity), slog.Any("error", werr))
			}
		}
		if err != nil {
			return fmt.Errorf("hold %s: %w", r.Identity, err)
		}
		log.Info("retroactive hold done", slog.String("identity", r.Identity), slog.Int("held", len(held)),
			slog.Time("since", since), slog.Duration("request_age", time.Since(r.Time)))
		fmt.Fprintf(stdout, "held %d messages of %s\n", len(held), r.Identity)
	}
	if refused > 0 {
		return fmt.Errorf("%d hold requests refused", refused)
	}
	return nil
}

// unblockForQueue removes id from the blocklist, saying so.
func unblockForQueue(ctx context.Context, cfg *Config, id string, stdout io.Writer) error {
	f, err := openForWrite(cfg)
	if err != nil {
		return err
	}
	removed, err := f.Remove(ctx, id)
	if err != nil {
		return fmt.Errorf("unblock %s: %w", id, err)
	}
	if removed {
		fmt.Fprintf(stdout, "unblocked %s\n", id)
	} else {
		fmt.Fprintf(stdout, "%s is not blocked\n", id)
	}
	return nil
}

// withBlockHooks wraps the detector's blocklist so that every block the
// detector makes is marked with its auto-unblock time
// (detector.unblock_after) and, once in the blocklist file, asks for a
// retroactive hold of the identity's queued mail (queue.requests). With
// both off it returns b itself. The hold requester is returned too (nil
// when holds are off): blocks learned through the cluster use it.
func withBlockHooks(cfg *Config, b detector.Blocklist, log *slog.Logger) (detector.Blocklist, *holdRequester, error) {
	h := blockHooks{Blocklist: b, log: log, unblockAfter: cfg.Detector.UnblockAfter.D(), now: time.Now}
	if cfg.Queue.Requests != "" {
		if err := ensureDir(cfg.Queue.Requests, "queue.requests"); err != nil {
			return nil, nil, err
		}
		if err := makeResultsDir(cfg.Queue.Requests); err != nil {
			return nil, nil, err
		}
		// A writer killed mid-request (a crash, a kill -9) leaves its
		// temporary file next to the directory: this user's stale ones go.
		removed, err := queue.RemoveStaleTemps(cfg.Queue.Requests, time.Now())
		if len(removed) > 0 {
			log.Info("removed temporary hold request files left by a dead writer", slog.Int("count", len(removed)), slog.String("dir", filepath.Dir(filepath.Clean(cfg.Queue.Requests))))
		}
		if err != nil {
			log.Warn("cannot remove stale temporary hold request files", slog.Any("error", err))
		}
		h.req = newHoldRequester(cfg.Queue.Requests, cfg.Detector.Period.D(), log)
	}
	if h.req == nil && h.unblockAfter <= 0 {
		return b, nil, nil
	}
	return h, h.req, nil
}

// blockHooks is a detector.Blocklist that adds the auto-unblock mark and
// asks for a retroactive hold after each block.
type blockHooks struct {
	detector.Blocklist
	req          *holdRequester // nil: no retroactive hold
	unblockAfter time.Duration  // 0: no auto-unblock
	now          func() time.Time
	log          *slog.Logger
}

func (h blockHooks) Block(ctx context.Context, id, action, text string) error {
	// A block made here because another server crossed first: that
	// server reports, so this one's hold is one of a learned block.
	learned := strings.HasSuffix(text, detector.FleetMark)
	if h.unblockAfter > 0 {
		text = markAutoUnblock(text, h.now().Add(h.unblockAfter))
	}
	if err := h.Blocklist.Block(ctx, id, action, text); err != nil {
		if h.req != nil {
			h.log.Error("retroactive hold not requested: the block is not in the blocklist file yet", slog.String("identity", id), slog.Any("error", err))
		}
		return err
	}
	if h.req == nil {
		return nil
	}
	request := h.req.request
	if learned {
		request = h.req.requestLearned
	}
	if err := request(id); err != nil {
		h.log.Error("retroactive hold not requested", slog.String("identity", id), slog.Bool("learned", learned), slog.Any("error", err))
		return nil
	}
	h.log.Info("retroactive hold requested", slog.String("identity", id), slog.Bool("learned", learned))
	return nil
}

// isBlocked reads the blocklist file and tells whether id is in it. The
// file lives in a directory the daemon's user owns; root reads it without
// following a symbolic link.
func isBlocked(cfg *Config, id string) (bool, error) {
	f, err := os.OpenFile(cfg.Blocklist.Path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("blocklist.path: %w", err)
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		return false, fmt.Errorf("blocklist.path: %s is not a regular file", cfg.Blocklist.Path)
	}
	entries, _, err := blocklist.Parse(io.LimitReader(f, 256<<20))
	if err != nil {
		return false, fmt.Errorf("blocklist.path: %w", err)
	}
	low := id
	for _, e := range entries {
		if e.Identity == low {
			return true, nil
		}
	}
	return false, nil
}

// printMessages prints one line per message: verb, queue ID, age, size,
// recipients, subject (made safe for a terminal).
func printMessages(w io.Writer, verb string, msgs []queue.Message) {
	now := time.Now()
	for _, m := range msgs {
		fmt.Fprintf(w, "%s %s  age %s  size %d  rcpts %d  subject %q\n", verb, m.ID, age(now, m.Arrival), m.Size, m.Recipients, queue.Printable(m.Subject, 60))
	}
	fmt.Fprintf(w, "%s: %d messages\n", verb, len(msgs))
}

func reportProblems(w io.Writer, problems []error) {
	for _, p := range problems {
		fmt.Fprintf(w, "rcptguard: skipped: %v\n", p)
	}
}

// age formats how long ago t was, in whole units.
func age(now, t time.Time) string {
	d := now.Sub(t)
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", max(int(d/time.Second), 0))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d/time.Minute))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d/time.Hour))
	}
	return fmt.Sprintf("%dd", int(d/(24*time.Hour)))
}
