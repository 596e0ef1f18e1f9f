package callout

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// Host is one mail exchanger of a domain with the addresses to connect to.
type Host struct {
	Name     string       // host name, lower case, without trailing dot
	Pref     uint16       // MX preference; 0 for an implicit MX
	IPs      []netip.Addr // IPv4 then IPv6 addresses, each in DNS order; empty when the lookup failed or found none
	Implicit bool         // the domain has no MX: its own A/AAAA are used (RFC 5321 §5.1)
}

// MXResolver is what the verifier needs from DNS. *Resolver implements it;
// tests may substitute their own.
type MXResolver interface {
	// LookupMX returns the mail exchangers of domain in the order to try
	// them, or an error wrapping ErrNXDomain, ErrNullMX, ErrNoMailHost or
	// ErrDNS.
	LookupMX(ctx context.Context, domain string) ([]Host, error)
}

// Errors of LookupMX and LookupIP. The first three are permanent: the domain
// cannot receive mail. ErrDNS is temporary. Returned errors wrap one of them
// and name the domain or host.
var (
	ErrNXDomain   = errors.New("callout: domain does not exist")               // permanent: NXDOMAIN
	ErrNullMX     = errors.New("callout: domain accepts no mail (null MX)")    // permanent: RFC 7505
	ErrNoMailHost = errors.New("callout: domain has no MX, A or AAAA records") // permanent: nothing to deliver to
	ErrDNS        = errors.New("callout: DNS lookup failed")                   // temporary: SERVFAIL, REFUSED, timeout, malformed answer, CNAME loop
)

// ResolverConfig configures a Resolver. The zero value is usable: every
// field has a default.
type ResolverConfig struct {
	// Servers are the recursive resolvers to ask, as "host:port" (a bare
	// IP address means port 53), tried in order. Empty: the nameservers
	// of /etc/resolv.conf.
	Servers []string

	// Timeout bounds one query attempt to one server, and the retry over
	// TCP after a truncated answer; default 2s. The caller's context
	// bounds the whole lookup.
	Timeout time.Duration

	// Attempts is the number of tries per server; default 2. Each round
	// tries every server once, in order.
	Attempts int

	// MaxCacheEntries bounds the answer cache; default 10000. A negative
	// value disables the cache.
	MaxCacheEntries int

	// MinTTL and MaxTTL clamp how long answers are cached; defaults 5s and
	// 1h.
	MinTTL, MaxTTL time.Duration

	// Now is the clock of the cache; default time.Now.
	Now func() time.Time
}

// Resolver looks up mail exchangers and addresses with github.com/miekg/dns
// and caches the answers. It is safe for concurrent use.
type Resolver struct {
	servers  []string
	timeout  time.Duration
	attempts int
	minTTL   time.Duration
	maxTTL   time.Duration
	now      func() time.Time
	udp, tcp *dns.Client

	// answers caches DNS answers (nil: no cache). Not ristretto: see
	// ttlMap.
	answers *ttlMap[mxCacheKey, mxAnswer]
}

const (
	mxDefaultTimeout    = 2 * time.Second
	mxDefaultAttempts   = 2
	mxDefaultMaxEntries = 10000
	mxDefaultMinTTL     = 5 * time.Second
	mxDefaultMaxTTL     = time.Hour
	mxNoSOATTL          = 60 * time.Second // negative answers without an SOA
	mxUDPSize           = 1232             // EDNS0 buffer size, the DNS flag day 2020 value
	mxMaxCNAMEs         = 8                // CNAMEs followed in one lookup
	mxParallel          = 4                // MX host address lookups at a time
	mxResolvConf        = "/etc/resolv.conf"
)

