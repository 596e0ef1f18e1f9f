package blocklist

import (
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/rcptguard/rcptguard/blocklist/identity"
)

// Limits on what an entry may hold.
const (
	// MaxIdentity is the longest identity in bytes, in the stored form as
	// in any other: a 64-byte local part, '@' and a 255-byte domain.
	MaxIdentity = identity.Max
	// MaxText is the longest TEXT in bytes; longer text is cut on write.
	MaxText = 400
	// maxProblemText bounds the copy of a bad line kept in a Problem.
	maxProblemText = 200
)

// Header is the comment written at the top of a file this package creates.
const Header = "# rcptguard blocklist: IDENTITY<TAB>ACTION TEXT; Postfix access(5) table, see `rcptguard list`"

var (
	// ErrInvalidIdentity is wrapped by the errors of [ValidIdentity] and
	// returned (wrapped) by [File.Add] for an unusable identity. It is
	// permanent: retrying does not help.
	ErrInvalidIdentity = errors.New("blocklist: invalid identity")
	// ErrInvalidAction is returned (wrapped) by [File.Add] for an action
	// that is not a Postfix access(5) action word. It is permanent.
	ErrInvalidAction = errors.New("blocklist: invalid action")
)

// Entry is one blocklist entry.
type Entry struct {
	// Identity is the SASL user name or IP address, ASCII letters in lower
	// case (package [identity]).
	Identity string
	// Action is the Postfix access(5) action word in upper case, such as
	// HOLD, REJECT, DEFER or DISCARD, or a 4NN or 5NN reply code.
	Action string
	// Text is the free text after the action; it may be empty.
	Text string
	// Line is the 1-based line of the entry in the file, or 0 for an entry
	// that is not on disk yet.
	Line int
}

// String formats e as a table line, without the line end.
func (e Entry) String() string {
	if e.Text == "" {
		return e.Identity + "\t" + e.Action
	}
	return e.Identity + "\t" + e.Action + " " + e.Text
}

// Problem describes a line of the file that was skipped.
type Problem struct {
	// Line is the 1-based line number.
	Line int
	// Text is the line as found, cut to 200 bytes.
	Text string
	// Err says what is wrong with the line.
	Err string
}

// String formats p for humans, e.g. `line 3: missing action: "bob"`.
func (p Problem) String() string {
	return fmt.Sprintf("line %d: %s: %q", p.Line, p.Err, p.Text)
}

// actions are the Postfix access(5) action words accepted as ACTION, besides
// 4NN and 5NN reply codes.
var actions = map[string]bool{
	"OK": true, "DUNNO": true, "REJECT": true, "DEFER": true,
	"DEFER_IF_REJECT": true, "DEFER_IF_PERMIT": true, "HOLD": true,
	"DISCARD": true, "BCC": true, "FILTER": true, "PREPEND": true,
	"REDIRECT": true, "INFO": true, "WARN": true,
}

// validAction reports whether a (in upper case) is an action word.
func validAction(a string) bool {
	if actions[a] {
		return true
	}
	return len(a) == 3 && (a[0] == '4' || a[0] == '5') && isDigit(a[1]) && isDigit(a[2])
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }

// ValidIdentity returns an error wrapping [ErrInvalidIdentity] unless s can
// be a blocklist identity under the one identity rule (package
// [identity]): not empty, at most [MaxIdentity] bytes, valid UTF-8 without
// white space, control or format characters, no RFC 2047 encoded word, not
// starting with '#'. Case does not matter.
func ValidIdentity(s string) error {
	_, err := canonicalIdentity(s)
	return err
}

// canonicalIdentity checks s and returns its stored form: ASCII letters in
// lower case.
func canonicalIdentity(s string) (string, error) {
	id, err := identity.Canonical(s)
	if err != nil {
		return "", fmt.Errorf("%w: %s", ErrInvalidIdentity, strings.TrimPrefix(err.Error(), identity.ErrInvalid.Error()+": "))
	}
	return id, nil
}

