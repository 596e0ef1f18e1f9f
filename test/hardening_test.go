package test_test

// The bad-input half of issue 7: hostile bytes sent straight to the policy
// socket, slow and numerous clients, and the escaping of values from the
// network in every sink (log, blocklist, report). The helpers at the top
// are shared with faults_test.go, crash_test.go and soak_test.go.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net"
	"net/http"
	"net/mail"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/rcptguard/rcptguard/test"
)

// ---- shared helpers ----

// suiteConfig writes a complete configuration file named name into the
// world's directory and returns its path. Every key can be overridden:
// over maps "section.key" to a TOML value; an empty value drops the key.
// The defaults are those of world.config: limit 5 per 1h, wait 300ms,
// callout.timeout 1s, the world's DNS and MX, the blocklist at
// state/blocklist, the spool at state/spool, the hold requests at
// state/hold-requests.
func (w *world) suiteConfig(t testing.TB, name string, over map[string]string) string {
	t.Helper()
	keys := map[string]string{
		"policy.listen":         `["127.0.0.1:0"]`,
		"detector.limit":        "5",
		"detector.period":       `"1h"`,
		"detector.wait":         `"300ms"`,
		"callout.resolver":      strconv.Quote(w.dns.Addr),
		"callout.port":          w.port,
		"callout.timeout":       `"1s"`,
		"callout.helo":          `"rcptguard.test"`,
		"callout.allow_private": "true",
		"blocklist.path":        strconv.Quote(w.blocklistPath()),
		"notify.spool":          strconv.Quote(filepath.Join(w.dir, "state", "spool")),
		"queue.requests":        strconv.Quote(filepath.Join(w.dir, "state", "hold-requests")),
	}
	for k, v := range over {
		if v == "" {
			delete(keys, k)
		} else {
			keys[k] = v
		}
	}
	var b strings.Builder
	for _, section := range []string{"policy", "detector", "callout", "blocklist", "notify", "queue", "metrics", "log"} {
		var lines []string
		for k, v := range keys {
			if s, key, _ := strings.Cut(k, "."); s == section {
				lines = append(lines, key+" = "+v)
			}
		}
		if len(lines) == 0 {
			continue
		}
		slices.Sort(lines)
		fmt.Fprintf(&b, "[%s]\n%s\n\n", section, strings.Join(lines, "\n"))
	}
	for k := range keys {
		switch s, _, _ := strings.Cut(k, "."); s {
		case "policy", "detector", "callout", "blocklist", "notify", "queue", "metrics", "log":
		default:
			t.Fatalf("suiteConfig: unknown section in %q", k)
		}
	}
	p := filepath.Join(w.dir, name)
	if err := os.WriteFile(p, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// blocklistPath is where the world's configurations put the blocklist.
func (w *world) blocklistPath() string {
	return filepath.Join(w.dir, "state", "blocklist")
}

// memFigures is the memory of this process (the in-process daemon's).
type memFigures struct {
	heapInuse uint64 // bytes, after a GC
	rss       uint64 // bytes, VmRSS
}

func (m memFigures) String() string {
	return fmt.Sprintf("heap in use %.1f MiB, RSS %.1f MiB", mib(m.heapInuse), mib(m.rss))
}

func mib(n uint64) float64 { return float64(n) / (1 << 20) }

// readMem collects garbage and reads the heap in use and the RSS.
func readMem() memFigures {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return memFigures{heapInuse: ms.HeapInuse, rss: vmRSS()}
}

// vmRSS reads VmRSS from /proc/self/status; 0 where there is none.
func vmRSS() uint64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// pollUntil calls cond every 20ms until it is true or timeout passes, and
// fails the test with msg then.
func pollUntil(t testing.TB, timeout time.Duration, msg string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", timeout, msg)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stateSnapshot describes every file under dir: name, size, mode, mtime.
// Two equal snapshots mean no file was touched.
func stateSnapshot(t testing.TB, dir string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := de.Info()
		if err != nil {
			return err
		}
		fmt.Fprintf(&b, "%s %v %d %d\n", p, fi.Mode(), fi.Size(), fi.ModTime().UnixNano())
		return nil
	})
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	return b.String()
}

// metricValue scrapes the daemon's /metrics and returns the value of the
// sample whose line starts with name (label set included, if given); -1
// when there is none.
func metricValue(t testing.TB, metricsAddr, name string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(body), "\n") {
		if rest, ok := strings.CutPrefix(line, name+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			if err != nil {
				t.Fatalf("metric line %q: %v", line, err)
			}
			return v
		}
	}
	return -1
}

