package app

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/rcptguard/rcptguard/blocklist/identity"
	"github.com/rcptguard/rcptguard/callout"
	"github.com/rcptguard/rcptguard/cmd/rcptguard/cluster"
	"github.com/rcptguard/rcptguard/notify"
)

// defaultConfigPath is read when no -config flag and no RCPTGUARD_CONFIG
// environment variable name a file, if it exists.
const defaultConfigPath = "/etc/rcptguard/rcptguard.toml"

// Config is the whole configuration file. Every key has a default (see
// defaultConfig), so an empty file, or none, is a working configuration.
type Config struct {
	Policy    PolicyConfig    `toml:"policy"`
	Detector  DetectorConfig  `toml:"detector"`
	Callout   CalloutConfig   `toml:"callout"`
	Blocklist BlocklistConfig `toml:"blocklist"`
	Queue     QueueConfig     `toml:"queue"`
	Notify    NotifyConfig    `toml:"notify"`
	Metrics   MetricsConfig   `toml:"metrics"`
	Log       LogConfig       `toml:"log"`
	Cluster   ClusterConfig   `toml:"cluster"`

	// Path is the file the configuration was read from, "" for defaults.
	Path string `toml:"-"`
}

// PolicyConfig is the [policy] section: where Postfix reaches us.
type PolicyConfig struct {
	Listen         []string `toml:"listen"`
	SocketMode     string   `toml:"socket_mode"`
	SocketGroup    string   `toml:"socket_group"`
	IdleTimeout    Duration `toml:"idle_timeout"`
	RequestTimeout Duration `toml:"request_timeout"`
	MaxConnections int      `toml:"max_connections"`
	// Who may connect; see policyPeers.
	MaxConnectionsPerPeer int      `toml:"max_connections_per_peer"`
	AllowUsers            []string `toml:"allow_users"`
	AllowNetworks         []string `toml:"allow_networks"`
}

// DetectorConfig is the [detector] section: counting and blocking.
type DetectorConfig struct {
	Limit         int      `toml:"limit"`
	Period        Duration `toml:"period"`
	WarnAt        float64  `toml:"warn_at"`
	Action        string   `toml:"action"`
	Mode          string   `toml:"mode"`
	Wait          Duration `toml:"wait"`
	Ratio         float64  `toml:"ratio"`
	RatioMin      int      `toml:"ratio_min"`
	LongPeriod    Duration `toml:"long_period"`
	LongLimit     int      `toml:"long_limit"`
	RelayNetworks []string `toml:"relay_networks"`
	LocalDomains  []string `toml:"local_domains"`
	Exempt        []string `toml:"exempt"`
	LimitsFile    string   `toml:"limits_file"`
	HoldMax       int      `toml:"hold_max"`
	HoldMaxBytes  int64    `toml:"hold_max_bytes"`
	HoldMaxAction string   `toml:"hold_max_action"`
	UnblockAfter  Duration `toml:"unblock_after"`
	MaxIdentities int      `toml:"max_identities"`
}

// CalloutConfig is the [callout] section: recipient verification.
type CalloutConfig struct {
	Resolver         string   `toml:"resolver"`
	Port             int      `toml:"port"`
	Timeout          Duration `toml:"timeout"`
	Helo             string   `toml:"helo"`
	MailFrom         string   `toml:"mail_from"`
	PositiveTTL      Duration `toml:"positive_ttl"`
	NegativeTTL      Duration `toml:"negative_ttl"`
	UnknownTTL       Duration `toml:"unknown_ttl"`
	AllowPrivate     bool     `toml:"allow_private"`
	CatchAllProbe    bool     `toml:"catchall_probe"`
	CacheSize        int64    `toml:"cache_size"`
	PerHost          int      `toml:"per_host"`
	SingleRcptMX     []string `toml:"single_rcpt_mx"`
	AcceptAllDomains []string `toml:"accept_all_domains"`
	AcceptAllMX      []string `toml:"accept_all_mx"`
	STARTTLS         bool     `toml:"starttls"`
	SessionIdle      Duration `toml:"session_idle"`
	PerIdentityRate  int      `toml:"per_identity_rate"`
	PerDomainRate    int      `toml:"per_domain_rate"`
	PerHostRate      int      `toml:"per_host_rate"`

	PerDomainRcptRate int `toml:"per_domain_rcpt_rate"`
	PerHostRcptRate   int `toml:"per_host_rcpt_rate"`
	SessionRate       int `toml:"session_rate"`
}

