package test

import (
	"os"

	"golang.org/x/sys/unix"
)

// lockFile takes an OFD write lock on f, as rcptguard does on Linux.
func lockFile(f *os.File) error {
	lk := unix.Flock_t{Type: unix.F_WRLCK}
	return unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLKW, &lk)
}

func unlockFile(f *os.File) {
	lk := unix.Flock_t{Type: unix.F_UNLCK}
	_ = unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk)
}
