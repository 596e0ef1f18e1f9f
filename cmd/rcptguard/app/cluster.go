package app

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rcptguard/rcptguard/callout"
	"github.com/rcptguard/rcptguard/cmd/rcptguard/cluster"
)

// fleetCallout is what the verifier shares with the fleet: verdicts,
// facts about domains and MX hosts, probe caps.
type fleetCallout interface {
	callout.SharedCache
	callout.SharedFacts
	callout.SharedCaps
}

// openCluster connects to the fleet's Redis when cluster.redis is set;
// nil without it (a single host, as always).
func openCluster(cfg *Config, log *slog.Logger, reg prometheus.Registerer) (*cluster.Cluster, error) {
	cc := cfg.Cluster
	if cc.Redis == "" {
		return nil, nil
	}
	password := ""
	if cc.PasswordFile != "" {
		b, err := os.ReadFile(cc.PasswordFile)
		if err != nil {
			return nil, configFileError(cfg.Path, fmt.Errorf("cluster.password_file: %w", err))
		}
		password = strings.TrimRight(string(b), "\r\n")
	}
	c, err := cluster.New(cluster.Config{URL: cc.Redis, KeyPrefix: cc.KeyPrefix, Password: password,
		Period: cfg.Detector.Period.D(), LongPeriod: cfg.Detector.LongPeriod.D(), Timeout: cc.Timeout.D(),
		Logger: log.With("component", "cluster"), Registerer: reg})
	if err != nil {
		return nil, configFileError(cfg.Path, fmt.Errorf("cluster.redis: %w", err))
	}
	return c, nil
}

// withFleet runs fn against the fleet's Redis when cluster.redis is set,
// for the block, unblock and list commands; a failure is told on stderr
// and returned: the daemon pushes the local change when Redis answers.
func withFleet(ctx context.Context, cfg *Config, stderr io.Writer, fn func(context.Context, *cluster.Cluster) error) (bool, error) {
	c, err := openCluster(cfg, slog.New(slog.DiscardHandler), nil)
	if err != nil {
		return false, err
	}
	if c == nil {
		return false, nil
	}
	defer func() { _ = c.Close() }()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := fn(ctx, c); err != nil {
		fmt.Fprintf(stderr, "rcptguard: the other servers could not be reached through Redis (%v); the daemon tells them when Redis answers again\n", err)
		return true, err
	}
	return true, nil
}
