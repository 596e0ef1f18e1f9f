package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/miekg/dns"

	"github.com/rcptguard/rcptguard/cmd/rcptguard/app"
)

// worldConfig is the bench world's settings (the flags of "world").
type worldConfig struct {
	Mailboxes int       // mbox0..mbox<N-1> exist at Domain
	Domain    string    // the recipients' domain
	Domains   int       // recipient domains: Domain and d1.Domain ... d<N-1>.Domain
	MXTrace   io.Writer // the MX's SMTP transcript, nil for none
	Dir       string    // config, blocklist; "" for a temporary directory
	Blocked   int       // blocklist entries for blocked0..blocked<N-1>@customer.test
	Listen    string    // policy listener
	Metrics   string    // metrics listener, "" for none
	LogLevel  string    // rcptguard's log level
	Limit     int       // detector.limit
	LogOut    io.Writer // rcptguard's log
	Redis     string    // cluster.redis, "" for a single host
}

func (c *worldConfig) check() error {
	switch {
	case c.Mailboxes < 1:
		return errors.New("-mailboxes must be at least 1")
	case c.Blocked < 0 || c.Blocked > 10_000_000:
		return errors.New("-blocked must be between 0 and 10000000")
	case c.Limit < 0:
		return errors.New("-limit must not be negative")
	case c.Domains < 1 || c.Domains > 1000:
		return errors.New("-domains must be between 1 and 1000")
	}
	if err := checkDomainName(c.Domain); err != nil {
		return fmt.Errorf("-domain: %w", err)
	}
	if _, _, err := splitTarget(c.Listen); err != nil {
		return fmt.Errorf("-listen %w", err)
	}
	if c.Metrics != "" {
		if _, _, err := splitTarget(c.Metrics); err != nil || strings.HasPrefix(c.Metrics, "unix:") {
			return fmt.Errorf("-metrics must be a loopback \"host:port\", got %q", c.Metrics)
		}
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		return fmt.Errorf("-log-level must be debug, info, warn or error, got %q", c.LogLevel)
	}
	return nil
}

func checkDomainName(s string) error {
	if _, ok := dns.IsDomainName(s); !ok || s == "" || strings.HasSuffix(s, ".") || strings.ContainsAny(s, "@ \t") {
		return fmt.Errorf("%q is not a domain name", s)
	}
	return nil
}

// worldStats is what the world's DNS and MX saw.
type worldStats struct {
	DNSQueries   int64
	Conns        int64 // SMTP connections to the MX
	Transactions int64 // MAIL FROM commands
	Rcpts        int64 // RCPT TO commands
	Accepted     int64
	Rejected     int64
}

func (s worldStats) String() string {
	return fmt.Sprintf("mx connections=%d transactions=%d rcpts=%d accepted=%d rejected=%d dns_queries=%d",
		s.Conns, s.Transactions, s.Rcpts, s.Accepted, s.Rejected, s.DNSQueries)
}

// runWorld starts the world's DNS server and MX on loopback, writes an
// rcptguard configuration that uses them, and runs rcptguard in this
// process with it until ctx ends. Progress goes to out, one "key value"
// line each: "dns ADDR", "mx ADDR", "config PATH" and, once rcptguard
// answers, "listening ADDR"; at the end the DNS and MX counts
// (worldStats.String). ready, when not nil, is called with the policy
// address too.
func runWorld(ctx context.Context, cfg worldConfig, out io.Writer, ready func(policy string)) (worldStats, error) {
	if err := cfg.check(); err != nil {
		return worldStats{}, err
	}
	dir, cleanup, err := worldDir(cfg.Dir)
	if err != nil {
		return worldStats{}, err
	}
	defer cleanup()

	domains := rcptDomains(cfg.Domain, cfg.Domains)
	mx, err := startMX(domains, cfg.Mailboxes, cfg.MXTrace)
	if err != nil {
		return worldStats{}, err
	}
	defer mx.close()
	_, mxPort, _ := net.SplitHostPort(mx.addr)
	mxs := make(map[string]string, len(domains))
	for _, d := range domains {
		// One MX host name per domain, all on 127.0.0.1, as distinct
		// domains have distinct MX hosts.
		mxs[d] = "mx." + d
	}
	names, err := startDNS(mxs)
	if err != nil {
		return worldStats{}, err
	}
	defer names.close()
	where := cfg.Domain
	if len(domains) > 1 {
		where = fmt.Sprintf("each of %s and d1..d%d.%s", cfg.Domain, len(domains)-1, cfg.Domain)
	}
	fmt.Fprintf(out, "dns %s\nmx %s (%d mailboxes at %s)\n", names.addr, mx.addr, cfg.Mailboxes, where)

	configPath, err := writeWorldConfig(dir, cfg, names.addr, mxPort)
	if err != nil {
		return worldStats{}, err
	}
	fmt.Fprintf(out, "config %s\n", configPath)
	rc, err := app.LoadConfig(configPath)
	if err != nil {
		return worldStats{}, err
	}
	logOut := cfg.LogOut
	if logOut == nil {
		logOut = io.Discard
	}
	err = app.Serve(ctx, rc, logOut, app.Hooks{Ready: func(policy []string, metrics string) {
		if metrics != "" {
			fmt.Fprintf(out, "metrics %s\n", metrics)
		}
		fmt.Fprintf(out, "listening %s\n", policy[0])
		if ready != nil {
			ready(policy[0])
		}
	}})
	st := mx.stats()
	st.DNSQueries = names.queries.Load()
	fmt.Fprintln(out, st)
	return st, err
}

