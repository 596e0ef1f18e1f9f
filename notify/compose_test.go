package notify_test

import (
	"bytes"
	"encoding/json"
	"flag"
	"io"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net/mail"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/notify"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden")

var cet = time.FixedZone("CET", 3600)

// fixedReport is a block report with fixed time and Message-ID.
func fixedReport() notify.Report {
	t0 := time.Date(2024, 3, 5, 14, 3, 7, 0, cet)
	return notify.Report{
		Kind:     notify.KindBlock,
		Identity: "alice@example.com",
		Time:     t0,
		Mode:     "enforce",
		Count:    101,
		Limit:    100,
		Period:   time.Hour,
		Action:   "HOLD rcptguard: alice@example.com blocked: 101 invalid recipients within 1h",
		Clients: []notify.Client{
			{Address: "198.51.100.23", Name: "dsl-23.example.org", Count: 95},
			{Address: "203.0.113.7", Name: "unknown", Count: 6},
		},
		Recipients: []notify.Recipient{
			{Address: "nobody@example.net", Time: t0.Add(-12 * time.Second), Reason: "mailbox-unknown", MX: "mx.example.net", Reply: "550 5.1.1 <nobody@example.net>: Recipient address rejected: User unknown"},
			{Address: "sales@gone.example", Time: t0.Add(-40 * time.Second).UTC(), Reason: "nxdomain"},
			{Address: "x@example.org", Reason: "mailbox-unknown", MX: "mx1.example.org"},
		},
		QueueIDs:  []string{"4F2A1C0E3B", "4Xk2Ln3HcPz9vWx"},
		Hostname:  "mail1.example.net",
		MessageID: "20240305140307.fixed@mail1.example.net",
	}
}

// heldReport is the follow-up of fixedReport's block: two messages
// queued before it were held 3 seconds later.
func heldReport() notify.Report {
	r := fixedReport()
	t0 := r.Time
	return notify.Report{
		Kind:      notify.KindHeld,
		Identity:  r.Identity,
		Time:      t0.Add(3 * time.Second),
		BlockTime: t0,
		Held: []notify.HeldMessage{
			{QueueID: "4Xk2Lf1ZqQz9vAa", Arrival: t0.Add(-47 * time.Minute), Size: 2817, Recipients: 3},
			{QueueID: "3F2B7C10D4", Arrival: t0.Add(-2 * time.Minute).UTC(), Size: 1024, Recipients: 1},
		},
		Hostname:  r.Hostname,
		MessageID: "20240305140310.held@mail1.example.net",
	}
}

var (
	testFrom = "rcptguard <rcptguard@mail1.example.net>"
	testTo   = []string{"abuse@example.com", "Abuse Desk <desk@example.com>"}
)

// parsedReport is a report message read back with net/mail and
// mime/multipart.
type parsedReport struct {
	header     mail.Header
	text       string // decoded, LF line endings
	textHeader map[string]string
	json       []byte
	jsonHeader map[string]string
}

// parseReport reads a composed report back, failing t on any deviation
// from the expected structure.
func parseReport(t testing.TB, raw []byte) parsedReport {
	t.Helper()
	checkWire(t, raw)
	msg, err := mail.ReadMessage(bytes.NewReader(raw))
	if err != nil {
		t.Fatalf("net/mail: %v", err)
	}
	mt, params, err := mime.ParseMediaType(msg.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/mixed" {
		t.Fatalf("Content-Type %q: %v", msg.Header.Get("Content-Type"), err)
	}
	p := parsedReport{header: msg.Header}
	mr := multipart.NewReader(msg.Body, params["boundary"])
	for i := 0; ; i++ {
		part, err := mr.NextRawPart()
		if err == io.EOF {
			if i != 2 {
				t.Fatalf("%d MIME parts, want 2", i)
			}
			break
		}
		if err != nil {
			t.Fatalf("part %d: %v", i, err)
		}
		h := map[string]string{}
		for k := range part.Header {
			h[k] = part.Header.Get(k)
		}
		if h["Content-Transfer-Encoding"] != "quoted-printable" {
			t.Fatalf("part %d: Content-Transfer-Encoding %q", i, h["Content-Transfer-Encoding"])
		}
		body, err := io.ReadAll(quotedprintable.NewReader(part))
		if err != nil {
			t.Fatalf("part %d: quoted-printable: %v", i, err)
		}
		switch i {
		case 0:
			p.textHeader = h
			p.text = strings.ReplaceAll(string(body), "\r\n", "\n")
		case 1:
			p.jsonHeader = h
			p.json = body
		}
	}
	return p
}

// checkWire checks what every message must be on the wire: CRLF line
// endings only, no line over 998 octets, 7-bit, no NUL.
func checkWire(t testing.TB, raw []byte) {
	t.Helper()
	if !bytes.HasSuffix(raw, []byte("\r\n")) {
		t.Errorf("message does not end in CRLF")
	}
	for i, c := range raw {
		switch {
		case c == '\n' && (i == 0 || raw[i-1] != '\r'):
			t.Fatalf("bare LF at %d: %q", i, around(raw, i))
		case c == '\r' && (i+1 == len(raw) || raw[i+1] != '\n'):
			t.Fatalf("bare CR at %d: %q", i, around(raw, i))
		case c >= 0x80:
			t.Fatalf("8-bit byte at %d: %q", i, around(raw, i))
		case c == 0:
			t.Fatalf("NUL at %d", i)
		}
	}
	for n, line := range bytes.Split(raw, []byte("\r\n")) {
		if len(line) > 998 {
			t.Fatalf("line %d is %d octets: %.80q...", n+1, len(line), line)
		}
	}
}

func around(b []byte, i int) []byte {
	return b[max(0, i-40):min(len(b), i+40)]
}

func compose(t testing.TB, r notify.Report) []byte {
	t.Helper()
	raw, err := notify.Compose(r, testFrom, testTo)
	if err != nil {
		t.Fatalf("Compose: %v", err)
	}
	return raw
}

// golden compares got with testdata/name, or rewrites it with -update.
func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs (go test -update rewrites it):\n--- got\n%s\n--- want\n%s", path, got, want)
	}
}

