// Command rcptguard-bench measures Postfix policy services over loopback:
// a load generator that plays Postfix smtpd processes, a bare policy
// server to compare with, and a self-contained world (DNS, MX and
// rcptguard in one process) to measure rcptguard in.
//
//	rcptguard-bench load -target 127.0.0.1:10040 [-conns 64] [-duration 10s] ...
//	rcptguard-bench baseline [-listen 127.0.0.1:0]
//	rcptguard-bench world [-mailboxes 1000] [-dir DIR] [-blocked N] ...
//
// Everything stays on loopback: targets and listeners that are not
// loopback addresses or unix sockets are refused. test/bench/compare.sh
// uses the three to compare rcptguard with the bare server and postfwd.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"

	"github.com/rcptguard/rcptguard/detector"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// errUsage marks errors that are the command line's fault (exit status 2).
var errUsage = errors.New("usage")

const usage = `usage: rcptguard-bench COMMAND [flags]

commands:
  load      drive a policy service with Postfix-like RCPT requests and report
            requests/s, latency quantiles, errors and answers
  baseline  run the bare policy server (reads a request, answers DUNNO)
  world     run rcptguard in process against an in-process DNS server and MX
  table     print tagged load reports as one Markdown table (for compare.sh)
  sim       play honest and compromised identities against the detector in a
            modelled Internet, in virtual time; print a Markdown table

"rcptguard-bench COMMAND -h" describes a command's flags.
`

// run runs one command and returns the exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "load":
		err = cmdLoad(ctx, args[1:], stdout, stderr)
	case "baseline":
		err = cmdBaseline(ctx, args[1:], stdout, stderr)
	case "world":
		err = cmdWorld(ctx, args[1:], stdout, stderr)
	case "table":
		err = cmdTable(args[1:], os.Stdin, stdout, stderr)
	case "sim":
		err = cmdSim(ctx, args[1:], stdout, stderr)
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "rcptguard-bench: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintf(stderr, "rcptguard-bench %s: %v\n", args[0], err)
		return 2
	default:
		fmt.Fprintf(stderr, "rcptguard-bench %s: %v\n", args[0], err)
		return 1
	}
}

func newFlagSet(name, synopsis, help string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: rcptguard-bench %s\n\n%s\nflags:\n", synopsis, help)
		fs.PrintDefaults()
	}
	return fs
}

func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, fs.Arg(0))
	}
	return nil
}

const loadHelp = `Each connection plays one Postfix smtpd process: a persistent connection,
one request at a time. Requests are RCPT-stage requests with Postfix 3.x's
31 attributes for a client authenticated over TLS, in messages of one to
four recipients (queue_id empty for the first). Identities are
user<N>@customer.test, or blocked<N>@customer.test for the first
-blocked-identities of them (those "world -blocked" puts on its
blocklist). Recipients are mbox<N>@DOMAIN, a fraction -invalid of them
unknown<N>@DOMAIN; with -unique-rcpts each is new instead:
v.<run>.<conn>.<N>@DOMAIN, a mailbox in the world, or x.<...> for the
invalid ones. A request is assembled from pre-rendered text in a reused
buffer: nothing is formatted or allocated per request.

Before the clock starts every recipient is asked for once (-prime), so
that a verifying server has its verdicts cached; then -warmup runs
unmeasured and -duration is measured. Latency is the time from writing a
request to reading its answer, in a log-linear histogram (1.6% buckets).
A run ends by itself: at most a minute of priming, the warm-up, the
duration and one -timeout. Only loopback targets and unix sockets are
accepted.`

