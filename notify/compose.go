package notify

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net/mail"
	"net/textproto"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/rcptguard/rcptguard/callout/textfmt"
)

// jsonVersion is the "version" of the JSON part. It changes only when a
// field changes meaning or goes away; new fields may be added without it.
const jsonVersion = 1

// jsonReport is the application/json part. Its field names are a stable
// interface, documented in doc.go.
type jsonReport struct {
	Version       int             `json:"version"`
	Kind          string          `json:"kind"`
	Identity      string          `json:"identity"`
	Time          string          `json:"time"`
	Mode          string          `json:"mode"`
	Count         int             `json:"count"`
	Limit         int             `json:"limit"`
	Period        string          `json:"period"`
	PeriodSeconds int64           `json:"period_seconds"`
	Action        string          `json:"action"`
	Hostname      string          `json:"hostname"`
	Clients       []jsonClient    `json:"clients"`
	Recipients    []jsonRecipient `json:"recipients"`
	QueueIDs      []string        `json:"queue_ids"`
	// RetroactiveHold: a follow-up report of kind "held" lists the
	// mail already queued at the block that was held.
	RetroactiveHold bool                `json:"retroactive_hold"`
	Recovered       bool                `json:"recovered,omitempty"`
	BlockedAt       string              `json:"blocked_at"`
	Held            []jsonHeld          `json:"held"`
	HeldCount       int                 `json:"held_count"`
	QueueFS         *jsonQueueFS        `json:"queue_fs"`
	Commands        map[string][]string `json:"commands"`
}

type jsonHeld struct {
	QueueID    string `json:"queue_id"`
	Arrival    string `json:"arrival"`
	Size       int64  `json:"size"`
	Recipients int    `json:"recipients"`
}

type jsonQueueFS struct {
	FreeBytes uint64  `json:"free_bytes"`
	FreeRatio float64 `json:"free_ratio"`
	Low       bool    `json:"low"`
}

type jsonClient struct {
	Address string `json:"address"`
	Name    string `json:"name"`
	Count   int    `json:"count"`
}

type jsonRecipient struct {
	Address string `json:"address"`
	Time    string `json:"time"`
	Reason  string `json:"reason"`
	MX      string `json:"mx"`
	Reply   string `json:"reply"`
}

// Compose builds the report message to the abuse desk: RFC 5322 headers
// and a multipart/mixed body with a text/plain part for people and an
// application/json part (report.json) for ticket systems, CRLF line
// endings, 7-bit clean (quoted-printable bodies, RFC 2047 encoded headers),
// no line longer than 998 octets whatever the report holds.
//
// from is the From address and to the To addresses, each in net/mail
// syntax ("abuse@example.com" or "Abuse Desk <abuse@example.com>"), with
// ASCII addresses. Compose is pure except for a random Message-ID when
// r.MessageID is empty.
func Compose(r Report, from string, to []string) ([]byte, error) {
	if err := r.validate(); err != nil {
		return nil, err
	}
	r.QueueIDs = queueIDs(r.QueueIDs)
	r.Held = heldMessages(r.Held)
	fromAddr, err := parseAddress(from)
	if err != nil {
		return nil, fmt.Errorf("notify: from: %w", err)
	}
	if len(to) == 0 {
		return nil, fmt.Errorf("notify: no To address")
	}
	toAddrs, err := parseAddresses("to", to)
	if err != nil {
		return nil, err
	}
	msgID, err := messageID(r)
	if err != nil {
		return nil, err
	}

	js, err := reportJSON(r)
	if err != nil {
		return nil, err
	}

	var b bytes.Buffer
	writeHead(&b, r.Time, fromAddr, toAddrs, nil, encodeText(subject(r)), msgID)
	writeField(&b, "X-Rcptguard-Kind", string(r.Kind))
	writeField(&b, "X-Rcptguard-Identity", encodeText(clean(r.Identity, maxSubjectID)))
	writeField(&b, "MIME-Version", "1.0")

	mw := multipart.NewWriter(&b)
	if err := mw.SetBoundary(boundary(msgID)); err != nil {
		return nil, fmt.Errorf("notify: boundary: %w", err)
	}
	writeField(&b, "Content-Type", mime.FormatMediaType("multipart/mixed", map[string]string{"boundary": mw.Boundary()}))
	b.WriteString("\r\n")

	if err := writeQPPart(mw, textproto.MIMEHeader{
		"Content-Type":        {"text/plain; charset=utf-8"},
		"Content-Disposition": {"inline"},
	}, []byte(reportText(r))); err != nil {
		return nil, err
	}
	if err := writeQPPart(mw, textproto.MIMEHeader{
		"Content-Type":        {mime.FormatMediaType("application/json", map[string]string{"charset": "utf-8", "name": "report.json"})},
		"Content-Disposition": {mime.FormatMediaType("inline", map[string]string{"filename": "report.json"})},
	}, js); err != nil {
		return nil, err
	}
	if err := mw.Close(); err != nil {
		return nil, fmt.Errorf("notify: compose: %w", err)
	}
	return b.Bytes(), nil
}

