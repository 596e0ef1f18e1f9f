package detector

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/rcptguard/rcptguard/callout/textfmt"
)

// Default limits for reading policy requests. A real Postfix 3.x request
// is about 30 lines and well under 2 KiB; the defaults leave room for long
// certificate subjects and SMTPUTF8 addresses while bounding what one
// connection can make the server hold.
const (
	DefaultMaxLine    = 8192     // bytes in one "name=value" line, without its line terminator
	DefaultMaxAttrs   = 256      // attribute lines in one request
	DefaultMaxRequest = 64 << 10 // bytes in one request, line terminators and the empty line included
)

// Errors returned by ReadRequest for input that breaks the protocol or its
// limits. They are permanent: the connection that sent the input cannot be
// trusted to be in step any more and should be closed without an answer.
// ReadRequest wraps them with the line number and byte offset where the
// problem was found; test for them with errors.Is.
var (
	ErrLineTooLong     = errors.New("detector: policy request line too long")
	ErrTooManyAttrs    = errors.New("detector: too many attributes in policy request")
	ErrRequestTooLarge = errors.New("detector: policy request too large")
	ErrMalformed       = errors.New("detector: malformed policy request")
)

// Request is one policy delegation request, as Postfix smtpd sends it to a
// check_policy_service (see Postfix SMTPD_POLICY_README).
//
// Every attribute that Postfix 3.x documents has a named field, so that a
// request from Postfix is read without allocating a map. Postfix sends all
// of them in every request, empty when it has no value; a field is also
// empty when the attribute was not sent at all. Values are kept byte for
// byte as received, except for one trailing CR: Postfix escapes nothing, so
// a value may hold any byte except NUL and LF, including invalid UTF-8, and
// must be treated as untrusted text. Names are matched exactly, case
// included.
//
// Attrs holds the attributes that have no named field (those of a newer
// Postfix, or of another client), keyed by their name as received. It is
// nil when there are none.
//
// Postfix never sends an attribute twice; when a client does, the last
// value wins.
type Request struct {
	Request                string // "smtpd_access_policy"
	ProtocolState          string // SMTP stage: "CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE", "VRFY", "ETRN"
	ProtocolName           string // "SMTP", "ESMTP", "ESMTPSA", "LMTP", ...
	HeloName               string // the HELO/EHLO argument
	QueueID                string // empty before the queue file exists
	Sender                 string // MAIL FROM address without <>; empty for the null sender
	Recipient              string // RCPT TO address without <>
	RecipientCount         string // recipients accepted so far; "0" before DATA
	ClientAddress          string // SMTP client IP address
	ClientName             string // verified client host name, or "unknown"
	ReverseClientName      string // unverified reverse DNS name, or "unknown"
	Instance               string // unique per message delivery attempt
	SASLMethod             string // "PLAIN", "LOGIN", ...; empty when not authenticated
	SASLUsername           string // SASL login name; empty when not authenticated
	SASLSender             string // sender given with MAIL FROM AUTH=
	Size                   string // message size from MAIL FROM SIZE=, or "0"
	CCertSubject           string // TLS client certificate subject
	CCertIssuer            string // TLS client certificate issuer
	CCertFingerprint       string // TLS client certificate fingerprint
	CCertPubkeyFingerprint string // TLS client public key fingerprint
	EncryptionProtocol     string // "TLSv1.3", ...; empty without TLS
	EncryptionCipher       string // TLS cipher name
	EncryptionKeysize      string // TLS cipher key size in bits
	ETRNDomain             string // the ETRN argument
	Stress                 string // "yes" when smtpd is under stress
	PolicyContext          string // the policy_context set in main.cf or master.cf
	ServerAddress          string // IP address the client connected to
	ServerPort             string // port the client connected to
	CompatibilityLevel     string // Postfix compatibility_level
	MailVersion            string // Postfix mail_version
	ClientPort             string // SMTP client port

	Attrs map[string]string // attributes without a named field; nil when none

	// Dropped lists the values ReadRequest removed because they are not
	// well-formed (see ReadRequest); nil when none. Each value is cut to
	// maxDroppedValue bytes, for the log.
	Dropped []DroppedValue
}

