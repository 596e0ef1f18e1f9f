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
	"github.com/rcptguard/rcptguard/callout/textfmt"
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
	cfg, err := parseNoArgs(fs, config, args)
	if err != nil {
		return err
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
// verifications end, the blocklist is flushed. The steps, in order: the
// state files, the parts (verifier, mailer, metrics, detector), the
// listeners, the goroutines, the shutdown.
func Serve(ctx context.Context, cfg *Config, logOut io.Writer, hooks Hooks) error {
	logBuf := newLogBuffer(logOut)
	defer logBuf.Flush()
	s := &service{cfg: cfg, hooks: hooks, logBuf: logBuf, times: newBlockTimes(),
		log: slog.New(flushingHandler{Handler: newLogger(cfg.Log, logBuf).Handler(), buf: logBuf})}
	defer s.close()
	if err := s.openState(); err != nil {
		return err
	}
	if err := s.buildParts(ctx); err != nil {
		return err
	}
	if err := s.buildDetector(); err != nil {
		return err
	}
	if err := s.listen(ctx); err != nil {
		return err
	}
	return s.run(ctx)
}

// service is the running policy service: its parts, made by Serve's
// steps in order, and what the blocklist's change callback needs.
type service struct {
	cfg    *Config
	hooks  Hooks
	log    *slog.Logger
	logBuf *logBuffer
	times  *blockTimes // for rcptguard status
	// closers run at the end, last made first closed.
	closers []func()

	// The blocklist is made before the detector and the mailer, which
	// its change callback needs: mu guards them until they are set.
	mu        sync.Mutex
	det       *detector.Detector
	reportsTo *notify.Mailer               // nil until made, and without mail
	fleet     atomic.Pointer[cluster.Sync] // [cluster]: the blocklist's syncer

	bl       *blocklist.File
	cl       *cluster.Cluster // nil: single host
	verifier *callout.Verifier
	mailer   *notify.Mailer // nil: no report mail
	reg      *prometheus.Registry
	metrics  *detector.Metrics
	health   durability
	space    *queueSpaceNow
	reports  reportNotifier
	holds    *holdRequester // nil: no retroactive hold
	d        *detector.Detector
	srv      *detector.Server

	listeners   []net.Listener
	addrs       []string
	metricsSrv  *http.Server
	metricsAddr string
}

// close runs the closers, last first.
func (s *service) close() {
	for i := len(s.closers) - 1; i >= 0; i-- {
		s.closers[i]()
	}
}

// openState checks the state directory and opens the blocklist.
func (s *service) openState() error {
	cfg, log := s.cfg, s.log
	if err := ensureDir(filepath.Dir(cfg.Blocklist.Path), "blocklist.path"); err != nil {
		return err
	}
	// Found now rather than at the first block, which would then live
	// in memory only and be lost at shutdown.
	if err := blocklist.CheckWritable(cfg.Blocklist.Path); err != nil {
		return fmt.Errorf("blocklist.path: %w", err)
	}
	bl, problems, err := blocklist.Open(blocklist.Config{
		Path:     cfg.Blocklist.Path,
		Create:   true, // Postfix's check_sasl_access fails on a missing table
		Logger:   log.With("component", "blocklist"),
		OnChange: s.blocklistChanged,
		// An identity unblocked outside the daemon is judged again on
		// fresh counts: they go while its entry still holds.
		BeforeRemove: s.forgetCounts,
	})
	if err != nil {
		return fmt.Errorf("blocklist.path: %w", err)
	}
	if len(problems) > 0 {
		log.Warn("blocklist has malformed lines; they are skipped", slog.String("path", cfg.Blocklist.Path), slog.Int("count", len(problems)))
	}
	s.bl = bl
	return nil
}

// forgetCounts drops the counts of identities about to be unblocked (an
// outside edit, through blocklist.Config.BeforeRemove, or an expiry), so
// that their next requests are judged afresh, never on the counts that
// blocked them: the local ones at once, the fleet's at the next count
// unless the unblock's push reset them before. It takes the limiter's
// locks only, never the blocklist's, and never waits for Redis.
func (s *service) forgetCounts(ids []string) {
	s.mu.Lock()
	d := s.det
	s.mu.Unlock()
	for _, id := range ids {
		if s.cl != nil {
			s.cl.ForgetCounts(id)
		}
		if d != nil {
			d.Limiter().Forget(id)
		}
	}
}

// blocklistChanged is told of the entries added and removed outside the
// daemon (by hand, by rcptguard block and unblock).
func (s *service) blocklistChanged(added, removed []string) {
	log := s.log
	s.mu.Lock()
	m := s.reportsTo
	s.mu.Unlock()
	s.times.note(added...)
	s.times.forget(removed...)
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
		forgetBlock(m, id, log) // its counts went before (forgetCounts)
	}
	if f := s.fleet.Load(); f != nil {
		f.LocalChange(added, removed)
	}
}