func TestComposeGolden(t *testing.T) {
	block := fixedReport()
	block.RetroactiveHold = true
	block.QueueSpace = &notify.QueueSpace{FreeBytes: 1610612736, FreeRatio: 0.043, Low: true}

	would := fixedReport()
	would.Kind, would.Mode = notify.KindWouldBlock, "monitor"
	would.QueueIDs = nil

	warn := fixedReport()
	warn.Kind, warn.Count, warn.Action, warn.QueueIDs = notify.KindWarning, 75, "", nil

	ip := fixedReport()
	ip.Identity = "192.0.2.55"
	ip.Action = "HOLD rcptguard: 192.0.2.55 blocked: 101 invalid recipients within 1h"
	ip.Period = 90 * time.Minute

	for _, tc := range []struct {
		name string
		r    notify.Report
	}{
		{"block", block},
		{"would-block", would},
		{"warning", warn},
		{"block-ip", ip},
		{"held", heldReport()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw := compose(t, tc.r)
			p := parseReport(t, raw)
			golden(t, tc.name+".golden", []byte(p.text))
			if tc.name == "block" {
				golden(t, "block.json.golden", p.json)
				golden(t, "block.eml.golden", raw)
			}
			if tc.name == "held" {
				golden(t, "held.json.golden", p.json)
			}
		})
	}

	t.Run("user-warning", func(t *testing.T) {
		raw, err := notify.ComposeUserWarning(warn, testFrom, testTo)
		if err != nil {
			t.Fatal(err)
		}
		checkWire(t, raw)
		golden(t, "user-warning.eml.golden", raw)
	})
}

