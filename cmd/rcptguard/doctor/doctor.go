// Package doctor checks a live Postfix + rcptguard installation: that
// every smtpd service taking SASL logins asks rcptguard, in the right
// place, and can reach it and read its blocklist. It reads Postfix's
// configuration through postconf and prints one line per finding, with
// the fix for each problem.
package doctor

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Config is what doctor needs to know about rcptguard and where to find
// Postfix.
type Config struct {
	// PostfixConfigDir is passed to postconf -c; "" reads Postfix's
	// default configuration directory.
	PostfixConfigDir string
	// Postconf is the postconf program; "" looks in $PATH and /usr/sbin.
	Postconf string
	// Listen is rcptguard's policy.listen.
	Listen []string
	// BlocklistPath is rcptguard's blocklist.path.
	BlocklistPath string
	// Wait is rcptguard's detector.wait: Postfix's policy timeout must be
	// longer.
	Wait time.Duration
	// Health asks rcptguard at addr ("host:port" or "unix:/path") for an
	// answer as user u would, and returns the answer line, or says as
	// whom it really asked (when it cannot switch to u) in note.
	Health func(ctx context.Context, addr string, u *user.User) (answer, note string, err error)
}

// Finding is one line of the report.
type Finding struct {
	OK   bool
	What string // what was checked or found, starting with its subject
	Fix  string // for a problem: what to do
}

func (f Finding) String() string {
	if f.OK {
		return "ok    " + f.What
	}
	return "FAIL  " + f.What + "; fix: " + f.Fix
}

// Report writes the findings, one a line, and returns whether all are ok.
func Report(w io.Writer, fs []Finding) bool {
	ok := true
	for _, f := range fs {
		fmt.Fprintln(w, f)
		ok = ok && f.OK
	}
	return ok
}

// check is one run of Check.
type check struct {
	cfg      Config
	pf       *postfix
	findings []Finding
	owner    *user.User
	queueDir string
	reached  map[string]bool // rcptguard addresses Postfix uses, to ask
}

func (c *check) ok(format string, args ...any) {
	c.findings = append(c.findings, Finding{OK: true, What: fmt.Sprintf(format, args...)})
}

func (c *check) fail(fix, format string, args ...any) {
	c.findings = append(c.findings, Finding{What: fmt.Sprintf(format, args...), Fix: fix})
}

// Check runs every check and returns the findings. The error is for when
// Postfix's configuration cannot be read at all.
func Check(ctx context.Context, cfg Config) ([]Finding, error) {
	pf, err := readPostfix(ctx, postconfPath(cfg.Postconf), cfg.PostfixConfigDir)
	if err != nil {
		return nil, err
	}
	c := &check{cfg: cfg, pf: pf, reached: map[string]bool{}, queueDir: filepath.Clean(pf.main["queue_directory"])}
	ownerName := pf.main["mail_owner"]
	if ownerName == "" {
		ownerName = "postfix"
	}
	c.owner, err = user.Lookup(ownerName)
	if err != nil {
		c.fail("create the user or set mail_owner", "mail_owner %s: %v", ownerName, err)
	}

	sasl := 0
	for _, s := range pf.services {
		if s.command != "smtpd" {
			continue
		}
		if !strings.EqualFold(pf.param(s, "smtpd_sasl_auth_enable"), "yes") {
			continue
		}
		sasl++
		c.service(s)
	}
	if sasl == 0 {
		c.fail("enable SASL on the submission services (master.cf -o smtpd_sasl_auth_enable=yes) and add rcptguard there",
			"no smtpd service in master.cf enables SASL: rcptguard judges authenticated senders only")
	}
	c.blocklistReadable()
	c.health(ctx)
	return c.findings, nil
}

