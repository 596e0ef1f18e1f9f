package callout

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/dgraph-io/ristretto/v2"
)

// ReasonAddressLiteral is the reason for recipients at an address literal
// (user@[192.0.2.1]): there is no domain to look up, and probing arbitrary
// IP addresses on a sender's behalf is not something rcptguard does.
const ReasonAddressLiteral Reason = "address-literal"

// ReasonRateLimited is the reason when the cap on connections to the
// recipient's domain or MX host was reached: nothing was sent.
const ReasonRateLimited Reason = "rate-limited"

// Config holds a Verifier's options. New fills the defaults documented on
// each field.
type Config struct {
	// Resolver finds the MX hosts of a domain. Required.
	Resolver MXResolver
	// Dialer opens TCP connections. Default: a net.Dialer.
	Dialer Dialer
	// Port is the SMTP port probed on every MX host. Default 25.
	Port int
	// Timeout bounds one verification, MX lookup and all MX hosts
	// included. Default 10s.
	Timeout time.Duration
	// Helo is the name sent in EHLO. Default: the host name.
	Helo string
	// MailFrom is the reverse path of probes. Default "" (null sender).
	MailFrom string

	// PositiveTTL keeps valid verdicts (default 24h), NegativeTTL invalid
	// ones and domain-level permanent DNS facts (default 2h), UnknownTTL
	// unknown ones so a tarpitting or greylisting MX is not probed for
	// every message (default 5m).
	PositiveTTL, NegativeTTL, UnknownTTL time.Duration
	// CatchAllTTL keeps what was learnt about a domain being a catch-all
	// or not (default 7 days).
	CatchAllTTL time.Duration
	// RefusalTTL is how long an MX host that refused our MAIL FROM is left
	// alone (default 1h).
	RefusalTTL time.Duration
	// CacheSize bounds the verdict cache, in bytes (default 64 MiB).
	CacheSize int64

	// AllowPrivate permits MX hosts on loopback, private, link-local and
	// other non-public addresses. Off by default: the MX of a recipient
	// domain is chosen by whoever controls its DNS, and must not turn
	// rcptguard into a scanner of the internal network.
	AllowPrivate bool
	// CatchAllProbe sends one RCPT for a random local part when a
	// recipient is accepted, to detect domains that accept everything.
	CatchAllProbe bool
	// PerHost bounds concurrent connections to one MX host, and
	// concurrent sessions for one domain (default 4).
	PerHost int
	// MaxRcpts bounds the recipients probed in one transaction; more
	// waiting recipients of the domain go to the next transaction on the
	// same connection after RSET (default 20).
	MaxRcpts int
	// SingleRcptMX lists MX host patterns that refuse a second RCPT in one
	// session: one recipient per connection and no catch-all probe.
	// "*.example.net" matches every name below example.net. For this and
	// the two lists below, nil means the built-in Default list and an
	// empty, non-nil list means none.
	SingleRcptMX []string
	// AcceptAllDomains lists domains that accept every recipient and
	// bounce later; they are never probed and verdicts are unknown.
	AcceptAllDomains []string
	// AcceptAllMX lists MX host patterns with the same behaviour.
	AcceptAllMX []string
	// NoTLS disables STARTTLS on probes.
	NoTLS bool
	// PerDomainRate and PerHostRate cap the new SMTP connections per
	// minute to one recipient domain and to one MX host (defaults 30 and
	// 300): a recipient list aimed at one domain must not turn rcptguard
	// into a flood of connections to it. Over the cap a verification is
	// unknown, reason "rate-limited", and nothing is sent.
	PerDomainRate, PerHostRate int
	// SessionIdle is how long a session stays open, after its last
	// recipient, for more recipients of the same domain (default 2s, as
	// Postfix's smtp_connection_cache_time_limit). Negative: no waiting.
	SessionIdle time.Duration
	// LocalAddrs lists this host's own addresses, never probed unless
	// AllowPrivate (an MX pointing back at us). Default: the addresses of
	// the network interfaces, read at New.
	LocalAddrs []netip.Addr

	// Logger receives debug lines per probe. Default: discard.
	Logger *slog.Logger
	// Now is the clock for cache expiry. Default time.Now.
	Now func() time.Time
	// Transcript, when set, receives the SMTP dialogue of every probe.
	Transcript io.Writer
}

// Provider rules built in; a configuration that sets the key replaces them.
var (
	DefaultSingleRcptMX     = []string{"*.mail.protection.outlook.com", "*.olc.protection.outlook.com"}
	DefaultAcceptAllDomains = []string{"yahoo.com", "ymail.com", "rocketmail.com", "aol.com", "aim.com"}
	DefaultAcceptAllMX      = []string{"*.yahoodns.net"}
)

