// Package notify owns rcptguard's abuse reports: it builds the report
// messages, sends them through an SMTP relay (github.com/emersion/go-smtp
// with STARTTLS and SASL PLAIN or LOGIN from github.com/emersion/go-sasl),
// and keeps them in a durable spool until the relay has accepted them.
//
// It must not decide when to report: the detector does, and it already
// deduplicates, so one block event is one Mailer.Enqueue call. The package
// imports no other rcptguard package; cmd/rcptguard turns the detector's
// events into Reports.
//
// # Messages
//
// Compose turns a Report into one message to the abuse desk
// (Config.To). Its Subject names the identity:
//
//	[rcptguard] blocked IDENTITY: N invalid recipients in PERIOD
//	[rcptguard] would block IDENTITY: N invalid recipients in PERIOD   (monitor mode)
//	[rcptguard] warning IDENTITY: N of LIMIT
//	[rcptguard] held N messages already queued of IDENTITY              (follow-up of a block)
//
// The headers are Date, From, To, Subject, Message-ID (random, at the host
// name), Auto-Submitted: auto-generated (RFC 3834), X-Rcptguard-Kind,
// X-Rcptguard-Identity, MIME-Version and Content-Type. The body is
// multipart/mixed: a text/plain part for people (plain sentences and
// "Label: value" lines a screen reader reads well; the identity, the time
// in RFC 3339 and in words, mode, count, limit and window, the client
// addresses with reverse names and request counts, up to 20 invalid
// recipients with the MX host and its reply, the queue IDs answered HOLD,
// a loud line when Postfix's queue file system is nearly full, and the
// exact commands to run as root: rcptguard held, release and purge, each
// with -n first as a dry run, and unblock) and an inline application/json
// part, report.json, with the same facts for ticket systems.
//
// A "held" report (KindHeld) follows a block when rcptguard's root-run
// queue-hold has held the identity's mail that was accepted before the
// block and still waited in Postfix's queue: it lists each message (queue
// ID, arrival, size, recipients) and the same commands. The caller sends
// at most one per block event.
//
// ComposeUserWarning turns a warning about an identity that is an email
// address into a short message to the account holder in plain words, with
// no technical details; Mailer sends it when Config.WarnUser is set.
//
// Every string in a Report may hold bytes an attacker chose. In the text
// part and the headers, control characters, invalid UTF-8, bidirectional
// overrides and line separators are shown as escapes (\r, \x00, \u202e),
// so no value can start a header or a line. Headers are 7-bit (non-ASCII
// text as RFC 2047 encoded words) and folded; long values are cut short in
// headers; both parts are quoted-printable, so no body line exceeds 76
// octets on the wire and no header line 998, whatever the report holds;
// line endings are CRLF. Every command is safe to paste: each value is
// in single quotes for a POSIX shell, each single quote in it closed,
// escaped and reopened; no value can be taken for an option: queue IDs
// that are not Postfix queue IDs (letters and digits) are left out, and
// an identity starting with '-' follows "--" (rcptguard's flag parser
// reads the rest as arguments):
//
//	rcptguard held 'o'\''brien@example.com'
//	rcptguard release -n 'o'\''brien@example.com'
//	rcptguard purge -n -- '-x@example.com'
//	rcptguard unblock -- '-x@example.com'
//	postsuper -H '4Xk2Ln3HcPz9vWx'
//
// rcptguard's held, release and purge find the mail by the SASL login
// Postfix wrote in each queue file. A client IP address has none, so for
// it the report keeps naming the held messages by queue ID (postsuper).
// An identity that holds characters shown escaped gets no command that
// names it; its exact bytes are in the JSON part.
//
// # JSON part
//
// The field names are stable; "version" changes only when a field changes
// meaning or goes away. Every field is always present; unknown values are
// "". Strings are valid UTF-8 (invalid bytes become U+FFFD); all but the
// identity are cut at 512 characters. Lists hold at most 20 clients, 20
// recipients and 100 queue IDs, as the text does.
//
//	version         number  1
//	kind            string  "block", "would-block" (monitor mode), "warning" or "held"
//	identity        string  the SASL user name or client IP address, exactly
//	time            string  when it happened, RFC 3339
//	mode            string  "enforce" or "monitor"
//	count           number  distinct invalid recipients in the window
//	limit           number  the identity's limit
//	period          string  the window: "1h", "90m", "2d"
//	period_seconds  number  the window in seconds
//	action          string  the Postfix action answered from now on; "" for warnings
//	hostname        string  the machine rcptguard runs on
//	clients         list    {address, name, count}: client IP, reverse name, requests
//	recipients      list    {address, time, reason, mx, reply}: invalid recipients,
//	                        most recent first; time RFC 3339; reason e.g. "mailbox-unknown";
//	                        mx the host that answered; reply its reply line
//	queue_ids       list    Postfix queue IDs answered HOLD
//	retroactive_hold bool   a "held" report will list the mail queued before
//	                        the block that was held
//	blocked_at      string  in a "held" report: when the block was, RFC 3339; else ""
//	held            list    in a "held" report: {queue_id, arrival, size, recipients}:
//	                        the messages held retroactively, at most 100; arrival
//	                        RFC 3339, size in bytes, recipients not yet delivered
//	held_count      number  how many were held in all (may exceed the list)
//	queue_fs        object  {free_bytes, free_ratio, low}: Postfix's queue file
//	                        system when the report was made, null if not checked;
//	                        low: below 10% free, the text then warns
//	commands        object  name → argument vector (no shell needed): "unblock",
//	                        "held", "release_dry_run", "release", "purge_dry_run",
//	                        "purge" after a block and in a "held" report; "block"
//	                        after a warning or would-block; only "unblock" or
//	                        "block" for a client IP address; {} when the identity
//	                        holds characters the text shows escaped. The identity is
//	                        the last argument, after "--" when it starts with '-'
//
// For example:
//
//	{
//	  "version": 1,
//	  "kind": "block",
//	  "identity": "alice@example.com",
//	  "time": "2024-03-05T14:03:07+01:00",
//	  "mode": "enforce",
//	  "count": 101,
//	  "limit": 100,
//	  "period": "1h",
//	  "period_seconds": 3600,
//	  "action": "HOLD rcptguard: alice@example.com blocked: 101 invalid recipients within 1h",
//	  "hostname": "mail1.example.net",
//	  "clients": [
//	    {"address": "198.51.100.23", "name": "dsl-23.example.org", "count": 95}
//	  ],
//	  "recipients": [
//	    {"address": "nobody@example.net", "time": "2024-03-05T14:02:55+01:00",
//	     "reason": "mailbox-unknown", "mx": "mx.example.net",
//	     "reply": "550 5.1.1 <nobody@example.net>: Recipient address rejected: User unknown"}
//	  ],
//	  "queue_ids": ["4F2A1C0E3B"],
//	  "retroactive_hold": true,
//	  "blocked_at": "",
//	  "held": [],
//	  "held_count": 0,
//	  "queue_fs": {"free_bytes": 41943040000, "free_ratio": 0.3906, "low": false},
//	  "commands": {
//	    "held": ["rcptguard", "held", "alice@example.com"],
//	    "purge": ["rcptguard", "purge", "alice@example.com"],
//	    "purge_dry_run": ["rcptguard", "purge", "-n", "alice@example.com"],
//	    "release": ["rcptguard", "release", "alice@example.com"],
//	    "release_dry_run": ["rcptguard", "release", "-n", "alice@example.com"],
//	    "unblock": ["rcptguard", "unblock", "alice@example.com"]
//	  }
//	}
//
// # Sending
//
// Mailer.Enqueue composes the messages and writes each to the spool before
// it returns; it never talks to the relay, so a policy answer never waits
// for mail. Mailer.Run, in a goroutine the caller owns, delivers the
// spool: at start it replays what a previous process left, trying each
// message at once whenever its next attempt was due (a restart often
// follows a fix of the relay), then it sends each message Enqueue adds. Mailer.SendNow sends one report at once,
// without the spool, for `rcptguard notify-test`.
//
// One attempt: connect to Config.Relay; EHLO with Config.Hostname; STARTTLS
// per Config.StartTLS ("required": no STARTTLS offered, no delivery;
// "opportunistic": STARTTLS when offered; "off": never), verifying the
// relay's certificate for the relay host unless Config.TLSSkipVerify is
// set or the relay is on a loopback address (a local Postfix with its
// self-signed certificate: the connection never leaves the host), also in
// opportunistic mode; AUTH PLAIN, or LOGIN when PLAIN is not
// offered, when Config.Username is set, but only over TLS or to a relay on
// a loopback address; MAIL FROM, RCPT TO each recipient, DATA, QUIT.
// go-smtp starts TLS only from its constructor, which says "EHLO
// localhost" first, so unless STARTTLS is off a first connection asks the
// relay whether it offers STARTTLS and the message goes over a second one
// that starts TLS at once (and then says EHLO with our name). The key
// notify.starttls is that three-way string, unlike the callout's bool
// callout.starttls: the session carries the relay's SASL password and the
// report names a customer, so an operator may require TLS; a probe never
// needs it. Commands time
// out after 30 seconds, the reply to the message after 2 minutes, a whole
// attempt after 5 minutes.
//
// # Spool and retries
//
// The spool is a directory (created 0700) with one file per message,
// named TIME-RANDOM.msg (Unix nanoseconds, 16 hex digits), mode 0600. The
// first line is a JSON header, the rest is the message exactly as it goes
// to the relay:
//
//	{"version":1,"from":"rcptguard@mail1.example.net","to":["abuse@example.com"],
//	 "created":"...","attempts":0,"next_attempt":"...","last_error":"...",
//	 "kind":"block","identity":"alice@example.com","message_id":"<...>",
//	 "size":4711,"sha256":"..."}
//	Date: ...
//
// Every write is atomic: a temporary .tmp-* file in the spool directory,
// fsync, rename, fsync of the directory. A message's file is removed only
// after the relay accepted it (250 after DATA). After a failed attempt
// the header is rewritten the same way with the attempt count, the next
// attempt time and the last error; recipients the relay already accepted
// are dropped from "to" and are not sent it again. Retries wait
// Config.Backoff: 1 minute doubling to 1 hour, ±20% at random. Delivery
// is at least once: a message that was with the relay when the process
// was killed (its end of DATA sent, the relay's answer not yet handled) is
// sent again by the next start, with the same Message-ID; one message is
// on the wire at a time, so a kill makes at most one duplicate.
//
// A 4xx reply or a connection failure is logged as a warning, a 5xx reply
// as an error, on each attempt. Both are retried the same way: a 5xx from
// one's own relay almost always means a configuration the administrator
// will fix (relay access denied, authentication failed), and dropping the
// report would lose the news of a block. A recipient refused at RCPT does
// not hold back the others. A message older than Config.MaxAge (default 5
// days) is given up with an error log and moved to the spool's failed/
// directory, where it can still be read. Files that cannot be read back
// (bad header, size or checksum mismatch) and temporary files a crash left
// behind are moved to corrupt/ with an error log; they never stop the
// sender.
package notify
