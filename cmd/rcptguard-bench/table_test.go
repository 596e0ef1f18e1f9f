package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func tagged(t *testing.T, scenario string, round, conns int, rps, p99 float64, actions map[string]int64, note string) string {
	t.Helper()
	tr := taggedReport{Scenario: scenario, Round: round, Note: note, Report: Report{
		Conns: conns, Requests: int64(rps), RequestsPerSecond: rps, Latency: LatencyReport{P50: p99 / 4, P99: p99},
		Actions: actions, Errors: map[string]int64{},
	}}
	b, err := json.Marshal(tr)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestTable(t *testing.T) {
	dunno := func(n float64) map[string]int64 { return map[string]int64{"DUNNO": int64(n), "HOLD": 0} }
	lines := []string{
		// Round 2 is slow for everybody: the ratios stay.
		tagged(t, "baseline", 1, 8, 50000, 1000, dunno(50000), ""),
		tagged(t, "cached", 1, 8, 40000, 1500, dunno(40000), ""),
		tagged(t, "postfwd", 1, 8, 1000, 30000, dunno(1000), ""),
		tagged(t, "baseline", 2, 8, 20000, 2000, dunno(20000), ""),
		tagged(t, "cached", 2, 8, 16000, 3000, dunno(16000), ""),
		tagged(t, "postfwd", 2, 8, 400, 60000, dunno(400), ""),
		tagged(t, "baseline", 3, 8, 30000, 1000, dunno(30000), ""),
		tagged(t, "cached", 3, 8, 24000, 1500, dunno(24000), ""),
		tagged(t, "postfwd", 3, 8, 600, 30000, map[string]int64{"DUNNO": 500, "421": 100}, ""),
		tagged(t, "blocked", 1, 64, 30000, 900, map[string]int64{"DUNNO": 0, "HOLD": 30000}, "a note"),
		"",
	}
	runs, err := readTagged(strings.NewReader(strings.Join(lines, "\n")))
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	writeTable(&out, runs, "baseline", []string{"cached/postfwd", "cached/baseline"})
	text := out.String()
	for _, want := range []string{
		"| scenario | conns | requests/s (median of 3) | p50 | p99 | req/s ÷ baseline | p99 ÷ baseline | errors | notes |",
		"| baseline | 8 | 30,000 | 250µs | 1.00ms | 100 % | 1.0× | 0 | range 20,000–50,000 |",
		"| cached | 8 | 24,000 | 375µs | 1.50ms | 80 % | 1.5× | 0 | range 16,000–40,000 |",
		"| postfwd | 8 | 600 | 7.50ms | 30.00ms | 2.0 % | 30.0× | 0 | range 400–1,000; 421 100 |",
		"| blocked | 64 | 30,000 | 225µs | 900µs |  |  | 0 | HOLD 100%; a note |",
		"cached ÷ postfwd at 8 connections: 40×",
		"cached ÷ baseline at 8 connections: 0.80×",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("table lacks\n%s\n in\n%s", want, text)
		}
	}
	// Scenario order: the base first, then as they came.
	if strings.Index(text, "| baseline") > strings.Index(text, "| cached") || strings.Index(text, "| postfwd") > strings.Index(text, "| blocked") {
		t.Errorf("rows out of order:\n%s", text)
	}

	if _, err := readTagged(strings.NewReader(`{"round":1}`)); err == nil {
		t.Error("a line without scenario was accepted")
	}
	if _, err := readTagged(strings.NewReader(`{"scenario":`)); err == nil {
		t.Error("broken JSON was accepted")
	}

	path := filepath.Join(t.TempDir(), "runs.jsonl")
	if err := os.WriteFile(path, []byte(strings.Join(lines, "\n")), 0o600); err != nil {
		t.Fatal(err)
	}
	var stdout bytes.Buffer
	if code := run(context.Background(), []string{"table", "-versus", "cached/postfwd", path}, &stdout, &bytes.Buffer{}); code != 0 ||
		!strings.Contains(stdout.String(), "40×") {
		t.Errorf("table command: exit %d\n%s", code, stdout.String())
	}
}

func TestThousands(t *testing.T) {
	for n, want := range map[int64]string{0: "0", 999: "999", 1000: "1,000", 1234567: "1,234,567", -4321: "-4,321"} {
		if got := thousands(n); got != want {
			t.Errorf("thousands(%d) = %q, want %q", n, got, want)
		}
	}
}
