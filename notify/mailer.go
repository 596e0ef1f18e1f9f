package notify

import (
	"context"
	crand "crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// STARTTLS policies for Config.StartTLS.
const (
	StartTLSRequired      = "required"      // no TLS, no delivery
	StartTLSOpportunistic = "opportunistic" // TLS when the relay offers it
	StartTLSOff           = "off"           // never TLS
)

// Timeouts of one delivery attempt.
const (
	dialTimeout       = 30 * time.Second
	commandTimeout    = 30 * time.Second
	submissionTimeout = 2 * time.Minute
	attemptTimeout    = 5 * time.Minute
	// maxSleep bounds the sender's sleep, so that it looks at the spool
	// at least this often (files put there by hand, a clock that jumped).
	maxSleep = time.Hour
)

// Dialer opens network connections; *net.Dialer is one.
type Dialer interface {
	DialContext(ctx context.Context, network, addr string) (net.Conn, error)
}

// Config holds a Mailer's options. New fills the defaults.
type Config struct {
	// To are the abuse desk addresses ("abuse@example.com" or
	// "Abuse Desk <abuse@example.com>"). Empty: no report is sent, but a
	// user warning still is when WarnUser is set.
	To []string
	// From is the report's sender, in the same syntax; default
	// "rcptguard@localhost".
	From string
	// Relay is the SMTP relay, "host:port"; default "127.0.0.1:25".
	Relay string
	// Username, when set, makes the Mailer authenticate with SASL PLAIN,
	// or LOGIN when the relay does not offer PLAIN. The password is sent
	// only over TLS or to a relay on a loopback address, and it never
	// appears in logs or errors.
	Username, Password string
	// StartTLS is StartTLSRequired, StartTLSOpportunistic (the default)
	// or StartTLSOff.
	StartTLS string
	// TLSSkipVerify accepts any relay certificate. Unless it is set, the
	// certificate must be valid for the relay's host name or IP address.
	TLSSkipVerify bool
	// TLSConfig, when set, is the base of the TLS configuration (tests
	// put RootCAs there); ServerName defaults to the relay host.
	TLSConfig *tls.Config
	// Spool is the spool directory, created 0700 when missing. It may be
	// "" for a Mailer used only with SendNow.
	Spool string
	// MaxAge is how long a message is retried before it is given up,
	// with an error log; default 5 days.
	MaxAge time.Duration
	// WarnUser also sends each warning to the identity itself when it is
	// an email address (see Report.UserAddress) at one of UserDomains, at
	// most once per UserWarnPeriod.
	WarnUser bool
	// UserDomains are the domains whose users may get a warning
	// (detector.local_domains): mail only goes to the site's own users,
	// never to an arbitrary address a forged identity names. Compared
	// without ASCII case, a trailing dot ignored. Empty: no user warning.
	UserDomains []string
	// UserWarnPeriod is the least time between two warnings to the same
	// user; default 1 hour.
	UserWarnPeriod time.Duration
	// Hostname names this machine in EHLO and Message-IDs; default
	// os.Hostname().
	Hostname string
	// Logger receives the Mailer's logs; default: discarded.
	Logger *slog.Logger
	// Now is the clock; default time.Now.
	Now func() time.Time
	// Dialer connects to the relay; default a net.Dialer.
	Dialer Dialer
	// Backoff is the wait after the attempt-th failed attempt (1, 2, ...);
	// default 1 minute doubling to 1 hour, each ±20% at random.
	Backoff func(attempt int) time.Duration
	// SpoolRetry is how soon a report the spool refused (a full or
	// read-only disk) is written again; default 5 seconds. Meanwhile it
	// waits in memory (see [Mailer.Unspooled]).
	SpoolRetry time.Duration
}

// maxUnspooled bounds the reports waiting in memory for the spool. Past
// it Enqueue refuses new ones with an error; a lost block report is made
// again at the next start (see [Mailer.Unreported]).
const maxUnspooled = 10000

// ErrNoStartTLS is the error of an attempt in StartTLSRequired mode when
// the relay does not offer STARTTLS.
var ErrNoStartTLS = errors.New("notify: the relay does not offer STARTTLS (notify.starttls is \"required\")")

// ErrInsecureAuth is the error of an attempt that would send the password
// in clear text to a relay that is not on a loopback address.
var ErrInsecureAuth = errors.New("notify: refusing to send the relay password without TLS to a relay that is not on loopback")

// ErrNoSpool is returned by Enqueue and Run of a Mailer without a spool.
var ErrNoSpool = errors.New("notify: no spool directory configured")

// Mailer sends reports through an SMTP relay. Enqueue puts a report in
// the durable spool; Run, in a goroutine the caller owns, delivers what is
// in the spool. SendNow sends one report at once, without the spool. A
// Mailer is safe for concurrent use.
type Mailer struct {
	cfg     Config
	from    string   // envelope sender
	to      []string // envelope recipients
	host    string   // relay host, for TLS ServerName
	spool   *spool
	log     *slog.Logger
	wake    chan struct{}
	running atomic.Bool

	mu      sync.Mutex
	retryAt map[string]time.Time // floor for the next attempt, when a header update failed

	userDomains map[string]bool // Config.UserDomains, folded
	warnMu      sync.Mutex
	warned      map[string]time.Time // user address → when the last warning was queued
	warnedPrune int                  // prune warned when it grows past this

	// Messages composed but not in the spool yet. A goroutine of their
	// own writes them (writeMem), so Enqueue never waits for the disk.
	memMu    sync.Mutex
	mem      []memMsg
	writing  bool           // writeMem runs
	memErr   error          // the last failed spool write; nil after a good one
	memEmpty chan struct{}  // closed while mem is empty
	memBlock map[string]int // identities with a block report in mem, folded

	ledgerMu sync.Mutex
	ledger   *ledger
	sent     map[string]bool // spool files delivered whose removal failed
}

// memMsg is a message waiting in memory for the spool.
type memMsg struct {
	name  string
	hdr   spoolHeader
	msg   []byte
	at    time.Time
	block string // the ledger key when it is a block report
}

// minWarnedPrune is the size of the warned map below which it is never
// pruned.
const minWarnedPrune = 1024

// ParseAddress is the rule for the report's sender and recipients
// (Config.From, Config.To): an RFC 5322 address, ASCII, at most 254
// octets. It returns the bare address.
func ParseAddress(s string) (string, error) {
	a, err := parseAddress(s)
	if err != nil {
		return "", err
	}
	return a.Address, nil
}

// New checks cfg, fills its defaults and creates the spool directory.
func New(cfg Config) (*Mailer, error) {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf("notify: "+format, args...)) }

	if cfg.From == "" {
		cfg.From = "rcptguard@localhost"
	}
	if cfg.Relay == "" {
		cfg.Relay = "127.0.0.1:25"
	}
	if cfg.StartTLS == "" {
		cfg.StartTLS = StartTLSOpportunistic
	}
	if cfg.MaxAge <= 0 {
		cfg.MaxAge = 5 * 24 * time.Hour
	}
	if cfg.UserWarnPeriod <= 0 {
		cfg.UserWarnPeriod = time.Hour
	}
	if cfg.Hostname == "" {
		cfg.Hostname, _ = os.Hostname()
	}
	cfg.Hostname = sanitizeHostname(cfg.Hostname)
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Dialer == nil {
		cfg.Dialer = &net.Dialer{Timeout: dialTimeout}
	}
	if cfg.Backoff == nil {
		cfg.Backoff = DefaultBackoff
	}
	if cfg.SpoolRetry <= 0 {
		cfg.SpoolRetry = 5 * time.Second
	}

	m := &Mailer{log: cfg.Logger, wake: make(chan struct{}, 1), retryAt: make(map[string]time.Time),
		userDomains: make(map[string]bool), warned: make(map[string]time.Time), warnedPrune: minWarnedPrune,
		memEmpty: make(chan struct{}), memBlock: map[string]int{}, sent: map[string]bool{}}
	close(m.memEmpty)
	for i, d := range cfg.UserDomains {
		d = foldDomain(d)
		if d == "" || !isASCII(d) || strings.ContainsAny(d, "@ \t\r\n\x00") {
			bad("user_domains[%d]: %q is not a domain", i, cfg.UserDomains[i])
			continue
		}
		m.userDomains[d] = true
	}
	if a, err := parseAddress(cfg.From); err != nil {
		bad("from: %v", err)
	} else {
		m.from = a.Address
	}
	for i, t := range cfg.To {
		a, err := parseAddress(t)
		if err != nil {
			bad("to[%d]: %v", i, err)
			continue
		}
		m.to = append(m.to, a.Address)
	}
	host, _, err := net.SplitHostPort(cfg.Relay)
	if err != nil {
		bad("relay: %v", err)
	}
	m.host = host
	// The values are checked where they are read, with the key that set
	// them (cmd/rcptguard's configuration). An unknown TLS policy is the
	// strictest one, never a quiet downgrade.
	if cfg.StartTLS != StartTLSOpportunistic && cfg.StartTLS != StartTLSOff {
		cfg.StartTLS = StartTLSRequired
	}
	if strings.ContainsAny(cfg.Username, "\x00\r\n") {
		bad("username: holds control characters")
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	if cfg.Spool != "" {
		s, err := openSpool(cfg.Spool)
		if err != nil {
			return nil, err
		}
		m.spool = s
		if m.ledger, err = openLedger(cfg.Spool); err != nil {
			return nil, err
		}
	}
	m.cfg = cfg
	return m, nil
}

