package app

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/rcptguard/rcptguard/callout/textfmt"
	"github.com/rcptguard/rcptguard/detector"
	"github.com/rcptguard/rcptguard/notify"
)

// newMailer builds the report mailer the [notify] section describes; nil
// when no report mail is configured (no notify.to and no warn_user).
func newMailer(cfg *Config, log *slog.Logger, withSpool bool) (*notify.Mailer, error) {
	n := cfg.Notify
	if len(n.To) == 0 && !n.WarnUser && withSpool {
		return nil, nil
	}
	password := ""
	if n.PasswordFile != "" {
		b, err := os.ReadFile(n.PasswordFile)
		if err != nil {
			return nil, fmt.Errorf("notify.password_file: %w", err)
		}
		if fi, err := os.Stat(n.PasswordFile); err == nil && fi.Mode().Perm()&0o004 != 0 {
			log.Warn("notify.password_file is readable by every user on this machine",
				slog.String("path", n.PasswordFile), slog.String("mode", fmt.Sprintf("%04o", fi.Mode().Perm())),
				slog.String("fix", "chmod 0640 "+n.PasswordFile+" (owned by root, group rcptguard) or 0600 owned by rcptguard"))
		}
		password = strings.TrimRight(string(b), "\r\n")
		if password == "" {
			return nil, fmt.Errorf("notify.password_file: %s is empty (notify.username %q needs a password)", n.PasswordFile, n.Username)
		}
	}
	spool := ""
	if withSpool {
		spool = n.Spool
		// The spool itself is made 0700 by notify; its parent is the
		// state directory, which Postfix must be able to enter.
		if err := ensureDir(filepath.Dir(spool), "notify.spool"); err != nil {
			return nil, err
		}
	}
	m, err := notify.New(notify.Config{
		To:            n.To,
		From:          n.From,
		Relay:         n.Relay,
		Username:      n.Username,
		Password:      password,
		StartTLS:      n.STARTTLS,
		TLSSkipVerify: n.TLSSkipVerify,
		Spool:         spool,
		MaxAge:        n.MaxAge.D(),
		WarnUser:      n.WarnUser,
		// Only the site's own users are warned, once per period each.
		UserDomains:    cfg.Detector.LocalDomains,
		UserWarnPeriod: cfg.Detector.Period.D(),
		Logger:         log,
	})
	if err != nil {
		return nil, fmt.Errorf("[notify]: %w", err)
	}
	return m, nil
}

// reportNotifier logs every event and, when a mailer is configured, spools
// a report for it; sending happens in the mailer's own goroutine, so a
// policy answer never waits for the relay.
type reportNotifier struct {
	log    *slog.Logger
	mailer *notify.Mailer // nil: log only
	// space is the queue file system's last reading, said in each
	// report (nil: not watched).
	space *queueSpaceNow
	// retroactive: blocks ask for a retroactive hold (queue.requests),
	// so a block report announces the "held" follow-up.
	retroactive bool
}

func (n reportNotifier) Notify(ctx context.Context, ev detector.Event) error {
	n.log.Warn("rcptguard report", slog.String("event", string(ev.Kind)), slog.String("identity", ev.Identity),
		slog.Int("count", ev.Count), slog.Int("limit", ev.Limit), slog.String("period", textfmt.FormatPeriod(ev.Period)),
		slog.String("mode", string(ev.Mode)), slog.Int("recipients", len(ev.Evidence.Recipients)),
		slog.Any("queue_ids", ev.Evidence.QueueIDs), slog.Bool("mailed", n.mailer != nil))
	if n.mailer == nil {
		return nil
	}
	r := reportOf(ev)
	r.QueueSpace = n.space.get()
	r.RetroactiveHold = n.retroactive && r.Kind == notify.KindBlock
	return n.mailer.Enqueue(ctx, r)
}

// reportOf turns a detector event into the notify package's report.
func reportOf(ev detector.Event) notify.Report {
	host, _ := os.Hostname()
	r := notify.Report{
		Kind:     notify.Kind(ev.Kind),
		Identity: ev.Identity,
		Time:     ev.Time.Local(),
		Mode:     string(ev.Mode),
		Count:    ev.Count,
		Limit:    ev.Limit,
		Period:   ev.Period,
		Action:   ev.Action,
		QueueIDs: ev.Evidence.QueueIDs,
		Hostname: host,
	}
	for _, c := range ev.Evidence.Clients {
		r.Clients = append(r.Clients, notify.Client{Address: c.Address, Name: c.Name, Count: c.Count})
	}
	// The evidence keeps the oldest first; the report shows the newest first.
	for i := len(ev.Evidence.Recipients) - 1; i >= 0; i-- {
		x := ev.Evidence.Recipients[i]
		r.Recipients = append(r.Recipients, notify.Recipient{Address: x.Address, Time: x.Time.Local(), Reason: x.Reason, MX: x.MX, Reply: x.Reply})
	}
	return r
}

// cmdNotifyTest sends a sample report to notify.to through notify.relay
// at once, so an administrator can check the whole path.
func cmdNotifyTest(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, config := newFlags("notify-test", "notify-test [-config FILE]", stderr)
	cfg, err := parseNoArgs(fs, config, args)
	if err != nil {
		return err
	}
	if len(cfg.Notify.To) == 0 {
		return usageErrorf("notify.to is empty: there is nobody to send the sample report to")
	}
	m, err := newMailer(cfg, slog.New(slog.NewTextHandler(stderr, nil)), false)
	if err != nil {
		return err
	}
	host, _ := os.Hostname()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := m.SendNow(ctx, notify.SampleReport(time.Now(), host)); err != nil {
		return fmt.Errorf("notify-test: %w", err)
	}
	fmt.Fprintf(stdout, "sample report sent to %s via %s\n", strings.Join(cfg.Notify.To, ", "), cfg.Notify.Relay)
	return nil
}
