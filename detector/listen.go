package detector

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ListenConfig says how [ListenConfig.Listen] makes Unix domain sockets.
type ListenConfig struct {
	// SocketMode is the socket's permission bits; 0 keeps what the
	// process umask gave.
	SocketMode os.FileMode
	// SocketGroup, a group name or numeric gid, is given the socket, and
	// the socket's directory when Listen creates it; "" keeps the
	// process's group. With SocketMode 0660 it lets that group (Postfix's
	// smtpd, group postfix) connect and nobody else.
	SocketGroup string
}

// Listen opens the listener for one policy.listen address with mode
// socketMode for Unix sockets; see [ListenConfig.Listen].
func Listen(addr string, socketMode os.FileMode) (net.Listener, error) {
	return ListenConfig{SocketMode: socketMode}.Listen(addr)
}

// Listen opens the listener for one policy.listen address: "host:port"
// listens on TCP, "unix:/path" on a Unix domain socket.
//
// For a Unix socket, the socket's directory is created when missing (its
// parent must exist), mode 0750 and group SocketGroup, so that only that
// group can reach the socket; an existing directory that every user may
// write to is refused, sticky bit or not, as anyone could replace the
// socket. A file left at the path by an earlier run is removed first, but
// only when it is a socket and nothing accepts connections on it; any
// other file, or a socket in use, is an error naming the path. The new
// socket gets SocketMode and SocketGroup. The socket file is removed when
// the listener is closed.
func (lc ListenConfig) Listen(addr string) (net.Listener, error) {
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
	gid := -1
	if lc.SocketGroup != "" {
		g, err := lookupGroup(lc.SocketGroup)
		if err != nil {
			return nil, fmt.Errorf("detector: listen on socket %s: socket group: %w", path, err)
		}
		gid = g
	}
	if err := socketDir(filepath.Dir(path), lc.SocketGroup, gid); err != nil {
		return nil, fmt.Errorf("detector: listen on socket %s: %w", path, err)
	}
	if err := srvRemoveStaleSocket(path); err != nil {
		return nil, err
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("detector: listen on socket %s: %w", path, err)
	}
	if gid >= 0 {
		if err := setGroup(path, lc.SocketGroup, gid); err != nil {
			_ = ln.Close()
			return nil, fmt.Errorf("detector: listen on socket %s: %w", path, err)
		}
	}
	if lc.SocketMode != 0 {
		if err := os.Chmod(path, lc.SocketMode.Perm()); err != nil {
			_ = ln.Close()
			return nil, fmt.Errorf("detector: listen on socket %s: set mode %v: %w", path, lc.SocketMode.Perm(), err)
		}
	}
	return ln, nil
}

// lookupGroup returns the gid of a group name or number.
func lookupGroup(name string) (int, error) {
	if n, err := strconv.Atoi(name); err == nil && n >= 0 {
		return n, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(g.Gid)
}

// socketDir makes sure the socket's directory dir exists and is fit: a
// missing one is created 0750 with group gid (if >= 0); one every user
// may write to is refused.
func socketDir(dir, group string, gid int) error {
	fi, err := os.Stat(dir)
	if errors.Is(err, os.ErrNotExist) {
		if err := os.Mkdir(dir, 0o750); err != nil {
			g := group
			if g == "" {
				g = "GROUP"
			}
			return fmt.Errorf("create directory %s: %w; fix: create it as root, owned by the user rcptguard runs as, group %s, mode 2750 (contrib/tmpfiles.d/rcptguard.conf does)", dir, err, g)
		}
		if err := os.Chmod(dir, 0o750); err != nil {
			return fmt.Errorf("directory %s: %w", dir, err)
		}
		if gid >= 0 {
			return setGroup(dir, group, gid)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("directory %s: %w", dir, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory", dir)
	}
	if fi.Mode().Perm()&0o002 != 0 {
		return fmt.Errorf("directory %s is writable by every user (mode %04o), who could replace the socket; fix: put the socket in a directory of its own, such as /var/spool/postfix/rcptguard (mode 0750, group postfix)", dir, fi.Mode().Perm())
	}
	return nil
}

// setGroup gives the file at path the group gid, unless it has it already
// (a setgid directory passes its group on).
func setGroup(path, group string, gid int) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return err
	}
	if g, ok := fileGID(fi); ok && g == gid {
		return nil
	}
	if err := os.Lchown(path, -1, gid); err != nil {
		return fmt.Errorf("set group %s of %s: %w; fix: run rcptguard as root or as a member of group %s (systemd: SupplementaryGroups=%s), or make the directory setgid with that group (chgrp %s DIR; chmod 2750 DIR)", group, path, err, group, group, group)
	}
	return nil
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