// service checks one smtpd service that takes SASL logins.
func (c *check) service(s service) {
	name := s.key()
	lists := []struct{ param, value string }{
		{"smtpd_relay_restrictions", c.pf.param(s, "smtpd_relay_restrictions")},
		{"smtpd_recipient_restrictions", c.pf.param(s, "smtpd_recipient_restrictions")},
	}
	type pos struct{ list, i int }
	var policy, blocklist, unknownDomain *pos
	var policyR restriction
	var others []string
	permitSASL := map[int]int{} // list → index of permit_sasl_authenticated
	for li, l := range lists {
		for i, r := range parseRestrictions(l.value) {
			switch r.name {
			case "check_policy_service":
				if policy == nil && c.isRcptguard(s, r.arg) {
					policy, policyR = &pos{li, i}, r
				} else if policy == nil {
					others = append(others, r.arg)
				}
			case "check_sasl_access":
				if blocklist == nil && c.isBlocklist(name, r.arg) {
					blocklist = &pos{li, i}
				}
			case "permit_sasl_authenticated":
				if _, seen := permitSASL[li]; !seen {
					permitSASL[li] = i
				}
			case "reject_unknown_recipient_domain":
				if unknownDomain == nil {
					unknownDomain = &pos{li, i}
				}
			}
		}
	}
	before := func(a, b *pos) bool { return a.list < b.list || a.list == b.list && a.i < b.i }
	placeFix := "put $rcptguard_restrictions first in smtpd_recipient_restrictions (see contrib/postfix/main.cf)"

	if policy == nil {
		fix := "add check_policy_service { " + c.suggestService(s) + ", timeout=10s, default_action=DUNNO } before permit_sasl_authenticated in smtpd_recipient_restrictions"
		if len(others) > 0 {
			c.fail(fix, "%s: no check_policy_service reaches rcptguard (policy.listen %s); found %s", name, strings.Join(c.cfg.Listen, ", "), strings.Join(others, ", "))
		} else {
			c.fail(fix, "%s: rcptguard's policy service is not in smtpd_relay_restrictions or smtpd_recipient_restrictions", name)
		}
	} else {
		l := lists[policy.list].param
		good := true
		if i, ok := permitSASL[policy.list]; ok && i < policy.i {
			good = false
			c.fail(placeFix, "%s: check_policy_service %s comes after permit_sasl_authenticated in %s: rcptguard never sees authenticated senders", name, policyR.arg, l)
		}
		if unknownDomain != nil && before(unknownDomain, policy) {
			good = false
			c.fail(placeFix, "%s: reject_unknown_recipient_domain (%s) comes before rcptguard's check (%s): recipients at domains that do not exist are never counted", name, lists[unknownDomain.list].param, l)
		}
		if good {
			c.ok("%s: rcptguard's policy service %s is in %s before permit_sasl_authenticated", name, policyR.arg, l)
		}
		c.timeout(s, policyR)
	}

	if blocklist == nil {
		c.fail("add check_sasl_access texthash:"+c.cfg.BlocklistPath+" before permit_sasl_authenticated (see contrib/postfix/main.cf)",
			"%s: the blocklist is not used (no check_sasl_access texthash:%s): blocked users are not held while rcptguard is down", name, c.cfg.BlocklistPath)
	} else if i, ok := permitSASL[blocklist.list]; ok && i < blocklist.i {
		c.fail(placeFix, "%s: check_sasl_access of the blocklist comes after permit_sasl_authenticated in %s: it never applies", name, lists[blocklist.list].param)
	} else {
		c.ok("%s: the blocklist is checked (check_sasl_access texthash:%s) before permit_sasl_authenticated", name, c.cfg.BlocklistPath)
	}
}

// timeout checks that Postfix waits longer for an answer than rcptguard
// waits for a verification.
func (c *check) timeout(s service, r restriction) {
	v, src := r.attrs["timeout"], "timeout="
	if v == "" {
		v, src = c.pf.param(s, "smtpd_policy_service_timeout"), "smtpd_policy_service_timeout = "
	}
	d, ok := parseTime(v)
	switch {
	case !ok:
		c.fail("set timeout=10s in the check_policy_service { ... } group", "%s: policy timeout %q is not a time", s.key(), v)
	case d <= c.cfg.Wait:
		c.fail(fmt.Sprintf("set timeout=%s in the check_policy_service { ... } group, or lower detector.wait", max(10*time.Second, c.cfg.Wait+5*time.Second)),
			"%s: policy %s%s is not longer than detector.wait %s: Postfix gives up before rcptguard answers", s.key(), src, v, c.cfg.Wait)
	default:
		c.ok("%s: policy %s%s exceeds detector.wait %s", s.key(), src, v, c.cfg.Wait)
	}
}