// BlocklistConfig is the [blocklist] section.
type BlocklistConfig struct {
	Path string `toml:"path"`
}

// QueueConfig is the [queue] section: Postfix's queue, for the held-mail
// commands and the retroactive hold.
type QueueConfig struct {
	PostfixConfig string `toml:"postfix_config"`
	Requests      string `toml:"requests"`
}

// NotifyConfig is the [notify] section: abuse reports.
type NotifyConfig struct {
	To            []string `toml:"to"`
	From          string   `toml:"from"`
	Relay         string   `toml:"relay"`
	Username      string   `toml:"username"`
	PasswordFile  string   `toml:"password_file"`
	STARTTLS      string   `toml:"starttls"`
	TLSSkipVerify bool     `toml:"tls_skip_verify"`
	Spool         string   `toml:"spool"`
	MaxAge        Duration `toml:"max_age"`
	WarnUser      bool     `toml:"warn_user"`
}

// MetricsConfig is the [metrics] section.
type MetricsConfig struct {
	Listen string `toml:"listen"`
}

// ClusterConfig is the [cluster] section: several servers sharing one
// judgement through Redis. Redis "" (the default): single host.
type ClusterConfig struct {
	Redis        string   `toml:"redis"`
	KeyPrefix    string   `toml:"key_prefix"`
	PasswordFile string   `toml:"password_file"`
	Timeout      Duration `toml:"timeout"`
}

// LogConfig is the [log] section.
type LogConfig struct {
	Level  string `toml:"level"`
	Format string `toml:"format"`
}

// defaultConfig returns the configuration used for keys a file leaves out.
func defaultConfig() Config {
	return Config{
		Policy: PolicyConfig{
			Listen:         []string{"127.0.0.1:10040"},
			SocketMode:     "0660",
			IdleTimeout:    Duration(5 * time.Minute),
			RequestTimeout: Duration(30 * time.Second),
			MaxConnections: 1000,
			AllowUsers:     []string{},
			AllowNetworks:  []string{},
		},
		Detector: DetectorConfig{
			Limit:  100,
			Period: Duration(time.Hour),
			WarnAt: 0.75,
			Action: "HOLD",
			Mode:   "enforce",
			Wait:   Duration(5 * time.Second),
			// Judged by the simulation (README, "Simulation").
			Ratio:      0.5,
			RatioMin:   30,
			LongPeriod: Duration(24 * time.Hour),
			// Empty, not nil, as a file saying "= []" decodes.
			RelayNetworks: []string{},
			LocalDomains:  []string{},
			Exempt:        []string{},
			HoldMax:       1000,
			HoldMaxBytes:  1 << 30,
			HoldMaxAction: "REJECT 5.7.1 account suspended, contact support",
			MaxIdentities: 1_000_000, // detector.DefaultMaxIdentities
		},
		Callout: CalloutConfig{
			Port:             25,
			Timeout:          Duration(10 * time.Second),
			PositiveTTL:      Duration(24 * time.Hour),
			NegativeTTL:      Duration(2 * time.Hour),
			UnknownTTL:       Duration(5 * time.Minute),
			CatchAllProbe:    true,
			CacheSize:        64 << 20,
			PerHost:          4,
			SingleRcptMX:     slices.Clone(callout.DefaultSingleRcptMX),
			AcceptAllDomains: slices.Clone(callout.DefaultAcceptAllDomains),
			AcceptAllMX:      slices.Clone(callout.DefaultAcceptAllMX),
			STARTTLS:         true,
			SessionIdle:      Duration(callout.DefaultSessionIdle),
			PerIdentityRate:  120,
			PerDomainRate:    30,
			PerHostRate:      300,

			PerDomainRcptRate: 120,
			PerHostRcptRate:   600,
			SessionRate:       600,
		},
		Blocklist: BlocklistConfig{Path: "/var/lib/rcptguard/blocklist"},
		Queue:     QueueConfig{Requests: "/var/lib/rcptguard/hold-requests"},
		Notify: NotifyConfig{
			To:       []string{},
			From:     "rcptguard@localhost",
			Relay:    "127.0.0.1:25",
			STARTTLS: "opportunistic",
			Spool:    "/var/lib/rcptguard/spool",
			MaxAge:   Duration(5 * 24 * time.Hour),
		},
		Log:     LogConfig{Level: "info", Format: "text"},
		Cluster: ClusterConfig{KeyPrefix: "rcptguard:", Timeout: Duration(cluster.DefaultTimeout)},
	}
}

