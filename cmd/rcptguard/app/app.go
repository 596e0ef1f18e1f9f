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
	"os/signal"
	"runtime/debug"
	"syscall"
)

// exitUsage is the exit status for a bad command line or configuration.
const exitUsage = 2

// errUsage marks errors that are the caller's: they exit with status 2.
var errUsage = errors.New("usage")

const usage = `usage: rcptguard COMMAND [flags] [args]

Commands:
  serve   [-config FILE]                   run the policy service
  verify  [-config FILE] [-v] ADDR...       verify addresses, one verdict line each
  list    [-config FILE]                   print the blocklist
  block   [-config FILE] [-reason TEXT] IDENTITY
  unblock [-config FILE] IDENTITY
  health  [-config FILE]                   check that the running service answers
  doctor  [-config FILE] [-postfix-config DIR]  check the Postfix integration
  held    [-config FILE] [IDENTITY]         held mail per identity (root)
  release [-config FILE] [-n] IDENTITY      unblock, then release its held mail (root)
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
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	err := Run(ctx, args, stdout, stderr)
	if err == nil {
		return 0
	}
	if !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(stderr, "rcptguard:", err)
	}
	if errors.Is(err, errUsage) || errors.Is(err, flag.ErrHelp) {
		return exitUsage
	}
	return 1
}

// Run executes one command line until it is done or ctx ends.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("%w: no command given", errUsage)
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
		fmt.Fprintln(stdout, versionString())
		return nil
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("%w: unknown command %q", errUsage, cmd)
}

// newFlags makes a command's flag set with the common -config flag.
func newFlags(name, synopsis string, stderr io.Writer) (*flag.FlagSet, *string) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: rcptguard %s\n", synopsis)
		fs.PrintDefaults()
	}
	config := fs.String("config", "", "configuration `file` (default: $RCPTGUARD_CONFIG, else "+defaultConfigPath+" if present)")
	return fs, config
}

// parseFlags parses args and loads the configuration; errors are usage
// errors.
func parseFlags(fs *flag.FlagSet, config *string, args []string) (*Config, error) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: %v", errUsage, err)
	}
	cfg, err := LoadConfig(configPath(*config))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errUsage, err)
	}
	return cfg, nil
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