// Verifier verifies recipient addresses. It is safe for concurrent use.
// Its workers run until Close.
type Verifier struct {
	cfg   Config
	log   *slog.Logger
	cache *ristretto.Cache[string, cacheEntry]
	hosts hostSlots
	conns rateWindows // new connections per domain and per MX host, this minute
	local map[netip.Addr]bool

	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	closed   bool
	inflight map[string]*call
	domains  map[string]*domainQueue

	trMu sync.Mutex
}

// call is one verification in progress; every Verify of the same address
// while it runs waits on it.
type call struct {
	key      string
	addr     Address
	deadline time.Time
	res      Result // tentative until done is closed
	done     chan struct{}
	finished bool // finish was called; only the owning worker reads it
}

// domainQueue holds the calls waiting for a session to their domain.
type domainQueue struct {
	pending []*call
	workers int           // worker goroutines for the domain, idle ones included
	idle    int           // workers holding an open session, waiting for calls
	wake    chan struct{} // one token per idle worker woken by join
}

// cacheEntry is what the cache keeps: a verdict and when it expires by
// the injected clock (ristretto's own TTL only reclaims memory).
type cacheEntry struct {
	res     Result
	expires int64 // unix nanoseconds
}

// Cache key prefixes for facts that are not about one address. An address
// key never starts with one of these characters' positions: it always has
// a non-empty local part before '@'.
const (
	keyDomain   = "@" // permanent DNS fact about a domain
	keyCatchAll = "~" // catch-all knowledge about a domain
	keyRefusal  = "!" // MX host refusing our MAIL FROM
)