// Duration is a time.Duration written as a Go duration string ("90s",
// "1h30m") in the file; a day suffix ("7d") is accepted too.
type Duration time.Duration

// UnmarshalText parses a duration string.
func (d *Duration) UnmarshalText(b []byte) error {
	s := strings.TrimSpace(string(b))
	if days, ok := strings.CutSuffix(s, "d"); ok {
		n, err := strconv.ParseFloat(days, 64)
		if err != nil || n < 0 {
			return fmt.Errorf("%q is not a duration such as \"10s\", \"5m\", \"2h\" or \"7d\"", s)
		}
		*d = Duration(n * float64(24*time.Hour))
		return nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%q is not a duration such as \"10s\", \"5m\", \"2h\" or \"7d\"", s)
	}
	*d = Duration(v)
	return nil
}

// MarshalText writes the duration as a Go duration string.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// D returns the value as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// configPath picks the file to read: the flag, else RCPTGUARD_CONFIG, else
// the default path when that file exists, else none.
func configPath(flagValue string) string {
	if flagValue != "" {
		return flagValue
	}
	if env := os.Getenv("RCPTGUARD_CONFIG"); env != "" {
		return env
	}
	if _, err := os.Stat(defaultConfigPath); err == nil {
		return defaultConfigPath
	}
	return ""
}

// LoadConfig reads and validates the configuration file at path ("" means
// defaults only). Unknown keys and tables, values of the wrong type or
// that do not parse, and bad values are errors naming the key and the
// file; all of them are reported at once.
func LoadConfig(path string) (*Config, error) {
	cfg := defaultConfig()
	cfg.Path = path
	if path == "" {
		if errs := cfg.Validate(); len(errs) > 0 {
			return nil, joinConfigErrors("defaults", errs)
		}
		return &cfg, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	errs := decodeConfig(string(data), &cfg)
	var perr toml.ParseError
	if len(errs) == 1 && errors.As(errs[0], &perr) {
		// The file is not TOML: nothing further can be read.
		return nil, fmt.Errorf("%s:%d: %s", path, perr.Position.Line, configKeyError(perr))
	}
	errs = append(errs, cfg.Validate()...)
	if len(errs) > 0 {
		return nil, joinConfigErrors(path, errs)
	}
	return &cfg, nil
}

// decodeConfig reads the file's keys into cfg one by one, so that one bad
// key does not hide the next: it returns an error per unknown table, unknown
// key and value that does not decode, or the TOML syntax error alone.
func decodeConfig(text string, cfg *Config) []error {
	var raw map[string]toml.Primitive
	md, err := toml.Decode(text, &raw)
	if err != nil {
		return []error{err}
	}
	sections := tomlFields(reflect.ValueOf(cfg).Elem())
	// A dotted key or a sub-table ("a.b = 1", "[callout.x]", "port.x = 1"
	// in [callout]) lists only its full path: each table and key on the
	// way is judged once, as the file had written it alone.
	var keys []toml.Key
	seen := map[string]bool{}
	for _, full := range md.Keys() {
		for n := 1; n <= min(2, len(full)); n++ {
			if s := full[:n].String(); !seen[s] {
				seen[s] = true
				keys = append(keys, full[:n])
			}
		}
	}
	// md.Type knows only the keys the file wrote out: a table on the way
	// to a dotted key is implicit.
	typ := func(k toml.Key) string {
		if t := md.Type(k...); t != "" {
			return t
		}
		return "Hash"
	}
	var errs []error
	for _, k := range keys {
		switch len(k) {
		case 1:
			_, known := sections[k[0]]
			switch {
			case !known && typ(k[:1]) != "Hash":
				errs = append(errs, fmt.Errorf("%s: unknown key (keys go in a table such as [detector])", k[0]))
			case !known:
				errs = append(errs, fmt.Errorf("%s: unknown table%s (the tables are %s)", k[0], didYouMean(k[0], sections), strings.Join(slices.Sorted(maps.Keys(sections)), ", ")))
			case typ(k[:1]) != "Hash":
				errs = append(errs, fmt.Errorf("%s: must be a table, [%s], got %s", k[0], k[0], tomlTypeWords(typ(k[:1]))))
			}
		case 2:
			sec, ok := sections[k[0]]
			if !ok || typ(k[:1]) != "Hash" {
				continue // reported with the table
			}
			var keys map[string]toml.Primitive
			_ = md.PrimitiveDecode(raw[k[0]], &keys) // a Hash
			fields := tomlFields(sec)
			field, ok := fields[k[1]]
			if !ok {
				errs = append(errs, fmt.Errorf("%s: unknown key%s", k, didYouMean(k[1], fields)))
				continue
			}
			if err := md.PrimitiveDecode(keys[k[1]], field.Addr().Interface()); err != nil {
				errs = append(errs, decodeError(k.String(), typ(k), field.Type(), err))
			}
		}
	}
	return errs
}

// didYouMean names the known key closest to a misspelt one, when one is
// within two edits.
func didYouMean(name string, known map[string]reflect.Value) string {
	best, bestDist := "", 3
	for _, k := range slices.Sorted(maps.Keys(known)) {
		if d := editDistance(name, k); d < bestDist {
			best, bestDist = k, d
		}
	}
	if best == "" {
		return ""
	}
	return fmt.Sprintf(" (did you mean %q?)", best)
}

// editDistance is the Levenshtein distance of a and b, in bytes.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev = cur
	}
	return prev[len(b)]
}

