package detector

import (
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/rcptguard/rcptguard/callout"
)

var t0 = time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)

func TestLimiterWindow(t *testing.T) {
	type step struct {
		at   time.Duration // after t0
		rcpt string
		want int
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"distinct recipients count", []step{{0, "a", 1}, {time.Second, "b", 2}, {2 * time.Second, "c", 3}}},
		{"a retried recipient counts once", []step{{0, "a", 1}, {time.Second, "a", 1}, {2 * time.Second, "a", 1}, {3 * time.Second, "b", 2}}},
		{"hits leave the window after a period", []step{{0, "a", 1}, {30 * time.Minute, "b", 2}, {time.Hour, "c", 2}, {90 * time.Minute, "d", 2}}},
		{"edge: exactly one period later the old hit is out", []step{{0, "a", 1}, {time.Hour - time.Nanosecond, "b", 2}, {time.Hour, "c", 2}}},
		{"a retry refreshes the time of a hit", []step{{0, "a", 1}, {50 * time.Minute, "a", 1}, {70 * time.Minute, "b", 2}, {111 * time.Minute, "c", 2}}},
		{"out of order arrival keeps order", []step{{10 * time.Second, "a", 1}, {5 * time.Second, "b", 2}, {time.Hour + 6*time.Second, "c", 2}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := NewLimiter(time.Hour)
			for i, s := range tt.steps {
				if got := l.Add("user@example.com", s.rcpt, t0.Add(s.at)); got != s.want {
					t.Fatalf("step %d (%s at %s): count %d, want %d", i, s.rcpt, s.at, got, s.want)
				}
			}
		})
	}
}

func TestLimiterIdentitiesAreSeparate(t *testing.T) {
	l := NewLimiter(time.Hour)
	l.Add("a", "x", t0)
	l.Add("a", "y", t0)
	if got := l.Add("b", "x", t0); got != 1 {
		t.Fatalf("b count %d, want 1", got)
	}
	if got := l.Count("a", t0); got != 2 {
		t.Fatalf("a count %d, want 2", got)
	}
	if got := l.Count("nobody", t0); got != 0 {
		t.Fatalf("unknown identity count %d", got)
	}
}

func TestLimiterWarnOncePerPeriod(t *testing.T) {
	l := NewLimiter(time.Hour)
	if !l.Warn("u", t0) {
		t.Fatal("first warning not due")
	}
	if l.Warn("u", t0.Add(59*time.Minute)) {
		t.Fatal("second warning within the period")
	}
	if !l.Warn("u", t0.Add(time.Hour)) {
		t.Fatal("warning not due again after a period")
	}
}

func TestLimiterSweep(t *testing.T) {
	l := NewLimiter(time.Hour)
	l.Add("quiet", "a", t0)
	l.Add("busy", "a", t0)
	l.Add("busy", "b", t0.Add(50*time.Minute))
	if n := l.Sweep(t0.Add(30 * time.Minute)); n != 2 {
		t.Fatalf("tracked %d after early sweep, want 2", n)
	}
	if n := l.Sweep(t0.Add(time.Hour)); n != 1 {
		t.Fatalf("tracked %d, want 1 (quiet identity dropped)", n)
	}
	if got := l.Count("busy", t0.Add(time.Hour)); got != 1 {
		t.Fatalf("busy count %d, want 1", got)
	}
	l.Forget("busy")
	if l.Len() != 0 {
		t.Fatalf("Len %d after Forget", l.Len())
	}
}