// New validates cfg, fills defaults and returns a running Verifier.
func New(cfg Config) (*Verifier, error) {
	if cfg.Resolver == nil {
		return nil, errors.New("callout: Config.Resolver is required")
	}
	if cfg.Dialer == nil {
		cfg.Dialer = &net.Dialer{}
	}
	setDefault(&cfg.Port, 25)
	setDefault(&cfg.Timeout, 10*time.Second)
	setDefault(&cfg.PositiveTTL, 24*time.Hour)
	setDefault(&cfg.NegativeTTL, 2*time.Hour)
	setDefault(&cfg.UnknownTTL, 5*time.Minute)
	setDefault(&cfg.CatchAllTTL, 7*24*time.Hour)
	setDefault(&cfg.RefusalTTL, time.Hour)
	setDefault(&cfg.CacheSize, 64<<20)
	setDefault(&cfg.PerHost, 4)
	setDefault(&cfg.MaxRcpts, 20)
	setDefault(&cfg.SessionIdle, 2*time.Second)
	setDefault(&cfg.PerDomainRate, 30)
	setDefault(&cfg.PerHostRate, 300)
	if cfg.LocalAddrs == nil {
		cfg.LocalAddrs = interfaceAddrs()
	}
	if cfg.SingleRcptMX == nil {
		cfg.SingleRcptMX = DefaultSingleRcptMX
	}
	if cfg.AcceptAllDomains == nil {
		cfg.AcceptAllDomains = DefaultAcceptAllDomains
	}
	if cfg.AcceptAllMX == nil {
		cfg.AcceptAllMX = DefaultAcceptAllMX
	}
	if cfg.Helo == "" {
		h, err := os.Hostname()
		if err != nil || h == "" {
			h = "localhost"
		}
		cfg.Helo = h
	}
	if cfg.Port < 1 || cfg.Port > 65535 {
		return nil, fmt.Errorf("callout: port %d out of range", cfg.Port)
	}
	if strings.ContainsAny(cfg.Helo, " \t\r\n\x00") {
		return nil, fmt.Errorf("callout: helo %q contains white space or control characters", cfg.Helo)
	}
	if cfg.MailFrom != "" {
		if _, err := ParseAddress(cfg.MailFrom); err != nil {
			return nil, fmt.Errorf("callout: mail_from: %w", err)
		}
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"timeout", cfg.Timeout}, {"positive_ttl", cfg.PositiveTTL}, {"negative_ttl", cfg.NegativeTTL}, {"unknown_ttl", cfg.UnknownTTL}} {
		if d.v < 0 {
			return nil, fmt.Errorf("callout: %s must not be negative", d.name)
		}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	cache, err := ristretto.NewCache(&ristretto.Config[string, cacheEntry]{
		// Ten counters per entry the cache can hold, an entry with its
		// bookkeeping taking some 512 bytes: the admission sketch and its
		// bloom filter are allocated whole at start, 6 MiB for 64 MiB.
		NumCounters:        max(cfg.CacheSize/512*10, 1000),
		MaxCost:            cfg.CacheSize,
		BufferItems:        64,
		IgnoreInternalCost: true,
	})
	if err != nil {
		return nil, fmt.Errorf("callout: cache: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Verifier{
		cfg:      cfg,
		log:      cfg.Logger,
		cache:    cache,
		hosts:    hostSlots{limit: cfg.PerHost, used: map[string]*hostSlot{}},
		conns:    rateWindows{now: cfg.Now, m: map[string]int{}},
		local:    addrSet(cfg.LocalAddrs),
		ctx:      ctx,
		cancel:   cancel,
		inflight: map[string]*call{},
		domains:  map[string]*domainQueue{},
	}, nil
}

func setDefault[T comparable](p *T, def T) {
	var zero T
	if *p == zero {
		*p = def
	}
}

// Close stops the workers: verifications in progress end with reason
// "shutdown". It waits for the workers and releases the cache.
func (v *Verifier) Close() error {
	v.mu.Lock()
	already := v.closed
	v.closed = true
	v.mu.Unlock()
	v.cancel()
	v.wg.Wait()
	if !already {
		v.cache.Close()
	}
	return nil
}

// Verify returns the verdict on one recipient address. It blocks until the
// verdict is known, the Verifier's timeout passes, or ctx ends; in the last
// case the result is unknown with reason "canceled", and the probe goes on
// in the background so its verdict is cached for the next asker.
func (v *Verifier) Verify(ctx context.Context, address string) Result {
	fast := fastKey(address)
	if res, ok := v.lookup(fast); ok {
		res.Address = fast
		return res
	}
	a, err := ParseAddress(address)
	if err != nil {
		// Postfix hands policy services the recipient in its internal,
		// unquoted form: RCPT TO:<"john doe"@example.com> arrives as
		// john doe@example.com. Quote such a local part again, as Postfix
		// does on the wire, before calling the address bad.
		if q, ok := requoteLocal(address); ok {
			a, err = ParseAddress(q)
		}
	}
	if err != nil {
		return Result{Address: boundText(fast, 320), Status: StatusInvalid, Reason: ReasonBadSyntax, Detail: err.Error()}
	}
	key := a.Key()
	if key != fast {
		if res, ok := v.lookup(key); ok {
			res.Address = key
			return res
		}
	}
	if res, ok := v.shortcut(a, key); ok {
		return res
	}
	c := v.join(a, key)
	select {
	case <-c.done:
		return c.res
	case <-ctx.Done():
		return Result{Address: key, Status: StatusUnknown, Reason: ReasonCanceled, Detail: ctx.Err().Error()}
	}
}

// Cached returns the cached verdict for address, if there is a fresh one,
// without parsing, DNS or SMTP: the cheap first try of a caller that must
// otherwise set up a wait.
func (v *Verifier) Cached(address string) (Result, bool) {
	fast := fastKey(address)
	res, ok := v.lookup(fast)
	res.Address = fast
	return res, ok
}

// requoteLocal turns local@domain whose local part is not a dot-atom into
// "local"@domain, escaping backslashes and quotes (RFC 5321 §4.1.2
// quoted-string). ok is false when there is nothing to quote: no '@', an
// empty local part, or a local part that is quoted already.
func requoteLocal(s string) (string, bool) {
	if len(s) >= 2 && s[0] == '<' && s[len(s)-1] == '>' {
		s = s[1 : len(s)-1]
	}
	at := strings.LastIndexByte(s, '@')
	if at <= 0 || s[0] == '"' {
		return "", false
	}
	local := s[:at]
	var b strings.Builder
	b.Grow(len(s) + 4)
	b.WriteByte('"')
	for i := 0; i < len(local); i++ {
		if c := local[i]; c == '"' || c == '\\' {
			b.WriteByte('\\')
		}
		b.WriteByte(local[i])
	}
	b.WriteByte('"')
	b.WriteString(s[at:])
	return b.String(), true
}

// fastKey is the cache key for an address as Postfix usually sends it:
// bare and lower case, in which case it costs no allocation.
func fastKey(s string) string {
	if len(s) >= 2 && s[0] == '<' && s[len(s)-1] == '>' {
		s = s[1 : len(s)-1]
	}
	return strings.ToLower(s)
}

// lookup returns a cached verdict that has not expired.
func (v *Verifier) lookup(key string) (Result, bool) {
	e, ok := v.cache.Get(key)
	if !ok || v.cfg.Now().UnixNano() >= e.expires {
		return Result{}, false
	}
	e.res.Cached = true
	return e.res, true
}

// store caches res under key for ttl.
func (v *Verifier) store(key string, res Result, ttl time.Duration) {
	if ttl <= 0 {
		return
	}
	res.Cached = false
	cost := int64(len(key)+len(res.Address)+len(res.Host)+len(res.Reply.Text)+len(res.Detail)) + 160
	v.cache.SetWithTTL(key, cacheEntry{res: res, expires: v.cfg.Now().Add(ttl).UnixNano()}, cost, ttl)
}

// shortcut answers without a probe when a rule or a domain-level fact
// decides.
func (v *Verifier) shortcut(a Address, key string) (Result, bool) {
	unknown := func(r Reason, detail string) (Result, bool) {
		return Result{Address: key, Status: StatusUnknown, Reason: r, Detail: detail}, true
	}
	if a.Literal.IsValid() {
		return unknown(ReasonAddressLiteral, "recipient at an address literal is not probed")
	}
	if matchDomain(v.cfg.AcceptAllDomains, a.Domain) {
		return unknown(ReasonAcceptAll, "domain accepts every recipient and bounces later; not probed")
	}
	for _, k := range [...]string{keyDomain, keyCatchAll} {
		if res, ok := v.lookup(k + a.Domain); ok && res.Status != StatusValid {
			res.Address = key
			return res, true
		}
	}
	return Result{}, false
}

// join returns the call verifying key, starting one (and a worker for its
// domain when allowed) if there is none.
func (v *Verifier) join(a Address, key string) *call {
	v.mu.Lock()
	defer v.mu.Unlock()
	if c := v.inflight[key]; c != nil {
		return c
	}
	c := &call{key: key, addr: a, deadline: v.cfg.Now().Add(v.cfg.Timeout), done: make(chan struct{})}
	if v.closed {
		c.res = Result{Address: key, Status: StatusUnknown, Reason: ReasonShutdown}
		close(c.done)
		return c
	}
	v.inflight[key] = c
	q := v.domains[a.Domain]
	if q == nil {
		q = &domainQueue{wake: make(chan struct{}, v.cfg.PerHost)}
		v.domains[a.Domain] = q
	}
	q.pending = append(q.pending, c)
	switch {
	case q.idle > 0:
		// A worker keeps a session to the domain open: it takes the call
		// over that session, with no new connection.
		q.idle--
		q.wake <- struct{}{}
	case q.workers < v.cfg.PerHost && len(q.pending) > q.workers-q.idle:
		// More calls wait than busy workers will pick up at their next
		// turn: another session, up to PerHost.
		q.workers++
		v.wg.Add(1)
		go v.work(a.Domain, q)
	}
	return c
}

// take hands a worker the next batch of its domain's calls. When there is
// none and linger is set (the worker holds an open session), it waits up
// to SessionIdle for a call to arrive, as Postfix's connection cache
// does, so a sender mailing one recipient after another over the same
// domain does not make one connection per recipient. It returns nil when
// the worker should end; the worker is then no longer counted.
func (v *Verifier) take(domain string, q *domainQueue, n int, lingerHost string) []*call {
	v.mu.Lock()
	defer v.mu.Unlock()
	// Woken for a call another worker took first, wait again until the
	// idle time is up. A worker that another domain waits behind for a
	// connection slot to the same MX host (one host serves thousands of
	// hosted domains) gives the slot up at once instead.
	idleUntil := time.Now().Add(v.cfg.SessionIdle)
	for len(q.pending) == 0 && lingerHost != "" && v.cfg.SessionIdle > 0 && v.ctx.Err() == nil {
		left := time.Until(idleUntil)
		if left <= 0 {
			break
		}
		wanted := v.hosts.wanted(lingerHost)
		q.idle++
		v.mu.Unlock()
		t := time.NewTimer(left)
		woken, yield := false, false
		select {
		case <-q.wake:
			woken = true
		case <-wanted:
			yield = true
		case <-t.C:
		case <-v.ctx.Done():
		}
		t.Stop()
		v.mu.Lock()
		if !woken {
			select {
			case <-q.wake: // join counted an idle worker out just as we gave up
			default:
				q.idle--
			}
		}
		if yield {
			break
		}
	}
	if len(q.pending) == 0 {
		q.workers--
		if q.workers == 0 {
			delete(v.domains, domain)
		}
		return nil
	}
	n = min(n, len(q.pending))
	batch := make([]*call, n)
	copy(batch, q.pending)
	clear(q.pending[:n])
	q.pending = q.pending[n:]
	return batch
}

// finish publishes the verdict of c to its waiters and the cache.
func (v *Verifier) finish(c *call, res Result) {
	res.Address = c.key
	switch {
	case res.Reason == ReasonCanceled || res.Reason == ReasonShutdown:
	case res.Status == StatusValid:
		v.store(c.key, res, v.cfg.PositiveTTL)
	case res.Status == StatusInvalid:
		v.store(c.key, res, v.cfg.NegativeTTL)
	default:
		v.store(c.key, res, v.cfg.UnknownTTL)
	}
	v.mu.Lock()
	delete(v.inflight, c.key)
	v.mu.Unlock()
	c.res = res
	c.finished = true
	close(c.done)
	v.log.Debug("callout verdict", slog.String("rcpt", c.key), slog.String("status", string(res.Status)),
		slog.String("reason", string(res.Reason)), slog.String("mx", res.Host), slog.Int("code", res.Reply.Code),
		slog.String("reply", res.Reply.String()), slog.String("detail", res.Detail))
}

// work is a domain worker: it probes batches of the domain's waiting
// recipients, keeping one SMTP session open between batches, until no
// recipient waits.
func (v *Verifier) work(domain string, q *domainQueue) {
	defer v.wg.Done()
	w := &worker{v: v, domain: domain}
	defer w.closeSession()
	for {
		lingerHost := ""
		if w.sess != nil {
			lingerHost = w.sess.host.Name
		}
		batch := v.take(domain, q, v.cfg.MaxRcpts, lingerHost)
		if batch == nil {
			return
		}
		w.run(batch)
	}
}

// worker holds the state of one domain worker goroutine.
type worker struct {
	v       *Verifier
	domain  string
	sess    *session
	primary string // the most preferred MX host of the current batch
}

func (w *worker) closeSession() {
	if w.sess == nil {
		return
	}
	w.sess.close()
	w.v.hosts.release(w.sess.host.Name)
	w.sess = nil
}

// run verifies one batch of recipients of the worker's domain and
// finishes every call in it.
func (w *worker) run(batch []*call) {
	v := w.v
	deadline := batch[0].deadline
	for _, c := range batch[1:] {
		if c.deadline.Before(deadline) {
			deadline = c.deadline
		}
	}
	// The calls' deadlines are by the injected clock; the context runs on
	// the real one.
	ctx, cancel := context.WithTimeout(v.ctx, deadline.Sub(v.cfg.Now()))
	defer cancel()
	finishAll := func(calls []*call, res Result) {
		for _, c := range calls {
			v.finish(c, res)
		}
	}

	hosts, err := v.cfg.Resolver.LookupMX(ctx, w.domain)
	if err != nil {
		res := v.dnsResult(ctx, err)
		if res.Status == StatusInvalid {
			v.store(keyDomain+w.domain, res, v.cfg.NegativeTTL)
		}
		finishAll(batch, res)
		return
	}
	for _, h := range hosts {
		if matchDomain(v.cfg.AcceptAllMX, h.Name) {
			finishAll(batch, Result{Status: StatusUnknown, Reason: ReasonAcceptAll, Host: h.Name,
				Detail: "MX host accepts every recipient and bounces later; not probed"})
			return
		}
	}

	if len(hosts) > 0 {
		w.primary = hosts[0].Name
	}
	// Whatever happens below, every call of the batch ends finished.
	defer func() {
		for _, c := range batch {
			if c.finished {
				continue
			}
			res := c.res
			if res.Status == "" {
				res = Result{Status: StatusUnknown, Reason: ReasonUnreachable, Detail: "no MX host could be tried"}
			}
			v.finish(c, res)
		}
	}()
	remaining := batch
	for _, h := range hosts {
		if len(remaining) == 0 {
			break
		}
		if res, ok := v.lookup(keyRefusal + h.Name); ok {
			setAll(remaining, res)
			continue
		}
		ips := h.IPs
		if !v.cfg.AllowPrivate {
			ips = v.safeIPs(h.IPs)
		}
		switch {
		case len(ips) == 0 && len(h.IPs) > 0:
			setAll(remaining, Result{Status: StatusUnknown, Reason: ReasonUnsafeAddress, Host: h.Name,
				Detail: fmt.Sprintf("MX %s resolves only to non-public addresses (%s); set callout.allow_private to probe it", h.Name, joinIPs(h.IPs))})
			continue
		case len(ips) == 0:
			setAll(remaining, Result{Status: StatusUnknown, Reason: ReasonUnreachable, Host: h.Name,
				Detail: fmt.Sprintf("MX %s has no address", h.Name)})
			continue
		}
		remaining = w.probeHost(ctx, h, ips, remaining)
	}
}

func setAll(calls []*call, res Result) {
	for _, c := range calls {
		c.res = res
	}
}

// dnsResult turns a failed MX lookup into a verdict.
func (v *Verifier) dnsResult(ctx context.Context, err error) Result {
	r := Result{Detail: err.Error()}
	switch {
	case errors.Is(err, ErrNXDomain):
		r.Status, r.Reason = StatusInvalid, ReasonNXDomain
	case errors.Is(err, ErrNullMX):
		r.Status, r.Reason = StatusInvalid, ReasonNullMX
		r.Reply = Reply{Code: 556, Enhanced: [3]int{5, 1, 10}, Text: "domain does not accept mail (null MX, RFC 7505)"}
	case errors.Is(err, ErrNoMailHost):
		r.Status, r.Reason = StatusInvalid, ReasonNoMailHost
	default:
		r.Status, r.Reason = StatusUnknown, v.failureReason(ctx, ReasonDNSError)
	}
	return r
}

// failureReason names a failure without a reply: the Verifier closing, the
// time running out, or the given reason.
func (v *Verifier) failureReason(ctx context.Context, otherwise Reason) Reason {
	switch {
	case v.ctx.Err() != nil:
		return ReasonShutdown
	case ctx.Err() != nil:
		return ReasonTimeout
	}
	return otherwise
}

// probeHost verifies calls on one MX host. It finishes the calls that got
// a final answer and returns those worth trying on the next host (a 4xx
// or a connection failure), each with its tentative result set.
func (w *worker) probeHost(ctx context.Context, h Host, ips []netip.Addr, calls []*call) []*call {
	v := w.v
	if w.sess != nil && w.sess.host.Name != h.Name {
		w.closeSession()
	}
	reused := w.sess != nil
	if w.sess == nil {
		if !v.conns.take("d:"+w.domain, v.cfg.PerDomainRate) || !v.conns.take("h:"+h.Name, v.cfg.PerHostRate) {
			setAll(calls, Result{Status: StatusUnknown, Reason: ReasonRateLimited, Host: h.Name,
				Detail: fmt.Sprintf("connection cap reached for %s or %s (callout.per_domain_rate %d, per_host_rate %d a minute)",
					w.domain, h.Name, v.cfg.PerDomainRate, v.cfg.PerHostRate)})
			return nil
		}
		if err := v.hosts.acquire(ctx, h.Name); err != nil {
			setAll(calls, Result{Status: StatusUnknown, Reason: v.failureReason(ctx, ReasonTimeout), Host: h.Name,
				Detail: "waiting for a free connection slot to " + h.Name})
			return calls
		}
		s, err := w.dial(ctx, h, ips)
		if err != nil {
			v.hosts.release(h.Name)
			setAll(calls, v.sessionFailure(ctx, h, err))
			return calls
		}
		w.sess = s
	}
	s := w.sess
	stop := s.bound(ctx)
	defer stop()
	single := matchDomain(v.cfg.SingleRcptMX, h.Name)
	if single && s.rcpts > 0 {
		// This host takes one RCPT per session: start a fresh one.
		w.closeSession()
		return w.probeHost(ctx, h, ips, calls)
	}

	needUTF8 := false
	todo := calls[:0:0]
	for _, c := range calls {
		if c.addr.UTF8 && !s.utf8 {
			v.finish(c, Result{Status: StatusUnknown, Reason: ReasonNoSMTPUTF8, Host: h.Name,
				Detail: "the local part needs SMTPUTF8, which " + h.Name + " does not offer"})
			continue
		}
		needUTF8 = needUTF8 || c.addr.UTF8
		todo = append(todo, c)
	}
	if len(todo) == 0 {
		return nil
	}
	if err := s.mail(v.cfg.MailFrom, needUTF8); err != nil {
		var se *stageError
		errors.As(err, &se)
		if reused && se != nil && (se.reply.IsZero() || se.reply.Code == 421) && ctx.Err() == nil {
			// The server closed the idle session meanwhile (or is
			// closing it with 421): start anew.
			w.closeSession()
			return w.probeHost(ctx, h, ips, todo)
		}
		res := v.sessionFailure(ctx, h, err)
		if se != nil && !se.reply.IsZero() {
			res.Status, res.Reason = Classify(StageMail, se.reply)
			if se.reply.Code/100 == 5 {
				// A permanent refusal of the probe itself: leave this
				// host alone for a while and do not try the others with
				// the same sender.
				v.store(keyRefusal+h.Name, Result{Status: StatusUnknown, Reason: ReasonRefusesProbes, Host: h.Name,
					Reply: se.reply, Detail: "MX refused our MAIL FROM recently; not probed until that is forgotten"}, v.cfg.RefusalTTL)
				w.closeSession()
				for _, c := range todo {
					v.finish(c, res)
				}
				return nil
			}
		}
		w.closeSession()
		setAll(todo, res)
		return todo
	}

	var retry, accepted []*call
	for i, c := range todo {
		if single && i > 0 {
			// One recipient per session on this host: the rest go through
			// a new session each.
			w.finishAccepted(accepted, h, false)
			accepted = nil
			w.closeSession()
			rest := w.probeHost(ctx, h, ips, todo[i:])
			return append(retry, rest...)
		}
		r, err := s.rcpt(c.addr.String())
		if err != nil {
			res := v.sessionFailure(ctx, h, err)
			setAll(todo[i:], res)
			w.closeSession()
			w.finishAccepted(accepted, h, false)
			return append(retry, todo[i:]...)
		}
		st, reason := Classify(StageRcpt, r)
		res := Result{Status: st, Reason: reason, Host: h.Name, Reply: r}
		switch {
		case r.Code/100 == 4:
			c.res = res
			retry = append(retry, c)
			if r.Code == 421 {
				// The server is closing the connection.
				setAll(todo[i+1:], res)
				w.closeSession()
				w.finishAccepted(accepted, h, false)
				return append(retry, todo[i+1:]...)
			}
		case st == StatusValid:
			c.res = res
			accepted = append(accepted, c)
		default:
			v.finish(c, res)
		}
	}
	w.finishAccepted(accepted, h, !single)
	if single {
		w.closeSession()
	} else if err := s.reset(); err != nil {
		w.closeSession()
	}
	return retry
}

// finishAccepted finishes the calls whose recipient was accepted, first
// finding out, when allowed and not yet known, whether the domain accepts
// any local part at all (a catch-all), in which case acceptance says
// nothing and the verdict is unknown.
func (w *worker) finishAccepted(accepted []*call, h Host, mayProbe bool) {
	v := w.v
	if len(accepted) == 0 {
		return
	}
	catchAll := false
	if known, ok := v.lookup(keyCatchAll + w.domain); ok {
		catchAll = known.Status != StatusValid
	} else if mayProbe && v.cfg.CatchAllProbe && w.sess != nil && h.Name == w.primary {
		// Only the most preferred MX speaks for the domain: a backup MX
		// often relays whatever it gets, and that says nothing about the
		// domain's mailboxes.
		probe := randomLocal() + "@" + w.domain
		r, err := w.sess.rcpt(probe)
		if err != nil {
			w.closeSession()
		} else {
			switch st, _ := Classify(StageRcpt, r); st {
			case StatusValid:
				catchAll = true
				v.store(keyCatchAll+w.domain, Result{Status: StatusUnknown, Reason: ReasonCatchAll, Host: h.Name, Reply: r,
					Detail: "domain accepted the random local part " + probe}, v.cfg.CatchAllTTL)
			case StatusInvalid:
				v.store(keyCatchAll+w.domain, Result{Status: StatusValid, Host: h.Name, Reply: r}, v.cfg.CatchAllTTL)
			}
		}
	}
	for _, c := range accepted {
		res := c.res
		if catchAll {
			res.Status, res.Reason = StatusUnknown, ReasonCatchAll
			res.Detail = "domain accepts every local part"
		}
		v.finish(c, res)
	}
}

// dial opens a session to one of ips, in order, splitting the time left
// between them so a dead first address does not eat the whole budget.
func (w *worker) dial(ctx context.Context, h Host, ips []netip.Addr) (*session, error) {
	var errs []error
	for i, ip := range ips {
		left := time.Until(deadlineOf(ctx))
		if left <= 0 {
			break
		}
		dctx, cancel := context.WithTimeout(ctx, left/time.Duration(min(len(ips)-i, 3)))
		s, err := w.v.dialSession(dctx, h, ip, left)
		cancel()
		if err == nil {
			return s, nil
		}
		errs = append(errs, err)
		var se *stageError
		if errors.As(err, &se) && !se.reply.IsZero() {
			break // the host answered: its other addresses would say the same
		}
	}
	if len(errs) == 0 {
		return nil, &stageError{stage: StageConnect, err: context.DeadlineExceeded}
	}
	return nil, errs[len(errs)-1]
}

func deadlineOf(ctx context.Context) time.Time {
	d, ok := ctx.Deadline()
	if !ok {
		return time.Now().Add(time.Hour)
	}
	return d
}

// sessionFailure turns a failure to talk to h into a verdict.
func (v *Verifier) sessionFailure(ctx context.Context, h Host, err error) Result {
	res := Result{Status: StatusUnknown, Host: h.Name, Detail: err.Error()}
	var se *stageError
	if errors.As(err, &se) && !se.reply.IsZero() {
		res.Reply = se.reply
		res.Status, res.Reason = Classify(se.stage, se.reply)
		return res
	}
	res.Reason = v.failureReason(ctx, ReasonUnreachable)
	var ne net.Error
	if res.Reason == ReasonUnreachable && errors.As(err, &ne) && ne.Timeout() {
		res.Reason = ReasonTimeout
	}
	return res
}

// randomLocal makes a local part no real mailbox has.
func randomLocal() string {
	const letters = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 20)
	for i := range b {
		b[i] = letters[rand.IntN(len(letters))]
	}
	return string(b)
}

