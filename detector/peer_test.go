package detector

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// peerPair returns both ends of a fresh connection on network/addr:
// the client's and the one the listener accepted.
func peerPair(t *testing.T, network, addr string) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Skipf("cannot listen on %s %s: %v", network, addr, err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	client, err = net.DialTimeout(network, ln.Addr().String(), srvTestWait)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	server, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = server.Close() })
	return client, server
}

func tcpAddrPort(a net.Addr) netip.AddrPort { return a.(*net.TCPAddr).AddrPort() }

func TestSystemPeersLocal(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("peer identification needs Linux")
	}
	me := uint32(os.Geteuid())
	for _, tc := range []struct{ network, addr string }{
		{"tcp", "127.0.0.1:0"},
		{"tcp", "[::1]:0"},
		{"tcp", "[::]:0"}, // a v4 client on a dual-stack listener: v4-mapped addresses
		{"unix", filepath.Join(t.TempDir(), "s.sock")},
	} {
		t.Run(tc.network+" "+tc.addr, func(t *testing.T) {
			var client, server net.Conn
			if tc.addr == "[::]:0" {
				ln, err := net.Listen("tcp", tc.addr)
				if err != nil {
					t.Skip(err)
				}
				defer ln.Close()
				_, port, _ := net.SplitHostPort(ln.Addr().String())
				client, err = net.Dial("tcp4", "127.0.0.1:"+port)
				if err != nil {
					t.Fatal(err)
				}
				defer client.Close()
				server, err = ln.Accept()
				if err != nil {
					t.Fatal(err)
				}
				defer server.Close()
			} else {
				client, server = peerPair(t, tc.network, tc.addr)
			}
			p, err := SystemPeers{}.Identify(context.Background(), server)
			if err != nil {
				t.Fatal(err)
			}
			if !p.Local || p.UID != me {
				t.Fatalf("Identify = %+v, want local uid %d", p, me)
			}
			if tc.network != "tcp" {
				return
			}
			// Both ways to find the owner work on their own.
			peer, us := unmapPort(tcpAddrPort(server.RemoteAddr())), unmapPort(tcpAddrPort(server.LocalAddr()))
			sock, found, err := sockDiagFind(context.Background(), peer, us)
			if err != nil || !found || sock.uid != me || sock.state != tcpEstablished || sock.inode == 0 {
				t.Errorf("sock_diag: %+v found %v err %v", sock, found, err)
			}
			// Our own end is found too: that tells a missing peer socket
			// from a kernel without sock_diag.
			if _, found, err := sockDiagFind(context.Background(), us, peer); err != nil || !found {
				t.Errorf("sock_diag, our own end: found %v err %v", found, err)
			}
			sock, found, err = procNetFind(peer, us)
			if err != nil || !found || sock.uid != me || sock.state != tcpEstablished || sock.inode == 0 {
				t.Errorf("/proc/net/tcp: %+v found %v err %v", sock, found, err)
			}
			_ = client
		})
	}
}