// buildParts makes the cluster link, the verifier, the mailer and the
// metrics registry.
func (s *service) buildParts(ctx context.Context) error {
	cfg, log := s.cfg, s.log
	cl, err := openCluster(cfg, log, nil)
	if err != nil {
		return err
	}
	var shared fleetCallout
	if cl != nil {
		s.closers = append(s.closers, func() { _ = cl.Close() })
		s.cl, shared = cl, cl
	}
	if s.verifier, err = newVerifier(cfg, log.With("component", "callout"), nil, shared); err != nil {
		return err
	}
	s.closers = append(s.closers, func() { _ = s.verifier.Close() })

	if s.mailer, err = newMailer(cfg, log.With("component", "notify"), true); err != nil {
		return err
	}
	if s.mailer != nil && len(cfg.Notify.To) > 0 {
		reconcileReports(ctx, s.bl, s.mailer, log)
	}
	s.mu.Lock()
	s.reportsTo = s.mailer
	s.mu.Unlock()

	s.reg = prometheus.NewRegistry()
	s.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	s.metrics = detector.NewMetrics(s.reg)
	registerCalloutMetrics(s.reg, s.verifier)
	s.health = durability{bl: s.bl, mailer: s.mailer}
	s.health.register(s.reg)
	return nil
}

// buildDetector makes the detector with its blocklist, notifier and, in a
// cluster, the fleet's blocklist syncer.
func (s *service) buildDetector() error {
	cfg, log := s.cfg, s.log
	limits, err := detector.LoadLimits(cfg.Detector.LimitsFile)
	if err != nil {
		return fmt.Errorf("detector.limits_file: %w", err)
	}
	dcfg := detectorConfig(cfg, limits)
	dcfg.Verifier = s.verifier
	if dcfg.Blocklist, s.holds, err = withBlockHooks(cfg, s.bl, log); err != nil {
		return err
	}
	s.space = &queueSpaceNow{}
	s.reports = reportNotifier{log: log, mailer: s.mailer, space: s.space, retroactive: cfg.Queue.Requests != ""}
	dcfg.Notifier = s.reports
	dcfg.Logger = log
	dcfg.Metrics = s.metrics
	if s.cl != nil {
		if err := s.cl.Register(s.reg); err != nil {
			return err
		}
		if err := s.holds.register(s.reg); err != nil {
			return err
		}
		dcfg.Shared = s.cl
		dcfg.SharedTimeout = s.cfg.Cluster.Timeout.D()
		dcfg.Blocklist = s.joinFleet(dcfg.Blocklist)
	}
	dcfg.Blocklist = timedBlocklist{Blocklist: dcfg.Blocklist, times: s.times}
	d, err := detector.New(dcfg)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.det = d
	s.mu.Unlock()
	s.d = d
	s.closers = append(s.closers, func() { d.Close(0) })
	if s.hooks.Detector != nil {
		s.hooks.Detector(d)
	}
	return nil
}

// joinFleet makes the [cluster] blocklist syncer and returns b as the
// fleet's blocklist.
func (s *service) joinFleet(b detector.Blocklist) detector.Blocklist {
	s.fleet.Store(s.cl.NewSync(s.bl, s.cfg.Blocklist.Path, func(id string) {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.det != nil {
			s.det.Limiter().Forget(id)
		}
	}, 0))
	s.fleet.Load().OnLearned(func(id string) {
		// The server that made the block reports it.
		s.mu.Lock()
		m := s.reportsTo
		s.mu.Unlock()
		if m != nil {
			if err := m.NoteReported(id); err != nil {
				s.log.Warn("spool ledger not updated", slog.Any("error", err))
			}
		}
		s.holds.learnedBlock(id) // its mail queued here is held too
	})
	return s.fleet.Load().Blocklist(b)
}

