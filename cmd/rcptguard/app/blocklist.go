package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	iofs "io/fs"
	"net/netip"
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
	cfg, err := parseNoArgs(fs, config, args)
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
	fs, config := newFlags("block", "block [-config FILE] [-reason TEXT] [-login] IDENTITY", stderr)
	reason := fs.String("reason", "", "text for the entry (default: the reason it is blocked for already, else blocked by hand, with the date)")
	login := fs.Bool("login", false, "IDENTITY is a SASL login without a domain, as some sites use")
	cfg, id, err := parseIdentityFlags(fs, config, args)
	if err != nil {
		return err
	}
	if err := checkBlockable(id, *login, cfg.Detector.RelayNetworks); err != nil {
		return usageErrorf("%s: %v", id, err)
	}
	action, _, _ := strings.Cut(cfg.Detector.Action, " ")
	f, err := openForWrite(cfg)
	if err != nil {
		return err
	}
	text := *reason
	if old, ok := f.Lookup(id); ok && text == "" {
		text = old.Text // blocked again: the first reason stays
	} else if text == "" {
		text = "rcptguard: " + id + " blocked by hand on " + time.Now().UTC().Format("2006-01-02 15:04 MST")
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
	cfg, id, err := parseIdentityFlags(fs, config, args)
	if err != nil {
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
		return "", usageErrorf("%v; %s", err, identityForms)
	}
	return id, nil
}

// identityForms says what identities look like, for the errors of block.
const identityForms = `identities are a SASL login such as "user@example.com" or a client address inside detector.relay_networks such as "192.0.2.7" or "2001:db8::7"`

// checkBlockable refuses an identity that no policy request can ever
// have: a network, an address outside relay_networks or not in the form
// Postfix writes it, a login with an empty part, and a login without a
// domain unless bareLogin says the site uses those.
func checkBlockable(id string, bareLogin bool, relayNetworks []string) error {
	if p, err := netip.ParsePrefix(id); err == nil {
		return fmt.Errorf("a network is not an identity: %s; to track unauthenticated clients, put %s in detector.relay_networks", identityForms, p)
	}
	if a, err := netip.ParseAddr(id); err == nil {
		if a.Unmap().String() != id {
			return fmt.Errorf("written %s by Postfix", a.Unmap())
		}
		for _, n := range relayNetworks {
			if p, err := parseNetwork(n); err == nil && p.Contains(a) {
				return nil
			}
		}
		return fmt.Errorf("a client address is an identity only inside detector.relay_networks (%s), and this one is not", strings.Join(relayNetworks, ", "))
	}
	at := strings.LastIndexByte(id, '@')
	switch {
	case at < 0 && bareLogin:
		return nil
	case at < 0:
		return fmt.Errorf("neither an address nor a login with a domain: %s (a login without a domain needs -login)", identityForms)
	case at == 0 || at == len(id)-1:
		return fmt.Errorf("a part around '@' is empty: %s", identityForms)
	}
	if err := checkDomain(id[at+1:]); err != nil {
		return fmt.Errorf("%v: %s", err, identityForms)
	}
	return nil
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
