package app

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/callout"
	"github.com/rcptguard/rcptguard/notify"
)

func writeConfig(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "rcptguard.toml")
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDefaultsAreValid(t *testing.T) {
	cfg, err := LoadConfig("")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Detector.Limit != 100 || cfg.Detector.Period.D() != time.Hour || cfg.Callout.Timeout.D() != 10*time.Second ||
		cfg.Policy.Listen[0] != "127.0.0.1:10040" || cfg.Detector.Action != "HOLD" || !cfg.Callout.CatchAllProbe {
		t.Fatalf("unexpected defaults: %+v", cfg)
	}
	// An empty file is the defaults too.
	cfg2, err := LoadConfig(writeConfig(t, "# nothing\n"))
	if err != nil {
		t.Fatal(err)
	}
	cfg2.Path = ""
	if !reflect.DeepEqual(cfg, cfg2) {
		t.Fatal("empty file differs from defaults")
	}
}

func TestFullContractConfig(t *testing.T) {
	text := `
[policy]
listen = ["127.0.0.1:10040", "unix:/run/rcptguard/policy.sock"]
socket_mode = "0666"
idle_timeout = "10m"

[detector]
limit = 50
period = "2h"
warn_at = 0.5
action = "HOLD"
mode = "monitor"
wait = "3s"
relay_networks = ["192.0.2.0/24", "2001:db8::1"]
local_domains = ["example.com"]
exempt = ["newsletter@example.com"]
limits_file = "/etc/rcptguard/limits"

[callout]
resolver = "127.0.0.1:53"
port = 25
timeout = "8s"
helo = "mail.example.com"
mail_from = "verify@example.com"
positive_ttl = "12h"
negative_ttl = "1h"
unknown_ttl = "10m"
allow_private = false
catchall_probe = false
cache_size = 33554432
per_host = 2
single_rcpt_mx = ["*.mail.protection.outlook.com"]
accept_all_domains = []
accept_all_mx = ["*.yahoodns.net"]
starttls = true

[blocklist]
path = "/var/lib/rcptguard/blocklist"

[notify]
to = ["abuse@example.com"]
from = "rcptguard@example.com"
relay = "127.0.0.1:25"
username = "rcptguard"
password_file = "/etc/rcptguard/relay-password"
starttls = "required"
spool = "/var/lib/rcptguard/spool"

[metrics]
listen = "127.0.0.1:9410"

[log]
level = "debug"
format = "json"
`
	cfg, err := LoadConfig(writeConfig(t, text))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Detector.Limit != 50 || cfg.Detector.Mode != "monitor" || cfg.Callout.PerHost != 2 ||
		len(cfg.Callout.AcceptAllDomains) != 0 || cfg.Callout.AcceptAllDomains == nil || cfg.Notify.STARTTLS != "required" ||
		cfg.Detector.Period.D() != 2*time.Hour {
		t.Fatalf("values not decoded: %+v", cfg)
	}
}

