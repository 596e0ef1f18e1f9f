package test_test

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// The packaging files are checked statically here; .ci/run also builds the
// image when a Docker engine is available.

func readRepoFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile("../" + path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestDockerfile(t *testing.T) {
	text := readRepoFile(t, "Dockerfile")
	// Join continuation lines, drop comments.
	text = strings.ReplaceAll(text, "\\\n", " ")
	var lines []string
	for _, l := range strings.Split(text, "\n") {
		l = strings.TrimSpace(l)
		if l != "" && !strings.HasPrefix(l, "#") {
			lines = append(lines, l)
		}
	}
	has := func(prefix string) []string {
		var out []string
		for _, l := range lines {
			if strings.HasPrefix(l, prefix) {
				out = append(out, strings.TrimSpace(strings.TrimPrefix(l, prefix)))
			}
		}
		return out
	}
	known := regexp.MustCompile(`^(FROM|WORKDIR|COPY|RUN|ARG|USER|ENV|VOLUME|EXPOSE|HEALTHCHECK|ENTRYPOINT|CMD) `)
	for _, l := range lines {
		if !known.MatchString(l) {
			t.Errorf("unknown Dockerfile instruction: %q", l)
		}
	}
	if from := has("FROM "); len(from) != 2 || !strings.Contains(from[0], " AS build") || !strings.Contains(from[1], "distroless/static") {
		t.Errorf("want a build stage and a distroless static runtime, got %q", from)
	}
	// Every local COPY source exists.
	for _, c := range has("COPY ") {
		if strings.HasPrefix(c, "--from") {
			continue
		}
		f := strings.Fields(c)
		for _, src := range f[:len(f)-1] {
			if src == "." {
				continue
			}
			if _, err := os.Stat("../" + src); err != nil {
				t.Errorf("COPY source %s: %v", src, err)
			}
		}
	}
	if _, err := os.Stat("../cmd/rcptguard/main.go"); err != nil || !strings.Contains(text, "./cmd/rcptguard") || !strings.Contains(text, "CGO_ENABLED=0") {
		t.Error("the build stage must build ./cmd/rcptguard statically")
	}
	if u := has("USER "); len(u) != 1 || u[0] != "65532:65532" {
		t.Errorf("USER %q, want numeric non-root 65532:65532", u)
	}
	for _, want := range []string{
		"ENV RCPTGUARD_CONFIG=/etc/rcptguard/rcptguard.toml",
		"COPY --from=build /out/rcptguard.toml /etc/rcptguard/rcptguard.toml",
		`/^\[policy\]/,/^\[detector\]/ s|^listen = .*|listen = ["127.0.0.1:10040"]|`,
		`VOLUME ["/var/lib/rcptguard"]`,
		"EXPOSE 10040",
		"EXPOSE 9410",
		`ENTRYPOINT ["/usr/local/bin/rcptguard"]`,
		"COPY --from=build /out/rcptguard /usr/local/bin/rcptguard",
		`CMD ["/usr/local/bin/rcptguard", "health"]`,
	} {
		if !strings.Contains(strings.Join(lines, "\n"), want) {
			t.Errorf("Dockerfile lacks %q", want)
		}
	}
}

func TestSystemdUnit(t *testing.T) {
	unit := readRepoFile(t, "contrib/rcptguard.service")
	for _, want := range []string{
		"ExecStart=/usr/local/bin/rcptguard serve -config /etc/rcptguard/rcptguard.toml",
		"ExecReload=/bin/kill -HUP $MAINPID",
		"User=rcptguard", "StateDirectory=rcptguard", "StateDirectoryMode=0755", "ProtectSystem=strict", "NoNewPrivileges=yes",
		"ReadWritePaths=-/var/spool/postfix/rcptguard",
	} {
		if !strings.Contains(unit, want) {
			t.Errorf("systemd unit lacks %q", want)
		}
	}
	// The socket's directory, where contrib/rcptguard.toml puts the socket.
	tmpfiles := readRepoFile(t, "contrib/tmpfiles.d/rcptguard.conf")
	if !strings.Contains(tmpfiles, "\nd /var/spool/postfix/rcptguard 2750 rcptguard postfix -\n") {
		t.Error("contrib/tmpfiles.d/rcptguard.conf does not make /var/spool/postfix/rcptguard rcptguard:postfix 2750")
	}
	if !strings.Contains(readRepoFile(t, "contrib/rcptguard.toml"), `listen = ["unix:/var/spool/postfix/rcptguard/policy.sock"]`) {
		t.Error("contrib/rcptguard.toml does not listen on /var/spool/postfix/rcptguard/policy.sock")
	}
}

// TestPostfixSnippetsOrder checks that in every restriction list of the
// contrib snippets the policy check comes before permit_sasl_authenticated.
func TestPostfixSnippetsOrder(t *testing.T) {
	var conf []string
	for _, l := range strings.Split(readRepoFile(t, "contrib/postfix/main.cf"), "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			conf = append(conf, l)
		}
	}
	mainCf := strings.Join(conf, "\n")
	masterCf := readRepoFile(t, "contrib/postfix/master.cf")
	if i, j := strings.Index(mainCf, "check_policy_service"), strings.Index(mainCf, "permit_sasl_authenticated"); i < 0 || j < 0 || i > j {
		t.Error("main.cf: check_policy_service must come before permit_sasl_authenticated")
	}
	if !strings.Contains(mainCf, "check_sasl_access texthash:/var/lib/rcptguard/blocklist") {
		t.Error("main.cf: the blocklist is not used with check_sasl_access")
	}
	for _, l := range strings.Split(masterCf, "\n") {
		if strings.Contains(l, "smtpd_recipient_restrictions=") {
			if i, j := strings.Index(l, "$rcptguard_restrictions"), strings.Index(l, "permit_sasl_authenticated"); i < 0 || i > j {
				t.Errorf("master.cf: %q: rcptguard must come before permit_sasl_authenticated", strings.TrimSpace(l))
			}
		}
	}
}