// DefaultBackoff is the wait after the attempt-th failed delivery attempt:
// 1 minute, doubling with each attempt up to 1 hour, each ±20% at random
// so that spooled messages spread out.
func DefaultBackoff(attempt int) time.Duration {
	d := time.Minute
	for i := 1; i < attempt && d < time.Hour; i++ {
		d *= 2
	}
	d = min(d, time.Hour)
	return time.Duration(float64(d) * (0.8 + 0.4*rand.Float64()))
}

// Pending is the number of messages not delivered yet: in the spool, or
// waiting in memory to be written there.
//
// A message moves from memory to the spool by being written there first
// and taken from memory after, so it is in both for a while; it is counted
// once. The names in memory are taken before the spool is listed: a
// message the writer moves in between is in the listing, so none is
// missed either.
func (m *Mailer) Pending() int {
	if m.spool == nil {
		return 0
	}
	m.memMu.Lock()
	inMem := make([]string, len(m.mem))
	for i, mm := range m.mem {
		inMem[i] = mm.name
	}
	m.memMu.Unlock()
	names, err := m.spool.list()
	if err != nil {
		names = nil
	}
	n := len(names)
	for _, name := range inMem {
		if _, found := slices.BinarySearch(names, name); !found {
			n++
		}
	}
	return n
}

