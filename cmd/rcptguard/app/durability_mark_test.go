package app

import (
	"testing"

	"github.com/rcptguard/rcptguard/blocklist"
	"github.com/rcptguard/rcptguard/detector"
)

// TestDaemonBlock: start-up reconciliation reports only the daemon's own
// blocks: not those made by hand, and not those a server made because
// another server of the fleet crossed first (that one reports).
func TestDaemonBlock(t *testing.T) {
	for _, tc := range []struct {
		text string
		want bool
	}{
		{"rcptguard: u@x.test blocked: 101 invalid recipients within 1h", true},
		{"[auto-unblock 2026-11-30T22:00:00Z] rcptguard: u@x.test blocked: 101 invalid recipients within 1h", true},
		{"rcptguard: u@x.test blocked: 101 invalid recipients within 1h " + detector.FleetMark, false},
		{"rcptguard: u@x.test blocked by hand: compromised", false},
		{"rcptguard: other@x.test blocked: 101 invalid recipients within 1h", false},
	} {
		if got := daemonBlock(blocklist.Entry{Identity: "u@x.test", Action: "HOLD", Text: tc.text}); got != tc.want {
			t.Errorf("daemonBlock(%q) = %v, want %v", tc.text, got, tc.want)
		}
	}
}
