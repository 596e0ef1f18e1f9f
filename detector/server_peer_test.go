package detector

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// Test peers, told apart by the loopback address they connect from (in
// 127.77/16, which no other test listens on: their source ports must not
// collide with the test MX hosts of ../test on 127.0.0.x).
const (
	srvPostfixIP = "127.77.0.1" // uid 107, Postfix's mail_owner
	srvOtherIP   = "127.77.0.2" // uid 1000, allowed: a monitoring script
	srvNobodyIP  = "127.77.0.3" // uid 65534, not allowed
	srvRemoteIP  = "127.77.0.4" // stands for the remote host 192.0.2.7
	srvStrayIP   = "127.77.0.5" // stands for the remote host 198.51.100.1
	srvGoneIP    = "127.77.0.6" // cannot be identified
)

// srvTestPeers identifies a test client by its source address.
type srvTestPeers struct{}

func (srvTestPeers) Identify(_ context.Context, c net.Conn) (Peer, error) {
	switch c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap().String() {
	case srvPostfixIP:
		return Peer{Local: true, UID: 107}, nil
	case srvOtherIP:
		return Peer{Local: true, UID: 1000}, nil
	case srvNobodyIP:
		return Peer{Local: true, UID: 65534}, nil
	case srvRemoteIP:
		return Peer{Addr: netip.MustParseAddr("192.0.2.7")}, nil
	case srvStrayIP:
		return Peer{Addr: netip.MustParseAddr("198.51.100.1")}, nil
	}
	return Peer{}, errors.New("owner of TCP peer: no such socket on this host (closed)")
}

// srvPeerServer starts a server with the test peers: uids 107 and 1000
// and 192.0.2.0/24 allowed, 107 uncapped. It returns the server, its
// address and its metrics.
func srvPeerServer(t *testing.T, cfg ServerConfig) (*srvTestServer, *Metrics) {
	t.Helper()
	m := NewMetrics(prometheus.NewRegistry())
	if cfg.Handler == nil {
		cfg.Handler = srvEcho
	}
	cfg.Peers = srvTestPeers{}
	cfg.AllowUIDs = []uint32{107, 1000}
	cfg.UncappedUIDs = []uint32{107}
	cfg.AllowNetworks = []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
	cfg.Metrics = m
	return srvStart(t, cfg), m
}

// srvDialFrom connects to addr from the loopback address src.
func srvDialFrom(t testing.TB, src, addr string) *srvClient {
	t.Helper()
	d := net.Dialer{Timeout: srvTestWait, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(srvTestWait))
	t.Cleanup(func() { _ = c.Close() })
	return &srvClient{Conn: c, r: bufio.NewReader(c)}
}

func TestServerPeerAccess(t *testing.T) {
	var decided atomic.Int64
	ts, m := srvPeerServer(t, ServerConfig{Handler: HandlerFunc(func(ctx context.Context, req *Request) Action {
		decided.Add(1)
		return srvEcho(ctx, req)
	})})
	for _, tc := range []struct {
		name, src string
		reason    string // "" when answered
	}{
		{"postfix", srvPostfixIP, ""},
		{"allowed user", srvOtherIP, ""},
		{"allowed network", srvRemoteIP, ""},
		{"nobody", srvNobodyIP, refuseUser},
		{"stray network", srvStrayIP, refuseNetwork},
		{"unidentified", srvGoneIP, refuseUnidentified},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := decided.Load()
			c := srvDialFrom(t, tc.src, ts.addr)
			got, err := c.ask(srvRequestFor("victim@example.org"))
			if tc.reason == "" {
				if err != nil || got != "OK victim@example.org alice@example.com" {
					t.Fatalf("allowed peer: %q, %v", got, err)
				}
				return
			}
			if err == nil {
				t.Fatalf("refused peer answered %q", got)
			}
			c.expectClosed(t)
			if n := decided.Load() - before; n != 0 {
				t.Fatalf("%d requests of a refused peer were decided", n)
			}
			srvWaitFor(t, "the refusal line", func() bool {
				return strings.Contains(ts.logs.String(), "reason="+tc.reason+" remote="+tc.src)
			})
			if n := testutil.ToFloat64(m.connRefusals[tc.reason]); n != 1 {
				t.Errorf("refused{reason=%s} = %v, want 1", tc.reason, n)
			}
			logs := ts.logs.String()
			if tc.reason == refuseUser && !strings.Contains(logs, "uid=65534") {
				t.Errorf("the refusal line does not name the uid:\n%s", logs)
			}
		})
	}

	// A reload can allow the stray network and take back uid 1000.
	ts.SetAccess([]uint32{107}, []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")})
	if got, err := srvDialFrom(t, srvStrayIP, ts.addr).ask(policyFullRequest); err != nil {
		t.Fatalf("newly allowed network: %q, %v", got, err)
	}
	srvDialFrom(t, srvOtherIP, ts.addr).expectClosed(t)
}

