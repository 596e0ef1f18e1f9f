package main

import (
	"strconv"
)

// The bench world's names, shared by the load generator and the world so
// that they agree without being told.
const (
	// customerDomain is the domain of the SASL identities.
	customerDomain = "customer.test"
	// defaultRcptDomain is the recipients' domain, served by the world's
	// DNS and MX.
	defaultRcptDomain = "bench.test"
	// Local parts: mailboxes are "mbox<N>" for N below the mailbox count;
	// "unknown<N>" never exists; for the uncached scenario, "v.<...>" is
	// always a mailbox and "x.<...>" never is.
	mailboxPrefix      = "mbox"
	unknownPrefix      = "unknown"
	freshValidPrefix   = "v."
	freshUnknownPrefix = "x."
)

// appendIdentity appends the SASL identity number i: the first blocked
// identities are "blocked<i>@customer.test" (the world's -blocked writes
// exactly these to the blocklist), the others "user<i>@customer.test".
func appendIdentity(b []byte, i, blocked int) []byte {
	if i < blocked {
		b = append(b, "blocked"...)
	} else {
		b = append(b, "user"...)
	}
	b = strconv.AppendInt(b, int64(i), 10)
	return append(b, "@"+customerDomain...)
}

// identityName returns identity number i as a string.
func identityName(i, blocked int) string { return string(appendIdentity(nil, i, blocked)) }

// rcptRequest is what varies from one policy request to the next; the rest
// of a request is constant text.
type rcptRequest struct {
	identity   int    // identity number (see appendIdentity)
	blocked    int    // identities below this number are the blocked ones
	recipient  []byte // the RCPT TO address
	queueID    []byte // empty for the first recipient of a message
	instance   []byte // unique per message
	size       int    // MAIL FROM SIZE=
	clientPort int    // the SMTP client's port
}

// appendRequest appends the policy request Postfix 3.x smtpd sends at
// RCPT TO for a client authenticated over TLS: all 31 attributes, in
// Postfix's order, and the empty line. The constant parts are
// pre-rendered string constants and the variable ones are appended
// without formatting, so rendering a request into a reused buffer does
// not allocate and costs a small fraction of a loopback round trip.
func appendRequest(b []byte, r *rcptRequest) []byte {
	b = append(b, "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTPSA\nhelo_name=pc"...)
	b = strconv.AppendInt(b, int64(r.identity), 10)
	b = append(b, ".dsl.example.net\nqueue_id="...)
	b = append(b, r.queueID...)
	b = append(b, "\nsender="...)
	b = appendIdentity(b, r.identity, r.blocked)
	b = append(b, "\nrecipient="...)
	b = append(b, r.recipient...)
	b = append(b, "\nrecipient_count=0\nclient_address="...)
	b = appendClientAddress(b, r.identity)
	b = append(b, "\nclient_name="...)
	b = appendClientName(b, r.identity)
	b = append(b, "\nreverse_client_name="...)
	b = appendClientName(b, r.identity)
	b = append(b, "\ninstance="...)
	b = append(b, r.instance...)
	b = append(b, "\nsasl_method=PLAIN\nsasl_username="...)
	b = appendIdentity(b, r.identity, r.blocked)
	b = append(b, "\nsasl_sender=\nsize="...)
	b = strconv.AppendInt(b, int64(r.size), 10)
	b = append(b, "\nccert_subject=\nccert_issuer=\nccert_fingerprint=\nccert_pubkey_fingerprint=\n"+
		"encryption_protocol=TLSv1.3\nencryption_cipher=TLS_AES_256_GCM_SHA384\nencryption_keysize=256\n"+
		"etrn_domain=\nstress=\npolicy_context=submission\nserver_address=192.0.2.25\nserver_port=587\n"+
		"compatibility_level=3.6\nmail_version=3.7.11\nclient_port="...)
	b = strconv.AppendInt(b, int64(r.clientPort), 10)
	return append(b, "\n\n"...)
}

// appendClientAddress appends the identity's client IP address, one of
// the documentation networks (RFC 5737).
func appendClientAddress(b []byte, identity int) []byte {
	if identity%2 == 0 {
		b = append(b, "198.51.100."...)
	} else {
		b = append(b, "203.0.113."...)
	}
	return strconv.AppendInt(b, int64(identity/2%254+1), 10)
}

// appendClientName appends the identity's client host name.
func appendClientName(b []byte, identity int) []byte {
	b = append(b, "dsl-"...)
	b = strconv.AppendInt(b, int64(identity), 10)
	return append(b, ".example.net"...)
}

// rcptDomains returns the recipient domains of a bench world with n
// domains: domain itself, then d1.domain, d2.domain, ...
func rcptDomains(domain string, n int) []string {
	out := []string{domain}
	for i := 1; i < n; i++ {
		out = append(out, "d"+strconv.Itoa(i)+"."+domain)
	}
	return out
}

// workload describes the requests of a load run.
type workload struct {
	identities int    // identities cycled over
	blocked    int    // the first blocked identities are the blocked ones
	mailboxes  int    // valid recipients: mbox0..mbox<mailboxes-1>
	domain     string // recipients' domain (the first of domains)
	domains    []string
	invalid    float64 // fraction of recipients that do not exist
	unique     bool    // every recipient is new (uncached scenario)
	nonce      string  // makes unique recipients unique across runs
}

