package detector

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
)

// policyFullRequest is a request as Postfix 3.x sends it for a RCPT TO from an
// authenticated client over TLS: every documented attribute, in Postfix's
// order, SASL and TLS fields filled.
const policyFullRequest = "request=smtpd_access_policy\n" +
	"protocol_state=RCPT\n" +
	"protocol_name=ESMTPSA\n" +
	"client_address=203.0.113.45\n" +
	"client_name=dsl-203-0-113-45.example.net\n" +
	"client_port=52144\n" +
	"reverse_client_name=dsl-203-0-113-45.example.net\n" +
	"server_address=192.0.2.10\n" +
	"server_port=587\n" +
	"helo_name=[192.168.1.23]\n" +
	"sender=alice@example.com\n" +
	"recipient=bob@example.org\n" +
	"recipient_count=0\n" +
	"queue_id=\n" +
	"instance=3c1a.6744a1f2.9b2e4.0\n" +
	"size=0\n" +
	"etrn_domain=\n" +
	"stress=\n" +
	"sasl_method=PLAIN\n" +
	"sasl_username=alice@example.com\n" +
	"sasl_sender=\n" +
	"ccert_subject=\n" +
	"ccert_issuer=\n" +
	"ccert_fingerprint=\n" +
	"ccert_pubkey_fingerprint=\n" +
	"encryption_protocol=TLSv1.3\n" +
	"encryption_cipher=TLS_AES_256_GCM_SHA384\n" +
	"encryption_keysize=256\n" +
	"policy_context=submission\n" +
	"compatibility_level=3.6\n" +
	"mail_version=3.7.11\n" +
	"\n"

// policyFullWant is policyFullRequest parsed.
var policyFullWant = Request{
	Request:            "smtpd_access_policy",
	ProtocolState:      "RCPT",
	ProtocolName:       "ESMTPSA",
	ClientAddress:      "203.0.113.45",
	ClientName:         "dsl-203-0-113-45.example.net",
	ClientPort:         "52144",
	ReverseClientName:  "dsl-203-0-113-45.example.net",
	ServerAddress:      "192.0.2.10",
	ServerPort:         "587",
	HeloName:           "[192.168.1.23]",
	Sender:             "alice@example.com",
	Recipient:          "bob@example.org",
	RecipientCount:     "0",
	Instance:           "3c1a.6744a1f2.9b2e4.0",
	Size:               "0",
	SASLMethod:         "PLAIN",
	SASLUsername:       "alice@example.com",
	EncryptionProtocol: "TLSv1.3",
	EncryptionCipher:   "TLS_AES_256_GCM_SHA384",
	EncryptionKeysize:  "256",
	PolicyContext:      "submission",
	CompatibilityLevel: "3.6",
	MailVersion:        "3.7.11",
}

// policyReadTest is one ReadRequest case. The fuzzer seeds its corpus from
// policyReadTests too.
type policyReadTest struct {
	name    string
	in      string
	lim     Limits
	want    Request // when wantErr is nil
	wantErr error   // matched with errors.Is; io.EOF must be returned unwrapped
}