// tomlFields maps the toml tags of struct v's fields to the fields.
func tomlFields(v reflect.Value) map[string]reflect.Value {
	out := map[string]reflect.Value{}
	for i := range v.NumField() {
		if tag := v.Type().Field(i).Tag.Get("toml"); tag != "" && tag != "-" {
			out[tag] = v.Field(i)
		}
	}
	return out
}

// decodeError words a value that did not decode into a field of type t:
// the expected type in the file's terms, or the value's own complaint.
func decodeError(key, tomlType string, t reflect.Type, err error) error {
	line := ""
	if m := lineRE.FindStringSubmatch(err.Error()); m != nil {
		line = " (line " + m[1] + ")"
	}
	want := goTypeWords(t)
	var perr toml.ParseError
	if errors.As(err, &perr) && !strings.Contains(perr.Message, "incompatible types") && tomlTypeWords(tomlType) == "a string" {
		// The type is right; the text is not (a duration that does not parse).
		return fmt.Errorf("%s: %s%s", key, perr.Message, line)
	}
	return fmt.Errorf("%s: must be %s, got %s%s", key, want, tomlTypeWords(tomlType), line)
}

var lineRE = regexp.MustCompile(`line (\d+)`)

// goTypeWords says what a field of type t is written as in the file.
func goTypeWords(t reflect.Type) string {
	switch {
	case t == reflect.TypeFor[Duration]():
		return `a duration in quotes, such as "10s", "5m", "2h" or "7d"`
	case t.Kind() == reflect.Bool:
		return "true or false, without quotes"
	case t.Kind() == reflect.Int || t.Kind() == reflect.Int64:
		return "a whole number without quotes, such as 10"
	case t.Kind() == reflect.Float64:
		return "a number without quotes, such as 0.75"
	case t.Kind() == reflect.String:
		return "a string in quotes"
	case t.Kind() == reflect.Slice:
		return `a list of strings, such as ["a", "b"]`
	}
	return t.String()
}

// tomlTypeWords names a TOML value type (toml.MetaData.Type) in words.
func tomlTypeWords(t string) string {
	switch t {
	case "String":
		return "a string"
	case "Integer":
		return "a whole number"
	case "Float":
		return "a fractional number"
	case "Bool":
		return "a boolean"
	case "Array":
		return "a list"
	case "Hash":
		return "a table"
	case "ArrayHash":
		return "an array of tables"
	case "Datetime", "DatetimeLocal", "DateLocal", "TimeLocal":
		return "a date or time"
	}
	return "a " + strings.ToLower(t)
}

// configKeyError words a TOML decode error so it names the key.
func configKeyError(perr toml.ParseError) string {
	if perr.LastKey != "" {
		return perr.LastKey + ": " + perr.Message
	}
	return perr.Message
}

