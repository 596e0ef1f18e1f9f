package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// loadConfig is a load run's settings (the flags of "load").
type loadConfig struct {
	Target          string        // "host:port" on loopback or "unix:/path"
	Conns           int           // connections, each one request at a time
	Duration        time.Duration // measured time
	Warmup          time.Duration // unmeasured time before it
	Timeout         time.Duration // one request, write to answer
	RequestsPerConn int           // reconnect after this many requests; 0: never
	Prime           bool          // ask for every recipient once before the clock starts
	Workload        workload
}

// Limits of a run, so that a mistyped flag cannot start an endless one.
const (
	maxConns     = 10000
	maxRunTime   = time.Hour
	maxPrimeTime = 60 * time.Second // priming stops here and the run goes on
	dialTimeout  = 5 * time.Second
	redialPause  = 20 * time.Millisecond // after a failed dial
	answerBuffer = 4096
)

// Error kinds, in report order.
var errorKinds = []string{"dial", "write", "read", "timeout", "protocol"}

const (
	errDial = iota
	errWrite
	errRead
	errTimeout
	errProtocol
	numErrorKinds
)

func (c *loadConfig) check() error {
	if _, _, err := splitTarget(c.Target); err != nil {
		return fmt.Errorf("-target %w", err)
	}
	switch {
	case c.Conns < 1 || c.Conns > maxConns:
		return fmt.Errorf("-conns must be between 1 and %d", maxConns)
	case c.Duration <= 0:
		return errors.New("-duration must be positive")
	case c.Warmup < 0:
		return errors.New("-warmup must not be negative")
	case c.Duration+c.Warmup > maxRunTime:
		return fmt.Errorf("-duration plus -warmup must be at most %s", maxRunTime)
	case c.Timeout <= 0 || c.Timeout > time.Minute:
		return errors.New("-timeout must be between 0 and 1m")
	case c.RequestsPerConn < 0:
		return errors.New("-requests-per-conn must not be negative")
	case c.Workload.identities < 1:
		return errors.New("-identities must be at least 1")
	case c.Workload.blocked < 0 || c.Workload.blocked > c.Workload.identities:
		return errors.New("-blocked-identities must be between 0 and -identities")
	case c.Workload.mailboxes < 1:
		return errors.New("-mailboxes must be at least 1")
	case c.Workload.invalid < 0 || c.Workload.invalid > 1:
		return errors.New("-invalid must be a fraction between 0 and 1")
	case c.Workload.domain == "":
		return errors.New("-domain must not be empty")
	case len(c.Workload.domains) > 1000:
		return errors.New("-domains must be between 1 and 1000")
	}
	return nil
}

// Report is the outcome of a load run; its JSON form is what -json prints.
type Report struct {
	Target            string           `json:"target"`
	Conns             int              `json:"conns"`
	Duration          float64          `json:"duration_seconds"` // measured window
	Warmup            float64          `json:"warmup_seconds"`
	Primed            int              `json:"primed"`         // recipients asked for before the warm-up
	Requests          int64            `json:"requests"`       // answered in the measured window
	RequestsTotal     int64            `json:"requests_total"` // answered, priming and warm-up included
	RequestsPerSecond float64          `json:"requests_per_second"`
	Latency           LatencyReport    `json:"latency_us"`
	Errors            map[string]int64 `json:"errors"` // over the whole run, warm-up included
	ErrorTotal        int64            `json:"error_total"`
	Actions           map[string]int64 `json:"actions"` // measured answers by first word: DUNNO, HOLD, 421, ...
	Workload          WorkloadReport   `json:"workload"`
}

// LatencyReport holds latency quantiles in microseconds.
type LatencyReport struct {
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p99_9"`
	Max  float64 `json:"max"`
	Mean float64 `json:"mean"`
}

// WorkloadReport repeats the workload settings for the record.
type WorkloadReport struct {
	Identities        int     `json:"identities"`
	BlockedIdentities int     `json:"blocked_identities"`
	Mailboxes         int     `json:"mailboxes"`
	Domain            string  `json:"domain"`
	Domains           int     `json:"domains"`
	Invalid           float64 `json:"invalid"`
	UniqueRcpts       bool    `json:"unique_rcpts"`
	RequestsPerConn   int     `json:"requests_per_conn"`
}

// connStats is what one connection's worker counts; merged at the end.
type connStats struct {
	hist    Histogram
	n       int64 // measured answers
	total   int64 // all answers
	errs    [numErrorKinds]int64
	dunno   int64
	hold    int64
	other   map[string]*int64
	lastErr error
}