// Enqueue composes the messages for r and hands them to the spool writer,
// a goroutine of the Mailer's, which writes each to the spool (one file per
// message, synced) and wakes Run. Enqueue waits neither for the disk nor
// for the relay: a policy answer that reports a block is never held by an
// fsync. A message the spool refuses (a full or read-only disk) waits in
// memory, is written again every Config.SpoolRetry until it is in the
// spool, and is counted by [Mailer.Unspooled] meanwhile; use
// [Mailer.Flush] to wait for the writes. A block report that a crash
// loses before it reached the spool is made again at the next start (see
// [Mailer.Unreported]).
//
// The report goes to Config.To, if any; a warning also goes to the
// identity when Config.WarnUser is set and the identity is an email
// address. Empty Hostname and zero Time in r are filled in.
func (m *Mailer) Enqueue(ctx context.Context, r Report) error {
	if m.spool == nil {
		return ErrNoSpool
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("notify: enqueue: %w", err)
	}
	if r.Hostname == "" {
		r.Hostname = m.cfg.Hostname
	}
	if r.Time.IsZero() {
		r.Time = m.cfg.Now()
	}
	var errs []error
	queued := 0
	if len(m.to) > 0 {
		rr := r
		if rr.MessageID == "" {
			rr.MessageID = newMessageID(rr.Hostname)
		}
		msg, err := Compose(rr, m.cfg.From, m.cfg.To)
		if err == nil {
			err = m.queue(r, rr.MessageID, m.to, msg)
		}
		if err != nil {
			errs = append(errs, err)
		} else {
			queued++
		}
	}
	if user, ok := r.UserAddress(); ok && m.cfg.WarnUser && m.mayWarn(user) {
		ru := r
		ru.MessageID = newMessageID(ru.Hostname)
		msg, err := ComposeUserWarning(ru, m.cfg.From, m.cfg.To)
		if err == nil {
			err = m.queue(r, ru.MessageID, []string{user}, msg)
		}
		if err != nil {
			m.unwarn(user) // not queued: the next warning may try again
			errs = append(errs, err)
		} else {
			queued++
		}
	}
	if queued > 0 {
		select {
		case m.wake <- struct{}{}:
		default:
		}
	}
	return errors.Join(errs...)
}

// mayWarn reports whether user may get a warning now: the address is at
// one of Config.UserDomains and got none in the last UserWarnPeriod. A
// true answer counts as the warning; call unwarn if it is not queued.
func (m *Mailer) mayWarn(user string) bool {
	at := strings.LastIndexByte(user, '@')
	if at < 0 || !m.userDomains[foldDomain(user[at+1:])] {
		m.log.Info("user warning not sent: the identity's domain is not in detector.local_domains",
			slog.String("identity", user))
		return false
	}
	key := foldASCII(user)
	now := m.cfg.Now()
	m.warnMu.Lock()
	defer m.warnMu.Unlock()
	if last, ok := m.warned[key]; ok && now.Sub(last) < m.cfg.UserWarnPeriod {
		m.log.Info("user warning not sent: one was sent within the period",
			slog.String("identity", user), slog.Time("last", last))
		return false
	}
	if len(m.warned) >= m.warnedPrune {
		for k, t := range m.warned {
			if now.Sub(t) >= m.cfg.UserWarnPeriod {
				delete(m.warned, k)
			}
		}
		m.warnedPrune = max(minWarnedPrune, 2*len(m.warned))
	}
	m.warned[key] = now
	return true
}

// unwarn forgets the warning mayWarn counted for user.
func (m *Mailer) unwarn(user string) {
	m.warnMu.Lock()
	delete(m.warned, foldASCII(user))
	m.warnMu.Unlock()
}

// foldDomain returns a domain in the form domains are compared in: ASCII
// lower case, without a trailing dot.
func foldDomain(d string) string {
	return foldASCII(strings.TrimSuffix(strings.TrimSpace(d), "."))
}

// foldASCII returns s with ASCII letters in lower case (as Postfix folds
// names; other letters are left as they are).
func foldASCII(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + ('a' - 'A')
		}
	}
	return string(b)
}

// queue puts one message in memory for the spool writer and starts it.
func (m *Mailer) queue(r Report, msgID string, to []string, msg []byte) error {
	now := m.cfg.Now()
	hdr := spoolHeader{
		From:        m.from,
		To:          to,
		Created:     now,
		NextAttempt: now,
		Kind:        string(r.Kind),
		Identity:    r.Identity,
		MessageID:   "<" + msgID + ">",
	}
	mm := memMsg{name: newName(now), hdr: hdr, msg: msg, at: time.Now()}
	if r.Kind == KindBlock {
		mm.block, _ = ledgerKey(r.Identity)
	}
	m.memMu.Lock()
	defer m.memMu.Unlock()
	if len(m.mem) >= maxUnspooled {
		return fmt.Errorf("notify: enqueue %s report: %d reports wait for the spool already (%v); this one is dropped", r.Kind, len(m.mem), m.memErr)
	}
	if len(m.mem) == 0 {
		m.memEmpty = make(chan struct{})
	}
	m.mem = append(m.mem, mm)
	if mm.block != "" {
		m.memBlock[mm.block]++
	}
	m.startWriterLocked()
	return nil
}

// startWriterLocked starts writeMem unless it runs or nothing waits.
// m.memMu must be held.
func (m *Mailer) startWriterLocked() {
	if m.writing || len(m.mem) == 0 {
		return
	}
	m.writing = true
	go m.writeMem()
}

