package detector

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync/atomic"
	"time"
)

// Peer is the other end of a policy connection.
type Peer struct {
	// Local is set when the peer is a process on this host: a unix
	// socket client, or a TCP client whose socket was found on this host.
	// UID is then the user it runs as (the owner of its socket).
	Local bool
	UID   uint32

	// Addr is a TCP peer's address; the zero Addr for a unix socket.
	Addr netip.Addr
}

// String is the peer as log lines show it: "uid 107" or "192.0.2.7".
func (p Peer) String() string {
	if p.Local {
		return "uid " + strconv.FormatUint(uint64(p.UID), 10)
	}
	return p.Addr.String()
}

// key is what MaxConnsPerPeer counts by: the user of a local peer (all its
// processes and sockets together), the address of a remote one.
func (p Peer) key() Peer {
	if p.Local {
		return Peer{Local: true, UID: p.UID}
	}
	return Peer{Addr: p.Addr.Unmap()}
}

// peerLookupTimeout bounds the identification of one peer.
const peerLookupTimeout = time.Second

// PeerIdentifier tells who is at the other end of a connection. The
// Server's default, SystemPeers, asks the kernel.
type PeerIdentifier interface {
	// Identify returns the peer of c, or an error when it cannot be told;
	// the connection is then refused. It must honour ctx's deadline.
	Identify(ctx context.Context, c net.Conn) (Peer, error)
}

// SystemPeers identifies peers the way the kernel knows them: a unix
// socket client by its credentials (SO_PEERCRED), a TCP client by the
// owner of its socket when that socket is on this host (sock_diag, with
// /proc/net/tcp and /proc/net/tcp6 as a fallback). A TCP client whose
// socket is not on this host is remote: only its address is known. A
// loopback client whose socket cannot be found (it closed already) is an
// error, never a remote peer. Outside Linux only unix sockets and remote
// TCP clients can be identified.
type SystemPeers struct{}

// Identify implements PeerIdentifier.
func (SystemPeers) Identify(ctx context.Context, c net.Conn) (Peer, error) {
	switch c := c.(type) {
	case *net.UnixConn:
		uid, err := unixPeerUID(c)
		if err != nil {
			return Peer{}, fmt.Errorf("unix socket peer credentials: %w", err)
		}
		return Peer{Local: true, UID: uid}, nil
	case *net.TCPConn:
		remote := c.RemoteAddr().(*net.TCPAddr).AddrPort()
		local := c.LocalAddr().(*net.TCPAddr).AddrPort()
		p := Peer{Addr: remote.Addr().Unmap()}
		uid, found, err := tcpPeerUID(ctx, unmapPort(remote), unmapPort(local))
		switch {
		case err != nil:
			return Peer{}, fmt.Errorf("owner of TCP peer %s: %w", remote, err)
		case found:
			p.Local, p.UID = true, uid
		case p.Addr.IsLoopback() || p.Addr == local.Addr().Unmap():
			// A local process that closed before we looked: who it was is
			// unknown, and it must not pass for a remote peer.
			return Peer{}, fmt.Errorf("owner of TCP peer %s: no such socket on this host (closed)", remote)
		}
		return p, nil
	default:
		return Peer{}, fmt.Errorf("cannot identify a %T peer", c)
	}
}

func unmapPort(a netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
}

// errPeerNotEstablished is the error for a peer socket found in another
// state than ESTABLISHED: a client that already closed, or a kernel
// time-wait entry, which has no owner (it shows as uid 0).
var errPeerNotEstablished = errors.New("peer socket is not established (client closed)")

// peerAccess is who may connect.
type peerAccess struct {
	uids     map[uint32]bool
	networks []netip.Prefix
}

func newPeerAccess(uids []uint32, networks []netip.Prefix) *peerAccess {
	a := &peerAccess{uids: map[uint32]bool{uint32(os.Geteuid()): true}}
	if len(uids) == 0 {
		a.uids[0] = true
	}
	for _, u := range uids {
		a.uids[u] = true
	}
	for _, n := range networks {
		a.networks = append(a.networks, n.Masked())
	}
	return a
}

// refusal reasons: the values of the metric's reason label.
const (
	refuseUnidentified = "unidentified"    // the peer could not be told
	refuseUser         = "user"            // a local user not in AllowUIDs
	refuseNetwork      = "network"         // a remote address not in AllowNetworks
	refusePerPeer      = "per_peer"        // MaxConnsPerPeer busy connections
	refuseMaxConns     = "max_connections" // MaxConns busy connections
)

var refuseReasons = []string{refuseUnidentified, refuseUser, refuseNetwork, refusePerPeer, refuseMaxConns}

// check returns why p may not connect, or "".
func (a *peerAccess) check(p Peer) string {
	if p.Local {
		if a.uids[p.UID] {
			return ""
		}
		return refuseUser
	}
	addr := p.Addr.Unmap()
	if addr.IsLoopback() {
		return refuseUnidentified // loopback peers are local processes: only by user
	}
	if slices.ContainsFunc(a.networks, func(n netip.Prefix) bool { return n.Contains(addr) }) {
		return ""
	}
	return refuseNetwork
}

// logLimiter lets one log line through per interval and counts the ones
// it held back, so that a flood of refused connections cannot flood the
// log.
type logLimiter struct {
	interval time.Duration
	last     atomic.Int64 // UnixNano of the last line let through
	held     atomic.Int64 // events since then
}

// allow counts one event and reports whether to log it, and how many
// events (this one included) the line stands for.
func (l *logLimiter) allow(now time.Time) (int64, bool) {
	l.held.Add(1)
	last := l.last.Load()
	if now.UnixNano()-last < int64(l.interval) || !l.last.CompareAndSwap(last, now.UnixNano()) {
		return 0, false
	}
	return l.held.Swap(0), true
}
