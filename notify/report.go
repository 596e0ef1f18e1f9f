package notify

import (
	"fmt"
	"net/mail"
	"net/netip"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Kind says what a Report is about.
type Kind string

// Report kinds. They are the same words the detector uses for its events.
const (
	// KindBlock: the identity passed its limit and was blocked.
	KindBlock Kind = "block"
	// KindWouldBlock: monitor mode; the identity passed its limit and
	// would have been blocked, but nothing was blocked.
	KindWouldBlock Kind = "would-block"
	// KindWarning: the identity reached the warning share of its limit.
	KindWarning Kind = "warning"
	// KindHeld: the follow-up of a block: the identity's mail that was
	// already in Postfix's queue at the block has been put on hold
	// ("rcptguard queue-hold"). Report.Held lists it.
	KindHeld Kind = "held"
)

// Report is the facts of one block event or warning. It is plain data: the
// caller fills it, Compose turns it into a message. Every string in it may
// hold bytes an attacker chose (the identity, the recipients, the MX
// replies, the reverse names, the queue IDs); Compose sanitizes them.
type Report struct {
	Kind     Kind
	Identity string    // SASL user name (often an address) or a client IP address
	Time     time.Time // when it happened; shown in its own location, so pass local time
	Mode     string    // "enforce" or "monitor"
	Count    int       // distinct invalid recipients in the window
	Limit    int       // the identity's limit
	Period   time.Duration
	// Action is the Postfix action answered from now on, e.g.
	// "HOLD rcptguard: x blocked: 101 invalid recipients within 1h";
	// "" for warnings.
	Action     string
	Clients    []Client    // client addresses seen, with request counts
	Recipients []Recipient // the invalid recipients, most recent first; at most 20 are shown
	QueueIDs   []string    // Postfix queue IDs answered HOLD
	Hostname   string      // the machine rcptguard runs on; "" means "localhost"

	// RetroactiveHold is set on a block report when rcptguard asked for
	// the identity's mail already in the queue to be held: the report
	// then says that a follow-up report (KindHeld) lists it.
	RetroactiveHold bool
	// BlockTime, in a KindHeld report, is when the block asked for the
	// hold; Time is when the mail was held.
	BlockTime time.Time
	// Held, in a KindHeld report, is the mail held retroactively; at
	// most 100 are shown. HeldCount is how many were held in all, when
	// more than len(Held) (the list was cut short before the report).
	Held      []HeldMessage
	HeldCount int
	// QueueSpace is the free space of Postfix's queue file system when
	// the report was made; nil when it was not checked. When Low, the
	// report says so loudly: held mail stays on that file system.
	QueueSpace *QueueSpace
	// Recovered, in a block report, says the block was found on the
	// blocklist at start-up without a report: the daemon stopped after
	// writing the block and before its report reached the spool. Count,
	// Limit, Period, Clients and Recipients were in memory only and are
	// unknown; Time is when the block was found.
	Recovered bool

	// MessageID, when set, is the Message-ID to use, without angle
	// brackets ("id@host"). It is normally empty: Compose then makes a
	// random one at Hostname. Tests set it to get byte-identical output.
	MessageID string
}

// Client is one client address an identity connected from.
type Client struct {
	Address string // IP address as Postfix reported it
	Name    string // reverse name, "" or "unknown" if there is none
	Count   int    // requests seen from it
}

// HeldMessage is one message held retroactively.
type HeldMessage struct {
	QueueID    string    // Postfix queue ID; one that is not is left out
	Arrival    time.Time // when Postfix accepted it
	Size       int64     // bytes
	Recipients int       // recipients not delivered yet
}

// QueueSpace is the free space of Postfix's queue file system.
type QueueSpace struct {
	FreeBytes uint64
	FreeRatio float64 // 0 to 1
	Low       bool    // below the threshold at which rcptguard warns
}

// Recipient is one recipient that turned out not to exist.
type Recipient struct {
	Address string
	Time    time.Time
	Reason  string // a word such as "mailbox-unknown" or "nxdomain"
	MX      string // the MX host that answered, "" if none did
	Reply   string // the MX reply line, e.g. "550 5.1.1 <x@example.com>: no such user"
}

// Bounds on what a report shows, so that no report grows without limit:
// the one set for the evidence the detector keeps, the report's text and
// its JSON part.
const (
	MaxRecipients = 20  // invalid recipients, the most recent
	MaxClients    = 20  // client addresses, the first seen
	MaxQueueIDs   = 100 // queue IDs of held mail
)

const (
	maxIdentity  = 1000 // runes of the identity shown in the body
	maxField     = 512  // runes of any other value (RFC 5321 reply lines are shorter)
	maxSubjectID = 100  // runes of the identity in the Subject and X- header
)

// SampleReport returns a realistic block report for `rcptguard notify-test`:
// an address identity, two clients, three invalid recipients and two held
// messages. The recipients use example domains, so nothing in it points at
// a real mailbox.
func SampleReport(now time.Time, hostname string) Report {
	return Report{
		Kind:     KindBlock,
		Identity: "sample.user@example.com",
		Time:     now,
		Mode:     "enforce",
		Count:    101,
		Limit:    100,
		Period:   time.Hour,
		Action:   "HOLD rcptguard: sample.user@example.com blocked: 101 invalid recipients within 1h",
		Clients: []Client{
			{Address: "198.51.100.23", Name: "dsl-198-51-100-23.example.net", Count: 97},
			{Address: "2001:db8::17", Name: "", Count: 4},
		},
		Recipients: []Recipient{
			{Address: "j.smith@example.org", Time: now.Add(-20 * time.Second), Reason: "mailbox-unknown",
				MX: "mx1.example.org", Reply: "550 5.1.1 <j.smith@example.org>: Recipient address rejected: User unknown in virtual mailbox table"},
			{Address: "info@nonexistent.example", Time: now.Add(-45 * time.Second), Reason: "nxdomain"},
			{Address: "sales@example.net", Time: now.Add(-70 * time.Second), Reason: "mailbox-unknown",
				MX: "mail.example.net", Reply: "550 5.1.1 The email account that you tried to reach does not exist"},
		},
		QueueIDs: []string{"4Xk2Lm0bQrz9vWt", "4Xk2Ln3HcPz9vWx"},
		Hostname: hostname,
	}
}

// validate reports the first thing that makes r impossible to compose.
func (r Report) validate() error {
	switch r.Kind {
	case KindBlock, KindWouldBlock, KindWarning, KindHeld:
	default:
		return fmt.Errorf("notify: unknown report kind %q", string(r.Kind))
	}
	if r.Identity == "" {
		return fmt.Errorf("notify: report has no identity")
	}
	if r.Time.IsZero() {
		return fmt.Errorf("notify: report has no time")
	}
	return nil
}

// UserAddress returns the address to send the account holder's warning to:
// the identity itself, when r is a warning and the identity is a plain
// ASCII email address of at most 254 octets (no display name, no control
// characters). ok is false
// otherwise, and no user warning is sent.
func (r Report) UserAddress() (addr string, ok bool) {
	if r.Kind != KindWarning {
		return "", false
	}
	// RFC 5321 §4.5.3.1.3: a path is 256 octets with its angle brackets.
	if len(r.Identity) > 254 {
		return "", false
	}
	a, err := mail.ParseAddress(r.Identity)
	if err != nil || a.Name != "" || a.Address != r.Identity || !isASCII(r.Identity) {
		return "", false
	}
	if strings.ContainsFunc(r.Identity, func(c rune) bool { return c <= ' ' || c == 0x7f }) {
		return "", false
	}
	return a.Address, true
}

// humanPeriod says a window length in words: "hour", "90 minutes", "2 days".
func humanPeriod(d time.Duration) string {
	unit := func(n int64, one, many string) string {
		if n == 1 {
			return one
		}
		return strconv.FormatInt(n, 10) + " " + many
	}
	switch {
	case d <= 0:
		return "moment"
	case d%(24*time.Hour) == 0:
		return unit(int64(d/(24*time.Hour)), "day", "days")
	case d%time.Hour == 0:
		return unit(int64(d/time.Hour), "hour", "hours")
	case d%time.Minute == 0:
		return unit(int64(d/time.Minute), "minute", "minutes")
	}
	return unit(int64((d+time.Second-1)/time.Second), "second", "seconds")
}

// clean makes an untrusted value safe to show on one line of text: invalid
// UTF-8 bytes and control, format and line or paragraph separator
// characters (CR, LF, TAB, NUL, DEL, C1 controls, bidirectional overrides,
// U+2028, ...) are written as visible Go-style escapes (\r, \x00, \u202e),
// and the result is cut to max runes with "..." appended. So a value can
// neither start a new header or body line nor reorder the text around it.
func clean(s string, max int) string {
	var b strings.Builder
	n := 0
	for i := 0; i < len(s); {
		if n >= max {
			b.WriteString("...")
			break
		}
		c, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case c == utf8.RuneError && size <= 1:
			fmt.Fprintf(&b, `\x%02x`, s[i])
		case c == '\r':
			b.WriteString(`\r`)
		case c == '\n':
			b.WriteString(`\n`)
		case c == '\t':
			b.WriteString(`\t`)
		case c < 0x80 && (c < ' ' || c == 0x7f):
			fmt.Fprintf(&b, `\x%02x`, c)
		case unsafeRune(c):
			fmt.Fprintf(&b, `\u%04x`, c)
		default:
			b.WriteRune(c)
		}
		n++
		i += size
	}
	return b.String()
}