func cmdLoad(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("load", "load -target ADDR [flags]", loadHelp, stderr)
	var cfg loadConfig
	fs.StringVar(&cfg.Target, "target", "", "policy service: loopback \"host:port\" or \"unix:/path\" (required)")
	fs.IntVar(&cfg.Conns, "conns", 64, "connections (smtpd processes)")
	fs.DurationVar(&cfg.Duration, "duration", 10*time.Second, "measured time")
	fs.DurationVar(&cfg.Warmup, "warmup", 2*time.Second, "unmeasured time before it")
	fs.DurationVar(&cfg.Timeout, "timeout", 10*time.Second, "one request's timeout (Postfix's default is 100s; keep it above the server's own wait)")
	fs.IntVar(&cfg.RequestsPerConn, "requests-per-conn", 0, "reconnect after this many requests (the new connection counts in the next request's latency); 0: keep each connection")
	fs.BoolVar(&cfg.Prime, "prime", true, "ask for every recipient once before the clock starts")
	fs.IntVar(&cfg.Workload.identities, "identities", 10000, "distinct SASL identities, taken in turn")
	fs.IntVar(&cfg.Workload.blocked, "blocked-identities", 0, "how many of the identities are the blocked<N> ones")
	fs.IntVar(&cfg.Workload.mailboxes, "mailboxes", 1000, "valid recipients mbox0..mbox<N-1> (as world's -mailboxes)")
	fs.StringVar(&cfg.Workload.domain, "domain", defaultRcptDomain, "recipients' domain (as world's -domain)")
	domains := fs.Int("domains", 1, "recipient domains: DOMAIN, d1.DOMAIN, ... (as world's -domains)")
	fs.Float64Var(&cfg.Workload.invalid, "invalid", 0.1, "fraction of recipients that do not exist")
	fs.BoolVar(&cfg.Workload.unique, "unique-rcpts", false, "make every recipient new (nothing cached)")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if cfg.Target == "" {
		return fmt.Errorf("%w: -target is required", errUsage)
	}
	if *domains < 1 || *domains > 1000 {
		return fmt.Errorf("%w: -domains must be between 1 and 1000", errUsage)
	}
	cfg.Workload.domains = rcptDomains(cfg.Workload.domain, *domains)
	if err := cfg.check(); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	r, err := runLoad(ctx, cfg)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		return enc.Encode(r)
	}
	printReport(stdout, r)
	return nil
}

const baselineHelp = `The bare policy server: it reads each request with rcptguard's parser
(detector.ReadRequest) and answers DUNNO (detector.WriteAction), with a
buffered reader and writer per connection and nothing else. It prints
"listening ADDR" and serves until SIGINT or SIGTERM.`

func cmdBaseline(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("baseline", "baseline [-listen ADDR]", baselineHelp, stderr)
	listen := fs.String("listen", "127.0.0.1:0", "loopback \"host:port\" or \"unix:/path\"")
	if err := parse(fs, args); err != nil {
		return err
	}
	if _, _, err := splitTarget(*listen); err != nil {
		return fmt.Errorf("%w: -listen %v", errUsage, err)
	}
	ln, err := detector.Listen(*listen, 0o660)
	if err != nil {
		return err
	}
	addr := ln.Addr().String()
	if ln.Addr().Network() == "unix" {
		addr = "unix:" + addr
	}
	fmt.Fprintf(stdout, "listening %s\n", addr)
	return serveBaseline(ctx, ln)
}

const worldHelp = `Starts a DNS server and an MX on 127.0.0.1, writes an rcptguard
configuration using them into -dir (callout.resolver, callout.port,
allow_private, a blocklist with -blocked entries blocked<N>@customer.test,
detector.limit -limit), and runs rcptguard in this process. The DNS
answers MX DOMAIN and A mx.DOMAIN (and so for d1.DOMAIN ... with
-domains); the MX accepts mbox0..mbox<N-1>@DOMAIN and v.*@DOMAIN and
rejects every other recipient with 550 5.1.1.

Prints "dns ADDR", "mx ADDR", "config PATH" and, once rcptguard
answers, "listening ADDR"; runs until SIGINT or SIGTERM, then prints the
MX's and DNS server's counts on one line:
  mx connections=N transactions=N rcpts=N accepted=N rejected=N dns_queries=N`

