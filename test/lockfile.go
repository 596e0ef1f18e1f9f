//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package test

import (
	"os"
	"testing"
)

// BlocklistLock is a hold on a blocklist's lock file, taken the way
// another rcptguard process takes it on this system (lockFile).
type BlocklistLock struct{ f *os.File }

// LockBlocklist takes the lock of the blocklist at path, creating the lock
// file when missing, and releases it at the end of the test.
func LockBlocklist(t testing.TB, path string) *BlocklistLock {
	t.Helper()
	f, err := os.OpenFile(path+".lock", os.O_RDWR|os.O_CREATE, 0o660)
	if err != nil {
		t.Fatalf("test.LockBlocklist: %v", err)
	}
	if err := lockFile(f); err != nil {
		f.Close()
		t.Fatalf("test.LockBlocklist: %v", err)
	}
	l := &BlocklistLock{f: f}
	t.Cleanup(l.Release)
	return l
}

// Release releases the lock; releasing twice is fine.
func (l *BlocklistLock) Release() { unlockFile(l.f) }