var policyReadTests = []policyReadTest{
	{name: "full Postfix 3.x request", in: policyFullRequest, want: policyFullWant},
	{
		name: "CRLF lines",
		in:   "request=smtpd_access_policy\r\nprotocol_state=RCPT\r\nrecipient=bob@example.org\r\n\r\n",
		want: Request{Request: "smtpd_access_policy", ProtocolState: "RCPT", Recipient: "bob@example.org"},
	},
	{
		name: "only one trailing CR is removed, inner CR kept",
		in:   "helo_name=a\rb\r\r\n\n",
		want: Request{HeloName: "a\rb\r"},
	},
	{name: "line without '='", in: "request=smtpd_access_policy\nprotocol_state\n\n", wantErr: ErrMalformed},
	{name: "empty name", in: "=value\n\n", wantErr: ErrMalformed},
	{
		name: "duplicate attribute: last wins",
		in:   "recipient=first@example.org\nrecipient=second@example.org\nx=1\nx=2\n\n",
		want: Request{Recipient: "second@example.org", Attrs: map[string]string{"x": "2"}},
	},
	{name: "empty value", in: "sasl_username=\nsender=\n\n", want: Request{}},
	{
		name: "value containing '='",
		in:   "recipient=a=b@example.org\nccert_subject=CN=mail,O=Example\n\n",
		want: Request{Recipient: "a=b@example.org", CCertSubject: "CN=mail,O=Example"},
	},
	{
		name: "unknown attributes go to Attrs, case kept",
		in:   "request=smtpd_access_policy\nRecipient=X@example.org\nfuture_attr=1\n\n",
		want: Request{Request: "smtpd_access_policy", Attrs: map[string]string{"Recipient": "X@example.org", "future_attr": "1"}},
	},
	{
		name: "value bytes kept as received, spaces included",
		in:   "helo_name=  spaced out \t\nsender=<weird>\n\n",
		want: Request{HeloName: "  spaced out \t", Sender: "<weird>"},
	},
	{
		name: "invalid UTF-8 in a value is allowed",
		in:   "helo_name=\xff\xfe\x80bad\nrecipient=j\xc3\xbcrgen@example.de\n\n",
		want: Request{HeloName: "\xff\xfe\x80bad", Recipient: "jürgen@example.de"},
	},
	{name: "invalid UTF-8 in a name", in: "na\xffme=x\n\n", wantErr: ErrMalformed},
	{
		name: "UTF-8 in a name is allowed",
		in:   "nämé=x\n\n",
		want: Request{Attrs: map[string]string{"nämé": "x"}},
	},
	{name: "NUL byte in a value", in: "recipient=bob\x00@example.org\n\n", wantErr: ErrMalformed},
	{name: "NUL byte in a name", in: "reci\x00pient=bob@example.org\n\n", wantErr: ErrMalformed},
	{name: "control character in a name", in: "reci\tpient=bob@example.org\n\n", wantErr: ErrMalformed},
	{name: "clean EOF", in: "", wantErr: io.EOF},
	{name: "EOF mid-request", in: "request=smtpd_access_policy\nprotocol_state=RCPT\n", wantErr: io.ErrUnexpectedEOF},
	{name: "EOF mid-line", in: "request=smtpd_access_policy\nprotocol_st", wantErr: io.ErrUnexpectedEOF},
	{name: "EOF after a lone CR", in: "request=x\r", wantErr: io.ErrUnexpectedEOF},
	{name: "empty request", in: "\n", wantErr: ErrMalformed},
	{name: "stream of empty lines", in: strings.Repeat("\n", 1<<20), wantErr: ErrMalformed},
	{name: "CRLF empty request", in: "\r\n", wantErr: ErrMalformed},
	{
		name: "line exactly at the limit",
		in:   "sender=" + strings.Repeat("a", 25) + "\r\n\n",
		lim:  Limits{MaxLine: 32},
		want: Request{Sender: strings.Repeat("a", 25)},
	},
	{
		name:    "line one over the limit",
		in:      "sender=" + strings.Repeat("a", 26) + "\n\n",
		lim:     Limits{MaxLine: 32},
		wantErr: ErrLineTooLong,
	},
	{
		name:    "10 KB sasl_username is over the default line limit",
		in:      "request=smtpd_access_policy\nsasl_username=" + strings.Repeat("u", 10<<10) + "\n\n",
		wantErr: ErrLineTooLong,
	},
	{
		name:    "endless line without LF",
		in:      "sasl_username=" + strings.Repeat("u", 1<<20),
		wantErr: ErrLineTooLong,
	},
	{
		name: "attributes at the limit",
		in:   "a=1\nb=2\nc=3\nd=4\n\n",
		lim:  Limits{MaxAttrs: 4},
		want: Request{Attrs: map[string]string{"a": "1", "b": "2", "c": "3", "d": "4"}},
	},
	{name: "too many attributes", in: "a=1\nb=2\nc=3\nd=4\ne=5\n\n", lim: Limits{MaxAttrs: 4}, wantErr: ErrTooManyAttrs},
	{name: "duplicates count as attributes", in: "a=1\na=1\na=1\n\n", lim: Limits{MaxAttrs: 2}, wantErr: ErrTooManyAttrs},
	{
		name:    "too many attributes at the default limit",
		in:      strings.Repeat("x=1\n", 257) + "\n",
		wantErr: ErrTooManyAttrs,
	},
	{
		name:    "request too large",
		in:      strings.Repeat("helo_name="+strings.Repeat("h", 100)+"\n", 10) + "\n",
		lim:     Limits{MaxRequest: 1000},
		wantErr: ErrRequestTooLarge,
	},
	{
		name: "request exactly at the size limit",
		in:   "a=12345678\n\n", // 12 bytes
		lim:  Limits{MaxRequest: 12},
		want: Request{Attrs: map[string]string{"a": "12345678"}},
	},
	{name: "request one byte over the size limit", in: "a=123456789\n\n", lim: Limits{MaxRequest: 12}, wantErr: ErrRequestTooLarge},
	{
		name:    "request too large at the default limit",
		in:      strings.Repeat("helo_name="+strings.Repeat("h", 8000)+"\n", 9) + "\n",
		wantErr: ErrRequestTooLarge,
	},
}

