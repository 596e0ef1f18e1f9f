package test_test

// The load half of issue 7: a soak test, short in CI, long with -soak.

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/test"
)

// soakDuration runs TestSoak this long (go test ./test/ -run TestSoak
// -soak=5m); zero means the short CI run. A non-zero value also makes
// TestFaultRelayDown wait for the mailer's own retry instead of
// restarting the daemon.
var soakDuration = flag.Duration("soak", 0, "run TestSoak this long instead of 5s (e.g. -soak=5m)")

// countingWriter discards what is written and counts the lines.
type countingWriter struct{ lines atomic.Int64 }

func (c *countingWriter) Write(p []byte) (int, error) {
	c.lines.Add(int64(strings.Count(string(p), "\n")))
	return len(p), nil
}

// startQuietDaemon runs `rcptguard serve` in process like startDaemon,
// but its log (formatted at the configured level) is counted and
// discarded instead of kept, so a long run does not grow the heap with
// it. It returns the policy address and a stop function.
func startQuietDaemon(t *testing.T, configPath string, logs io.Writer) (string, func()) {
	t.Helper()
	addr, _, stop := serveInProcess(t, configPath, logs)
	return addr, stop
}

// soakSample is one reading of the process, once a second.
type soakSample struct {
	at         time.Duration
	mem        memFigures
	goroutines int
	done       int64
}