// writeMem writes the messages waiting in memory to the spool, oldest
// first, in batches with one sync of the directory each, until none is
// left or the spool refuses one (then Run starts it again after
// Config.SpoolRetry). It ends by itself: a file system call cannot be
// interrupted, so a disk that hangs holds only this goroutine.
func (m *Mailer) writeMem() {
	for {
		m.memMu.Lock()
		batch := slices.Clone(m.mem)
		if len(batch) == 0 {
			m.writing = false
			m.memMu.Unlock()
			return
		}
		m.memMu.Unlock()

		placed := 0
		var err error
		for _, mm := range batch {
			if err = m.spool.place(mm.name, mm.hdr, mm.msg); err != nil {
				break
			}
			placed++
		}
		if placed > 0 {
			serr := m.spool.injected("sync", "")
			if serr == nil {
				serr = m.spool.syncDir()
			}
			if serr != nil && err == nil {
				err = serr
			}
			// On record at once, so that a spool that turns read-only
			// later does not hold them back (the sender records a block
			// report before its first attempt otherwise).
			var blocks []string
			for _, mm := range batch[:placed] {
				if mm.block != "" {
					blocks = append(blocks, mm.block)
				}
			}
			if lerr := m.note(true, blocks...); lerr != nil {
				m.log.Warn("spool ledger not updated; the sender records the reports before it sends them", slog.Any("error", lerr))
			}
		}
		m.memMu.Lock()
		// Only writeMem takes from mem, and only queue adds to its end:
		// the batch is still its beginning. A placed file is in the
		// spool whatever the directory sync said; it must not be
		// written twice.
		m.mem = slices.Delete(m.mem, 0, placed)
		for _, mm := range batch[:placed] {
			if mm.block != "" {
				if m.memBlock[mm.block]--; m.memBlock[mm.block] <= 0 {
					delete(m.memBlock, mm.block)
				}
			}
		}
		failedBefore := m.memErr != nil
		m.memErr = err
		waiting := len(m.mem)
		if waiting == 0 {
			close(m.memEmpty)
		}
		if err != nil {
			m.writing = false
		}
		m.memMu.Unlock()

		for _, mm := range batch[:placed] {
			m.log.Info("report queued", slog.String("identity", mm.hdr.Identity), slog.String("kind", mm.hdr.Kind),
				slog.String("message_id", mm.hdr.MessageID), slog.Any("to", mm.hdr.To), slog.String("spool_file", mm.name))
		}
		if placed > 0 {
			select {
			case m.wake <- struct{}{}:
			default:
			}
		}
		switch {
		case err != nil && !failedBefore:
			m.log.Error("the spool refuses reports; they wait in memory and are written when it takes them",
				slog.Int("waiting", waiting), slog.String("spool", m.spool.dir), slog.Any("error", err))
			return
		case err != nil:
			return
		case failedBefore:
			m.log.Info("the spool takes reports again", slog.String("spool", m.spool.dir))
		}
	}
}

// Unspooled returns the number of reports waiting in memory for the spool
// (Enqueue took them, the spool has not yet), when the oldest of them was
// made, and the spool's last error (nil when the last write succeeded).
// Reports waiting because the spool refuses them are lost if the process
// ends before it takes them; block reports are then made again at the
// next start.
func (m *Mailer) Unspooled() (n int, since time.Time, err error) {
	m.memMu.Lock()
	defer m.memMu.Unlock()
	if len(m.mem) > 0 {
		since = m.mem[0].at
	}
	return len(m.mem), since, m.memErr
}

// Flush waits until every report Enqueue took is in the spool, or ctx
// ends.
func (m *Mailer) Flush(ctx context.Context) error {
	for {
		m.memMu.Lock()
		m.startWriterLocked()
		empty, err := m.memEmpty, m.memErr
		m.memMu.Unlock()
		select {
		case <-empty:
			return nil
		case <-ctx.Done():
			if err != nil {
				return fmt.Errorf("notify: reports not in the spool: %w", err)
			}
			return fmt.Errorf("notify: reports not in the spool: %w", ctx.Err())
		case <-time.After(m.cfg.SpoolRetry):
		}
	}
}

// Unreported returns the identities of blocked (the daemon's own blocks on
// the blocklist at start-up) whose block has no report: none in the spool
// or in memory, and none on the spool's record of reports made (the
// ledger). Those are blocks a crash left without their report, between
// the blocklist write and the spool write; the caller reports them. The
// ledger is compacted to the identities of blocked.
//
// When the spool has no ledger yet (its first start with this version),
// none is returned and every identity of blocked is recorded as reported:
// their blocks predate the record.
func (m *Mailer) Unreported(blocked []string) ([]string, error) {
	if m.spool == nil {
		return nil, ErrNoSpool
	}
	m.ledgerMu.Lock()
	defer m.ledgerMu.Unlock()
	keys := make([]string, 0, len(blocked))
	for _, id := range blocked {
		if k, ok := ledgerKey(id); ok {
			keys = append(keys, k)
		}
	}
	if !m.ledger.existed {
		return nil, m.ledger.rewrite(m.spool, keys)
	}
	spooled, err := m.spooledBlocks()
	if err != nil {
		return nil, err
	}
	m.memMu.Lock()
	for k := range m.memBlock {
		spooled[k] = true
	}
	m.memMu.Unlock()
	var missing, keep []string
	for i, k := range keys {
		switch {
		case m.ledger.ids[k]:
			keep = append(keep, k)
		case !spooled[k]:
			missing = append(missing, blocked[i])
		}
	}
	if len(keep) < len(m.ledger.ids) {
		if err := m.ledger.rewrite(m.spool, keep); err != nil {
			m.log.Warn("spool ledger not compacted", slog.Any("error", err))
		}
	}
	return missing, nil
}

// spooledBlocks returns the ledger keys of the block reports in the spool.
func (m *Mailer) spooledBlocks() (map[string]bool, error) {
	names, err := m.spool.list()
	if err != nil {
		return nil, err
	}
	out := map[string]bool{}
	for _, name := range names {
		e, err := m.spool.load(name)
		if err != nil || e.hdr.Kind != string(KindBlock) {
			continue
		}
		if k, ok := ledgerKey(e.hdr.Identity); ok {
			out[k] = true
		}
	}
	return out, nil
}