// generator produces the requests of one connection: messages of one to
// four recipients from one identity each, identities taken in turn,
// recipients drawn at random. It is not safe for concurrent use.
type generator struct {
	w        *workload
	conn     int
	rng      uint64
	ident    int    // identity of the current message
	msg      int    // messages started
	left     int    // recipients left in the current message
	nth      int    // recipients of the current message so far
	fresh    uint64 // unique recipients made
	size     int
	queueID  []byte
	instance []byte
	rcpt     []byte
	buf      []byte
}

func newGenerator(w *workload, conn, conns int) *generator {
	g := &generator{w: w, conn: conn, rng: uint64(conn)*0x9e3779b97f4a7c15 + 0x2545f4914f6cdd1d}
	if w.identities > 0 && conns > 0 {
		// Connections start at different identities, as different
		// customers use different smtpd processes.
		g.ident = int(int64(conn) * int64(w.identities) / int64(conns))
	}
	return g
}

// rand returns the next number of a xorshift64* sequence.
func (g *generator) rand() uint64 {
	g.rng ^= g.rng >> 12
	g.rng ^= g.rng << 25
	g.rng ^= g.rng >> 27
	return g.rng * 2685821657736338717
}

// next returns the next request. The slice is valid until the next call.
func (g *generator) next() []byte {
	if g.left == 0 {
		g.startMessage()
	}
	g.queueID = g.queueID[:0]
	if g.nth > 0 {
		// Postfix creates the queue file when it accepts the first
		// recipient: from the second RCPT on, the request has its ID.
		g.queueID = appendQueueID(g.queueID, g.conn, g.msg)
	}
	g.rcpt = g.appendRecipient(g.rcpt[:0])
	g.buf = appendRequest(g.buf[:0], &rcptRequest{
		identity:   g.ident,
		blocked:    g.w.blocked,
		recipient:  g.rcpt,
		queueID:    g.queueID,
		instance:   g.instance,
		size:       g.size,
		clientPort: 40000 + g.conn,
	})
	g.left--
	g.nth++
	return g.buf
}

func (g *generator) startMessage() {
	if g.msg > 0 && g.w.identities > 0 {
		g.ident = (g.ident + 1) % g.w.identities
	}
	g.msg++
	g.left = 1 + g.msg%4
	g.nth = 0
	g.size = 1000 + int(g.rand()%200000)
	// Postfix's instance: "%lx.%lx.%lx.%x", unique per message.
	g.instance = strconv.AppendInt(g.instance[:0], int64(0x1000+g.conn), 16)
	g.instance = append(g.instance, ".5f3c9e1d."...)
	g.instance = strconv.AppendInt(g.instance, int64(g.msg), 16)
	g.instance = append(g.instance, ".0"...)
}

// appendQueueID appends a Postfix short queue ID (10 upper-case hex
// digits) for message msg of connection conn.
func appendQueueID(b []byte, conn, msg int) []byte {
	const hex = "0123456789ABCDEF"
	v := uint64(conn&0xfff)<<28 | uint64(msg&0xfffffff)
	for shift := 36; shift >= 0; shift -= 4 {
		b = append(b, hex[v>>uint(shift)&0xf])
	}
	return b
}

// appendRecipient draws the next recipient.
func (g *generator) appendRecipient(b []byte) []byte {
	r := g.rand()
	invalid := g.w.invalid > 0 && float64(r>>11)/(1<<53) < g.w.invalid
	if g.w.unique {
		g.fresh++
		if invalid {
			b = append(b, freshUnknownPrefix...)
		} else {
			b = append(b, freshValidPrefix...)
		}
		b = append(b, g.w.nonce...)
		b = append(b, '.')
		b = strconv.AppendInt(b, int64(g.conn), 10)
		b = append(b, '.')
		b = strconv.AppendUint(b, g.fresh, 10)
	} else {
		n := int64(g.rand() % uint64(max(g.w.mailboxes, 1)))
		if invalid {
			b = append(b, unknownPrefix...)
		} else {
			b = append(b, mailboxPrefix...)
		}
		b = strconv.AppendInt(b, n, 10)
	}
	b = append(b, '@')
	if len(g.w.domains) > 1 {
		return append(b, g.w.domains[g.rand()%uint64(len(g.w.domains))]...)
	}
	return append(b, g.w.domain...)
}

// primeRecipients lists every recipient the cached scenario uses, so that
// the load generator can ask for each once before the clock starts and
// the measured requests find every verdict cached.
func (w *workload) primeRecipients() []string {
	if w.unique {
		return nil
	}
	domains := w.domains
	if len(domains) == 0 {
		domains = []string{w.domain}
	}
	var out []string
	for _, d := range domains {
		for i := range w.mailboxes {
			out = append(out, mailboxPrefix+strconv.Itoa(i)+"@"+d)
		}
		if w.invalid > 0 {
			for i := range w.mailboxes {
				out = append(out, unknownPrefix+strconv.Itoa(i)+"@"+d)
			}
		}
	}
	return out
}
