// Package callout verifies recipient addresses: does this mailbox exist?
// It owns address syntax, MX resolution (github.com/miekg/dns), the SMTP
// probe (github.com/emersion/go-smtp client), the classification of
// replies, the verdict cache (github.com/dgraph-io/ristretto/v2), the
// coalescing of identical requests and the safety rules for whom it
// connects to. It knows nothing of senders, identities or limits.
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
//     MX host at most.
//  5. DNS (RFC 5321 §5.1, RFC 7505): MX records sorted by preference, equal
//     preferences shuffled; no MX means the domain itself (implicit MX).
//     NXDOMAIN, a null MX ("MX 0 .") or no mail host at all is invalid;
//     SERVFAIL or a timeout is unknown. MX addresses that are loopback,
//     private, link-local and the like are refused (unknown,
//     "unsafe-address") unless AllowPrivate.
//  6. SMTP (RFC 5321 §3.3, §4.1.1): for each MX host in order: connect to
//     Port, EHLO, STARTTLS when offered (the certificate is not checked:
//     a probe is not a delivery), MAIL FROM:<MailFrom> (null sender by
//     default), one RCPT TO per waiting recipient, RSET, and QUIT when no
//     recipient waits. DATA is never sent. A connection failure or a 4xx
//     moves on to the next MX host; a 5xx at RCPT is final.
//  7. Classification (Classify): 2xx at RCPT is valid; a 5xx that says the
//     mailbox does not exist is invalid; everything else is unknown,
//     including policy refusals, greylisting and timeouts. When a
//     recipient is accepted and the domain is not known, one RCPT for a
//     random local part tells a catch-all domain, whose verdicts are then
//     unknown.
//
// The whole verification, MX lookup and all hosts included, is bounded by
// Timeout. A caller that stops waiting does not stop the probe: its result
// is cached for the next asker.
package callout
