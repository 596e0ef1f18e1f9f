package app

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rcptguard/rcptguard/cmd/rcptguard/queue"
)

// With [cluster], a block one server makes reaches the others through
// Redis. The abuser's mail already queued on those servers must be held
// too, so each server that learns a block asks its own queue-hold for it,
// exactly as for a block it made. What it held is logged and counted, not
// mailed: the server that made the block sent the one report of the block
// event (DESIGN: learning a block through Redis never sends one).

// learnedWait bounds how long a learned block may take to reach this
// server's blocklist file before its hold request is given up (queue-hold
// refuses an identity that is not in the file).
const learnedWait = 5 * time.Second

// holdRequester writes the retroactive hold requests of this server and
// remembers which were for blocks learned through the cluster.
type holdRequester struct {
	req queue.Requester
	log *slog.Logger
	// window is detector.period: a request older than that is refused by
	// queue-hold, so nothing older needs remembering.
	window time.Duration
	now    func() time.Time

	mu      sync.Mutex
	learned map[string]time.Time // identity → when its learned-block request was written
	waiting map[string]time.Time // learned, not in the blocklist file yet → when learned
	kick    chan struct{}

	learnedHeld prometheus.Counter // messages held for learned blocks
}

func newHoldRequester(dir string, window time.Duration, log *slog.Logger) *holdRequester {
	return &holdRequester{
		req: queue.Requester{Dir: dir}, log: log, window: window, now: time.Now,
		learned: map[string]time.Time{}, waiting: map[string]time.Time{}, kick: make(chan struct{}, 1),
		learnedHeld: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rcptguard_cluster_learned_held_messages_total",
			Help: "Messages held retroactively on this server for blocks learned through the cluster (logged, not reported).",
		}),
	}
}

// register adds the requester's metric to reg.
func (h *holdRequester) register(reg prometheus.Registerer) error {
	if h == nil {
		return nil
	}
	return reg.Register(h.learnedHeld)
}

// request asks for the hold of a block this server made: its result is
// reported as usual.
func (h *holdRequester) request(id string) error {
	h.mu.Lock()
	delete(h.learned, id)
	delete(h.waiting, id)
	h.mu.Unlock()
	return h.req.Request(id)
}

// learnedBlock takes an identity blocked elsewhere in the fleet. The
// cluster calls it before the entry is in this server's file; the request
// is written by runLearned once it is. Safe on a nil requester (holds off).
func (h *holdRequester) learnedBlock(id string) {
	if h == nil {
		return
	}
	h.mu.Lock()
	h.waiting[id] = h.now()
	h.mu.Unlock()
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

// blockedFile is the part of the blocklist file runLearned needs: Lookup
// sees an entry at once, Blocked waits until it is on disk.
type blockedFile interface {
	Blocked(id string) (string, bool)
}

// runLearned writes the hold request of each learned block once the
// block is in the blocklist file (on disk: queue-hold reads the file),
// until ctx ends.
func (h *holdRequester) runLearned(ctx context.Context, bl blockedFile, poll time.Duration) {
	t := time.NewTicker(poll)
	defer t.Stop()
	for {
		h.mu.Lock()
		ids := make(map[string]time.Time, len(h.waiting))
		for id, at := range h.waiting {
			ids[id] = at
		}
		h.mu.Unlock()
		for id, at := range ids {
			h.tryLearned(bl, id, at)
		}
		if len(ids) == 0 {
			select {
			case <-ctx.Done():
				return
			case <-h.kick:
			}
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// tryLearned writes the request for a learned block when its entry is in
// the blocklist, or gives up past learnedWait.
func (h *holdRequester) tryLearned(bl blockedFile, id string, at time.Time) {
	if _, ok := bl.Blocked(id); !ok {
		if h.now().Sub(at) < learnedWait {
			return
		}
		h.log.Error("retroactive hold not requested: the learned block is not in the blocklist file", slog.String("identity", id))
		h.drop(id, at)
		return
	}
	h.mu.Lock()
	if cur, ok := h.waiting[id]; !ok || !cur.Equal(at) {
		h.mu.Unlock()
		return // a local block asked meanwhile, or learned again
	}
	delete(h.waiting, id)
	h.mu.Unlock()
	if err := h.requestLearned(id); err != nil {
		h.log.Error("retroactive hold not requested", slog.String("identity", id), slog.Bool("learned", true), slog.Any("error", err))
		return
	}
	h.log.Info("retroactive hold requested", slog.String("identity", id), slog.Bool("learned", true))
}

// requestLearned asks for the hold of a block another server made, whose
// entry is in this server's blocklist file: its result is not reported.
func (h *holdRequester) requestLearned(id string) error {
	h.mu.Lock()
	now := h.now()
	delete(h.waiting, id)
	h.learned[id] = now
	for k, t := range h.learned {
		if now.Sub(t) > h.window {
			delete(h.learned, k)
		}
	}
	h.mu.Unlock()
	return h.req.Request(id)
}

func (h *holdRequester) drop(id string, at time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if cur, ok := h.waiting[id]; ok && cur.Equal(at) {
		delete(h.waiting, id)
	}
}

// wasLearned tells whether a hold result for id requested at requested
// answers a request for a learned block: then it is logged and counted,
// not reported. Safe on a nil requester.
func (h *holdRequester) wasLearned(id string, requested time.Time) bool {
	if h == nil {
		return false
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	at, ok := h.learned[id]
	// The request's time is its file's modification time, taken just
	// after at; a second of slack covers coarse file system clocks.
	return ok && !requested.Before(at.Add(-time.Second))
}

// heldLearned logs and counts what queue-hold held for a learned block.
func (h *holdRequester) heldLearned(res queue.HoldResult) {
	ids := make([]string, 0, len(res.Held))
	for _, m := range res.Held {
		ids = append(ids, m.ID)
	}
	h.learnedHeld.Add(float64(res.Count))
	h.log.Warn("held retroactively for a block learned through the cluster; the blocking server reported the block, no report from here",
		slog.String("identity", res.Identity), slog.Int("held", res.Count), slog.Any("queue_ids", ids),
		slog.Time("requested", res.Requested), slog.Duration("request_to_hold", res.Done.Sub(res.Requested)))
}