// Forget records that identity was unblocked: its next block is a new
// event, reported anew. It returns when the record is on disk.
func (m *Mailer) Forget(identity string) error {
	return m.note(false, identity)
}

// NoteReported records blocks that need no report from this daemon, such
// as entries added to the blocklist by hand while it runs.
func (m *Mailer) NoteReported(identities ...string) error {
	return m.note(true, identities...)
}

func (m *Mailer) note(add bool, identities ...string) error {
	if m.spool == nil {
		return nil
	}
	m.ledgerMu.Lock()
	defer m.ledgerMu.Unlock()
	var keys []string
	for _, id := range identities {
		if k, ok := ledgerKey(id); ok && m.ledger.ids[k] != add {
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		return nil
	}
	return m.ledger.append(m.spool, add, keys...)
}

// recordSpooled puts a spooled block report on the ledger before it is
// first sent, so that no start-up ever reports that block again.
func (m *Mailer) recordSpooled(e spoolEntry) error {
	if e.hdr.Kind != string(KindBlock) {
		return nil
	}
	return m.note(true, e.hdr.Identity)
}

// newMessageID returns a random Message-ID (without brackets) at host.
func newMessageID(host string) string {
	var buf [16]byte
	_, _ = crand.Read(buf[:]) // crypto/rand.Read does not fail
	return hex.EncodeToString(buf[:]) + "@" + sanitizeHostname(host)
}

// SendNow composes r and sends it to Config.To at once, without the
// spool, and returns the relay's answer as an error with context when it
// was not accepted for every recipient. It is for `rcptguard notify-test`.
func (m *Mailer) SendNow(ctx context.Context, r Report) error {
	if len(m.to) == 0 {
		return fmt.Errorf("notify: no To addresses configured")
	}
	if r.Hostname == "" {
		r.Hostname = m.cfg.Hostname
	}
	if r.Time.IsZero() {
		r.Time = m.cfg.Now()
	}
	msg, err := Compose(r, m.cfg.From, m.cfg.To)
	if err != nil {
		return err
	}
	_, failures := m.deliver(ctx, m.from, m.to, msg, nil, nil)
	var errs []error
	for _, f := range failures {
		errs = append(errs, f.err)
	}
	if len(errs) > 0 {
		return fmt.Errorf("notify: send report: %w", errors.Join(errs...))
	}
	return nil
}

// Run is the sender loop. It moves temporary files a crash left behind
// into the spool's corrupt/ directory, then delivers the spooled messages
// (those a previous process left, too) and every message Enqueue adds,
// until ctx is done; then it returns nil. A message's file is removed only
// after the relay accepted it (250 after DATA). A failed attempt is tried
// again after Config.Backoff; recipients the relay accepted are not sent
// to again. A 5xx reply is logged as an error on each attempt, a 4xx or a
// connection failure as a warning; both are retried until the message is
// older than Config.MaxAge, when it is moved to the spool's failed/
// directory with an error log. Run must not be called twice at once.
func (m *Mailer) Run(ctx context.Context) error {
	if m.spool == nil {
		return ErrNoSpool
	}
	if !m.running.CompareAndSwap(false, true) {
		return errors.New("notify: Run is already running")
	}
	defer m.running.Store(false)

	moved, err := m.spool.sweepTemp()
	for _, p := range moved {
		m.log.Error("partial spool file from an earlier crash moved aside", slog.String("path", p))
	}
	if err != nil {
		m.log.Error("spool temporary files not swept", slog.Any("error", err))
	}
	if n := m.spool.count(); n > 0 {
		m.log.Info("replaying report spool", slog.Int("pending", n), slog.String("spool", m.spool.dir))
	}
	// A message marked as being sent when the last process died may be
	// with the relay already, or may not: the kill may have come before
	// the relay read the end of DATA. It is sent again, with the same
	// Message-ID: a duplicate report is a nuisance, a lost one hides a
	// block. The sender delivers one message at a time, so a kill makes
	// at most one such duplicate.
	if marked, err := m.spool.marked(); err != nil {
		m.log.Error("spool not searched for messages being sent at a crash", slog.Any("error", err))
	} else {
		for name := range marked {
			err := m.spool.unmark(name)
			m.log.Warn("report was being sent when rcptguard stopped; the relay may have it already, it is sent again (same Message-ID)",
				slog.String("spool_file", name), slog.Any("error", err))
		}
		if len(marked) > 0 {
			_ = m.spool.syncDir()
		}
	}

	// The first pass tries every spooled message at once, whenever it was
	// due: a restart often follows a fix of the relay or its settings.
	for first := true; ; first = false {
		next := m.runOnce(ctx, first)
		if ctx.Err() != nil {
			return m.finish()
		}
		wait := maxSleep
		if !next.IsZero() {
			wait = min(max(next.Sub(m.cfg.Now()), 0), maxSleep)
		}
		m.memMu.Lock()
		if len(m.mem) > 0 {
			// The spool refused reports: write them again soon.
			wait = min(wait, m.cfg.SpoolRetry)
		}
		m.memMu.Unlock()
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return m.finish()
		case <-m.wake:
		case <-t.C:
		}
		t.Stop()
		m.memMu.Lock()
		m.startWriterLocked()
		m.memMu.Unlock()
	}
}

// finish gives the reports still in memory a last chance to reach the
// spool, for the next start to send, and logs the ones that did not.
func (m *Mailer) finish() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := m.Flush(ctx); err != nil {
		n, _, _ := m.Unspooled()
		m.log.Error("reports lost at shutdown: the spool did not take them", slog.Int("count", n), slog.Any("error", err))
	}
	return nil
}

