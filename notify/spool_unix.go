//go:build unix

package notify

import (
	"io"
	"io/fs"
	"os"
	"syscall"
)

// oNoFollow makes open refuse a symbolic link.
const oNoFollow = syscall.O_NOFOLLOW

// ownedByMe reports whether fi's owner is this process's effective user.
func ownedByMe(fi fs.FileInfo) bool {
	st, ok := fi.Sys().(*syscall.Stat_t)
	return ok && int(st.Uid) == os.Geteuid()
}

// readNoFollow reads the file at path, refusing a symbolic link.
func readNoFollow(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(f)
}
