package app

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rcptguard/rcptguard/cmd/rcptguard/doctor"
)

// errFindings makes doctor exit 1 when it found a problem; the findings
// themselves are already printed.
var errFindings = errors.New("doctor found problems (lines starting with FAIL)")

// cmdDoctor checks the Postfix integration of this installation.
func cmdDoctor(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, config := newFlags("doctor", "doctor [-config FILE] [-postfix-config DIR]", stderr)
	pfDir := fs.String("postfix-config", "", "Postfix configuration `directory` (postconf -c; default: Postfix's own)")
	postconf := fs.String("postconf", "", "the postconf `program` (default: found in $PATH or /usr/sbin)")
	self := fs.String("rcptguard", "", "the rcptguard `program` run as Postfix's user to ask the service (default: this one)")
	cfg, err := parseNoArgs(fs, config, args)
	if err != nil {
		return err
	}
	exe := *self
	if exe == "" {
		if exe, err = os.Executable(); err != nil {
			return fmt.Errorf("doctor: %w", err)
		}
	}
	findings, err := doctor.Check(ctx, doctor.Config{
		PostfixConfigDir: *pfDir,
		Postconf:         *postconf,
		Listen:           cfg.Policy.Listen,
		BlocklistPath:    cfg.Blocklist.Path,
		Wait:             cfg.Detector.Wait.D(),
		Health: func(ctx context.Context, addr string, u *user.User) (string, string, error) {
			return healthAs(ctx, exe, addr, u)
		},
	})
	if err != nil {
		return fmt.Errorf("doctor: cannot read Postfix's configuration: %w", err)
	}
	if !doctor.Report(stdout, findings) {
		return errFindings
	}
	return nil
}

// healthAs asks rcptguard at addr as user u would: as root it runs exe
// health as u; as u itself it asks in process; as anyone else it asks in
// process and says so.
func healthAs(ctx context.Context, exe, addr string, u *user.User) (answer, note string, err error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	uid, _ := strconv.Atoi(u.Uid)
	euid := os.Geteuid()
	if euid == uid {
		a, err := askHealth(ctx, addr)
		return a, "", err
	}
	if euid != 0 {
		a, err := askHealth(ctx, addr)
		me := strconv.Itoa(euid)
		if cur, err := user.Current(); err == nil {
			me = cur.Username
		}
		return a, "asked as " + me + ", not as " + u.Username + ": run doctor as root to ask as " + u.Username, err
	}
	gid, _ := strconv.Atoi(u.Gid)
	var groups []uint32
	if ids, err := u.GroupIds(); err == nil {
		for _, g := range ids {
			if n, err := strconv.Atoi(g); err == nil {
				groups = append(groups, uint32(n))
			}
		}
	}
	cmd := exec.CommandContext(ctx, exe, "health", "-addr", addr, "-timeout", "3s")
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: groups}}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(out.String()), "rcptguard: "))
		if msg == "" {
			msg = err.Error()
		}
		return "", "", errors.New(msg)
	}
	a := strings.TrimSpace(out.String())
	// "ok ADDR action=DUNNO": keep the answer.
	if i := strings.Index(a, "action="); i >= 0 {
		a = a[i:]
	}
	return a, "", nil
}