// runOnce makes one pass over the spool: it tries each message that is
// due, gives up the ones older than MaxAge, moves corrupt files aside, and
// returns the time the next message is due (zero if none is waiting).
// With allDue every message is tried, whenever it is due.
func (m *Mailer) runOnce(ctx context.Context, allDue bool) time.Time {
	var next time.Time
	soonest := func(t time.Time) {
		if next.IsZero() || t.Before(next) {
			next = t
		}
	}
	names, err := m.spool.list()
	if err != nil {
		m.log.Error("spool listing failed", slog.Any("error", err))
		return m.cfg.Now().Add(time.Minute)
	}
	m.forgetExcept(names)
	for _, name := range names {
		if ctx.Err() != nil {
			return next
		}
		e, err := m.spool.load(name)
		switch {
		case errors.Is(err, os.ErrNotExist):
			continue
		case errors.Is(err, errCorrupt):
			dst, merr := m.spool.moveAside(name, spoolCorrupt)
			if merr != nil {
				m.log.Error("corrupt spool file cannot be moved aside", slog.Any("error", err), slog.Any("move_error", merr))
				soonest(m.cfg.Now().Add(time.Minute))
				continue
			}
			m.log.Error("corrupt spool file moved aside", slog.String("path", dst), slog.Any("error", err))
			continue
		case err != nil:
			m.log.Error("spool file unreadable", slog.String("spool_file", name), slog.Any("error", err))
			soonest(m.cfg.Now().Add(time.Minute))
			continue
		}

		now := m.cfg.Now()
		if age := now.Sub(e.hdr.Created); age > m.cfg.MaxAge {
			dst, merr := m.spool.moveAside(name, spoolFailed)
			attrs := []any{slog.String("identity", e.hdr.Identity), slog.String("kind", e.hdr.Kind),
				slog.String("message_id", e.hdr.MessageID), slog.Any("to", e.hdr.To), slog.Int("attempts", e.hdr.Attempts),
				slog.Duration("age", age), slog.String("last_error", e.hdr.LastError)}
			if merr != nil {
				m.log.Error("report given up after max age; cannot move it to failed/", append(attrs, slog.Any("error", merr))...)
				soonest(now.Add(time.Minute))
				continue
			}
			m.log.Error("report given up after max age, not delivered", append(attrs, slog.String("path", dst))...)
			continue
		}
		due := e.hdr.NextAttempt
		m.mu.Lock()
		if t, ok := m.retryAt[name]; ok && t.After(due) {
			due = t
		}
		sent := m.sent[name]
		m.mu.Unlock()
		if sent {
			// Delivered, but the read-only spool kept the file: never
			// send it again, remove it when the spool lets us.
			if err := m.spool.remove(name); err == nil {
				m.mu.Lock()
				delete(m.sent, name)
				m.mu.Unlock()
			} else {
				soonest(now.Add(m.cfg.SpoolRetry))
			}
			continue
		}
		if due.After(now) && !allDue {
			soonest(due)
			continue
		}
		if err := m.recordSpooled(e); err != nil {
			// Sent before it is on record, a crash could make its
			// block be reported again at the next start.
			m.log.Error("block report not sent yet: the spool ledger cannot record it", slog.String("identity", e.hdr.Identity),
				slog.String("spool_file", name), slog.Any("error", err))
			soonest(now.Add(m.cfg.SpoolRetry))
			continue
		}
		if t, retry := m.attempt(ctx, e); retry {
			soonest(t)
		}
	}
	return next
}

// forgetExcept drops retry floors and delivery marks of files that are
// gone.
func (m *Mailer) forgetExcept(names []string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for name := range m.retryAt {
		if !slices.Contains(names, name) {
			delete(m.retryAt, name)
		}
	}
	for name := range m.sent {
		if !slices.Contains(names, name) {
			delete(m.sent, name)
		}
	}
}

// attempt delivers one spooled message and updates the spool: the file
// goes when every recipient has it, else its header records the attempt.
// It returns when the message is due again, and whether it is.
func (m *Mailer) attempt(ctx context.Context, e spoolEntry) (time.Time, bool) {
	log := m.log.With(slog.String("identity", e.hdr.Identity), slog.String("kind", e.hdr.Kind),
		slog.String("message_id", e.hdr.MessageID), slog.String("spool_file", e.name))
	// The file goes the moment the relay took the message for every
	// recipient, before QUIT: the shorter the time between the relay's
	// answer and the removal, the smaller the chance that a crash in
	// between makes the next start send it again (with the same
	// Message-ID, by which a ticket system can tell).
	var removeErr error
	removed, marked := false, false
	delivered, failures := m.deliver(ctx, e.hdr.From, e.hdr.To, e.msg, func() {
		// A crash from now on may leave the message with the relay:
		// the mark tells the next start, which sends it again and says
		// so. Without the mark (a read-only spool) it goes on the same.
		marked = m.spool.mark(e.name) == nil
	}, func() {
		removeErr, removed = m.spool.remove(e.name), true
	})
	if marked {
		if err := m.spool.unmark(e.name); err != nil {
			log.Warn("spool mark of a report being sent not removed", slog.Any("error", err))
		}
		if len(failures) > 0 {
			// Not with the relay: the next start must send it.
			if err := m.spool.syncDir(); err != nil {
				log.Warn("spool mark of a report being sent not removed", slog.Any("error", err))
			}
		}
	}
	if len(delivered) > 0 {
		log.Info("report delivered", slog.Any("to", delivered), slog.String("relay", m.cfg.Relay))
	}
	if len(failures) == 0 {
		if !removed {
			removeErr = m.spool.remove(e.name)
		}
		if err := removeErr; err != nil {
			log.Error("delivered report cannot be removed from the spool; it is not sent again by this process, which removes it when it can",
				slog.Any("error", err))
			m.mu.Lock()
			m.sent[e.name] = true
			m.mu.Unlock()
			return m.cfg.Now().Add(m.cfg.SpoolRetry), true
		}
		return time.Time{}, false
	}
	if ctx.Err() != nil && len(delivered) == 0 {
		// Shutting down: this was no real attempt, the file stays as is.
		return time.Time{}, false
	}

	now := m.cfg.Now()
	hdr := e.hdr
	hdr.Attempts++
	hdr.NextAttempt = now.Add(m.cfg.Backoff(hdr.Attempts))
	hdr.To = nil
	var msgs []string
	for _, f := range failures {
		hdr.To = append(hdr.To, f.rcpts...)
		msgs = append(msgs, f.err.Error())
		attrs := []any{slog.Any("to", f.rcpts), slog.Int("attempts", hdr.Attempts),
			slog.Time("next_attempt", hdr.NextAttempt), slog.Any("error", f.err)}
		if f.permanent() {
			log.Error("relay rejected the report permanently (5xx); retrying until max age, fix the relay or the notify settings", attrs...)
		} else {
			log.Warn("report not delivered, will retry", attrs...)
		}
	}
	hdr.LastError = strings.Join(msgs, "; ")
	if err := m.spool.write(e.name, hdr, e.msg); err != nil {
		log.Error("spool file cannot be updated", slog.Any("error", err))
		m.mu.Lock()
		m.retryAt[e.name] = hdr.NextAttempt
		m.mu.Unlock()
	}
	return hdr.NextAttempt, true
}

