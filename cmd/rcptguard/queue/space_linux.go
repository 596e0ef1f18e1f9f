package queue

import (
	"fmt"
	"syscall"
)

// FreeSpace returns the room on the file system that holds dir.
func FreeSpace(dir string) (Space, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return Space{}, fmt.Errorf("queue: statfs %s: %w", dir, err)
	}
	bs := uint64(st.Bsize)
	return Space{Free: st.Bavail * bs, Total: st.Blocks * bs}, nil
}