func joinConfigErrors(path string, errs []error) error {
	lines := make([]string, len(errs))
	for i, e := range errs {
		lines[i] = path + ": " + e.Error()
	}
	return errors.New(strings.Join(lines, "\n"))
}

// configErrors collects the errors of Validate, each naming its key.
type configErrors []error

func (e *configErrors) bad(key, format string, args ...any) {
	*e = append(*e, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
}

// each checks every element of a list key with check.
func (e *configErrors) each(key string, list []string, check func(string) error) {
	for i, s := range list {
		if err := check(s); err != nil {
			e.bad(fmt.Sprintf("%s[%d]", key, i), "%v", err)
		}
	}
}

// Validate checks every value and returns one error per bad key, each
// starting with the key's path ("callout.timeout: ..."). Each section has
// its function.
func (c *Config) Validate() []error {
	var e configErrors
	validatePolicy(&e, &c.Policy)
	validateDetector(&e, &c.Detector)
	validateTriggers(&e, &c.Detector)
	validateDetectorLists(&e, &c.Detector)
	validateHold(&e, &c.Detector)
	validateCallout(&e, &c.Callout)
	validateCalloutRates(&e, &c.Callout)
	validatePaths(&e, c)
	validateNotify(&e, &c.Notify, c.Detector.LocalDomains)
	if c.Metrics.Listen != "" {
		if err := checkHostPort(c.Metrics.Listen); err != nil {
			e.bad("metrics.listen", "%v", err)
		}
	}
	e = append(e, checkCluster(&c.Cluster)...)
	validateLog(&e, c.Log)
	return e
}

func validatePolicy(e *configErrors, p *PolicyConfig) {
	if len(p.Listen) == 0 {
		e.bad("policy.listen", "at least one address is needed")
	}
	e.each("policy.listen", p.Listen, func(l string) error {
		if path, ok := strings.CutPrefix(l, "unix:"); ok {
			if !strings.HasPrefix(path, "/") {
				return fmt.Errorf("%q: a unix socket needs an absolute path, like \"unix:/run/rcptguard/policy.sock\"", l)
			}
			return nil
		}
		return checkHostPort(l)
	})
	if m, err := strconv.ParseUint(p.SocketMode, 8, 32); err != nil || m > 0o777 {
		e.bad("policy.socket_mode", "%q is not an octal file mode such as \"0660\"", p.SocketMode)
	}
	if g := p.SocketGroup; g != "" && (len(g) > 32 || strings.ContainsAny(g, " \t\r\n\x00:/,")) {
		e.bad("policy.socket_group", "%q is not a group name or number such as \"postfix\"", g)
	}
	if p.IdleTimeout.D() <= 0 {
		e.bad("policy.idle_timeout", "must be positive")
	}
	if p.RequestTimeout.D() <= 0 || p.RequestTimeout.D() > 10*time.Minute {
		e.bad("policy.request_timeout", "must be between 0 and 10m, got %s", p.RequestTimeout.D())
	}
	if p.MaxConnections < 1 {
		e.bad("policy.max_connections", "must be at least 1, got %d", p.MaxConnections)
	}
	if p.MaxConnectionsPerPeer < 0 {
		e.bad("policy.max_connections_per_peer", "must be 0 (max_connections/4) or more, got %d", p.MaxConnectionsPerPeer)
	}
	e.each("policy.allow_users", p.AllowUsers, checkUserName)
	e.each("policy.allow_networks", p.AllowNetworks, func(n string) error { _, err := parseNetwork(n); return err })
}

// validateDetector checks the counting and blocking keys.
func validateDetector(e *configErrors, d *DetectorConfig) {
	if d.Limit < 0 {
		e.bad("detector.limit", "must be 0 (unlimited) or more")
	}
	if d.Period.D() < time.Minute || d.Period.D() > 30*24*time.Hour {
		e.bad("detector.period", "must be between 1m and 30d, got %s", d.Period.D())
	}
	if d.WarnAt < 0 || d.WarnAt > 1 {
		e.bad("detector.warn_at", "must be a fraction between 0 (no warning) and 1, got %v", d.WarnAt)
	}
	if err := checkBlockAction(d.Action); err != nil {
		e.bad("detector.action", "%v", err)
	}
	if d.Mode != "enforce" && d.Mode != "monitor" {
		e.bad("detector.mode", "must be \"enforce\" or \"monitor\", got %q", d.Mode)
	}
	if d.Wait.D() <= 0 || d.Wait.D() > time.Minute {
		e.bad("detector.wait", "must be between 0 and 1m (Postfix's policy timeout is 100s at most), got %s", d.Wait.D())
	}
}

// validateTriggers checks the keys of the other triggers and bounds.
func validateTriggers(e *configErrors, d *DetectorConfig) {
	if d.Ratio < 0 || d.Ratio > 1 {
		e.bad("detector.ratio", "must be a fraction between 0 (off) and 1, got %v", d.Ratio)
	}
	if d.RatioMin < 1 && d.Ratio > 0 {
		e.bad("detector.ratio_min", "must be at least 1 when detector.ratio is on, got %d", d.RatioMin)
	}
	if lp := d.LongPeriod.D(); lp != 0 && (lp <= d.Period.D() || lp > 90*24*time.Hour) {
		e.bad("detector.long_period", "must be 0 (none) or longer than detector.period and at most 90d, got %s", lp)
	}
	if d.LongLimit < 0 {
		e.bad("detector.long_limit", "must be 0 (three times the limit) or more, got %d", d.LongLimit)
	}
	if d.MaxIdentities < 1000 || d.MaxIdentities > 100_000_000 {
		e.bad("detector.max_identities", "must be between 1000 and 100000000, got %d", d.MaxIdentities)
	}
	if u := d.UnblockAfter.D(); u != 0 && (u < time.Minute || u > 365*24*time.Hour) {
		e.bad("detector.unblock_after", "must be \"0s\" (off) or between 1m and 365d, got %s", u)
	}
}

// validateDetectorLists checks the lists of networks, domains and
// identities.
func validateDetectorLists(e *configErrors, d *DetectorConfig) {
	e.each("detector.relay_networks", d.RelayNetworks, func(n string) error { _, err := parseNetwork(n); return err })
	e.each("detector.local_domains", d.LocalDomains, checkDomain)
	e.each("detector.exempt", d.Exempt, func(id string) error {
		if err := identity.Check(id); err != nil {
			return fmt.Errorf("%q: %w", id, err)
		}
		return nil
	})
}

// validateHold checks the bounds on held mail.
func validateHold(e *configErrors, d *DetectorConfig) {
	if d.HoldMax < 0 {
		e.bad("detector.hold_max", "must be 0 (no limit) or more, got %d", d.HoldMax)
	}
	if d.HoldMaxBytes < 0 {
		e.bad("detector.hold_max_bytes", "must be 0 (no limit) or more, got %d", d.HoldMaxBytes)
	}
	if err := checkAction(d.HoldMaxAction); err != nil {
		e.bad("detector.hold_max_action", "%v", err)
	} else if w, _, _ := strings.Cut(d.HoldMaxAction, " "); slices.Contains([]string{"HOLD", "DUNNO", "WARN", "DISCARD"}, strings.ToUpper(w)) {
		e.bad("detector.hold_max_action", "%q: must refuse the mail (REJECT, DEFER or a 4xx/5xx code), not %s it", d.HoldMaxAction, strings.ToUpper(w))
	}
}

// validateCallout checks how probes are made and cached.
func validateCallout(e *configErrors, co *CalloutConfig) {
	if co.Resolver != "" {
		if err := checkHostPort(co.Resolver); err != nil {
			e.bad("callout.resolver", "%v", err)
		}
	}
	if co.Port < 1 || co.Port > 65535 {
		e.bad("callout.port", "must be a port number, got %d", co.Port)
	}
	if co.Timeout.D() < 100*time.Millisecond || co.Timeout.D() > 5*time.Minute {
		e.bad("callout.timeout", "must be between 100ms and 5m, got %s", co.Timeout.D())
	}
	if co.Helo != "" {
		if err := checkDomain(co.Helo); err != nil {
			e.bad("callout.helo", "%v", err)
		}
	}
	if co.MailFrom != "" {
		// The callout package's own address rule: what passes here is
		// what it sends.
		if _, err := callout.ParseAddress(co.MailFrom); err != nil || strings.ContainsAny(co.MailFrom, "<> ") {
			e.bad("callout.mail_from", "%q is not a bare address such as \"verify@example.com\" (empty means the null sender)", co.MailFrom)
		}
	}
	for _, t := range []struct {
		key string
		v   Duration
	}{{"callout.positive_ttl", co.PositiveTTL}, {"callout.negative_ttl", co.NegativeTTL}, {"callout.unknown_ttl", co.UnknownTTL}} {
		if t.v.D() <= 0 {
			e.bad(t.key, "must be positive")
		}
	}
	if co.CacheSize < 1<<20 {
		e.bad("callout.cache_size", "must be at least 1048576 bytes, got %d", co.CacheSize)
	}
	if co.SessionIdle.D() < 0 || co.SessionIdle.D() > time.Minute {
		e.bad("callout.session_idle", "must be between 0 and 1m, got %s", co.SessionIdle.D())
	}
	pattern := func(p string) error { return checkDomain(strings.TrimPrefix(p, "*.")) }
	e.each("callout.single_rcpt_mx", co.SingleRcptMX, pattern)
	e.each("callout.accept_all_domains", co.AcceptAllDomains, pattern)
	e.each("callout.accept_all_mx", co.AcceptAllMX, pattern)
}

// validateCalloutRates checks the caps on probes.
func validateCalloutRates(e *configErrors, co *CalloutConfig) {
	if co.PerHost < 1 || co.PerHost > 100 {
		e.bad("callout.per_host", "must be between 1 and 100, got %d", co.PerHost)
	}
	if co.PerIdentityRate < 0 {
		e.bad("callout.per_identity_rate", "must be 0 (no cap) or more, got %d", co.PerIdentityRate)
	}
	for _, r := range []struct {
		key string
		v   int
	}{{"callout.per_domain_rate", co.PerDomainRate}, {"callout.per_host_rate", co.PerHostRate},
		{"callout.per_domain_rcpt_rate", co.PerDomainRcptRate}, {"callout.per_host_rcpt_rate", co.PerHostRcptRate}, {"callout.session_rate", co.SessionRate}} {
		if r.v < 1 {
			e.bad(r.key, "must be at least 1, got %d", r.v)
		}
	}
}

// validatePaths checks the state files and directories.
func validatePaths(e *configErrors, c *Config) {
	if !strings.HasPrefix(c.Blocklist.Path, "/") {
		e.bad("blocklist.path", "must be an absolute path, got %q", c.Blocklist.Path)
	}
	if !strings.HasPrefix(c.Notify.Spool, "/") {
		e.bad("notify.spool", "must be an absolute path, got %q", c.Notify.Spool)
	}
	if p := c.Queue.PostfixConfig; p != "" && !strings.HasPrefix(p, "/") {
		e.bad("queue.postfix_config", "must be an absolute path or empty (Postfix's default), got %q", p)
	}
	if p := c.Queue.Requests; p != "" && !strings.HasPrefix(p, "/") {
		e.bad("queue.requests", "must be an absolute path or empty (no retroactive hold), got %q", p)
	}
}

// validateNotify checks the [notify] section with the notify package's
// address rule.
func validateNotify(e *configErrors, n *NotifyConfig, localDomains []string) {
	e.each("notify.to", n.To, func(to string) error {
		if _, err := notify.ParseAddress(to); err != nil {
			return fmt.Errorf("is not an email address: %w", err)
		}
		return nil
	})
	if _, err := notify.ParseAddress(n.From); err != nil {
		e.bad("notify.from", "is not an email address: %v", err)
	}
	if err := checkHostPort(n.Relay); err != nil {
		e.bad("notify.relay", "%v", err)
	}
	switch n.STARTTLS {
	case notify.StartTLSRequired, notify.StartTLSOpportunistic, notify.StartTLSOff:
	default:
		e.bad("notify.starttls", "must be \"required\", \"opportunistic\" or \"off\", got %q", n.STARTTLS)
	}
	if n.Username != "" && n.PasswordFile == "" {
		e.bad("notify.password_file", "is required when notify.username is set")
	}
	if n.MaxAge.D() < time.Minute {
		e.bad("notify.max_age", "must be at least 1m, got %s", n.MaxAge.D())
	}
	if n.WarnUser && len(localDomains) == 0 {
		e.bad("notify.warn_user", "warns only identities whose domain is in detector.local_domains, which is empty")
	}
}

func validateLog(e *configErrors, l LogConfig) {
	switch l.Level {
	case "debug", "info", "warn", "error":
	default:
		e.bad("log.level", "must be debug, info, warn or error, got %q", l.Level)
	}
	switch l.Format {
	case "text", "json":
	default:
		e.bad("log.format", "must be \"text\" or \"json\", got %q", l.Format)
	}
}

func checkHostPort(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("%q is not \"host:port\": %v", s, err)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
		return fmt.Errorf("%q: bad port %q", s, port)
	}
	if host == "" {
		return fmt.Errorf("%q: the host is missing (use 127.0.0.1 to listen on loopback only)", s)
	}
	return nil
}

