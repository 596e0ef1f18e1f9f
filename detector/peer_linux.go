package detector

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// unixPeerUID returns the user of the process that connected c, as the
// kernel recorded it at connect(2).
func unixPeerUID(c *net.UnixConn) (uint32, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if credErr != nil {
		return 0, fmt.Errorf("SO_PEERCRED: %w", credErr)
	}
	return cred.Uid, nil
}

// tcpPeerUID finds the socket on this host whose local end is peer and
// remote end is us, and returns its owner. found is false when there is no
// such socket: the peer is on another host. A socket no process holds
// (a client that closed already, or a kernel time-wait entry, shown as
// uid 0) is an error.
//
// It asks sock_diag for exactly that socket, and reads /proc/net/tcp and
// /proc/net/tcp6 when sock_diag cannot answer (no inet_diag module).
func tcpPeerUID(ctx context.Context, peer, us netip.AddrPort) (uid uint32, found bool, err error) {
	sock, found, diagErr := sockDiagFind(ctx, peer, us)
	if diagErr == nil && !found {
		// The kernel's ENOENT also means "no inet_diag module". Our own
		// end of the connection exists: when sock_diag finds it, the
		// peer's socket is truly not on this host, and reading /proc
		// (milliseconds on a busy host) is not needed.
		if _, ours, err := sockDiagFind(ctx, us, peer); err == nil && ours {
			return 0, false, nil
		}
	}
	if diagErr != nil || !found {
		var procErr error
		sock, found, procErr = procNetFind(peer, us)
		if procErr != nil {
			return 0, false, errors.Join(diagErr, procErr)
		}
	}
	if found && !sock.owned() {
		return 0, false, fmt.Errorf("%w: state %d", errPeerNotEstablished, sock.state)
	}
	return sock.uid, found, nil
}

// procNetFind looks for the socket in /proc/net/tcp, then /proc/net/tcp6
// (which holds IPv6 sockets, v4-mapped ones included).
func procNetFind(local, remote netip.AddrPort) (tcpSocket, bool, error) {
	files := []string{"/proc/net/tcp6"}
	if local.Addr().Unmap().Is4() {
		files = []string{"/proc/net/tcp", "/proc/net/tcp6"}
	}
	for _, name := range files {
		f, err := os.Open(name)
		if errors.Is(err, os.ErrNotExist) && name == "/proc/net/tcp6" {
			continue // no IPv6 in this kernel
		}
		if err != nil {
			return tcpSocket{}, false, err
		}
		sock, found, err := procNetTCPFind(f, local, remote)
		_ = f.Close()
		if err != nil || found {
			return sock, found, err
		}
	}
	return tcpSocket{}, false, nil
}

// sock_diag wire format (linux/inet_diag.h).
const (
	nlmsgHdrLen     = 16
	inetDiagReqLen  = 56 // struct inet_diag_req_v2
	inetDiagMsgLen  = 72 // struct inet_diag_msg
	inetDiagSeq     = 1
	inetDiagNoCooki = 0xffffffff
)

// sockDiagFind asks the kernel (NETLINK_SOCK_DIAG, an exact lookup by the
// four-tuple) for the TCP socket whose local end is local and remote end
// is remote.
func sockDiagFind(ctx context.Context, local, remote netip.AddrPort) (sock tcpSocket, found bool, err error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return tcpSocket{}, false, fmt.Errorf("sock_diag: %w", err)
	}
	defer func() { _ = unix.Close(fd) }()
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(peerLookupTimeout) // never without one
	}
	wait := max(time.Until(deadline), time.Millisecond)
	tv := unix.NsecToTimeval(wait.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return tcpSocket{}, false, fmt.Errorf("sock_diag: %w", err)
	}
	if err := unix.Sendto(fd, inetDiagRequest(local, remote), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return tcpSocket{}, false, fmt.Errorf("sock_diag: send: %w", err)
	}
	buf := make([]byte, 8192)
	for {
		n, from, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return tcpSocket{}, false, fmt.Errorf("sock_diag: receive: %w", err)
		}
		if nl, ok := from.(*unix.SockaddrNetlink); !ok || nl.Pid != 0 {
			continue // not from the kernel
		}
		sock, found, done, err := inetDiagParse(buf[:n], local, remote)
		if done || err != nil {
			return sock, found, err
		}
	}
}

