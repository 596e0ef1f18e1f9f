package queue

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Directory returns Postfix's queue_directory ("postconf -h
// queue_directory", with -c postfixConfig when not empty). It needs no
// privilege.
func Directory(ctx context.Context, postfixConfig string) (string, error) {
	path := lookPath("postconf")
	if path == "" {
		return "", errors.New("queue: postconf not found (is Postfix installed?)")
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	args := []string{"-h", "queue_directory"}
	if postfixConfig != "" {
		args = append([]string{"-c", postfixConfig}, args...)
	}
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C"}
	out := &cappedBuffer{max: 4096}
	cmd.Stdout = out
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("queue: postconf -h queue_directory: %w", err)
	}
	dir := strings.TrimSpace(out.buf.String())
	if !filepath.IsAbs(dir) || strings.ContainsAny(dir, "\n\x00") {
		return "", fmt.Errorf("queue: postconf gave queue_directory %q, not an absolute path", printable(dir, 200))
	}
	return dir, nil
}

// Space is the room on a file system.
type Space struct {
	Free, Total uint64 // bytes available to unprivileged users, and in all
}

// FreeRatio is Free/Total, 1 when Total is 0.
func (s Space) FreeRatio() float64 {
	if s.Total == 0 {
		return 1
	}
	return float64(s.Free) / float64(s.Total)
}