// TestServerIdleFloodFromRefusedUser: 2,000 idle connections of a user not
// allowed, then Postfix's request is answered. None of them takes a place.
func TestServerIdleFloodFromRefusedUser(t *testing.T) {
	ts, m := srvPeerServer(t, ServerConfig{MaxConns: 1000})
	start := time.Now()
	for range 2000 {
		c := srvDialFrom(t, srvNobodyIP, ts.addr)
		_ = c.Close() // the server has closed it, or will: keep our file descriptors
	}
	srvWaitFor(t, "2,000 refusals", func() bool { return testutil.ToFloat64(m.connRefusals[refuseUser]) == 2000 })
	if n := ts.activeConns(); n != 0 {
		t.Fatalf("ActiveConns() = %d after the flood, want 0", n)
	}
	if got, err := srvDialFrom(t, srvPostfixIP, ts.addr).ask(policyFullRequest); err != nil || got != "OK bob@example.org alice@example.com" {
		t.Fatalf("Postfix after the flood: %q, %v", got, err)
	}
	// The log has at most a line a second, not 2,000.
	lines := strings.Count(ts.logs.String(), "local user not allowed")
	if max := int(time.Since(start)/time.Second) + 1; lines < 1 || lines > max {
		t.Errorf("%d refusal lines in %v, want 1 to %d", lines, time.Since(start), max)
	}
}

// TestServerIdleFloodFromAllowedUser: an allowed user that is not Postfix
// opens 2,000 connections and leaves them idle: it never holds more than
// MaxConnsPerPeer, its own oldest make room for its newest, and Postfix is
// answered.
func TestServerIdleFloodFromAllowedUser(t *testing.T) {
	ts, m := srvPeerServer(t, ServerConfig{MaxConns: 1000}) // MaxConnsPerPeer: 250
	held := make([]*srvClient, 0, 2000)
	for range 2000 {
		held = append(held, srvDialFrom(t, srvOtherIP, ts.addr))
		if n := ts.activeConns(); n > 250 {
			t.Fatalf("uid 1000 holds %d connections, want at most 250", n)
		}
	}
	srvWaitFor(t, "every connection placed or refused", func() bool {
		return testutil.ToFloat64(m.connEvictions[refusePerPeer])+testutil.ToFloat64(m.connRefusals[refusePerPeer]) == 1750
	})
	if got, err := srvDialFrom(t, srvPostfixIP, ts.addr).ask(policyFullRequest); err != nil || got != "OK bob@example.org alice@example.com" {
		t.Fatalf("Postfix after the flood: %q, %v", got, err)
	}
	// The newest of the flood is still served.
	if got, err := held[len(held)-1].ask(policyFullRequest); err != nil {
		t.Fatalf("the newest connection of uid 1000: %q, %v", got, err)
	}
	for _, c := range held {
		_ = c.Close()
	}
}

// TestServerIdleAllowedFillMaxConns: Postfix's own idle connections fill
// MaxConns; a new one is answered, and the one idle longest is closed.
func TestServerIdleAllowedFillMaxConns(t *testing.T) {
	const max = 10
	ts, m := srvPeerServer(t, ServerConfig{MaxConns: max})
	var cs []*srvClient
	for i := range max {
		c := srvDialFrom(t, srvPostfixIP, ts.addr)
		if _, err := c.ask(srvRequestFor(fmt.Sprintf("r%d@example.org", i))); err != nil {
			t.Fatal(err)
		}
		cs = append(cs, c)
	}
	srvWaitFor(t, "all idle", func() bool { return srvIdle(ts.Server) == max })
	for i := range 2 {
		n := srvDialFrom(t, srvPostfixIP, ts.addr)
		if got, err := n.ask(srvRequestFor("new@example.org")); err != nil || got != "OK new@example.org alice@example.com" {
			t.Fatalf("new connection %d at MaxConns: %q, %v", i, got, err)
		}
		cs[i].expectClosed(t) // the one idle longest
		srvWaitFor(t, "all idle", func() bool { return srvIdle(ts.Server) == max })
	}
	for _, c := range cs[2:] {
		if _, err := c.ask(policyFullRequest); err != nil {
			t.Fatalf("a connection idle less long was closed: %v", err)
		}
	}
	if n := ts.activeConns(); n != max {
		t.Errorf("ActiveConns() = %d, want %d", n, max)
	}
	if n := testutil.ToFloat64(m.connEvictions[refuseMaxConns]); n != 2 {
		t.Errorf("evicted{reason=max_connections} = %v, want 2", n)
	}
	if !strings.Contains(ts.logs.String(), "closed to make room") {
		t.Error("no eviction log line")
	}
}

// TestServerEvictionRace: a connection chosen for eviction that has
// just begun a request is closed, not answered, and never counted twice.
func TestServerEvictionRace(t *testing.T) {
	const max = 4
	ts, _ := srvPeerServer(t, ServerConfig{MaxConns: max})
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			d := net.Dialer{Timeout: srvTestWait, LocalAddr: &net.TCPAddr{IP: net.ParseIP(srvPostfixIP)}}
			c, err := d.Dial("tcp", ts.addr)
			if err != nil {
				return
			}
			_ = c.SetDeadline(time.Now().Add(srvTestWait))
			cl := &srvClient{Conn: c, r: bufio.NewReader(c)}
			_, _ = cl.ask(policyFullRequest) // answered, or closed to make room
			_ = c.Close()
		}
	}()
	var clients []*srvClient
	for range 50 {
		c := srvDialFrom(t, srvPostfixIP, ts.addr)
		_, _ = c.ask(policyFullRequest)
		clients = append(clients, c)
		if n := ts.activeConns(); n > max {
			t.Fatalf("ActiveConns() = %d > %d", n, max)
		}
	}
	close(stop)
	for _, c := range clients {
		_ = c.Close()
	}
	<-done
	srvWaitFor(t, "no connections", func() bool { return ts.activeConns() == 0 })
}