// ComposeUserWarning builds the warning to the account holder: a short
// text/plain message in plain words (their account sent mail to many
// addresses that do not exist; change the password if it was not them;
// whom to ask), without technical details or commands. It goes to the
// address r.UserAddress returns and fails when there is none. replyTo,
// when not empty, becomes the Reply-To header (the abuse desk), so that a
// customer's answer reaches people.
func ComposeUserWarning(r Report, from string, replyTo []string) ([]byte, error) {
	if err := r.validate(); err != nil {
		return nil, err
	}
	user, ok := r.UserAddress()
	if !ok {
		return nil, fmt.Errorf("notify: no user warning for a %s report about %q", r.Kind, clean(r.Identity, maxSubjectID))
	}
	fromAddr, err := parseAddress(from)
	if err != nil {
		return nil, fmt.Errorf("notify: from: %w", err)
	}
	replyAddrs, err := parseAddresses("reply-to", replyTo)
	if err != nil {
		return nil, err
	}
	msgID, err := messageID(r)
	if err != nil {
		return nil, err
	}

	var b bytes.Buffer
	writeHead(&b, r.Time, fromAddr, []string{(&mail.Address{Address: user}).String()}, replyAddrs,
		"Your email account sent mail to addresses that do not exist", msgID)
	writeField(&b, "MIME-Version", "1.0")
	writeField(&b, "Content-Type", "text/plain; charset=utf-8")
	writeField(&b, "Content-Transfer-Encoding", "quoted-printable")
	b.WriteString("\r\n")
	qp := quotedprintable.NewWriter(&b)
	if _, err := qp.Write([]byte(userText(r, user, len(replyAddrs) > 0))); err != nil {
		return nil, fmt.Errorf("notify: compose: %w", err)
	}
	if err := qp.Close(); err != nil {
		return nil, fmt.Errorf("notify: compose: %w", err)
	}
	b.WriteString("\r\n")
	return b.Bytes(), nil
}

// writeHead writes the header fields every message starts with; replyTo
// may be empty, subject is already encoded.
func writeHead(b *bytes.Buffer, date time.Time, from *mail.Address, to, replyTo []string, subject, msgID string) {
	writeField(b, "Date", date.Format(time.RFC1123Z))
	writeField(b, "From", from.String())
	writeField(b, "To", strings.Join(to, ", "))
	if len(replyTo) > 0 {
		writeField(b, "Reply-To", strings.Join(replyTo, ", "))
	}
	writeField(b, "Subject", subject)
	writeField(b, "Message-ID", "<"+msgID+">")
	writeField(b, "Auto-Submitted", "auto-generated")
}

// parseAddresses parses the addresses of the header field named what,
// with parseAddress, and returns them formatted.
func parseAddresses(what string, list []string) ([]string, error) {
	out := make([]string, 0, len(list))
	for _, t := range list {
		a, err := parseAddress(t)
		if err != nil {
			return nil, fmt.Errorf("notify: %s: %w", what, err)
		}
		out = append(out, a.String())
	}
	return out, nil
}