// fail2banRegex turns the contrib filter's failregex into a Go regexp with
// a "host" group.
func fail2banRegex(t *testing.T) *regexp.Regexp {
	t.Helper()
	for _, l := range strings.Split(readRepoFile(t, "contrib/fail2ban/filter.d/rcptguard.conf"), "\n") {
		if re, ok := strings.CutPrefix(l, "failregex = "); ok {
			return regexp.MustCompile(strings.ReplaceAll(re, "<HOST>", `(?P<host>[0-9A-Fa-f.:]+)`))
		}
	}
	t.Fatal("no failregex in the fail2ban filter")
	return nil
}

// TestReadmeMetrics: every metric the product registers is in the README's
// Metrics table, so a postmaster reading it knows what the names mean.
func TestReadmeMetrics(t *testing.T) {
	readme := readRepoFile(t, "README.md")
	start := strings.Index(readme, "\n## Metrics\n")
	if start < 0 {
		t.Fatal("README has no Metrics section")
	}
	section := readme[start:]
	if end := strings.Index(section[1:], "\n## "); end >= 0 {
		section = section[:end+1]
	}
	// A metric's name is given as Name: "…" in its options, or first in
	// a {"name", "help", …} table row.
	name := regexp.MustCompile(`(?:Name:\s*|\{)"(rcptguard_[a-z_]+)"`)
	found := 0
	err := filepath.WalkDir("..", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") || strings.HasPrefix(path, "../test/") {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, m := range name.FindAllStringSubmatch(string(b), -1) {
			found++
			if !strings.Contains(section, "`"+m[1]) {
				t.Errorf("metric %s (%s) is not in README's Metrics table", m[1], path)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if found < 20 {
		t.Fatalf("found %d metric names in the source: the pattern no longer matches how metrics are declared", found)
	}
}