func TestEvidenceBounds(t *testing.T) {
	l := NewLimiter(time.Hour)
	for i := range 50 {
		l.Note("u", t0, func(e *evidence) {
			e.addRecipient(callout.Result{Address: "r" + strconv.Itoa(i) + "@x"}, t0)
			e.addClient("192.0.2."+strconv.Itoa(i), "")
			e.addQueueID("Q" + strconv.Itoa(i%7))
		})
	}
	l.Note("u", t0, func(e *evidence) {
		e.addRecipient(callout.Result{Address: "r45@x", Host: "mx.x", Reply: callout.Reply{Code: 550, Enhanced: [3]int{5, 1, 10}, Text: "gone"}}, t0)
	})
	e := l.Evidence("u")
	if len(e.Recipients) != maxRecipients || e.Recipients[len(e.Recipients)-1].Address != "r45@x" || e.Recipients[0].Address != "r30@x" {
		t.Fatalf("recipients %d, first %v last %v", len(e.Recipients), e.Recipients[0], e.Recipients[len(e.Recipients)-1])
	}
	if last := e.Recipients[len(e.Recipients)-1]; last.Reply != "550 5.1.10 gone" || last.MX != "mx.x" || !last.Time.Equal(t0) {
		t.Fatalf("recipient evidence %+v", last)
	}
	if len(e.Clients) != maxClients || len(e.QueueIDs) != 7 {
		t.Fatalf("clients %d, queue IDs %d", len(e.Clients), len(e.QueueIDs))
	}
}

func TestLimiterConcurrent(t *testing.T) {
	l := NewLimiter(time.Hour)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 500 {
				l.Add("id"+strconv.Itoa(i%10), "r"+strconv.Itoa(i), t0.Add(time.Duration(g)))
			}
		})
	}
	wg.Wait()
	for i := range 10 {
		if got := l.Count("id"+strconv.Itoa(i), t0); got != 50 {
			t.Fatalf("id%d count %d, want 50", i, got)
		}
	}
}

// TestLimiterMemory measures the heap per tracked identity holding one
// invalid recipient, and fails when it is far over budget. Measured: 123
// bytes (203 before the track was cut to 80 bytes).
func TestLimiterMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("allocates a lot")
	}
	const n = 200_000
	ids := make([]string, n)
	for i := range ids {
		ids[i] = "user" + strconv.Itoa(i) + "@customer.example"
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	l := NewLimiter(time.Hour)
	for _, id := range ids {
		l.Add(id, "nobody@elsewhere.example", t0)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	per := float64(after.HeapAlloc-before.HeapAlloc) / n
	t.Logf("%.0f bytes per tracked identity (identity strings excluded: they are the caller's)", per)
	if per > 180 {
		t.Fatalf("%.0f bytes per identity, budget 180", per)
	}
	runtime.KeepAlive(l)
}

func BenchmarkLimiterAdd(b *testing.B) {
	l := NewLimiter(time.Hour)
	ids := make([]string, 10000)
	for i := range ids {
		ids[i] = "user" + strconv.Itoa(i) + "@example.com"
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			l.Add(ids[i%len(ids)], "rcpt"+strconv.Itoa(i%50)+"@x.example", t0.Add(time.Duration(i)))
			i++
		}
	})
}

func ExampleLimiter() {
	l := NewLimiter(time.Hour)
	start := time.Date(2026, 1, 1, 9, 0, 0, 0, time.UTC)
	fmt.Println(l.Add("alice@example.com", "nobody@example.net", start))
	fmt.Println(l.Add("alice@example.com", "nobody@example.net", start.Add(time.Minute))) // a retry
	fmt.Println(l.Add("alice@example.com", "ghost@example.org", start.Add(2*time.Minute)))
	fmt.Println(l.Count("alice@example.com", start.Add(61*time.Minute))) // the first left the window
	// Output:
	// 1
	// 1
	// 2
	// 1
}