// listen makes the policy server and binds the policy and metrics
// listeners.
func (s *service) listen(ctx context.Context) error {
	cfg, log := s.cfg, s.log
	peers, err := resolvePolicyPeers(&cfg.Policy, systemUser, postfixMailOwner(ctx))
	if err != nil {
		return configFileError(cfg.Path, err)
	}
	if peers.note != "" {
		log.Warn(peers.note)
	}
	log.Info("policy service access", slog.Any("allow_uids", peers.uids), slog.Int("own_uid", os.Geteuid()),
		slog.Any("allow_networks", cfg.Policy.AllowNetworks))
	s.srv, err = detector.NewServer(detector.ServerConfig{
		Handler:         newHoldGuard(cfg, s.d, log, s.reg),
		Logger:          log.With("component", "policy"),
		IdleTimeout:     cfg.Policy.IdleTimeout.D(),
		RequestTimeout:  cfg.Policy.RequestTimeout.D(),
		MaxConns:        cfg.Policy.MaxConnections,
		MaxConnsPerPeer: cfg.Policy.MaxConnectionsPerPeer,
		AllowUIDs:       peers.uids,
		UncappedUIDs:    peers.uncapped,
		AllowNetworks:   peers.networks,
		Metrics:         s.metrics,
	})
	if err != nil {
		return err
	}
	s.closers = append(s.closers, func() {
		for _, ln := range s.listeners {
			_ = ln.Close()
		}
	})
	mode, _ := strconv.ParseUint(cfg.Policy.SocketMode, 8, 32)
	lc := detector.ListenConfig{SocketMode: os.FileMode(mode), SocketGroup: cfg.Policy.SocketGroup}
	for _, addr := range cfg.Policy.Listen {
		ln, err := lc.Listen(addr)
		if err != nil {
			return fmt.Errorf("policy.listen: %w", err)
		}
		s.listeners = append(s.listeners, ln)
		if ln.Addr().Network() == "unix" {
			s.addrs = append(s.addrs, "unix:"+ln.Addr().String())
		} else {
			s.addrs = append(s.addrs, ln.Addr().String())
		}
	}
	return s.listenMetrics()
}

// listenMetrics binds metrics.listen, when set, for /metrics and /healthz.
func (s *service) listenMetrics() error {
	if s.cfg.Metrics.Listen == "" {
		return nil
	}
	ln, err := net.Listen("tcp", s.cfg.Metrics.Listen)
	if err != nil {
		return fmt.Errorf("metrics.listen: %w", err)
	}
	s.metricsAddr = ln.Addr().String()
	mux := http.NewServeMux()
	mux.Handle("/metrics", freshGauges(promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{Registry: s.reg}), s.metrics, s.d.Limiter().Len, s.bl.Len))
	mux.Handle("/healthz", s.health)
	s.metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = s.metricsSrv.Serve(ln) }()
	return nil
}

// run serves until ctx ends or a policy listener fails, then shuts down.
func (s *service) run(ctx context.Context) error {
	cfg, log := s.cfg, s.log
	log.Info("rcptguard serving", slog.String("version", versionString()), slog.Any("policy", s.addrs),
		slog.String("metrics", s.metricsAddr), slog.String("mode", cfg.Detector.Mode), slog.Int("limit", cfg.Detector.Limit),
		slog.String("period", textfmt.FormatPeriod(cfg.Detector.Period.D())), slog.String("blocklist", cfg.Blocklist.Path),
		slog.Int("blocked", s.bl.Len()), slog.String("config", cfg.Path))
	// SIGHUP is taken before anyone is told we are ready: a reload
	// signal must never find the process without its handler.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	if s.hooks.Ready != nil {
		s.hooks.Ready(s.addrs, s.metricsAddr)
	}

	// A policy listener that fails for another reason than shutdown ends
	// the service (and systemd restarts it): running on without it would
	// leave Postfix silently unchecked.
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	var wg sync.WaitGroup
	serveErrs := make(chan error, len(s.listeners))
	for _, ln := range s.listeners {
		wg.Go(func() {
			if err := s.srv.Serve(ctx, ln); err != nil {
				log.Error("policy listener failed; stopping", slog.String("listen", ln.Addr().String()), slog.Any("error", err))
				serveErrs <- fmt.Errorf("policy %s: %w", ln.Addr(), err)
				stop()
			}
		})
	}
	// The mailer outlives the policy listeners and the background
	// verifications: reports of the last blocks are spooled and tried
	// before it stops; whatever is left stays in the spool for the next
	// start.
	mailCtx, stopMail := context.WithCancel(context.Background())
	defer stopMail()
	mailDone := make(chan struct{})
	if s.mailer != nil {
		go func() { defer close(mailDone); _ = s.mailer.Run(mailCtx) }()
	} else {
		close(mailDone)
	}
	s.background(ctx, &wg, hup)

	<-ctx.Done()
	log.Info("rcptguard shutting down")
	wg.Wait()
	return s.shutdown(serveErrs, stopMail, mailDone)
}