// DroppedValue is an attribute value that was not well-formed and was
// removed from its field.
type DroppedValue struct {
	Name  string // the attribute, such as "queue_id"
	Value string // the value as received, cut to 64 bytes
}

// maxDroppedValue bounds the copy of a dropped value kept for the log.
const maxDroppedValue = 64

// Get returns the value of the attribute called name, whether it has a
// named field or is kept in Attrs. It returns "" for an attribute that was
// not sent.
func (r *Request) Get(name string) string {
	if p := r.policyField(name); p != nil {
		return *p
	}
	return r.Attrs[name]
}

// policyField returns the named field for the attribute name, or nil when
// the attribute has none. It is called with a string converted from a byte
// slice; the argument does not escape, so the conversion does not allocate.
func (r *Request) policyField(name string) *string {
	switch name {
	case "request":
		return &r.Request
	case "protocol_state":
		return &r.ProtocolState
	case "protocol_name":
		return &r.ProtocolName
	case "helo_name":
		return &r.HeloName
	case "queue_id":
		return &r.QueueID
	case "sender":
		return &r.Sender
	case "recipient":
		return &r.Recipient
	case "recipient_count":
		return &r.RecipientCount
	case "client_address":
		return &r.ClientAddress
	case "client_name":
		return &r.ClientName
	case "reverse_client_name":
		return &r.ReverseClientName
	case "instance":
		return &r.Instance
	case "sasl_method":
		return &r.SASLMethod
	case "sasl_username":
		return &r.SASLUsername
	case "sasl_sender":
		return &r.SASLSender
	case "size":
		return &r.Size
	case "ccert_subject":
		return &r.CCertSubject
	case "ccert_issuer":
		return &r.CCertIssuer
	case "ccert_fingerprint":
		return &r.CCertFingerprint
	case "ccert_pubkey_fingerprint":
		return &r.CCertPubkeyFingerprint
	case "encryption_protocol":
		return &r.EncryptionProtocol
	case "encryption_cipher":
		return &r.EncryptionCipher
	case "encryption_keysize":
		return &r.EncryptionKeysize
	case "etrn_domain":
		return &r.ETRNDomain
	case "stress":
		return &r.Stress
	case "policy_context":
		return &r.PolicyContext
	case "server_address":
		return &r.ServerAddress
	case "server_port":
		return &r.ServerPort
	case "compatibility_level":
		return &r.CompatibilityLevel
	case "mail_version":
		return &r.MailVersion
	case "client_port":
		return &r.ClientPort
	}
	return nil
}

// Limits bounds what ReadRequest accepts. A zero or negative field means
// the default (DefaultMaxLine, DefaultMaxAttrs, DefaultMaxRequest).
type Limits struct {
	MaxLine    int // bytes in one "name=value" line, without its LF or CRLF
	MaxAttrs   int // attribute lines in one request, duplicates included
	MaxRequest int // bytes in one request, all line terminators included
}

// policyWithDefaults returns l with the zero and negative fields set to
// their defaults.
func (l Limits) policyWithDefaults() Limits {
	if l.MaxLine <= 0 {
		l.MaxLine = DefaultMaxLine
	}
	if l.MaxAttrs <= 0 {
		l.MaxAttrs = DefaultMaxAttrs
	}
	if l.MaxRequest <= 0 {
		l.MaxRequest = DefaultMaxRequest
	}
	return l
}

