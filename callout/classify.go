package callout

import (
	"errors"
	"net/textproto"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/emersion/go-smtp"
)

// Stage is the point of the SMTP dialogue a reply answered.
type Stage string

// The stages of a probe, in order.
const (
	StageConnect Stage = "connect" // the greeting banner
	StageHelo    Stage = "helo"    // EHLO/HELO (and STARTTLS)
	StageMail    Stage = "mail"    // MAIL FROM
	StageRcpt    Stage = "rcpt"    // RCPT TO
)

// classify turns the reply to one stage of a probe into a verdict.
//
// Only a reply to RCPT TO can be a verdict on the mailbox. At the other
// stages callers classify failures only: a 4xx or 5xx at connect or
// EHLO gives (StatusUnknown, ReasonSessionRefused), at MAIL FROM
// (StatusUnknown, ReasonMailFromRefused). A 2xx there is not a verdict,
// and any other code is not SMTP; both give (StatusUnknown,
// ReasonProtocol).
//
// At RCPT TO, 2xx is (StatusValid, ReasonAccepted) and 4xx is
// (StatusUnknown, ReasonTemporary). A 5xx is (StatusInvalid,
// ReasonNoMailbox) only on positive evidence that the mailbox does not
// exist: an enhanced code of 5.1.1, 5.1.2, 5.1.3, 5.1.6 or 5.1.10, or no
// enhanced code (or 5.0.0) and text that says so, or Microsoft 365's
// directory-based edge blocking (5.4.1 "Access denied" AS(201806281)). A
// text that mentions a policy, a block list, reputation and the like
// overrides the code: servers use 5.1.1 for policy refusals too. Every other
// 5xx is (StatusUnknown, ReasonRejected). An invalid verdict counts against
// the sender, so when in doubt the answer is unknown.
func classify(stage Stage, r Reply) (Status, Reason) {
	class := r.Code / 100
	if r.Code < 100 || r.Code > 599 {
		class = 0
	}
	switch stage {
	case StageConnect, StageHelo:
		if class == 4 || class == 5 {
			return StatusUnknown, ReasonSessionRefused
		}
		return StatusUnknown, ReasonProtocol
	case StageMail:
		if class == 4 || class == 5 {
			return StatusUnknown, ReasonMailFromRefused
		}
		return StatusUnknown, ReasonProtocol
	case StageRcpt:
	default:
		return StatusUnknown, ReasonProtocol
	}
	switch class {
	case 2:
		return StatusValid, ReasonAccepted
	case 4:
		return StatusUnknown, ReasonTemporary
	case 5:
		if classifyNoMailbox(r) {
			return StatusInvalid, ReasonNoMailbox
		}
		return StatusUnknown, ReasonRejected
	}
	return StatusUnknown, ReasonProtocol
}

// classifyNoMailboxCodes are the RFC 3463 enhanced codes that say the
// recipient address does not exist: 5.1.1 bad destination mailbox,
// 5.1.2 bad destination system, 5.1.3 bad destination mailbox syntax,
// 5.1.6 mailbox has moved (no forwarding address) and 5.1.10 recipient
// address has null MX (RFC 7505; Microsoft also uses it for
// RecipientNotFound).
var classifyNoMailboxCodes = [...][3]int{
	{5, 1, 1},
	{5, 1, 2},
	{5, 1, 3},
	{5, 1, 6},
	{5, 1, 10},
}

// classifyNoMailboxPhrases are texts (lower case) of servers that give no
// enhanced code and say the mailbox does not exist.
var classifyNoMailboxPhrases = []string{
	"user unknown", // Postfix, Sendmail, many others
	"unknown user",
	"no such user",
	"no such mailbox",
	"no such recipient",
	"no such account",
	"no such address",
	"recipient unknown",
	"unknown recipient",
	"recipient not found",
	"user not found",
	"mailbox not found",
	"mailbox unknown",
	"unknown mailbox",
	"does not exist", // also "mailbox/account/user does not exist"
	"doesn't exist",
	"invalid recipient",
	"invalid mailbox",
	"not a valid mailbox",
	"unrouteable address",          // Exim
	"unknown local part",           // Exim
	"unknown local-part",           // Exim
	"no mailbox here by that name", // qmail
	"this user doesn't have a",     // Yahoo: "... doesn't have a yahoo.com account"
}

