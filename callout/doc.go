// Package callout verifies recipient addresses: does this mailbox exist?
// It owns address syntax, MX resolution (github.com/miekg/dns), the SMTP
// probe (its own small dialogue on net/textproto), the classification of
// replies, the verdict cache (github.com/dgraph-io/ristretto/v2) and the
// facts store beside it, the coalescing of identical requests, the caps on
// what is sent to others, and the safety rules for whom it connects to. It knows nothing of senders,
// identities or limits.
//
// A verification runs these steps, stopping at the first that decides:
//
//  1. Syntax (RFC 5321 §4.1.2, RFC 6531): the address is parsed, its
//     domain converted to its A-label form. Bad syntax is invalid, with no
//     network use.
//  2. Cache: a verdict still fresh for the lower-cased address is returned
//     as it is (valid for PositiveTTL, invalid for NegativeTTL, unknown for
//     UnknownTTL). Domain facts are cached too: a domain that does not
//     exist or has a null MX, a catch-all domain, an MX host refusing
//     probes.
//  3. Rules: address literals, and domains or MX hosts known to accept
//     everything and bounce later (Yahoo, AOL), are unknown, never probed.
//  4. Coalescing: while a verification of the address runs, every other
//     request for it waits for that one. Recipients of one domain that wait
//     together share an SMTP session, PerHost sessions per domain and per
//     MX address at most. Caps in sliding one-minute windows bound new
//     sessions (in all and per domain), connections and RCPTs per MX
//     address, and RCPTs per domain; past one the verdict is unknown,
//     "rate-limited", and nothing is sent.
//  5. DNS (RFC 5321 §5.1, RFC 7505): MX records sorted by preference, equal
//     preferences shuffled; no MX means the domain itself (implicit MX).
//     NXDOMAIN, a null MX ("MX 0 .") or no mail host at all is invalid;
//     SERVFAIL or a timeout is unknown. MX addresses that are loopback,
//     private, link-local and the like are refused (unknown,
//     "unsafe-address") unless AllowPrivate.
//  6. SMTP (RFC 5321 §3.3, §4.1.1, RFC 3207): for each MX host in order:
//     connect to Port, one EHLO, STARTTLS when offered (the certificate is
//     not checked: a probe is not a delivery) and the EHLO RFC 3207
//     requires after it, MAIL FROM:<MailFrom> (null sender by default),
//     one RCPT TO per waiting recipient, RSET (no EHLO after it), and QUIT
//     at the end of every session. A session that has had 8 error replies
//     is ended and a fresh one started, below the error limits of common
//     servers. DATA is never sent. A connection failure or a 4xx moves on
//     to the next MX host; a 5xx at RCPT is final.
//  7. Classification (classify): 2xx at RCPT is valid; a 5xx that says the
//     mailbox does not exist is invalid; everything else is unknown,
//     including policy refusals, greylisting and timeouts. An acceptance
//     is valid only from an MX host known to refuse a random local part of
//     the domain: one RCPT for a random name tells, once per domain and
//     host per CatchAllTTL whatever the answer; from a host that accepts
//     it (a catch-all, a backup MX relaying everything) the verdict is
//     unknown.
//
// STARTTLS on probes is on or off (Config.NoTLS; the key callout.starttls
// is a bool), never required: a probe sends nothing secret and checks no
// certificate, so TLS is a courtesy to the MX, not a protection. Reports
// are another matter: notify.starttls is a string, "required",
// "opportunistic" or "off" (see package notify). The two keys keep their
// types on purpose.
//
// The whole verification, MX lookup and all hosts included, is bounded by
// Timeout. A caller that stops waiting does not stop the probe: its result
// is cached for the next asker.
package callout