// matchDomain reports whether name matches one of the patterns: an exact
// name, or "*.suffix" for any name below suffix.
func matchDomain(patterns []string, name string) bool {
	for _, p := range patterns {
		if suffix, ok := strings.CutPrefix(p, "*."); ok {
			if strings.HasSuffix(name, "."+suffix) {
				return true
			}
		} else if p == name {
			return true
		}
	}
	return false
}

// safeIPs keeps the addresses the verifier may connect to: public ones
// that are not this host's own.
func (v *Verifier) safeIPs(ips []netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, ip := range ips {
		if SafeAddr(ip) && !v.local[ip.Unmap()] {
			out = append(out, ip)
		}
	}
	return out
}

// interfaceAddrs returns the addresses of this host's network interfaces.
func interfaceAddrs() []netip.Addr {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil
	}
	var out []netip.Addr
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			out = append(out, p.Addr())
		}
	}
	return out
}

func addrSet(addrs []netip.Addr) map[netip.Addr]bool {
	m := make(map[netip.Addr]bool, len(addrs))
	for _, a := range addrs {
		m[a.Unmap()] = true
	}
	return m
}

// rateWindows counts events per key in fixed one-minute windows.
type rateWindows struct {
	now    func() time.Time
	mu     sync.Mutex
	minute int64          // the window the counts are for
	m      map[string]int // events per key in this window
}

