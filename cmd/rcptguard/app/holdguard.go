package app

import (
	"context"
	"log/slog"
	"strconv"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	ident "github.com/rcptguard/rcptguard/blocklist/identity"
	"github.com/rcptguard/rcptguard/detector"
)

// holdGuard keeps a blocked identity from filling the queue disk: it
// counts the messages (and the sizes they declared with MAIL FROM SIZE=)
// that the detector answered HOLD for, per identity, and past
// detector.hold_max messages or detector.hold_max_bytes bytes answers
// detector.hold_max_action (a reject) instead. Every recipient of one
// message gets the same answer as its first. The count starts afresh when
// the detector stops answering HOLD for the identity (it was unblocked),
// and when the daemon restarts.
type holdGuard struct {
	next     detector.Handler
	maxMsgs  int
	maxBytes int64
	action   detector.Action
	log      *slog.Logger
	switched prometheus.Counter

	mu  sync.Mutex
	ids map[string]*heldCount
}

type heldCount struct {
	msgs     int
	bytes    int64
	rejected bool            // the switch to the reject happened
	seen     map[string]bool // message instance → answered with the reject
}

// maxInstances bounds the messages remembered per identity; past it the
// memory is cleared (a message seen again is then counted again, which
// only brings the switch nearer).
const maxInstances = 4096

// newHoldGuard wraps next, or returns it as it is when the guard is off.
func newHoldGuard(cfg *Config, next detector.Handler, log *slog.Logger, reg prometheus.Registerer) detector.Handler {
	dc := cfg.Detector
	if dc.HoldMax <= 0 && dc.HoldMaxBytes <= 0 {
		return next
	}
	g := &holdGuard{
		next: next, maxMsgs: dc.HoldMax, maxBytes: dc.HoldMaxBytes, action: detector.Action(dc.HoldMaxAction),
		log: log, ids: map[string]*heldCount{},
		switched: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rcptguard_hold_guard_switches_total",
			Help: "Blocked identities whose answers switched from HOLD to detector.hold_max_action.",
		}),
	}
	if reg != nil {
		reg.MustRegister(g.switched)
	}
	return g
}

// guardKey groups requests by sender as the identity rule does for the
// common cases: the SASL login (folded as the blocklist folds it), else
// the client address.
func guardKey(req *detector.Request) string {
	if req.SASLUsername != "" {
		return ident.Fold(req.SASLUsername)
	}
	return req.ClientAddress
}

func (g *holdGuard) Decide(ctx context.Context, req *detector.Request) detector.Action {
	a := g.next.Decide(ctx, req)
	if req.ProtocolState != "RCPT" {
		return a
	}
	key := guardKey(req)
	word, _, _ := strings.Cut(string(a), " ")
	g.mu.Lock()
	defer g.mu.Unlock()
	if !strings.EqualFold(word, "HOLD") {
		delete(g.ids, key) // not blocked (any more): start afresh
		return a
	}
	c := g.ids[key]
	if c == nil {
		c = &heldCount{seen: map[string]bool{}}
		g.ids[key] = c
	}
	msg := req.Instance
	if rejected, ok := c.seen[msg]; ok && msg != "" {
		if rejected {
			return g.action
		}
		return a
	}
	if len(c.seen) >= maxInstances {
		clear(c.seen)
	}
	if (g.maxMsgs > 0 && c.msgs >= g.maxMsgs) || (g.maxBytes > 0 && c.bytes >= g.maxBytes) {
		if !c.rejected {
			c.rejected = true
			g.switched.Inc()
			g.log.Warn("hold queue guard: blocked identity has too much mail on hold; rejecting its mail from now on",
				slog.String("identity", key), slog.String("recipient", req.Recipient), slog.String("verdict", string(g.action)),
				slog.String("queue_id", req.QueueID), slog.Int("held_messages", c.msgs), slog.Int64("held_bytes", c.bytes),
				slog.Int("hold_max", g.maxMsgs), slog.Int64("hold_max_bytes", g.maxBytes))
		}
		c.seen[msg] = true
		return g.action
	}
	c.msgs++
	if n, err := strconv.ParseInt(req.Size, 10, 64); err == nil && n > 0 {
		c.bytes += n
	}
	c.seen[msg] = false
	return a
}