func TestComposeHeaders(t *testing.T) {
	r := fixedReport()
	r.MessageID = ""
	raw := compose(t, r)
	p := parseReport(t, raw)
	h := p.header

	date, err := h.Date()
	if err != nil || !date.Equal(r.Time) {
		t.Errorf("Date %q: %v, want %v", h.Get("Date"), err, r.Time)
	}
	if id := h.Get("Message-ID"); !regexp.MustCompile(`^<[0-9a-f]{32}@mail1\.example\.net>$`).MatchString(id) {
		t.Errorf("Message-ID %q", id)
	}
	if got := h.Get("Auto-Submitted"); got != "auto-generated" {
		t.Errorf("Auto-Submitted %q", got)
	}
	if got := h.Get("MIME-Version"); got != "1.0" {
		t.Errorf("MIME-Version %q", got)
	}
	from, err := h.AddressList("From")
	if err != nil || len(from) != 1 || from[0].Address != "rcptguard@mail1.example.net" || from[0].Name != "rcptguard" {
		t.Errorf("From %q: %v", h.Get("From"), err)
	}
	to, err := h.AddressList("To")
	if err != nil || len(to) != 2 || to[0].Address != "abuse@example.com" || to[1].Address != "desk@example.com" || to[1].Name != "Abuse Desk" {
		t.Errorf("To %q: %v", h.Get("To"), err)
	}
	if got, want := h.Get("Subject"), "[rcptguard] blocked alice@example.com: 101 invalid recipients in 1h"; got != want {
		t.Errorf("Subject %q, want %q", got, want)
	}
	if got := h.Get("X-Rcptguard-Identity"); got != "alice@example.com" {
		t.Errorf("X-Rcptguard-Identity %q", got)
	}

	if got := p.textHeader["Content-Type"]; got != "text/plain; charset=utf-8" {
		t.Errorf("text part Content-Type %q", got)
	}
	mt, params, err := mime.ParseMediaType(p.jsonHeader["Content-Type"])
	if err != nil || mt != "application/json" || params["name"] != "report.json" {
		t.Errorf("JSON part Content-Type %q", p.jsonHeader["Content-Type"])
	}
	if _, params, err := mime.ParseMediaType(p.jsonHeader["Content-Disposition"]); err != nil || params["filename"] != "report.json" {
		t.Errorf("JSON part Content-Disposition %q", p.jsonHeader["Content-Disposition"])
	}

	// Two messages never share a Message-ID.
	again := parseReport(t, compose(t, r))
	if again.header.Get("Message-ID") == h.Get("Message-ID") {
		t.Error("Message-ID repeated")
	}

	// The body names every fact the issue asks for.
	for _, want := range []string{
		"alice@example.com", "2024-03-05T14:03:07+01:00", "Tuesday 5 March 2024, 14:03:07 CET",
		"enforce", "101 invalid recipients", "100 invalid recipients", "Window:      1h",
		"198.51.100.23, reverse name dsl-23.example.org, 95 requests", "203.0.113.7, no reverse name, 6 requests",
		"nobody@example.net (mailbox-unknown, 2024-03-05T14:02:55+01:00)",
		"mx.example.net replied: 550 5.1.1 <nobody@example.net>: Recipient address rejected: User unknown",
		"- 4F2A1C0E3B",
		"   rcptguard unblock 'alice@example.com'\n",
		"   rcptguard held 'alice@example.com'\n",
		"   rcptguard release -n 'alice@example.com'\n   rcptguard release 'alice@example.com'\n",
		"   rcptguard purge -n 'alice@example.com'\n   rcptguard purge 'alice@example.com'\n",
	} {
		if !strings.Contains(p.text, want) {
			t.Errorf("text body lacks %q", want)
		}
	}
}