// NewResolver returns a Resolver for cfg, with defaults filled in. It fails
// when a setting is out of range or, without Servers, when
// /etc/resolv.conf cannot be read or names no nameserver.
func NewResolver(cfg ResolverConfig) (*Resolver, error) {
	r := &Resolver{
		timeout:  cmp.Or(cfg.Timeout, mxDefaultTimeout),
		attempts: cmp.Or(cfg.Attempts, mxDefaultAttempts),
		minTTL:   cmp.Or(cfg.MinTTL, mxDefaultMinTTL),
		maxTTL:   cmp.Or(cfg.MaxTTL, mxDefaultMaxTTL),
		now:      cfg.Now,
	}
	switch {
	case r.timeout < 0:
		return nil, fmt.Errorf("callout: resolver timeout %v is negative", cfg.Timeout)
	case r.attempts < 0:
		return nil, fmt.Errorf("callout: resolver attempts %d is negative", cfg.Attempts)
	case r.minTTL < 0 || r.maxTTL < 0:
		return nil, fmt.Errorf("callout: resolver cache TTLs %v and %v must not be negative", cfg.MinTTL, cfg.MaxTTL)
	case r.minTTL > r.maxTTL:
		return nil, fmt.Errorf("callout: resolver minimum TTL %v is above the maximum TTL %v", r.minTTL, r.maxTTL)
	}
	if r.now == nil {
		r.now = time.Now
	}
	r.answers = newTTLMap[mxCacheKey, mxAnswer](cmp.Or(cfg.MaxCacheEntries, mxDefaultMaxEntries))

	if len(cfg.Servers) == 0 {
		cc, err := dns.ClientConfigFromFile(mxResolvConf)
		if err != nil {
			return nil, fmt.Errorf("callout: no DNS servers configured and none from %s: %w", mxResolvConf, err)
		}
		for _, s := range cc.Servers {
			r.servers = append(r.servers, net.JoinHostPort(s, cc.Port))
		}
		if len(r.servers) == 0 {
			return nil, fmt.Errorf("callout: no DNS servers configured and no nameserver in %s", mxResolvConf)
		}
	}
	for _, s := range cfg.Servers {
		addr, err := mxServerAddr(s)
		if err != nil {
			return nil, err
		}
		r.servers = append(r.servers, addr)
	}

	r.udp = &dns.Client{Net: "udp", Timeout: r.timeout, UDPSize: mxUDPSize}
	r.tcp = &dns.Client{Net: "tcp", Timeout: r.timeout}
	return r, nil
}

// mxServerAddr checks a configured DNS server address and adds port 53 to a
// bare IP address.
func mxServerAddr(s string) (string, error) {
	if ip, err := netip.ParseAddr(s); err == nil {
		return net.JoinHostPort(ip.String(), "53"), nil
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return "", fmt.Errorf("callout: DNS server %q: want host:port: %w", s, err)
	}
	if n, err := strconv.ParseUint(port, 10, 16); host == "" || err != nil || n == 0 {
		return "", fmt.Errorf("callout: DNS server %q: want host:port with a port from 1 to 65535", s)
	}
	return s, nil
}

// LookupMX returns the mail exchangers of domain, an A-label domain name,
// in the order to try them: by preference, in random order among equal
// preferences (new for every call), without duplicate names. Each Host
// comes with its addresses; a host whose addresses could not be found is
// kept with no IPs. The slices are the caller's.
//
// A domain without MX records but with addresses of its own gets one
// implicit Host (RFC 5321 §5.1). Errors wrap ErrNXDomain when the domain
// does not exist, ErrNullMX for a null MX (RFC 7505), ErrNoMailHost when it
// has neither MX nor addresses, and ErrDNS when DNS failed, also when no MX
// host's addresses could be looked up. When ctx ends, the error wraps both
// ErrDNS and ctx.Err().
func (r *Resolver) LookupMX(ctx context.Context, domain string) ([]Host, error) {
	name, err := mxName(domain)
	if err != nil {
		return nil, err
	}
	ans, err := r.resolve(ctx, name, dns.TypeMX)
	if err != nil {
		return nil, err
	}
	if ans.nx {
		return nil, fmt.Errorf("%w: %s", ErrNXDomain, name)
	}

	hosts := make([]Host, 0, len(ans.mx))
	null := false
	for _, mx := range ans.mx {
		if mx.host == "" {
			null = true // ignored next to real MX records
			continue
		}
		hosts = append(hosts, Host{Name: mx.host, Pref: mx.pref})
	}
	if len(hosts) == 0 {
		if null {
			return nil, fmt.Errorf("%w: %s", ErrNullMX, name)
		}
		return r.implicitMX(ctx, name)
	}

	rand.Shuffle(len(hosts), func(i, j int) { hosts[i], hosts[j] = hosts[j], hosts[i] })
	slices.SortStableFunc(hosts, func(a, b Host) int { return cmp.Compare(a.Pref, b.Pref) })
	uniq := hosts[:0]
	for _, h := range hosts {
		if !slices.ContainsFunc(uniq, func(u Host) bool { return u.Name == h.Name }) {
			uniq = append(uniq, h)
		}
	}
	hosts = uniq

	if err := r.hostIPs(ctx, hosts); err != nil {
		return nil, fmt.Errorf("MX hosts of %s: %w", name, err)
	}
	return hosts, nil
}