// failure is what went wrong for some recipients of one attempt.
type failure struct {
	rcpts []string
	err   error
}

// permanent reports a 5xx reply from the relay.
func (f failure) permanent() bool {
	var se *smtp.SMTPError
	return errors.As(f.err, &se) && se.Code/100 == 5
}

// deliver makes one attempt to hand msg to the relay for each recipient
// in to. It returns the recipients the relay accepted the message for
// (250 after DATA) and, for the others, why not. beforeDot, if not nil,
// is called just before the end of DATA is sent; allTaken, if not nil, as
// soon as the relay took the message for every recipient, before QUIT.
func (m *Mailer) deliver(ctx context.Context, from string, to []string, msg []byte, beforeDot, allTaken func()) (delivered []string, failures []failure) {
	ctx, cancel := context.WithTimeout(ctx, attemptTimeout)
	defer cancel()
	all := func(err error) ([]string, []failure) {
		return nil, []failure{{rcpts: to, err: fmt.Errorf("relay %s: %w", m.cfg.Relay, err)}}
	}
	s, err := m.connect(ctx)
	if err != nil {
		return all(err)
	}
	defer s.close()
	if err := s.c.Mail(from, nil); err != nil {
		return all(fmt.Errorf("MAIL FROM:<%s>: %w", from, err))
	}
	var accepted []string
	for _, rcpt := range to {
		err := s.c.Rcpt(rcpt, nil)
		if err == nil {
			accepted = append(accepted, rcpt)
			continue
		}
		var se *smtp.SMTPError
		if !errors.As(err, &se) {
			return all(fmt.Errorf("RCPT TO:<%s>: %w", rcpt, err))
		}
		failures = append(failures, failure{rcpts: []string{rcpt}, err: fmt.Errorf("relay %s: RCPT TO:<%s>: %w", m.cfg.Relay, rcpt, err)})
	}
	if len(accepted) == 0 {
		_ = s.c.Quit()
		return nil, failures
	}
	dataFailed := func(step string, err error) ([]string, []failure) {
		return nil, append(failures, failure{rcpts: accepted, err: fmt.Errorf("relay %s: %s: %w", m.cfg.Relay, step, err)})
	}
	w, err := s.c.Data()
	if err != nil {
		return dataFailed("DATA", err)
	}
	if _, err := w.Write(msg); err != nil {
		return dataFailed("DATA", err)
	}
	if beforeDot != nil {
		beforeDot()
	}
	if err := w.Close(); err != nil {
		return dataFailed("end of DATA", err)
	}
	if len(failures) == 0 && allTaken != nil {
		allTaken()
	}
	_ = s.c.Quit()
	return accepted, failures
}

// session is one SMTP connection to the relay.
type session struct {
	c    *smtp.Client
	conn net.Conn
	stop func() bool // unregisters the close on context end
}

func (s *session) close() {
	s.stop()
	_ = s.c.Close()
}

// connect opens a session ready for MAIL FROM: EHLO, STARTTLS as
// Config.StartTLS says, AUTH when a username is set.
//
// go-smtp starts TLS only from its constructor, which says "EHLO
// localhost" first. So, unless STARTTLS is off, a first connection asks
// the relay (EHLO with our name) whether it offers STARTTLS; when it does,
// the session is a second connection with STARTTLS from the start and
// EHLO with our name over TLS.
func (m *Mailer) connect(ctx context.Context) (*session, error) {
	s, err := m.dial(ctx, false)
	if err != nil {
		return nil, err
	}
	if m.cfg.StartTLS != StartTLSOff {
		offered, _ := s.c.Extension("STARTTLS")
		switch {
		case offered:
			_ = s.c.Quit()
			s.close()
			if s, err = m.dial(ctx, true); err != nil {
				return nil, err
			}
		case m.cfg.StartTLS == StartTLSRequired:
			_ = s.c.Quit()
			s.close()
			return nil, ErrNoStartTLS
		}
	}
	if err := m.auth(s); err != nil {
		_ = s.c.Quit()
		s.close()
		return nil, err
	}
	return s, nil
}