// TestSystemPeersClosedClient: a loopback client that connected, wrote
// and closed before it was looked at is refused, never taken for the
// owner the kernel shows for what is left of its socket. One that only
// half-closed still holds its socket and is identified.
func TestSystemPeersClosedClient(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("peer identification needs Linux")
	}
	client, server := peerPair(t, "tcp", "127.0.0.1:0")
	_, _ = client.Write([]byte("request=smtpd_access_policy\n\n"))
	_ = client.(*net.TCPConn).CloseWrite()
	if p, err := (SystemPeers{}).Identify(context.Background(), server); err != nil || p.UID != uint32(os.Geteuid()) {
		t.Fatalf("half-closed client: %+v, %v", p, err)
	}
	_ = client.Close()
	deadline := time.Now().Add(srvTestWait)
	for {
		_, err := SystemPeers{}.Identify(context.Background(), server)
		if err != nil {
			if !errors.Is(err, errPeerNotEstablished) && !strings.Contains(err.Error(), "closed") {
				t.Fatalf("unexpected error %v", err)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("a closed client is still identified")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestSystemPeersOtherConn(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if _, err := (SystemPeers{}).Identify(context.Background(), a); err == nil {
		t.Fatal("a net.Pipe peer was identified")
	}
}

// procNetSample is /proc/net/tcp as a little-endian kernel prints it,
// and its twin in /proc/net/tcp6.
const procNetSample = `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2738 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 571 1 0000000039028724 100 0 0 10 0
   1: 0100007F:9C48 0100007F:2738 01 00000000:00000000 00:00000000 00000000 65534        0 9121 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:2738 0100007F:9C48 01 00000000:00000000 00:00000000 00000000     0        0 9122 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:9C49 0100007F:2738 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
`

const procNet6Sample = `  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:2738 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000   107        0 600 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:A000 00000000000000000000000001000000:2738 01 00000000:00000000 00:00000000 00000000   107        0 601 1 0000000000000000 20 4 30 10 -1
   2: 0000000000000000FFFF00000100007F:A001 0000000000000000FFFF00000100007F:2738 01 00000000:00000000 00:00000000 00000000  1000        0 602 1 0000000000000000 20 4 30 10 -1
`

func TestProcNetTCPFind(t *testing.T) {
	if !littleEndian() {
		t.Skip("the samples are as a little-endian kernel prints them")
	}
	ap := netip.MustParseAddrPort
	for _, tc := range []struct {
		name          string
		table         string
		local, remote string
		uid           uint32
		state         uint8
		found         bool
		err           string
	}{
		{"v4 client", procNetSample, "127.0.0.1:40008", "127.0.0.1:10040", 65534, 1, true, ""},
		{"v4 server side", procNetSample, "127.0.0.1:10040", "127.0.0.1:40008", 0, 1, true, ""},
		{"v4 time-wait", procNetSample, "127.0.0.1:40009", "127.0.0.1:10040", 0, 6, true, ""},
		{"v4 absent", procNetSample, "127.0.0.1:40010", "127.0.0.1:10040", 0, 0, false, ""},
		{"v4 other side port", procNetSample, "127.0.0.1:40008", "127.0.0.1:10041", 0, 0, false, ""},
		{"v6 client", procNet6Sample, "[::1]:40960", "[::1]:10040", 107, 1, true, ""},
		{"v4-mapped client", procNet6Sample, "127.0.0.1:40961", "127.0.0.1:10040", 1000, 1, true, ""},
		{"v4-mapped asked mapped", procNet6Sample, "[::ffff:127.0.0.1]:40961", "[::ffff:127.0.0.1]:10040", 1000, 1, true, ""},
		{"empty", "", "127.0.0.1:1", "127.0.0.1:2", 0, 0, false, ""},
		{"header only", "  sl  local_address rem_address st\n", "127.0.0.1:1", "127.0.0.1:2", 0, 0, false, ""},
		{"short line", procNetSample + "   4: 0100007F:9C49\n", "127.0.0.1:1", "127.0.0.1:2", 0, 0, false, "malformed line"},
		{"bad inode", "   0: 0100007F:2738 0100007F:2738 01 0 0 0 0 0 x\n", "127.0.0.1:1", "127.0.0.1:2", 0, 0, false, "line"},
		{"bad address", "   0: 0100007G:2738 0100007F:2738 01 0 0 0 0 0 0\n", "127.0.0.1:1", "127.0.0.1:2", 0, 0, false, "bad address"},
		{"bad uid", "   0: 0100007F:2738 0100007F:2738 01 0 0 0 -1 0 0\n", "127.0.0.1:1", "127.0.0.1:2", 0, 0, false, "line"},
		{"bad state", "   0: 0100007F:2738 0100007F:2738 1FF 0 0 0 0 0 0\n", "127.0.0.1:1", "127.0.0.1:2", 0, 0, false, "line"},
		{"odd address length", "   0: 0100007F00:2738 0100007F:2738 01 0 0 0 0 0 0\n", "127.0.0.1:1", "127.0.0.1:2", 0, 0, false, "bad address"},
		{"no sl colon", "   0 0100007F:2738 0100007F:2738 01 0 0 0 0 0 0\n", "127.0.0.1:1", "127.0.0.1:2", 0, 0, false, "malformed"},
		{"line too long", strings.Repeat("x", 2*procNetMaxLine), "127.0.0.1:1", "127.0.0.1:2", 0, 0, false, "too long"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock, found, err := procNetTCPFind(strings.NewReader(tc.table), ap(tc.local), ap(tc.remote))
			uid, st := sock.uid, sock.state
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || uid != tc.uid || st != tc.state || found != tc.found {
				t.Fatalf("= uid %d state %d found %v err %v; want uid %d state %d found %v",
					uid, st, found, err, tc.uid, tc.state, tc.found)
			}
		})
	}
}

func putNative32(b []byte, v uint32) { binary.NativeEndian.PutUint32(b, v) }
func putNative16(b []byte, v uint16) { binary.NativeEndian.PutUint16(b, v) }

func littleEndian() bool {
	a, _ := procNetAddrPort("0100007F:0001")
	return a.Addr() == netip.MustParseAddr("127.0.0.1")
}

// FuzzProcNetTCPFind: any table parses to a result or an error, never a
// panic; a found socket is the one asked for.
func FuzzProcNetTCPFind(f *testing.F) {
	f.Add(procNetSample, "127.0.0.1:40008", "127.0.0.1:10040")
	f.Add(procNet6Sample, "[::1]:40960", "[::1]:10040")
	f.Add("   0: 0100007F:2738 0100007F:2738 01 0 0 0 7 0 0\n", "127.0.0.1:10040", "127.0.0.1:10040")
	f.Fuzz(func(t *testing.T, table, local, remote string) {
		l, err1 := netip.ParseAddrPort(local)
		r, err2 := netip.ParseAddrPort(remote)
		if err1 != nil || err2 != nil {
			return
		}
		_, found, err := procNetTCPFind(strings.NewReader(table), l, r)
		if found && err != nil {
			t.Fatal("found and an error")
		}
		if found && !strings.Contains(strings.ToUpper(table), strings.ToUpper(procNetPortHex(l.Port()))) {
			t.Fatalf("found port %d that the table does not hold", l.Port())
		}
	})
}

func procNetPortHex(p uint16) string {
	const digits = "0123456789ABCDEF"
	return string([]byte{':', digits[p>>12], digits[p>>8&15], digits[p>>4&15], digits[p&15]})
}

func TestInetDiagParse(t *testing.T) {
	local, remote := netip.MustParseAddrPort("127.0.0.1:40008"), netip.MustParseAddrPort("127.0.0.1:10040")
	req := inetDiagRequest(local, remote)
	if len(req) != nlmsgHdrLen+inetDiagReqLen {
		t.Fatalf("request is %d bytes", len(req))
	}
	answer := func(typ uint16, seq uint32, body []byte) []byte {
		b := make([]byte, nlmsgHdrLen, nlmsgHdrLen+len(body))
		b = append(b, body...)
		putNative32(b[0:], uint32(len(b)))
		putNative16(b[4:], typ)
		putNative32(b[8:], seq)
		return b
	}
	msg := make([]byte, inetDiagMsgLen)
	msg[0], msg[1] = 2, tcpEstablished
	copy(msg[4:], req[nlmsgHdrLen+8:nlmsgHdrLen+8+48]) // the same socket id
	putNative32(msg[64:], 65534)
	enoent := make([]byte, 4+nlmsgHdrLen)
	putNative32(enoent, uint32(0xfffffffe)) // -ENOENT
	eperm := make([]byte, 4+nlmsgHdrLen)
	putNative32(eperm, uint32(0xffffffff)) // -EPERM
	other := append([]byte(nil), msg...)
	other[5]++ // another local port

	for _, tc := range []struct {
		name        string
		in          []byte
		uid         uint32
		found, done bool
		err         string
	}{
		{"socket", answer(20, 1, msg), 65534, true, true, ""},
		{"not found", answer(2, 1, enoent), 0, false, true, ""},
		{"other error", answer(2, 1, eperm), 0, false, true, "operation not permitted"},
		{"other sequence then socket", append(answer(20, 7, msg), answer(20, 1, msg)...), 65534, true, true, ""},
		{"other socket", answer(20, 1, other), 0, false, true, "answer for ports"},
		{"short", answer(20, 1, msg[:10]), 0, false, true, "short"},
		{"bad length", []byte{200, 0, 0, 0, 20, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0}, 0, false, true, "malformed"},
		{"nothing", nil, 0, false, false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if !littleEndian() && tc.name == "bad length" {
				t.Skip("little-endian sample")
			}
			sock, found, done, err := inetDiagParse(tc.in, local, remote)
			uid := sock.uid
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || uid != tc.uid || found != tc.found || done != tc.done {
				t.Fatalf("= %d %v %v %v", uid, found, done, err)
			}
		})
	}
}

func TestTCPSocketOwned(t *testing.T) {
	for _, tc := range []struct {
		sock tcpSocket
		want bool
	}{
		{tcpSocket{state: tcpEstablished, inode: 9}, true},
		{tcpSocket{state: tcpEstablished}, true},
		{tcpSocket{state: tcpFinWait1, inode: 9}, true}, // half-closed, still held
		{tcpSocket{state: tcpFinWait2, inode: 9}, true},
		{tcpSocket{state: tcpFinWait1}, false},  // closed: orphaned
		{tcpSocket{state: tcpFinWait2}, false},  // maybe a time-wait entry, uid 0
		{tcpSocket{state: 6, inode: 9}, false},  // TIME_WAIT
		{tcpSocket{state: 7, inode: 9}, false},  // CLOSE
		{tcpSocket{state: 8, inode: 9}, false},  // CLOSE_WAIT
		{tcpSocket{state: 10, inode: 9}, false}, // LISTEN
		{tcpSocket{state: 12, inode: 9}, false}, // NEW_SYN_RECV
	} {
		if got := tc.sock.owned(); got != tc.want {
			t.Errorf("%+v.owned() = %v, want %v", tc.sock, got, tc.want)
		}
	}
}

func TestPeerAccess(t *testing.T) {
	me := uint32(os.Geteuid())
	a := newPeerAccess([]uint32{107}, []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("0.0.0.0/0")})
	def := newPeerAccess(nil, nil)
	ip := netip.MustParseAddr
	for _, tc := range []struct {
		name   string
		access *peerAccess
		peer   Peer
		want   string
	}{
		{"postfix", a, Peer{Local: true, UID: 107}, ""},
		{"own user", a, Peer{Local: true, UID: me}, ""},
		{"nobody", a, Peer{Local: true, UID: 65534}, refuseUser},
		{"root not listed", a, Peer{Local: true, UID: 0}, map[bool]string{true: "", false: refuseUser}[me == 0]},
		{"root by default", def, Peer{Local: true, UID: 0}, ""},
		{"nobody by default", def, Peer{Local: true, UID: 65534}, refuseUser},
		{"remote listed", a, Peer{Addr: ip("192.0.2.9")}, ""},
		{"remote mapped", a, Peer{Addr: ip("::ffff:192.0.2.9")}, ""},
		{"remote by default", def, Peer{Addr: ip("192.0.2.9")}, refuseNetwork},
		{"v6 remote not listed", a, Peer{Addr: ip("2001:db8::1")}, refuseNetwork},
		{"loopback never by network", a, Peer{Addr: ip("127.0.0.1")}, refuseUnidentified},
		{"mapped loopback never by network", a, Peer{Addr: ip("::ffff:127.0.0.1")}, refuseUnidentified},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.access.check(tc.peer); got != tc.want {
				t.Fatalf("check(%v) = %q, want %q", tc.peer, got, tc.want)
			}
		})
	}
}

