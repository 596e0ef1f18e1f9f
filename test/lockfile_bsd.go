//go:build darwin || freebsd || netbsd || openbsd || dragonfly

package test

import (
	"os"
	"syscall"
)

// lockFile takes an flock on f, as rcptguard does on the BSDs.
func lockFile(f *os.File) error { return syscall.Flock(int(f.Fd()), syscall.LOCK_EX) }

func unlockFile(f *os.File) { _ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN) }
