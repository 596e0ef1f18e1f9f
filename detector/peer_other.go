//go:build !linux

package detector

import (
	"context"
	"errors"
	"net"
	"net/netip"
)

var errPeerUnsupported = errors.New("peer identification needs Linux")

// unixPeerUID cannot tell a unix socket's peer outside Linux: such
// connections are refused.
func unixPeerUID(*net.UnixConn) (uint32, error) { return 0, errPeerUnsupported }

// tcpPeerUID finds no local sockets outside Linux: loopback peers are
// refused, remote ones judged by address.
func tcpPeerUID(context.Context, netip.AddrPort, netip.AddrPort) (uint32, bool, error) {
	return 0, false, nil
}
