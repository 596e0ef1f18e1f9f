package cluster

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
)

// DefaultTimeout bounds every Redis call.
const DefaultTimeout = 200 * time.Millisecond

// downFor is how long Redis is left alone after a failure.
const downFor = time.Second

// Config holds a Cluster's options.
type Config struct {
	URL        string        // redis://, rediss://, unix:/path; required
	KeyPrefix  string        // every key starts with it; required
	Password   string        // overrides the URL's; "" none
	Period     time.Duration // the detector's window; required
	LongPeriod time.Duration // the detector's long window; 0 none
	Timeout    time.Duration // per call; default DefaultTimeout
	Logger     *slog.Logger
	Registerer prometheus.Registerer // nil: no metrics
	Now        func() time.Time      // default time.Now
}

// Cluster is the connection to the fleet's shared state.
type Cluster struct {
	rdb     redis.UniversalClient
	prefix  string
	period  time.Duration
	long    time.Duration
	timeout time.Duration
	log     *slog.Logger
	now     func() time.Time

	downUntil atomic.Int64 // unix ns: Redis is not tried before
	mu        sync.Mutex
	down      bool     // the last call failed
	onUp      []func() // called (in a goroutine of the caller's) when Redis answers again

	errs prometheus.Counter
	up   prometheus.Gauge

	vmu      sync.Mutex
	valid    map[validKey]int // valid verdicts not written yet
	flushNow chan struct{}

	forgotten sync.Map     // identity → its mark (int64): counts to drop first (ForgetCounts)
	marks     atomic.Int64 // numbers the marks, so a newer one is not deleted for an older
}

// CheckURL reports whether u is a Redis address rcptguard understands.
func CheckURL(u string) error {
	_, err := options(u)
	return err
}

// options turns a [cluster] redis URL into client options:
// redis://[user:pass@]host:port/db, rediss://… (TLS), unix:/path or
// unix:///path; extra "addr=host:port" query parameters make it a
// Redis Cluster, "master_name=NAME" a Sentinel-backed one.
func options(raw string) (*redis.UniversalOptions, error) {
	if p, ok := strings.CutPrefix(raw, "unix:"); ok {
		p = strings.TrimPrefix(p, "//")
		if !strings.HasPrefix(p, "/") {
			return nil, fmt.Errorf("%q: a unix socket needs an absolute path, like \"unix:/run/redis/redis.sock\"", raw)
		}
		path, q, _ := strings.Cut(p, "?")
		o := &redis.UniversalOptions{Addrs: []string{path}, Dialer: func(ctx context.Context, _, addr string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", addr)
		}}
		if q != "" {
			v, err := url.ParseQuery(q)
			if err != nil {
				return nil, fmt.Errorf("%q: %w", raw, err)
			}
			for k := range v {
				if k != "db" {
					return nil, fmt.Errorf("%q: unknown parameter %q", raw, k)
				}
			}
			if _, err := fmt.Sscanf(v.Get("db"), "%d", &o.DB); err != nil {
				return nil, fmt.Errorf("%q: bad db %q", raw, v.Get("db"))
			}
		}
		return o, nil
	}
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("%q is not a URL: %w", raw, err)
	}
	if u.Scheme != "redis" && u.Scheme != "rediss" {
		return nil, fmt.Errorf("%q: the scheme must be redis, rediss or unix", raw)
	}
	q := u.Query()
	extra, master := q["addr"], q.Get("master_name")
	q.Del("addr")
	q.Del("master_name")
	u.RawQuery = q.Encode()
	o, err := redis.ParseURL(u.String())
	if err != nil {
		return nil, fmt.Errorf("%q: %w", raw, err)
	}
	uo := &redis.UniversalOptions{Addrs: append([]string{o.Addr}, extra...), DB: o.DB, Username: o.Username,
		Password: o.Password, MasterName: master}
	if o.TLSConfig != nil {
		uo.TLSConfig = &tls.Config{ServerName: o.TLSConfig.ServerName, MinVersion: tls.VersionTLS12}
	}
	return uo, nil
}

// clientLog sends go-redis's own messages (a failed dial, a reconnect
// of the subscription) to the debug log of the last Cluster made: the
// state changes that matter are logged by the Cluster, once each.
type clientLog struct{ log atomic.Pointer[slog.Logger] }