// TestDottedKeys: "callout.port = 26" at the top is [callout] port = 26.
func TestDottedKeys(t *testing.T) {
	cfg, err := LoadConfig(writeConfig(t, "callout.port = 26\n[detector]\nlimit = 7\n"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Callout.Port != 26 || cfg.Detector.Limit != 7 {
		t.Fatalf("port %d limit %d, want 26 and 7", cfg.Callout.Port, cfg.Detector.Limit)
	}
}

func TestBadConfigs(t *testing.T) {
	tests := []struct {
		text string
		want []string // substrings of the error
	}{
		{"[detector]\nbogus = 1\n", []string{"detector.bogus: unknown key"}},
		{"[nosuchsection]\na = 1\nb = 2\n", []string{"nosuchsection: unknown table"}},
		{"limit = 1\n", []string{"limit: unknown key"}},
		// Dotted keys and sub-tables name their first unknown part.
		{"[callout]\nfoo.bar = 1\n", []string{"callout.foo: unknown key"}},
		{"[callout.extra]\ny = 1\n", []string{"callout.extra: unknown key"}},
		{"[[callout.extra]]\ny = 1\n", []string{"callout.extra: unknown key"}},
		{"a.b = 1\n", []string{"a: unknown table"}},
		{"[callout]\nport.x = 1\n", []string{"callout.port: must be a whole number", "got a table"}},
		{"[callout.port]\nx = 1\n", []string{"callout.port: must be a whole number", "got a table"}},
		{"[[detector]]\nlimit = 1\n", []string{"detector: must be a table"}},
		{"[detector]\naction = \"DISCARD\"\n", []string{"detector.action", "DISCARD"}},
		{"[detector]\naction = \"dunno\"\n", []string{"detector.action", "DUNNO blocks nothing"}},
		{"[callout]\ncatchall_probe = \"yes\"\n", []string{"callout.catchall_probe: must be true or false, without quotes, got a string"}},
		{"[policy]\nlisten = \"127.0.0.1:1\"\n", []string{"policy.listen: must be a list of strings", "got a string"}},
		{"[detector]\nlimit = \"many\"\n", []string{"detector.limit"}},
		{"[detector]\nlimit = -1\n", []string{"detector.limit: must be 0"}},
		{"[detector]\nperiod = \"forever\"\n", []string{"detector.period", "not a duration"}},
		{"[detector]\nperiod = \"10s\"\n", []string{"detector.period: must be between"}},
		{"[detector]\nwarn_at = 1.5\n", []string{"detector.warn_at"}},
		{"[detector]\naction = \"FROBNICATE\"\n", []string{"detector.action"}},
		{"[detector]\naction = \"HOLD\\nX\"\n", []string{"detector.action"}},
		{"[detector]\nmode = \"panic\"\n", []string{"detector.mode"}},
		{"[detector]\nwait = \"0s\"\n", []string{"detector.wait"}},
		{"[detector]\nratio = 1.5\n", []string{"detector.ratio"}},
		{"[detector]\nratio_min = 0\n", []string{"detector.ratio_min"}},
		{"[detector]\nlong_period = \"30m\"\n", []string{"detector.long_period"}},
		{"[detector]\nlong_limit = -1\n", []string{"detector.long_limit"}},
		{"[detector]\nmax_identities = 10\n", []string{"detector.max_identities", "1000"}},
		{"[detector]\nrelay_networks = [\"10.0.0.0/33\"]\n", []string{"detector.relay_networks[0]"}},
		{"[detector]\nlocal_domains = [\"bad domain\"]\n", []string{"detector.local_domains[0]"}},
		{"[detector]\nexempt = [\"ok@x\", \"a b@x\"]\n", []string{"detector.exempt[1]", "white space"}},
		{"[detector]\nexempt = [\"=?utf-8?q?x?=@x\"]\n", []string{"detector.exempt[0]", "encoded word"}},
		{"[detector]\nexempt = [\"a\\u202eb@x\"]\n", []string{"detector.exempt[0]", "format character"}},
		{"[detector]\nexempt = [\"\"]\n", []string{"detector.exempt[0]", "empty"}},
		{"[policy]\nlisten = [\"localhost\"]\n", []string{"policy.listen[0]", "host:port"}},
		{"[policy]\nlisten = [\":10040\"]\n", []string{"policy.listen[0]", "host is missing"}},
		{"[policy]\nlisten = [\"unix:relative.sock\"]\n", []string{"policy.listen[0]", "absolute path"}},
		{"[policy]\nlisten = []\n", []string{"policy.listen: at least one"}},
		{"[policy]\nsocket_mode = \"rw\"\n", []string{"policy.socket_mode"}},
		{"[policy]\nsocket_group = \"post fix\"\n", []string{"policy.socket_group", "group name"}},
		{"[policy]\nmax_connections_per_peer = -1\n", []string{"policy.max_connections_per_peer: must be 0"}},
		{"[policy]\nallow_users = [\"postfix\", \"bad user\"]\n", []string{"policy.allow_users[1]"}},
		{"[policy]\nallow_users = [\"\"]\n", []string{"policy.allow_users[0]"}},
		{"[policy]\nallow_networks = [\"192.0.2.0/33\"]\n", []string{"policy.allow_networks[0]"}},
		{"[callout]\nresolver = \"8.8.8.8\"\n", []string{"callout.resolver"}},
		{"[callout]\nport = 0\n", []string{"callout.port"}},
		{"[callout]\ntimeout = \"1h\"\n", []string{"callout.timeout"}},
		{"[callout]\ntimeout = \"10\"\n", []string{"callout.timeout", "not a duration"}},
		{"[callout]\nhelo = \"my host\"\n", []string{"callout.helo"}},
		{"[callout]\nmail_from = \"<x@y>\"\n", []string{"callout.mail_from"}},
		{"[callout]\nnegative_ttl = \"-1h\"\n", []string{"callout.negative_ttl"}},
		{"[callout]\ncache_size = 10\n", []string{"callout.cache_size"}},
		{"[callout]\nper_host = 0\n", []string{"callout.per_host"}},
		{"[blocklist]\npath = \"relative\"\n", []string{"blocklist.path"}},
		{"[notify]\nto = [\"not an address\"]\n", []string{"notify.to[0]"}},
		{"[notify]\nrelay = \"nowhere\"\n", []string{"notify.relay"}},
		{"[notify]\nstarttls = \"maybe\"\n", []string{"notify.starttls"}},
		{"[notify]\nusername = \"u\"\n", []string{"notify.password_file"}},
		{"[notify]\nwarn_user = true\n", []string{"notify.warn_user", "detector.local_domains"}},
		{"[metrics]\nlisten = \"9410\"\n", []string{"metrics.listen"}},
		{"[log]\nlevel = \"loud\"\n", []string{"log.level"}},
		{"[cluster]\nredis = \"127.0.0.1:6379\"\n", []string{"cluster.redis"}},
		{"[cluster]\nredis = \"unix:run/redis.sock\"\n", []string{"cluster.redis"}},
		{"[cluster]\nredis = \"redis://127.0.0.1\"\nkey_prefix = \"a{b}\"\n", []string{"cluster.key_prefix"}},
		{"[cluster]\npassword_file = \"/etc/pw\"\n", []string{"cluster.password_file", "cluster.redis"}},
		{"[cluster]\nredis = \"redis://127.0.0.1\"\npassword_file = \"pw\"\n", []string{"cluster.password_file"}},
		{"[detector\n", []string{":2:"}},
		// Several errors are reported at once.
		{"[detector]\nlimit = -1\nmode = \"x\"\n", []string{"detector.limit", "detector.mode"}},
	}
	for _, tt := range tests {
		path := writeConfig(t, tt.text)
		_, err := LoadConfig(path)
		if err == nil {
			t.Errorf("%q: no error", tt.text)
			continue
		}
		for _, w := range append(tt.want, path) {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%q: error %q lacks %q", tt.text, err, w)
			}
		}
	}
}

func TestMissingConfigFile(t *testing.T) {
	_, err := LoadConfig(filepath.Join(t.TempDir(), "nope.toml"))
	if err == nil || !strings.Contains(err.Error(), "nope.toml") {
		t.Fatalf("error %v does not name the file", err)
	}
}

// TestContribConfigIsTheDefaults keeps contrib/rcptguard.toml, which shows
// every key with its default, true; and every key is documented in the
// README.
func TestContribConfigIsTheDefaults(t *testing.T) {
	const path = "../../../contrib/rcptguard.toml"
	cfg, err := LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	def := defaultConfig()
	def.Path = path
	// The one departure: the installed configuration listens on the
	// socket the README's Postfix setup uses.
	def.Policy.Listen = []string{"unix:/var/spool/postfix/rcptguard/policy.sock"}
	def.Policy.SocketGroup = "postfix"
	if !reflect.DeepEqual(*cfg, def) {
		t.Fatalf("contrib/rcptguard.toml differs from the defaults:\n%+v\n%+v", *cfg, def)
	}
	text, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile("../../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	section := ""
	for _, line := range strings.Split(string(text), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "["):
			section = strings.Trim(line, "[]")
		case line != "" && !strings.HasPrefix(line, "#"):
			key, _, _ := strings.Cut(line, " =")
			if !strings.Contains(string(readme), "`"+section+"."+key+"`") {
				t.Errorf("README does not document %s.%s", section, key)
			}
		}
	}
}

