//go:build darwin || freebsd || netbsd || openbsd || dragonfly

package blocklist

import (
	"os"
	"syscall"
)

// tryLock takes an exclusive flock(2) on fd's file without waiting.
func tryLock(fd *os.File) error {
	return syscall.Flock(int(fd.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
}

func unlockFD(fd *os.File) error {
	return syscall.Flock(int(fd.Fd()), syscall.LOCK_UN)
}

// lockHolder cannot name the holder here.
func lockHolder(*os.File) string { return "" }