// TestEvidenceBoundedInBytes: what senders and recipients' MX hosts say is
// kept to the byte budgets, the newest recipient always, and a cut string
// is a copy that does not pin the long one.
func TestEvidenceBoundedInBytes(t *testing.T) {
	long := strings.Repeat("x", 2000)
	host := func(i int) string { return strings.Repeat("h", 240) + strconv.Itoa(i) + ".example" }
	var e evidence
	for i := range 30 {
		e.addClient("2001:db8::"+strconv.Itoa(i), host(i))
		e.addRecipient(callout.Result{Address: "u" + strconv.Itoa(i) + "@" + long, Host: host(i), Status: callout.StatusInvalid,
			Reply: callout.Reply{Code: 550, Enhanced: [3]int{5, 1, 1}, Text: "é" + long}}, t0)
	}
	if b := e.clientBytes(); b > maxClientBytes {
		t.Fatalf("client evidence %d bytes, budget %d", b, maxClientBytes)
	}
	if len(e.clients) < 4 || len(e.clients) > maxClients {
		t.Fatalf("%d clients kept", len(e.clients))
	}
	if e.clients[0].Name != host(0) || e.clients[len(e.clients)-1].Name != "" {
		t.Fatalf("first client name %q, last %q: want the first kept whole, later ones without a name", e.clients[0].Name, e.clients[len(e.clients)-1].Name)
	}
	size := 0
	for _, r := range e.rcpts {
		size += r.size()
		for _, s := range []string{r.addr, r.mx, r.text} {
			if len(s) > maxEvidenceString || !utf8.ValidString(s) {
				t.Fatalf("evidence string of %d bytes (valid UTF-8 %v)", len(s), utf8.ValidString(s))
			}
		}
	}
	if size > maxRecipientBytes || len(e.rcpts) == 0 {
		t.Fatalf("recipient evidence %d bytes in %d entries, budget %d", size, len(e.rcpts), maxRecipientBytes)
	}
	if last := e.rcpts[len(e.rcpts)-1]; !strings.HasPrefix(last.addr, "u29@") {
		t.Fatalf("newest recipient not kept: %q", last.addr[:10])
	}
	// A known client keeps being counted, with its latest name while
	// the budget holds.
	e.addClient("2001:db8::1", host(99))
	if c := e.clients[1]; c.Count != 2 || c.Name != host(99) || e.clientBytes() > maxClientBytes {
		t.Fatalf("client 1: %+v, %d bytes", c, e.clientBytes())
	}
	// A single oversized recipient is still kept (cut), never lost.
	var one evidence
	one.addRecipient(callout.Result{Address: long, Host: long, Reply: callout.Reply{Text: long}}, t0)
	if len(one.rcpts) != 1 || one.rcpts[0].size() > 3*maxEvidenceString {
		t.Fatalf("one long recipient: %d entries", len(one.rcpts))
	}
}

// TestEvidenceMemoryUnderAttack: identities whose every invalid recipient
// comes with a 2 KB reply text of its own (an MX the attacker runs) and
// long client names cost a bounded heap each: the budgets, not the input.
func TestEvidenceMemoryUnderAttack(t *testing.T) {
	if testing.Short() {
		t.Skip("allocates a lot")
	}
	const n = 2000
	l := NewLimiter(time.Hour)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := range n {
		id := "user" + strconv.Itoa(i)
		for j := range maxRecipients {
			res := callout.Result{Address: "r" + strconv.Itoa(j) + "@mx.attacker.example", Host: "mx.attacker.example",
				Status: callout.StatusInvalid, Reply: callout.Reply{Code: 550, Text: strconv.Itoa(j) + strings.Repeat("y", 2040)}}
			l.Note(id, t0, func(e *evidence) {
				e.addClient("198.51.100."+strconv.Itoa(j), strings.Repeat("c", 200)+strconv.Itoa(j)+".example")
				e.addRecipient(res, t0)
			})
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	per := float64(after.HeapAlloc-before.HeapAlloc) / n
	t.Logf("%.0f bytes of heap per identity under attack", per)
	// The budgets (3 KiB of strings) plus the entries (20 of 48 and 64
	// bytes) and the track: about 5.5 KiB; without them it is 45 KiB.
	if per > 6<<10 {
		t.Fatalf("%.0f bytes per identity", per)
	}
	runtime.KeepAlive(l)
}
