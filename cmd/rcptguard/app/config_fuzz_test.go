package app

import (
	"strings"
	"testing"
)

// FuzzDecodeConfig: any file text decodes without a panic, and every error
// that is not the file's TOML syntax names a table or key the way the file
// writes it.
func FuzzDecodeConfig(f *testing.F) {
	for _, seed := range []string{
		"",
		"[detector]\nlimit = 10\nperiod = \"1h\"\n",
		"[detector]\nlimt = 10\nperiod = \"1hour\"\nlimit = \"10\"\n[blocklst]\npath = \"/x\"\n",
		"limit = 1\n[[detector]]\nx = 1\n",
		"[policy]\nlisten = \"127.0.0.1:1\"\nallow_users = [1, 2]\n",
		"[callout]\ntimeout = 10\nsession_idle = \"7d\"\n[detector.sub]\na = {b = 1}\n",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, text string) {
		cfg := defaultConfig()
		errs := decodeConfig(text, &cfg)
		if len(errs) == 1 && strings.HasPrefix(errs[0].Error(), "toml:") {
			return // not TOML
		}
		for _, err := range errs {
			key, _, ok := strings.Cut(err.Error(), ": ")
			if !ok || key == "" || strings.ContainsAny(key, " \n") && !strings.HasPrefix(key, `"`) {
				t.Errorf("error %q does not start with a key", err)
			}
		}
		_ = cfg.Validate()
	})
}