// ReadRequest reads one policy request from r: "name=value" lines, each
// ended by LF (a CR before the LF is tolerated and removed), and an empty
// line that ends the request.
//
// It returns io.EOF, unwrapped, when r is at its end before the first byte
// of a request: the client closed the connection between requests, which
// is how Postfix ends a policy connection. The end of input inside a
// request is an error wrapping io.ErrUnexpectedEOF. Input that breaks the
// protocol yields an error wrapping ErrMalformed: a line without '=', an
// empty name, a NUL byte anywhere, a name holding a control character or
// invalid UTF-8, and an empty request (an empty line with no attribute
// before it, which Postfix never sends; treating it as an error means a
// stream of empty lines costs the sender its connection at the first one).
// Input past lim yields an error wrapping ErrLineTooLong, ErrTooManyAttrs
// or ErrRequestTooLarge. Errors from r itself, such as a read deadline, are
// returned wrapped. After any error the position of r inside the stream is
// unspecified and the connection should be closed.
//
// A request that ReadRequest returns holds only well-formed values in the
// fields rcptguard keeps or prints: a queue_id, client_address,
// client_name or reverse_client_name that is not well-formed is emptied
// and listed in Request.Dropped (see dropMalformed). That is no error:
// the request is still answered.
//
// ReadRequest never reads much more than lim allows before it fails: a
// line is read through r's buffer with ReadSlice and copied aside only when
// it is longer than the buffer, and only up to lim.MaxLine bytes. Give r a
// buffer of at least lim.MaxLine+2 bytes so that no line is ever copied.
//
// Apart from the Attrs map, which is only made for attributes without a
// named field, the only allocations are the value strings themselves; a
// few values that Postfix repeats in every request ("RCPT", "ESMTPSA",
// "TLSv1.3", ...) are shared constants and cost nothing.
func ReadRequest(r *bufio.Reader, lim Limits) (Request, error) {
	lim = lim.policyWithDefaults()
	var (
		req   Request
		size  int    // bytes of this request read so far
		lines int    // lines read so far, for error messages
		attrs int    // attribute lines read so far
		long  []byte // a line longer than r's buffer, copied aside
	)
	for {
		start := size
		lines++
		line, err := r.ReadSlice('\n')
		size += len(line)
		if err == bufio.ErrBufferFull {
			// The line does not fit r's buffer: collect it, but never more
			// than MaxLine plus a CR, and never past MaxRequest.
			long = long[:0]
			for err == bufio.ErrBufferFull {
				if len(long)+len(line) > lim.MaxLine+1 {
					return Request{}, policyErrorf(ErrLineTooLong, lines, start, "longer than %d bytes", lim.MaxLine)
				}
				if size > lim.MaxRequest {
					return Request{}, policyErrorf(ErrRequestTooLarge, lines, start, "more than %d bytes", lim.MaxRequest)
				}
				long = append(long, line...)
				line, err = r.ReadSlice('\n')
				size += len(line)
			}
			long = append(long, line...)
			line = long
		}
		if size > lim.MaxRequest {
			return Request{}, policyErrorf(ErrRequestTooLarge, lines, start, "more than %d bytes", lim.MaxRequest)
		}
		if err != nil {
			if err == io.EOF {
				if size == 0 {
					return Request{}, io.EOF
				}
				return Request{}, fmt.Errorf("detector: policy request cut off at line %d (byte %d): %w", lines, size, io.ErrUnexpectedEOF)
			}
			return Request{}, fmt.Errorf("detector: reading policy request line %d (byte %d): %w", lines, start, err)
		}

		line = line[:len(line)-1] // the LF
		if n := len(line); n > 0 && line[n-1] == '\r' {
			line = line[:n-1]
		}
		if len(line) > lim.MaxLine {
			return Request{}, policyErrorf(ErrLineTooLong, lines, start, "%d bytes, limit %d", len(line), lim.MaxLine)
		}
		if len(line) == 0 {
			if attrs == 0 {
				return Request{}, policyErrorf(ErrMalformed, lines, start, "empty request")
			}
			req.dropMalformed()
			return req, nil
		}
		attrs++
		if attrs > lim.MaxAttrs {
			return Request{}, policyErrorf(ErrTooManyAttrs, lines, start, "more than %d", lim.MaxAttrs)
		}

		name, value, problem := policySplit(line)
		if problem != "" {
			return Request{}, policyErrorf(ErrMalformed, lines, start, "%s", problem)
		}
		if bytes.IndexByte(value, 0) >= 0 {
			return Request{}, policyErrorf(ErrMalformed, lines, start, "NUL byte in value")
		}
		if p := req.policyField(string(name)); p != nil {
			*p = policyString(value)
			continue
		}
		if req.Attrs == nil {
			req.Attrs = make(map[string]string)
		}
		req.Attrs[string(name)] = string(value)
	}
}

