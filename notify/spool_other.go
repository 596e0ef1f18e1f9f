//go:build !unix

package notify

import (
	"io/fs"
	"os"
)

func ownedByMe(fs.FileInfo) bool { return true }

func readNoFollow(path string) ([]byte, error) { return os.ReadFile(path) }