// reportJSON mirrors the documented JSON fields.
type reportJSON struct {
	Version       int    `json:"version"`
	Kind          string `json:"kind"`
	Identity      string `json:"identity"`
	Time          string `json:"time"`
	Mode          string `json:"mode"`
	Count         int    `json:"count"`
	Limit         int    `json:"limit"`
	Period        string `json:"period"`
	PeriodSeconds int64  `json:"period_seconds"`
	Action        string `json:"action"`
	Hostname      string `json:"hostname"`
	Clients       []struct {
		Address string `json:"address"`
		Name    string `json:"name"`
		Count   int    `json:"count"`
	} `json:"clients"`
	Recipients []struct {
		Address string `json:"address"`
		Time    string `json:"time"`
		Reason  string `json:"reason"`
		MX      string `json:"mx"`
		Reply   string `json:"reply"`
	} `json:"recipients"`
	QueueIDs        []string `json:"queue_ids"`
	RetroactiveHold bool     `json:"retroactive_hold"`
	BlockedAt       string   `json:"blocked_at"`
	Held            []struct {
		QueueID    string `json:"queue_id"`
		Arrival    string `json:"arrival"`
		Size       int64  `json:"size"`
		Recipients int    `json:"recipients"`
	} `json:"held"`
	HeldCount int `json:"held_count"`
	QueueFS   *struct {
		FreeBytes uint64  `json:"free_bytes"`
		FreeRatio float64 `json:"free_ratio"`
		Low       bool    `json:"low"`
	} `json:"queue_fs"`
	Commands map[string][]string `json:"commands"`
}

func decodeJSON(t testing.TB, b []byte) reportJSON {
	t.Helper()
	var j reportJSON
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&j); err != nil {
		t.Fatalf("JSON part: %v\n%s", err, b)
	}
	return j
}

func TestComposeJSONMatchesReport(t *testing.T) {
	r := fixedReport()
	j := decodeJSON(t, parseReport(t, compose(t, r)).json)
	if j.Version != 1 || j.Kind != "block" || j.Identity != r.Identity || j.Mode != "enforce" ||
		j.Count != 101 || j.Limit != 100 || j.Period != "1h" || j.PeriodSeconds != 3600 ||
		j.Action != r.Action || j.Hostname != "mail1.example.net" {
		t.Errorf("facts: %+v", j)
	}
	if tm, err := time.Parse(time.RFC3339, j.Time); err != nil || !tm.Equal(r.Time) {
		t.Errorf("time %q: %v", j.Time, err)
	}
	if len(j.Clients) != len(r.Clients) {
		t.Fatalf("clients %+v", j.Clients)
	}
	for i, c := range r.Clients {
		if j.Clients[i].Address != c.Address || j.Clients[i].Name != c.Name || j.Clients[i].Count != c.Count {
			t.Errorf("client %d: %+v, want %+v", i, j.Clients[i], c)
		}
	}
	if len(j.Recipients) != len(r.Recipients) {
		t.Fatalf("recipients %+v", j.Recipients)
	}
	for i, rc := range r.Recipients {
		got := j.Recipients[i]
		if got.Address != rc.Address || got.Reason != rc.Reason || got.MX != rc.MX || got.Reply != rc.Reply {
			t.Errorf("recipient %d: %+v, want %+v", i, got, rc)
		}
		if rc.Time.IsZero() {
			if got.Time != "" {
				t.Errorf("recipient %d: time %q, want none", i, got.Time)
			}
		} else if tm, err := time.Parse(time.RFC3339, got.Time); err != nil || !tm.Equal(rc.Time) {
			t.Errorf("recipient %d: time %q, want %v", i, got.Time, rc.Time)
		}
	}
	if !slices.Equal(j.QueueIDs, r.QueueIDs) {
		t.Errorf("queue_ids %q", j.QueueIDs)
	}

	// Empty lists are [], not null.
	r.Clients, r.Recipients, r.QueueIDs = nil, nil, nil
	raw := parseReport(t, compose(t, r)).json
	for _, k := range []string{`"clients": []`, `"recipients": []`, `"queue_ids": []`} {
		if !bytes.Contains(raw, []byte(k)) {
			t.Errorf("JSON lacks %s:\n%s", k, raw)
		}
	}
}