func (l *clientLog) Printf(ctx context.Context, format string, v ...any) {
	if lg := l.log.Load(); lg != nil {
		lg.DebugContext(ctx, "redis client", slog.String("message", fmt.Sprintf(format, v...)))
	}
}

var (
	redisLog     clientLog
	redisLogOnce sync.Once
)

// New connects (lazily) to Redis. It does not wait for Redis to answer:
// a server starts, and counts locally, while Redis is down.
func New(cfg Config) (*Cluster, error) {
	if cfg.KeyPrefix == "" {
		return nil, errors.New("cluster: key prefix is required")
	}
	if cfg.Period <= 0 {
		return nil, errors.New("cluster: period is required")
	}
	o, err := options(cfg.URL)
	if err != nil {
		return nil, err
	}
	if cfg.Password != "" {
		o.Password = cfg.Password
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	redisLog.log.Store(cfg.Logger)
	redisLogOnce.Do(func() { redis.SetLogger(&redisLog) })
	o.DialTimeout, o.ReadTimeout, o.WriteTimeout, o.PoolTimeout = cfg.Timeout, cfg.Timeout, cfg.Timeout, cfg.Timeout
	o.MaxRetries = -1 // one try within the deadline; the caller falls back
	o.ContextTimeoutEnabled = true
	o.DisableIdentity = true
	c := &Cluster{rdb: redis.NewUniversalClient(o), prefix: cfg.KeyPrefix, period: cfg.Period, long: cfg.LongPeriod,
		timeout: cfg.Timeout, log: cfg.Logger, now: cfg.Now, valid: map[validKey]int{}, flushNow: make(chan struct{}, 1),
		errs: prometheus.NewCounter(prometheus.CounterOpts{Name: "rcptguard_cluster_errors_total",
			Help: "Redis calls that failed or timed out; the server judged locally."}),
		up: prometheus.NewGauge(prometheus.GaugeOpts{Name: "rcptguard_cluster_up",
			Help: "1 while the last Redis call succeeded."}),
	}
	c.up.Set(1)
	if cfg.Registerer != nil {
		if err := c.Register(cfg.Registerer); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// Close closes the connections.
func (c *Cluster) Close() error { return c.rdb.Close() }

// errDown is returned while Redis is left alone after a failure.
var errDown = errors.New("cluster: redis unreachable, judging locally")

// call runs fn against Redis with the call deadline, unless Redis failed
// within the last second; it keeps the up/down state.
func (c *Cluster) call(ctx context.Context, fn func(ctx context.Context) error) error {
	return c.callWithin(ctx, c.timeout, fn)
}

// bulkTimeout bounds the calls that read or change the whole blocklist,
// off the answers' path: 100,000 blocks are some 13 MB.
const bulkTimeout = 10 * time.Second

// callWithin is call with the deadline d.
func (c *Cluster) callWithin(ctx context.Context, d time.Duration, fn func(ctx context.Context) error) error {
	if c.now().UnixNano() < c.downUntil.Load() {
		c.errs.Inc()
		return errDown
	}
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	err := fn(ctx)
	if err != nil && !errors.Is(err, redis.Nil) {
		c.failed(err)
		return err
	}
	c.succeeded()
	return nil
}

func (c *Cluster) failed(err error) {
	c.errs.Inc()
	c.downUntil.Store(c.now().Add(downFor).UnixNano())
	c.mu.Lock()
	was := c.down
	c.down = true
	c.mu.Unlock()
	if !was {
		c.up.Set(0)
		c.log.Error("redis unreachable; judging and blocking locally until it answers", slog.Any("error", err))
	}
}

func (c *Cluster) succeeded() {
	c.mu.Lock()
	was := c.down
	c.down = false
	fns := c.onUp
	c.mu.Unlock()
	if was {
		c.up.Set(1)
		c.log.Info("redis answers again; sharing counts and blocks")
		for _, fn := range fns {
			fn()
		}
	}
}

// Up reports whether the last Redis call succeeded.
func (c *Cluster) Up() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.down
}

// OnUp registers fn to be called when Redis answers again after a
// failure; fn must not block.
func (c *Cluster) OnUp(fn func()) {
	c.mu.Lock()
	c.onUp = append(c.onUp, fn)
	c.mu.Unlock()
}

// key returns a key of id: prefix, kind, then the identity as a Redis
// Cluster hash tag, so all keys of one identity live on one node and one
// script can use them all.
func (c *Cluster) key(kind, id string) string {
	return c.prefix + kind + "{" + id + "}"
}
