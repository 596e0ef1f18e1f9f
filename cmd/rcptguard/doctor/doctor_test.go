package doctor

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// contribMain and contribMaster are the README's Postfix snippets.
func contrib(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "..", "contrib", "postfix", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// world is a Postfix configuration directory, a queue directory and a
// blocklist that Postfix's user can read.
type world struct {
	conf, queue, blocklist string
}

func newWorld(t *testing.T) world {
	t.Helper()
	if _, err := exec.LookPath(postconfPath("")); err != nil {
		if os.Getenv("RCPTGUARD_E2E") == "1" {
			t.Fatal("postconf is not installed (RCPTGUARD_E2E=1 makes this a failure)")
		}
		t.Skip("postconf is not installed (apt-get install postfix)")
	}
	dir := t.TempDir()
	// Readable by Postfix's user, as /var/lib/rcptguard is.
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	w := world{conf: filepath.Join(dir, "conf"), queue: filepath.Join(dir, "queue"), blocklist: filepath.Join(dir, "state", "blocklist")}
	for _, d := range []string{w.conf, w.queue, filepath.Dir(w.blocklist)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(w.blocklist, []byte("# rcptguard blocklist\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return w
}

// write installs main.cf (with the world's queue directory and blocklist
// path substituted) and master.cf.
func (w world) write(t *testing.T, mainCF, masterCF string) {
	t.Helper()
	mainCF = strings.ReplaceAll(mainCF, "/var/lib/rcptguard/blocklist", w.blocklist)
	mainCF = "queue_directory = " + w.queue + "\ncompatibility_level = 3.6\n" + mainCF
	if err := os.WriteFile(filepath.Join(w.conf, "main.cf"), []byte(mainCF), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(w.conf, "master.cf"), []byte(masterCF), 0o644); err != nil {
		t.Fatal(err)
	}
	// postconf waits (up to 2s) for a file changed in the last second to
	// settle: age them.
	old := time.Now().Add(-time.Minute)
	for _, f := range []string{"main.cf", "master.cf"} {
		if err := os.Chtimes(filepath.Join(w.conf, f), old, old); err != nil {
			t.Fatal(err)
		}
	}
}

func (w world) config() Config {
	return Config{
		PostfixConfigDir: w.conf,
		Listen:           []string{"unix:" + filepath.Join(w.queue, "rcptguard", "policy.sock")},
		BlocklistPath:    w.blocklist,
		Wait:             5 * time.Second,
	}
}

// TestDoctor runs the checks on real Postfix configurations (read by
// postconf -c), the contrib one and broken ones.
func TestDoctor(t *testing.T) {
	smtpLine := "smtp inet n - y - - smtpd\n"
	tests := []struct {
		name     string
		edit     func(w world, mainCF, masterCF string) (string, string)
		cfg      func(w world, c *Config)
		wantFail []string // each must be in some FAIL line; none: all ok
		wantOK   []string // each must be in some ok line
	}{
		{name: "contrib", wantOK: []string{
			"submission/inet: the socket unix:rcptguard/policy.sock is",
			"submissions/inet: rcptguard's policy service unix:rcptguard/policy.sock is in smtpd_recipient_restrictions before permit_sasl_authenticated",
			"submission/inet: policy timeout=10s exceeds detector.wait 5s",
			"submission/inet: the blocklist is checked",
			"can read it",
		}},
		{name: "policy after permit_sasl_authenticated", edit: func(w world, m, s string) (string, string) {
			return m, strings.ReplaceAll(s, "smtpd_recipient_restrictions=$rcptguard_restrictions,permit_sasl_authenticated,reject",
				"smtpd_recipient_restrictions=permit_sasl_authenticated,$rcptguard_restrictions,reject")
		}, wantFail: []string{"submission/inet: check_policy_service unix:rcptguard/policy.sock comes after permit_sasl_authenticated", "check_sasl_access of the blocklist comes after permit_sasl_authenticated"}},
		{name: "reject_unknown_recipient_domain first, in the relay restrictions", edit: func(w world, m, s string) (string, string) {
			return m + "\nsmtpd_relay_restrictions = reject_unknown_recipient_domain, permit_sasl_authenticated, reject_unauth_destination\n", s
		}, wantFail: []string{"submission/inet: reject_unknown_recipient_domain (smtpd_relay_restrictions) comes before rcptguard's check"}},
		{name: "timeout not above wait", edit: func(w world, m, s string) (string, string) {
			return strings.ReplaceAll(m, "timeout=10s", "timeout=5"), s
		}, wantFail: []string{"policy timeout=5 is not longer than detector.wait 5s"}},
		{name: "global policy timeout", edit: func(w world, m, s string) (string, string) {
			return strings.ReplaceAll(m, "timeout=10s, ", "") + "\nsmtpd_policy_service_timeout = 2s\n", s
		}, wantFail: []string{"policy smtpd_policy_service_timeout = 2s is not longer"}},
		{name: "absolute socket path in a chroot", edit: func(w world, m, s string) (string, string) {
			return strings.ReplaceAll(m, "unix:rcptguard/policy.sock", "unix:"+filepath.Join(w.queue, "rcptguard", "policy.sock")), s
		}, wantFail: []string{"submission/inet: smtpd is chrooted to", "name the socket relative to queue_directory: check_policy_service { unix:rcptguard/policy.sock"}},
		{name: "absolute socket path without chroot", edit: func(w world, m, s string) (string, string) {
			return strings.ReplaceAll(m, "unix:rcptguard/policy.sock", "unix:"+filepath.Join(w.queue, "rcptguard", "policy.sock")),
				strings.ReplaceAll(s, "-       y       -       -       smtpd", "-       n       -       -       smtpd")
		}, wantOK: []string{"submission/inet: rcptguard's policy service unix:/"}},
		{name: "socket outside the chroot", cfg: func(w world, c *Config) {
			c.Listen = []string{"unix:/run/rcptguard/policy.sock"}
		}, edit: func(w world, m, s string) (string, string) {
			return strings.ReplaceAll(m, "unix:rcptguard/policy.sock", "unix:/run/rcptguard/policy.sock"), s
		}, wantFail: []string{"smtpd is chrooted to", `set policy.listen = ["unix:`}},
		{name: "another policy service only", edit: func(w world, m, s string) (string, string) {
			return strings.ReplaceAll(m, "unix:rcptguard/policy.sock", "inet:127.0.0.1:10023"), s
		}, wantFail: []string{"no check_policy_service reaches rcptguard", "found inet:127.0.0.1:10023"}},
		{name: "TCP", cfg: func(w world, c *Config) { c.Listen = []string{"127.0.0.1:10040"} }, edit: func(w world, m, s string) (string, string) {
			return strings.ReplaceAll(m, "unix:rcptguard/policy.sock", "inet:127.0.0.1:10040"), s
		}, wantOK: []string{"submission/inet: rcptguard's policy service inet:127.0.0.1:10040 is in smtpd_recipient_restrictions"}},
		{name: "no blocklist", edit: func(w world, m, s string) (string, string) {
			return strings.ReplaceAll(m, "check_sasl_access texthash:/var/lib/rcptguard/blocklist,", ""), s
		}, wantFail: []string{"submission/inet: the blocklist is not used"}},
		{name: "blocklist as hash:", edit: func(w world, m, s string) (string, string) {
			return strings.ReplaceAll(m, "texthash:/var/lib/rcptguard/blocklist", "hash:/var/lib/rcptguard/blocklist"), s
		}, wantFail: []string{"the blocklist is read as hash:"}},
		{name: "blocklist missing", cfg: func(w world, c *Config) {
			if err := os.Remove(w.blocklist); err != nil {
				panic(err)
			}
		}, wantFail: []string{"no such file or directory: Postfix answers 451 4.3.5", "`rcptguard list`"}},
		{name: "blocklist directory closed to postfix", cfg: func(w world, c *Config) {
			if err := os.Chmod(filepath.Dir(w.blocklist), 0o700); err != nil {
				panic(err)
			}
		}, wantFail: []string{"user postfix cannot enter " + "STATE", "chmod o+x STATE"}},
		{name: "blocklist unreadable", cfg: func(w world, c *Config) {
			if err := os.Chmod(w.blocklist, 0o600); err != nil {
				panic(err)
			}
		}, wantFail: []string{"user postfix cannot read it", "chmod 0644"}},
		{name: "SASL on port 25 from main.cf, no rcptguard there", edit: func(w world, m, s string) (string, string) {
			return m + "\nsmtpd_sasl_auth_enable = yes\nsmtpd_recipient_restrictions = permit_sasl_authenticated, reject_unauth_destination\n", smtpLine + s
		}, wantFail: []string{"smtp/inet: rcptguard's policy service is not in"}},
		{name: "no SASL anywhere", edit: func(w world, m, s string) (string, string) {
			return m, smtpLine
		}, wantFail: []string{"no smtpd service in master.cf enables SASL"}},
	}
	if _, err := user.Lookup("postfix"); err != nil {
		t.Skip("no postfix user")
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newWorld(t)
			mainCF, masterCF := contrib(t, "main.cf"), contrib(t, "master.cf")
			if tt.edit != nil {
				mainCF, masterCF = tt.edit(w, mainCF, masterCF)
			}
			w.write(t, mainCF, masterCF)
			cfg := w.config()
			if tt.cfg != nil {
				tt.cfg(w, &cfg)
			}
			fs, err := Check(context.Background(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			var out strings.Builder
			allOK := Report(&out, fs)
			t.Logf("\n%s", out.String())
			if allOK != (len(tt.wantFail) == 0) {
				t.Errorf("all ok = %v, want %v", allOK, len(tt.wantFail) == 0)
			}
			state := filepath.Dir(w.blocklist)
			for _, want := range tt.wantFail {
				want = strings.ReplaceAll(want, "STATE", state)
				if !hasLine(out.String(), "FAIL  ", want) {
					t.Errorf("no FAIL line with %q", want)
				}
			}
			for _, want := range tt.wantOK {
				if !hasLine(out.String(), "ok    ", want) {
					t.Errorf("no ok line with %q", want)
				}
			}
			for _, f := range fs {
				if !f.OK && f.Fix == "" {
					t.Errorf("finding without a fix: %s", f)
				}
			}
		})
	}
}

func hasLine(out, prefix, want string) bool {
	for l := range strings.SplitSeq(out, "\n") {
		if strings.HasPrefix(l, prefix) && strings.Contains(l, want) {
			return true
		}
	}
	return false
}

// TestDoctorHealth: the addresses Postfix uses are asked, as mail_owner,
// and a failure is a finding.
func TestDoctorHealth(t *testing.T) {
	w := newWorld(t)
	w.write(t, contrib(t, "main.cf"), contrib(t, "master.cf"))
	cfg := w.config()
	var asked []string
	cfg.Health = func(_ context.Context, addr string, u *user.User) (string, string, error) {
		asked = append(asked, addr+" as "+u.Username)
		return "", "", errors.New("connect: no such file or directory")
	}
	fs, err := Check(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	if Report(&out, fs) {
		t.Error("all ok although rcptguard does not answer")
	}
	if want := cfg.Listen[0] + " as postfix"; len(asked) != 1 || asked[0] != want {
		t.Errorf("asked %q, want [%q]", asked, want)
	}
	if !hasLine(out.String(), "FAIL  ", "does not answer user postfix: connect: no such file or directory") {
		t.Errorf("no FAIL line for the health check:\n%s", out.String())
	}
}

func TestParseRestrictions(t *testing.T) {
	got := parseRestrictions("check_sasl_access texthash:/x, check_policy_service { unix:a/b, timeout=10s, default_action=DUNNO },permit_sasl_authenticated\n  reject")
	want := []string{"check_sasl_access(texthash:/x)", "check_policy_service(unix:a/b timeout=10s)", "permit_sasl_authenticated()", "reject()"}
	if len(got) != len(want) {
		t.Fatalf("got %+v", got)
	}
	for i, r := range got {
		s := r.name + "(" + r.arg
		if r.attrs["timeout"] != "" {
			s += " timeout=" + r.attrs["timeout"]
		}
		s += ")"
		if s != want[i] {
			t.Errorf("%d: %s, want %s", i, s, want[i])
		}
	}
}

func TestParseTime(t *testing.T) {
	for in, want := range map[string]time.Duration{"10s": 10 * time.Second, "100": 100 * time.Second, "2m": 2 * time.Minute, "1h": time.Hour, "1d": 24 * time.Hour, "1w": 7 * 24 * time.Hour} {
		if got, ok := parseTime(in); !ok || got != want {
			t.Errorf("parseTime(%q) = %v, %v; want %v", in, got, ok, want)
		}
	}
	for _, in := range []string{"", "s", "x", "1.5s", "-1"} {
		if _, ok := parseTime(in); ok {
			t.Errorf("parseTime(%q) ok", in)
		}
	}
}