func TestLogLimiter(t *testing.T) {
	l := logLimiter{interval: time.Second}
	t0 := time.Unix(1000, 0)
	if n, ok := l.allow(t0); !ok || n != 1 {
		t.Fatalf("first: %d %v", n, ok)
	}
	for i := range 5 {
		if _, ok := l.allow(t0.Add(time.Duration(i) * 100 * time.Millisecond)); ok {
			t.Fatal("a second line within the interval")
		}
	}
	if n, ok := l.allow(t0.Add(time.Second)); !ok || n != 6 {
		t.Fatalf("after the interval: %d %v, want 6 true", n, ok)
	}
}

// BenchmarkIdentifyTCP measures what identifying a loopback TCP peer costs
// each new connection: sock_diag, and the /proc/net/tcp fallback alone.
func BenchmarkIdentifyTCP(b *testing.B) {
	if runtime.GOOS != "linux" {
		b.Skip("peer identification needs Linux")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer client.Close()
	server, err := ln.Accept()
	if err != nil {
		b.Fatal(err)
	}
	defer server.Close()
	peer, us := tcpAddrPort(server.RemoteAddr()), tcpAddrPort(server.LocalAddr())
	b.Run("sock_diag", func(b *testing.B) {
		for b.Loop() {
			if _, found, err := sockDiagFind(context.Background(), peer, us); err != nil || !found {
				b.Fatal(found, err)
			}
		}
	})
	b.Run("proc", func(b *testing.B) {
		for b.Loop() {
			if _, found, err := procNetFind(peer, us); err != nil || !found {
				b.Fatal(found, err)
			}
		}
	})
}