// parseNetwork accepts a CIDR prefix or a single address.
func parseNetwork(s string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not a network such as \"192.0.2.0/24\" or an address", s)
	}
	return netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()), nil
}

func checkDomain(s string) error {
	if s == "" || len(s) > 253 {
		return fmt.Errorf("%q is not a domain name", s)
	}
	for _, label := range strings.Split(strings.TrimSuffix(s, "."), ".") {
		if label == "" || len(label) > 63 || strings.HasPrefix(label, "-") || strings.HasSuffix(label, "-") {
			return fmt.Errorf("%q is not a domain name", s)
		}
		for _, r := range label {
			if r <= ' ' || r == '@' || r == '/' || r == ',' || r == 0x7f {
				return fmt.Errorf("%q is not a domain name", s)
			}
		}
	}
	return nil
}

// checkAction accepts the Postfix access(5) actions that make sense for a
// blocked identity: one line, starting with a known action word or an SMTP
// code.
func checkAction(a string) error {
	if a == "" || strings.ContainsAny(a, "\r\n\x00") {
		return fmt.Errorf("%q: must be one line", a)
	}
	word, _, _ := strings.Cut(a, " ")
	switch strings.ToUpper(word) {
	case "HOLD", "REJECT", "DEFER", "DEFER_IF_PERMIT", "DISCARD", "WARN", "DUNNO":
		return nil
	}
	if code, err := strconv.Atoi(word); err == nil && ((code >= 400 && code < 460) || (code >= 500 && code < 560)) {
		return nil
	}
	return fmt.Errorf("%q: must start with a Postfix action such as HOLD, REJECT, DEFER or an SMTP code", a)
}