// implicitMX is LookupMX for a domain that exists but has no MX records.
func (r *Resolver) implicitMX(ctx context.Context, name string) ([]Host, error) {
	ips, err := r.lookupIP(ctx, name)
	if err != nil {
		return nil, err
	}
	if len(ips) == 0 {
		return nil, fmt.Errorf("%w: %s", ErrNoMailHost, name)
	}
	return []Host{{Name: name, IPs: ips, Implicit: true}}, nil
}

// hostIPs fills in the addresses of hosts, looking up a few at a time
// those not in the cache. It fails only when every lookup failed with
// ErrDNS, returning the first error.
func (r *Resolver) hostIPs(ctx context.Context, hosts []Host) error {
	now := r.now()
	var pending []int
	for i := range hosts {
		if ips, ok, _ := r.cachedIPs(hosts[i].Name, now); ok {
			hosts[i].IPs = ips // failures are never cached: this is no ErrDNS
			continue
		}
		pending = append(pending, i)
	}
	if len(pending) == 0 {
		return nil
	}
	errs := make([]error, len(pending))
	sem := make(chan struct{}, mxParallel)
	var wg sync.WaitGroup
	for j, i := range pending {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			hosts[i].IPs, errs[j] = r.LookupIP(ctx, hosts[i].Name) // checks names from DNS
		})
	}
	wg.Wait()
	if len(pending) < len(hosts) {
		return nil
	}
	for _, err := range errs {
		if !errors.Is(err, ErrDNS) {
			return nil
		}
	}
	return errs[0]
}

// LookupIP returns the IPv4 (A) then IPv6 (AAAA) addresses of host, each
// family in DNS order, following CNAMEs. The slice is the caller's. When one
// family's lookup fails, the other family's addresses are returned without
// error. With no address found, the error wraps ErrNXDomain when host does
// not exist and ErrDNS when a lookup failed; a host that exists without
// addresses gives an empty slice and no error.
func (r *Resolver) LookupIP(ctx context.Context, host string) ([]netip.Addr, error) {
	name, err := mxName(host)
	if err != nil {
		return nil, err
	}
	return r.lookupIP(ctx, name)
}

// lookupIP is LookupIP for a canonical name.
func (r *Resolver) lookupIP(ctx context.Context, name string) ([]netip.Addr, error) {
	now := r.now()
	if ips, ok, err := r.cachedIPs(name, now); ok {
		return ips, err
	}
	var v4, v6 mxAnswer
	var err4, err6 error
	var wg sync.WaitGroup
	wg.Go(func() { v6, err6 = r.resolve(ctx, name, dns.TypeAAAA) })
	v4, err4 = r.resolve(ctx, name, dns.TypeA)
	wg.Wait()
	return mxMergeIPs(name, v4, err4, v6, err6)
}

// cachedIPs is lookupIP from the cache alone; ok is false unless both
// families are cached.
func (r *Resolver) cachedIPs(name string, now time.Time) (ips []netip.Addr, ok bool, err error) {
	v4, ok4 := r.cacheGet(name, dns.TypeA, now)
	if !ok4 {
		return nil, false, nil
	}
	v6, ok6 := r.cacheGet(name, dns.TypeAAAA, now)
	if !ok6 {
		return nil, false, nil
	}
	ips, err = mxMergeIPs(name, v4, nil, v6, nil)
	return ips, true, err
}

// mxMergeIPs combines the A and AAAA answers for name into a new slice.
func mxMergeIPs(name string, v4 mxAnswer, err4 error, v6 mxAnswer, err6 error) ([]netip.Addr, error) {
	if n := len(v4.ips) + len(v6.ips); n > 0 {
		ips := make([]netip.Addr, 0, n)
		ips = append(ips, v4.ips...)
		return append(ips, v6.ips...), nil
	}
	switch {
	case err4 != nil:
		return nil, err4
	case err6 != nil:
		return nil, err6
	case v4.nx || v6.nx:
		return nil, fmt.Errorf("%w: %s", ErrNXDomain, name)
	}
	return []netip.Addr{}, nil
}