func TestComposeSubjects(t *testing.T) {
	for _, tc := range []struct {
		kind   notify.Kind
		period time.Duration
		want   string
	}{
		{notify.KindBlock, time.Hour, "[rcptguard] blocked alice@example.com: 101 invalid recipients in 1h"},
		{notify.KindBlock, 90 * time.Minute, "[rcptguard] blocked alice@example.com: 101 invalid recipients in 90m"},
		{notify.KindBlock, 48 * time.Hour, "[rcptguard] blocked alice@example.com: 101 invalid recipients in 2d"},
		{notify.KindWouldBlock, time.Hour, "[rcptguard] would block alice@example.com: 101 invalid recipients in 1h"},
		{notify.KindWarning, time.Hour, "[rcptguard] warning alice@example.com: 101 of 100"},
	} {
		r := fixedReport()
		r.Kind, r.Period = tc.kind, tc.period
		p := parseReport(t, compose(t, r))
		if got := p.header.Get("Subject"); got != tc.want {
			t.Errorf("Subject %q, want %q", got, tc.want)
		}
	}
}

func TestComposeNonASCIISubjectIsEncoded(t *testing.T) {
	r := fixedReport()
	r.Identity = "jörg.müller@bücher.example"
	raw := compose(t, r)
	p := parseReport(t, raw)
	dec := new(mime.WordDecoder)
	got, err := dec.DecodeHeader(p.header.Get("Subject"))
	if err != nil {
		t.Fatal(err)
	}
	if want := "[rcptguard] blocked jörg.müller@bücher.example: 101 invalid recipients in 1h"; got != want {
		t.Errorf("Subject %q, want %q", got, want)
	}
	if !strings.Contains(p.text, "rcptguard unblock 'jörg.müller@bücher.example'") {
		t.Errorf("unblock command not quoted:\n%s", p.text)
	}
}

func TestComposeShellQuoting(t *testing.T) {
	for _, tc := range []struct{ id, want string }{
		{"plain.user+tag@example.com", "rcptguard unblock 'plain.user+tag@example.com'\n"},
		{"o'brien@example.com", `rcptguard unblock 'o'\''brien@example.com'` + "\n"},
		{"$(rm -rf /)@example.com", "rcptguard unblock '$(rm -rf /)@example.com'\n"},
		{"-rf", "rcptguard unblock -- '-rf'\n"},
		{"-x@y", "rcptguard release -n -- '-x@y'\n"},
		{"-x@y", "rcptguard purge -- '-x@y'\n"},
		{"-x@y", "rcptguard held -- '-x@y'\n"},
		{"--", "rcptguard unblock -- '--'\n"},
		{"user name", "rcptguard unblock 'user name'\n"},
	} {
		r := fixedReport()
		r.Identity = tc.id
		p := parseReport(t, compose(t, r))
		if !strings.Contains(p.text, tc.want) {
			t.Errorf("identity %q: body lacks %q:\n%s", tc.id, tc.want, p.text)
		}
	}
}

// hostile values for the injection tests.
var hostile = []string{
	"evil@example.com\r\nBcc: victim@example.net",
	"evil@example.com\nSubject: injected",
	"evil\r\n\r\nbody injected",
	"\xff\xfe\xfd invalid utf-8",
	"ünïcödé@exämple.com",
	"rtl\u202egnp.exe@example.com",
	"nul\x00byte\x7fdel\u0085nel\u2028ls",
	strings.Repeat("a", 2000),
	strings.Repeat("ü", 2000),
	strings.Repeat("a ", 1000),
	"=?utf-8?q?encoded?=",
	"line\r\n.\r\nQUIT",
}