// isRcptguard reports whether the policy service spec reaches one of
// rcptguard's listeners from service s, and records the problems of one
// that would but for the chroot.
func (c *check) isRcptguard(s service, spec string) bool {
	typ, rest, ok := strings.Cut(spec, ":")
	if !ok {
		typ, rest = "unix", spec
	}
	switch typ {
	case "inet":
		for _, l := range c.cfg.Listen {
			if strings.HasPrefix(l, "unix:") {
				continue
			}
			if sameTCP(rest, l) {
				c.reached[l] = true
				return true
			}
		}
	case "unix":
		for _, l := range c.cfg.Listen {
			sock, ok := strings.CutPrefix(l, "unix:")
			if !ok {
				continue
			}
			sock = filepath.Clean(sock)
			if filepath.IsAbs(rest) {
				if filepath.Clean(rest) != sock {
					continue
				}
				if s.chroot {
					c.fail(c.chrootFix(sock), "%s: smtpd is chrooted to %s (master.cf chroot = y), where %s is %s, not rcptguard's socket", s.key(), c.queueDir, spec, filepath.Join(c.queueDir, rest))
					return true
				}
				c.reached[l] = true
				return true
			}
			// Postfix daemons run in the queue directory, chrooted or not.
			if filepath.Join(c.queueDir, rest) == sock {
				c.ok("%s: the socket unix:%s is %s, inside the queue directory%s", s.key(), rest, sock, map[bool]string{true: " (smtpd is chrooted there)", false: ""}[s.chroot])
				c.reached[l] = true
				return true
			}
		}
	}
	return false
}

// chrootFix tells how to put rcptguard's socket inside the chroot.
func (c *check) chrootFix(sock string) string {
	if rel, err := filepath.Rel(c.queueDir, sock); err == nil && !strings.HasPrefix(rel, "..") {
		return "name the socket relative to queue_directory: check_policy_service { unix:" + rel + ", ... }"
	}
	return "set policy.listen = [\"unix:" + filepath.Join(c.queueDir, "rcptguard", "policy.sock") + "\"] and policy.socket_group = \"postfix\", and use check_policy_service { unix:rcptguard/policy.sock, ... }"
}

// suggestService is the check_policy_service argument for rcptguard's
// first listener, as service s would name it.
func (c *check) suggestService(s service) string {
	if len(c.cfg.Listen) == 0 {
		return "unix:rcptguard/policy.sock"
	}
	l := c.cfg.Listen[0]
	if sock, ok := strings.CutPrefix(l, "unix:"); ok {
		if rel, err := filepath.Rel(c.queueDir, sock); err == nil && !strings.HasPrefix(rel, "..") {
			return "unix:" + rel
		}
		return "unix:" + sock
	}
	return "inet:" + l
}

// sameTCP compares "host:port" addresses, taking localhost and the
// wildcard addresses as loopback.
func sameTCP(postfix, listen string) bool {
	h1, p1, err1 := net.SplitHostPort(postfix)
	h2, p2, err2 := net.SplitHostPort(listen)
	if err1 != nil || err2 != nil || p1 != p2 {
		return false
	}
	norm := func(h string) string {
		switch h {
		case "localhost", "0.0.0.0", "::", "":
			return "127.0.0.1"
		case "::1", "[::1]":
			return "::1"
		}
		return h
	}
	return norm(h1) == norm(h2) || norm(h2) == "127.0.0.1" && (h2 == "0.0.0.0" || h2 == "::")
}