// dropMalformed empties the fields rcptguard keeps (in its memory, its
// logs and its reports) whose values are not well-formed, and lists them
// in r.Dropped:
//   - queue_id: a Postfix queue ID, short or long form (validQueueID);
//   - client_address: an IP address without a zone;
//   - client_name, reverse_client_name: a host name of at most 255 octets
//     (validHostName), or "unknown".
func (r *Request) dropMalformed() {
	check := func(name string, p *string, ok func(string) bool) {
		if *p == "" || ok(*p) {
			return
		}
		r.Dropped = append(r.Dropped, DroppedValue{Name: name, Value: textfmt.Cut(*p, maxDroppedValue)})
		*p = ""
	}
	check("queue_id", &r.QueueID, validQueueID)
	check("client_address", &r.ClientAddress, validIP)
	check("client_name", &r.ClientName, validClientName)
	check("reverse_client_name", &r.ReverseClientName, validClientName)
}

// logDropped logs the values ReadRequest dropped from r, one line each (at
// most four), quoted and cut to 64 bytes.
func (r *Request) logDropped(log *slog.Logger) {
	for _, d := range r.Dropped {
		log.Warn("policy request value dropped: not well-formed", slog.String("attribute", d.Name),
			slog.String("value", strconv.Quote(d.Value)), slog.String("queue_id", r.QueueID),
			slog.String("client", r.ClientAddress))
	}
}

// maxQueueID bounds a queue ID. Postfix's are at most 21 characters short
// (5 hex digits of microseconds and up to 16 of the inode number) and
// about 28 long.
const maxQueueID = 32

// validQueueID reports whether s is a Postfix queue ID (postconf(5),
// enable_long_queue_ids):
//   - short form: 6 or more upper-case hex digits (microseconds in 5 digits,
//     then the inode number);
//   - long form: the time in base 52 (10 or more characters of the
//     alphabet 0-9, B-Z, b-z without vowels), 'z', then the inode number in
//     base 51 (the same alphabet without 'z', one or more characters).
//
// Neither form can start with '-' or need shell quoting.
func validQueueID(s string) bool {
	if len(s) < 6 || len(s) > maxQueueID {
		return false
	}
	hex, vowel := true, false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == 'A' || c == 'E':
			vowel = true
		case '0' <= c && c <= '9' || 'A' <= c && c <= 'F':
		case queueIDChar(c):
			hex = false
		default:
			return false
		}
	}
	if hex {
		return true
	}
	if vowel {
		return false
	}
	sep := strings.LastIndexByte(s, 'z')
	return sep >= 10 && sep < len(s)-1
}

// queueIDChar reports whether c is in the long queue ID alphabet.
func queueIDChar(c byte) bool {
	switch {
	case '0' <= c && c <= '9':
		return true
	case 'A' <= c && c <= 'Z':
		return c != 'A' && c != 'E' && c != 'I' && c != 'O' && c != 'U'
	case 'a' <= c && c <= 'z':
		return c != 'a' && c != 'e' && c != 'i' && c != 'o' && c != 'u'
	}
	return false
}

// validIP reports whether s is an IPv4 or IPv6 address without a zone.
func validIP(s string) bool {
	ip, err := netip.ParseAddr(s)
	return err == nil && ip.Zone() == ""
}

// validClientName reports whether s is "unknown" or a host name
// (validHostName).
func validClientName(s string) bool {
	return s == "unknown" || validHostName(s)
}

