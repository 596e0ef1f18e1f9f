package main

import (
	"bufio"
	"bytes"
	"io"
	"strings"
	"testing"

	"github.com/rcptguard/rcptguard/detector"
)

// parseAll reads every request in b with rcptguard's parser.
func parseAll(t *testing.T, b []byte) []detector.Request {
	t.Helper()
	br := bufio.NewReader(bytes.NewReader(b))
	var out []detector.Request
	for {
		req, err := detector.ReadRequest(br, detector.Limits{})
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatalf("request %d does not parse: %v", len(out)+1, err)
		}
		out = append(out, req)
	}
}

func TestRenderedRequestIsAFullPostfixRequest(t *testing.T) {
	b := appendRequest(nil, &rcptRequest{
		identity: 42, recipient: []byte("mbox7@bench.test"), queueID: []byte("00000002A3"),
		instance: []byte("1000.5f3c9e1d.2.0"), size: 12345, clientPort: 40001,
	})
	text := string(b)
	if !strings.HasSuffix(text, "\n\n") || strings.Count(text, "\n\n") != 1 {
		t.Fatalf("a request must end with exactly one empty line:\n%s", text)
	}
	lines := strings.Split(strings.TrimSuffix(text, "\n\n"), "\n")
	if len(lines) < 30 {
		t.Errorf("%d attributes, want at least 30 (Postfix 3.x sends 31)", len(lines))
	}
	seen := map[string]bool{}
	for _, l := range lines {
		name, _, ok := strings.Cut(l, "=")
		if !ok || seen[name] {
			t.Errorf("bad or repeated attribute line %q", l)
		}
		seen[name] = true
	}
	reqs := parseAll(t, b)
	if len(reqs) != 1 {
		t.Fatalf("%d requests parsed, want 1", len(reqs))
	}
	r := reqs[0]
	if r.Attrs != nil {
		t.Errorf("attributes Postfix does not send: %v", r.Attrs)
	}
	want := map[string]string{
		"request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTPSA",
		"sasl_method": "PLAIN", "sasl_username": "user42@customer.test", "sender": "user42@customer.test",
		"recipient": "mbox7@bench.test", "queue_id": "00000002A3", "recipient_count": "0",
		"client_address": "198.51.100.22", "client_name": "dsl-42.example.net", "reverse_client_name": "dsl-42.example.net",
		"instance": "1000.5f3c9e1d.2.0", "size": "12345", "encryption_protocol": "TLSv1.3", "encryption_keysize": "256",
		"server_port": "587", "client_port": "40001", "ccert_subject": "", "stress": "",
	}
	for name, v := range want {
		if got := r.Get(name); got != v {
			t.Errorf("%s = %q, want %q", name, got, v)
		}
	}
}

func TestGeneratorMessages(t *testing.T) {
	w := &workload{identities: 50, blocked: 5, mailboxes: 10, domain: "bench.test", invalid: 0.25}
	w.domains = rcptDomains(w.domain, 1)
	g := newGenerator(w, 3, 8)
	var all []byte
	const n = 4000
	for range n {
		all = append(all, g.next()...)
	}
	reqs := parseAll(t, all)
	if len(reqs) != n {
		t.Fatalf("%d requests, want %d", len(reqs), n)
	}
	identities := map[string]bool{}
	invalid, firsts, blocked := 0, 0, 0
	for i, r := range reqs {
		identities[r.SASLUsername] = true
		if r.Sender != r.SASLUsername {
			t.Fatalf("request %d: sender %q is not the login %q", i, r.Sender, r.SASLUsername)
		}
		if strings.HasPrefix(r.SASLUsername, "blocked") {
			blocked++
		}
		switch {
		case strings.HasPrefix(r.Recipient, "unknown"):
			invalid++
		case !strings.HasPrefix(r.Recipient, "mbox"):
			t.Fatalf("request %d: recipient %q", i, r.Recipient)
		}
		if !strings.HasSuffix(r.Recipient, "@bench.test") {
			t.Fatalf("request %d: recipient %q not at bench.test", i, r.Recipient)
		}
		// The first recipient of a message has no queue ID; the others
		// share the message's, and its identity and instance.
		if r.QueueID == "" {
			firsts++
		} else {
			prev := reqs[i-1]
			if prev.SASLUsername != r.SASLUsername || prev.Instance != r.Instance {
				t.Fatalf("request %d: queue ID %q in a new message", i, r.QueueID)
			}
			if prev.QueueID != "" && prev.QueueID != r.QueueID {
				t.Fatalf("request %d: queue ID changed inside a message", i)
			}
		}
	}
	if len(identities) != 50 {
		t.Errorf("%d identities used, want all 50", len(identities))
	}
	if blocked == 0 || blocked > n/5 {
		t.Errorf("%d requests from the 5 blocked identities of 50", blocked)
	}
	if f := float64(invalid) / n; f < 0.2 || f > 0.3 {
		t.Errorf("invalid fraction %.3f, want about 0.25", f)
	}
	// Messages have 1 to 4 recipients: 2.5 on average.
	if avg := float64(n) / float64(firsts); avg < 2 || avg > 3 {
		t.Errorf("%.2f recipients per message, want about 2.5", avg)
	}
}

func TestGeneratorUniqueRecipients(t *testing.T) {
	w := &workload{identities: 10, mailboxes: 1, domain: "bench.test", invalid: 0.5, unique: true, nonce: "n1"}
	w.domains = rcptDomains(w.domain, 3)
	seen := map[string]bool{}
	domains := map[string]bool{}
	for conn := range 2 {
		g := newGenerator(w, conn, 2)
		for range 1000 {
			reqs := parseAll(t, g.next())
			rcpt := reqs[0].Recipient
			if seen[rcpt] {
				t.Fatalf("recipient %s repeated", rcpt)
			}
			seen[rcpt] = true
			local, domain, _ := strings.Cut(rcpt, "@")
			domains[domain] = true
			if !strings.HasPrefix(local, freshValidPrefix+"n1.") && !strings.HasPrefix(local, freshUnknownPrefix+"n1.") {
				t.Fatalf("recipient %s", rcpt)
			}
		}
	}
	if len(domains) != 3 || !domains["bench.test"] || !domains["d1.bench.test"] || !domains["d2.bench.test"] {
		t.Errorf("domains used: %v", domains)
	}
	if w.primeRecipients() != nil {
		t.Error("unique recipients cannot be primed")
	}
}

func TestPrimeRecipients(t *testing.T) {
	w := &workload{mailboxes: 3, domain: "b.test", invalid: 0.1}
	w.domains = rcptDomains(w.domain, 2)
	got := strings.Join(w.primeRecipients(), " ")
	want := "mbox0@b.test mbox1@b.test mbox2@b.test unknown0@b.test unknown1@b.test unknown2@b.test " +
		"mbox0@d1.b.test mbox1@d1.b.test mbox2@d1.b.test unknown0@d1.b.test unknown1@d1.b.test unknown2@d1.b.test"
	if got != want {
		t.Errorf("prime list\n got %s\nwant %s", got, want)
	}
}

func TestGeneratorDoesNotAllocate(t *testing.T) {
	w := &workload{identities: 1000, blocked: 10, mailboxes: 100, domain: "bench.test", invalid: 0.1}
	g := newGenerator(w, 0, 1)
	for range 100 {
		g.next() // grow the buffers
	}
	if n := testing.AllocsPerRun(1000, func() { g.next() }); n != 0 {
		t.Errorf("rendering a request allocates %v times", n)
	}
}
