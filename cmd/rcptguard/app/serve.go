package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/rcptguard/rcptguard/blocklist"
	"github.com/rcptguard/rcptguard/callout"
	"github.com/rcptguard/rcptguard/cmd/rcptguard/cluster"
	"github.com/rcptguard/rcptguard/cmd/rcptguard/queue"
	"github.com/rcptguard/rcptguard/detector"
	"github.com/rcptguard/rcptguard/notify"
)

// Hooks let an embedding program (the end-to-end tests) observe a running
// service. The zero value does nothing.
type Hooks struct {
	// Ready is called once every listener is bound, with the policy
	// listeners' addresses ("127.0.0.1:40123" or "unix:/path") and the
	// metrics listener's address ("" when off).
	Ready func(policy []string, metrics string)
	// Detector, when set, is called with the running detector.
	Detector func(*detector.Detector)
}

// cmdServe runs the policy service until SIGINT or SIGTERM.
func cmdServe(ctx context.Context, args []string, stderr io.Writer) error {
	fs, config := newFlags("serve", "serve [-config FILE]", stderr)
	cfg, err := parseFlags(fs, config, args)
	if err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageErrorf("serve takes no arguments")
	}
	return Serve(ctx, cfg, stderr, Hooks{})
}

// newLogger makes the process logger the [log] section asks for.
func newLogger(c LogConfig, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(c.Level))
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// Serve runs the policy service with cfg until ctx ends, then shuts down
// gracefully: listeners close, requests in flight are answered, background
// verifications end, the blocklist is flushed.
func Serve(ctx context.Context, cfg *Config, logOut io.Writer, hooks Hooks) error {
	logBuf := newLogBuffer(logOut)
	defer logBuf.Flush()
	log := slog.New(flushingHandler{Handler: newLogger(cfg.Log, logBuf).Handler(), buf: logBuf})
	if err := ensureDir(filepath.Dir(cfg.Blocklist.Path), "blocklist.path"); err != nil {
		return err
	}
	// Found now rather than at the first block, which would then live
	// in memory only and be lost at shutdown.
	if err := blocklist.CheckWritable(cfg.Blocklist.Path); err != nil {
		return fmt.Errorf("blocklist.path: %w", err)
	}

	// The detector is made after the blocklist, whose change callback
	// needs it: an unblocked identity starts afresh.
	var det *detector.Detector
	var reportsTo *notify.Mailer // nil until made, and without mail
	var detMu sync.Mutex
	var fleet atomic.Pointer[cluster.Sync] // [cluster]: the blocklist's syncer
	times := newBlockTimes()               // for rcptguard status
	bl, problems, err := blocklist.Open(blocklist.Config{
		Path:   cfg.Blocklist.Path,
		Create: true, // Postfix's check_sasl_access fails on a missing table
		Logger: log.With("component", "blocklist"),
		OnChange: func(added, removed []string) {
			detMu.Lock()
			d, m := det, reportsTo
			detMu.Unlock()
			times.note(added...)
			times.forget(removed...)
			for _, id := range added {
				log.Info("blocklist entry added outside the daemon", slog.String("identity", id))
			}
			if m != nil && len(added) > 0 {
				// Not the daemon's blocks: no start-up reports them.
				if err := m.NoteReported(added...); err != nil {
					log.Warn("spool ledger not updated", slog.Any("error", err))
				}
			}
			for _, id := range removed {
				log.Info("rcptguard unblocked", slog.String("identity", id))
				forgetBlock(m, id, log)
				if d != nil {
					d.Limiter().Forget(id)
				}
			}
			if s := fleet.Load(); s != nil {
				s.LocalChange(added, removed)
			}
		},
	})
	if err != nil {
		return fmt.Errorf("blocklist.path: %w", err)
	}
	if len(problems) > 0 {
		log.Warn("blocklist has malformed lines; they are skipped", slog.String("path", cfg.Blocklist.Path), slog.Int("count", len(problems)))
	}

	limits, err := detector.LoadLimits(cfg.Detector.LimitsFile)
	if err != nil {
		return fmt.Errorf("detector.limits_file: %w", err)
	}
	cl, err := openCluster(cfg, log, nil)
	if err != nil {
		return err
	}
	var shared callout.SharedCache
	if cl != nil {
		defer func() { _ = cl.Close() }()
		shared = cl
	}
	verifier, err := newVerifier(cfg, log.With("component", "callout"), nil, shared)
	if err != nil {
		return err
	}
	defer verifier.Close()

	mailer, err := newMailer(cfg, log.With("component", "notify"), true)
	if err != nil {
		return err
	}
	if mailer != nil && len(cfg.Notify.To) > 0 {
		reconcileReports(ctx, bl, mailer, log)
	}
	detMu.Lock()
	reportsTo = mailer
	detMu.Unlock()

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics := detector.NewMetrics(reg)
	registerCalloutMetrics(reg, verifier)
	health := durability{bl: bl, mailer: mailer}
	health.register(reg)

	dcfg := detectorConfig(cfg, limits)
	dcfg.Verifier = verifier
	if dcfg.Blocklist, err = withBlockHooks(cfg, bl, log); err != nil {
		return err
	}
	space := &queueSpaceNow{}
	reports := reportNotifier{log: log, mailer: mailer, space: space, retroactive: cfg.Queue.Requests != ""}
	dcfg.Notifier = reports
	dcfg.Logger = log
	dcfg.Metrics = metrics
	if cl != nil {
		if err := cl.Register(reg); err != nil {
			return err
		}
		dcfg.Shared = cl
		fleet.Store(cl.NewSync(bl, cfg.Blocklist.Path, func(id string) {
			detMu.Lock()
			defer detMu.Unlock()
			if det != nil {
				det.Limiter().Forget(id)
			}
		}, 0))
		fleet.Load().OnLearned(func(id string) {
			// The server that made the block reports it.
			detMu.Lock()
			m := reportsTo
			detMu.Unlock()
			if m != nil {
				if err := m.NoteReported(id); err != nil {
					log.Warn("spool ledger not updated", slog.Any("error", err))
				}
			}
		})
		dcfg.Blocklist = fleet.Load().Blocklist(dcfg.Blocklist)
	}
	dcfg.Blocklist = timedBlocklist{Blocklist: dcfg.Blocklist, times: times}
	d, err := detector.New(dcfg)
	if err != nil {
		return err
	}
	detMu.Lock()
	det = d
	detMu.Unlock()
	defer d.Close(0)
	if hooks.Detector != nil {
		hooks.Detector(d)
	}

	peers, err := resolvePolicyPeers(&cfg.Policy, systemUser, postfixMailOwner(ctx))
	if err != nil {
		return configFileError(cfg.Path, err)
	}
	if peers.note != "" {
		log.Warn(peers.note)
	}
	log.Info("policy service access", slog.Any("allow_uids", peers.uids), slog.Int("own_uid", os.Geteuid()),
		slog.Any("allow_networks", cfg.Policy.AllowNetworks))
	srv, err := detector.NewServer(detector.ServerConfig{
		Handler:         newHoldGuard(cfg, d, log, reg),
		Logger:          log.With("component", "policy"),
		IdleTimeout:     cfg.Policy.IdleTimeout.D(),
		RequestTimeout:  cfg.Policy.RequestTimeout.D(),
		MaxConns:        cfg.Policy.MaxConnections,
		MaxConnsPerPeer: cfg.Policy.MaxConnectionsPerPeer,
		AllowUIDs:       peers.uids,
		UncappedUIDs:    peers.uncapped,
		AllowNetworks:   peers.networks,
		Metrics:         metrics,
	})
	if err != nil {
		return err
	}
	mode, _ := strconv.ParseUint(cfg.Policy.SocketMode, 8, 32)
	var listeners []net.Listener
	closeAll := func() {
		for _, ln := range listeners {
			_ = ln.Close()
		}
	}
	var addrs []string
	lc := detector.ListenConfig{SocketMode: os.FileMode(mode), SocketGroup: cfg.Policy.SocketGroup}
	for _, addr := range cfg.Policy.Listen {
		ln, err := lc.Listen(addr)
		if err != nil {
			closeAll()
			return fmt.Errorf("policy.listen: %w", err)
		}
		listeners = append(listeners, ln)
		if ln.Addr().Network() == "unix" {
			addrs = append(addrs, "unix:"+ln.Addr().String())
		} else {
			addrs = append(addrs, ln.Addr().String())
		}
	}

	var metricsSrv *http.Server
	metricsAddr := ""
	if cfg.Metrics.Listen != "" {
		ln, err := net.Listen("tcp", cfg.Metrics.Listen)
		if err != nil {
			closeAll()
			return fmt.Errorf("metrics.listen: %w", err)
		}
		metricsAddr = ln.Addr().String()
		mux := http.NewServeMux()
		mux.Handle("/metrics", freshGauges(promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}), metrics, d.Limiter().Len, bl.Len))
		mux.Handle("/healthz", health)
		metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = metricsSrv.Serve(ln) }()
	}

	log.Info("rcptguard serving", slog.String("version", versionString()), slog.Any("policy", addrs),
		slog.String("metrics", metricsAddr), slog.String("mode", cfg.Detector.Mode), slog.Int("limit", cfg.Detector.Limit),
		slog.String("period", detector.FormatPeriod(cfg.Detector.Period.D())), slog.String("blocklist", cfg.Blocklist.Path),
		slog.Int("blocked", bl.Len()), slog.String("config", cfg.Path))
	// SIGHUP is taken before anyone is told we are ready: a reload
	// signal must never find the process without its handler.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	if hooks.Ready != nil {
		hooks.Ready(addrs, metricsAddr)
	}

	// A policy listener that fails for another reason than shutdown ends
	// the service (and systemd restarts it): running on without it would
	// leave Postfix silently unchecked.
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	var wg sync.WaitGroup
	serveErrs := make(chan error, len(listeners))
	for _, ln := range listeners {
		wg.Go(func() {
			if err := srv.Serve(ctx, ln); err != nil {
				log.Error("policy listener failed; stopping", slog.String("listen", ln.Addr().String()), slog.Any("error", err))
				serveErrs <- fmt.Errorf("policy %s: %w", ln.Addr(), err)
				stop()
			}
		})
	}
	wg.Go(func() { logBuf.run(ctx) })
	wg.Go(func() { _ = bl.Watch(ctx, time.Second) })
	if s := fleet.Load(); s != nil {
		wg.Go(func() { s.Run(ctx) })
		wg.Go(func() { cl.Run(ctx) })
	}
	// The mailer outlives the policy listeners and the background
	// verifications: reports of the last blocks are spooled and tried
	// before it stops; whatever is left stays in the spool for the next
	// start.
	mailCtx, stopMail := context.WithCancel(context.Background())
	defer stopMail()
	mailDone := make(chan struct{})
	if mailer != nil {
		go func() { defer close(mailDone); _ = mailer.Run(mailCtx) }()
	} else {
		close(mailDone)
	}
	wg.Go(func() { housekeeping(ctx, d, bl, metrics) })
	if ln, err := listenStatus(statusSocket(cfg)); err != nil {
		log.Warn("status socket not available; rcptguard status shows the blocklist alone", slog.Any("error", err))
	} else {
		wg.Go(func() {
			serveStatus(ctx, ln, func() statusReport { return statusOf(d, bl, times, cfg.Detector.Period.D(), 100) }, log)
		})
	}
	if dir, err := queue.Directory(ctx, cfg.Queue.PostfixConfig); err != nil {
		log.Warn("queue disk space not watched", slog.Any("error", err))
	} else {
		wg.Go(func() { watchQueueSpace(ctx, dir, 30*time.Second, queue.FreeSpace, reg, log, space) })
	}
	if cfg.Queue.Requests != "" {
		wg.Go(func() { watchHoldResults(ctx, queue.ResultsDir(cfg.Queue.Requests), 2*time.Second, reports) })
	}
	if cfg.Detector.UnblockAfter > 0 {
		forget := func(id string) { forgetBlock(mailer, id, log); d.Limiter().Forget(id) }
		if s := fleet.Load(); s != nil {
			forget = func(id string) { forgetBlock(mailer, id, log); d.Limiter().Forget(id); s.Unblocked(id, time.Now()) }
		}
		wg.Go(func() { autoUnblock(ctx, bl, 30*time.Second, time.Now, forget, log) })
	}
	wg.Go(func() { (&reloader{running: cfg, apply: applyReload(d, srv), log: log}).run(ctx, hup) })

	<-ctx.Done()
	log.Info("rcptguard shutting down")
	wg.Wait()
	if metricsSrv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = metricsSrv.Shutdown(sctx)
		cancel()
	}
	// Verifications still running in the background may end in a block:
	// let them, within the callout timeout.
	d.Close(cfg.Callout.Timeout.D() + time.Second)
	stopMail()
	<-mailDone
	fctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var errs []error
	close(serveErrs)
	for err := range serveErrs {
		errs = append(errs, err)
	}
	if bl.Pending() > 0 {
		if err := bl.Flush(fctx); err != nil {
			errs = append(errs, fmt.Errorf("blocklist: %d entries could not be written: %w", bl.Pending(), err))
		}
	}
	return errors.Join(errs...)
}