// validHostName reports whether s is a DNS host name as Postfix accepts
// one: at most 255 octets, labels of 1 to 63 letters, digits, '-' or '_',
// no label starting or ending with '-', no empty label (so no leading or
// trailing dot).
func validHostName(s string) bool {
	if s == "" || len(s) > 255 {
		return false
	}
	label := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '.':
			if label == 0 || s[i-1] == '-' {
				return false
			}
			label = 0
			continue
		case c == '-':
			if label == 0 {
				return false
			}
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '_':
		default:
			return false
		}
		label++
		if label > 63 {
			return false
		}
	}
	return label > 0 && s[len(s)-1] != '-'
}

// policyErrorf wraps sentinel with the place in the request where the
// problem was found and a detail.
func policyErrorf(sentinel error, line, offset int, format string, args ...any) error {
	return fmt.Errorf("%w: line %d (byte %d): %s", sentinel, line, offset, fmt.Sprintf(format, args...))
}

// policySplit splits a line at its first '=' into the attribute name and
// value, checking the name on the way. It returns what is wrong with the
// line, or "" when nothing is.
func policySplit(line []byte) (name, value []byte, problem string) {
	eq := -1
	ascii := true
	for i, c := range line {
		if c == '=' {
			eq = i
			break
		}
		switch {
		case c == 0:
			return nil, nil, "NUL byte in attribute name"
		case c < 0x20 || c == 0x7f:
			return nil, nil, "control character in attribute name"
		case c >= utf8.RuneSelf:
			ascii = false
		}
	}
	switch {
	case eq < 0:
		return nil, nil, "no '=' in line"
	case eq == 0:
		return nil, nil, "empty attribute name"
	case !ascii && !utf8.Valid(line[:eq]):
		return nil, nil, "attribute name is not valid UTF-8"
	}
	return line[:eq], line[eq+1:], ""
}

// policyString converts a value to a string. Values that Postfix repeats
// in most requests are returned as the one copy in policyValues, without
// allocating (a map index with string(b) does not allocate either).
func policyString(b []byte) string {
	if s, ok := policyValues[string(b)]; ok {
		return s
	}
	return string(b)
}

// policyValues are the values Postfix repeats in most requests, each
// mapped to itself.
var policyValues = func() map[string]string {
	m := map[string]string{}
	for _, v := range []string{
		"smtpd_access_policy", "RCPT", "MAIL", "DATA", "END-OF-MESSAGE", "CONNECT", "EHLO", "HELO",
		"VRFY", "ETRN", "SMTP", "ESMTP", "ESMTPA", "ESMTPS", "ESMTPSA", "LMTP",
		"PLAIN", "LOGIN", "TLSv1.2", "TLSv1.3", "128", "256", "0", "1",
		"25", "465", "587", "yes", "unknown",
	} {
		m[v] = v
	}
	return m
}()

// Action is the answer to a policy request: a Postfix access(5) action
// such as "DUNNO", "OK" or "HOLD rcptguard: user blocked".
type Action string

// ActionDunno lets Postfix carry on with its next restriction. It is the
// answer whenever rcptguard has nothing to say, and when it fails.
const ActionDunno Action = "DUNNO"

// WriteAction writes the answer "action=" + a + "\n\n" to w and flushes it.
//
// CR, LF and NUL in a are replaced by spaces, so that no text put into an
// action (a user name, a reason) can end the answer early or smuggle in a
// second one. An empty action is written as ActionDunno: Postfix has no
// empty action, and failing open is rcptguard's rule.
func WriteAction(w *bufio.Writer, a Action) error {
	if a == "" {
		a = ActionDunno
	}
	_, _ = w.WriteString("action=")
	s := string(a)
	for {
		i := strings.IndexAny(s, "\r\n\x00")
		if i < 0 {
			break
		}
		_, _ = w.WriteString(s[:i])
		_ = w.WriteByte(' ')
		s = s[i+1:]
	}
	_, _ = w.WriteString(s)
	_, _ = w.WriteString("\n\n")
	if err := w.Flush(); err != nil {
		return fmt.Errorf("detector: writing policy answer: %w", err)
	}
	return nil
}
