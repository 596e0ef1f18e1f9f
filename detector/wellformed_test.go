package detector

import (
	"bufio"
	"bytes"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func TestValidQueueID(t *testing.T) {
	for _, tt := range []struct {
		id string
		ok bool
	}{
		// Short form: 5 hex digits of microseconds, then the inode in hex.
		{"4F2A1C0E3B", true},
		{"3F1B2C4D5E", true},
		{"ABCDEF", true},
		{"0123456789ABCDEF01234", true},
		{"ABCDE", false},       // too short
		{"4f2a1c0e3b", false},  // hex is upper case
		{"4F2A1C0E3G", false},  // G is not hex, and there is no 'z'
		{"4F2A-1C0E3B", false}, // punctuation
		// Long form: time in base 52 (10+ characters), 'z', inode in base 51.
		{"4Xk2Lm0bQrz9vWt", true},
		{"4Xk2Ln3HcPz9vWx", true},
		{"4dTq2H5mZxz3", true},     // 'z' inside the time part
		{"zzzzzzzzzzzB", true},     // the last 'z' separates
		{"4Xk2Lm0bQrz", false},     // no inode
		{"4Xk2Lm0bQz9vWt", false},  // time part of 9
		{"4Xk2Lm0bQra9vWt", false}, // vowel, no separator
		{"4Xk2Lm0bQrz9vAt", false}, // vowel A in the long form
		{"4Xk2Lm0bQrz9v_t", false}, // underscore
		{"", false},
		{"-dALL", false},
		{"--", false},
		{"ALL", false},
		{"$(touch /tmp/pwned)", false},
		{"4Xk2Lm0bQrz9vWt client=203.0.113.99", false},
		{"client=203.0.113.99", false},
		{strings.Repeat("B", 30) + "z" + "B", true},
		{strings.Repeat("B", 40) + "z" + "B", false}, // longer than any Postfix makes
	} {
		if got := validQueueID(tt.id); got != tt.ok {
			t.Errorf("validQueueID(%q) = %v, want %v", tt.id, got, tt.ok)
		}
	}
}

func TestValidHostName(t *testing.T) {
	label63 := strings.Repeat("a", 63)
	name255 := label63 + "." + label63 + "." + label63 + "." + label63 // 255 octets
	name256 := label63 + "." + label63 + "." + label63 + "." + strings.Repeat("b", 62) + ".b"
	for _, tt := range []struct {
		name string
		ok   bool
	}{
		{"dsl-203-0-113-45.example.net", true},
		{"MAIL.Example.COM", true},
		{"under_score.example", true},
		{"localhost", true},
		{"xn--bcher-kva.example", true},
		{name255, true},
		{name256, false},
		{label63 + ".x", true},
		{label63 + "a.x", false},
		{"unknown", true},
		{"", false},
		{".example.com", false},
		{"example.com.", false},
		{"a..b", false},
		{"-a.example", false},
		{"a-.example", false},
		{"a.-b", false},
		{"bücher.example", false},
		{"evil\x1b]0;x\x07\r.example", false},
		{"a b", false},
		{"x client=203.0.113.99", false},
		{"client=203.0.113.99", false},
		{strings.Repeat("a.", 4096) + "a", false},
	} {
		if got := validClientName(tt.name); got != tt.ok {
			t.Errorf("validClientName(%q) = %v, want %v", tt.name, got, tt.ok)
		}
	}
}

// TestMalformedValuesDropped reads requests with values that are not
// well-formed: they are emptied, listed for the log, and logged bounded
// and quoted; the rest of the request is kept.
func TestMalformedValuesDropped(t *testing.T) {
	big := strings.Repeat("x", 8000)
	for _, tt := range []struct {
		name, attr, value string
		keep              bool
	}{
		{"queue id", "queue_id", "4F2A1C0E3B", true},
		{"long queue id", "queue_id", "4Xk2Lm0bQrz9vWt", true},
		{"option as queue id", "queue_id", "-dALL", false},
		{"shell in queue id", "queue_id", "$(touch /tmp/pwned)", false},
		{"fail2ban bait in queue id", "queue_id", "4F2A1C0E3B client=203.0.113.99", false},
		{"IPv4", "client_address", "198.51.100.23", true},
		{"IPv6", "client_address", "2001:db8::17", true},
		{"IPv6 with zone", "client_address", "fe80::1%eth0", false},
		{"8 KB address", "client_address", big, false},
		{"name as address", "client_address", "mail.example.com", false},
		{"client name", "client_name", "dsl-198-51-100-23.example.net", true},
		{"unknown client name", "client_name", "unknown", true},
		{"8 KB client name", "client_name", big, false},
		{"escape in client name", "client_name", "evil\x1b]0;x\x07\r.example", false},
		{"reverse name", "reverse_client_name", "dsl.example.net", true},
		{"bad reverse name", "reverse_client_name", "a b", false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			in := "request=smtpd_access_policy\nprotocol_state=RCPT\nsasl_username=alice@example.com\n" +
				tt.attr + "=" + tt.value + "\n\n"
			req, err := ReadRequest(bufio.NewReaderSize(strings.NewReader(in), DefaultMaxLine+2), Limits{})
			if err != nil {
				t.Fatal(err)
			}
			got := req.Get(tt.attr)
			if req.SASLUsername != "alice@example.com" || req.ProtocolState != "RCPT" {
				t.Fatalf("other values lost: %+v", req)
			}
			if tt.keep {
				if got != tt.value || req.Dropped != nil {
					t.Fatalf("%s = %q, dropped %v; want it kept", tt.attr, got, req.Dropped)
				}
				return
			}
			if got != "" || len(req.Dropped) != 1 || req.Dropped[0].Name != tt.attr ||
				!strings.HasPrefix(tt.value, req.Dropped[0].Value) || len(req.Dropped[0].Value) > maxDroppedValue {
				t.Fatalf("%s = %q, dropped %+v; want it dropped", tt.attr, got, req.Dropped)
			}
			var logs bytes.Buffer
			req.logDropped(slog.New(slog.NewTextHandler(&logs, nil)))
			line := logs.String()
			if strings.Count(line, "\n") != 1 || !strings.Contains(line, "attribute="+tt.attr) || len(line) > 400 ||
				strings.ContainsAny(strings.TrimSuffix(line, "\n"), "\x1b\r\n\x07") {
				t.Fatalf("log line %q", line)
			}
		})
	}
}

// checkWellFormed fails t when req holds a value that dropMalformed must
// have removed.
func checkWellFormed(t *testing.T, req *Request) {
	t.Helper()
	if req.QueueID != "" && (!validQueueID(req.QueueID) || strings.HasPrefix(req.QueueID, "-")) {
		t.Fatalf("queue_id %q kept", req.QueueID)
	}
	if req.ClientAddress != "" {
		if _, err := netip.ParseAddr(req.ClientAddress); err != nil || strings.Contains(req.ClientAddress, "%") {
			t.Fatalf("client_address %q kept", req.ClientAddress)
		}
	}
	for _, n := range []string{req.ClientName, req.ReverseClientName} {
		if n != "" && (len(n) > 255 || strings.ContainsFunc(n, func(r rune) bool {
			return !slices.Contains([]rune("-._"), r) && !('a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9')
		})) {
			t.Fatalf("client name %q kept", n)
		}
	}
	for _, d := range req.Dropped {
		if len(d.Value) > maxDroppedValue {
			t.Fatalf("dropped value of %d bytes kept", len(d.Value))
		}
	}
}