// inetDiagRequest builds the netlink message asking for one TCP socket by
// its four-tuple: nlmsghdr, then struct inet_diag_req_v2.
func inetDiagRequest(local, remote netip.AddrPort) []byte {
	b := make([]byte, nlmsgHdrLen+inetDiagReqLen)
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], uint32(len(b)))
	ne.PutUint16(b[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(b[6:], unix.NLM_F_REQUEST)
	ne.PutUint32(b[8:], inetDiagSeq)
	r := b[nlmsgHdrLen:]
	family := unix.AF_INET6
	la, ra := local.Addr().Unmap(), remote.Addr().Unmap()
	if la.Is4() && ra.Is4() {
		family = unix.AF_INET
	}
	r[0] = byte(family)
	r[1] = unix.IPPROTO_TCP
	ne.PutUint32(r[4:], 0xffffffff) // every state; an exact lookup ignores it
	id := r[8:]
	binary.BigEndian.PutUint16(id[0:], local.Port())
	binary.BigEndian.PutUint16(id[2:], remote.Port())
	if family == unix.AF_INET {
		src, dst := la.As4(), ra.As4()
		copy(id[4:], src[:])
		copy(id[20:], dst[:])
	} else {
		src, dst := la.As16(), ra.As16()
		copy(id[4:], src[:])
		copy(id[20:], dst[:])
	}
	ne.PutUint32(id[36:], 0) // any interface
	ne.PutUint32(id[40:], inetDiagNoCooki)
	ne.PutUint32(id[44:], inetDiagNoCooki)
	return b
}

// inetDiagParse reads the kernel's answer to inetDiagRequest. done is true
// once the answer is complete: a socket (found), or an error message
// (ENOENT: not found).
func inetDiagParse(b []byte, local, remote netip.AddrPort) (sock tcpSocket, found, done bool, err error) {
	ne := binary.NativeEndian
	for len(b) >= nlmsgHdrLen {
		l := int(ne.Uint32(b[0:]))
		typ := ne.Uint16(b[4:])
		seq := ne.Uint32(b[8:])
		if l < nlmsgHdrLen || l > len(b) {
			return tcpSocket{}, false, true, fmt.Errorf("sock_diag: malformed answer (length %d of %d)", l, len(b))
		}
		msg := b[nlmsgHdrLen:l]
		b = b[min(len(b), (l+3)&^3):]
		if seq != inetDiagSeq {
			continue
		}
		switch typ {
		case unix.NLMSG_ERROR:
			if len(msg) < 4 {
				return tcpSocket{}, false, true, errors.New("sock_diag: short error answer")
			}
			errno := -int32(ne.Uint32(msg))
			if errno == int32(unix.ENOENT) {
				return tcpSocket{}, false, true, nil
			}
			return tcpSocket{}, false, true, fmt.Errorf("sock_diag: %w", unix.Errno(errno))
		case unix.SOCK_DIAG_BY_FAMILY:
			if len(msg) < inetDiagMsgLen {
				return tcpSocket{}, false, true, errors.New("sock_diag: short answer")
			}
			// The kernel answers for the socket it found; check it is the one
			// asked for.
			if got := inetDiagAnswerPorts(msg); got != [2]uint16{local.Port(), remote.Port()} {
				return tcpSocket{}, false, true, fmt.Errorf("sock_diag: answer for ports %v, asked %d,%d", got, local.Port(), remote.Port())
			}
			return tcpSocket{uid: ne.Uint32(msg[64:]), state: msg[1], inode: uint64(ne.Uint32(msg[68:]))}, true, true, nil
		}
	}
	return tcpSocket{}, false, false, nil
}

func inetDiagAnswerPorts(msg []byte) [2]uint16 {
	return [2]uint16{binary.BigEndian.Uint16(msg[4:]), binary.BigEndian.Uint16(msg[6:])}
}