// worldDir returns the world's directory: dir made absolute (and
// created), or a new temporary one that cleanup removes.
func worldDir(dir string) (string, func(), error) {
	if dir == "" {
		d, err := os.MkdirTemp("", "rcptguard-bench-world-")
		if err != nil {
			return "", nil, err
		}
		return d, func() { _ = os.RemoveAll(d) }, nil
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", nil, err
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		return "", nil, err
	}
	return abs, func() {}, nil
}

// writeWorldConfig writes the blocklist and rcptguard's configuration
// into dir and returns the configuration's path.
func writeWorldConfig(dir string, cfg worldConfig, dnsAddr, mxPort string) (string, error) {
	blocklist := filepath.Join(dir, "blocklist")
	if err := writeBlocklist(blocklist, cfg.Blocked); err != nil {
		return "", err
	}
	metrics := ""
	if cfg.Metrics != "" {
		metrics = fmt.Sprintf("\n[metrics]\nlisten = %q\n", cfg.Metrics)
	}
	if cfg.Redis != "" {
		metrics += fmt.Sprintf("\n[cluster]\nredis = %q\nkey_prefix = \"rcptguard-bench:\"\n", cfg.Redis)
	}
	configPath := filepath.Join(dir, "rcptguard.toml")
	config := fmt.Sprintf(`# written by rcptguard-bench world
[policy]
listen = [%q]

[detector]
limit = %d
warn_at = 0

[callout]
resolver = %q
port = %s
allow_private = true
# The world's one MX takes any load: the politeness caps would turn most
# primed verdicts into "unknown rate-limited", which is never cached.
per_domain_rcpt_rate = 10000000
per_host_rcpt_rate = 10000000
per_domain_rate = 1000000
per_host_rate = 1000000
session_rate = 1000000

[blocklist]
path = %q

[notify]
spool = %q

[queue]
requests = %q

[log]
level = %q
%s`, cfg.Listen, cfg.Limit, dnsAddr, mxPort, blocklist, filepath.Join(dir, "spool"), filepath.Join(dir, "hold-requests"), cfg.LogLevel, metrics)
	return configPath, os.WriteFile(configPath, []byte(config), 0o600)
}

// writeBlocklist writes a blocklist with n entries for the identities the
// load generator's -blocked-identities uses.
func writeBlocklist(path string, n int) error {
	var b strings.Builder
	b.WriteString("# rcptguard-bench: blocked identities for the HOLD scenario\n")
	for i := range n {
		b.WriteString(identityName(i, n))
		b.WriteString("\tHOLD rcptguard-bench: blocked for the benchmark\n")
	}
	return os.WriteFile(path, []byte(b.String()), 0o600)
}

// benchDNS answers MX and A queries for a few domains from a map; every
// other name does not exist.
type benchDNS struct {
	addr    string
	queries atomic.Int64
	records map[string][]dns.RR // canonical owner name → records
	servers []*dns.Server
	wg      sync.WaitGroup
}

// startDNS serves, for each domain → MX host name, "domain MX 10 host"
// and "host A 127.0.0.1", over UDP and TCP on one port of 127.0.0.1.
func startDNS(mxs map[string]string) (*benchDNS, error) {
	s := &benchDNS{records: make(map[string][]dns.RR)}
	for domain, host := range mxs {
		d, h := dns.Fqdn(strings.ToLower(domain)), dns.Fqdn(strings.ToLower(host))
		s.records[d] = append(s.records[d], &dns.MX{
			Hdr: dns.RR_Header{Name: d, Rrtype: dns.TypeMX, Class: dns.ClassINET, Ttl: 300}, Preference: 10, Mx: h})
		s.records[h] = append(s.records[h], &dns.A{
			Hdr: dns.RR_Header{Name: h, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 300}, A: net.IPv4(127, 0, 0, 1)})
	}
	var pc net.PacketConn
	var ln net.Listener
	var err error
	for range 10 { // the TCP port may be taken; try another
		if pc, err = net.ListenPacket("udp", "127.0.0.1:0"); err != nil {
			return nil, err
		}
		if ln, err = net.Listen("tcp", pc.LocalAddr().String()); err == nil {
			break
		}
		_ = pc.Close()
	}
	if err != nil {
		return nil, fmt.Errorf("dns: %w", err)
	}
	s.addr = pc.LocalAddr().String()
	h := dns.HandlerFunc(s.serve)
	s.servers = []*dns.Server{{PacketConn: pc, Handler: h}, {Listener: ln, Handler: h}}
	for _, srv := range s.servers {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		errc := make(chan error, 1)
		s.wg.Go(func() { errc <- srv.ActivateAndServe() })
		select {
		case <-started:
		case err := <-errc:
			s.close()
			return nil, fmt.Errorf("dns: %w", err)
		}
	}
	return s, nil
}

