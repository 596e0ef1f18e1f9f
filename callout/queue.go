package callout

import (
	"log/slog"
	"time"
)

// call is one verification in progress; every Verify of the same address
// while it runs waits on it.
type call struct {
	key      string
	addr     Address
	deadline time.Time
	res      Result // tentative until done is closed
	done     chan struct{}
	finished bool // finish was called; only the owning worker reads it
	retried  bool // asked again after a 503 lost the transaction (worker only)
}

// domainQueue holds the calls waiting for a session to their domain.
type domainQueue struct {
	pending []*call
	workers int           // worker goroutines for the domain, idle ones included
	idle    int           // workers holding an open session, waiting for calls
	wake    chan struct{} // one token per idle worker woken by join
}

// join returns the call verifying key, starting one (and a worker for its
// domain when allowed) if there is none.
func (v *Verifier) join(a Address, key string) *call {
	v.mu.Lock()
	defer v.mu.Unlock()
	if c := v.inflight[key]; c != nil {
		return c
	}
	c := &call{key: key, addr: a, deadline: v.cfg.Now().Add(v.cfg.Timeout), done: make(chan struct{})}
	if v.closed {
		c.res = Result{Address: key, Status: StatusUnknown, Reason: ReasonShutdown}
		close(c.done)
		return c
	}
	v.inflight[key] = c
	q := v.domains[a.Domain]
	if q == nil {
		q = &domainQueue{wake: make(chan struct{}, v.cfg.PerHost)}
		v.domains[a.Domain] = q
	}
	q.pending = append(q.pending, c)
	switch {
	case q.idle > 0:
		// A worker keeps a session to the domain open: it takes the call
		// over that session, with no new connection.
		q.idle--
		q.wake <- struct{}{}
	case q.workers < v.cfg.PerHost && len(q.pending) > q.workers-q.idle:
		// More calls wait than busy workers will pick up at their next
		// turn: another session, up to PerHost.
		q.workers++
		v.wg.Add(1)
		go v.work(a.Domain, q)
	}
	return c
}

// take hands a worker the next batch of its domain's calls. When there is
// none and linger is set (the worker holds an open session), it waits up
// to SessionIdle for a call to arrive, as Postfix's connection cache
// does, so a sender mailing one recipient after another over the same
// domain does not make one connection per recipient. It returns nil when
// the worker should end; the worker is then no longer counted.
func (v *Verifier) take(domain string, q *domainQueue, n int, lingerSlot string) []*call {
	v.mu.Lock()
	defer v.mu.Unlock()
	// Woken for a call another worker took first, wait again until the
	// idle time is up. A worker that another domain waits behind for a
	// connection slot to the same MX address (one host serves thousands
	// of hosted domains) gives the slot up at once instead.
	idleUntil := time.Now().Add(v.cfg.SessionIdle)
	for len(q.pending) == 0 && lingerSlot != "" && v.cfg.SessionIdle > 0 && v.ctx.Err() == nil {
		left := time.Until(idleUntil)
		if left <= 0 {
			break
		}
		wanted := v.hosts.wanted(lingerSlot)
		q.idle++
		v.mu.Unlock()
		t := time.NewTimer(left)
		woken, yield := false, false
		select {
		case <-q.wake:
			woken = true
		case <-wanted:
			yield = true
		case <-t.C:
		case <-v.ctx.Done():
		}
		t.Stop()
		v.mu.Lock()
		if !woken {
			select {
			case <-q.wake: // join counted an idle worker out just as we gave up
			default:
				q.idle--
			}
		}
		if yield {
			break
		}
	}
	if len(q.pending) == 0 {
		q.workers--
		if q.workers == 0 {
			delete(v.domains, domain)
		}
		return nil
	}
	n = min(n, len(q.pending))
	batch := make([]*call, n)
	copy(batch, q.pending)
	clear(q.pending[:n])
	q.pending = q.pending[n:]
	return batch
}

// finish publishes the verdict of c to its waiters and the cache.
func (v *Verifier) finish(c *call, res Result) {
	res.Address = c.key
	switch {
	case res.Reason == ReasonRateLimited:
		// Not cached: nothing was learnt, and the next asker may find
		// room under the caps.
		v.stats.rateLimited.Add(1)
	case res.Reason == ReasonCanceled || res.Reason == ReasonShutdown:
	case res.Status == StatusValid:
		v.store(c.key, res, v.cfg.PositiveTTL)
	case res.Status == StatusInvalid:
		v.store(c.key, res, v.cfg.NegativeTTL)
	default:
		v.store(c.key, res, v.cfg.UnknownTTL)
	}
	v.mu.Lock()
	delete(v.inflight, c.key)
	v.mu.Unlock()
	c.res = res
	c.finished = true
	close(c.done)
	v.log.Debug("callout verdict", slog.String("recipient", c.key), slog.String("verdict", string(res.Status)),
		slog.String("reason", string(res.Reason)), slog.String("mx", res.Host), slog.Int("code", res.Reply.Code),
		slog.String("reply", res.Reply.String()), slog.String("detail", res.Detail))
}

// work is a domain worker: it probes batches of the domain's waiting
// recipients, keeping one SMTP session open between batches, until no
// recipient waits.
func (v *Verifier) work(domain string, q *domainQueue) {
	defer v.wg.Done()
	w := &worker{v: v, domain: domain}
	defer w.closeSession()
	for {
		linger := ""
		if w.sess.usable() {
			linger = w.sess.slot()
		}
		batch := v.take(domain, q, v.cfg.MaxRcpts, linger)
		if batch == nil {
			return
		}
		w.run(batch)
	}
}

// worker holds the state of one domain worker goroutine.
type worker struct {
	v       *Verifier
	domain  string
	sess    *session
	primary string // the most preferred MX host of the current batch
}

func (w *worker) closeSession() {
	if w.sess == nil {
		return
	}
	w.v.closeSession(w.sess)
	w.sess = nil
}

// closeSession ends s and gives its connection slot back. A session
// waiting for a reply that did not come says QUIT in the background, so
// that no verdict waits for it; Close waits for it.
func (v *Verifier) closeSession(s *session) {
	if !s.broken {
		s.close()
		v.hosts.release(s.slot())
		return
	}
	v.wg.Go(func() {
		s.close()
		v.hosts.release(s.slot())
	})
}