// policyReadWith runs ReadRequest on in through a bufio.Reader of size n.
func policyReadWith(in string, n int, lim Limits) (Request, error) {
	return ReadRequest(bufio.NewReaderSize(strings.NewReader(in), n), lim)
}

func TestReadRequest(t *testing.T) {
	for _, tt := range policyReadTests {
		t.Run(tt.name, func(t *testing.T) {
			// The server's buffer (MaxLine+2), the default one, and a
			// tiny one that sends every line through the copying path.
			lim := tt.lim.policyWithDefaults()
			for _, size := range []int{lim.MaxLine + 2, 4096, 16} {
				got, err := policyReadWith(tt.in, size, tt.lim)
				if tt.wantErr != nil {
					if tt.wantErr == io.EOF {
						if err != io.EOF {
							t.Fatalf("buffer %d: err = %v, want io.EOF unwrapped", size, err)
						}
					} else if !errors.Is(err, tt.wantErr) {
						t.Fatalf("buffer %d: err = %v, want %v", size, err, tt.wantErr)
					}
					if !reflect.DeepEqual(got, Request{}) {
						t.Errorf("buffer %d: got %+v with an error, want the zero Request", size, got)
					}
					continue
				}
				if err != nil {
					t.Fatalf("buffer %d: %v", size, err)
				}
				if !reflect.DeepEqual(got, tt.want) {
					t.Errorf("buffer %d:\n got %+v\nwant %+v", size, got, tt.want)
				}
			}
		})
	}
}

func TestReadRequestErrorContext(t *testing.T) {
	in := "request=smtpd_access_policy\nprotocol_state\n\n"
	_, err := policyReadWith(in, 4096, Limits{})
	if err == nil || !strings.Contains(err.Error(), "line 2 (byte 28)") {
		t.Fatalf("err = %v, want it to name line 2 at byte 28", err)
	}
}

func TestReadRequestSequence(t *testing.T) {
	// Several requests on one stream, then the clean end.
	in := policyFullRequest + "recipient=x@example.org\n\n" + policyFullRequest
	r := bufio.NewReader(strings.NewReader(in))
	for i, want := range []string{"bob@example.org", "x@example.org", "bob@example.org"} {
		req, err := ReadRequest(r, Limits{})
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		if req.Recipient != want {
			t.Errorf("request %d: recipient %q, want %q", i, req.Recipient, want)
		}
	}
	if _, err := ReadRequest(r, Limits{}); err != io.EOF {
		t.Fatalf("after the last request: err = %v, want io.EOF", err)
	}
}

func TestReadRequestBounded(t *testing.T) {
	// An endless stream without LF must fail after reading about MaxLine
	// bytes, not all of it.
	cr := &policyCountingReader{r: bytes.NewReader(bytes.Repeat([]byte("a"), 10<<20))}
	_, err := ReadRequest(bufio.NewReaderSize(cr, 4096), Limits{})
	if !errors.Is(err, ErrLineTooLong) {
		t.Fatalf("err = %v, want ErrLineTooLong", err)
	}
	if cr.n > DefaultMaxLine+2*4096 {
		t.Errorf("read %d bytes for a line limit of %d", cr.n, DefaultMaxLine)
	}

	// Many short lines: fails after MaxRequest bytes.
	cr = &policyCountingReader{r: strings.NewReader(strings.Repeat("helo_name=aaaaaaaaaa\n", 1<<16))}
	_, err = ReadRequest(bufio.NewReaderSize(cr, 4096), Limits{MaxAttrs: 1 << 20})
	if !errors.Is(err, ErrRequestTooLarge) {
		t.Fatalf("err = %v, want ErrRequestTooLarge", err)
	}
	if cr.n > DefaultMaxRequest+4096 {
		t.Errorf("read %d bytes for a request limit of %d", cr.n, DefaultMaxRequest)
	}
}

type policyCountingReader struct {
	r io.Reader
	n int
}