func cmdWorld(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("world", "world [flags]", worldHelp, stderr)
	var cfg worldConfig
	fs.IntVar(&cfg.Mailboxes, "mailboxes", 1000, "mailboxes mbox0..mbox<N-1> at -domain")
	fs.StringVar(&cfg.Domain, "domain", defaultRcptDomain, "the recipients' domain")
	fs.IntVar(&cfg.Domains, "domains", 1, "recipient domains: DOMAIN, d1.DOMAIN, ..., each with its own MX host name")
	mxTrace := fs.String("mx-trace", "", "file for the MX's SMTP transcript (shows session reuse; slows the MX)")
	fs.StringVar(&cfg.Dir, "dir", "", "directory for the configuration and blocklist (default: a temporary one, removed at exit)")
	fs.IntVar(&cfg.Blocked, "blocked", 0, "blocklist entries blocked0..blocked<N-1>@customer.test")
	fs.StringVar(&cfg.Listen, "listen", "127.0.0.1:0", "rcptguard's policy.listen: loopback \"host:port\" or \"unix:/path\"")
	fs.StringVar(&cfg.Metrics, "metrics", "", "rcptguard's metrics.listen, loopback \"host:port\" (default: off)")
	fs.StringVar(&cfg.LogLevel, "log-level", "warn", "rcptguard's log.level: warn logs no decisions, info one line per decision")
	logFile := fs.String("log", "", "file for rcptguard's log (default: standard error)")
	fs.IntVar(&cfg.Limit, "limit", 1_000_000, "detector.limit: distinct invalid recipients per identity before it is blocked")
	fs.StringVar(&cfg.Redis, "redis", "", "rcptguard's cluster.redis, e.g. \"redis://127.0.0.1:6379/0\" (default: a single host)")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile of the whole run to this file (go tool pprof)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := cfg.check(); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("-cpuprofile: %w", err)
		}
		defer pprof.StopCPUProfile()
	}
	cfg.LogOut = stderr
	if *logFile != "" {
		f, err := os.OpenFile(*logFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return err
		}
		defer f.Close()
		cfg.LogOut = f
	}
	if *mxTrace != "" {
		f, err := os.Create(*mxTrace)
		if err != nil {
			return err
		}
		defer f.Close()
		cfg.MXTrace = f
	}
	_, err := runWorld(ctx, cfg, stdout, nil)
	if err != nil && strings.Contains(err.Error(), "\n") {
		// Configuration errors come one a line.
		return fmt.Errorf("\n%w", err)
	}
	return err
}

const tableHelp = `Reads load reports, one JSON object a line, each as "load -json" prints
it with three more fields: "scenario" (a name), "round" (1, 2, ...) and
"note" (free text). Prints one Markdown table: per scenario and connection
count, the run with the median requests/s of the rounds, its p50 and p99,
and the ratios to the -base scenario at the same connection count, each
the median of the ratios within a round. Reads FILE, or standard input.`

func cmdTable(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := newFlagSet("table", "table [-base NAME] [-versus A/B,...] [FILE]", tableHelp, stderr)
	base := fs.String("base", "baseline", "the scenario ratios are taken to")
	versus := fs.String("versus", "", "comma-separated A/B scenario pairs whose requests/s ratio is printed too")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	in := stdin
	switch fs.NArg() {
	case 0:
	case 1:
		f, err := os.Open(fs.Arg(0))
		if err != nil {
			return err
		}
		defer f.Close()
		in = f
	default:
		return fmt.Errorf("%w: one FILE at most", errUsage)
	}
	runs, err := readTagged(in)
	if err != nil {
		return err
	}
	var pairs []string
	if *versus != "" {
		pairs = strings.Split(*versus, ",")
	}
	writeTable(stdout, runs, *base, pairs)
	return nil
}
