package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/detector"
)

// startBaseline runs the bare server on addr until the end of the test.
func startBaseline(t *testing.T, addr string) string {
	t.Helper()
	ln, err := detector.Listen(addr, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- serveBaseline(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("baseline: %v", err)
		}
	})
	if ln.Addr().Network() == "unix" {
		return "unix:" + ln.Addr().String()
	}
	return ln.Addr().String()
}

func quickLoad(target string, conns int) loadConfig {
	w := workload{identities: 100, mailboxes: 20, domain: defaultRcptDomain, invalid: 0.1}
	w.domains = rcptDomains(w.domain, 1)
	return loadConfig{Target: target, Conns: conns, Duration: 300 * time.Millisecond, Warmup: 50 * time.Millisecond,
		Timeout: 2 * time.Second, Prime: true, Workload: w}
}

func TestLoadAgainstBaseline(t *testing.T) {
	for _, listen := range []string{"127.0.0.1:0", "unix:" + filepath.Join(t.TempDir(), "policy.sock")} {
		t.Run(strings.SplitN(listen, ":", 2)[0], func(t *testing.T) {
			target := startBaseline(t, listen)
			cfg := quickLoad(target, 4)
			cfg.RequestsPerConn = 50 // reconnections too
			start := time.Now()
			r, err := runLoad(context.Background(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			if took := time.Since(start); took > 3*time.Second {
				t.Errorf("a 350ms run took %v", took)
			}
			if r.Requests == 0 || r.RequestsPerSecond <= 0 {
				t.Fatalf("no requests measured: %+v", r)
			}
			if r.ErrorTotal != 0 {
				t.Errorf("errors: %v", r.Errors)
			}
			if r.Actions["DUNNO"] != r.Requests || len(r.Actions) != 2 || r.Actions["HOLD"] != 0 {
				t.Errorf("actions %v for %d requests, want all DUNNO", r.Actions, r.Requests)
			}
			if r.Primed != 40 || r.RequestsTotal < r.Requests+40 {
				t.Errorf("primed %d, total %d", r.Primed, r.RequestsTotal)
			}
			l := r.Latency
			if !(0 < l.P50 && l.P50 <= l.P90 && l.P90 <= l.P99 && l.P99 <= l.P999 && l.P999 <= l.Max) {
				t.Errorf("latency quantiles out of order: %+v", l)
			}
			var out bytes.Buffer
			printReport(&out, r)
			for _, want := range []string{"requests/s", "p99.9", "timeout 0", "DUNNO"} {
				if !strings.Contains(out.String(), want) {
					t.Errorf("report lacks %q:\n%s", want, out.String())
				}
			}
			b, err := json.Marshal(r)
			if err != nil || !bytes.Contains(b, []byte(`"requests_per_second":`)) {
				t.Errorf("JSON report: %s, %v", b, err)
			}
		})
	}
}

func TestLoadRefusesTargetsOffLoopback(t *testing.T) {
	for _, addr := range []string{"10.0.0.1:10040", "192.168.1.1:25", "8.8.8.8:53", "[2001:db8::1]:10040",
		"example.com:10040", "0.0.0.0:10040", "[::]:10040", "127.0.0.1", "unix:"} {
		if _, _, err := splitTarget(addr); err == nil {
			t.Errorf("%q accepted", addr)
		}
		cfg := quickLoad(addr, 1)
		if _, err := runLoad(context.Background(), cfg); err == nil {
			t.Errorf("load against %q ran", addr)
		}
	}
	_, _, err := splitTarget("192.0.2.1:10040")
	if !errors.Is(err, errNotLoopback) {
		t.Errorf("error %v, want errNotLoopback", err)
	}
	for _, addr := range []string{"127.0.0.1:10040", "127.0.0.2:1", "[::1]:10040", "localhost:10040", "unix:/run/policy.sock"} {
		if _, _, err := splitTarget(addr); err != nil {
			t.Errorf("%q refused: %v", addr, err)
		}
	}
	var stderr bytes.Buffer
	if code := run(context.Background(), []string{"load", "-target", "10.1.2.3:10040"}, &bytes.Buffer{}, &stderr); code != 2 ||
		!strings.Contains(stderr.String(), "not a loopback address") {
		t.Errorf("exit %d, stderr %q", code, stderr.String())
	}
}

// fakeServer answers every request with answer, or never when answer is
// empty.
func fakeServer(t *testing.T, answer string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					if _, err := detector.ReadRequest(br, detector.Limits{}); err != nil {
						return
					}
					if answer == "" {
						continue
					}
					if _, err := c.Write([]byte(answer)); err != nil {
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().String()
}

func TestLoadCountsErrorsAndActions(t *testing.T) {
	t.Run("protocol", func(t *testing.T) {
		cfg := quickLoad(fakeServer(t, "bogus\n\n"), 2)
		cfg.Prime = false
		r, err := runLoad(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		if r.Errors["protocol"] == 0 || r.Requests != 0 {
			t.Errorf("errors %v, %d requests", r.Errors, r.Requests)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		cfg := quickLoad(fakeServer(t, ""), 2)
		cfg.Prime = false
		cfg.Timeout = 100 * time.Millisecond
		r, err := runLoad(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		if r.Errors["timeout"] == 0 {
			t.Errorf("errors %v", r.Errors)
		}
	})
	t.Run("other actions", func(t *testing.T) {
		cfg := quickLoad(fakeServer(t, "action=421 4.7.1 too many\n\n"), 2)
		cfg.Prime = false
		r, err := runLoad(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		if r.ErrorTotal != 0 || r.Requests == 0 || r.Actions["421"] != r.Requests {
			t.Errorf("errors %v, actions %v, %d requests", r.Errors, r.Actions, r.Requests)
		}
	})
	t.Run("nothing listening", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		if _, err := runLoad(context.Background(), quickLoad(addr, 1)); err == nil {
			t.Error("a run against a closed port succeeded")
		}
	})
}

func TestLoadStopsWhenCancelled(t *testing.T) {
	cfg := quickLoad(fakeServer(t, ""), 2)
	cfg.Prime = false
	cfg.Duration = time.Hour
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := runLoad(ctx, cfg); err == nil {
		t.Error("an interrupted run reported success")
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("stopping took %v", took)
	}
}

func TestUsage(t *testing.T) {
	for _, args := range [][]string{{}, {"nope"}, {"load"}, {"load", "-target", "127.0.0.1:1", "-conns", "0"},
		{"load", "-target", "127.0.0.1:1", "-invalid", "2"}, {"baseline", "-listen", "10.0.0.1:0"},
		{"world", "-listen", "192.0.2.1:0"}, {"world", "-mailboxes", "0"}, {"load", "-target", "127.0.0.1:1", "extra"}} {
		var stderr bytes.Buffer
		if code := run(context.Background(), args, &bytes.Buffer{}, &stderr); code != 2 {
			t.Errorf("%q: exit %d, want 2 (stderr %q)", args, code, stderr.String())
		}
	}
	var stdout bytes.Buffer
	if code := run(context.Background(), []string{"help"}, &stdout, &bytes.Buffer{}); code != 0 || !strings.Contains(stdout.String(), "baseline") {
		t.Errorf("help: exit %d, %q", code, stdout.String())
	}
}
