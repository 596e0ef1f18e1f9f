//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package blocklist

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// Backoff bounds while waiting for the file lock.
const (
	lockWaitMin = time.Millisecond
	lockWaitMax = 50 * time.Millisecond
)

// oNoFollow makes opening a state file fail when its last component is a
// symbolic link: another user able to plant one must not redirect a write.
const oNoFollow = syscall.O_NOFOLLOW

// lockMode is the lock file's mode: only its owner (the directory's owner)
// and group may open it for writing, which the lock needs, so no other user
// can take the lock and stall every write.
const lockMode = 0o660

// lockFile takes an exclusive write lock on path (an open file description
// lock on Linux, flock(2) elsewhere), creating the file if needed, and
// waits for it until ctx is done. When ctx ends first, the error names the
// process holding the lock if it can be found. The returned function
// releases the lock. The lock file is never deleted: deleting it would let
// two writers lock two different files.
func lockFile(ctx context.Context, path string) (unlock func(), err error) {
	fd, err := openLockFile(path)
	if err != nil {
		return nil, err
	}
	wait := lockWaitMin
	var timer *time.Timer
	for {
		err := tryLock(fd)
		if err == nil {
			if timer != nil {
				timer.Stop()
			}
			return func() {
				// Closing the only descriptor releases the lock too;
				// unlocking first is explicit.
				_ = unlockFD(fd)
				fd.Close()
			}, nil
		}
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EAGAIN) && !errors.Is(err, syscall.EACCES) {
			fd.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if timer == nil {
			timer = time.NewTimer(wait)
		} else {
			timer.Reset(wait)
		}
		select {
		case <-ctx.Done():
			timer.Stop()
			holder := lockHolder(fd)
			fd.Close()
			if holder != "" {
				return nil, fmt.Errorf("lock %s: held by %s: %w", path, holder, context.Cause(ctx))
			}
			return nil, fmt.Errorf("lock %s: held by another process: %w", path, context.Cause(ctx))
		case <-timer.C:
		}
		wait = min(2*wait, lockWaitMax)
	}
}

// openLockFile opens path for writing, which the lock needs, without
// following a symbolic link, creating it with lockMode. A lock file made by
// root is given to the owner of its directory, so that the daemon, running
// as that user, can still lock it. A lock file that other users can open is
// narrowed to lockMode when it is ours, and refused when it is not.
func openLockFile(path string) (*os.File, error) {
	fd, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|oNoFollow, lockMode)
	if err == nil {
		if err := fd.Chmod(lockMode); err != nil {
			fd.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if os.Geteuid() == 0 {
			if dir, err := os.Stat(filepath.Dir(path)); err == nil {
				if st, ok := dir.Sys().(*syscall.Stat_t); ok && (st.Uid != 0 || st.Gid != 0) {
					_ = fd.Chown(int(st.Uid), int(st.Gid))
				}
			}
		}
		return fd, nil
	}
	if !errors.Is(err, fs.ErrExist) {
		return nil, lockOpenError(path, err)
	}
	fd, err = os.OpenFile(path, os.O_RDWR|oNoFollow, 0)
	if err != nil {
		return nil, lockOpenError(path, err)
	}
	fi, err := fd.Stat()
	if err == nil && !fi.Mode().IsRegular() {
		err = errors.New("not a regular file")
	}
	if err == nil && fi.Mode().Perm()&0o006 != 0 {
		// Made by an older version (0644), or by hand. Only write access
		// lets another user take the lock.
		st, _ := fi.Sys().(*syscall.Stat_t)
		switch {
		case st != nil && (int(st.Uid) == os.Geteuid() || os.Geteuid() == 0):
			err = fd.Chmod(lockMode)
		case fi.Mode().Perm()&0o002 != 0:
			err = fmt.Errorf("every user can write it (mode %04o) and so stall every write; fix: chmod %o %s", fi.Mode().Perm(), lockMode, path)
		}
	}
	if err != nil {
		fd.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return fd, nil
}

// lockOpenError explains a lock file that cannot be opened.
func lockOpenError(path string, err error) error {
	switch {
	case errors.Is(err, syscall.ELOOP):
		return fmt.Errorf("lock %s: is a symbolic link, which rcptguard does not follow; fix: remove it", path)
	case errors.Is(err, fs.ErrPermission):
		if _, serr := os.Lstat(path); serr == nil {
			return fmt.Errorf("lock %s: %w; fix: run as root, or give the file to the user rcptguard runs as (chown rcptguard %s)", path, err, path)
		}
		return fmt.Errorf("lock %s: %w; fix: run as root or as the owner of %s", path, err, filepath.Dir(path))
	}
	return fmt.Errorf("lock %s: %w", path, err)
}

// fileID returns the device and inode numbers of fi.
func fileID(fi fs.FileInfo) (dev, ino uint64) {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return uint64(st.Dev), uint64(st.Ino)
	}
	return 0, 0
}

// isLinkError reports whether err is an open refused by O_NOFOLLOW.
func isLinkError(err error) bool { return errors.Is(err, syscall.ELOOP) }
