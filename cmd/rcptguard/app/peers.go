package app

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"strings"
	"time"
	"unicode"
)

// defaultMailOwner is Postfix's default mail_owner, used when postconf
// cannot be asked.
const defaultMailOwner = "postfix"

// policyPeers is who may talk to the policy service, resolved from
// policy.allow_users and policy.allow_networks.
type policyPeers struct {
	uids     []uint32 // allowed local users; the daemon's own is added by the server
	uncapped []uint32 // Postfix's mail_owner, whose smtpd processes are many
	networks []netip.Prefix
	// note is a line for the start-up log about what was chosen, "" when
	// there is nothing to say.
	note string
}

// userLookup finds a user's uid by name.
type userLookup func(name string) (uint32, error)

// systemUser looks a user up in the system's user database.
func systemUser(name string) (uint32, error) {
	u, err := user.Lookup(name)
	if err != nil {
		return 0, err
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("user %q has uid %q", name, u.Uid)
	}
	return uint32(uid), nil
}

// resolvePolicyPeers turns the [policy] section's allow_users (names or
// uids) and allow_networks into what the server checks. An empty
// allow_users means root and Postfix's mail_owner; when that user does not
// exist, root and the daemon's own user, and note says so. A configured
// user name that does not exist is an error naming the key.
func resolvePolicyPeers(c *PolicyConfig, lookup userLookup, mailOwner string) (policyPeers, error) {
	var p policyPeers
	ownerUID, ownerErr := lookup(mailOwner)
	if ownerErr == nil {
		p.uncapped = []uint32{ownerUID}
	}
	if len(c.AllowUsers) == 0 {
		p.uids = []uint32{0}
		if ownerErr == nil {
			p.uids = append(p.uids, ownerUID)
		} else {
			p.note = fmt.Sprintf("Postfix's mail_owner %q does not exist: only root and rcptguard's own user (uid %d) may use the policy service; set policy.allow_users to change this", mailOwner, os.Geteuid())
		}
	}
	var errs []error
	for i, name := range c.AllowUsers {
		if uid, err := strconv.ParseUint(name, 10, 32); err == nil {
			p.uids = append(p.uids, uint32(uid))
			continue
		}
		uid, err := lookup(name)
		if err != nil {
			errs = append(errs, fmt.Errorf("policy.allow_users[%d]: no user %q on this system (%v)", i, name, err))
			continue
		}
		p.uids = append(p.uids, uid)
	}
	for _, n := range c.AllowNetworks {
		pfx, _ := parseNetwork(n) // validated with the configuration
		p.networks = append(p.networks, pfx)
	}
	return p, errors.Join(errs...)
}

// postfixMailOwner asks postconf for Postfix's mail_owner, the user its
// smtpd processes run as. Without postconf, or when it fails, it is
// Postfix's default, "postfix".
func postfixMailOwner(ctx context.Context) string {
	path, err := exec.LookPath("postconf")
	if err != nil {
		return defaultMailOwner
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "-h", "mail_owner").Output()
	if err != nil {
		return defaultMailOwner
	}
	name := strings.TrimSpace(string(out))
	if checkUserName(name) != nil {
		return defaultMailOwner
	}
	return name
}

// checkUserName accepts a user name or a numeric uid as policy.allow_users
// holds them.
func checkUserName(s string) error {
	if s == "" || len(s) > 64 {
		return fmt.Errorf("%q is not a user name or uid", s)
	}
	for _, r := range s {
		if unicode.IsSpace(r) || unicode.IsControl(r) || r == ':' || r > unicode.MaxASCII {
			return fmt.Errorf("%q is not a user name or uid", s)
		}
	}
	return nil
}
