package app

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/rcptguard/rcptguard/callout"
)

// cmdVerify verifies each address on the command line with the configured
// callout settings and prints one verdict line each:
//
//	ADDRESS VERDICT REASON [mx=HOST] [reply="CODE ENHANCED TEXT"] [detail="..."]
//
// With -v the SMTP dialogue of every probe goes to standard error. The
// exit status is 0 whatever the verdicts; 2 for a usage or configuration
// error.
func cmdVerify(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, config := newFlags("verify", "verify [-config FILE] [-v] ADDR...", stderr)
	verbose := fs.Bool("v", false, "print the SMTP transcript of each probe on standard error")
	cfg, err := parseFlags(fs, config, args)
	if err != nil {
		return err
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return fmt.Errorf("%w: verify needs at least one address", errUsage)
	}
	var transcript io.Writer
	logger := slog.New(slog.DiscardHandler)
	if *verbose {
		transcript = stderr
		logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	v, err := newVerifier(cfg, logger, transcript)
	if err != nil {
		return err
	}
	defer v.Close()
	for _, addr := range fs.Args() {
		res := v.Verify(ctx, addr)
		fmt.Fprintln(stdout, res.String())
	}
	return ctx.Err()
}

// newVerifier builds the callout verifier the configuration describes.
func newVerifier(cfg *Config, logger *slog.Logger, transcript io.Writer) (*callout.Verifier, error) {
	co := cfg.Callout
	var servers []string
	if co.Resolver != "" {
		servers = []string{co.Resolver}
	}
	res, err := callout.NewResolver(callout.ResolverConfig{Servers: servers})
	if err != nil {
		return nil, fmt.Errorf("callout.resolver: %w", err)
	}
	return callout.New(callout.Config{
		Resolver:         res,
		Port:             co.Port,
		Timeout:          co.Timeout.D(),
		Helo:             co.Helo,
		MailFrom:         co.MailFrom,
		PositiveTTL:      co.PositiveTTL.D(),
		NegativeTTL:      co.NegativeTTL.D(),
		UnknownTTL:       co.UnknownTTL.D(),
		CacheSize:        co.CacheSize,
		AllowPrivate:     co.AllowPrivate,
		CatchAllProbe:    co.CatchallProbe,
		PerHost:          co.PerHost,
		SingleRcptMX:     co.SingleRcptMX,
		AcceptAllDomains: co.AcceptAllDomains,
		AcceptAllMX:      co.AcceptAllMX,
		NoTLS:            !co.STARTTLS,
		SessionIdle:      sessionIdle(co.SessionIdle.D()),
		PerDomainRate:    co.PerDomainRate,
		PerHostRate:      co.PerHostRate,
		Logger:           logger,
		Transcript:       transcript,
	})
}

// sessionIdle maps the config's 0 ("do not keep sessions open") to the
// callout package's negative value; its 0 means the default.
func sessionIdle(d time.Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return d
}
