package test

// Helpers for the real-Postfix end-to-end test: Postfix instances (one
// "postfix -c DIR" instance each, with its own queue, data directory, log
// file and ports), a Dovecot used only as Postfix's SASL authentication
// server, and swaks as the mail client. They need the Debian packages named
// in RealPostfixInstall and root (Postfix's master starts as root).
//
// Nothing here touches a system Postfix or Dovecot: every instance lives in
// a temporary directory, listens on 127.0.0.1 on ports chosen at run time,
// logs to its own file and is stopped at the test's cleanup.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/mail"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// RealPostfixPrograms are the programs the real-Postfix test runs.
var RealPostfixPrograms = []string{"postfix", "postconf", "postqueue", "postsuper", "postmap", "dovecot", "swaks"}

// RealPostfixInstall is the command that installs RealPostfixPrograms on
// Debian or Ubuntu, as root. The debconf line keeps the postfix package
// from asking questions and from writing a system main.cf.
const RealPostfixInstall = `apt-get update && ` +
	`echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections && ` +
	`DEBIAN_FRONTEND=noninteractive apt-get install -y postfix dovecot-core swaks`

// programDirs are searched after $PATH: Postfix's and Dovecot's commands
// live in /usr/sbin, which a non-login shell's PATH may lack.
var programDirs = []string{"/usr/sbin", "/usr/bin", "/sbin", "/bin"}

// ProgramPath returns the path of the program name: found in $PATH or in
// one of the usual system directories; "" when it is nowhere.
func ProgramPath(name string) string {
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	for _, dir := range programDirs {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p
		}
	}
	return ""
}

// MissingPrograms returns the names that ProgramPath cannot find.
func MissingPrograms(names ...string) []string {
	var missing []string
	for _, n := range names {
		if ProgramPath(n) == "" {
			missing = append(missing, n)
		}
	}
	return missing
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
// Another process may take it before the caller binds it; callers that
// can, retry with a new port when the bind fails.
func FreePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("test.FreePort: %v", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// Eventually calls cond every 50 ms until it returns true, and fails the
// test when it has not within timeout. what names the awaited state in the
// failure message.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// SharedTempDir returns a new temporary directory, removed at the end of the
// test, that every user may traverse: Postfix's virtual(8) delivers as the
// postfix user and Dovecot's auth process runs as the dovecot user, so the
// directories above their files must not be 0700.
func SharedTempDir(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	// t.TempDir makes a 0700 directory per test and a numbered 0700
	// directory in it per call; both belong to this test alone.
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatalf("chmod %s: %v", d, err)
		}
	}
	for d := filepath.Dir(filepath.Dir(dir)); ; d = filepath.Dir(d) {
		if st, err := os.Stat(d); err == nil && st.Mode().Perm()&0o001 == 0 {
			t.Fatalf("%s, above the test's temporary directory, is mode %v: the postfix and dovecot users cannot reach files below it; set TMPDIR to a directory such as /tmp", d, st.Mode().Perm())
		}
		if d == filepath.Dir(d) {
			break
		}
	}
	return dir
}

// runCommand runs a program with a deadline and returns its combined
// output; err is non-nil when it could not run or exited non-zero.
func runCommand(timeout time.Duration, name string, args ...string) (string, error) {
	path := ProgramPath(name)
	if path == "" {
		return "", fmt.Errorf("%s: not installed (%s)", name, RealPostfixInstall)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	// Output goes to a file, not a pipe: "postfix start" leaves checks
	// running in the background that hold its stdout open for seconds,
	// and Wait would wait for a pipe's writers.
	f, err := os.CreateTemp("", "rcptguard-test-cmd-*")
	if err != nil {
		return "", err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	cmd.Stdout, cmd.Stderr = f, f
	err = cmd.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("timed out after %s", timeout)
	}
	b, _ := os.ReadFile(f.Name())
	out := string(b)
	if err != nil {
		return out, fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, out)
	}
	return out, nil
}

// lookupIDs returns the numeric user and group IDs of a system user.
func lookupIDs(t testing.TB, name string) (uid, gid int) {
	t.Helper()
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatalf("user %s: %v (is the postfix package installed? %s)", name, err, RealPostfixInstall)
	}
	uid, _ = strconv.Atoi(u.Uid)
	gid, _ = strconv.Atoi(u.Gid)
	return uid, gid
}

