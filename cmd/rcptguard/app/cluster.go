package app

import (
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rcptguard/rcptguard/cmd/rcptguard/cluster"
)

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
		Period: cfg.Detector.Period.D(), LongPeriod: cfg.Detector.LongPeriod.D(),
		Logger: log.With("component", "cluster"), Registerer: reg})
	if err != nil {
		return nil, configFileError(cfg.Path, fmt.Errorf("cluster.redis: %w", err))
	}
	return c, nil
}