// jsonLogLines parses the daemon's log in log.format = "json".
func jsonLogLines(t testing.TB, logs string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, line := range strings.Split(logs, "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("log line is not JSON: %q: %v", line, err)
		}
		out = append(out, m)
	}
	return out
}

// finalDecisions returns the decision log lines for identity that carry
// a verdict: the ones answered in time and the late ones, not the
// "wait-exceeded" lines written when the answer stopped waiting.
func finalDecisions(t testing.TB, logs, identity string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, m := range jsonLogLines(t, logs) {
		if m["msg"] == "decision" && m["identity"] == identity && m["note"] != "wait-exceeded" {
			out = append(out, m)
		}
	}
	return out
}

// rawResult is what came back for raw bytes sent to the policy socket.
type rawResult struct {
	answers []string      // the action values, in order
	closed  bool          // the server closed the connection (EOF or reset)
	readErr error         // the error that ended reading, if any
	junk    string        // bytes that were not a well-formed answer
	elapsed time.Duration // from the first byte sent to the end of reading
	written int64         // bytes the server took before it stopped reading
}

// rawExchange sends input on a new connection (in its own goroutine, so a
// server that stops reading does not block the test; EPIPE and resets are
// expected then), reads up to wantAnswers answers and then, when
// untilClose is set, reads on until the server closes the connection or
// timeout passes. halfClose shuts the sending side after the input.
func rawExchange(t testing.TB, addr string, input []byte, halfClose bool, wantAnswers int, untilClose bool, timeout time.Duration) rawResult {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial policy: %v", err)
	}
	defer conn.Close()
	start := time.Now()
	var written atomic.Int64
	wdone := make(chan struct{})
	go func() {
		defer close(wdone)
		for off := 0; off < len(input); {
			n := min(64<<10, len(input)-off)
			m, err := conn.Write(input[off : off+n])
			written.Add(int64(m))
			if err != nil {
				return // EPIPE or a reset: the server stopped reading
			}
			off += n
		}
		if halfClose {
			_ = conn.(*net.TCPConn).CloseWrite()
		}
	}()
	_ = conn.SetReadDeadline(start.Add(timeout))
	br := bufio.NewReader(conn)
	var res rawResult
	for len(res.answers) < wantAnswers {
		line, err := br.ReadString('\n')
		if err != nil {
			res.junk += line
			res.readErr = err
			break
		}
		blank, err := br.ReadString('\n')
		action, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "action=")
		if err != nil || blank != "\n" || !ok {
			res.junk += line + blank
			res.readErr = err
			break
		}
		res.answers = append(res.answers, action)
	}
	if untilClose && res.readErr == nil {
		rest, err := io.ReadAll(br)
		res.junk += string(rest)
		res.readErr = err
		if err == nil {
			res.readErr = io.EOF
		}
	}
	res.elapsed = time.Since(start)
	res.closed = res.readErr != nil && !errors.Is(res.readErr, os.ErrDeadlineExceeded)
	_ = conn.Close()
	<-wdone
	res.written = written.Load()
	return res
}

// logsSince returns what the daemon logged after the first off bytes.
func logsSince(d *daemon, off int) string {
	s := d.logs.String()
	if off > len(s) {
		return ""
	}
	return s[off:]
}

// ---- bad input ----

const heldUser = "held@customer.test"

// heldAction is the blocklist action of heldUser, seeded before start.
const heldAction = "HOLD seeded by the test"

// hostileCase is one input sent to the policy socket.
type hostileCase struct {
	name      string
	input     string
	halfClose bool     // shut the sending side after the input
	answers   []string // the expected actions, in order
	closed    bool     // the server closes the connection (after the answers)
	log       string   // a string the log lines written meanwhile contain
}

// reqWith renders a full RCPT request of user for to, changed by mod.
func reqWith(user, to string, mod func(map[string]string)) string {
	a := rcpt(user, to)
	if mod != nil {
		mod(a)
	}
	return test.Render(a)
}

// rawLines renders name=value lines (in order, duplicates allowed) and
// the empty line.
func rawLines(kv ...string) string {
	var b strings.Builder
	for i := 0; i+1 < len(kv); i += 2 {
		b.WriteString(kv[i] + "=" + kv[i+1] + "\n")
	}
	b.WriteString("\n")
	return b.String()
}

// fullAttrs is RcptRequest's attributes in Render's order without the
// final empty line, so that cases can add lines around them.
func fullAttrs(user, to string) string {
	return strings.TrimSuffix(test.Render(rcpt(user, to)), "\n")
}