// TestSoak: 64 connections at a steady 2,000 requests/s in all, senders
// drawn from 100,000 identities, recipients a mix of cached valid ones
// (50%), unique ones never seen before that need an SMTP probe (25%) and
// invalid ones (25%: known-bad mailboxes, cached after their first probe,
// and bad syntax). No request may fail or be answered other than DUNNO,
// the heap must be flat after the warm-up, and every goroutine must be
// gone once the daemon stopped.
func TestSoak(t *testing.T) {
	dur := 5 * time.Second
	if *soakDuration > 0 {
		dur = *soakDuration
	}
	const (
		conns      = 64
		rate       = 2000.0 // requests per second, all connections together
		identities = 100_000
	)
	// Warm-up: the caches and the sliding window (period 1m, swept every
	// 30s) fill up to their steady state.
	warmup := max(time.Second, min(dur/4, 90*time.Second))

	w := newWorld(t)
	cfg := w.suiteConfig(t, "soak.toml", map[string]string{
		"detector.limit":  "1000", // nobody is blocked: every answer is DUNNO
		"detector.period": `"1m"`,
		"detector.wait":   `"2s"`,
		"callout.timeout": `"2s"`,
		// The world is one recipient domain on one MX: the politeness caps
		// would rightly refuse 500 new recipients a second there, and the
		// policy answer then is a defer. The soak measures the daemon, not
		// the caps (tested on their own in callout and faults_test.go).
		"callout.per_domain_rcpt_rate": "1000000",
		"callout.per_host_rcpt_rate":   "1000000",
		"callout.per_domain_rate":      "1000000",
		"callout.per_host_rate":        "1000000",
		"callout.session_rate":         "1000000",
		"callout.per_identity_rate":    "0",
		"log.level":                    `"info"`, // a decision line per request, formatted and counted
	})
	goroutinesBefore := runtime.NumGoroutine()
	logs := &countingWriter{}
	addr, stop := startQuietDaemon(t, cfg, logs)

	// Warm the cache for the valid and the known-invalid recipients.
	warm := test.DialPolicy(t, addr)
	valid := []string{"alice@good.test", "bob@good.test", "carol@good.test"}
	for _, r := range valid {
		warm.Must(rcpt("warm@customer.test", r))
	}
	for i := range 50 {
		warm.Must(rcpt(fmt.Sprintf("warm%d@customer.test", i), fmt.Sprintf("nobody%d@good.test", i)))
	}

	var (
		done    atomic.Int64
		errs    atomic.Int64
		firstMu sync.Mutex
		first   []string
	)
	fail := func(format string, args ...any) {
		errs.Add(1)
		firstMu.Lock()
		if len(first) < 10 {
			first = append(first, fmt.Sprintf(format, args...))
		}
		firstMu.Unlock()
	}
	lat := make([][]time.Duration, conns)
	interval := time.Duration(float64(time.Second) * conns / rate)
	start := time.Now()
	end := start.Add(dur)
	var wg sync.WaitGroup
	for ci := range conns {
		conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		wg.Go(func() {
			defer conn.Close()
			_ = conn.SetDeadline(end.Add(time.Minute))
			br := bufio.NewReader(conn)
			rng := rand.New(rand.NewPCG(uint64(ci), 42))
			offset := interval * time.Duration(ci) / conns // spread the connections over an interval
			for k := 0; ; k++ {
				due := start.Add(offset + time.Duration(k)*interval)
				if due.After(end) {
					return
				}
				if d := time.Until(due); d > 0 {
					time.Sleep(d)
				}
				user := fmt.Sprintf("soak%06d@customer.test", rng.IntN(identities))
				var to string
				switch p := rng.IntN(100); {
				case p < 50:
					to = valid[rng.IntN(len(valid))]
				case p < 75:
					to = fmt.Sprintf("new-%d-%d@good.test", ci, k) // unique: a probe
				case p < 90:
					to = fmt.Sprintf("nobody%d@good.test", rng.IntN(50))
				default:
					to = fmt.Sprintf("not an address %d", rng.IntN(1000))
				}
				t0 := time.Now()
				if _, err := io.WriteString(conn, test.Render(rcpt(user, to))); err != nil {
					fail("connection %d: write: %v", ci, err)
					return
				}
				line, err := br.ReadString('\n')
				if err == nil {
					var blank string
					blank, err = br.ReadString('\n')
					if err == nil && blank != "\n" {
						err = fmt.Errorf("answer %q not followed by an empty line", line)
					}
				}
				if err != nil {
					fail("connection %d: read: %v", ci, err)
					return
				}
				lat[ci] = append(lat[ci], time.Since(t0))
				done.Add(1)
				if line != "action=DUNNO\n" {
					fail("%s -> %s: %q", user, to, line)
				}
			}
		})
	}

	// One sample a second while the load runs.
	var samples []soakSample
	sampleStop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-sampleStop:
				return
			case <-tick.C:
				samples = append(samples, soakSample{at: time.Since(start), mem: readMem(), goroutines: runtime.NumGoroutine(), done: done.Load()})
			}
		}
	}()
	wg.Wait()
	elapsed := time.Since(start)
	close(sampleStop)
	<-sampled
	stop()

	// Every goroutine of the daemon ends (the MX sessions it had open end
	// with it).
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > goroutinesBefore+5 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	goroutinesAfter := runtime.NumGoroutine()

	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	slices.Sort(all)
	pct := func(p float64) time.Duration {
		if len(all) == 0 {
			return 0
		}
		return all[min(len(all)-1, int(p*float64(len(all))))]
	}
	var heap, rss []string
	for _, s := range samples {
		heap = append(heap, fmt.Sprintf("%.1f", mib(s.mem.heapInuse)))
		rss = append(rss, fmt.Sprintf("%.1f", mib(s.mem.rss)))
	}
	maxG := 0
	for _, s := range samples {
		maxG = max(maxG, s.goroutines)
	}
	t.Logf("soak %v: %d connections, %d requests, %.0f req/s achieved (target %.0f), p50 %v, p99 %v, max %v, %d errors, %d log lines",
		elapsed.Round(time.Millisecond), conns, done.Load(), float64(done.Load())/elapsed.Seconds(), rate,
		pct(0.50).Round(time.Microsecond), pct(0.99).Round(time.Microsecond), pct(1).Round(time.Microsecond), errs.Load(), logs.lines.Load())
	t.Logf("heap in use MiB, one a second: %s", strings.Join(heap, " "))
	t.Logf("RSS MiB, one a second: %s", strings.Join(rss, " "))
	t.Logf("goroutines: %d before the daemon, up to %d under load, %d after it stopped", goroutinesBefore, maxG, goroutinesAfter)

	if errs.Load() > 0 {
		t.Errorf("%d errors; the first: %s", errs.Load(), strings.Join(first, "; "))
	}
	if done.Load() == 0 {
		t.Fatal("no request answered")
	}
	if goroutinesAfter > goroutinesBefore+5 {
		t.Errorf("goroutine leak: %d before the daemon started, %d 10s after it stopped", goroutinesBefore, goroutinesAfter)
		buf := make([]byte, 1<<20)
		t.Logf("goroutines:\n%s", buf[:runtime.Stack(buf, true)])
	}
	if len(samples) >= 2 {
		wi := min(len(samples)-1, max(0, int(warmup/time.Second)-1))
		warmS, last := samples[wi], samples[len(samples)-1]
		if float64(last.mem.heapInuse) > 1.5*float64(warmS.mem.heapInuse)+20<<20 {
			t.Errorf("heap not flat after the warm-up (%v): %.1f MiB at %v, %.1f MiB at the end",
				warmup, mib(warmS.mem.heapInuse), warmS.at.Round(time.Second), mib(last.mem.heapInuse))
		}
		if float64(last.mem.rss) > 1.5*float64(warmS.mem.rss)+20<<20 {
			t.Errorf("RSS not flat after the warm-up (%v): %.1f MiB at %v, %.1f MiB at the end",
				warmup, mib(warmS.mem.rss), warmS.at.Round(time.Second), mib(last.mem.rss))
		}
	}
}