// take counts one event for key and reports whether it stays within max
// this minute. A new minute starts every count afresh.
func (r *rateWindows) take(key string, max int) bool {
	minute := r.now().Unix() / 60
	r.mu.Lock()
	defer r.mu.Unlock()
	if minute != r.minute {
		clear(r.m)
		r.minute = minute
	}
	if r.m[key] >= max {
		return false
	}
	r.m[key]++
	return true
}

func joinIPs(ips []netip.Addr) string {
	s := make([]string, len(ips))
	for i, ip := range ips {
		s[i] = ip.String()
	}
	return strings.Join(s, ", ")
}

// boundText cuts s to at most n bytes for logs and results.
func boundText(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

// hostSlots bounds concurrent sessions per MX host name.
type hostSlots struct {
	limit int
	mu    sync.Mutex
	used  map[string]*hostSlot
}

type hostSlot struct {
	n       int
	waiters []chan struct{}
	want    chan struct{} // closed when someone has to wait for a slot
}

// closedChan is always ready.
var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// wanted returns a channel that is closed once somebody waits for a slot
// to host, so that a holder idling on its slot can give it up.
func (hs *hostSlots) wanted(host string) <-chan struct{} {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	s := hs.used[host]
	switch {
	case s == nil:
		return nil
	case len(s.waiters) > 0:
		return closedChan
	case s.want == nil:
		s.want = make(chan struct{})
	}
	return s.want
}

// acquire takes a slot for host, waiting for one until ctx ends.
func (hs *hostSlots) acquire(ctx context.Context, host string) error {
	hs.mu.Lock()
	s := hs.used[host]
	if s == nil {
		s = &hostSlot{}
		hs.used[host] = s
	}
	if s.n < hs.limit {
		s.n++
		hs.mu.Unlock()
		return nil
	}
	ch := make(chan struct{})
	s.waiters = append(s.waiters, ch)
	if s.want != nil {
		close(s.want) // wake the holders idling on their slots
		s.want = nil
	}
	hs.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		hs.mu.Lock()
		defer hs.mu.Unlock()
		for i, w := range s.waiters {
			if w == ch {
				s.waiters = append(s.waiters[:i], s.waiters[i+1:]...)
				return ctx.Err()
			}
		}
		// The slot was handed over just as ctx ended: pass it on.
		hs.releaseLocked(host)
		return ctx.Err()
	}
}

