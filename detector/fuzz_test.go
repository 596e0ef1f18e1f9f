package detector

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"
)

// policyFuzzLimits are small, so that the fuzzer reaches every limit.
var policyFuzzLimits = Limits{MaxLine: 64, MaxAttrs: 8, MaxRequest: 512}

// FuzzReadRequest reads every request from arbitrary input, with small
// limits and with the defaults, through a buffer as large as the server's
// and through a tiny one. ReadRequest must not panic, must not return a
// request that breaks the limits or the protocol, and must read the same
// requests whatever its buffer size.
func FuzzReadRequest(f *testing.F) {
	for _, tt := range policyReadTests {
		if len(tt.in) <= 16<<10 {
			f.Add([]byte(tt.in))
		}
	}
	f.Add([]byte(policyFullRequest + policyFullRequest))
	f.Add([]byte("a=1\r\n\r\nb=2\n\n\n"))
	f.Add([]byte("queue_id=-dALL\nclient_address=fe80::1%x\nclient_name=a..b\n\nqueue_id=4Xk2Lm0bQrz9vWt\nreverse_client_name=unknown\n\n"))
	f.Add([]byte("sender=" + strings.Repeat("x", 60) + "\r\n\n"))

	f.Fuzz(func(t *testing.T, in []byte) {
		for _, lim := range []Limits{policyFuzzLimits, {}} {
			full := lim.policyWithDefaults()
			big, bigErr := policyReadAll(t, in, full.MaxLine+2, lim)
			small, smallErr := policyReadAll(t, in, 16, lim)
			if !reflect.DeepEqual(big, small) {
				t.Fatalf("limits %+v: buffer size changes the requests read:\n%+v\n%+v", lim, big, small)
			}
			if (bigErr == io.EOF) != (smallErr == io.EOF) {
				t.Fatalf("limits %+v: buffer size changes how the input ends: %v / %v", lim, bigErr, smallErr)
			}
		}
	})
}

// policyReadAll reads requests from in until an error, checks each, and
// returns them with the error that ended the input.
func policyReadAll(t *testing.T, in []byte, bufSize int, lim Limits) ([]Request, error) {
	r := bufio.NewReaderSize(bytes.NewReader(in), bufSize)
	var reqs []Request
	for {
		req, err := ReadRequest(r, lim)
		if err != nil {
			if err != io.EOF && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, ErrMalformed) &&
				!errors.Is(err, ErrLineTooLong) && !errors.Is(err, ErrTooManyAttrs) && !errors.Is(err, ErrRequestTooLarge) {
				t.Fatalf("unexpected error %v", err)
			}
			if !reflect.DeepEqual(req, Request{}) {
				t.Fatalf("error %v with a non-zero request %+v", err, req)
			}
			return reqs, err
		}
		policyCheckRequest(t, &req, lim.policyWithDefaults())
		checkWellFormed(t, &req)
		reqs = append(reqs, req)
	}
}

// policyCheckRequest fails t when req breaks lim or the protocol. Empty
// named fields are not counted: they may not have been sent.
func policyCheckRequest(t *testing.T, req *Request, lim Limits) {
	attrs, size := 0, 1 // the empty line
	check := func(name, value string) {
		attrs++
		size += len(name) + 1 + len(value) + 1
		if len(name)+1+len(value) > lim.MaxLine {
			t.Fatalf("attribute %q: line of %d bytes over the limit %d", name, len(name)+1+len(value), lim.MaxLine)
		}
		if strings.IndexByte(value, 0) >= 0 || strings.IndexByte(value, '\n') >= 0 {
			t.Fatalf("attribute %q: value %q holds NUL or LF", name, value)
		}
	}
	for _, name := range policyAttributeNames {
		if v := *req.policyField(name); v != "" {
			check(name, v)
		}
	}
	for name, value := range req.Attrs {
		if name == "" || strings.ContainsAny(name, "=\x00\r\n") || !utf8.ValidString(name) {
			t.Fatalf("bad attribute name %q", name)
		}
		if req.policyField(name) != nil {
			t.Fatalf("attribute %q has a named field but went to Attrs", name)
		}
		check(name, value)
	}
	if attrs > lim.MaxAttrs {
		t.Fatalf("%d attributes over the limit %d", attrs, lim.MaxAttrs)
	}
	if size > lim.MaxRequest {
		t.Fatalf("request of at least %d bytes over the limit %d", size, lim.MaxRequest)
	}
}

// FuzzWriteAction checks that no action, whatever it holds, writes more
// or less than one answer.
func FuzzWriteAction(f *testing.F) {
	f.Add("DUNNO")
	f.Add("HOLD x\r\n\r\naction=OK")
	f.Add("")
	f.Add("\x00\n\r")
	f.Fuzz(func(t *testing.T, a string) {
		var buf bytes.Buffer
		w := bufio.NewWriterSize(&buf, 16)
		if err := WriteAction(w, Action(a)); err != nil {
			t.Fatal(err)
		}
		out := buf.String()
		body, ok := strings.CutPrefix(out, "action=")
		if !ok || !strings.HasSuffix(body, "\n\n") {
			t.Fatalf("answer %q is not action=...\\n\\n", out)
		}
		body = strings.TrimSuffix(body, "\n\n")
		if strings.ContainsAny(body, "\r\n\x00") {
			t.Fatalf("answer %q holds CR, LF or NUL inside", out)
		}
		if a != "" && len(body) != len(a) {
			t.Fatalf("answer %q changed the action's length (%d → %d)", out, len(a), len(body))
		}
	})
}
