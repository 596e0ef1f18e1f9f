// Package app is the rcptguard command: flags, the configuration file, the
// wiring of the detector, callout, blocklist and notify packages, and the
// subcommands. It holds no business logic. It is a package of its own so
// that the end-to-end tests in test/ run the very code the binary runs.
package app

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"
)

// exitUsage is the exit status for a bad command line or configuration.
const exitUsage = 2

// exitError is an error with the exit status it ends the command with;
// its text is the wrapped error's alone.
type exitError struct {
	status int
	err    error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

// usageErrorf is a bad command line or configuration, the caller's to
// fix: exit status 2.
func usageErrorf(format string, args ...any) error {
	return &exitError{status: exitUsage, err: fmt.Errorf(format, args...)}
}

const usage = `usage: rcptguard COMMAND [flags] [args]

Commands:
  serve   [-config FILE]                   run the policy service
  verify  [-config FILE] [-v] ADDR...      verify addresses, one verdict line each
  list    [-config FILE]                   print the blocklist
  block   [-config FILE] [-reason TEXT] [-login] IDENTITY
  unblock [-config FILE] IDENTITY
  status  [-config FILE] [-n N]            blocked identities (since, why, count) and
                                           those closest to their limit (root or the
                                           daemon's user)
  health  [-config FILE] [-addr ADDR] [-timeout D]
                                           check that the running service answers
  doctor  [-config FILE] [-postfix-config DIR]  check the Postfix integration
  held    [-config FILE] [IDENTITY]        held mail per identity (root)
  release [-config FILE] [-n] IDENTITY     unblock, then release its held mail (root)
  purge   [-config FILE] [-n] [-keep-block=false] IDENTITY
                                           delete its held mail (root)
  queue-hold [-config FILE]                hold blocked identities' queued mail on the
                                           daemon's requests (root; systemd path unit)
  notify-test [-config FILE]               send a sample abuse report now
  version                                  print version, commit and Go version

The configuration file is TOML. Without -config, $RCPTGUARD_CONFIG is read,
else /etc/rcptguard/rcptguard.toml when it exists, else built-in defaults.
Run "rcptguard COMMAND -h" for the flags of one command.
`

// Main runs the command line args (without the program name) and returns
// the process exit status: 0 success, 1 failure, 2 bad usage or
// configuration. SIGINT and SIGTERM end a running command gracefully.
func Main(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signalContext(syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return exitStatus(ctx, Run(ctx, args, stdout, stderr), stderr)
}

// signalCause is the cause of a context a signal ended.
type signalCause struct{ sig syscall.Signal }

func (s signalCause) Error() string { return s.sig.String() }

// signalContext is signal.NotifyContext whose cause says which signal
// ended it.
func signalContext(sigs ...os.Signal) (context.Context, func()) {
	ctx, cancel := context.WithCancelCause(context.Background())
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, sigs...)
	go func() {
		select {
		case s := <-ch:
			sig, _ := s.(syscall.Signal)
			cancel(signalCause{sig})
		case <-ctx.Done():
		}
	}()
	return ctx, func() { signal.Stop(ch); cancel(nil) }
}

// exitStatus says err on stderr and returns the status it exits with: 0
// for none and for -h; 128+N, without a word, when the command failed
// because signal N ended it (the shell's convention: 130 for Ctrl-C); 2
// for usage and configuration errors; else 1.
func exitStatus(ctx context.Context, err error, stderr io.Writer) int {
	var sc signalCause
	var ee *exitError
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(context.Cause(ctx), &sc):
		return 128 + int(sc.sig)
	case errors.As(err, &ee):
		fmt.Fprintln(stderr, "rcptguard:", err)
		return ee.status
	}
	fmt.Fprintln(stderr, "rcptguard:", err)
	return 1
}

