package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// syncBuffer is a bytes.Buffer safe for the world's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestWorldEndToEnd(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out, logs syncBuffer
	ready := make(chan string, 1)
	type result struct {
		st  worldStats
		err error
	}
	done := make(chan result, 1)
	go func() {
		st, err := runWorld(ctx, worldConfig{Mailboxes: 20, Domain: "bench.test", Domains: 2, Dir: dir, Blocked: 10,
			Listen: "127.0.0.1:0", LogLevel: "warn", Limit: 1_000_000, LogOut: &logs}, &out, func(a string) { ready <- a })
		done <- result{st, err}
	}()
	var addr string
	select {
	case addr = <-ready:
	case r := <-done:
		t.Fatalf("world ended before it was ready: %v\n%s", r.err, logs.String())
	case <-time.After(10 * time.Second):
		t.Fatal("world not ready after 10s")
	}

	w := workload{identities: 20, blocked: 10, mailboxes: 20, domain: "bench.test", invalid: 0.2}
	w.domains = rcptDomains(w.domain, 2)
	cfg := loadConfig{Target: addr, Conns: 4, Duration: 300 * time.Millisecond, Warmup: 50 * time.Millisecond,
		Timeout: 5 * time.Second, Prime: true, Workload: w}
	r, err := runLoad(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if r.ErrorTotal != 0 || r.Requests == 0 {
		t.Fatalf("errors %v, %d requests", r.Errors, r.Requests)
	}
	// Half the identities are on the blocklist: their requests get HOLD,
	// the others DUNNO (the limit is far away).
	if r.Actions["HOLD"] == 0 || r.Actions["DUNNO"] == 0 || r.Actions["HOLD"]+r.Actions["DUNNO"] != r.Requests {
		t.Errorf("actions %v for %d requests", r.Actions, r.Requests)
	}
	if r.Primed != 80 {
		t.Errorf("%d recipients primed, want 80 (20 mailboxes and 20 unknown at each of 2 domains)", r.Primed)
	}

	// The uncached scenario: every recipient is probed.
	cfg.Workload.unique, cfg.Workload.blocked, cfg.Workload.nonce = true, 0, "t"
	u, err := runLoad(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if u.ErrorTotal != 0 || u.Requests == 0 {
		t.Fatalf("uncached: errors %v, %d requests", u.Errors, u.Requests)
	}

	cancel()
	res := <-done
	if res.err != nil {
		t.Fatalf("world: %v\n%s", res.err, logs.String())
	}
	st := res.st
	// Priming and the uncached run went to the MX; cached answers did not.
	if st.Rcpts < 80 || st.Rcpts > 80+u.RequestsTotal+200 || st.Conns == 0 || st.Conns > st.Transactions {
		t.Errorf("MX counts %v after %d primed and %d uncached requests", st, r.Primed, u.RequestsTotal)
	}
	if st.DNSQueries == 0 {
		t.Error("no DNS queries")
	}
	text := out.String()
	for _, want := range []string{"dns 127.0.0.1:", "mx 127.0.0.1:", "config " + dir, "listening " + addr, "mx connections="} {
		if !strings.Contains(text, want) {
			t.Errorf("output lacks %q:\n%s", want, text)
		}
	}
	bl, err := os.ReadFile(filepath.Join(dir, "blocklist"))
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(bl), "\tHOLD "); n != 10 || !strings.Contains(string(bl), "blocked9@customer.test\t") {
		t.Errorf("blocklist has %d entries:\n%s", n, bl)
	}
}

func TestMXMailboxes(t *testing.T) {
	m := &benchMX{domains: map[string]bool{"bench.test": true, "d1.bench.test": true}, mailboxes: 100}
	for addr, want := range map[string]bool{
		"mbox0@bench.test": true, "MBOX99@Bench.Test": true, "mbox5@d1.bench.test": true,
		"v.abc.1.2@bench.test": true, "V.x@d1.bench.test": true,
		"mbox100@bench.test": false, "mbox007@bench.test": false, "mbox@bench.test": false, "mbox-1@bench.test": false,
		"unknown3@bench.test": false, "x.abc.1.2@bench.test": false, "mbox1@other.test": false, "mbox1": false,
		"abcdefghij0123456789@bench.test": false,
	} {
		if got := m.exists(addr); got != want {
			t.Errorf("exists(%q) = %v, want %v", addr, got, want)
		}
	}
}
