package callout

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/ristretto/v2"

	"github.com/rcptguard/rcptguard/callout/textfmt"
)

// ReasonAddressLiteral is the reason for recipients at an address literal
// (user@[192.0.2.1]): there is no domain to look up, and probing arbitrary
// IP addresses on a sender's behalf is not something rcptguard does.
const ReasonAddressLiteral Reason = "address-literal"

// ReasonRateLimited is the reason when a cap on what is sent to the
// recipient's domain or MX address was reached: nothing was sent.
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
	// recipient is accepted by an MX host whose answer to random names is
	// not known, at most once per domain and host per CatchAllTTL: an
	// acceptance is valid only from a host shown to refuse random names.
	// Off, acceptances are valid as they come.
	CatchAllProbe bool
	// PerHost bounds concurrent connections to one MX address, and
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
	// PerDomainRate and PerHostRate cap the new SMTP connections in any
	// minute to one recipient domain and to one MX address (IP, whatever
	// the names pointing at it; defaults 30 and 300). PerDomainRcptRate
	// and PerHostRcptRate cap the RCPT commands in any minute for one
	// recipient domain and to one MX address (defaults 120 and 600), and
	// SessionRate the new sessions in any minute in all (default 600): a
	// recipient list aimed at one domain or one provider must not turn
	// rcptguard into a flood. Past a cap a verification is unknown, reason
	// "rate-limited", and nothing is sent for it.
	PerDomainRate, PerHostRate         int
	PerDomainRcptRate, PerHostRcptRate int
	SessionRate                        int
	// SessionIdle is how long a session stays open, after its last
	// recipient, for more recipients of the same domain (Postfix's
	// smtp_connection_cache_time_limit is 2s, [DefaultSessionIdle]). Zero
	// or negative: no waiting, the session ends with its last recipient,
	// as callout.session_idle = "0s" in the configuration file.
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
	// Shared is a verdict cache shared with other servers, asked after
	// the in-process one; nil: none.
	Shared SharedCache
	// SharedFacts and SharedCaps share the catch-all and refusing-host
	// facts and the probe caps with other servers; nil: this server's own.
	SharedFacts SharedFacts
	SharedCaps  SharedCaps
	// SharedTimeout bounds each call of the three (default 200ms).
	SharedTimeout time.Duration
}

// DefaultSessionIdle is the usual Config.SessionIdle, Postfix's
// smtp_connection_cache_time_limit.
const DefaultSessionIdle = 2 * time.Second

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
	facts *facts       // catch-all, refusing hosts, dead domains: kept, never dropped by admission
	hosts hostSlots    // concurrent connections per MX address
	win   *keyedWindow // sessions, connections and RCPTs in the last minute, per cap key
	local map[netip.Addr]bool
	stats struct{ sessions, rateLimited, probes atomic.Uint64 }

	capMu     sync.Mutex // rate-limits the "cap reached" log line
	capLogged time.Time
	capHits   int

	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	closed   bool
	inflight map[string]*call
	domains  map[string]*domainQueue

	trMu sync.Mutex
}

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
	setDefault(&cfg.PerDomainRate, 30)
	setDefault(&cfg.PerHostRate, 300)
	setDefault(&cfg.PerDomainRcptRate, 120)
	setDefault(&cfg.PerHostRcptRate, 600)
	setDefault(&cfg.SessionRate, 600)
	setDefault(&cfg.SharedTimeout, sharedTimeout)
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
	// The values themselves are checked where they are read, with the
	// key that set them (cmd/rcptguard's configuration); what is left
	// here are the invariants the protocol code relies on.
	if strings.ContainsAny(cfg.Helo+cfg.MailFrom, " \t\r\n\x00") {
		return nil, fmt.Errorf("callout: helo %q or mail_from %q contains white space or control characters", cfg.Helo, cfg.MailFrom)
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
		facts:    newFacts(maxFacts),
		hosts:    hostSlots{limit: cfg.PerHost, used: map[string]*hostSlot{}},
		win:      newWindow(time.Minute),
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
// "shutdown". It waits for the workers, which end every open session with
// QUIT (waiting 2s at most for the reply, all sessions at once), and
// releases the cache.
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
		return Result{Address: textfmt.Cut(fast, 320), Status: StatusInvalid, Reason: ReasonBadSyntax, Detail: err.Error()}
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
	if res, ok := v.sharedLookup(ctx, key); ok {
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
		if res, ok := v.fact(k + a.Domain); ok {
			res.Address = key
			return res, true
		}
	}
	return Result{}, false
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
		if safeAddr(ip) && !v.local[ip.Unmap()] {
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

func joinIPs(ips []netip.Addr) string {
	s := make([]string, len(ips))
	for i, ip := range ips {
		s[i] = ip.String()
	}
	return strings.Join(s, ", ")
}

// Stats are counts since New, for metrics.
type Stats struct {
	Sessions       uint64 // SMTP sessions opened to MX hosts
	RateLimited    uint64 // verdicts "unknown rate-limited": a cap held a probe back
	CatchAllProbes uint64 // RCPTs sent for a random local part
}

// Stats returns the counts so far.
func (v *Verifier) Stats() Stats {
	return Stats{
		Sessions:       v.stats.sessions.Load(),
		RateLimited:    v.stats.rateLimited.Load(),
		CatchAllProbes: v.stats.probes.Load(),
	}
}
