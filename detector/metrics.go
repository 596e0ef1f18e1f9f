package detector

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rcptguard/rcptguard/callout"
)

// Metrics are the detector's Prometheus metrics. Labels are bounded sets
// (actions, verdicts, sources): identities never appear in labels. All
// label children are resolved once, so the request path only increments.
// A nil *Metrics records nothing.
type Metrics struct {
	dunno, blockedAns     prometheus.Counter
	deferred              prometheus.Counter
	verdicts              map[verdictKey]prometheus.Counter
	probe                 prometheus.Observer
	blocks, blocklistErrs prometheus.Counter
	Tracked, Blocked      prometheus.Gauge
	identitiesDropped     prometheus.Counter

	// Policy connections refused and evicted, by reason.
	connRefusals, connEvictions map[string]prometheus.Counter
}

type verdictKey struct {
	status callout.Status
	source string
}

type answer int

const (
	answerDunno answer = iota
	answerBlocked
	answerDeferred
)

// NewMetrics creates the metrics and registers them with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	requests := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "rcptguard_policy_requests_total",
		Help: "Policy requests answered, by action (dunno, blocked, defer).",
	}, []string{"action"})
	verdicts := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "rcptguard_verdicts_total",
		Help: "Recipient verdicts, by verdict and source (cache, dns, smtp, rule).",
	}, []string{"verdict", "source"})
	probe := prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "rcptguard_probe_duration_seconds",
		Help:    "Time to a verdict that was not in the cache.",
		Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
	})
	m := &Metrics{
		dunno:      requests.WithLabelValues("dunno"),
		blockedAns: requests.WithLabelValues("blocked"),
		deferred:   requests.WithLabelValues("defer"),
		verdicts:   map[verdictKey]prometheus.Counter{},
		probe:      probe,
		blocks: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rcptguard_blocks_total", Help: "Identities blocked (or, in monitor mode, that would have been)."}),
		blocklistErrs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rcptguard_blocklist_write_errors_total", Help: "Failed writes of the blocklist file."}),
		Tracked: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "rcptguard_tracked_identities", Help: "Identities with state in the sliding window."}),
		Blocked: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "rcptguard_blocked_identities", Help: "Entries in the blocklist."}),
		identitiesDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rcptguard_tracked_identities_dropped_total",
			Help: "Least recently active identities forgotten at the ceiling of tracked identities (detector.max_identities)."}),
	}
	refused := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "rcptguard_policy_connections_refused_total",
		Help: "Policy connections closed unserved, by reason (unidentified, user, network, per_peer, max_connections).",
	}, []string{"reason"})
	evicted := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "rcptguard_policy_connections_evicted_total",
		Help: "Idle policy connections closed to make room for a new one, by the limit reached (per_peer, max_connections).",
	}, []string{"reason"})
	m.connRefusals = map[string]prometheus.Counter{}
	for _, r := range refuseReasons {
		m.connRefusals[r] = refused.WithLabelValues(r)
	}
	m.connEvictions = map[string]prometheus.Counter{
		refusePerPeer:  evicted.WithLabelValues(refusePerPeer),
		refuseMaxConns: evicted.WithLabelValues(refuseMaxConns),
	}
	for _, st := range []callout.Status{callout.StatusValid, callout.StatusInvalid, callout.StatusUnknown} {
		for _, src := range []string{"cache", "dns", "smtp", "rule"} {
			m.verdicts[verdictKey{st, src}] = verdicts.WithLabelValues(string(st), src)
		}
	}
	reg.MustRegister(requests, verdicts, probe, m.blocks, m.blocklistErrs, m.Tracked, m.Blocked, m.identitiesDropped, refused, evicted)
	return m
}

func (m *Metrics) answered(a answer) {
	if m == nil {
		return
	}
	switch a {
	case answerBlocked:
		m.blockedAns.Inc()
	case answerDeferred:
		m.deferred.Inc()
	default:
		m.dunno.Inc()
	}
}

// verified counts a verdict by where it came from and times uncached ones.
func (m *Metrics) verified(r callout.Result, d time.Duration) {
	if m == nil || r.Reason == callout.ReasonCanceled {
		return
	}
	src := "smtp"
	switch {
	case r.Cached:
		src = "cache"
	case r.Reason == callout.ReasonNXDomain || r.Reason == callout.ReasonNullMX ||
		r.Reason == callout.ReasonNoMailHost || r.Reason == callout.ReasonDNSError:
		src = "dns"
	case r.Host == "" && r.Reply.IsZero():
		src = "rule" // syntax, provider rules, address literals
	}
	if c := m.verdicts[verdictKey{r.Status, src}]; c != nil {
		c.Inc()
	}
	if !r.Cached {
		m.probe.Observe(d.Seconds())
	}
}

func (m *Metrics) blocked() {
	if m != nil {
		m.blocks.Inc()
	}
}

func (m *Metrics) blocklistError() {
	if m != nil {
		m.blocklistErrs.Inc()
	}
}

func (m *Metrics) connRefused(reason string) {
	if m != nil {
		m.connRefusals[reason].Inc()
	}
}

func (m *Metrics) connEvicted(reason string) {
	if m != nil {
		m.connEvictions[reason].Inc()
	}
}