// classifyPolicyWords are texts (lower case) that show a refusal is about
// the sender, the connection or a policy, not about the recipient. If any
// of them appears the reply is never taken as "no such mailbox" (except
// Microsoft's exact AS(201806281) form), because servers are known to use
// 5.1.1 and "user unknown" wording for refusals of other kinds. Matching is
// by substring, so a word can hit by accident, e.g. in an echoed address;
// that only turns an invalid verdict into unknown, which is the safe
// direction.
var classifyPolicyWords = []string{
	// Block lists and reputation: our probing IP is listed somewhere.
	// That is not the customer's fault.
	"block", // blocked, blocklist, unblock
	"blacklist",
	"blocklist",
	"denylist",
	"listed", // "listed at", "listed in"
	"reputation",
	"rbl",
	"dnsbl",
	"spamhaus",
	"spamcop",
	"barracuda",

	// Filtering appliances and services name themselves in policy
	// refusals.
	"proofpoint",
	"mimecast",

	// Content and anti-abuse filtering.
	"spam",
	"abuse",
	"virus",
	"malware",
	"phish",
	"fraud",
	"suspicious",

	// Explicit policy and access control: the server refuses us, not the
	// address.
	"policy",
	"denied",
	"not permitted",
	"not allowed",
	"prohibited",
	"unauthori", // unauthorised, unauthorized
	"banned",
	"refused",
	"relay", // "relay access denied", "relaying not permitted"

	// Rate limiting and resource exhaustion: try again later.
	"rate", // rate limit, ratelimited
	"too many",
	"throttl",
	"try again",
	"greylist",
	"graylist",
	"quota",

	// The refusal is about the sender or the connection: sender
	// verification, SPF, DMARC, reverse DNS, our HELO name.
	"sender",
	"authenticat",
	"dmarc",
	"dkim",
	"client host",
	"your ip",
	"helo",

	// The mailbox exists but cannot take mail now: not "no such mailbox".
	"disabled",
	"suspended",
	"inactive",
	"mailbox full",
	"mailbox is full",
}

// classifyNoMailbox reports whether a 5xx reply to RCPT TO says the mailbox
// does not exist.
func classifyNoMailbox(r Reply) bool {
	enh, hasEnh := classifyEnhanced(r)
	// The address a server echoes back ("<abuse@example.com>: User
	// unknown") is the recipient's, not the server's words: it must not
	// turn a policy word or a phrase on.
	text := strings.ToLower(classifyStripBracketed(r.Text))

	// Microsoft 365 with directory-based edge blocking refuses unknown
	// recipients at its edge with this exact form; "denied" would
	// otherwise mark it as a policy refusal.
	if hasEnh && enh == [3]int{5, 4, 1} &&
		strings.Contains(text, "access denied") && strings.Contains(text, "as(201806281)") {
		return true
	}
	// Postfix names the lookup table that does not know the recipient:
	// "User unknown in relay recipient table" on every gateway with
	// relay_recipient_maps. The table's name describes the recipient
	// lookup, not a policy about the sender or client, so it is taken out
	// before the policy words are looked for.
	text, postfixTable := classifyCutPostfixTable(text)
	for _, w := range classifyPolicyWords {
		if strings.Contains(text, w) {
			return false
		}
	}
	if postfixTable && (!hasEnh || enh == [3]int{5, 0, 0} || enh == [3]int{5, 1, 1}) {
		return true
	}
	if hasEnh && enh != [3]int{5, 0, 0} {
		for _, c := range classifyNoMailboxCodes {
			if enh == c {
				return true
			}
		}
		return false
	}
	for _, p := range classifyNoMailboxPhrases {
		if strings.Contains(text, p) {
			return true
		}
	}
	return false
}

// classifyEnhanced returns the enhanced code of r if it has a usable one:
// well-formed and of the same class as the basic code.
func classifyEnhanced(r Reply) ([3]int, bool) {
	e := r.Enhanced
	if !classifyEnhancedValid(e) || e[0] != r.Code/100 {
		return [3]int{}, false
	}
	return e, true
}

// classifyEnhancedValid reports whether e is an RFC 3463 status code:
// class 2, 4 or 5, subject and detail of 0 to 999.
func classifyEnhancedValid(e [3]int) bool {
	return (e[0] == 2 || e[0] == 4 || e[0] == 5) &&
		e[1] >= 0 && e[1] <= 999 && e[2] >= 0 && e[2] <= 999
}

// classifyMaxText is the most bytes of reply text replyFromError keeps.
const classifyMaxText = 512

// replyFromError extracts the SMTP reply from an error returned by the
// go-smtp client: it finds an *smtp.SMTPError (or a *textproto.Error) in
// err's chain with errors.As. ok is false when err carries no SMTP reply,
// as with network errors and timeouts.
//
// The text is made safe for logs and reports: control characters
// (including CR, LF, TAB and NUL) and Unicode format characters become
// spaces, runs of spaces collapse to one, so the lines of a multi-line
// reply are joined by single spaces, and invalid UTF-8 is replaced by
// U+FFFD. The text is at most 512 bytes; a longer one is cut on a rune
// boundary and ends in "…".
//
// When go-smtp found no enhanced status code but the text begins with one
// ("5.1.1 ...") or carries one in qmail form ("(#5.1.1)"), that code is
// used. An enhanced code whose class disagrees with the basic code (550
// 4.1.1) is dropped. go-smtp marks an absent code both as
// smtp.NoEnhancedCode and as {0,0,0}; Reply.Enhanced is zero for both.
func replyFromError(err error) (Reply, bool) {
	var code int
	var enh [3]int
	var msg string
	var se *smtp.SMTPError
	var te *textproto.Error
	switch {
	case errors.As(err, &se) && se != nil:
		code, enh, msg = se.Code, [3]int(se.EnhancedCode), se.Message
	case errors.As(err, &te) && te != nil:
		code, msg = te.Code, te.Msg
	default:
		return Reply{}, false
	}
	if code < 100 || code > 999 {
		return Reply{}, false
	}
	if !classifyEnhancedValid(enh) {
		enh = [3]int{} // smtp.NoEnhancedCode, EnhancedCodeNotSet or garbage
	}
	if enh == [3]int{} {
		var rest string
		var ok bool
		if enh, rest, ok = classifyLeadingEnhanced(msg); ok {
			msg = rest
		} else {
			enh, _ = classifyQmailEnhanced(msg)
		}
	}
	if enh != [3]int{} && enh[0] != code/100 {
		enh = [3]int{}
	}
	return Reply{Code: code, Enhanced: enh, Text: classifySanitize(msg)}, true
}

