//go:build !linux

package queue

import "errors"

// FreeSpace is only implemented on Linux.
func FreeSpace(string) (Space, error) {
	return Space{}, errors.New("queue: free space check not implemented on this system")
}
