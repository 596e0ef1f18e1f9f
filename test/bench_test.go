package test_test

import (
	"context"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/cmd/rcptguard/app"
	"github.com/rcptguard/rcptguard/test"
)

// BenchmarkPolicy runs the real daemon wiring (info-level decision
// logs formatted and discarded) and drives it over loopback with 8 and 64
// persistent policy connections, one request at a time each, as that many
// smtpd processes would. Verdicts are cached: the recipients were verified once
// before the timer starts. It reports decisions/s and the p50/p99 latency.
func BenchmarkPolicy(b *testing.B) {
	for _, conns := range []int{8, 64} {
		for _, blocked := range []bool{false, true} {
			name := fmt.Sprintf("cached/conns=%d", conns)
			if blocked {
				name = fmt.Sprintf("blocked/conns=%d", conns)
			}
			b.Run(name, func(b *testing.B) { benchPolicy(b, conns, blocked) })
		}
	}
}

func benchPolicy(b *testing.B, conns int, blocked bool) {
	mx := test.StartMXAt(b, "127.0.0.2:0", test.MXConfig{Mailboxes: []string{"alice@good.test", "bob@good.test"}})
	_, port, _ := net.SplitHostPort(mx.Addr)
	dns := test.StartDNS(b, "good.test. 300 IN MX 10 mx.good.test.\nmx.good.test. 300 IN A 127.0.0.2\n")
	dir := b.TempDir()
	cfg, err := app.LoadConfig(writeFile(b, dir+"/rcptguard.toml", fmt.Sprintf(`
[policy]
listen = ["127.0.0.1:0"]
[callout]
resolver = %q
port = %s
allow_private = true
[blocklist]
path = %q
[notify]
spool = %q
[queue]
requests = %q
[log]
level = "info"
`, dns.Addr, port, dir+"/blocklist", dir+"/spool", dir+"/hold-requests")))
	if err != nil {
		b.Fatal(err)
	}
	if blocked {
		var lines strings.Builder
		for i := range 10000 {
			fmt.Fprintf(&lines, "user%d@customer.test\tHOLD rcptguard: blocked for the benchmark\n", i)
		}
		writeFile(b, dir+"/blocklist", lines.String())
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- app.Serve(ctx, cfg, io.Discard, app.Hooks{Ready: func(p []string, _ string) { ready <- p[0] }})
	}()
	addr := <-ready
	defer func() { cancel(); <-done }()

	clients := make([]*test.PolicyClient, conns)
	for i := range clients {
		clients[i] = test.DialPolicy(b, addr)
	}
	// Warm the verdict cache.
	for _, r := range []string{"alice@good.test", "bob@good.test"} {
		clients[0].Must(test.RcptRequest("warm@customer.test", "warm@customer.test", r, ""))
	}
	time.Sleep(50 * time.Millisecond) // ristretto applies sets asynchronously
	// Requests are rendered before the timer starts, so the client costs
	// as little as a Postfix smtpd would.
	reqs := make([]string, 10000)
	for i := range reqs {
		user := fmt.Sprintf("user%d@customer.test", i)
		reqs[i] = test.Render(test.RcptRequest(user, user, []string{"alice@good.test", "bob@good.test"}[i%2], ""))
	}
	var next atomic.Int64
	var hist latencyHist
	b.ResetTimer()
	var wg sync.WaitGroup
	for _, c := range clients {
		wg.Go(func() {
			for {
				i := next.Add(1)
				if i > int64(b.N) {
					return
				}
				start := time.Now()
				a, err := c.AskRaw(reqs[i%int64(len(reqs))])
				hist.add(time.Since(start))
				if err != nil || (a == "DUNNO") == blocked {
					b.Errorf("answer %q, %v", a, err)
					return
				}
			}
		})
	}
	wg.Wait()
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "decisions/s")
	b.ReportMetric(hist.quantile(0.5).Seconds()*1e6, "p50-µs")
	b.ReportMetric(hist.quantile(0.99).Seconds()*1e6, "p99-µs")
}

// latencyHist is a log-bucketed latency histogram (about 4.5% per bucket
// from 1 µs to 100 s): fixed memory whatever the number of samples.
type latencyHist struct {
	mu      sync.Mutex
	buckets [420]int64
	n       int64
}

func (h *latencyHist) add(d time.Duration) {
	us := max(float64(d)/1e3, 1)
	i := min(int(math.Log(us)/math.Log(1.045)), len(h.buckets)-1)
	h.mu.Lock()
	h.buckets[i]++
	h.n++
	h.mu.Unlock()
}

func (h *latencyHist) quantile(q float64) time.Duration {
	h.mu.Lock()
	defer h.mu.Unlock()
	want := int64(math.Ceil(q * float64(h.n)))
	var seen int64
	for i, c := range h.buckets {
		seen += c
		if seen >= want && c > 0 {
			return time.Duration(math.Pow(1.045, float64(i+1)) * 1e3)
		}
	}
	return 0
}

func writeFile(tb testing.TB, path, text string) string {
	tb.Helper()
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		tb.Fatal(err)
	}
	return path
}