// classifyParseEnhanced parses an enhanced status code at the start of s
// ("5.1.1", "4.7.0") and returns it with the number of bytes it took.
func classifyParseEnhanced(s string) (e [3]int, n int, ok bool) {
	for part := 0; part < 3; part++ {
		if part > 0 {
			if n >= len(s) || s[n] != '.' {
				return e, 0, false
			}
			n++
		}
		digits := 0
		for n < len(s) && s[n] >= '0' && s[n] <= '9' && digits < 4 {
			e[part] = e[part]*10 + int(s[n]-'0')
			n++
			digits++
		}
		if digits == 0 || digits > 3 || (part == 0 && digits != 1) {
			return e, 0, false
		}
	}
	if n < len(s) && s[n] >= '0' && s[n] <= '9' {
		return e, 0, false
	}
	if !classifyEnhancedValid(e) {
		return e, 0, false
	}
	return e, n, true
}

// classifyLeadingEnhanced finds an enhanced status code that begins msg,
// followed by white space or nothing, and returns it with the rest of msg.
func classifyLeadingEnhanced(msg string) ([3]int, string, bool) {
	s := strings.TrimLeft(msg, " \t")
	e, n, ok := classifyParseEnhanced(s)
	if !ok {
		return [3]int{}, msg, false
	}
	if n < len(s) && s[n] != ' ' && s[n] != '\t' && s[n] != '\r' && s[n] != '\n' {
		return [3]int{}, msg, false
	}
	return e, s[n:], true
}

// classifyQmailEnhanced finds an enhanced status code in qmail's form,
// "(#5.1.1)", anywhere in msg.
func classifyQmailEnhanced(msg string) ([3]int, bool) {
	for s := msg; ; {
		i := strings.Index(s, "(#")
		if i < 0 {
			return [3]int{}, false
		}
		s = s[i+2:]
		e, n, ok := classifyParseEnhanced(s)
		if ok && n < len(s) && s[n] == ')' {
			return e, true
		}
	}
}

// classifySanitize makes reply text safe to log and show: see
// replyFromError.
func classifySanitize(s string) string {
	const ellipsis = "…"
	var b strings.Builder
	b.Grow(min(len(s), classifyMaxText+len(ellipsis)))
	space := false // a space is pending
	for i := 0; i < len(s) && b.Len() <= classifyMaxText; {
		r, n := utf8.DecodeRuneInString(s[i:])
		i += n
		switch {
		case r == utf8.RuneError && n <= 1:
			r = utf8.RuneError
		case r == ' ' || unicode.IsControl(r) || unicode.IsSpace(r) || unicode.Is(unicode.Cf, r):
			space = b.Len() > 0
			continue
		}
		if space {
			b.WriteByte(' ')
			space = false
		}
		b.WriteRune(r)
	}
	out := b.String()
	if len(out) <= classifyMaxText {
		return out
	}
	cut := classifyMaxText - len(ellipsis)
	for cut > 0 && !utf8.RuneStart(out[cut]) {
		cut--
	}
	return strings.TrimRight(out[:cut], " ") + ellipsis
}

// classifyStripBracketed removes the <...> parts of a reply text.
func classifyStripBracketed(s string) string {
	if strings.IndexByte(s, '<') < 0 {
		return s
	}
	var b strings.Builder
	for {
		open := strings.IndexByte(s, '<')
		if open < 0 {
			break
		}
		end := strings.IndexByte(s[open:], '>')
		if end < 0 {
			break
		}
		b.WriteString(s[:open])
		b.WriteString("<>")
		s = s[open+end+1:]
	}
	b.WriteString(s)
	return b.String()
}

// classifyCutPostfixTable finds Postfix's "user unknown in ... table"
// (lower case; the table's name is words of letters) in text and returns
// text without it, and whether it was there.
func classifyCutPostfixTable(text string) (string, bool) {
	const head, tail = "user unknown in ", " table"
	i := strings.Index(text, head)
	if i < 0 {
		return text, false
	}
	rest := text[i+len(head):]
	j := strings.Index(rest, tail)
	if j <= 0 || j > 40 {
		return text, false
	}
	for _, c := range rest[:j] {
		if (c < 'a' || c > 'z') && c != ' ' {
			return text, false
		}
	}
	return text[:i] + "user unknown" + rest[j+len(tail):], true
}
