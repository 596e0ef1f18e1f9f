package app

import (
	"context"
	"fmt"
	"io"
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rcptguard/rcptguard/callout"
)

// cmdVerify verifies each address on the command line with the configured
// callout settings and prints one verdict line each:
//
//	ADDRESS VERDICT REASON [mx=HOST] [reply="CODE ENHANCED TEXT"] [detail="..."]
//
// With -v the SMTP dialogue of every probe goes to standard error, as it
// was sent ("HOST C: ...") and received ("HOST S: ..."), with failures in
// words ("HOST *: no greeting within 10s"). Every session ends with QUIT
// before the command exits. The exit status is 0 whatever the verdicts; 2
// for a usage or configuration error; 130 on Ctrl-C, which prints no
// verdict for the addresses not verified.
func cmdVerify(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, config := newFlags("verify", "verify [-config FILE] [-v] ADDR...", stderr)
	verbose := fs.Bool("v", false, "print the SMTP dialogue of each probe on standard error")
	cfg, err := parseFlags(fs, config, args)
	if err != nil {
		return err
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return usageErrorf("verify needs at least one address")
	}
	var transcript io.Writer
	logger := slog.New(slog.DiscardHandler)
	if *verbose {
		// The dialogue only: debug log lines would be a second format.
		transcript = stderr
	}
	v, err := newVerifier(cfg, logger, transcript, nil)
	if err != nil {
		return err
	}
	for _, addr := range fs.Args() {
		res := v.Verify(ctx, addr)
		if ctx.Err() != nil {
			// Interrupted: this verdict and the ones after it are not
			// verdicts, so they are not printed.
			break
		}
		fmt.Fprintln(stdout, res.String())
	}
	// Close waits for every session to say QUIT (2s at most each).
	_ = v.Close()
	return ctx.Err()
}

// newVerifier builds the callout verifier the configuration describes.
func newVerifier(cfg *Config, logger *slog.Logger, transcript io.Writer, shared fleetCallout) (*callout.Verifier, error) {
	co := cfg.Callout
	var servers []string
	if co.Resolver != "" {
		servers = []string{co.Resolver}
	}
	res, err := callout.NewResolver(callout.ResolverConfig{Servers: servers})
	if err != nil {
		return nil, fmt.Errorf("callout.resolver: %w", err)
	}
	return callout.New(calloutConfig(cfg, res, logger, transcript, shared))
}

// calloutConfig maps the [callout] section, the same values meaning the
// same in both.
func calloutConfig(cfg *Config, res callout.MXResolver, logger *slog.Logger, transcript io.Writer, shared fleetCallout) callout.Config {
	co := cfg.Callout
	return callout.Config{
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
		CatchAllProbe:    co.CatchAllProbe,
		PerHost:          co.PerHost,
		SingleRcptMX:     co.SingleRcptMX,
		AcceptAllDomains: co.AcceptAllDomains,
		AcceptAllMX:      co.AcceptAllMX,
		NoTLS:            !co.STARTTLS,
		SessionIdle:      co.SessionIdle.D(), // 0: no waiting, as in the file
		PerDomainRate:    co.PerDomainRate,
		PerHostRate:      co.PerHostRate,
		// Caps on what reaches one domain or MX address, and on new
		// sessions in all (issue 11).
		PerDomainRcptRate: co.PerDomainRcptRate,
		PerHostRcptRate:   co.PerHostRcptRate,
		SessionRate:       co.SessionRate,
		Logger:            logger,
		Transcript:        transcript,
		Shared:            shared, // [cluster]: the fleet's verdicts, facts and caps
		SharedFacts:       shared,
		SharedCaps:        shared,
		SharedTimeout:     cfg.Cluster.Timeout.D(),
	}
}

// registerCalloutMetrics exports the verifier's counts: probe sessions
// opened, verdicts a cap turned "unknown rate-limited", random-name probes.
func registerCalloutMetrics(reg prometheus.Registerer, v *callout.Verifier) {
	for _, c := range []struct {
		name, help string
		get        func(callout.Stats) uint64
	}{
		{"rcptguard_callout_sessions_total", "SMTP probe sessions opened to MX hosts.", func(s callout.Stats) uint64 { return s.Sessions }},
		{"rcptguard_callout_rate_limited_total", "Verdicts unknown rate-limited: a cap on sessions or RCPTs to a domain or MX address held the probe back.", func(s callout.Stats) uint64 { return s.RateLimited }},
		{"rcptguard_callout_catchall_probes_total", "RCPTs sent for a random local part (catch-all checks).", func(s callout.Stats) uint64 { return s.CatchAllProbes }},
	} {
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: c.name, Help: c.help},
			func() float64 { return float64(c.get(v.Stats())) }))
	}
}
