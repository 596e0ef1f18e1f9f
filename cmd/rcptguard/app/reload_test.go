package app

import (
	"context"
	"log/slog"
	"os"
	"slices"
	"strings"
	"testing"
)

// TestReloadSaysWhatItDid: a reload applies the keys it can and names, one
// line each, the changed keys that need a restart; it never says
// "configuration reloaded" while leaving one of them out.
func TestReloadSaysWhatItDid(t *testing.T) {
	const base = "[policy]\nlisten = [\"127.0.0.1:10040\"]\n[detector]\nlimit = 100\n"
	tests := []struct {
		name    string
		next    string
		restart []string // keys that need a restart, in order
	}{
		{"nothing changed", base, nil},
		{"only reloadable keys", "[policy]\nlisten = [\"127.0.0.1:10040\"]\nallow_users = [\"nobody\"]\n[detector]\nlimit = 5\nexempt = [\"a@example.com\"]\n", nil},
		{"listen, metrics and notify", "[policy]\nlisten = [\"127.0.0.1:10041\"]\n[detector]\nlimit = 5\n[notify]\nto = [\"abuse@example.com\"]\nrelay = \"127.0.0.1:2525\"\n[metrics]\nlisten = \"127.0.0.1:9410\"\n",
			[]string{"policy.listen", "notify.to", "notify.relay", "metrics.listen"}},
		{"callout and blocklist", base + "[callout]\ntimeout = \"3s\"\n[blocklist]\npath = \"/tmp/other\"\n", []string{"callout.timeout", "blocklist.path"}},
		{"period, with a reloadable key", "[policy]\nlisten = [\"127.0.0.1:10040\"]\n[detector]\nlimit = 7\nperiod = \"2h\"\n", []string{"detector.period"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeConfig(t, base)
			running, err := LoadConfig(path)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, []byte(tt.next), 0o644); err != nil {
				t.Fatal(err)
			}
			var applied *Config
			var logs lockedBuffer
			r := &reloader{running: running, log: slog.New(slog.NewTextHandler(&logs, nil)),
				apply: func(_ context.Context, c *Config) error { applied = c; return nil }}
			r.reload(context.Background())
			if applied == nil {
				t.Fatalf("nothing applied; log:\n%s", logs.String())
			}
			if _, got := keepRunning(running, applied); len(got) != 0 {
				t.Errorf("applied %q, which need a restart", got)
			}
			if next, _ := LoadConfig(path); next != nil {
				if _, got := keepRunning(running, next); !slices.Equal(got, tt.restart) {
					t.Errorf("restart needed for %q, want %q", got, tt.restart)
				}
				if applied.Detector.Limit != next.Detector.Limit || !slices.Equal(applied.Detector.Exempt, next.Detector.Exempt) {
					t.Errorf("reloadable keys not applied: limit %d, exempt %q", applied.Detector.Limit, applied.Detector.Exempt)
				}
			}
			out := logs.String()
			for _, k := range tt.restart {
				if !strings.Contains(out, "restart needed for "+k) {
					t.Errorf("log lacks %q:\n%s", "restart needed for "+k, out)
				}
			}
			if said := strings.Contains(out, "configuration reloaded"); said != (len(tt.restart) == 0) {
				t.Errorf("log says \"configuration reloaded\" %v with %d keys left for a restart:\n%s", said, len(tt.restart), out)
			}
		})
	}
	// A broken file is refused, the running configuration kept.
	path := writeConfig(t, "[detector]\nlimit = -1\n")
	var logs lockedBuffer
	r := &reloader{running: &Config{Path: path}, log: slog.New(slog.NewTextHandler(&logs, nil)),
		apply: func(context.Context, *Config) error { t.Error("a broken file was applied"); return nil }}
	r.reload(context.Background())
	if !strings.Contains(logs.String(), "reload failed") || !strings.Contains(logs.String(), "detector.limit") {
		t.Errorf("log:\n%s", logs.String())
	}
}