// parseAddress parses one net/mail address and insists on an ASCII
// address, so that headers and the SMTP envelope need no SMTPUTF8.
func parseAddress(s string) (*mail.Address, error) {
	a, err := mail.ParseAddress(s)
	if err != nil {
		return nil, fmt.Errorf("%q: %w", clean(s, maxField), err)
	}
	if !isASCII(a.Address) {
		return nil, fmt.Errorf("%q: non-ASCII addresses are not supported", clean(s, maxField))
	}
	if len(a.Address) > 254 {
		return nil, fmt.Errorf("%q: longer than 254 octets (RFC 5321)", clean(s, maxField))
	}
	return a, nil
}

// messageID returns r.MessageID, checked, or a new random ID at r's host.
func messageID(r Report) (string, error) {
	if r.MessageID != "" {
		id := r.MessageID
		left, right, ok := strings.Cut(id, "@")
		if !ok || left == "" || right == "" || len(id) > 250 || strings.ContainsAny(id, "<>()[]\\,;:\" ") || !isASCII(id) || !isClean(id) {
			return "", fmt.Errorf("notify: bad Message-ID %q", clean(id, maxField))
		}
		return id, nil
	}
	return newMessageID(r.Hostname), nil
}

// boundary derives the MIME boundary from the Message-ID, so that a fixed
// Message-ID gives identical bytes. "=_" cannot occur in quoted-printable
// or base64 text, so the boundary never collides with a part's content.
func boundary(msgID string) string {
	sum := sha256.Sum256([]byte(msgID))
	return "=_rcptguard_" + hex.EncodeToString(sum[:12])
}

// writeQPPart adds a quoted-printable encoded part.
func writeQPPart(mw *multipart.Writer, h textproto.MIMEHeader, body []byte) error {
	h.Set("Content-Transfer-Encoding", "quoted-printable")
	w, err := mw.CreatePart(h)
	if err != nil {
		return fmt.Errorf("notify: compose: %w", err)
	}
	qp := quotedprintable.NewWriter(w)
	if _, err := qp.Write(body); err != nil {
		return fmt.Errorf("notify: compose: %w", err)
	}
	if err := qp.Close(); err != nil {
		return fmt.Errorf("notify: compose: %w", err)
	}
	return nil
}

// writeField writes one header field, folded at spaces so that lines stay
// within 78 octets where the value allows it. value must hold no CR or LF
// and be ASCII; the callers cut untrusted parts short, so no line comes
// near 998 octets.
func writeField(b *bytes.Buffer, name, value string) {
	b.WriteString(name)
	b.WriteByte(':')
	n := len(name) + 1
	for i, w := range strings.Split(value, " ") {
		if i > 0 && w != "" && n > len(name)+1 && n+1+len(w) > 78 {
			b.WriteString("\r\n")
			n = 0
		}
		b.WriteByte(' ')
		b.WriteString(w)
		n += 1 + len(w)
	}
	b.WriteString("\r\n")
}

// encodeText prepares unstructured header text: as it is when it is
// ASCII, else as RFC 2047 Q-encoded words (split at 75 characters, so
// writeField can fold between them).
func encodeText(s string) string {
	if isASCII(s) {
		return s
	}
	return mime.QEncoding.Encode("utf-8", s)
}

// subject is the Subject of a report, the identity cut short.
func subject(r Report) string {
	id := clean(r.Identity, maxSubjectID)
	switch r.Kind {
	case KindBlock:
		if r.Recovered {
			return fmt.Sprintf("[rcptguard] blocked %s (report recovered at start-up)", id)
		}
		return fmt.Sprintf("[rcptguard] blocked %s: %d invalid recipients in %s", id, r.Count, textfmt.FormatPeriod(r.Period))
	case KindWouldBlock:
		return fmt.Sprintf("[rcptguard] would block %s: %d invalid recipients in %s", id, r.Count, textfmt.FormatPeriod(r.Period))
	case KindHeld:
		return fmt.Sprintf("[rcptguard] held %s already queued of %s", plural(heldCount(r), "message", "messages"), id)
	default:
		return fmt.Sprintf("[rcptguard] warning %s: %d of %d", id, r.Count, r.Limit)
	}
}