// detectorConfig maps the [detector] section; the caller adds the parts.
func detectorConfig(cfg *Config, limits map[string]int) detector.Config {
	dc := cfg.Detector
	relays := make([]netip.Prefix, 0, len(dc.RelayNetworks))
	for _, n := range dc.RelayNetworks {
		p, _ := parseNetwork(n) // validated with the configuration
		relays = append(relays, p)
	}
	return detector.Config{
		Limit:         dc.Limit,
		Period:        dc.Period.D(),
		WarnAt:        dc.WarnAt,
		Action:        dc.Action,
		Mode:          detector.Mode(dc.Mode),
		Wait:          dc.Wait.D(),
		Ratio:         dc.Ratio,
		RatioMin:      dc.RatioMin,
		LongPeriod:    dc.LongPeriod.D(),
		LongLimit:     dc.LongLimit,
		RelayNetworks: relays,
		LocalDomains:  dc.LocalDomains,
		Exempt:        dc.Exempt,
		Limits:        limits,
		ProbeRate:     cfg.Callout.PerIdentityRate,
		MaxIdentities: dc.MaxIdentities,
	}
}

// housekeeping drops idle identities and refreshes the gauges.
func housekeeping(ctx context.Context, d *detector.Detector, bl *blocklist.File, m *detector.Metrics) {
	t := time.NewTicker(30 * time.Second)
	defer t.Stop()
	for {
		m.Tracked.Set(float64(d.Limiter().Sweep(time.Now())))
		m.Blocked.Set(float64(bl.Len()))
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// configFileError prefixes each line of err with the configuration file.
func configFileError(path string, err error) error {
	if path == "" {
		return err
	}
	var errs []error
	for _, line := range strings.Split(err.Error(), "\n") {
		errs = append(errs, errors.New(line))
	}
	return joinConfigErrors(path, errs)
}