// release gives back a slot taken by acquire.
func (hs *hostSlots) release(host string) {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	hs.releaseLocked(host)
}

func (hs *hostSlots) releaseLocked(host string) {
	s := hs.used[host]
	if s == nil {
		return
	}
	if len(s.waiters) > 0 {
		close(s.waiters[0])
		s.waiters = s.waiters[1:]
		return
	}
	s.n--
	if s.n <= 0 {
		delete(hs.used, host)
	}
}

// transcript writes the SMTP dialogue of probes, one line per command or
// reply, prefixed with the MX host name.
type transcript struct {
	v    *Verifier
	host string
}

func (v *Verifier) transcript(host string) *transcript {
	if v.cfg.Transcript == nil {
		return nil
	}
	return &transcript{v: v, host: host}
}

func (t *transcript) line(dir, s string) {
	if t == nil {
		return
	}
	t.v.trMu.Lock()
	defer t.v.trMu.Unlock()
	for _, l := range strings.Split(strings.TrimRight(s, "\r\n"), "\n") {
		fmt.Fprintf(t.v.cfg.Transcript, "%s %s %s\n", t.host, dir, strings.TrimRight(l, "\r"))
	}
}

func (t *transcript) read(code int, msg string) {
	if code != 0 {
		t.line("<-", fmt.Sprintf("%d %s", code, msg))
	}
}
func (t *transcript) write(s string) { t.line("->", s) }
func (t *transcript) note(s string)  { t.line("--", s) }

// Write takes go-smtp's debug stream, both directions mixed.
func (t *transcript) Write(b []byte) (int, error) {
	t.line("::", string(b))
	return len(b), nil
}