func TestComposeInjection(t *testing.T) {
	for i, v := range hostile {
		r := fixedReport()
		r.MessageID = ""
		r.Identity = v
		r.Action = "HOLD rcptguard: " + v
		r.Clients = []notify.Client{{Address: v, Name: v, Count: 1}}
		r.Recipients = []notify.Recipient{{Address: v, Reason: v, MX: v, Reply: "550 " + v}}
		r.QueueIDs = []string{v}
		r.Hostname = v
		for _, kind := range []notify.Kind{notify.KindBlock, notify.KindWouldBlock, notify.KindWarning} {
			r.Kind = kind
			raw := compose(t, r)
			p := parseReport(t, raw)
			checkHeaderFields(t, p.header, []string{
				"Date", "From", "To", "Subject", "Message-Id", "Auto-Submitted",
				"X-Rcptguard-Kind", "X-Rcptguard-Identity", "Mime-Version", "Content-Type",
			})
			j := decodeJSON(t, p.json)
			if want := strings.ToValidUTF8(v, "\uFFFD"); j.Identity != want {
				t.Errorf("value %d: JSON identity %q, want %q", i, j.Identity, want)
			}
			for _, line := range strings.Split(p.text, "\n") {
				if strings.ContainsAny(line, "\r\x00\u202e\u2028\u0085") {
					t.Errorf("value %d: text line with a control character: %q", i, line)
				}
			}
			if strings.Contains(p.text, "\nBcc:") || strings.Contains(p.text, "\nSubject:") {
				t.Errorf("value %d: injected line in the text", i)
			}
		}
		r.Kind = notify.KindWarning
		if _, ok := r.UserAddress(); ok {
			t.Errorf("value %d: hostile identity accepted as a user address", i)
		}
	}
}

// checkHeaderFields checks that the header holds exactly the expected
// fields, once each, all ASCII, none with CR or LF after unfolding.
func checkHeaderFields(t testing.TB, h mail.Header, want []string) {
	t.Helper()
	var got []string
	for k, vs := range h {
		got = append(got, k)
		if len(vs) != 1 {
			t.Errorf("header %s appears %d times", k, len(vs))
		}
		for _, v := range vs {
			if strings.ContainsAny(v, "\r\n") {
				t.Errorf("header %s: %q", k, v)
			}
		}
	}
	slices.Sort(got)
	want = slices.Clone(want)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("header fields %q, want %q", got, want)
	}
}

func TestComposeTooManyItems(t *testing.T) {
	r := fixedReport()
	r.Recipients = nil
	for i := range 50 {
		r.Recipients = append(r.Recipients, notify.Recipient{Address: strings.Repeat("x", i+1) + "@example.net", Reason: "mailbox-unknown"})
	}
	r.QueueIDs = nil
	for range 150 {
		r.QueueIDs = append(r.QueueIDs, "ABCDEF0123")
	}
	// A client address: its mail has no SASL login, so the report names
	// the held messages by queue ID.
	r.Identity = "192.0.2.55"
	p := parseReport(t, compose(t, r))
	if n := strings.Count(p.text, "(mailbox-unknown)"); n != 20 {
		t.Errorf("%d recipients shown, want 20", n)
	}
	if !strings.Contains(p.text, "20 shown of 101") {
		t.Errorf("no count of shown recipients:\n%s", p.text)
	}
	if n := strings.Count(p.text, "postsuper -H "); n != 100 {
		t.Errorf("%d release commands, want 100", n)
	}
	j := decodeJSON(t, p.json)
	if len(j.Recipients) != 20 || len(j.QueueIDs) != 100 {
		t.Errorf("JSON: %d recipients, %d queue IDs", len(j.Recipients), len(j.QueueIDs))
	}
}

func TestComposeRejects(t *testing.T) {
	ok := fixedReport()
	for _, tc := range []struct {
		name string
		r    func() notify.Report
		from string
		to   []string
	}{
		{"kind", func() notify.Report { r := ok; r.Kind = "bogus"; return r }, testFrom, testTo},
		{"identity", func() notify.Report { r := ok; r.Identity = ""; return r }, testFrom, testTo},
		{"time", func() notify.Report { r := ok; r.Time = time.Time{}; return r }, testFrom, testTo},
		{"message-id", func() notify.Report { r := ok; r.MessageID = "a\r\nb@c"; return r }, testFrom, testTo},
		{"from", func() notify.Report { return ok }, "not an address", testTo},
		{"from-8bit", func() notify.Report { return ok }, "rcptgüard@example.com", testTo},
		{"to", func() notify.Report { return ok }, testFrom, []string{"abuse@example.com\r\nBcc: x@y"}},
		{"no-to", func() notify.Report { return ok }, testFrom, nil},
	} {
		if _, err := notify.Compose(tc.r(), tc.from, tc.to); err == nil {
			t.Errorf("%s: no error", tc.name)
		}
	}
}