func (s *connStats) action(word []byte) {
	switch {
	case bytes.EqualFold(word, []byte("DUNNO")):
		s.dunno++
	case bytes.EqualFold(word, []byte("HOLD")):
		s.hold++
	default:
		if p, ok := s.other[string(word)]; ok {
			*p++
			return
		}
		if s.other == nil {
			s.other = make(map[string]*int64)
		}
		one := int64(1)
		s.other[string(word)] = &one
	}
}

// runLoad runs the load described by cfg and returns its report. It ends
// by itself after the warm-up and the duration (plus at most the priming
// time and one request timeout), or earlier when ctx ends.
func runLoad(ctx context.Context, cfg loadConfig) (*Report, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	network, address, _ := splitTarget(cfg.Target)
	if cfg.Workload.nonce == "" {
		cfg.Workload.nonce = strconv.FormatInt(time.Now().UnixNano()%1e12, 36)
	}
	// The hard cap: whatever happens, the run ends by then.
	hard := time.Now().Add(maxPrimeTime + cfg.Warmup + cfg.Duration + cfg.Timeout + 5*time.Second)
	ctx, cancel := context.WithDeadline(ctx, hard)
	defer cancel()

	workers := make([]*worker, cfg.Conns)
	for i := range workers {
		workers[i] = &worker{cfg: &cfg, network: network, address: address, gen: newGenerator(&cfg.Workload, i, cfg.Conns), ctx: ctx}
	}
	defer func() {
		for _, w := range workers {
			w.close()
		}
	}()
	// Connect everything first: a target that is not there fails the run
	// at once instead of filling the report with dial errors.
	var wg sync.WaitGroup
	dialErrs := make([]error, len(workers))
	for i, w := range workers {
		wg.Go(func() { dialErrs[i] = w.dial() })
	}
	wg.Wait()
	if err := errors.Join(dialErrs...); err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", cfg.Target, firstError(dialErrs))
	}

	primed := 0
	if cfg.Prime {
		var err error
		if primed, err = prime(ctx, workers, &cfg.Workload); err != nil {
			return nil, err
		}
	}

	start := time.Now()
	measureFrom := start.Add(cfg.Warmup)
	end := measureFrom.Add(cfg.Duration)
	for _, w := range workers {
		wg.Go(func() { w.run(measureFrom, end) })
	}
	wg.Wait()
	if ctx.Err() != nil && time.Now().Before(end) {
		if errors.Is(context.Cause(ctx), context.DeadlineExceeded) {
			return nil, errors.New("the run passed its hard time limit")
		}
		return nil, fmt.Errorf("interrupted: %w", ctx.Err())
	}

	var total connStats
	for _, w := range workers {
		total.merge(&w.stats)
	}
	return newReport(&cfg, &total, primed), nil
}

// merge adds o's counts to s.
func (s *connStats) merge(o *connStats) {
	s.hist.Merge(&o.hist)
	s.n += o.n
	s.total += o.total
	for k, c := range o.errs {
		s.errs[k] += c
	}
	s.dunno += o.dunno
	s.hold += o.hold
	for word, c := range o.other {
		if s.other == nil {
			s.other = make(map[string]*int64)
		}
		if p, ok := s.other[word]; ok {
			*p += *c
		} else {
			v := *c
			s.other[word] = &v
		}
	}
}

// newReport makes the run's report from the connections' merged counts.
func newReport(cfg *loadConfig, total *connStats, primed int) *Report {
	us := func(d time.Duration) float64 { return float64(d) / 1e3 }
	r := &Report{
		Target:            cfg.Target,
		Conns:             cfg.Conns,
		Duration:          cfg.Duration.Seconds(),
		Warmup:            cfg.Warmup.Seconds(),
		Primed:            primed,
		Requests:          total.n,
		RequestsTotal:     total.total + int64(primed),
		RequestsPerSecond: float64(total.n) / cfg.Duration.Seconds(),
		Latency: LatencyReport{
			P50:  us(total.hist.Quantile(0.50)),
			P90:  us(total.hist.Quantile(0.90)),
			P99:  us(total.hist.Quantile(0.99)),
			P999: us(total.hist.Quantile(0.999)),
			Max:  us(total.hist.Max()),
			Mean: us(total.hist.Mean()),
		},
		Errors:  make(map[string]int64, numErrorKinds),
		Actions: map[string]int64{"DUNNO": total.dunno, "HOLD": total.hold},
		Workload: WorkloadReport{
			Identities:        cfg.Workload.identities,
			BlockedIdentities: cfg.Workload.blocked,
			Mailboxes:         cfg.Workload.mailboxes,
			Domain:            cfg.Workload.domain,
			Domains:           max(len(cfg.Workload.domains), 1),
			Invalid:           cfg.Workload.invalid,
			UniqueRcpts:       cfg.Workload.unique,
			RequestsPerConn:   cfg.RequestsPerConn,
		},
	}
	for k, name := range errorKinds {
		r.Errors[name] = total.errs[k]
		r.ErrorTotal += total.errs[k]
	}
	for word, c := range total.other {
		r.Actions[word] = *c
	}
	return r
}

