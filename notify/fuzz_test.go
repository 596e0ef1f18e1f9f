package notify_test

import (
	"bytes"
	"net/mail"
	"strings"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/notify"
)

// FuzzCompose feeds untrusted values into every field a report takes from
// the network. Compose must never panic, and its output must always parse
// with net/mail, use CRLF only, be 7-bit and keep lines within 998 octets;
// the header must hold exactly the fields Compose writes.
func FuzzCompose(f *testing.F) {
	for _, v := range hostile {
		f.Add(v, "nobody@example.net", "550 5.1.1 no such user", "dsl.example.org", "4F2A1C0E3B", uint8(0), 101)
	}
	f.Add("alice@example.com", strings.Repeat("x\r\n", 700), "550\n", "\x00", "", uint8(1), -1)
	f.Add("-", "", "", "", "'", uint8(2), 0)

	kinds := []notify.Kind{notify.KindBlock, notify.KindWouldBlock, notify.KindWarning}
	f.Fuzz(func(t *testing.T, identity, rcpt, reply, name, qid string, kind uint8, count int) {
		if identity == "" {
			identity = "x"
		}
		r := notify.Report{
			Kind:       kinds[int(kind)%len(kinds)],
			Identity:   identity,
			Time:       time.Date(2024, 3, 5, 14, 3, 7, 0, time.UTC),
			Mode:       reply,
			Count:      count,
			Limit:      100,
			Period:     time.Hour,
			Action:     "HOLD " + identity,
			Clients:    []notify.Client{{Address: name, Name: name, Count: count}},
			Recipients: []notify.Recipient{{Address: rcpt, Reason: reply, MX: name, Reply: reply}},
			QueueIDs:   []string{qid, identity},
			Hostname:   name,
		}
		raw, err := notify.Compose(r, "rcptguard@example.com", []string{"abuse@example.com"})
		if err != nil {
			t.Fatalf("Compose: %v", err)
		}
		p := parseReport(t, raw)
		checkHeaderFields(t, p.header, []string{
			"Date", "From", "To", "Subject", "Message-Id", "Auto-Submitted",
			"X-Rcptguard-Kind", "X-Rcptguard-Identity", "Mime-Version", "Content-Type",
		})
		j := decodeJSON(t, p.json)
		if j.Identity != strings.ToValidUTF8(identity, "\uFFFD") {
			t.Errorf("JSON identity %q, want %q", j.Identity, identity)
		}
		if strings.ContainsAny(p.text, "\r\x00") {
			t.Errorf("control character in the text part")
		}

		r.Kind = notify.KindWarning
		if _, ok := r.UserAddress(); ok {
			raw, err := notify.ComposeUserWarning(r, "rcptguard@example.com", []string{"abuse@example.com"})
			if err != nil {
				t.Fatalf("ComposeUserWarning: %v", err)
			}
			checkWire(t, raw)
			if _, err := mail.ReadMessage(bytes.NewReader(raw)); err != nil {
				t.Fatalf("user warning: %v", err)
			}
		}
	})
}