// mxName checks and canonicalises a domain name given by a caller. A name
// that cannot exist in the DNS is reported as ErrNXDomain.
func mxName(domain string) (string, error) {
	name := mxCanon(domain)
	if _, ok := dns.IsDomainName(name); !ok || name == "" || strings.HasPrefix(name, ".") {
		return "", fmt.Errorf("%w: %q is not a valid domain name", ErrNXDomain, domain)
	}
	return name, nil
}

// mxCanon returns the canonical form of a domain name, the form of Host
// names, cache keys and error messages: lower case, without trailing dot.
// The root "." becomes "".
func mxCanon(name string) string { return strings.ToLower(strings.TrimSuffix(name, ".")) }

// mxOwns reports whether rr belongs to the canonical name.
func mxOwns(rr dns.RR, name string) bool {
	h := rr.Header()
	return h.Class == dns.ClassINET && strings.EqualFold(strings.TrimSuffix(h.Name, "."), name)
}

// mxRecord is one MX record; host is canonical without trailing dot, ""
// for the null MX ".".
type mxRecord struct {
	pref uint16
	host string
}

// mxAnswer is the outcome of a lookup of one name and type, after CNAMEs.
// It is cached and shared: its slices must not be modified.
type mxAnswer struct {
	nx  bool         // NXDOMAIN
	mx  []mxRecord   // MX lookups
	ips []netip.Addr // A and AAAA lookups
}

// resolve answers (name, qtype) from the cache or else from DNS, caching
// the answer. name is canonical.
func (r *Resolver) resolve(ctx context.Context, name string, qtype uint16) (mxAnswer, error) {
	if ans, ok := r.cacheGet(name, qtype, r.now()); ok {
		return ans, nil
	}
	ans, ttl, err := r.resolveDNS(ctx, name, qtype)
	if err != nil {
		return mxAnswer{}, err
	}
	r.cachePut(name, qtype, ans, ttl)
	return ans, nil
}

// resolveDNS asks DNS for (name, qtype), following CNAMEs through answer
// sections and, where a chain ends without records, by asking for its
// target. It returns the answer and how long it may be cached.
func (r *Resolver) resolveDNS(ctx context.Context, name string, qtype uint16) (mxAnswer, time.Duration, error) {
	ttl := r.maxTTL
	seen := map[string]bool{name: true}
	cnames := 0
	for qname := name; ; {
		msg, err := r.exchange(ctx, qname, qtype)
		if err != nil {
			return mxAnswer{}, 0, err
		}

		owner := qname
		for {
			target, cttl, ok := mxCNAME(msg.Answer, owner)
			if !ok {
				break
			}
			cnames++
			switch {
			case seen[target]:
				return mxAnswer{}, 0, fmt.Errorf("%w: %s %s: CNAME loop at %s", ErrDNS, dns.TypeToString[qtype], name, target)
			case cnames > mxMaxCNAMEs:
				return mxAnswer{}, 0, fmt.Errorf("%w: %s %s: more than %d CNAMEs", ErrDNS, dns.TypeToString[qtype], name, mxMaxCNAMEs)
			}
			seen[target] = true
			ttl = min(ttl, cttl)
			owner = target
		}

		var ans mxAnswer
		for _, rr := range msg.Answer {
			h := rr.Header()
			if h.Rrtype != qtype || !mxOwns(rr, owner) {
				continue
			}
			switch rr := rr.(type) {
			case *dns.MX:
				ans.mx = append(ans.mx, mxRecord{pref: rr.Preference, host: mxCanon(rr.Mx)})
			case *dns.A:
				if ip, ok := netip.AddrFromSlice(rr.A.To4()); ok {
					ans.ips = append(ans.ips, ip)
				}
			case *dns.AAAA:
				if ip, ok := netip.AddrFromSlice(rr.AAAA.To16()); ok {
					ans.ips = append(ans.ips, ip)
				}
			default:
				continue
			}
			ttl = min(ttl, time.Duration(h.Ttl)*time.Second)
		}
		switch {
		case len(ans.mx) > 0 || len(ans.ips) > 0:
			return ans, r.clampTTL(ttl), nil
		case msg.Rcode == dns.RcodeNameError:
			ans.nx = true
			return ans, r.clampTTL(min(ttl, mxNegativeTTL(msg))), nil
		case owner != qname:
			qname = owner // the chain ends on a name without records here: ask for it
			continue
		}
		return ans, r.clampTTL(min(ttl, mxNegativeTTL(msg))), nil // NODATA
	}
}