// background starts the service's goroutines, each ending with ctx.
func (s *service) background(ctx context.Context, wg *sync.WaitGroup, hup <-chan os.Signal) {
	cfg, log, d, bl := s.cfg, s.log, s.d, s.bl
	wg.Go(func() { s.logBuf.run(ctx) })
	wg.Go(func() { _ = bl.Watch(ctx, time.Second) })
	if f := s.fleet.Load(); f != nil {
		wg.Go(func() { f.Run(ctx) })
		wg.Go(func() { s.cl.Run(ctx) })
	}
	wg.Go(func() { housekeeping(ctx, d, bl, s.metrics) })
	if ln, err := listenStatus(statusSocket(cfg)); err != nil {
		log.Warn("status socket not available; rcptguard status shows the blocklist alone", slog.Any("error", err))
	} else {
		wg.Go(func() {
			serveStatus(ctx, ln, func() statusReport { return statusOf(d, bl, s.times, cfg.Detector.Period.D(), 100) }, log)
		})
	}
	if dir, err := queue.Directory(ctx, cfg.Queue.PostfixConfig); err != nil {
		log.Warn("queue disk space not watched", slog.Any("error", err))
	} else {
		wg.Go(func() { watchQueueSpace(ctx, dir, 30*time.Second, queue.FreeSpace, s.reg, log, s.space) })
	}
	if cfg.Queue.Requests != "" {
		wg.Go(func() { watchHoldResults(ctx, queue.ResultsDir(cfg.Queue.Requests), 2*time.Second, s.reports, s.holds) })
		if s.cl != nil {
			wg.Go(func() { s.holds.runLearned(ctx, bl, 20*time.Millisecond) })
		}
	}
	if cfg.Detector.UnblockAfter > 0 {
		lifted := func(id string) { forgetBlock(s.mailer, id, log) }
		if f := s.fleet.Load(); f != nil {
			lifted = func(id string) { forgetBlock(s.mailer, id, log); f.Unblocked(id, time.Now()) }
		}
		wg.Go(func() { autoUnblock(ctx, bl, 30*time.Second, time.Now, s.forgetCounts, lifted, log) })
	}
	wg.Go(func() { (&reloader{running: cfg, apply: applyReload(d, s.srv), log: log}).run(ctx, hup) })
}

// shutdown ends what outlives the listeners, in order: the metrics
// server, the background verifications, the mailer, the blocklist's
// pending writes. It returns the listeners' errors and a failed flush.
func (s *service) shutdown(serveErrs chan error, stopMail func(), mailDone <-chan struct{}) error {
	if s.metricsSrv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = s.metricsSrv.Shutdown(sctx)
		cancel()
	}
	// Verifications still running in the background may end in a block:
	// let them, within the callout timeout.
	s.d.Close(s.cfg.Callout.Timeout.D() + time.Second)
	stopMail()
	<-mailDone
	fctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var errs []error
	close(serveErrs)
	for err := range serveErrs {
		errs = append(errs, err)
	}
	if s.bl.Pending() > 0 {
		if err := s.bl.Flush(fctx); err != nil {
			errs = append(errs, fmt.Errorf("blocklist: %d entries could not be written: %w", s.bl.Pending(), err))
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
