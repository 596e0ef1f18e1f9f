package detector

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
)

// TCP states as sock_diag and /proc/net/tcp number them.
const (
	tcpEstablished = 1
	tcpFinWait1    = 4
	tcpFinWait2    = 5
)

// tcpSocket is what the kernel tells about one TCP socket.
type tcpSocket struct {
	uid   uint32
	state uint8
	inode uint64 // 0 once no process holds it
}

// owned reports whether the socket's uid is its owner's: an established
// socket, or one its client half-closed and still holds. A socket no
// process holds any more (inode 0) may be a kernel time-wait entry, which
// shows uid 0 whoever owned it.
func (s tcpSocket) owned() bool {
	switch s.state {
	case tcpEstablished:
		return true
	case tcpFinWait1, tcpFinWait2:
		return s.inode != 0
	}
	return false
}

// procNetMaxLine bounds a line of /proc/net/tcp{,6}; real ones are about
// 150 bytes.
const procNetMaxLine = 1024

// procNetTCPFind reads a /proc/net/tcp or /proc/net/tcp6 table and returns
// the socket whose local end is local and remote end is remote. found is false when no line has that pair. A line that does
// not parse is an error, so that a format the parser does not know is
// never taken for a missing socket.
//
// Addresses are printed as the kernel holds them in memory: each 32-bit
// word of the network-order address in hexadecimal, as a host-order
// number; ports as plain hexadecimal numbers.
func procNetTCPFind(r io.Reader, local, remote netip.AddrPort) (sock tcpSocket, found bool, err error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 256), procNetMaxLine)
	first := true
	for sc.Scan() {
		line := sc.Text()
		if first {
			first = false
			if strings.HasPrefix(strings.TrimSpace(line), "sl") {
				continue // the header
			}
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if len(f) < 10 || !strings.HasSuffix(f[0], ":") {
			return tcpSocket{}, false, fmt.Errorf("proc net tcp: malformed line %q", procNetQuote(line))
		}
		l, err1 := procNetAddrPort(f[1])
		rem, err2 := procNetAddrPort(f[2])
		st, err3 := strconv.ParseUint(f[3], 16, 8)
		u, err4 := strconv.ParseUint(f[7], 10, 32)
		ino, err5 := strconv.ParseUint(f[9], 10, 64)
		if err := errors.Join(err1, err2, err3, err4, err5); err != nil {
			return tcpSocket{}, false, fmt.Errorf("proc net tcp: line %q: %w", procNetQuote(line), err)
		}
		if unmapPort(l) == unmapPort(local) && unmapPort(rem) == unmapPort(remote) {
			return tcpSocket{uid: uint32(u), state: uint8(st), inode: ino}, true, nil
		}
	}
	if err := sc.Err(); err != nil {
		return tcpSocket{}, false, fmt.Errorf("proc net tcp: %w", err)
	}
	return tcpSocket{}, false, nil
}

// procNetAddrPort parses "0100007F:9C48" (IPv4) or a 32-digit IPv6
// address and its port.
func procNetAddrPort(s string) (netip.AddrPort, error) {
	a, p, ok := strings.Cut(s, ":")
	if !ok || len(p) != 4 || (len(a) != 8 && len(a) != 32) {
		return netip.AddrPort{}, fmt.Errorf("bad address %q", procNetQuote(s))
	}
	raw, err := hex.DecodeString(a)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("bad address %q", procNetQuote(s))
	}
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("bad port in %q", procNetQuote(s))
	}
	// Each word was printed as a host-order number: put it back in memory
	// order.
	for i := 0; i < len(raw); i += 4 {
		binary.NativeEndian.PutUint32(raw[i:], binary.BigEndian.Uint32(raw[i:]))
	}
	addr, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(addr, uint16(port)), nil
}

// procNetQuote makes a line from the table safe to show, and short.
func procNetQuote(s string) string {
	if len(s) > 200 {
		s = s[:200]
	}
	return strconv.QuoteToASCII(s)
}