// tail returns the last n lines of the file at path, or a note saying why
// there are none.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// PostfixConfig describes a Postfix instance for StartPostfix.
type PostfixConfig struct {
	// Name names the instance: its syslog_name is "postfix-NAME" and its
	// host name NAME.test unless Main sets myhostname.
	Name string
	// Mailboxes, when set, make the instance the final destination of
	// these addresses' domains (virtual(8) mailbox domains): each
	// address gets a Maildir under MailDir, and RCPT TO any other
	// address of those domains is refused with 550 5.1.1.
	Mailboxes []string
	// Main are main.cf parameters; they override the instance's
	// defaults (see StartPostfix).
	Main map[string]string
	// SMTPD are the smtpd listener's master.cf "-o name=value" options.
	SMTPD []string
	// Chroot runs smtpd chrooted in the queue directory, as Debian's
	// master.cf does (chroot = y), with the /etc files it needs copied
	// there as Debian's start script does.
	Chroot bool
}

// Postfix is a running Postfix instance.
type Postfix struct {
	Name      string
	Dir       string // the instance's directory
	ConfigDir string // main.cf and master.cf: pass to "postfix -c"
	QueueDir  string // queue_directory
	MailDir   string // virtual_mailbox_base, when Mailboxes were given
	Maillog   string // maillog_file
	Addr      string // smtpd's "127.0.0.1:port"
	Port      int

	t         testing.TB
	mailboxes map[string]string // lower-case address → Maildir path
}

// postfixMasterCF is master.cf without the smtpd listener: every service
// a small instance needs, none chrooted (a chroot would need copies of
// /etc files in the queue directory).
const postfixMasterCF = `# service type  private unpriv  chroot  wakeup  maxproc command + args
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
`

