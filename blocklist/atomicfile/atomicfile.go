// Package atomicfile replaces files so that a crash leaves either the old
// content or the new, never a mix: the data goes to a temporary file in the
// same directory, which is synced, closed and renamed over the target; a
// sync of the directory then makes the rename itself durable.
//
// It is a leaf: it imports nothing of rcptguard's, so that the blocklist
// (which owns durability) and notify's spool share one implementation
// without importing each other.
package atomicfile

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// Write replaces the file at path with data. The temporary file is made
// with os.CreateTemp(dir of path, temp), so temp names the pattern a
// clean-up of left-over files looks for; perm is the new file's mode.
// Write does not sync the directory: call SyncDir, once after several
// writes if need be. The FileInfo is that of the file written (not of
// path after the rename, which another writer may have replaced since).
func Write(path, temp string, perm fs.FileMode, data []byte) (fi fs.FileInfo, err error) {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, temp)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err = tmp.Write(data); err != nil {
		return nil, fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	if err = tmp.Chmod(perm); err != nil {
		return nil, err
	}
	if err = tmp.Sync(); err != nil {
		return nil, fmt.Errorf("sync %s: %w", tmp.Name(), err)
	}
	if fi, err = tmp.Stat(); err != nil {
		return nil, err
	}
	if err = tmp.Close(); err != nil {
		return nil, fmt.Errorf("close %s: %w", tmp.Name(), err)
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return nil, err
	}
	return fi, nil
}

// SyncDir makes the renames and removals in dir durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}
