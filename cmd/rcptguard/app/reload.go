package app

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"reflect"

	"github.com/rcptguard/rcptguard/detector"
)

// reloadable lists the keys a SIGHUP applies to the running service;
// every other key keeps its running value until a restart, and a reload
// that changes one says so, key by key.
var reloadable = map[string]bool{
	"policy.allow_users":        true,
	"policy.allow_networks":     true,
	"detector.limit":            true,
	"detector.warn_at":          true,
	"detector.action":           true,
	"detector.mode":             true,
	"detector.wait":             true,
	"detector.ratio":            true,
	"detector.ratio_min":        true,
	"detector.long_limit":       true,
	"detector.relay_networks":   true,
	"detector.local_domains":    true,
	"detector.exempt":           true,
	"detector.limits_file":      true,
	"detector.max_identities":   true,
	"callout.per_identity_rate": true,
}

// keepRunning returns next with the running value of every key a reload
// does not apply, and those keys, in the file's order, whose value in
// next differs from the running one: they need a restart.
func keepRunning(running, next *Config) (*Config, []string) {
	merged := *next
	var keys []string
	rv, mv := reflect.ValueOf(running).Elem(), reflect.ValueOf(&merged).Elem()
	for i := range rv.NumField() {
		section := rv.Type().Field(i).Tag.Get("toml")
		if section == "" || section == "-" {
			continue
		}
		rs, ms := rv.Field(i), mv.Field(i)
		for j := range rs.NumField() {
			key := section + "." + rs.Type().Field(j).Tag.Get("toml")
			if !reloadable[key] && !reflect.DeepEqual(rs.Field(j).Interface(), ms.Field(j).Interface()) {
				keys = append(keys, key)
				ms.Field(j).Set(rs.Field(j))
			}
		}
	}
	return &merged, keys
}

// reloader rereads the configuration file on SIGHUP and applies what can
// change while running (the keys in reloadable); it logs each changed key
// that needs a restart. A broken file is logged and the running
// configuration kept.
type reloader struct {
	running *Config // as the service started: what a restart would change
	apply   func(context.Context, *Config) error
	log     *slog.Logger
}

// run reloads at each signal on hup until ctx ends.
func (r *reloader) run(ctx context.Context, hup <-chan os.Signal) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			r.reload(ctx)
		}
	}
}

// reload reads the file once, applies it and says what it did.
func (r *reloader) reload(ctx context.Context) {
	path := r.running.Path
	next, err := LoadConfig(path)
	var keys []string
	if err == nil {
		// The keys that need a restart keep their running values, so
		// that the others apply (a new detector.period would refuse them).
		next, keys = keepRunning(r.running, next)
		err = r.apply(ctx, next)
	}
	if err != nil {
		r.log.Error("reload failed; the running configuration is kept", slog.String("config", path), slog.Any("error", err))
		return
	}
	for _, k := range keys {
		r.log.Warn("restart needed for "+k+": the new value is not applied by a reload", slog.String("key", k), slog.String("config", path))
	}
	if len(keys) > 0 {
		r.log.Warn("reload applied all but the keys that need a restart", slog.String("config", path), slog.Any("restart_needed", keys))
		return
	}
	r.log.Info("configuration reloaded", slog.String("config", path))
}

// applyReload is the apply of the service's reloader: limits,
// exemptions and the other detector keys, and who may connect.
func applyReload(d *detector.Detector, srv *detector.Server) func(context.Context, *Config) error {
	return func(ctx context.Context, cfg *Config) error {
		limits, err := detector.LoadLimits(cfg.Detector.LimitsFile)
		if err != nil {
			return fmt.Errorf("detector.limits_file: %w", err)
		}
		peers, err := resolvePolicyPeers(&cfg.Policy, systemUser, postfixMailOwner(ctx))
		if err != nil {
			return configFileError(cfg.Path, err)
		}
		if err := d.Reload(detectorConfig(cfg, limits)); err != nil {
			return err
		}
		srv.SetAccess(peers.uids, peers.networks)
		return nil
	}
}