// foldIdentity returns s with ASCII letters in lower case, the form
// identities are stored and looked up in.
func foldIdentity(s string) string { return identity.Fold(s) }

// canonicalAction returns a in upper case, or an error wrapping
// ErrInvalidAction.
func canonicalAction(a string) (string, error) {
	up := strings.ToUpper(a)
	if !validAction(up) {
		if len(a) > 40 {
			a = a[:40] + "..."
		}
		return "", fmt.Errorf("%w: %q is not a Postfix access(5) action", ErrInvalidAction, a)
	}
	return up, nil
}

// sanitizeText makes s safe for one table line: invalid UTF-8 and control
// characters (CR, LF, TAB, NUL, ...) become spaces, the result is cut to
// MaxText bytes on a character boundary and trimmed. It returns s itself
// when nothing changes, and sanitizeText(sanitizeText(s)) ==
// sanitizeText(s).
func sanitizeText(s string) string {
	clean := true
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		if (r == utf8.RuneError && n == 1) || unicode.IsControl(r) {
			clean = false
			break
		}
		i += n
	}
	if !clean {
		var b strings.Builder
		b.Grow(len(s))
		for i := 0; i < len(s); {
			r, n := utf8.DecodeRuneInString(s[i:])
			if (r == utf8.RuneError && n == 1) || unicode.IsControl(r) {
				b.WriteByte(' ')
			} else {
				b.WriteString(s[i : i+n])
			}
			i += n
		}
		s = b.String()
	}
	if len(s) > MaxText {
		cut := MaxText
		for cut > 0 && !utf8.RuneStart(s[cut]) {
			cut--
		}
		s = s[:cut]
	}
	return strings.TrimSpace(s)
}

// isBlank reports whether c is white space in the sense of Postfix table
// files (and of this file format).
func isBlank(c byte) bool {
	return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\v' || c == '\f'
}

// trimBlank removes white space at both ends of s.
func trimBlank(s string) string {
	for len(s) > 0 && isBlank(s[0]) {
		s = s[1:]
	}
	for len(s) > 0 && isBlank(s[len(s)-1]) {
		s = s[:len(s)-1]
	}
	return s
}

// cutBlank splits s at the first run of white space.
func cutBlank(s string) (before, after string, found bool) {
	i := 0
	for i < len(s) && !isBlank(s[i]) {
		i++
	}
	if i == len(s) {
		return s, "", false
	}
	j := i
	for j < len(s) && isBlank(s[j]) {
		j++
	}
	return s[:i], s[j:], true
}

// line is one line of a table file as kept for rewriting.
type line struct {
	// text is the line without its '\n'.
	text string
	// key is the lower-cased first word of a line that looks like an entry,
	// valid or not, and "" for comments, blank lines and continuations. It
	// is what Postfix would look the line up by.
	key string
	// cont marks a line starting with white space, which Postfix joins to
	// the previous line.
	cont bool
}

// document is a parsed table file.
type document struct {
	lines    []line
	entries  []Entry // valid entries in file order, first one per identity
	problems []Problem
}

// parseDocument parses a whole table file. It never fails: bad lines
// become problems.
func parseDocument(s string) document {
	var d document
	n := strings.Count(s, "\n") + 1
	d.lines = make([]line, 0, n)
	d.entries = make([]Entry, 0, n)
	first := make(map[string]int, n) // identity -> line number
	num := 0
	for len(s) > 0 {
		var text string
		if i := strings.IndexByte(s, '\n'); i >= 0 {
			text, s = s[:i], s[i+1:]
		} else {
			text, s = s, ""
		}
		num++
		l, e, problem := parseLine(text)
		d.lines = append(d.lines, l)
		if problem == "" && e.Identity != "" {
			if at, dup := first[e.Identity]; dup {
				problem = "duplicate identity, Postfix uses line " + strconv.Itoa(at)
			} else {
				first[e.Identity] = num
				e.Line = num
				d.entries = append(d.entries, e)
			}
		}
		if problem != "" {
			if len(text) > maxProblemText {
				text = text[:maxProblemText]
			}
			d.problems = append(d.problems, Problem{Line: num, Text: text, Err: problem})
		}
	}
	return d
}

