// Package textfmt holds the small text helpers the packages share: one bound
// on untrusted strings (Cut) and one way to write a window length
// (FormatPeriod), so that a log line, a block text and a report say the
// same thing the same way.
//
// It is a leaf: it imports nothing of rcptguard's, so callout, notify and
// the detector can all use it.
package textfmt

import (
	"strconv"
	"time"
	"unicode/utf8"
)

// Cut returns s cut to at most n bytes, at a UTF-8 character boundary when
// s is valid UTF-8 there (so a cut never makes a valid string invalid).
// It is the bound for values echoed into logs, errors and results; making
// them safe to print is the printer's job.
func Cut(s string, n int) string {
	if len(s) <= n {
		return s
	}
	if n <= 0 {
		return ""
	}
	// s[n] is the first byte cut off: when it continues a character,
	// cut before that character's first byte (at most UTFMax-1 back).
	i := n
	for j := n; j >= 0 && j > n-utf8.UTFMax; j-- {
		if utf8.RuneStart(s[j]) {
			i = j
			break
		}
	}
	return s[:i]
}

// FormatPeriod writes a window length the way the configuration takes it:
// "1h", "90m", "2d", "45s", "90s"; other lengths in Go's duration syntax
// ("1.5s").
func FormatPeriod(d time.Duration) string {
	switch {
	case d == 0:
		return "0s"
	case d%(24*time.Hour) == 0:
		return strconv.FormatInt(int64(d/(24*time.Hour)), 10) + "d"
	case d%time.Hour == 0:
		return strconv.FormatInt(int64(d/time.Hour), 10) + "h"
	case d%time.Minute == 0:
		return strconv.FormatInt(int64(d/time.Minute), 10) + "m"
	case d%time.Second == 0:
		return strconv.FormatInt(int64(d/time.Second), 10) + "s"
	}
	return d.String()
}
