package detector

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	ident "github.com/rcptguard/rcptguard/blocklist/identity"
	"github.com/rcptguard/rcptguard/callout/textfmt"
)

// ParseLimits reads a limits file: one "IDENTITY LIMIT" pair a line, where
// IDENTITY is an identity ("user@example.com", "192.0.2.7") or "*@domain"
// for every identity of a domain, and LIMIT is a whole number (0 means
// unlimited). Blank lines and lines starting with '#' are ignored. Errors
// name the line.
func ParseLimits(r io.Reader) (map[string]int, error) {
	limits := map[string]int{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 4096), 4096)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		fields := strings.Fields(line)
		if len(fields) != 2 {
			return nil, fmt.Errorf("line %d: want \"IDENTITY LIMIT\", got %q", n, textfmt.Cut(line, 100))
		}
		id, err := ident.Canonical(fields[0])
		if err != nil {
			return nil, fmt.Errorf("line %d: %q: %w", n, textfmt.Cut(fields[0], 100), err)
		}
		if strings.HasPrefix(id, "*") && !strings.HasPrefix(id, "*@") {
			return nil, fmt.Errorf("line %d: %q is not an identity or \"*@domain\"", n, textfmt.Cut(fields[0], 100))
		}
		v, err := strconv.Atoi(fields[1])
		if err != nil || v < 0 {
			return nil, fmt.Errorf("line %d: limit %q is not a whole number ≥ 0", n, textfmt.Cut(fields[1], 20))
		}
		if _, dup := limits[id]; dup {
			return nil, fmt.Errorf("line %d: %s is listed twice", n, id)
		}
		limits[id] = v
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("line %d: %w", n+1, err)
	}
	return limits, nil
}

// LoadLimits reads the limits file at path; "" means none.
func LoadLimits(path string) (map[string]int, error) {
	if path == "" {
		return nil, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("limits file: %w", err)
	}
	defer f.Close()
	limits, err := ParseLimits(f)
	if err != nil {
		return nil, fmt.Errorf("limits file %s: %w", path, err)
	}
	return limits, nil
}
