package queue

import (
	"bytes"
	"errors"
	"fmt"
	"mime"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Errors of the postcat parsers. A queue file that gives one of them
// belongs to nobody: it is never held, released or deleted by identity.
var (
	// ErrNotEnvelope: the output does not start with the envelope of the
	// expected queue file.
	ErrNotEnvelope = errors.New("queue: not the envelope of the expected queue file")
	// ErrTruncated: the output ended before the sender record.
	ErrTruncated = errors.New("queue: envelope ends before its sender record")
	// ErrAmbiguous: more than one sasl_username, or one after the
	// sender record, where a sender's own text could have put it.
	ErrAmbiguous = errors.New("queue: ambiguous sasl_username in the envelope")
	// ErrBadIdentity: the sasl_username is empty or holds white space or
	// control characters.
	ErrBadIdentity = errors.New("queue: unusable sasl_username")
)

// Envelope is what rcptguard takes from a queue file's envelope.
type Envelope struct {
	Queue string // "incoming", "active", "deferred", "hold", ...
	ID    string
	// Identity is the SASL login that submitted the message, "" when
	// the message was not submitted with SASL authentication.
	Identity string
}

// maxLine bounds one line of postcat output that the parsers look at.
const maxLine = 4096

// queueNames are the queues whose files postcat -q finds.
var queueNames = []string{"incoming", "active", "deferred", "hold", "maildrop", "corrupt"}

const (
	envelopeStart = "*** ENVELOPE RECORDS "
	contentStart  = "*** MESSAGE CONTENTS "
	saslAttr      = "named_attribute: sasl_username="
	senderRecord  = "sender:"
)

// ParseEnvelope reads the output of "postcat -e -q ID" for the queue file
// id and returns whose message it is.
//
// smtpd writes the sasl_username attribute before the sender record, and
// nothing a client chooses (sender, HELO name, ENVID, recipients, header
// lines) precedes the sender record. So the identity is taken only from
// the lines before the first "sender:" line, and must appear there once:
// a second sasl_username anywhere in out — which a crafted sender with a
// line break, or anything else that makes postcat print more than it
// should, could produce — makes the file ambiguous. out may be a prefix
// of postcat's output (bounded read); it must reach the sender record.
func ParseEnvelope(out []byte, id string) (Envelope, error) {
	var env Envelope
	first, rest, _ := bytes.Cut(out, []byte("\n"))
	path, ok := strings.CutPrefix(string(first), envelopeStart)
	if !ok {
		return env, ErrNotEnvelope
	}
	path, ok = strings.CutSuffix(path, " ***")
	if !ok {
		return env, ErrNotEnvelope
	}
	// The path is QUEUE/ID or QUEUE/H/ID (hashed queue directories).
	parts := strings.Split(path, "/")
	if len(parts) < 2 || len(parts) > 4 || parts[len(parts)-1] != id || !ValidID(id) {
		return env, ErrNotEnvelope
	}
	env.Queue, env.ID = parts[0], id
	if !knownQueue(env.Queue) {
		return env, ErrNotEnvelope
	}
	seen, sender := 0, false
	for len(rest) > 0 {
		var line []byte
		line, rest, _ = bytes.Cut(rest, []byte("\n"))
		if len(line) > maxLine {
			line = line[:maxLine]
		}
		s := string(line)
		switch {
		case strings.HasPrefix(s, saslAttr):
			seen++
			if sender || seen > 1 {
				return env, ErrAmbiguous
			}
			env.Identity = s[len(saslAttr):]
		case !sender && strings.HasPrefix(s, senderRecord):
			sender = true
		case !sender && strings.HasPrefix(s, contentStart):
			// An envelope without a sender record is not one smtpd or
			// pickup wrote.
			return env, ErrTruncated
		}
	}
	if !sender {
		return env, ErrTruncated
	}
	if seen == 1 && !validIdentity(env.Identity) {
		return env, ErrBadIdentity
	}
	return env, nil
}

func knownQueue(q string) bool {
	for _, n := range queueNames {
		if q == n {
			return true
		}
	}
	return false
}

// validIdentity accepts a SASL login rcptguard can block: not empty, at
// most 255 bytes of valid UTF-8 without white space, control or format
// characters.
func validIdentity(s string) bool {
	if s == "" || len(s) > 255 || !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if unicode.IsSpace(r) || unicode.IsControl(r) || unicode.Is(unicode.Cf, r) || r == '\u2028' || r == '\u2029' {
			return false
		}
	}
	return true
}

// ParseSubject returns the decoded Subject of the header that "postcat -h
// -q ID" printed (out may be a prefix of it), "" when there is none.
// The result is raw: print it through [Printable].
func ParseSubject(out []byte) string {
	var subject []byte
	in := false
	for len(out) > 0 {
		var line []byte
		line, out, _ = bytes.Cut(out, []byte("\n"))
		line = bytes.TrimSuffix(line, []byte("\r"))
		if len(line) == 0 {
			break // end of the header
		}
		if line[0] == ' ' || line[0] == '\t' {
			if in && len(subject) < maxLine {
				subject = append(subject, line...)
			}
			continue
		}
		if in {
			break
		}
		name, value, ok := bytes.Cut(line, []byte(":"))
		if ok && strings.EqualFold(string(name), "Subject") {
			in = true
			subject = append(subject, value...)
		}
	}
	if len(subject) > maxLine {
		subject = subject[:maxLine]
	}
	s := strings.TrimSpace(string(subject))
	if dec, err := new(mime.WordDecoder).DecodeHeader(s); err == nil {
		s = dec
	}
	return s
}

// Printable makes s safe to print on a terminal or in a log line: control
// and format characters (escape sequences, bidirectional overrides, line
// separators) and invalid UTF-8 become '?', and the result is cut to max
// runes, with "…" when cut.
func Printable(s string, max int) string { return printable(s, max) }

func printable(s string, max int) string {
	var b strings.Builder
	n := 0
	for i := 0; i < len(s); {
		if n == max {
			b.WriteString("…")
			break
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		i += size
		switch {
		case r == utf8.RuneError && size == 1, unicode.IsControl(r), unicode.Is(unicode.Cf, r), r == '\u2028', r == '\u2029':
			b.WriteByte('?')
		default:
			b.WriteRune(r)
		}
		n++
	}
	return b.String()
}

// describe formats an error about queue file id for a log or terminal.
func describe(id string, err error) error {
	return fmt.Errorf("queue file %s: %w", printable(id, MaxIDLen), err)
}