// TestOneGrammar: a value the file accepts is one the package that uses it
// accepts, judged by the package's own rule, and the zero value means the
// same in the file and in the package.
func TestOneGrammar(t *testing.T) {
	for _, addr := range []string{"a@example.com.", "a@example.com", "a@[127.0.0.1]", "a..b@example.com", "\"x y\"@example.com"} {
		_, fileErr := LoadConfig(writeConfig(t, fmt.Sprintf("[callout]\nmail_from = %q\n", addr)))
		_, pkgErr := callout.ParseAddress(addr)
		if (fileErr == nil) != (pkgErr == nil && !strings.ContainsAny(addr, "<> ")) {
			t.Errorf("callout.mail_from %q: file says %v, callout says %v", addr, fileErr, pkgErr)
		}
	}
	for _, addr := range []string{"abuse@example.com", "abus\u00e9@example.com", "not an address", strings.Repeat("a", 250) + "@example.com"} {
		_, fileErr := LoadConfig(writeConfig(t, fmt.Sprintf("[notify]\nto = [%q]\n", addr)))
		_, pkgErr := notify.ParseAddress(addr)
		if (fileErr == nil) != (pkgErr == nil) {
			t.Errorf("notify.to %q: file says %v, notify says %v", addr, fileErr, pkgErr)
		}
	}
	// session_idle = "0s" closes a session at once: the verifier gets 0,
	// which callout reads the same way.
	cfg, err := LoadConfig(writeConfig(t, "[callout]\nsession_idle = \"0s\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := calloutConfig(cfg, nil, nil, nil, nil).SessionIdle; got != 0 {
		t.Errorf("session_idle 0s reaches callout as %s", got)
	}
	if got := calloutConfig(&Config{Callout: defaultConfig().Callout}, nil, nil, nil, nil).SessionIdle; got != callout.DefaultSessionIdle {
		t.Errorf("default session_idle reaches callout as %s", got)
	}
}

// TestDocumentedKeysAndDefaults keeps the README's key table and
// contrib/rcptguard.toml listing exactly the keys Config decodes, and the
// table's default column equal to defaultConfig: a key missing from
// contrib, or a default changed in the code alone, fails here.
func TestDocumentedKeysAndDefaults(t *testing.T) {
	var keys []string
	ct := reflect.TypeFor[Config]()
	for i := range ct.NumField() {
		sf := ct.Field(i)
		section := sf.Tag.Get("toml")
		if section == "" || section == "-" {
			continue
		}
		for j := range sf.Type.NumField() {
			if key := sf.Type.Field(j).Tag.Get("toml"); key != "" && key != "-" {
				keys = append(keys, section+"."+key)
			}
		}
	}
	slices.Sort(keys)

	contrib, err := os.ReadFile("../../../contrib/rcptguard.toml")
	if err != nil {
		t.Fatal(err)
	}
	var inContrib []string
	section := ""
	for line := range strings.Lines(string(contrib)) {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "["):
			section = strings.Trim(line, "[]")
		case line != "" && !strings.HasPrefix(line, "#"):
			key, _, _ := strings.Cut(line, " =")
			inContrib = append(inContrib, section+"."+key)
		}
	}
	slices.Sort(inContrib)
	if !slices.Equal(inContrib, keys) {
		t.Errorf("contrib/rcptguard.toml lists keys\n%v\nthe configuration has\n%v", inContrib, keys)
	}

	readme, err := os.ReadFile("../../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	row := regexp.MustCompile("^\\| `([a-z_]+)\\.([a-z_]+)` \\| (.+?) \\| ")
	var inTable []string
	sections := map[string]*strings.Builder{}
	for line := range strings.Lines(string(readme)) {
		m := row.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		inTable = append(inTable, m[1]+"."+m[2])
		if !strings.HasPrefix(m[3], "`") || !strings.HasSuffix(m[3], "`") {
			continue // a default in words, e.g. "host name"
		}
		def := strings.Trim(m[3], "`")
		if sections[m[1]] == nil {
			sections[m[1]] = &strings.Builder{}
		}
		fmt.Fprintf(sections[m[1]], "%s = %s\n", m[2], def)
	}
	slices.Sort(inTable)
	if !slices.Equal(inTable, keys) {
		t.Errorf("README's key table lists keys\n%v\nthe configuration has\n%v", inTable, keys)
	}
	var doc strings.Builder
	for name, b := range sections {
		fmt.Fprintf(&doc, "[%s]\n%s", name, b)
	}
	path := writeConfig(t, doc.String())
	cfg, err := LoadConfig(path)
	if err != nil {
		t.Fatalf("README's defaults are not a valid configuration: %v", err)
	}
	def := defaultConfig()
	def.Path = path
	if !reflect.DeepEqual(*cfg, def) {
		t.Errorf("README's defaults differ from the code's:\n%+v\n%+v", *cfg, def)
	}
}