// StartPostfix starts a Postfix instance in a new temporary directory,
// with smtpd on 127.0.0.1 at a free port, and stops it at the end of the
// test (logging the tail of its maillog when the test failed).
//
// The instance's defaults: loopback only, IPv4, no TLS, no DNS at all
// (smtp_dns_support_level = disabled; route domains with transport_maps),
// no local delivery (mydestination and alias_maps empty), mynetworks
// 127.0.0.0/8, logging to Dir/maillog through postlogd (no syslog
// daemon needed), and default_transport = discard, so that mail to
// domains the test does not route, such as bounces to the test's senders,
// never leaves the machine.
func StartPostfix(t testing.TB, cfg PostfixConfig) *Postfix {
	t.Helper()
	if cfg.Name == "" {
		cfg.Name = "postfix"
	}
	dir := SharedTempDir(t)
	p := &Postfix{
		Name:      cfg.Name,
		Dir:       dir,
		ConfigDir: filepath.Join(dir, "conf"),
		QueueDir:  filepath.Join(dir, "queue"),
		Maillog:   filepath.Join(dir, "maillog"),
		t:         t,
		mailboxes: map[string]string{},
	}
	// The queue directory belongs to root; "postfix start" makes its
	// subdirectories and the data directory with the right owners.
	for _, d := range []string{p.ConfigDir, p.QueueDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	main := p.defaultMain()
	if len(cfg.Mailboxes) > 0 {
		p.addMailboxes(t, cfg.Mailboxes, main)
	}
	for k, v := range cfg.Main {
		main[k] = v
	}
	p.writeMainCF(t, main)
	if cfg.Chroot {
		copyChrootFiles(t, p.QueueDir)
	}
	p.start(t, cfg)
	return p
}

// defaultMain returns the instance's default main.cf parameters (see
// StartPostfix).
func (p *Postfix) defaultMain() map[string]string {
	return map[string]string{
		"compatibility_level":      "3.6",
		"queue_directory":          p.QueueDir,
		"data_directory":           filepath.Join(p.Dir, "data"),
		"myhostname":               p.Name + ".test",
		"myorigin":                 "$myhostname",
		"mydestination":            "",
		"relay_domains":            "",
		"inet_interfaces":          "127.0.0.1",
		"inet_protocols":           "ipv4",
		"mynetworks":               "127.0.0.0/8",
		"syslog_name":              "postfix-" + p.Name,
		"maillog_file":             p.Maillog,
		"maillog_file_prefixes":    p.Dir,
		"alias_maps":               "",
		"alias_database":           "",
		"biff":                     "no",
		"smtpd_tls_security_level": "none",
		"smtp_tls_security_level":  "none",
		"smtp_dns_support_level":   "disabled",
		"smtp_host_lookup":         "native",
		"lmtp_host_lookup":         "native",
		"smtpd_peername_lookup":    "no",
		"default_transport":        "discard:not routed in this test",
		"delay_warning_time":       "0",
	}
}

// addMailboxes makes the instance the final destination of mailboxes'
// domains: a Maildir per address under MailDir, set up in main.
func (p *Postfix) addMailboxes(t testing.TB, mailboxes []string, main map[string]string) {
	t.Helper()
	uid, gid := lookupIDs(t, "postfix")
	p.MailDir = filepath.Join(p.Dir, "mail")
	if err := os.MkdirAll(p.MailDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(p.MailDir, uid, gid); err != nil {
		t.Fatal(err)
	}
	var table strings.Builder
	var domains []string
	for _, a := range mailboxes {
		a = strings.ToLower(a)
		_, domain, ok := strings.Cut(a, "@")
		if !ok {
			t.Fatalf("test.StartPostfix: mailbox %q is not an address", a)
		}
		if !slices.Contains(domains, domain) {
			domains = append(domains, domain)
		}
		// A trailing slash makes virtual(8) deliver to a Maildir.
		fmt.Fprintf(&table, "%s %s/\n", a, a)
		p.mailboxes[a] = filepath.Join(p.MailDir, a)
	}
	mapPath := filepath.Join(p.ConfigDir, "mailboxes")
	if err := os.WriteFile(mapPath, []byte(table.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	main["virtual_mailbox_domains"] = strings.Join(domains, ", ")
	main["virtual_mailbox_maps"] = "texthash:" + mapPath
	main["virtual_mailbox_base"] = p.MailDir
	main["virtual_uid_maps"] = fmt.Sprintf("static:%d", uid)
	main["virtual_gid_maps"] = fmt.Sprintf("static:%d", gid)
}

// writeMainCF writes main, sorted by name, as the instance's main.cf.
func (p *Postfix) writeMainCF(t testing.TB, main map[string]string) {
	t.Helper()
	names := make([]string, 0, len(main))
	for k := range main {
		names = append(names, k)
	}
	sort.Strings(names)
	var mainCF strings.Builder
	fmt.Fprintf(&mainCF, "# Postfix instance %q of a rcptguard test.\n", p.Name)
	for _, k := range names {
		fmt.Fprintf(&mainCF, "%s = %s\n", k, main[k])
	}
	if err := os.WriteFile(filepath.Join(p.ConfigDir, "main.cf"), []byte(mainCF.String()), 0o644); err != nil {
		t.Fatal(err)
	}
}

// writeMasterCF writes master.cf with the smtpd listener on p.Addr.
func (p *Postfix) writeMasterCF(t testing.TB, cfg PostfixConfig) {
	t.Helper()
	var master strings.Builder
	master.WriteString(postfixMasterCF)
	chroot := "n"
	if cfg.Chroot {
		chroot = "y"
	}
	fmt.Fprintf(&master, "%s inet n - %s - - smtpd\n", p.Addr, chroot)
	for _, o := range cfg.SMTPD {
		fmt.Fprintf(&master, "  -o %s\n", o)
	}
	if err := os.WriteFile(filepath.Join(p.ConfigDir, "master.cf"), []byte(master.String()), 0o644); err != nil {
		t.Fatal(err)
	}
}

// start starts the instance on a free port and stops it at t's cleanup.
// The port is free when chosen, but something may take it before the
// master binds it: then the start fails and is retried on another.
func (p *Postfix) start(t testing.TB, cfg PostfixConfig) {
	t.Helper()
	var lastErr error
	for range 3 {
		p.Port = FreePort(t)
		p.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(p.Port))
		p.writeMasterCF(t, cfg)
		started := time.Now()
		if _, lastErr = p.postfix("start"); lastErr == nil {
			t.Logf("postfix %s started on %s in %s", p.Name, p.Addr, time.Since(started).Round(time.Millisecond))
			break
		}
		if !strings.Contains(tail(p.Maillog, 20), "in use") {
			break
		}
	}
	if lastErr != nil {
		t.Fatalf("test.StartPostfix %s: %v\nmaillog:\n%s", p.Name, lastErr, tail(p.Maillog, 40))
	}
	t.Cleanup(p.stop)
	// "postfix start" waits for the master to be ready, so the listener
	// is bound; this only guards against surprises. It does not connect:
	// an smtpd started before its SASL server is up would exit, and the
	// master would then throttle smtpd for a minute.
	Eventually(t, 10*time.Second, "postfix "+p.Name+" smtpd to listen on "+p.Addr, func() bool {
		return listening(p.Port)
	})
}

// chrootFiles are the files Debian's Postfix start script copies into the
// chroot; those that exist here are copied.
var chrootFiles = []string{"/etc/localtime", "/etc/services", "/etc/resolv.conf", "/etc/hosts", "/etc/host.conf", "/etc/nsswitch.conf"}

func copyChrootFiles(t testing.TB, root string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range chrootFiles {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if err := os.WriteFile(filepath.Join(root, f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// ParseMainCF returns the parameters of a main.cf text: "name = value"
// lines, continued by lines that start with white space, comments and
// blank lines skipped. Values have their white space runs (line breaks
// included) folded to one space, as Postfix reads them.
func ParseMainCF(text string) map[string]string {
	params := map[string]string{}
	name := ""
	for line := range strings.SplitSeq(text, "\n") {
		trimmed := strings.TrimSpace(line)
		switch {
		case trimmed == "" || strings.HasPrefix(trimmed, "#"):
			continue
		case line[0] == ' ' || line[0] == '\t':
			if name != "" {
				params[name] = strings.TrimSpace(params[name] + " " + trimmed)
			}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok {
				name = ""
				continue
			}
			name = strings.TrimSpace(k)
			params[name] = strings.Join(strings.Fields(v), " ")
		}
	}
	return params
}

// listening reports whether a socket listens on 127.0.0.1:port (or on all
// addresses), as /proc/net/tcp tells.
func listening(port int) bool {
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return true // not Linux: trust "postfix start"
	}
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		// sl local_address rem_address st ...; 0A is LISTEN.
		if len(f) < 4 || f[3] != "0A" {
			continue
		}
		if f[1] == fmt.Sprintf("0100007F:%04X", port) || f[1] == fmt.Sprintf("00000000:%04X", port) {
			return true
		}
	}
	return false
}

// postfix runs "postfix -c ConfigDir ARGS".
func (p *Postfix) postfix(args ...string) (string, error) {
	return runCommand(60*time.Second, "postfix", append([]string{"-c", p.ConfigDir}, args...)...)
}

// masterPID returns the pid of the instance's master process, 0 when it
// does not run.
func (p *Postfix) masterPID() int {
	b, err := os.ReadFile(filepath.Join(p.QueueDir, "pid", "master.pid"))
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if pid <= 0 || !groupAlive(pid) {
		return 0
	}
	return pid
}

// stop stops the instance and waits for all its processes to be gone, so
// that the temporary directory can be removed.
func (p *Postfix) stop() {
	if p.t.Failed() {
		p.t.Logf("postfix %s maillog (%s), last lines:\n%s", p.Name, p.Maillog, tail(p.Maillog, 60))
	}
	pid := p.masterPID()
	if pid == 0 {
		return
	}
	if _, err := p.postfix("stop"); err != nil {
		p.t.Errorf("stopping postfix %s: %v", p.Name, err)
		_, _ = p.postfix("abort")
	}
	// The master leads a process group of its own with all its children.
	waitGroupGone(p.t, "postfix "+p.Name, pid, 15*time.Second)
}

// proc is a process as /proc/PID/stat tells it.
type proc struct {
	pid, ppid, pgrp int
	comm            string
}

// processes returns the live processes: zombies are left out, since no
// one may reap them (in a container, PID 1 often does not).
func processes() []proc {
	entries, _ := os.ReadDir("/proc")
	var ps []proc
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// "pid (comm) state ppid pgrp ..."; comm may hold spaces and
		// parentheses.
		s := string(b)
		open, closing := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
		if open < 0 || closing < open {
			continue
		}
		f := strings.Fields(s[closing+1:])
		if len(f) < 3 || f[0] == "Z" || f[0] == "X" {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		pgrp, _ := strconv.Atoi(f[2])
		ps = append(ps, proc{pid: pid, ppid: ppid, pgrp: pgrp, comm: s[open+1 : closing]})
	}
	return ps
}

// children returns the live processes whose parent is pid and whose
// command name is comm.
func children(pid int, comm string) []int {
	var pids []int
	for _, p := range processes() {
		if p.ppid == pid && p.comm == comm {
			pids = append(pids, p.pid)
		}
	}
	return pids
}

// groupAlive reports whether a live process is in process group pgid.
func groupAlive(pgid int) bool {
	if pgid <= 1 {
		return false
	}
	for _, p := range processes() {
		if p.pgrp == pgid {
			return true
		}
	}
	return false
}

// waitGroupGone waits until process group pgid has no live process; past
// timeout it kills the group and reports an error.
func waitGroupGone(t testing.TB, what string, pgid int, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for groupAlive(pgid) {
		if time.Now().After(deadline) {
			var left []string
			for _, p := range processes() {
				if p.pgrp == pgid {
					left = append(left, fmt.Sprintf("%d %s", p.pid, p.comm))
				}
			}
			t.Errorf("%s: processes of group %d still running %s after stop (%s); killing them", what, pgid, timeout, strings.Join(left, ", "))
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Reload runs "postfix reload" and waits until every smtpd process that
// ran before it has exited, so that the next SMTP connection is served by
// an smtpd that read the configuration and its tables anew (texthash:
// tables such as a check_sasl_access blocklist are read when an smtpd
// process starts).
func (p *Postfix) Reload(t testing.TB) {
	t.Helper()
	master := p.masterPID()
	if master == 0 {
		t.Fatalf("postfix %s reload: the master does not run", p.Name)
	}
	old := children(master, "smtpd")
	if _, err := p.postfix("reload"); err != nil {
		t.Fatalf("postfix %s reload: %v", p.Name, err)
	}
	Eventually(t, 15*time.Second, fmt.Sprintf("postfix %s: old smtpd processes %v to exit after reload", p.Name, old), func() bool {
		for _, pid := range old {
			if slices.Contains(children(master, "smtpd"), pid) {
				return false
			}
		}
		return true
	})
}

// QueueEntry is one message in a Postfix queue, as "postqueue -j" prints
// it.
type QueueEntry struct {
	QueueName   string `json:"queue_name"` // "hold", "incoming", "active", "deferred", ...
	QueueID     string `json:"queue_id"`
	ArrivalTime int64  `json:"arrival_time"`
	MessageSize int64  `json:"message_size"`
	Sender      string `json:"sender"`
	Recipients  []struct {
		Address     string `json:"address"`
		DelayReason string `json:"delay_reason,omitempty"`
	} `json:"recipients"`
}

// Queue returns the messages in the instance's queues (postqueue -j).
func (p *Postfix) Queue(t testing.TB) []QueueEntry {
	t.Helper()
	out, err := runCommand(30*time.Second, "postqueue", "-c", p.ConfigDir, "-j")
	if err != nil {
		t.Fatalf("postfix %s: %v", p.Name, err)
	}
	var q []QueueEntry
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<24)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		var e QueueEntry
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Fatalf("postfix %s: postqueue -j line %q: %v", p.Name, line, err)
		}
		q = append(q, e)
	}
	return q
}

// Held returns the messages in the hold queue whose envelope sender is
// sender (all held messages when sender is "").
func (p *Postfix) Held(t testing.TB, sender string) []QueueEntry {
	t.Helper()
	var held []QueueEntry
	for _, e := range p.Queue(t) {
		if e.QueueName == "hold" && (sender == "" || strings.EqualFold(e.Sender, sender)) {
			held = append(held, e)
		}
	}
	return held
}

// Release takes messages out of the hold queue (postsuper -H ID).
func (p *Postfix) Release(t testing.TB, ids ...string) {
	t.Helper()
	for _, id := range ids {
		if _, err := runCommand(30*time.Second, "postsuper", "-c", p.ConfigDir, "-H", id); err != nil {
			t.Fatalf("postfix %s: %v", p.Name, err)
		}
	}
}

// Postmap looks key up in a table with "postmap -q" under the instance's
// configuration, as Postfix's daemons would: it returns the value and
// whether the key was found.
func (p *Postfix) Postmap(t testing.TB, key, table string) (string, bool) {
	t.Helper()
	out, err := runCommand(30*time.Second, "postmap", "-c", p.ConfigDir, "-q", key, table)
	var exit *exec.ExitError
	if errors.As(err, &exit) && exit.ExitCode() == 1 && strings.TrimSpace(out) == "" {
		return "", false // not found
	}
	if err != nil {
		t.Fatalf("postfix %s: %v", p.Name, err)
	}
	return strings.TrimRight(out, "\n"), true
}

// LogTail returns the last n lines of the instance's maillog.
func (p *Postfix) LogTail(n int) string { return tail(p.Maillog, n) }

// Log returns the instance's whole maillog.
func (p *Postfix) Log() string {
	b, _ := os.ReadFile(p.Maillog)
	return string(b)
}

// MailboxMessage is a message delivered to a Maildir.
type MailboxMessage struct {
	Path    string
	Header  mail.Header
	Subject string // decoded
	Body    string
	Raw     []byte
}

// Messages returns the messages delivered so far to mailbox, one of the
// instance's Mailboxes, oldest first.
func (p *Postfix) Messages(t testing.TB, mailbox string) []MailboxMessage {
	t.Helper()
	dir, ok := p.mailboxes[strings.ToLower(mailbox)]
	if !ok {
		t.Fatalf("postfix %s: %s is not one of its mailboxes", p.Name, mailbox)
	}
	var files []string
	for _, sub := range []string{"new", "cur"} {
		entries, _ := os.ReadDir(filepath.Join(dir, sub))
		for _, e := range entries {
			if !e.IsDir() {
				files = append(files, filepath.Join(dir, sub, e.Name()))
			}
		}
	}
	// Maildir names start with the delivery time in seconds.
	sort.Strings(files)
	var msgs []MailboxMessage
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			continue // moved between new and cur meanwhile
		}
		m := MailboxMessage{Path: f, Raw: raw}
		if pm, err := mail.ReadMessage(bytes.NewReader(raw)); err == nil {
			m.Header = pm.Header
			m.Subject = pm.Header.Get("Subject")
			if dec, err := new(mime.WordDecoder).DecodeHeader(m.Subject); err == nil {
				m.Subject = dec
			}
			body, _ := io.ReadAll(pm.Body)
			m.Body = string(body)
		}
		msgs = append(msgs, m)
	}
	return msgs
}

// WaitMessage waits up to timeout for a message whose Subject contains
// subject in mailbox, and returns it.
func (p *Postfix) WaitMessage(t testing.TB, mailbox, subject string, timeout time.Duration) MailboxMessage {
	t.Helper()
	var found MailboxMessage
	Eventually(t, timeout, fmt.Sprintf("a message with subject %q in %s's mailbox at postfix %s", subject, mailbox, p.Name), func() bool {
		for _, m := range p.Messages(t, mailbox) {
			if strings.Contains(m.Subject, subject) {
				found = m
				return true
			}
		}
		return false
	})
	return found
}

// HasMessage reports whether mailbox holds a message whose Subject
// contains subject.
func (p *Postfix) HasMessage(t testing.TB, mailbox, subject string) bool {
	t.Helper()
	for _, m := range p.Messages(t, mailbox) {
		if strings.Contains(m.Subject, subject) {
			return true
		}
	}
	return false
}

// DovecotConfig describes a Dovecot that only authenticates, for Postfix's
// smtpd_sasl_type = dovecot.
type DovecotConfig struct {
	// Users maps login names to plain-text passwords (a passwd-file).
	Users map[string]string
	// AuthSocket is the absolute path of the unix socket Postfix
	// connects to, usually QUEUE_DIRECTORY/private/auth; it is made
	// mode 0660, owned by postfix:postfix.
	AuthSocket string
}

// dovecots numbers the Dovecot instances of this process, whose
// instance names must differ.
var dovecots atomic.Int64

// Dovecot is a running Dovecot authentication server.
type Dovecot struct {
	Dir string
	Log string // log_path

	t    testing.TB
	cmd  *exec.Cmd
	done chan error
}

// StartDovecotAuth starts "dovecot -F" with a configuration that serves no
// mail protocol, only SASL authentication (PLAIN and LOGIN, no TLS) for
// Postfix on cfg.AuthSocket, and stops it at the end of the test.
func StartDovecotAuth(t testing.TB, cfg DovecotConfig) *Dovecot {
	t.Helper()
	dir := SharedTempDir(t)
	d := &Dovecot{Dir: dir, Log: filepath.Join(dir, "dovecot.log"), t: t}
	var users strings.Builder
	for u, pw := range cfg.Users {
		if strings.ContainsAny(u+pw, ":\n") {
			t.Fatalf("test.StartDovecotAuth: user %q or its password holds ':' or a newline", u)
		}
		fmt.Fprintf(&users, "%s:{PLAIN}%s\n", u, pw)
	}
	passwd := filepath.Join(dir, "passwd")
	if err := os.WriteFile(passwd, []byte(users.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, sub := range []string{"base", "state"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// The instance name keeps this Dovecot's processes and base_dir apart
	// from a system Dovecot's.
	conf := fmt.Sprintf(`# Dovecot as Postfix's SASL server only, for a rcptguard test.
protocols =
instance_name = rcptguard-test-%d-%d
base_dir = %s
state_dir = %s
log_path = %s
info_log_path = %s
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
passdb {
  driver = passwd-file
  args = %s
}
userdb {
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}
service auth {
  unix_listener %s {
    mode = 0660
    user = postfix
    group = postfix
  }
}
`, os.Getpid(), dovecots.Add(1), filepath.Join(dir, "base"), filepath.Join(dir, "state"), d.Log, d.Log, passwd, cfg.AuthSocket)
	confPath := filepath.Join(dir, "dovecot.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	path := ProgramPath("dovecot")
	if path == "" {
		t.Fatalf("dovecot is not installed (%s)", RealPostfixInstall)
	}
	d.cmd = exec.Command(path, "-c", confPath, "-F")
	// A process group of its own, to find its children at the end.
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := os.Create(filepath.Join(dir, "stdout"))
	if err != nil {
		t.Fatal(err)
	}
	d.cmd.Stdout, d.cmd.Stderr = out, out
	if err := d.cmd.Start(); err != nil {
		out.Close()
		t.Fatalf("dovecot: %v", err)
	}
	d.done = make(chan error, 1)
	go func() {
		d.done <- d.cmd.Wait()
		out.Close()
	}()
	t.Cleanup(d.stop)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(cfg.AuthSocket); err == nil {
			break
		}
		select {
		case err := <-d.done:
			d.done <- err
			t.Fatalf("dovecot ended at start: %v\n%s\n%s", err, tail(filepath.Join(dir, "stdout"), 20), tail(d.Log, 20))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("dovecot: no auth socket %s after 10s\n%s", cfg.AuthSocket, tail(d.Log, 20))
		}
		time.Sleep(50 * time.Millisecond)
	}
	return d
}

// LogTail returns the last n lines of Dovecot's log.
func (d *Dovecot) LogTail(n int) string { return tail(d.Log, n) }

func (d *Dovecot) stop() {
	if d.t.Failed() {
		d.t.Logf("dovecot log (%s), last lines:\n%s\nstdout/stderr:\n%s", d.Log, tail(d.Log, 30), tail(filepath.Join(d.Dir, "stdout"), 10))
	}
	// SIGTERM to the whole process group: the master alone would exit
	// and leave its auth process (and with it log, anvil, stats) waiting
	// for smtpd's still open auth connection.
	pid := d.cmd.Process.Pid
	_ = syscall.Kill(-pid, syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		d.t.Errorf("dovecot did not stop within 10s of SIGTERM; killing it")
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		<-d.done
	}
	waitGroupGone(d.t, "dovecot", pid, 10*time.Second)
}

// SwaksMail is one message for Swaks.
type SwaksMail struct {
	Server   string // "127.0.0.1:port"
	User     string // SASL login (AUTH PLAIN); "" for none
	Password string
	From     string   // envelope sender and From:
	To       []string // envelope recipients and To:
	Subject  string
	Body     string
}

// SwaksResult is what swaks did.
type SwaksResult struct {
	QueueID    string // from the server's "250 ... queued as ID"
	Transcript string // swaks' output: the SMTP dialogue
}

var queuedAs = regexp.MustCompile(`queued as ([0-9A-Za-z]+)`)

// Swaks sends m with swaks. err is non-nil when swaks exits non-zero: a
// refused AUTH, MAIL, DATA, or every RCPT refused (a message with some
// recipients refused is still sent, and swaks exits 0).
func Swaks(t testing.TB, m SwaksMail) (SwaksResult, error) {
	t.Helper()
	args := []string{
		"--server", m.Server,
		"--helo", "client.test",
		"--from", m.From,
		"--to", strings.Join(m.To, ","),
		"--header", "Subject: " + m.Subject,
		"--body", m.Body,
		"--timeout", "30s",
	}
	if m.User != "" {
		args = append(args, "--auth", "PLAIN", "--auth-user", m.User, "--auth-password", m.Password)
	}
	out, err := runCommand(60*time.Second, "swaks", args...)
	r := SwaksResult{Transcript: out}
	if s := queuedAs.FindStringSubmatch(out); s != nil {
		r.QueueID = s[1]
	}
	return r, err
}