func (c *policyCountingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// policyAttributeNames are the attributes Postfix 3.x documents in
// SMTPD_POLICY_README.
var policyAttributeNames = []string{
	"request", "protocol_state", "protocol_name", "helo_name", "queue_id", "sender", "recipient",
	"recipient_count", "client_address", "client_name", "reverse_client_name", "instance",
	"sasl_method", "sasl_username", "sasl_sender", "size", "ccert_subject", "ccert_issuer",
	"ccert_fingerprint", "ccert_pubkey_fingerprint", "encryption_protocol", "encryption_cipher",
	"encryption_keysize", "etrn_domain", "stress", "policy_context", "server_address",
	"server_port", "compatibility_level", "mail_version", "client_port",
}

func TestRequestNamedFields(t *testing.T) {
	// Every documented attribute has its own field, and every string
	// field belongs to one attribute.
	var req Request
	seen := make(map[*string]string)
	for _, name := range policyAttributeNames {
		p := req.policyField(name)
		if p == nil {
			t.Errorf("attribute %q has no named field", name)
			continue
		}
		if other, dup := seen[p]; dup {
			t.Errorf("attributes %q and %q share a field", name, other)
		}
		seen[p] = name
	}
	if n := reflect.TypeFor[Request]().NumField() - 2; len(seen) != n { // all but Attrs and Dropped
		t.Errorf("%d attributes map to fields, Request has %d string fields", len(seen), n)
	}
	if req.policyField("Recipient") != nil || req.policyField("recipient ") != nil {
		t.Error("attribute names must match exactly")
	}
}

func TestRequestGet(t *testing.T) {
	req, err := policyReadWith("sasl_username=alice\nx_new=1\n\n", 4096, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{"sasl_username": "alice", "x_new": "1", "recipient": "", "nope": ""} {
		if got := req.Get(name); got != want {
			t.Errorf("Get(%q) = %q, want %q", name, got, want)
		}
	}
}

func TestWriteAction(t *testing.T) {
	tests := []struct {
		in   Action
		want string
	}{
		{ActionDunno, "action=DUNNO\n\n"},
		{"HOLD rcptguard: alice@example.com blocked", "action=HOLD rcptguard: alice@example.com blocked\n\n"},
		{"", "action=DUNNO\n\n"},
		{"HOLD x\n\naction=OK", "action=HOLD x  action=OK\n\n"},
		{"HOLD x\r\naction=OK\r\n\r\n", "action=HOLD x  action=OK    \n\n"},
		{"REJECT a\x00b", "action=REJECT a b\n\n"},
		{"\n", "action= \n\n"},
		{"HOLD tab\tand ünïcode kept", "action=HOLD tab\tand ünïcode kept\n\n"},
	}
	for _, tt := range tests {
		var buf bytes.Buffer
		w := bufio.NewWriterSize(&buf, 16) // smaller than some answers
		if err := WriteAction(w, tt.in); err != nil {
			t.Fatalf("WriteAction(%q): %v", tt.in, err)
		}
		if buf.String() != tt.want {
			t.Errorf("WriteAction(%q) wrote %q, want %q", tt.in, buf.String(), tt.want)
		}
		if n := strings.Count(buf.String(), "\n"); n != 2 {
			t.Errorf("WriteAction(%q) wrote %d newlines, want 2", tt.in, n)
		}
	}
}

func TestWriteActionError(t *testing.T) {
	w := bufio.NewWriter(policyFailWriter{})
	err := WriteAction(w, ActionDunno)
	if err == nil || !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("err = %v, want one wrapping io.ErrClosedPipe", err)
	}
}

type policyFailWriter struct{}

func (policyFailWriter) Write([]byte) (int, error) { return 0, io.ErrClosedPipe }

func TestReadRequestAllocs(t *testing.T) {
	r := strings.NewReader(policyFullRequest)
	br := bufio.NewReaderSize(r, DefaultMaxLine+2)
	allocs := testing.AllocsPerRun(100, func() {
		r.Reset(policyFullRequest)
		br.Reset(r)
		if _, err := ReadRequest(br, Limits{}); err != nil {
			t.Fatal(err)
		}
	})
	// One string for each value that is not empty and not a shared
	// constant; no map, no line copies.
	if allocs > 14 {
		t.Errorf("ReadRequest made %v allocations for a full request, want at most 14", allocs)
	}
}

func BenchmarkReadRequest(b *testing.B) {
	r := strings.NewReader(policyFullRequest)
	br := bufio.NewReaderSize(r, DefaultMaxLine+2)
	b.SetBytes(int64(len(policyFullRequest)))
	b.ReportAllocs()
	for b.Loop() {
		r.Reset(policyFullRequest)
		br.Reset(r)
		if _, err := ReadRequest(br, Limits{}); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkWriteAction(b *testing.B) {
	w := bufio.NewWriter(io.Discard)
	b.ReportAllocs()
	for b.Loop() {
		if err := WriteAction(w, "HOLD rcptguard: alice@example.com blocked"); err != nil {
			b.Fatal(err)
		}
	}
}