// checkBlockAction is checkAction for the answer to a blocked identity,
// which must stop its mail without losing it: DISCARD loses the mail,
// DUNNO and WARN let it through.
func checkBlockAction(a string) error {
	if err := checkAction(a); err != nil {
		return err
	}
	switch w, _, _ := strings.Cut(a, " "); strings.ToUpper(w) {
	case "DISCARD":
		return fmt.Errorf("%q: DISCARD deletes the blocked identity's mail unseen; use HOLD (kept for review), DEFER or REJECT", a)
	case "DUNNO", "WARN":
		return fmt.Errorf("%q: %s blocks nothing; use HOLD, DEFER or REJECT", a, strings.ToUpper(w))
	}
	return nil
}

// checkCluster validates the [cluster] section.
func checkCluster(c *ClusterConfig) []error {
	var errs []error
	if c.Redis == "" {
		if c.PasswordFile != "" {
			errs = append(errs, errors.New("cluster.password_file: is set but cluster.redis is empty"))
		}
		return errs
	}
	if err := cluster.CheckURL(c.Redis); err != nil {
		errs = append(errs, fmt.Errorf("cluster.redis: %w", err))
	}
	if c.KeyPrefix == "" || len(c.KeyPrefix) > 64 || strings.ContainsAny(c.KeyPrefix, "{} \t\r\n") {
		errs = append(errs, fmt.Errorf("cluster.key_prefix: %q must be 1 to 64 characters without spaces or braces", c.KeyPrefix))
	}
	if c.PasswordFile != "" && !strings.HasPrefix(c.PasswordFile, "/") {
		errs = append(errs, fmt.Errorf("cluster.password_file: must be an absolute path, got %q", c.PasswordFile))
	}
	if d := c.Timeout.D(); d < 10*time.Millisecond || d > time.Second {
		errs = append(errs, fmt.Errorf("cluster.timeout: %s must be between 10ms and 1s: a request is answered within 1 s when Redis is slow", d))
	}
	return errs
}