// unsafeRune reports the characters clean escapes beyond ASCII controls.
func unsafeRune(c rune) bool {
	return unicode.IsControl(c) || unicode.In(c, unicode.Cf, unicode.Zl, unicode.Zp) ||
		c == utf8.RuneError || c == '\ufeff'
}

// isClean reports whether clean would leave s as it is (ignoring length).
func isClean(s string) bool {
	return clean(s, utf8.RuneCountInString(s)) == s
}

// isASCII reports whether s is printable-or-control 7-bit text.
func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

// shellQuote quotes s as one POSIX shell word, always in single quotes,
// each ' written as '\”. Inside single quotes the shell expands nothing.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// rcptguardArg quotes an identity as the last argument of a rcptguard
// command. An identity may start with '-' (a SASL user name can); then
// "--" ends the flags first, which rcptguard (Go's flag package, where no
// flag takes an optional value) reads as "the rest are arguments".
func rcptguardArg(id string) string {
	if strings.HasPrefix(id, "-") {
		return "-- " + shellQuote(id)
	}
	return shellQuote(id)
}

// maxQueueID bounds a queue ID; Postfix's are about 12 (short) to 28
// (long) characters.
const maxQueueID = 32

// queueIDs returns the Postfix queue IDs of ids, leaving out anything that
// is not one (letters and digits only, 6 to 32 of them), so that no
// printed postsuper command can hold an option or need more than quoting.
// The detector keeps only well-formed queue IDs; this is the last line.
func queueIDs(ids []string) []string {
	var out []string
	for _, q := range ids {
		if validQueueID(q) {
			out = append(out, q)
		}
	}
	return out
}

func validQueueID(q string) bool {
	if len(q) < 6 || len(q) > maxQueueID {
		return false
	}
	for i := 0; i < len(q); i++ {
		switch c := q[i]; {
		case '0' <= c && c <= '9', 'A' <= c && c <= 'Z', 'a' <= c && c <= 'z':
		default:
			return false
		}
	}
	return true
}

// isIP reports whether the identity is an IP address (an unauthenticated
// client tracked by address).
func isIP(s string) bool {
	_, err := netip.ParseAddr(s)
	return err == nil
}

// sanitizeHostname returns h when it is a plausible host name for a
// Message-ID and EHLO, else "localhost".
func sanitizeHostname(h string) string {
	if h == "" || len(h) > 253 {
		return "localhost"
	}
	for i := 0; i < len(h); i++ {
		c := h[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-', c == '.':
		default:
			return "localhost"
		}
	}
	if h[0] == '.' || h[0] == '-' || h[len(h)-1] == '.' || strings.Contains(h, "..") {
		return "localhost"
	}
	return h
}