func firstError(errs []error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// prime asks for every recipient of the workload once, spread over the
// connections, so that the measured requests find the verdicts cached. It
// uses non-blocked identities (a blocked one is never verified) and
// stops after maxPrimeTime.
func prime(ctx context.Context, workers []*worker, w *workload) (int, error) {
	rcpts := w.primeRecipients()
	if len(rcpts) == 0 || w.blocked >= w.identities {
		return 0, nil
	}
	deadline := time.Now().Add(maxPrimeTime)
	var next atomic.Int64
	var done atomic.Int64
	errs := make([]error, len(workers))
	var wg sync.WaitGroup
	for i, wk := range workers {
		wg.Go(func() {
			var buf []byte
			for {
				j := int(next.Add(1) - 1)
				if j >= len(rcpts) || ctx.Err() != nil || time.Now().After(deadline) {
					return
				}
				ident := w.blocked + j%(w.identities-w.blocked)
				buf = appendRequest(buf[:0], &rcptRequest{
					identity: ident, blocked: w.blocked, recipient: []byte(rcpts[j]),
					instance: []byte("prime.0"), size: 1000, clientPort: 40000 + i,
				})
				if _, _, err := wk.ask(buf, time.Now().Add(wk.cfg.Timeout)); err != nil {
					errs[i] = fmt.Errorf("priming the verdict cache with %s: %w", rcpts[j], err)
					return
				}
				done.Add(1)
			}
		})
	}
	wg.Wait()
	if err := firstError(errs); err != nil {
		return int(done.Load()), err
	}
	return int(done.Load()), nil
}

// worker plays one smtpd process: one persistent connection, one request
// at a time.
type worker struct {
	cfg     *loadConfig
	network string
	address string
	gen     *generator
	ctx     context.Context

	conn   net.Conn
	br     *bufio.Reader
	stop   func() bool // unregisters the close-on-cancel hook
	served int         // requests on this connection
	word   []byte      // the last answer's action word
	stats  connStats
}

func (w *worker) dial() error {
	d := net.Dialer{Timeout: dialTimeout}
	c, err := d.DialContext(w.ctx, w.network, w.address)
	if err != nil {
		return err
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	w.conn = c
	if w.br == nil {
		w.br = bufio.NewReaderSize(c, answerBuffer)
	} else {
		w.br.Reset(c)
	}
	w.served = 0
	// A cancelled run unblocks a read in progress by closing the
	// connection.
	w.stop = context.AfterFunc(w.ctx, func() { _ = c.Close() })
	return nil
}

func (w *worker) close() {
	if w.conn != nil {
		w.stop()
		_ = w.conn.Close()
		w.conn = nil
	}
}

// ask sends one request and reads its answer, returning the action's
// first word (valid until the next call). The error kind is meaningful
// only when err is not nil.
func (w *worker) ask(req []byte, deadline time.Time) (word []byte, kind int, err error) {
	if err := w.conn.SetDeadline(deadline); err != nil {
		return nil, errWrite, err
	}
	if _, err := w.conn.Write(req); err != nil {
		return nil, ioKind(err, errWrite), err
	}
	line, err := w.br.ReadSlice('\n')
	if err != nil {
		return nil, ioKind(err, errRead), err
	}
	action, ok := bytes.CutPrefix(line, []byte("action="))
	if !ok {
		return nil, errProtocol, fmt.Errorf("answer %q does not start with action=", line)
	}
	action = bytes.TrimRight(action, "\r\n")
	if i := bytes.IndexByte(action, ' '); i >= 0 {
		action = action[:i]
	}
	// action points into the reader's buffer; the empty line may refill
	// it, so the word is kept before reading on.
	if len(action) == 0 {
		return nil, errProtocol, errors.New("empty action")
	}
	w.word = append(w.word[:0], action...)
	blank, err := w.br.ReadSlice('\n')
	if err != nil {
		return nil, ioKind(err, errRead), err
	}
	if len(blank) != 1 && !bytes.Equal(blank, []byte("\r\n")) {
		return nil, errProtocol, fmt.Errorf("answer not followed by an empty line but %q", blank)
	}
	return w.word, 0, nil
}

func ioKind(err error, kind int) int {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return errTimeout
	}
	if errors.Is(err, io.EOF) {
		return errRead
	}
	return kind
}

// run sends requests until end; answers completed within [measureFrom,
// end] are measured.
func (w *worker) run(measureFrom, end time.Time) {
	st := &w.stats
	for {
		now := time.Now()
		if !now.Before(end) || w.ctx.Err() != nil {
			return
		}
		t0 := now
		if w.conn == nil {
			if err := w.dial(); err != nil {
				if w.ctx.Err() != nil {
					return
				}
				st.errs[errDial]++
				st.lastErr = err
				time.Sleep(min(redialPause, time.Until(end)))
				continue
			}
		}
		req := w.gen.next()
		word, kind, err := w.ask(req, t0.Add(w.cfg.Timeout))
		t1 := time.Now()
		if err != nil {
			w.close()
			if w.ctx.Err() != nil {
				return
			}
			st.errs[kind]++
			st.lastErr = err
			continue
		}
		st.total++
		if !t0.Before(measureFrom) && !t1.After(end) {
			st.hist.Record(t1.Sub(t0))
			st.n++
			st.action(word)
		}
		w.served++
		if w.cfg.RequestsPerConn > 0 && w.served >= w.cfg.RequestsPerConn {
			w.close()
		}
	}
}

// printReport writes the human-readable report.
func printReport(out io.Writer, r *Report) {
	fmt.Fprintf(out, "target       %s, %d connections, %s measured after %s warm-up", r.Target, r.Conns,
		time.Duration(r.Duration*1e9), time.Duration(r.Warmup*1e9))
	if r.Primed > 0 {
		fmt.Fprintf(out, " (%d recipients primed)", r.Primed)
	}
	fmt.Fprintln(out)
	wl := r.Workload
	where := wl.Domain
	if wl.Domains > 1 {
		where = fmt.Sprintf("%d domains under %s", wl.Domains, wl.Domain)
	}
	rcpts := fmt.Sprintf("%d mailboxes at %s", wl.Mailboxes, where)
	if wl.UniqueRcpts {
		rcpts = "every recipient new at " + where
	}
	fmt.Fprintf(out, "workload     %d identities (%d blocked), %s, %.0f%% invalid\n", wl.Identities, wl.BlockedIdentities, rcpts, wl.Invalid*100)
	fmt.Fprintf(out, "requests/s   %s\n", thousands(int64(r.RequestsPerSecond+0.5)))
	fmt.Fprintf(out, "requests     %s\n", thousands(r.Requests))
	l := r.Latency
	fmt.Fprintf(out, "latency      p50 %s   p90 %s   p99 %s   p99.9 %s   max %s   mean %s\n",
		fmtMicros(l.P50), fmtMicros(l.P90), fmtMicros(l.P99), fmtMicros(l.P999), fmtMicros(l.Max), fmtMicros(l.Mean))
	fmt.Fprintf(out, "errors       ")
	for i, k := range errorKinds {
		if i > 0 {
			fmt.Fprint(out, "   ")
		}
		fmt.Fprintf(out, "%s %d", k, r.Errors[k])
	}
	fmt.Fprintln(out)
	words := make([]string, 0, len(r.Actions))
	for w := range r.Actions {
		if w != "DUNNO" && w != "HOLD" {
			words = append(words, w)
		}
	}
	slices.Sort(words)
	fmt.Fprintf(out, "actions      DUNNO %d   HOLD %d", r.Actions["DUNNO"], r.Actions["HOLD"])
	for _, w := range words {
		fmt.Fprintf(out, "   %s %d", w, r.Actions[w])
	}
	fmt.Fprintln(out)
}

// fmtMicros formats a latency given in microseconds.
func fmtMicros(us float64) string {
	switch {
	case us < 1000:
		return strconv.FormatFloat(us, 'f', 0, 64) + "µs"
	case us < 100_000:
		return strconv.FormatFloat(us/1000, 'f', 2, 64) + "ms"
	default:
		return strconv.FormatFloat(us/1000, 'f', 0, 64) + "ms"
	}
}

// thousands formats n with comma separators.
func thousands(n int64) string {
	s := strconv.FormatInt(n, 10)
	neg := false
	if n < 0 {
		neg, s = true, s[1:]
	}
	var b []byte
	for i := range len(s) {
		if i > 0 && (len(s)-i)%3 == 0 {
			b = append(b, ',')
		}
		b = append(b, s[i])
	}
	if neg {
		return "-" + string(b)
	}
	return string(b)
}
