//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package blocklist

import (
	"context"
	"errors"
	"io/fs"
	"os"
)

// lockFile fails: this platform has no flock(2), and writing without the
// lock could lose a concurrent writer's entries.
func lockFile(ctx context.Context, path string) (func(), error) {
	return nil, errors.New("lock " + path + ": file locking is not supported on this platform")
}

// oNoFollow is 0: this platform's open has no O_NOFOLLOW.
const oNoFollow = 0

// fileID returns zeros; stat changes are still seen by size and time.
func fileID(fi fs.FileInfo) (dev, ino uint64) { return 0, 0 }

func isLinkError(error) bool { return false }

// openLockFile fails: see lockFile.
func openLockFile(path string) (*os.File, error) {
	return nil, errors.New("lock " + path + ": file locking is not supported on this platform")
}
