package doctor

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// postfix is what doctor learns from postconf.
type postfix struct {
	main     map[string]string            // every parameter, defaults included, $names expanded
	services []service                    // master.cf
	override map[string]map[string]string // "name/type" → expanded -o parameters
}

// service is one master.cf entry.
type service struct {
	name, typ string
	chroot    bool
	command   string
}

func (s service) key() string { return s.name + "/" + s.typ }

// param returns a parameter as the service sees it: its -o override,
// else main.cf's value (or Postfix's default).
func (p *postfix) param(s service, name string) string {
	if v, ok := p.override[s.key()][name]; ok {
		return v
	}
	return p.main[name]
}

// mainParams are the main.cf parameters doctor reads with their defaults.
var mainParams = []string{"queue_directory", "mail_owner", "smtpd_sasl_auth_enable",
	"smtpd_relay_restrictions", "smtpd_recipient_restrictions", "smtpd_policy_service_timeout"}

// postconfPath finds postconf in $PATH or the usual sbin directories.
func postconfPath(name string) string {
	if name != "" {
		return name
	}
	if p, err := exec.LookPath("postconf"); err == nil {
		return p
	}
	for _, d := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
		if fi, err := os.Stat(filepath.Join(d, "postconf")); err == nil && fi.Mode()&0o111 != 0 {
			return filepath.Join(d, "postconf")
		}
	}
	return "postconf"
}

// readPostfix runs postconf -x (the parameters doctor reads, expanded), -xn (those set
// in main.cf, including ones Postfix does not know such as
// rcptguard_restrictions), -xP (master.cf -o overrides, expanded) and -M
// (the services).
func readPostfix(ctx context.Context, postconf, configDir string) (*postfix, error) {
	run := func(args ...string) (string, error) {
		if configDir != "" {
			args = append([]string{"-c", configDir}, args...)
		}
		ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, postconf, args...)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil {
			return "", fmt.Errorf("%s %s: %w: %s", postconf, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
		}
		return stdout.String(), nil
	}
	p := &postfix{main: map[string]string{}, override: map[string]map[string]string{}}
	// Only the parameters doctor reads: "postconf -x" of every parameter
	// can take seconds (it works out defaults such as myhostname).
	wanted := append([]string{"-x"}, mainParams...)
	for _, args := range [][]string{wanted, {"-xn"}} {
		out, err := run(args...)
		if err != nil {
			return nil, err
		}
		for name, v := range parseParams(out) {
			p.main[name] = v
		}
	}
	out, err := run("-xP")
	if err != nil {
		return nil, err
	}
	for key, v := range parseParams(out) {
		i := strings.LastIndexByte(key, '/')
		if i < 0 {
			continue
		}
		svc, name := key[:i], key[i+1:]
		if p.override[svc] == nil {
			p.override[svc] = map[string]string{}
		}
		p.override[svc][name] = v
	}
	out, err = run("-M")
	if err != nil {
		return nil, err
	}
	for line := range strings.SplitSeq(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 8 || strings.HasPrefix(f[0], "#") {
			continue
		}
		p.services = append(p.services, service{name: f[0], typ: f[1], chroot: f[4] == "y", command: f[7]})
	}
	return p, nil
}

// parseParams reads "name = value" lines.
func parseParams(out string) map[string]string {
	m := map[string]string{}
	for line := range strings.SplitSeq(out, "\n") {
		k, v, ok := strings.Cut(line, " = ")
		if !ok {
			if k, ok := strings.CutSuffix(line, " ="); ok {
				m[strings.TrimSpace(k)] = ""
			}
			continue
		}
		m[strings.TrimSpace(k)] = strings.TrimSpace(v)
	}
	return m
}

// restriction is one element of a restriction list: a name with the
// argument it takes (a table, a policy service), if any.
type restriction struct {
	name  string
	arg   string            // table or service
	attrs map[string]string // from "{ service, name=value, ... }"
}

// takesArg lists the restrictions whose next element is their argument.
func takesArg(name string) bool {
	return name == "check_policy_service" || strings.HasPrefix(name, "check_") && strings.HasSuffix(name, "_access") ||
		strings.HasPrefix(name, "check_") && (strings.HasSuffix(name, "_mx_access") || strings.HasSuffix(name, "_ns_access") || strings.HasSuffix(name, "_a_access"))
}

// parseRestrictions splits a restriction list at commas and white space,
// keeping "{ ... }" groups whole.
func parseRestrictions(list string) []restriction {
	var toks []string
	var cur strings.Builder
	depth := 0
	flush := func() {
		if s := strings.TrimSpace(cur.String()); s != "" {
			toks = append(toks, s)
		}
		cur.Reset()
	}
	for _, r := range list {
		switch {
		case r == '{':
			if depth == 0 {
				flush()
			}
			depth++
			cur.WriteRune(r)
		case r == '}':
			depth--
			cur.WriteRune(r)
			if depth == 0 {
				flush()
			}
		case depth == 0 && (r == ',' || r == ' ' || r == '\t' || r == '\n'):
			flush()
		default:
			cur.WriteRune(r)
		}
	}
	flush()
	var rs []restriction
	for i := 0; i < len(toks); i++ {
		r := restriction{name: strings.ToLower(toks[i])}
		if takesArg(r.name) && i+1 < len(toks) {
			i++
			r.arg, r.attrs = parseGroup(toks[i])
		}
		rs = append(rs, r)
	}
	return rs
}

// parseGroup reads "{ service, name=value, ... }", or returns a plain
// argument as is.
func parseGroup(tok string) (string, map[string]string) {
	inner, ok := strings.CutPrefix(tok, "{")
	if !ok {
		return tok, nil
	}
	inner = strings.TrimSuffix(inner, "}")
	attrs := map[string]string{}
	first := ""
	for i, part := range strings.Split(inner, ",") {
		part = strings.TrimSpace(part)
		if i == 0 {
			first = part
			continue
		}
		if k, v, ok := strings.Cut(part, "="); ok {
			attrs[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	return first, attrs
}

// parseTime reads a Postfix time value: a number with an optional unit
// s, m, h, d or w (default seconds).
func parseTime(v string) (time.Duration, bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, false
	}
	unit := time.Second
	switch v[len(v)-1] {
	case 's':
		v = v[:len(v)-1]
	case 'm':
		unit, v = time.Minute, v[:len(v)-1]
	case 'h':
		unit, v = time.Hour, v[:len(v)-1]
	case 'd':
		unit, v = 24*time.Hour, v[:len(v)-1]
	case 'w':
		unit, v = 7*24*time.Hour, v[:len(v)-1]
	}
	n := 0
	for _, c := range v {
		if c < '0' || c > '9' || n > 1e9 {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	if v == "" {
		return 0, false
	}
	return time.Duration(n) * unit, true
}