// mxCNAME finds the CNAME of owner in rrs.
func mxCNAME(rrs []dns.RR, owner string) (target string, ttl time.Duration, ok bool) {
	for _, rr := range rrs {
		if c, isCNAME := rr.(*dns.CNAME); isCNAME && mxOwns(rr, owner) {
			return mxCanon(c.Target), time.Duration(c.Hdr.Ttl) * time.Second, true
		}
	}
	return "", 0, false
}

// mxNegativeTTL is how long a negative answer may be cached (RFC 2308 §5):
// the smaller of the SOA's TTL and its minimum field.
func mxNegativeTTL(msg *dns.Msg) time.Duration {
	for _, rr := range msg.Ns {
		if soa, ok := rr.(*dns.SOA); ok {
			return time.Duration(min(soa.Hdr.Ttl, soa.Minttl)) * time.Second
		}
	}
	return mxNoSOATTL
}

func (r *Resolver) clampTTL(ttl time.Duration) time.Duration {
	return max(r.minTTL, min(ttl, r.maxTTL))
}

// exchange sends one query for (name, qtype) to the servers until one
// answers NOERROR or NXDOMAIN: every server in order, r.attempts rounds.
// Other answers, network errors and timeouts move on to the next try. A
// truncated UDP answer is asked again over TCP.
func (r *Resolver) exchange(ctx context.Context, name string, qtype uint16) (*dns.Msg, error) {
	m := new(dns.Msg)
	m.SetQuestion(name+".", qtype)
	m.SetEdns0(mxUDPSize, false)

	var lastErr error
	lastServer := r.servers[0]
tries:
	for range r.attempts {
		for _, server := range r.servers {
			if err := ctx.Err(); err != nil {
				lastErr = err
				break tries
			}
			m.Id = dns.Id()
			resp, err := r.exchangeOnce(ctx, m, server)
			if err == nil {
				return resp, nil
			}
			lastErr, lastServer = err, server
		}
	}
	if lastErr == nil { // Attempts is 0
		lastErr = errors.New("no attempt made")
	}
	return nil, fmt.Errorf("%w: %s %s via %s: %w", ErrDNS, dns.TypeToString[qtype], name, lastServer, lastErr)
}

// exchangeOnce is one try of exchange with one server.
func (r *Resolver) exchangeOnce(ctx context.Context, m *dns.Msg, server string) (*dns.Msg, error) {
	resp, err := r.exchangeNet(ctx, r.udp, m, server)
	if err == nil && resp.Truncated {
		resp, err = r.exchangeNet(ctx, r.tcp, m, server)
		if err != nil {
			err = fmt.Errorf("over TCP after a truncated answer: %w", err)
		}
	}
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err() // the caller's deadline or cancellation, not the server's fault
		}
		return nil, err
	}
	q := m.Question[0]
	if len(resp.Question) != 1 || resp.Question[0].Qtype != q.Qtype || !strings.EqualFold(resp.Question[0].Name, q.Name) {
		return nil, errors.New("answer to another question")
	}
	if resp.Rcode != dns.RcodeSuccess && resp.Rcode != dns.RcodeNameError {
		return nil, fmt.Errorf("server answered %s", dns.RcodeToString[resp.Rcode])
	}
	return resp, nil
}

// exchangeNet sends m to server with client and reads the answer, within
// r.timeout and the life of ctx. Unlike dns.Client.ExchangeContext, which
// only takes the context's deadline, it also stops when ctx is cancelled.
func (r *Resolver) exchangeNet(ctx context.Context, client *dns.Client, m *dns.Msg, server string) (*dns.Msg, error) {
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	conn, err := client.DialContext(ctx, server)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	resp, _, err := client.ExchangeWithConnContext(ctx, m, conn)
	return resp, err
}

// mxCacheKey identifies a cached answer; name is canonical.
type mxCacheKey struct {
	name  string
	qtype uint16
}

// cacheGet returns the cached answer for (name, qtype) if it has not
// expired at now.
func (r *Resolver) cacheGet(name string, qtype uint16, now time.Time) (mxAnswer, bool) {
	return r.answers.get(mxCacheKey{name, qtype}, now)
}

// cachePut caches ans for ttl (see ttlMap for what goes when it is full).
func (r *Resolver) cachePut(name string, qtype uint16, ans mxAnswer, ttl time.Duration) {
	now := r.now()
	r.answers.put(mxCacheKey{name, qtype}, ans, now.Add(ttl), now)
}