// isBlocklist reports whether a check_sasl_access table is rcptguard's
// blocklist, and flags one of the wrong type.
func (c *check) isBlocklist(svc, table string) bool {
	typ, path, ok := strings.Cut(table, ":")
	if !ok || filepath.Clean(path) != filepath.Clean(c.cfg.BlocklistPath) {
		return false
	}
	if typ != "texthash" {
		c.fail("use texthash:"+path+" (rcptguard writes the text file; a "+typ+": table is a separate, stale copy)",
			"%s: the blocklist is read as %s", svc, table)
	}
	return true
}

// blocklistReadable checks that the blocklist exists and Postfix's user
// can read it, every directory above it included.
func (c *check) blocklistReadable() {
	path := c.cfg.BlocklistPath
	if _, err := os.Stat(path); err != nil {
		c.fail("start rcptguard, or run `rcptguard list` as root, which creates it",
			"blocklist %s: %v: Postfix answers 451 4.3.5 to every authenticated recipient while the table is missing", path, err)
		return
	}
	if c.owner == nil {
		return
	}
	uid, _ := strconv.Atoi(c.owner.Uid)
	var gids []int
	if ids, err := c.owner.GroupIds(); err == nil {
		for _, g := range ids {
			n, _ := strconv.Atoi(g)
			gids = append(gids, n)
		}
	}
	if n, err := strconv.Atoi(c.owner.Gid); err == nil && !slices.Contains(gids, n) {
		gids = append(gids, n)
	}
	abs, _ := filepath.Abs(path)
	var comps []string
	for d := filepath.Dir(abs); ; d = filepath.Dir(d) {
		comps = append([]string{d}, comps...)
		if d == filepath.Dir(d) {
			break
		}
	}
	for _, d := range comps {
		if !allowed(d, uid, gids, 1) {
			c.fail("chmod o+x "+d+" (or give group "+c.owner.Username+" access)", "blocklist %s: user %s cannot enter %s", path, c.owner.Username, d)
			return
		}
	}
	if !allowed(abs, uid, gids, 4) {
		c.fail("chmod 0644 "+path, "blocklist %s: user %s cannot read it", path, c.owner.Username)
		return
	}
	c.ok("blocklist %s exists and user %s can read it", path, c.owner.Username)
}

// allowed evaluates the permission bit want (4 read, 1 search) of path
// for uid with groups gids, as the kernel does (owner, else group, else
// other; root always).
func allowed(path string, uid int, gids []int, want uint32) bool {
	if uid == 0 {
		return true
	}
	fi, err := os.Stat(path)
	if err != nil {
		return false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return true
	}
	mode := uint32(fi.Mode().Perm())
	switch {
	case int(st.Uid) == uid:
		return mode>>6&want != 0
	case slices.Contains(gids, int(st.Gid)):
		return mode>>3&want != 0
	}
	return mode&want != 0
}

// health asks rcptguard, on every address Postfix uses, as Postfix's user.
func (c *check) health(ctx context.Context) {
	if c.cfg.Health == nil || c.owner == nil {
		return
	}
	addrs := make([]string, 0, len(c.reached))
	for a := range c.reached {
		addrs = append(addrs, a)
	}
	slices.Sort(addrs)
	for _, a := range addrs {
		answer, note, err := c.cfg.Health(ctx, a, c.owner)
		if note != "" {
			note = " (" + note + ")"
		}
		if err != nil {
			fix := "start rcptguard (systemctl start rcptguard) and check its log"
			if strings.Contains(err.Error(), "permission denied") {
				fix = "set policy.socket_group = \"" + c.owner.Username + "\" (the socket and its directory then belong to that group), or chgrp " + c.owner.Username + " the socket's directory"
			}
			c.fail(fix, "rcptguard at %s does not answer user %s: %v%s", a, c.owner.Username, err, note)
			continue
		}
		c.ok("rcptguard at %s answers user %s: %s%s", a, c.owner.Username, strings.TrimSpace(answer), note)
	}
}