// dial connects and says EHLO, over TLS when startTLS is set.
func (m *Mailer) dial(ctx context.Context, startTLS bool) (*session, error) {
	dctx, cancel := context.WithTimeout(ctx, dialTimeout)
	conn, err := m.cfg.Dialer.DialContext(dctx, "tcp", m.cfg.Relay)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	var c *smtp.Client
	if startTLS {
		c, err = smtp.NewClientStartTLS(&helloName{Conn: conn, name: m.cfg.Hostname}, m.tlsConfig())
		if err != nil {
			stop()
			conn.Close()
			return nil, fmt.Errorf("STARTTLS: %w", err)
		}
	} else {
		c = smtp.NewClient(conn)
	}
	c.CommandTimeout = commandTimeout
	c.SubmissionTimeout = submissionTimeout
	s := &session{c: c, conn: conn, stop: stop}
	if err := c.Hello(m.cfg.Hostname); err != nil {
		s.close()
		var cve *tls.CertificateVerificationError
		if errors.As(err, &cve) {
			return nil, fmt.Errorf("TLS: the relay's certificate is not trusted (notify.tls_skip_verify accepts any): %w", err)
		}
		if startTLS {
			return nil, fmt.Errorf("EHLO over TLS: %w", err)
		}
		return nil, fmt.Errorf("EHLO: %w", err)
	}
	return s, nil
}

// tlsConfig is the client TLS configuration for the relay.
func (m *Mailer) tlsConfig() *tls.Config {
	var c *tls.Config
	if m.cfg.TLSConfig != nil {
		c = m.cfg.TLSConfig.Clone()
	} else {
		c = &tls.Config{}
	}
	if c.ServerName == "" {
		c.ServerName = m.host
	}
	if m.cfg.TLSSkipVerify || hostIsLoopback(m.host) {
		// The administrator asked for it (notify.tls_skip_verify), or the
		// relay is on this machine (a stock Postfix with its self-signed
		// certificate): the connection never leaves the host, so there is
		// nobody in the middle to authenticate against.
		c.InsecureSkipVerify = true //nolint:gosec // see above
	}
	if c.MinVersion == 0 {
		c.MinVersion = tls.VersionTLS12
	}
	return c
}

// auth authenticates when a username is set: PLAIN when the relay offers
// it, else LOGIN; only over TLS or to a loopback relay.
func (m *Mailer) auth(s *session) error {
	if m.cfg.Username == "" {
		return nil
	}
	if _, isTLS := s.c.TLSConnectionState(); !isTLS && !isLoopback(s.conn.RemoteAddr()) {
		return ErrInsecureAuth
	}
	var (
		client sasl.Client
		mech   string
	)
	switch {
	case s.c.SupportsAuth(sasl.Plain):
		client, mech = sasl.NewPlainClient("", m.cfg.Username, m.cfg.Password), sasl.Plain
	case s.c.SupportsAuth(sasl.Login):
		client, mech = &loginClient{user: m.cfg.Username, pass: m.cfg.Password}, sasl.Login
	default:
		if ok, offered := s.c.Extension("AUTH"); ok {
			return fmt.Errorf("AUTH: the relay offers neither PLAIN nor LOGIN, only %q", offered)
		}
		return fmt.Errorf("AUTH: the relay does not offer authentication")
	}
	if err := s.c.Auth(client); err != nil {
		return fmt.Errorf("AUTH %s as %q: %w", mech, m.cfg.Username, err)
	}
	return nil
}

// loginClient is the SASL LOGIN mechanism, answering the server's
// "Username:" and "Password:" prompts. Unlike go-sasl's LOGIN client it
// sends no initial response, which every LOGIN server understands.
type loginClient struct {
	user, pass string
	step       int
}

func (a *loginClient) Start() (string, []byte, error) {
	return sasl.Login, nil, nil
}

func (a *loginClient) Next(challenge []byte) ([]byte, error) {
	a.step++
	switch a.step {
	case 1: // "Username:"
		return []byte(a.user), nil
	case 2: // "Password:"
		return []byte(a.pass), nil
	}
	return nil, sasl.ErrUnexpectedServerChallenge
}

// isLoopback reports whether a connection's remote address is on
// loopback, where a password in clear text never crosses a network.
func isLoopback(a net.Addr) bool {
	if tcp, ok := a.(*net.TCPAddr); ok {
		return tcp.IP.IsLoopback()
	}
	if a == nil {
		return false
	}
	host, _, err := net.SplitHostPort(a.String())
	if err != nil {
		host = a.String()
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
}

// hostIsLoopback reports whether the relay host is a loopback address or
// "localhost".
func hostIsLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}

// helloName puts our host name into the one EHLO (or HELO) that go-smtp's
// NewClientStartTLS sends before STARTTLS, which it hard-codes as
// "localhost": a relay must see the configured name in every greeting.
// Only a write that is exactly that command, before any other, is changed;
// what follows STARTTLS is encrypted and passes through.
type helloName struct {
	net.Conn
	name string
	done bool
}

func (c *helloName) Write(b []byte) (int, error) {
	if c.done {
		return c.Conn.Write(b)
	}
	for _, verb := range [...]string{"EHLO", "HELO"} {
		if string(b) == verb+" localhost\r\n" {
			if _, err := c.Conn.Write([]byte(verb + " " + c.name + "\r\n")); err != nil {
				return 0, err
			}
			if verb == "EHLO" {
				// go-smtp falls back to HELO when EHLO is refused.
				return len(b), nil
			}
			c.done = true
			return len(b), nil
		}
	}
	c.done = true
	return c.Conn.Write(b)
}