// reportJSON renders the application/json part.
func reportJSON(r Report) ([]byte, error) {
	j := jsonReport{
		Version:       jsonVersion,
		Kind:          string(r.Kind),
		Identity:      strings.ToValidUTF8(r.Identity, "\uFFFD"),
		Time:          r.Time.Format(time.RFC3339),
		Mode:          field(r.Mode),
		Count:         r.Count,
		Limit:         r.Limit,
		Period:        textfmt.FormatPeriod(r.Period),
		PeriodSeconds: int64(r.Period / time.Second),
		Action:        field(r.Action),
		Hostname:      field(r.Hostname),
		Clients:       []jsonClient{},
		Recipients:    []jsonRecipient{},
		QueueIDs:      []string{},

		RetroactiveHold: r.RetroactiveHold,
		Recovered:       r.Recovered,
		Held:            []jsonHeld{},
		HeldCount:       heldCount(r),
		Commands:        map[string][]string{},
	}
	if !r.BlockTime.IsZero() {
		j.BlockedAt = r.BlockTime.Format(time.RFC3339)
	}
	for _, h := range head(r.Held, MaxQueueIDs) {
		j.Held = append(j.Held, jsonHeld{QueueID: h.QueueID, Arrival: timeOrEmpty(h.Arrival), Size: h.Size, Recipients: h.Recipients})
	}
	if q := r.QueueSpace; q != nil {
		j.QueueFS = &jsonQueueFS{FreeBytes: q.FreeBytes, FreeRatio: math.Round(q.FreeRatio*1e4) / 1e4, Low: q.Low}
	}
	for name, argv := range commands(r) {
		j.Commands[name] = argv
	}
	for _, c := range head(r.Clients, MaxClients) {
		j.Clients = append(j.Clients, jsonClient{Address: field(c.Address), Name: field(c.Name), Count: c.Count})
	}
	for _, rc := range head(r.Recipients, MaxRecipients) {
		j.Recipients = append(j.Recipients, jsonRecipient{Address: field(rc.Address), Time: timeOrEmpty(rc.Time), Reason: field(rc.Reason), MX: field(rc.MX), Reply: field(rc.Reply)})
	}
	for _, q := range head(r.QueueIDs, MaxQueueIDs) {
		j.QueueIDs = append(j.QueueIDs, field(q))
	}
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(j); err != nil {
		return nil, fmt.Errorf("notify: json: %w", err)
	}
	return b.Bytes(), nil
}

func timeOrEmpty(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.Format(time.RFC3339)
}

// field is an untrusted value for the JSON part: valid UTF-8, at most
// maxField runes. JSON escapes control characters itself.
func field(s string) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	if utf8.RuneCountInString(s) > maxField {
		s = string([]rune(s)[:maxField]) + "..."
	}
	return s
}