func hostileCases() []hostileCase {
	const innocent = "innocent@customer.test"
	good := test.Render(rcpt(innocent, "alice@good.test"))
	held := test.Render(rcpt(heldUser, "alice@good.test"))
	rng := rand.New(rand.NewPCG(7, 7))
	junk := make([]byte, 4096)
	for i := range junk {
		junk[i] = byte(rng.UintN(256))
	}
	var attrs257, attrs256, big strings.Builder
	for i := range 257 {
		fmt.Fprintf(&attrs257, "x_%d=1\n", i)
	}
	attrs257.WriteString("\n")
	attrs256.WriteString(fullAttrs(innocent, "alice@good.test"))
	for i := range 256 - len(rcpt(innocent, "x")) {
		fmt.Fprintf(&attrs256, "x_%d=1\n", i)
	}
	attrs256.WriteString("\n")
	for i := range 10 {
		fmt.Fprintf(&big, "x_%d=%s\n", i, strings.Repeat("b", 7000))
	}
	big.WriteString("\n")
	withUser := func(u string) string { return reqWith(u, "alice@good.test", nil) }
	crlf := func(s string) string { return strings.ReplaceAll(s, "\n", "\r\n") }
	// The line "recipient=..." is exactly 8192 bytes: the longest allowed.
	longest := strings.Repeat("r", 8192-len("recipient="))
	return []hostileCase{
		{name: "binary junk", input: "\x00\x01\x02binary\xff\xfe\n\n", closed: true, log: "NUL byte"},
		{name: "4 KiB of random bytes", input: string(junk), halfClose: true, closed: true, log: "bad policy request"},
		{name: "NUL byte in a value", input: reqWith(innocent, "a\x00b@good.test", nil), closed: true, log: "NUL byte in value"},
		{name: "NUL byte in sasl_username", input: reqWith("in\x00nocent@customer.test", "alice@good.test", nil), closed: true, log: "NUL byte in value"},
		{name: "line over 8 KiB", input: reqWith(innocent, strings.Repeat("r", 9000)+"@good.test", nil), closed: true, log: "line too long"},
		{name: "line of exactly 8 KiB", input: reqWith(innocent, longest, nil), answers: []string{"DUNNO"}},
		{name: "257 attributes", input: attrs257.String(), closed: true, log: "too many attributes"},
		{name: "256 attributes", input: attrs256.String(), answers: []string{"DUNNO"}},
		{name: "request over 64 KiB", input: big.String(), closed: true, log: "too large"},
		{name: "no empty line, then EOF", input: strings.TrimSuffix(good, "\n"), halfClose: true, closed: true, log: "cut off"},
		{name: "a million empty lines", input: strings.Repeat("\n", 1_000_000), closed: true, log: "empty request"},
		{name: "=value without a name", input: "=value\n\n", closed: true, log: "empty attribute name"},
		{name: "line without =", input: "request smtpd_access_policy\n\n", closed: true, log: "no '='"},
		{name: "HTTP request", input: "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", closed: true, log: "no '='"},
		{name: "TLS ClientHello", input: "\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + string(junk[:64]), halfClose: true, closed: true, log: "bad policy request"},
		{name: "control character in a name", input: "reci\x01pient=x@good.test\n\n", closed: true, log: "control character in attribute name"},
		{name: "invalid UTF-8 in a name", input: "\xff\xfe=1\n\n", closed: true, log: "not valid UTF-8"},
		{name: "duplicate sasl_username, the last (held) wins", input: fullAttrs(innocent, "alice@good.test") + "sasl_username=" + heldUser + "\n\n", answers: []string{heldAction}},
		{name: "duplicate sasl_username, the last (innocent) wins", input: fullAttrs(heldUser, "alice@good.test") + "sasl_username=" + innocent + "\n\n", answers: []string{"DUNNO"}},
		{name: "invalid UTF-8 in the recipient", input: reqWith(innocent, "\xff\xfe\xfd@good.test", nil), answers: []string{"DUNNO"}},
		{name: "invalid UTF-8 in helo, client name, sender", input: reqWith(innocent, "alice@good.test", func(a map[string]string) {
			a["helo_name"], a["client_name"], a["sender"] = "\xc3\x28", "\xed\xa0\x80.example", "\xf8\x88\x80\x80\x80@x.test"
		}), answers: []string{"DUNNO"}},
		{name: "sasl_username with CR inside", input: withUser("bad\ruser@customer.test"), answers: []string{"DUNNO"}, log: "identity refused"},
		{name: "sasl_username with LF inside", input: withUser("bad\nuser@customer.test"), closed: true, log: "no '='"},
		{name: "sasl_username with a tab", input: withUser("bad\tuser@customer.test"), answers: []string{"DUNNO"}, log: "identity refused"},
		{name: "sasl_username starting with #", input: withUser("#comment@customer.test"), answers: []string{"DUNNO"}, log: "identity refused"},
		{name: "sasl_username with ESC", input: withUser("\x1b[31mred@customer.test"), answers: []string{"DUNNO"}, log: "identity refused"},
		{name: "sasl_username with U+2028", input: withUser("line\u2028sep@customer.test"), answers: []string{"DUNNO"}, log: "identity refused"},
		{name: "sasl_username of 321 bytes", input: withUser(strings.Repeat("u", 307) + "@customer.test"), answers: []string{"DUNNO"}, log: "identity refused"},
		{name: "sasl_username of 10 KB", input: withUser(strings.Repeat("u", 10_000) + "@customer.test"), closed: true, log: "line too long"},
		{name: "recipient with quotes", input: reqWith(innocent, `"john doe"@good.test`, nil), answers: []string{"DUNNO"}},
		{name: "recipient with a stray quote", input: reqWith(innocent, `jo"hn@good.test`, nil), answers: []string{"DUNNO"}},
		{name: "IDN recipient", input: reqWith(innocent, "jörg@bücher.test", nil), answers: []string{"DUNNO"}},
		{name: "recipient <>", input: reqWith(innocent, "<>", nil), answers: []string{"DUNNO"}},
		{name: "recipient of 1,000 characters", input: reqWith(innocent, strings.Repeat("a", 990)+"@good.test", nil), answers: []string{"DUNNO"}},
		{name: "recipient with CR and ESC", input: reqWith(innocent, "a\rb\x1b[31m@good.test", nil), answers: []string{"DUNNO"}},
		{name: "CRLF line endings", input: crlf(good), answers: []string{"DUNNO"}},
		{name: "CRLF line endings, held identity", input: crlf(held), answers: []string{heldAction}},
		{name: "request=other (held identity)", input: reqWith(heldUser, "alice@good.test", func(a map[string]string) { a["request"] = "other" }), answers: []string{"DUNNO"}},
		{name: "protocol_state=DATA (held identity)", input: reqWith(heldUser, "alice@good.test", func(a map[string]string) { a["protocol_state"] = "DATA" }), answers: []string{"DUNNO"}},
		{name: "no attributes Postfix sends but sasl_username", input: rawLines("sasl_username", heldUser), answers: []string{"DUNNO"}},
		{name: "two requests in one write", input: good + held, answers: []string{"DUNNO", heldAction}},
		{name: "a request, then garbage", input: good + "garbage\n\n", answers: []string{"DUNNO"}, closed: true, log: "no '='"},
	}
}

// TestHostileInput sends each hostile input on its own connection and
// checks the outcome, that the daemon still answers a normal request
// after it, that no file was touched, that the log stays printable, and
// that memory stays bounded.
func TestHostileInput(t *testing.T) {
	w := newWorld(t)
	if err := os.MkdirAll(filepath.Dir(w.blocklistPath()), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(w.blocklistPath(), []byte(heldUser+"\t"+heldAction+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// A high limit: recipients that do not exist must not lead to a
	// block (a file write) here; the point is the parser and the answer.
	// request_timeout bounds a case that would leave a request open.
	d := startDaemon(t, w.suiteConfig(t, "hostile.toml", map[string]string{
		"detector.limit": "1000", "policy.request_timeout": `"3s"`,
	}))
	normal := test.DialPolicy(t, d.addr)
	if a := normal.Must(rcpt("warm@customer.test", "alice@good.test")); a != "DUNNO" {
		t.Fatalf("warm-up: %q", a)
	}
	state := filepath.Join(w.dir, "state")
	before := stateSnapshot(t, state)
	memBefore := readMem()

	cases := hostileCases()
	if len(cases) < 25 {
		t.Fatalf("only %d cases", len(cases))
	}
	for _, c := range cases {
		off := len(d.logs.String())
		r := rawExchange(t, d.addr, []byte(c.input), c.halfClose, len(c.answers), c.closed, 5*time.Second)
		switch {
		case !slices.Equal(r.answers, c.answers):
			t.Errorf("%s: answers %q, want %q (read error %v, junk %.80q)", c.name, r.answers, c.answers, r.readErr, r.junk)
		case r.junk != "":
			t.Errorf("%s: bytes that are no answer: %.80q", c.name, r.junk)
		case c.closed && !r.closed:
			t.Errorf("%s: connection not closed by the server within 5s (%v)", c.name, r.readErr)
		}
		if c.log != "" && !strings.Contains(logsSince(d, off), c.log) {
			t.Errorf("%s: no log line with %q; logged:\n%s", c.name, c.log, logsSince(d, off))
		}
		if strings.HasPrefix(c.name, "a million") {
			t.Logf("%s: %d of %d bytes written before the server closed, after %v", c.name, r.written, len(c.input), r.elapsed.Round(time.Millisecond))
		}
		// The daemon still answers, on a new connection and on the old.
		fresh := test.DialPolicy(t, d.addr)
		if a := fresh.Must(rcpt("next@customer.test", "alice@good.test")); a != "DUNNO" {
			t.Fatalf("after %s: normal request answered %q", c.name, a)
		}
		if a := normal.Must(rcpt(heldUser, "bob@good.test")); a != heldAction {
			t.Fatalf("after %s: held identity answered %q", c.name, a)
		}
	}

	if after := stateSnapshot(t, state); after != before {
		t.Errorf("files touched by hostile input:\nbefore:\n%safter:\n%s", before, after)
	}
	memAfter := readMem()
	t.Logf("memory before the hostile table: %v; after %d cases: %v", memBefore, len(cases), memAfter)
	const bound = 50 << 20
	if memAfter.heapInuse > memBefore.heapInuse+bound || memAfter.rss > memBefore.rss+bound {
		t.Errorf("memory grew by more than 50 MiB: before %v, after %v", memBefore, memAfter)
	}
	logs := d.logs.String()
	if !utf8.ValidString(logs) {
		t.Error("the log holds invalid UTF-8")
	}
	if i := strings.IndexAny(logs, "\r\x1b\x00"); i >= 0 {
		t.Errorf("the log holds a raw control character: %q", logs[max(0, i-80):min(len(logs), i+40)])
	}
}

// TestSlowloris: a client trickling a request one byte every 50ms is cut
// off once policy.request_timeout (500ms) has passed since its first byte,
// while other clients are answered meanwhile.
func TestSlowloris(t *testing.T) {
	w := newWorld(t)
	d := startDaemon(t, w.suiteConfig(t, "slowloris.toml", map[string]string{"policy.request_timeout": `"500ms"`}))
	conn, err := net.Dial("tcp", d.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	req := []byte(test.Render(rcpt("slow@customer.test", "alice@good.test")))
	start := time.Now()
	sent := make(chan int, 1)
	go func() {
		n := 0
		for _, b := range req {
			if _, err := conn.Write([]byte{b}); err != nil {
				break // the server closed: EPIPE or a reset
			}
			n++
			time.Sleep(50 * time.Millisecond)
		}
		sent <- n
	}()
	// Others are served while the slow client holds its connection.
	c := test.DialPolicy(t, d.addr)
	if a := c.Must(rcpt("quick@customer.test", "alice@good.test")); a != "DUNNO" {
		t.Fatalf("a normal client during the slowloris: %q", a)
	}
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(conn)
	elapsed := time.Since(start)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("slow client not cut off after %v", elapsed)
	}
	if len(got) > 0 {
		t.Errorf("slow client got an answer %q", got)
	}
	_ = conn.Close()
	n := <-sent
	t.Logf("slow client cut off after %v, %d of %d bytes sent", elapsed.Round(time.Millisecond), n, len(req))
	if elapsed > 1200*time.Millisecond {
		t.Errorf("slow client cut off after %v, want about request_timeout (500ms)", elapsed)
	}
	if elapsed < 400*time.Millisecond {
		t.Errorf("slow client cut off after %v, before request_timeout (500ms)", elapsed)
	}
	if !strings.Contains(d.logs.String(), "timed out") {
		t.Errorf("no log line about the timeout:\n%s", d.logs)
	}
}

// raiseNoFile makes sure this process may open n files, raising the soft
// limit up to the hard one; it skips the test when that is not enough.
func raiseNoFile(t *testing.T, n uint64) {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Skipf("getrlimit: %v", err)
	}
	if lim.Cur >= n {
		return
	}
	if lim.Max < n {
		t.Skipf("RLIMIT_NOFILE hard limit %d < %d: cannot open the connections", lim.Max, n)
	}
	old := lim.Cur
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Skipf("setrlimit: %v", err)
	}
	t.Cleanup(func() {
		lim.Cur = old
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	})
}

// TestTwoThousandIdleConnections: with policy.max_connections = 1000,
// 2,000 connections opened by one user (root, not Postfix's mail_owner)
// and left idle: it keeps max_connections_per_peer (1000/4) of them, its
// newest; the others are closed at once. A new connection while they are
// held is answered, and once they are closed too.
func TestTwoThousandIdleConnections(t *testing.T) {
	raiseNoFile(t, 5000)
	w := newWorld(t)
	d := startDaemon(t, w.suiteConfig(t, "conns.toml", map[string]string{"policy.max_connections": "1000"}))
	memBefore := readMem()
	const n = 2000
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range n {
		c, err := net.DialTimeout("tcp", d.addr, 5*time.Second)
		if err != nil {
			t.Fatalf("connection %d: %v", len(conns)+1, err)
		}
		conns = append(conns, c)
	}
	dialed := time.Now()
	// Each connection waits for the server to close it; those still open
	// at the deadline are the idle ones the server keeps.
	// On a loaded machine the server may need more than a moment to go
	// through 2,000 accepts: wait until it closed those it should (or 20s
	// passed), give it 300ms more to close too many, then stop waiting.
	deadline := dialed.Add(20 * time.Second)
	var closed, open atomic.Int64
	var lastClose atomic.Int64
	var wg sync.WaitGroup
	go func() {
		for closed.Load() < int64(n-250) && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		time.Sleep(300 * time.Millisecond)
		for _, c := range conns {
			_ = c.SetReadDeadline(time.Now())
		}
	}()
	for _, c := range conns {
		_ = c.SetReadDeadline(deadline)
		wg.Go(func() {
			var b [1]byte
			_, err := c.Read(b[:])
			if errors.Is(err, os.ErrDeadlineExceeded) {
				open.Add(1)
				return
			}
			closed.Add(1)
			now := int64(time.Since(dialed))
			for l := lastClose.Load(); now > l && !lastClose.CompareAndSwap(l, now); l = lastClose.Load() {
			}
		})
	}
	wg.Wait()
	memIdle := readMem()
	t.Logf("%d connections: %d closed by the server (the last %v after the last dial), %d kept open; memory before %v, with 250 idle %v",
		n, closed.Load(), time.Duration(lastClose.Load()).Round(time.Millisecond), open.Load(), memBefore, memIdle)
	if closed.Load() != n-250 || open.Load() != 250 {
		t.Errorf("%d closed and %d open, want 1750 and 250", closed.Load(), open.Load())
	}
	if logs := d.logs.String(); !strings.Contains(logs, "closed to make room") && !strings.Contains(logs, "too many connections from this peer") {
		t.Error("no log line about closed or refused connections")
	}
	// A new connection while 250 are held is answered: the one idle
	// longest makes room.
	if r := rawExchange(t, d.addr, []byte(test.Render(rcpt("u@customer.test", "alice@good.test"))), false, 1, false, 2*time.Second); !slices.Equal(r.answers, []string{"DUNNO"}) {
		t.Errorf("connection 2,001 while 250 are held: answers %q, closed %v", r.answers, r.closed)
	}
	for _, c := range conns {
		c.Close()
	}
	conns = nil
	// The server sees the closes (EOF) and frees the slots.
	pollUntil(t, 5*time.Second, "no connection answered after the idle ones were closed", func() bool {
		r := rawExchange(t, d.addr, []byte(test.Render(rcpt("u@customer.test", "alice@good.test"))), false, 1, false, 2*time.Second)
		return slices.Equal(r.answers, []string{"DUNNO"})
	})
}

// ---- escaping, a test per sink ----

// hostileValues are bytes that must never reach a sink raw, in forms a
// policy request can carry inside a value (NUL and LF cannot: they end
// the request or the line).
var hostileValues = []string{"\r", "\x1b[31m", "\xff", "\u202e", "\x7f", "\x07"}

// TestEscapedLogSink: values from the network with CR, ESC, bidi controls
// and invalid UTF-8 (in the recipient, client address and name, queue ID,
// and a refused identity) reach the log escaped, in both log formats.
func TestEscapedLogSink(t *testing.T) {
	for _, format := range []string{"text", "json"} {
		t.Run(format, func(t *testing.T) {
			w := newWorld(t)
			d := startDaemon(t, w.suiteConfig(t, "log.toml", map[string]string{"log.format": strconv.Quote(format)}))
			c := test.DialPolicy(t, d.addr)
			hostile := func(i int) map[string]string {
				a := test.RcptRequest("logged@customer.test", "logged@customer.test",
					fmt.Sprintf("x\r%d\x1b[31m\xff\u202e@good.test", i), fmt.Sprintf("Q\r%d\x1b[0m", i))
				a["client_address"] = "198.51.100.23\r\x1b[2J"
				a["client_name"] = "evil\x1b]0;title\x07\r.example"
				return a
			}
			// Bad-syntax recipients count: the sixth blocks, so the block
			// and report log lines carry the hostile client and queue ID.
			for i := range 7 {
				c.Must(hostile(i))
			}
			if a := c.Must(hostile(7)); !strings.HasPrefix(a, "HOLD ") {
				t.Fatalf("not blocked after 8 invalid recipients: %q", a)
			}
			c.Must(rcpt("ev\x1b[1mil\r@customer.test", "alice@good.test")) // identity refused, logged quoted
			logs := d.logs.String()
			for _, want := range []string{"rcptguard blocked", "identity refused", "decision"} {
				if !strings.Contains(logs, want) {
					t.Errorf("no %q log line", want)
				}
			}
			if !utf8.ValidString(logs) {
				t.Error("the log holds invalid UTF-8")
			}
			if i := strings.IndexAny(logs, "\r\x1b\x00\x07\x7f"); i >= 0 {
				t.Errorf("raw control character in the log: %q", logs[max(0, i-100):min(len(logs), i+40)])
			}
			// JSON escapes control characters but not bidi overrides; the
			// text format quotes them.
			if i := strings.Index(logs, "\u202e"); i >= 0 {
				if format == "text" {
					t.Errorf("raw U+202E in the log: %q", logs[max(0, i-100):min(len(logs), i+40)])
				} else {
					t.Logf("note: the JSON log holds a raw U+202E (valid JSON; a terminal shows it reordered)")
				}
			}
			// Every line is one record: a value with LF did not split one.
			for _, line := range strings.Split(strings.TrimSuffix(logs, "\n"), "\n") {
				if !strings.HasPrefix(line, "time=") && !strings.HasPrefix(line, "{") {
					t.Errorf("log line does not start a record: %.120q", line)
				}
			}
		})
	}
}

// blocklistLine is the form of every entry line the daemon writes:
// IDENTITY<TAB>ACTION TEXT, printable, no control characters.
var blocklistLine = regexp.MustCompile(`^[^\s#\x00-\x1f\x7f]+\t[A-Z0-9_]+( [^\x00-\x1f\x7f]*)?$`)

// TestEscapedBlocklistSink: blocks triggered by requests full of hostile
// bytes leave a blocklist whose every line is IDENTITY<TAB>ACTION TEXT
// without control characters, and identities with control characters are
// never written.
func TestEscapedBlocklistSink(t *testing.T) {
	w := newWorld(t)
	d := startDaemon(t, w.suiteConfig(t, "blocklist.toml", map[string]string{"detector.action": `"HOLD"`}))
	c := test.DialPolicy(t, d.addr)
	block := func(user string) string {
		var a string
		for i := range 6 {
			req := test.RcptRequest(user, user, fmt.Sprintf("n%d\r\x1b[31m%s@good.test", i, hostileValues[i%len(hostileValues)]), "Q\x1b"+strconv.Itoa(i))
			req["client_name"] = "evil\r\x1b.example"
			a = c.Must(req)
		}
		return a
	}
	for _, user := range []string{"plain@customer.test", "Müller@Customer.test", "x'y\"z$(id)@customer.test"} {
		if a := block(user); !strings.HasPrefix(a, "HOLD rcptguard: ") {
			t.Fatalf("%s not blocked: %q", user, a)
		}
	}
	for _, user := range []string{"ctl\x1b@customer.test", "cr\r@x.test", "tab\t@x.test", "#hash@x.test"} {
		if a := block(user); a != "DUNNO" {
			t.Errorf("identity %q answered %q, want DUNNO (refused)", user, a)
		}
	}
	data, err := os.ReadFile(w.blocklistPath())
	if err != nil {
		t.Fatal(err)
	}
	text := string(data)
	if !strings.HasSuffix(text, "\n") {
		t.Errorf("the blocklist does not end with a newline: %q", text)
	}
	var ids []string
	for _, line := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
		if strings.HasPrefix(line, "#") {
			if strings.ContainsAny(line, "\r\x1b\x00") {
				t.Errorf("control character in comment %q", line)
			}
			continue
		}
		if !blocklistLine.MatchString(line) || !utf8.ValidString(line) {
			t.Errorf("blocklist line %q is not IDENTITY<TAB>ACTION TEXT without control characters", line)
		}
		id, _, _ := strings.Cut(line, "\t")
		ids = append(ids, id)
	}
	want := []string{"plain@customer.test", "müller@customer.test", "x'y\"z$(id)@customer.test"}
	if !slices.Equal(ids, want) {
		t.Errorf("identities in the blocklist: %q, want %q", ids, want)
	}
	t.Logf("blocklist:\n%s", text)
}

// TestEscapedReportSink: a block triggered by recipients holding CR and
// non-ASCII, from a client whose name holds escape sequences, with a
// queue ID made to look like a shell command, yields a report that is
// 7-bit, has no bare CR or LF, parses with net/mail, names the identity
// in its decoded Subject, and quotes the queue ID in the commands.
func TestEscapedReportSink(t *testing.T) {
	w := newWorld(t)
	relay := test.StartRelay(t, test.RelayConfig{})
	d := startDaemon(t, w.suiteConfig(t, "report.toml", map[string]string{
		"detector.warn_at": "0",
		"notify.to":        `["abuse@isp.test"]`,
		"notify.from":      `"rcptguard@isp.test"`,
		"notify.relay":     strconv.Quote(relay.Addr),
		"notify.starttls":  `"off"`,
	}))
	c := test.DialPolicy(t, d.addr)
	const user = "jürgen@customer.test"
	rcpts := []string{"a\rb@good.test", "jörg@bücher.test", "c\r\x1b[31m@good.test", "ñandú@good.test", "d\r@good.test", "é\rx@good.test"}
	var last string
	for _, r := range rcpts {
		req := test.RcptRequest(user, user, r, "$(touch /tmp/pwned)")
		req["client_name"] = "evil\x1b]0;x\x07\r.example"
		last = c.Must(req)
	}
	if !strings.HasPrefix(last, "HOLD ") {
		// One of the non-ASCII recipients may be unknown rather than
		// invalid; add plain bad-syntax ones until the block.
		for i := 0; i < 6 && !strings.HasPrefix(last, "HOLD "); i++ {
			last = c.Must(test.RcptRequest(user, user, fmt.Sprintf("e%d\r@good.test", i), "$(touch /tmp/pwned)"))
		}
	}
	if !strings.HasPrefix(last, "HOLD ") {
		t.Fatalf("not blocked: %q", last)
	}
	msgs := relay.WaitMessages(t, 1, 10*time.Second)
	raw := msgs[0].Data
	for i, b := range raw {
		switch {
		case b >= 0x80:
			t.Fatalf("byte %#x at %d: the report is not 7-bit", b, i)
		case b == '\r' && (i+1 >= len(raw) || raw[i+1] != '\n'):
			t.Fatalf("bare CR at %d: %q", i, raw[max(0, i-60):min(len(raw), i+20)])
		case b == '\n' && (i == 0 || raw[i-1] != '\r'):
			t.Fatalf("bare LF at %d: %q", i, raw[max(0, i-60):min(len(raw), i+20)])
		case b < ' ' && b != '\r' && b != '\n' && b != '\t':
			t.Fatalf("control byte %#x at %d: %q", b, i, raw[max(0, i-60):min(len(raw), i+20)])
		}
	}
	msg, err := mail.ReadMessage(bytes.NewReader(raw))
	if err != nil {
		t.Fatalf("report does not parse: %v", err)
	}
	var dec mime.WordDecoder
	subject, err := dec.DecodeHeader(msg.Header.Get("Subject"))
	if err != nil {
		t.Fatalf("Subject %q: %v", msg.Header.Get("Subject"), err)
	}
	if !strings.Contains(subject, user) {
		t.Errorf("Subject %q does not name %s", subject, user)
	}
	for k, vs := range msg.Header {
		for _, v := range vs {
			if strings.ContainsAny(v, "\r\n\x1b") {
				t.Errorf("header %s holds a control character: %q", k, v)
			}
		}
	}
	_, params, err := mime.ParseMediaType(msg.Header.Get("Content-Type"))
	if err != nil {
		t.Fatal(err)
	}
	mr := multipart.NewReader(msg.Body, params["boundary"])
	var body string
	for {
		p, err := mr.NextRawPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		var r io.Reader = p
		if p.Header.Get("Content-Transfer-Encoding") == "quoted-printable" {
			r = quotedprintable.NewReader(p)
		}
		b, err := io.ReadAll(r)
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(p.Header.Get("Content-Type"), "text/plain") {
			body = string(b)
		}
	}
	if body == "" {
		t.Fatal("no text/plain part")
	}
	if i := strings.IndexAny(strings.ReplaceAll(body, "\r\n", "\n"), "\r\x1b\x07\x00\u202e"); i >= 0 {
		t.Errorf("raw control character in the report text: %q", body[max(0, i-60):min(len(body), i+20)])
	}
	for _, line := range strings.Split(body, "\n") {
		line = strings.TrimSpace(line)
		if rest, ok := strings.CutPrefix(line, "postsuper -H "); ok && rest != "QUEUEID" && !strings.HasPrefix(rest, "'") {
			t.Errorf("queue ID not shell-quoted in %q", line)
		}
	}
	// The queue ID is not a Postfix queue ID: it is dropped when the
	// request is read, never kept or printed.
	if strings.Contains(body, "touch /tmp/pwned") || !strings.Contains(body, "No message has been held yet") ||
		!strings.Contains(body, "rcptguard held '"+user+"'") {
		t.Errorf("the report shows the malformed queue ID; text part:\n%s", body)
	}
}