// parseLine classifies one line. A non-empty problem means the line is not
// a usable entry; e.Identity is empty for comments and blank lines.
func parseLine(text string) (l line, e Entry, problem string) {
	l.text = text
	t := trimBlank(text)
	switch {
	case t == "" || t[0] == '#':
		return l, e, ""
	case isBlank(text[0]):
		l.cont = true
		return l, e, "starts with white space (Postfix joins it to the previous line)"
	}
	key, value, sep := cutBlank(t)
	if utf8.ValidString(key) {
		l.key = identity.Fold(key)
	}
	if !sep {
		return l, e, "no TAB or space between identity and action"
	}
	id, err := canonicalIdentity(key)
	if err != nil {
		return l, e, strings.TrimPrefix(err.Error(), "blocklist: ")
	}
	word, rest, _ := cutBlank(value)
	action, err := canonicalAction(word)
	if err != nil {
		return l, e, strings.TrimPrefix(err.Error(), "blocklist: ")
	}
	e = Entry{Identity: id, Action: action, Text: sanitizeText(rest)}
	return l, e, ""
}

// Parse reads a blocklist table from r. It returns the valid entries in
// file order (the first one for an identity that occurs more than once, as
// Postfix does) and one problem for every other line that is neither blank
// nor a comment. The error is only for failing to read r.
func Parse(r io.Reader) ([]Entry, []Problem, error) {
	b, err := io.ReadAll(r)
	if err != nil {
		return nil, nil, fmt.Errorf("blocklist: read: %w", err)
	}
	d := parseDocument(string(b))
	return d.entries, d.problems, nil
}

// op is a change waiting to be written.
type op struct {
	entry  Entry // the entry to add; only Identity is used by a removal
	remove bool
	seq    uint64
	at     time.Time // when it was made
	found  *bool     // for a removal: set when a line was removed from disk
}

// render applies ops (sorted by seq) to d and returns the new file text.
// Adding an identity replaces the first line with its key and deletes the
// others; removing deletes all of them. Continuation lines go with the line
// they continue. New entries are appended at the end, in ops order.
func (d document) render(ops []op, header bool) string {
	want := make(map[string]int, len(ops)) // identity -> index in ops
	for i, o := range ops {
		want[o.entry.Identity] = i
	}
	lines := d.lines
	deleted := make([]bool, len(lines))
	replaced := make(map[int]string)
	seen := make(map[string]bool, len(ops))
	drop := func(i int) {
		deleted[i] = true
		for j := i + 1; j < len(lines) && lines[j].cont; j++ {
			deleted[j] = true
		}
	}
	for i, l := range lines {
		k, ok := want[l.key]
		if l.key == "" || !ok {
			continue
		}
		o := ops[k]
		switch {
		case o.remove:
			if o.found != nil {
				*o.found = true
			}
			drop(i)
		case seen[l.key]:
			drop(i)
		default:
			drop(i)
			deleted[i] = false
			replaced[i] = o.entry.String()
		}
		seen[l.key] = true
	}
	var b strings.Builder
	size := len(Header) + 1
	for _, l := range lines {
		size += len(l.text) + 1
	}
	b.Grow(size + len(ops)*64)
	if header {
		b.WriteString(Header)
		b.WriteByte('\n')
	}
	for i, l := range lines {
		switch {
		case deleted[i]:
		case replaced[i] != "":
			b.WriteString(replaced[i])
			b.WriteByte('\n')
		default:
			b.WriteString(l.text)
			b.WriteByte('\n')
		}
	}
	for _, o := range ops {
		if !o.remove && !seen[o.entry.Identity] {
			b.WriteString(o.entry.String())
			b.WriteByte('\n')
		}
	}
	return b.String()
}