func (s *benchDNS) serve(w dns.ResponseWriter, req *dns.Msg) {
	s.queries.Add(1)
	resp := new(dns.Msg)
	if len(req.Question) != 1 {
		resp.SetRcode(req, dns.RcodeFormatError)
		_ = w.WriteMsg(resp)
		return
	}
	resp.SetReply(req)
	resp.RecursionAvailable = true
	q := req.Question[0]
	rrs, ok := s.records[strings.ToLower(q.Name)]
	if !ok {
		resp.Rcode = dns.RcodeNameError
	}
	for _, rr := range rrs {
		if rr.Header().Rrtype == q.Qtype {
			resp.Answer = append(resp.Answer, rr)
		}
	}
	_ = w.WriteMsg(resp)
}

func (s *benchDNS) close() {
	for _, srv := range s.servers {
		_ = srv.Shutdown()
	}
	s.wg.Wait()
}

// benchMX is the recipients' mail exchanger: it accepts the mailboxes
// mbox0..mbox<N-1> and any "v.*" local part at each of its domains, and rejects
// every other recipient with 550 5.1.1. It never accepts DATA.
type benchMX struct {
	addr      string
	domains   map[string]bool
	mailboxes int
	srv       *smtp.Server
	done      chan error

	conns, transactions, rcpts, accepted, rejected atomic.Int64
}

func startMX(domains []string, mailboxes int, trace io.Writer) (*benchMX, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("mx: %w", err)
	}
	m := &benchMX{addr: ln.Addr().String(), domains: make(map[string]bool), mailboxes: mailboxes, done: make(chan error, 1)}
	for _, d := range domains {
		m.domains[strings.ToLower(d)] = true
	}
	m.srv = smtp.NewServer(smtp.BackendFunc(func(*smtp.Conn) (smtp.Session, error) { return &mxSession{m: m}, nil }))
	m.srv.Domain = "mx." + domains[0]
	m.srv.ReadTimeout = time.Minute
	m.srv.WriteTimeout = time.Minute
	m.srv.ErrorLog = log.New(io.Discard, "", 0)
	if trace != nil {
		m.srv.Debug = trace
	}
	go func() { m.done <- m.srv.Serve(&countingListener{Listener: ln, n: &m.conns}) }()
	return m, nil
}

func (m *benchMX) close() {
	_ = m.srv.Close()
	<-m.done
}

func (m *benchMX) stats() worldStats {
	return worldStats{Conns: m.conns.Load(), Transactions: m.transactions.Load(), Rcpts: m.rcpts.Load(),
		Accepted: m.accepted.Load(), Rejected: m.rejected.Load()}
}

// exists tells whether addr is one of the MX's mailboxes.
func (m *benchMX) exists(addr string) bool {
	at := strings.LastIndexByte(addr, '@')
	if at < 0 || !m.domains[strings.ToLower(addr[at+1:])] {
		return false
	}
	local := strings.ToLower(addr[:at])
	if strings.HasPrefix(local, freshValidPrefix) {
		return true
	}
	digits, ok := strings.CutPrefix(local, mailboxPrefix)
	if !ok || digits == "" || (len(digits) > 1 && digits[0] == '0') {
		return false
	}
	n, err := strconv.Atoi(digits)
	return err == nil && n >= 0 && n < m.mailboxes
}

type mxSession struct{ m *benchMX }

func (s *mxSession) Reset()        {}
func (s *mxSession) Logout() error { return nil }

func (s *mxSession) Mail(string, *smtp.MailOptions) error {
	s.m.transactions.Add(1)
	return nil
}

func (s *mxSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	s.m.rcpts.Add(1)
	if s.m.exists(to) {
		s.m.accepted.Add(1)
		return nil
	}
	s.m.rejected.Add(1)
	return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "<" + to + ">: no such user"}
}

func (s *mxSession) Data(io.Reader) error {
	return &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 5, 1}, Message: "no DATA here"}
}

// countingListener counts accepted connections.
type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}
