//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package blocklist

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"
	"time"
)

// Backoff bounds while waiting for the file lock.
const (
	lockWaitMin = time.Millisecond
	lockWaitMax = 50 * time.Millisecond
)

// lockFile takes an exclusive flock(2) on path, creating it (mode 0644)
// if needed, and waits for it until ctx is done. The returned function
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
		err := syscall.Flock(int(fd.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			if timer != nil {
				timer.Stop()
			}
			return func() {
				// Closing the only descriptor releases the lock too;
				// unlocking first is explicit.
				_ = syscall.Flock(int(fd.Fd()), syscall.LOCK_UN)
				fd.Close()
			}, nil
		}
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
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
			fd.Close()
			return nil, fmt.Errorf("lock %s: %w", path, context.Cause(ctx))
		case <-timer.C:
		}
		wait = min(2*wait, lockWaitMax)
	}
}

// openLockFile opens path read-only for flock, creating it readable by all
// (regardless of the umask), so that the daemon and a CLI run as another
// user can both lock it.
func openLockFile(path string) (*os.File, error) {
	fd, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err == nil {
		if err := fd.Chmod(0o644); err != nil {
			fd.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		return fd, nil
	}
	if !errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	fd, err = os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	if fi, err := fd.Stat(); err != nil || !fi.Mode().IsRegular() {
		fd.Close()
		if err == nil {
			err = errors.New("not a regular file")
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return fd, nil
}

// fileID returns the device and inode numbers of fi.
func fileID(fi fs.FileInfo) (dev, ino uint64) {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return uint64(st.Dev), uint64(st.Ino)
	}
	return 0, 0
}
