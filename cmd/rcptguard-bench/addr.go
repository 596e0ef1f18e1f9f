package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
)

// errNotLoopback is returned for an address that is neither on loopback
// nor a unix socket: the bench tools never send load anywhere else.
var errNotLoopback = errors.New("not a loopback address or unix socket")

// splitTarget checks a target or listen address, "host:port" or
// "unix:/path", and returns the network and address to dial or listen on.
// The host must be a loopback IP address (127.0.0.0/8, ::1) or
// "localhost"; nothing else is accepted, whatever it resolves to.
func splitTarget(addr string) (network, address string, err error) {
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		if p == "" {
			return "", "", fmt.Errorf("%q: empty socket path", addr)
		}
		return "unix", p, nil
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", "", fmt.Errorf("%q is not \"host:port\" or \"unix:/path\": %v", addr, err)
	}
	if port == "" {
		return "", "", fmt.Errorf("%q: no port", addr)
	}
	if host == "localhost" {
		return "tcp", net.JoinHostPort("127.0.0.1", port), nil
	}
	ip, err := netip.ParseAddr(host)
	if err != nil || !ip.Unmap().IsLoopback() {
		return "", "", fmt.Errorf("%q: %w", addr, errNotLoopback)
	}
	return "tcp", addr, nil
}
