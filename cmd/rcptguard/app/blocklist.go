package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	iofs "io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/rcptguard/rcptguard/blocklist"
	"github.com/rcptguard/rcptguard/blocklist/identity"
	"github.com/rcptguard/rcptguard/cmd/rcptguard/cluster"
)

// cmdList prints the blocklist: one entry a line, as in the file.
func cmdList(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs, config := newFlags("list", "list [-config FILE]", stderr)
	cfg, err := parseFlags(fs, config, args)
	if err != nil {
		return err
	}
	if _, err := os.Lstat(cfg.Blocklist.Path); errors.Is(err, iofs.ErrNotExist) {
		// A fresh machine: nothing is blocked. Create the file Postfix
		// reads when this user can; either way there is nothing to list.
		if _, err := openForWrite(cfg); err != nil {
			fmt.Fprintf(stderr, "rcptguard: %s does not exist yet, so nothing is blocked; it could not be created: %v\n", cfg.Blocklist.Path, err)
		}
		return nil
	}
	f, problems, err := blocklist.Open(blocklist.Config{Path: cfg.Blocklist.Path})
	if err != nil {
		return fmt.Errorf("blocklist.path: %w", err)
	}
	for _, p := range problems {
		fmt.Fprintf(stderr, "%s: %s (skipped)\n", cfg.Blocklist.Path, p)
	}
	seen := map[string]bool{}
	for _, e := range f.Entries() {
		seen[e.Identity] = true
		fmt.Fprintln(stdout, e.String())
	}
	// [cluster]: the blocks of the other servers too.
	_, _ = withFleet(context.Background(), cfg, stderr, func(ctx context.Context, c *cluster.Cluster) error {
		es, err := c.Blocks(ctx)
		for _, e := range es {
			if !seen[e.Identity] {
				fmt.Fprintln(stdout, e.String())
			}
		}
		return err
	})
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
	ctx, cancel := context.WithTimeout(ctx, cliLockWait)
	defer cancel()
	e := blocklist.Entry{Identity: id, Action: strings.ToUpper(action), Text: text}
	if err := f.Add(ctx, e); err != nil {
		return fmt.Errorf("block %s: %w", id, notWritten("not blocked", err))
	}
	_, _ = withFleet(ctx, cfg, stderr, func(ctx context.Context, c *cluster.Cluster) error {
		_, err := c.PushBlock(ctx, e, time.Now())
		return err
	})
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
	// [cluster]: the fleet first, so no server pulls the block back here.
	fleet, ferr := withFleet(ctx, cfg, stderr, func(ctx context.Context, c *cluster.Cluster) error {
		return c.PushUnblock(ctx, id, time.Now())
	})
	ctx, cancel := context.WithTimeout(ctx, cliLockWait)
	defer cancel()
	removed, err := f.Remove(ctx, id)
	if err != nil {
		return fmt.Errorf("unblock %s: %w", id, notWritten("still blocked", err))
	}
	if !removed && !(fleet && ferr == nil) {
		fmt.Fprintf(stdout, "%s was not blocked\n", id)
		return nil
	}
	fmt.Fprintf(stdout, "unblocked %s\n", id)
	return nil
}

func oneIdentity(args []string) (string, error) {
	if len(args) != 1 {
		return "", usageErrorf("exactly one IDENTITY is needed")
	}
	id, err := identity.Canonical(args[0])
	if err != nil {
		return "", usageErrorf("%v", err)
	}
	return id, nil
}

// cliLockWait bounds how long block and unblock wait for the blocklist's
// lock; past it they give up, naming the process that holds it.
var cliLockWait = 5 * time.Second

// notWritten words a failed write for a command, which, unlike the
// daemon, keeps nothing in memory: the change is simply not made.
func notWritten(what string, err error) error {
	var we *blocklist.WriteError
	if errors.As(err, &we) {
		return fmt.Errorf("%s: blocklist %s unchanged: %w", what, we.Path, we.Err)
	}
	return err
}

// openForWrite opens the blocklist, creating its directory and the file
// when missing, after checking that this user can write it.
func openForWrite(cfg *Config) (*blocklist.File, error) {
	if err := ensureDir(filepath.Dir(cfg.Blocklist.Path), "blocklist.path"); err != nil {
		return nil, err
	}
	if err := blocklist.CheckWritable(cfg.Blocklist.Path); err != nil {
		return nil, fmt.Errorf("blocklist.path: %w", err)
	}
	f, _, err := blocklist.Open(blocklist.Config{Path: cfg.Blocklist.Path, Create: true})
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