func head[T any](s []T, n int) []T {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// textWriter builds a text body: lines end in "\n" (the quoted-printable
// encoder turns them into CRLF), prose is wrapped at 72 columns.
type textWriter struct {
	strings.Builder
}

// para writes a paragraph wrapped at 72 columns, then an empty line.
func (w *textWriter) para(format string, args ...any) {
	w.wrapped(fmt.Sprintf(format, args...), "")
	w.WriteString("\n")
}

// step writes a numbered paragraph, its lines after the first indented
// under the text, then an empty line.
func (w *textWriter) step(n int, format string, args ...any) {
	w.wrapped(strconv.Itoa(n)+". "+fmt.Sprintf(format, args...), "   ")
	w.WriteString("\n")
}

// wrapped writes s wrapped at 72 columns; lines after the first are
// indented by indent. A word longer than a line stands on its own line
// (quoted-printable soft breaks keep the encoded lines short).
func (w *textWriter) wrapped(s, indent string) {
	n := 0
	for i, word := range strings.Fields(s) {
		l := utf8.RuneCountInString(word)
		if i > 0 {
			if n+1+l > 72 {
				w.WriteString("\n" + indent)
				n = utf8.RuneCountInString(indent)
			} else {
				w.WriteString(" ")
				n++
			}
		}
		w.WriteString(word)
		n += l
	}
	w.WriteString("\n")
}

// line writes one line as it is.
func (w *textWriter) line(format string, args ...any) {
	fmt.Fprintf(&w.Builder, format, args...)
	w.WriteString("\n")
}

// fact writes a "Label: value" line with values aligned at column 13.
func (w *textWriter) fact(label, value string) {
	w.line("%-12s %s", label+":", value)
}

// plural writes n and the noun, in the singular for 1.
func plural(n int, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return strconv.Itoa(n) + " " + many
}

// reportText is the text/plain part of an abuse desk report.
func reportText(r Report) string {
	var w textWriter
	id := clean(r.Identity, maxIdentity)
	who := "the account " + id
	if isIP(r.Identity) {
		who = "the client address " + id
	}
	reportIntro(&w, r, who)
	reportFacts(&w, r, id)
	if q := r.QueueSpace; q != nil && q.Low {
		w.para("WARNING: Postfix's queue file system is nearly full: %s free (%.1f%%). Held mail stays on it until it is released or deleted, and when it is full Postfix takes no mail at all. Delete held spam soon (rcptguard purge, below).",
			humanBytes(q.FreeBytes), q.FreeRatio*100)
	}
	if r.Kind == KindHeld {
		writeHeld(&w, r)
	} else {
		writeEvidence(&w, r)
	}
	reportTodo(&w, r)
	return w.String()
}

// reportIntro writes the paragraphs that say what happened to who.
func reportIntro(w *textWriter, r Report, who string) {
	tried := fmt.Sprintf("In the last %s it sent mail to %s that do not exist", humanPeriod(r.Period), plural(r.Count, "address", "addresses"))
	switch r.Kind {
	case KindBlock:
		w.para("rcptguard blocked %s.", who)
		if r.Recovered {
			w.para("rcptguard found this block on its blocklist when it started, without a report: it stopped after writing the block and before the report was spooled. The counts, client addresses and recipients were kept in memory only and are lost; the blocklist entry says: %s", clean(r.Action, maxField))
			w.para("Postfix holds its mail: nothing of it is delivered, and nothing is lost, until you release or delete it.")
			return
		}
		w.para("%s; its limit is %d. From now on Postfix holds its mail: nothing of it is delivered, and nothing is lost, until you release or delete it.", tried, r.Limit)
	case KindWouldBlock:
		w.para("rcptguard would have blocked %s, but it runs in monitor mode: nothing was blocked and its mail is delivered as before.", who)
		w.para("%s; its limit is %d.", tried, r.Limit)
	case KindWarning:
		w.para("Warning: %s is close to its limit.", who)
		then := "it will be blocked"
		if r.Mode == "monitor" {
			then = "it would be blocked, but rcptguard runs in monitor mode and blocks nothing"
		}
		w.para("%s. Once it passes %d, %s.", tried, r.Limit, then)
	case KindHeld:
		w.para("rcptguard held %s of %s that Postfix had accepted before the block and that still waited in its queue.", plural(heldCount(r), "message", "messages"), who)
		w.para("Postfix holds them now, with the mail held since the block: nothing of it is delivered, and nothing is lost, until you release or delete it.")
	}

}

// reportFacts writes the "Name: value" lines of the report.
func reportFacts(w *textWriter, r Report, id string) {
	w.fact("Identity", id)
	w.fact("Time", r.Time.Format(time.RFC3339))
	w.fact("Local time", r.Time.Format("Monday 2 January 2006, 15:04:05 MST"))
	if r.Kind == KindHeld {
		if !r.BlockTime.IsZero() {
			w.fact("Blocked at", r.BlockTime.In(r.Time.Location()).Format(time.RFC3339))
		}
		var rcpts int
		var size int64
		for _, h := range r.Held {
			rcpts += h.Recipients
			size += h.Size
		}
		w.fact("Held", fmt.Sprintf("%s, %s, %s", plural(heldCount(r), "message", "messages"), plural(rcpts, "recipient", "recipients"), plural(int(min(size, 1<<62)), "byte", "bytes")))
	} else {
		w.fact("Mode", clean(r.Mode, maxField))
		w.fact("Count", plural(r.Count, "invalid recipient", "invalid recipients"))
		w.fact("Limit", plural(r.Limit, "invalid recipient", "invalid recipients"))
		w.fact("Window", textfmt.FormatPeriod(r.Period))
	}
	switch {
	case r.Action == "":
	case r.Kind == KindWouldBlock:
		w.fact("Action", clean(r.Action, maxField)+" (not applied: monitor mode)")
	default:
		w.fact("Action", clean(r.Action, maxField))
	}
	if r.Hostname != "" {
		w.fact("Server", clean(r.Hostname, maxField))
	}
	w.line("")

}

// reportTodo writes what to do, with the commands.
func reportTodo(w *textWriter, r Report) {
	w.line("What to do")
	w.line("")
	if !isClean(r.Identity) {
		w.para("The identity holds control characters or invalid UTF-8, shown escaped above, so no command can name it here. Its exact bytes are in the JSON part (report.json).")
		writeHoldCommands(w, r, 1, "")
		return
	}
	safe := "Make sure the account is safe again: most likely someone else knows its password, so change it."
	check := "Check whether the account is compromised; if so, change its password."
	if isIP(r.Identity) {
		safe = "Find out what on that machine sends this mail (a compromised web form, script or PC) and stop it."
		check = "Check what on that machine sends this mail (a compromised web form, script or PC)."
	}
	cmds := commands(r)
	switch r.Kind {
	case KindBlock, KindHeld:
		w.step(1, "%s", safe)
		if isIP(r.Identity) {
			w.step(2, "Unblock it, so that its new mail flows again:")
			w.line("   %s", shellLine(cmds["unblock"]))
			w.line("")
			writeHoldCommands(w, r, 3, shellQuote(r.Identity))
			return
		}
		writeQueueCommands(w, cmds, 2)
		w.step(5, "Once the account is safe, unblock it, so that its new mail flows again (release does this itself):")
		w.line("   %s", shellLine(cmds["unblock"]))
		w.line("")
	default:
		w.step(1, "%s", check)
		w.step(2, "To block it now by hand:")
		w.line("   %s", shellLine(cmds["block"]))
		w.line("")
		if len(r.QueueIDs) > 0 {
			if isIP(r.Identity) {
				writeHoldCommands(w, r, 3, shellQuote(r.Identity))
			} else {
				writeQueueCommands(w, cmds, 3)
			}
		}
	}
}

// writeEvidence writes the clients, the invalid recipients and the queue
// IDs answered HOLD of a block, would-block or warning report.
func writeEvidence(w *textWriter, r Report) {
	clients := head(r.Clients, MaxClients)
	if len(clients) == 0 {
		w.para("No client address was recorded.")
	} else {
		w.line("Client addresses seen (%d):", len(r.Clients))
		for _, c := range clients {
			name := clean(c.Name, maxField)
			if name == "" || strings.EqualFold(name, "unknown") {
				name = "no reverse name"
			} else {
				name = "reverse name " + name
			}
			w.line("- %s, %s, %s", clean(c.Address, maxField), name, plural(c.Count, "request", "requests"))
		}
		if len(r.Clients) > len(clients) {
			w.line("(%d more not shown)", len(r.Clients)-len(clients))
		}
		w.line("")
	}

	rcpts := head(r.Recipients, MaxRecipients)
	if len(rcpts) == 0 {
		w.para("No invalid recipient was recorded.")
	} else {
		w.line("Invalid recipients, most recent first (%d shown of %d):", len(rcpts), max(r.Count, len(rcpts)))
		for _, rc := range rcpts {
			var about []string
			if rc.Reason != "" {
				about = append(about, clean(rc.Reason, maxField))
			}
			if !rc.Time.IsZero() {
				about = append(about, rc.Time.In(r.Time.Location()).Format(time.RFC3339))
			}
			item := "- " + clean(rc.Address, maxField)
			if len(about) > 0 {
				item += " (" + strings.Join(about, ", ") + ")"
			}
			w.line("%s", item)
			switch {
			case rc.MX != "" && rc.Reply != "":
				w.line("  %s replied: %s", clean(rc.MX, maxField), clean(rc.Reply, maxField))
			case rc.MX != "":
				w.line("  MX host: %s", clean(rc.MX, maxField))
			case rc.Reply != "":
				w.line("  Reply: %s", clean(rc.Reply, maxField))
			}
		}
		w.line("")
	}

	qids := head(r.QueueIDs, MaxQueueIDs)
	if len(qids) == 0 {
		if r.Kind == KindBlock {
			w.para("No message has been held yet.")
		}
	} else {
		w.line("Messages held, by Postfix queue ID (%d):", len(r.QueueIDs))
		for _, q := range qids {
			w.line("- %s", clean(q, maxField))
		}
		if len(r.QueueIDs) > len(qids) {
			w.line("(%d more not shown)", len(r.QueueIDs)-len(qids))
		}
		w.line("")
	}
	if r.Kind == KindBlock && r.RetroactiveHold {
		w.para("Its mail accepted before the block and still in Postfix's queue (often deferred by the receiving servers) is being held too; a follow-up report lists it, if there was any.")
	}
}

// writeHeld writes the list of a KindHeld report.
func writeHeld(w *textWriter, r Report) {
	held := head(r.Held, MaxQueueIDs)
	if len(held) == 0 {
		w.para("No message was held.")
		return
	}
	w.line("Held retroactively, by Postfix queue ID (%d):", heldCount(r))
	for _, h := range held {
		arrived := "arrival unknown"
		if !h.Arrival.IsZero() {
			arrived = "arrived " + h.Arrival.In(r.Time.Location()).Format(time.RFC3339)
		}
		w.line("- %s, %s, %s, %s", h.QueueID, arrived, plural(h.Recipients, "recipient", "recipients"), plural(int(min(h.Size, 1<<62)), "byte", "bytes"))
	}
	if n := heldCount(r); n > len(held) {
		w.line("(%d more not shown)", n-len(held))
	}
	w.line("")
}

// writeQueueCommands writes steps step to step+2: list the identity's
// held mail, release it or delete it, with rcptguard's own commands,
// which find the mail by the SASL login Postfix recorded in each queue
// file (not by the envelope sender, which the sender chooses).
func writeQueueCommands(w *textWriter, cmds map[string][]string, step int) {
	w.step(step, "See what Postfix holds of it, as root: each held message with its queue ID, age, size, recipients and subject (postcat -vq QUEUEID shows one):")
	w.line("   %s", shellLine(cmds["held"]))
	w.line("")
	w.step(step+1, "If the mail is legitimate, unblock the account and release its held mail, which Postfix then delivers. With -n first: it lists what it would release and changes nothing.")
	w.line("   %s", shellLine(cmds["release_dry_run"]))
	w.line("   %s", shellLine(cmds["release"]))
	w.line("")
	w.step(step+2, "If it is spam, delete its held mail; the account stays blocked. Again with -n first.")
	w.line("   %s", shellLine(cmds["purge_dry_run"]))
	w.line("   %s", shellLine(cmds["purge"]))
	w.line("")
}

// commands returns the rcptguard commands of the report, by name, as
// argument vectors: "unblock", "held", "release_dry_run", "release",
// "purge_dry_run", "purge" after a block and in a held report; "block"
// after a warning (and the others when mail was held already). The identity is the last argument, after "--" when it starts
// with '-'. Only "unblock" or "block" for a client IP address (its mail
// has no SASL login to find it by); none when the identity holds
// characters clean would escape.
func commands(r Report) map[string][]string {
	if !isClean(r.Identity) {
		return nil
	}
	cmd := func(words ...string) []string {
		argv := append([]string{"rcptguard"}, words...)
		if strings.HasPrefix(r.Identity, "-") {
			argv = append(argv, "--")
		}
		return append(argv, r.Identity)
	}
	m := map[string][]string{}
	switch r.Kind {
	case KindBlock, KindHeld:
		m["unblock"] = cmd("unblock")
	default:
		m["block"] = cmd("block")
	}
	if isIP(r.Identity) {
		return m
	}
	if r.Kind == KindBlock || r.Kind == KindHeld || len(r.QueueIDs) > 0 {
		m["held"] = cmd("held")
		m["release_dry_run"] = cmd("release", "-n")
		m["release"] = cmd("release")
		m["purge_dry_run"] = cmd("purge", "-n")
		m["purge"] = cmd("purge")
	}
	return m
}

// shellLine writes an argument vector from commands as a line to paste:
// the fixed words as they are (none needs quoting), then the identity,
// always last, through rcptguardArg (quoted, after "--" when it starts
// with '-').
func shellLine(argv []string) string {
	if len(argv) < 2 {
		return ""
	}
	words := argv[:len(argv)-1]
	if words[len(words)-1] == "--" {
		words = words[:len(words)-1]
	}
	return strings.Join(words, " ") + " " + rcptguardArg(argv[len(argv)-1])
}

// heldCount is how many messages a KindHeld report says were held.
func heldCount(r Report) int {
	return max(r.HeldCount, len(r.Held))
}

// heldMessages returns held without the entries whose queue ID is not a
// Postfix queue ID, like queueIDs.
func heldMessages(held []HeldMessage) []HeldMessage {
	var out []HeldMessage
	for _, h := range held {
		if validQueueID(h.QueueID) {
			out = append(out, h)
		}
	}
	return out
}

// humanBytes writes a byte count in binary units: "512 B", "3.4 MiB".
func humanBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// writeHoldCommands writes the steps for held mail by queue ID, for an
// identity rcptguard's own commands cannot find the mail of: a client IP
// address (no SASL login in its queue files) or one no command can name.
// arg is the shell quoted identity, "" when no command may name it.
func writeHoldCommands(w *textWriter, r Report, step int, arg string) {
	qids := head(r.QueueIDs, MaxQueueIDs)
	if r.Kind == KindHeld {
		qids = nil
		for _, h := range head(r.Held, MaxQueueIDs) {
			qids = append(qids, h.QueueID)
		}
	}
	if len(qids) == 0 && r.Kind != KindBlock && r.Kind != KindHeld {
		return
	}
	w.step(step, "Look at the held mail, then release what is legitimate (Postfix delivers it) and delete the rest.")
	w.line("   List everything in the hold queue, with each message's sender:")
	w.line(`   postqueue -j | jq -r 'select(.queue_name == "hold") | "\(.queue_id) \(.sender)"'`)
	w.line("")
	w.line("   Show one message:")
	w.line("   postcat -vq QUEUEID")
	w.line("")
	if len(qids) == 0 {
		w.line("   Release one message:")
		w.line("   postsuper -H QUEUEID")
		w.line("")
		w.line("   Delete one message:")
		w.line("   postsuper -d QUEUEID")
		w.line("")
		return
	}
	w.line("   Release the held messages listed above:")
	for _, q := range qids {
		w.line("   postsuper -H %s", shellQuote(q))
	}
	w.line("")
	w.line("   Or delete them:")
	for _, q := range qids {
		w.line("   postsuper -d %s", shellQuote(q))
	}
	w.line("")
}

// userText is the body of the warning to the account holder.
func userText(r Report, user string, canReply bool) string {
	var w textWriter
	w.para("Hello,")
	w.para("This is an automatic message about your email account %s.", user)
	w.para("In the last %s, your account sent mail to %s that do not exist. People rarely do that by mistake. Most often it means that someone else knows your password and uses your account to send unwanted mail.",
		humanPeriod(r.Period), plural(r.Count, "address", "addresses"))
	w.para("If you did not send this mail, please change your password now.")
	w.para("If you did send it, for example to an old list of addresses, please remove the addresses that no longer work.")
	if r.Mode != "monitor" {
		w.para("If this goes on, your account will be stopped from sending mail, to protect you and the people you write to.")
	}
	if canReply {
		w.para("If you have questions, please reply to this message or contact our support.")
	} else {
		w.para("If you have questions, please contact our support.")
	}
	w.line("Thank you.")
	return w.String()
}
