package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
)

// taggedReport is one line of the input of "table": a load report (as
// "load -json" prints it) with the scenario it measured, the round of the
// comparison it belongs to and a free note.
type taggedReport struct {
	Scenario string `json:"scenario"`
	Round    int    `json:"round"`
	Note     string `json:"note"`
	Report
}

// readTagged reads JSON objects, one a line; blank lines are skipped.
func readTagged(r io.Reader) ([]taggedReport, error) {
	var out []taggedReport
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		var t taggedReport
		if err := json.Unmarshal([]byte(line), &t); err != nil {
			return nil, fmt.Errorf("line %d: %v", n, err)
		}
		if t.Scenario == "" {
			return nil, fmt.Errorf("line %d: no scenario", n)
		}
		out = append(out, t)
	}
	return out, sc.Err()
}

// tableRow is one scenario at one connection count, over all rounds.
type tableRow struct {
	scenario string
	conns    int
	runs     []taggedReport // in input order
}

// median returns the run with the median requests/s (the lower middle
// one for an even count).
func (r *tableRow) median() taggedReport {
	runs := slices.Clone(r.runs)
	slices.SortStableFunc(runs, func(a, b taggedReport) int {
		switch {
		case a.RequestsPerSecond < b.RequestsPerSecond:
			return -1
		case a.RequestsPerSecond > b.RequestsPerSecond:
			return 1
		}
		return 0
	})
	return runs[(len(runs)-1)/2]
}

func medianFloat(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	v = slices.Clone(v)
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

// writeTable prints the comparison as a Markdown table: per scenario and
// connection count, the median run's requests/s and latency, and the
// ratios to the base scenario at the same connection count, each the
// median over the rounds of the ratio within a round (the base measured
// in the same round, minutes apart at most). versus lists "A/B" pairs of
// scenarios whose requests/s ratio is printed below the table.
func writeTable(w io.Writer, runs []taggedReport, base string, versus []string) {
	rows := groupRows(runs, base)
	rounds := 0
	for _, t := range runs {
		rounds = max(rounds, t.Round)
	}
	rpsHead := "requests/s"
	if rounds > 1 {
		rpsHead = fmt.Sprintf("requests/s (median of %d)", rounds)
	}
	fmt.Fprintf(w, "| scenario | conns | %s | p50 | p99 | req/s ÷ %s | p99 ÷ %s | errors | notes |\n", rpsHead, base, base)
	fmt.Fprintln(w, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
	for _, r := range rows {
		m := r.median()
		var errs int64
		for _, t := range r.runs {
			errs += t.ErrorTotal
		}
		ratioRPS, ratioP99 := "", ""
		if b := findRow(rows, base, r.conns); b != nil {
			if v, ok := roundRatio(r, b, rps); ok {
				ratioRPS = fmtPercent(v)
			}
			if v, ok := roundRatio(r, b, p99); ok {
				ratioP99 = strconv.FormatFloat(v, 'f', 1, 64) + "×"
			}
		}
		fmt.Fprintf(w, "| %s | %d | %s | %s | %s | %s | %s | %d | %s |\n", r.scenario, r.conns,
			thousands(int64(m.RequestsPerSecond+0.5)), fmtMicros(m.Latency.P50), fmtMicros(m.Latency.P99),
			ratioRPS, ratioP99, errs, strings.Join(rowNotes(r, m), "; "))
	}
	writeVersus(w, rows, versus)
}

// groupRows groups the runs by scenario and connections: scenarios in
// order of first appearance, base first; connections ascending.
func groupRows(runs []taggedReport, base string) []*tableRow {
	var rows []*tableRow
	for _, t := range runs {
		r := findRow(rows, t.Scenario, t.Conns)
		if r == nil {
			r = &tableRow{scenario: t.Scenario, conns: t.Conns}
			rows = append(rows, r)
		}
		r.runs = append(r.runs, t)
	}
	order := map[string]int{base: -1}
	for _, r := range rows {
		if _, ok := order[r.scenario]; !ok {
			order[r.scenario] = len(order)
		}
	}
	slices.SortStableFunc(rows, func(a, b *tableRow) int {
		if d := order[a.scenario] - order[b.scenario]; d != 0 {
			return d
		}
		return a.conns - b.conns
	})
	return rows
}

func findRow(rows []*tableRow, scenario string, conns int) *tableRow {
	for _, r := range rows {
		if r.scenario == scenario && r.conns == conns {
			return r
		}
	}
	return nil
}

func rps(t *taggedReport) float64 { return t.RequestsPerSecond }
func p99(t *taggedReport) float64 { return t.Latency.P99 }

// roundRatio returns the median over rounds of f(run)/f(other run of the
// same round), or false when no round has both.
func roundRatio(r, of *tableRow, f func(*taggedReport) float64) (float64, bool) {
	var v []float64
	for i := range r.runs {
		for j := range of.runs {
			if r.runs[i].Round == of.runs[j].Round && f(&of.runs[j]) > 0 {
				v = append(v, f(&r.runs[i])/f(&of.runs[j]))
				break
			}
		}
	}
	return medianFloat(v), len(v) > 0
}

// rowNotes returns a row's notes: the range over rounds, the share of
// HOLD, the other actions, the median run's note.
func rowNotes(r *tableRow, m taggedReport) []string {
	var notes []string
	lo, hi := m.RequestsPerSecond, m.RequestsPerSecond
	for _, t := range r.runs {
		lo, hi = min(lo, t.RequestsPerSecond), max(hi, t.RequestsPerSecond)
	}
	if len(r.runs) > 1 {
		notes = append(notes, "range "+thousands(int64(lo+0.5))+"–"+thousands(int64(hi+0.5)))
	}
	if h := m.Actions["HOLD"]; h > 0 && m.Requests > 0 {
		notes = append(notes, fmt.Sprintf("HOLD %.0f%%", 100*float64(h)/float64(m.Requests)))
	}
	var other []string
	for word, n := range m.Actions {
		if word != "DUNNO" && word != "HOLD" && n > 0 {
			other = append(other, fmt.Sprintf("%s %d", word, n))
		}
	}
	slices.Sort(other)
	notes = append(notes, other...)
	if m.Note != "" {
		notes = append(notes, m.Note)
	}
	return notes
}

// fmtFactor formats a ratio with two significant digits: 40, 3.2, 0.59.
func fmtFactor(v float64) string {
	switch {
	case v >= 10:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case v >= 1:
		return strconv.FormatFloat(v, 'f', 1, 64)
	}
	return strconv.FormatFloat(v, 'f', 2, 64)
}

// writeVersus writes one line per "A/B" pair and connection count: the
// median over rounds of A's requests/s ÷ B's.
func writeVersus(w io.Writer, rows []*tableRow, versus []string) {
	printed := false
	for _, pair := range versus {
		a, b, ok := strings.Cut(pair, "/")
		if !ok {
			continue
		}
		for _, ra := range rows {
			if ra.scenario != a {
				continue
			}
			if rb := findRow(rows, b, ra.conns); rb != nil {
				if v, ok := roundRatio(ra, rb, rps); ok {
					if !printed {
						fmt.Fprintln(w)
						printed = true
					}
					fmt.Fprintf(w, "%s ÷ %s at %d connections: %s×\n", a, b, ra.conns, fmtFactor(v))
				}
			}
		}
	}
}

// fmtPercent formats a ratio as a percentage with two significant digits
// for small ones.
func fmtPercent(v float64) string {
	p := 100 * v
	if p < 10 {
		return strconv.FormatFloat(p, 'f', 1, 64) + " %"
	}
	return strconv.FormatFloat(p, 'f', 0, 64) + " %"
}
