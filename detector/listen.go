package detector

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"
	"time"
)

// Listen opens the listener for one policy.listen address: "host:port"
// listens on TCP, "unix:/path" on a Unix domain socket.
//
// For a Unix socket, a file left at the path by an earlier run is removed
// first, but only when it is a socket and nothing accepts connections on
// it; any other file, or a socket in use, is an error naming the path.
// The new socket's permissions are set to socketMode (only its permission
// bits count); a socketMode of 0 keeps what the process umask gave. The
// socket file is removed when the listener is closed.
func Listen(addr string, socketMode os.FileMode) (net.Listener, error) {
	path, ok := strings.CutPrefix(addr, "unix:")
	if !ok {
		if addr == "" {
			return nil, errors.New("detector: listen: empty address")
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("detector: listen %q: %w", addr, err)
		}
		return ln, nil
	}
	if path == "" {
		return nil, fmt.Errorf("detector: listen %q: empty socket path", addr)
	}
	if err := srvRemoveStaleSocket(path); err != nil {
		return nil, err
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("detector: listen on socket %s: %w", path, err)
	}
	if socketMode != 0 {
		if err := os.Chmod(path, socketMode.Perm()); err != nil {
			_ = ln.Close()
			return nil, fmt.Errorf("detector: listen on socket %s: set mode %v: %w", path, socketMode.Perm(), err)
		}
	}
	return ln, nil
}

// srvRemoveStaleSocket removes the socket file at path when no process
// listens on it. A missing file is fine; anything else at path is an error.
func srvRemoveStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("detector: listen on socket %s: %w", path, err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("detector: listen on socket %s: the path exists and is not a socket", path)
	}
	conn, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		_ = conn.Close()
		return fmt.Errorf("detector: listen on socket %s: another process is listening on it", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("detector: listen on socket %s: cannot tell whether the existing socket is in use: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("detector: listen on socket %s: remove stale socket: %w", path, err)
	}
	return nil
}
