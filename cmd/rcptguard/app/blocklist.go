package app

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/rcptguard/rcptguard/blocklist"
	"github.com/rcptguard/rcptguard/blocklist/identity"
)

// cmdList prints the blocklist: one entry a line, as in the file.
func cmdList(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs, config := newFlags("list", "list [-config FILE]", stderr)
	cfg, err := parseFlags(fs, config, args)
	if err != nil {
		return err
	}
	f, problems, err := blocklist.Open(blocklist.Config{Path: cfg.Blocklist.Path})
	if err != nil {
		return fmt.Errorf("blocklist.path: %w", err)
	}
	for _, p := range problems {
		fmt.Fprintf(stderr, "%s: %s (skipped)\n", cfg.Blocklist.Path, p)
	}
	for _, e := range f.Entries() {
		fmt.Fprintln(stdout, e.String())
	}
	return nil
}

// cmdBlock adds an identity to the blocklist. It works whether or not the
// daemon runs: the daemon sees the change within 2 seconds.
func cmdBlock(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, config := newFlags("block", "block [-config FILE] [-reason TEXT] IDENTITY", stderr)
	reason := fs.String("reason", "", "text for the entry (default: blocked by hand, with the date)")
	cfg, err := parseFlags(fs, config, args)
	if err != nil {
		return err
	}
	id, err := oneIdentity(fs.Args())
	if err != nil {
		fs.Usage()
		return err
	}
	text := *reason
	if text == "" {
		text = "rcptguard: " + id + " blocked by hand on " + time.Now().UTC().Format("2006-01-02 15:04 MST")
	}
	action, _, _ := strings.Cut(cfg.Detector.Action, " ")
	f, err := openForWrite(cfg)
	if err != nil {
		return err
	}
	if err := f.Add(ctx, blocklist.Entry{Identity: id, Action: strings.ToUpper(action), Text: text}); err != nil {
		return fmt.Errorf("block %s: %w", id, err)
	}
	fmt.Fprintf(stdout, "blocked %s\n", id)
	return nil
}

// cmdUnblock removes an identity from the blocklist.
func cmdUnblock(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, config := newFlags("unblock", "unblock [-config FILE] IDENTITY", stderr)
	cfg, err := parseFlags(fs, config, args)
	if err != nil {
		return err
	}
	id, err := oneIdentity(fs.Args())
	if err != nil {
		fs.Usage()
		return err
	}
	f, err := openForWrite(cfg)
	if err != nil {
		return err
	}
	removed, err := f.Remove(ctx, id)
	if err != nil {
		return fmt.Errorf("unblock %s: %w", id, err)
	}
	if !removed {
		fmt.Fprintf(stdout, "%s was not blocked\n", id)
		return nil
	}
	fmt.Fprintf(stdout, "unblocked %s\n", id)
	return nil
}

func oneIdentity(args []string) (string, error) {
	if len(args) != 1 {
		return "", fmt.Errorf("%w: exactly one IDENTITY is needed", errUsage)
	}
	id, err := identity.Canonical(args[0])
	if err != nil {
		return "", fmt.Errorf("%w: %v", errUsage, err)
	}
	return id, nil
}

// openForWrite opens the blocklist, creating its directory when missing.
func openForWrite(cfg *Config) (*blocklist.File, error) {
	if err := ensureDir(filepath.Dir(cfg.Blocklist.Path), "blocklist.path"); err != nil {
		return nil, err
	}
	f, _, err := blocklist.Open(blocklist.Config{Path: cfg.Blocklist.Path})
	if err != nil {
		return nil, fmt.Errorf("blocklist.path: %w", err)
	}
	return f, nil
}

// ensureDir creates a state directory; the error names the path and the
// configuration key that chose it.
func ensureDir(dir, key string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("cannot create %s (set %s to a writable place): %w", dir, key, err)
	}
	return nil
}