// Run executes one command line until it is done or ctx ends.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return usageErrorf("no command given")
	}
	cmd, args := args[0], args[1:]
	switch cmd {
	case "serve":
		return cmdServe(ctx, args, stderr)
	case "verify":
		return cmdVerify(ctx, args, stdout, stderr)
	case "list":
		return cmdList(ctx, args, stdout, stderr)
	case "block":
		return cmdBlock(ctx, args, stdout, stderr)
	case "unblock":
		return cmdUnblock(ctx, args, stdout, stderr)
	case "notify-test":
		return cmdNotifyTest(ctx, args, stdout, stderr)
	case "health":
		return cmdHealth(ctx, args, stdout, stderr)
	case "status":
		return cmdStatus(ctx, args, stdout, stderr)
	case "doctor":
		return cmdDoctor(ctx, args, stdout, stderr)
	case "held":
		return cmdHeld(ctx, args, stdout, stderr)
	case "release":
		return cmdRelease(ctx, args, stdout, stderr)
	case "purge":
		return cmdPurge(ctx, args, stdout, stderr)
	case "queue-hold":
		return cmdQueueHold(ctx, args, stdout, stderr)
	case "version", "-version", "--version":
		if len(args) > 0 {
			return usageErrorf("version takes no arguments, got %q", args[0])
		}
		fmt.Fprintln(stdout, versionString())
		return nil
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return usageErrorf("unknown command %q", cmd)
}

// newFlags makes a command's flag set with the common -config flag. The
// flag package's own messages are not printed: the error is, once, by Main.
func newFlags(name, synopsis string, stderr io.Writer) (*flag.FlagSet, *string) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: rcptguard %s\n", synopsis)
		fs.SetOutput(stderr)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
	}
	config := fs.String("config", "", "configuration `file` (default: $RCPTGUARD_CONFIG, else "+defaultConfigPath+" if present)")
	return fs, config
}

// parseFlags parses args, flags before and after the arguments alike
// ("--" ends the flags), then loads the configuration. fs.Args() are the
// arguments afterwards. Errors exit with status 2.
func parseFlags(fs *flag.FlagSet, config *string, args []string) (*Config, error) {
	if err := parseInterspersed(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		return nil, usageErrorf("%s: %v", fs.Name(), err)
	}
	cfg, err := LoadConfig(configPath(*config))
	if err != nil {
		return nil, &exitError{status: exitUsage, err: err}
	}
	return cfg, nil
}

// parseNoArgs is parseFlags for a command that takes no arguments.
func parseNoArgs(fs *flag.FlagSet, config *string, args []string) (*Config, error) {
	cfg, err := parseFlags(fs, config, args)
	if err == nil && fs.NArg() > 0 {
		fs.Usage()
		return nil, usageErrorf("%s takes no arguments, got %q", fs.Name(), fs.Arg(0))
	}
	return cfg, err
}

// parseIdentityFlags is parseFlags for a command of exactly one IDENTITY,
// which it returns in its stored form.
func parseIdentityFlags(fs *flag.FlagSet, config *string, args []string) (*Config, string, error) {
	cfg, err := parseFlags(fs, config, args)
	if err != nil {
		return nil, "", err
	}
	id, err := oneIdentity(fs.Args())
	if err != nil {
		fs.Usage()
		return nil, "", err
	}
	return cfg, id, nil
}

// parseInterspersed is fs.Parse that goes on past an argument to the flags
// after it, as "rcptguard block alice -reason TEXT" is written; after
// it, fs.Args() holds the arguments alone, in their order.
func parseInterspersed(fs *flag.FlagSet, args []string) error {
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			break
		}
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			positional = append(positional, rest...) // all arguments after "--"
			break
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
	// Parse again, with no flags, so that fs.Args() is the arguments.
	return fs.Parse(append([]string{"--"}, positional...))
}

// version and commit may be set at build time with
//
//	-ldflags "-X github.com/rcptguard/rcptguard/cmd/rcptguard/app.version=v1.2.3
//	          -X github.com/rcptguard/rcptguard/cmd/rcptguard/app.commit=abc123"
//
// otherwise they come from the build info (module version, VCS revision).
var version, commit = "", ""

func versionString() string {
	v, rev, goVersion := version, commit, "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok {
		goVersion = bi.GoVersion
		if v == "" {
			v = bi.Main.Version
		}
		dirty := ""
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				if rev == "" {
					rev = s.Value
				}
			case "vcs.modified":
				if s.Value == "true" {
					dirty = "+dirty"
				}
			}
		}
		if rev != "" {
			rev += dirty
		}
	}
	if rev == "" {
		rev = "unknown"
	}
	if v == "" || v == "(devel)" {
		v = "devel"
	}
	return fmt.Sprintf("rcptguard %s commit %s %s", v, rev, goVersion)
}