func TestUserWarning(t *testing.T) {
	r := fixedReport()
	r.Kind, r.Count, r.Action = notify.KindWarning, 75, ""
	addr, ok := r.UserAddress()
	if !ok || addr != "alice@example.com" {
		t.Fatalf("UserAddress = %q, %v", addr, ok)
	}
	raw, err := notify.ComposeUserWarning(r, testFrom, testTo)
	if err != nil {
		t.Fatal(err)
	}
	checkWire(t, raw)
	msg, err := mail.ReadMessage(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	checkHeaderFields(t, msg.Header, []string{"Date", "From", "To", "Reply-To", "Subject", "Message-Id",
		"Auto-Submitted", "Mime-Version", "Content-Type", "Content-Transfer-Encoding"})
	if to := msg.Header.Get("To"); to != "<alice@example.com>" {
		t.Errorf("To %q", to)
	}
	if rt := msg.Header.Get("Reply-To"); !strings.Contains(rt, "abuse@example.com") {
		t.Errorf("Reply-To %q", rt)
	}
	body, err := io.ReadAll(quotedprintable.NewReader(msg.Body))
	if err != nil {
		t.Fatal(err)
	}
	text := strings.Join(strings.Fields(string(body)), " ")
	for _, want := range []string{"alice@example.com", "75 addresses that do not exist", "change your password", "support"} {
		if !strings.Contains(text, want) {
			t.Errorf("user warning lacks %q:\n%s", want, text)
		}
	}
	for _, banned := range []string{"rcptguard unblock", "postsuper", "postqueue", "MX", "550", "198.51.100.23", "nobody@example.net"} {
		if strings.Contains(text, banned) {
			t.Errorf("user warning shows %q:\n%s", banned, text)
		}
	}

	for _, id := range []string{"192.0.2.55", "jdoe", "Alice <alice@example.com>", "jörg@example.com"} {
		r.Identity = id
		if _, ok := r.UserAddress(); ok {
			t.Errorf("%q taken as a user address", id)
		}
		if _, err := notify.ComposeUserWarning(r, testFrom, nil); err == nil {
			t.Errorf("%q: user warning composed", id)
		}
	}
	r.Identity, r.Kind = "alice@example.com", notify.KindBlock
	if _, ok := r.UserAddress(); ok {
		t.Error("block report taken for a user warning")
	}
}

func TestSampleReportComposes(t *testing.T) {
	r := notify.SampleReport(time.Date(2024, 3, 5, 14, 3, 7, 0, time.UTC), "mail1.example.net")
	p := parseReport(t, compose(t, r))
	if !strings.Contains(p.header.Get("Subject"), "sample.user@example.com") {
		t.Errorf("Subject %q", p.header.Get("Subject"))
	}
	if j := decodeJSON(t, p.json); len(j.Recipients) != 3 || len(j.QueueIDs) != 2 {
		t.Errorf("sample JSON %+v", j)
	}
}

// The JSON part's commands are the text's, as argument vectors: the
// identity last, after "--" when it starts with '-'.
func TestComposeCommandsJSON(t *testing.T) {
	for _, tc := range []struct {
		kind  notify.Kind
		id    string
		names []string
	}{
		{notify.KindBlock, "alice@example.com", []string{"held", "purge", "purge_dry_run", "release", "release_dry_run", "unblock"}},
		{notify.KindBlock, "-x@y", []string{"held", "purge", "purge_dry_run", "release", "release_dry_run", "unblock"}},
		{notify.KindHeld, "alice@example.com", []string{"held", "purge", "purge_dry_run", "release", "release_dry_run", "unblock"}},
		{notify.KindBlock, "192.0.2.55", []string{"unblock"}},
		{notify.KindWarning, "alice@example.com", []string{"block"}},
		{notify.KindBlock, "bad\x00id", nil},
	} {
		r := fixedReport()
		if tc.kind == notify.KindHeld {
			r = heldReport()
		}
		r.Kind, r.Identity = tc.kind, tc.id
		if tc.kind == notify.KindWarning {
			r.Action, r.QueueIDs = "", nil
		}
		p := parseReport(t, compose(t, r))
		j := decodeJSON(t, p.json)
		var names []string
		for name, argv := range j.Commands {
			names = append(names, name)
			want := []string{"rcptguard"}
			switch name {
			case "release_dry_run":
				want = append(want, "release", "-n")
			case "purge_dry_run":
				want = append(want, "purge", "-n")
			default:
				want = append(want, name)
			}
			line := strings.Join(want, " ")
			if strings.HasPrefix(tc.id, "-") {
				want = append(want, "--")
				line += " --"
			}
			want = append(want, tc.id)
			if !slices.Equal(argv, want) {
				t.Errorf("%s %q: %s = %q, want %q", tc.kind, tc.id, name, argv, want)
			}
			if line += " '" + tc.id + "'\n"; !strings.Contains(p.text, line) {
				t.Errorf("%s %q: text lacks %q:\n%s", tc.kind, tc.id, line, p.text)
			}
		}
		slices.Sort(names)
		if !slices.Equal(names, tc.names) {
			t.Errorf("%s %q: commands %v, want %v", tc.kind, tc.id, names, tc.names)
		}
	}
}

func TestComposeHeldAndQueueSpace(t *testing.T) {
	r := heldReport()
	r.Held = append(r.Held, notify.HeldMessage{QueueID: "-rf", Size: 1}, notify.HeldMessage{QueueID: "ABC DEF0123", Size: 1})
	r.HeldCount = 1500
	r.QueueSpace = &notify.QueueSpace{FreeBytes: 5 << 20, FreeRatio: 0.0123456, Low: true}
	raw := compose(t, r)
	p := parseReport(t, raw)
	if !strings.Contains(string(raw), "Subject: [rcptguard] held 1500 messages already queued of alice@example.com\r\n") {
		t.Errorf("subject:\n%s", raw)
	}
	for _, want := range []string{"Held retroactively, by Postfix queue ID (1500):", "(1498 more not shown)", "nearly full: 5.0 MiB free", "Blocked at:  2024-03-05T14:03:07+01:00"} {
		if !strings.Contains(p.text, want) {
			t.Errorf("text lacks %q:\n%s", want, p.text)
		}
	}
	if strings.Contains(p.text, "-rf") || strings.Contains(p.text, "ABC DEF") {
		t.Errorf("a queue ID that is not one is shown:\n%s", p.text)
	}
	j := decodeJSON(t, p.json)
	if j.Kind != "held" || len(j.Held) != 2 || j.HeldCount != 1500 || j.Held[0].QueueID != "4Xk2Lf1ZqQz9vAa" || j.Held[0].Size != 2817 ||
		j.Held[0].Recipients != 3 || j.Held[0].Arrival != "2024-03-05T13:16:07+01:00" || j.BlockedAt != "2024-03-05T14:03:07+01:00" {
		t.Errorf("held JSON: %+v", j)
	}
	if j.QueueFS == nil || !j.QueueFS.Low || j.QueueFS.FreeBytes != 5<<20 || j.QueueFS.FreeRatio != 0.0123 {
		t.Errorf("queue_fs: %+v", j.QueueFS)
	}

	// Room on the disk: the numbers, no warning.
	b := fixedReport()
	b.QueueSpace = &notify.QueueSpace{FreeBytes: 50 << 30, FreeRatio: 0.5}
	p = parseReport(t, compose(t, b))
	if strings.Contains(p.text, "nearly full") || strings.Contains(p.text, "follow-up") {
		t.Errorf("warning or follow-up without cause:\n%s", p.text)
	}
	if j := decodeJSON(t, p.json); j.QueueFS == nil || j.QueueFS.Low || j.QueueFS.FreeRatio != 0.5 || j.RetroactiveHold {
		t.Errorf("queue_fs %+v, retroactive_hold %v", j.QueueFS, j.RetroactiveHold)
	}
}
