package detector

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"strconv"
	"time"

	"github.com/rcptguard/rcptguard/callout"
)

// SharedCounter counts verdicts with the other servers of a fleet
// (several servers, one judgement: README, "Several servers"). The detector counts every
// verdict in its own Limiter too, and falls back on it whenever the
// shared counter fails: a Redis outage makes a server judge alone, never
// leaves a request unanswered.
type SharedCounter interface {
	// Reserve records a verification of id in flight under key (unique
	// in the fleet; it expires by itself should its server die) and
	// returns the fleet's standing with it; key "" only looks. Pending is
	// the fleet's verifications in flight; First is never set.
	Reserve(ctx context.Context, id, key string, now time.Time, lim Thresholds) (Standing, error)
	// Record ends the reservation key ("" none) with res: an invalid
	// verdict, or a valid one when the ratio trigger is on, is counted;
	// a valid one with key "" may be only queued (it never makes a
	// crossing), its standing zero and ctx unused;
	// res nil only ends it. It returns the fleet's standing: Count, Long,
	// Invalid, Valid, Pending, Crossed, and First for exactly one verdict
	// in the fleet, the one that took a count past its limit.
	Record(ctx context.Context, id, key string, res *callout.Result, now time.Time, lim Thresholds) (Standing, error)
}

// SharedProbes caps an identity's verifications fleet-wide (the
// per-identity probe cap, callout.per_identity_rate, counted over all
// servers). A SharedCounter that implements it is asked before the
// detector's own Limiter; when it fails, the local cap alone applies.
type SharedProbes interface {
	// TakeProbe records a verification of id at now unless the fleet
	// made perMinute of them in the minute ending at now (a sliding
	// minute, as the detector's own cap), and reports whether it recorded it.
	TakeProbe(ctx context.Context, id string, now time.Time, perMinute int) (bool, error)
}

// takeProbe applies the per-identity probe cap: the fleet's when it can
// be asked, and always this server's own (it never allows more than the
// fleet's, and it alone when Redis is down).
func (d *Detector) takeProbe(ctx context.Context, id string, perMinute int) bool {
	now := d.now()
	if sp, ok := d.shared.(SharedProbes); ok && perMinute > 0 {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), d.sharedTimeout)
		ok, err := sp.TakeProbe(ctx, id, now, perMinute)
		cancel()
		if err == nil && !ok {
			return false
		}
	}
	return d.limiter.takeProbe(id, now, perMinute)
}

// DefaultSharedTimeout bounds one shared counter call when the
// configuration names no deadline.
const DefaultSharedTimeout = 250 * time.Millisecond

// sharedPollEvery is how often a waiting request looks at the fleet's
// standing again: verdicts on other servers wake nobody here.
const sharedPollEvery = 25 * time.Millisecond

// reservationBase returns a prefix no other detector in the fleet has.
func reservationBase() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:]) + ":"
}

// sharedPoll returns the ticker of a waiting request; one that never
// fires without a shared counter.
func (d *Detector) sharedPoll() *time.Ticker {
	if d.shared == nil {
		t := time.NewTicker(time.Hour)
		t.Stop()
		return t
	}
	return time.NewTicker(sharedPollEvery)
}

// shareVerdict counts a verdict with the fleet and returns the standing
// to act on: the fleet's counts, its crossing and its First; the local
// standing when the fleet cannot be asked.
func (d *Detector) shareVerdict(ctx context.Context, id, key string, res *callout.Result, st Standing, lim Thresholds) Standing {
	if d.shared == nil || lim == (Thresholds{}) {
		return st
	}
	if key == "" && (res == nil || res.Status != callout.StatusInvalid && (res.Status != callout.StatusValid || lim.Ratio == 0)) {
		return st
	}
	if key == "" && res.Status == callout.StatusValid {
		// A valid verdict outside a reservation never crosses a limit:
		// the counter only queues it, without a round trip, so it gets
		// neither a deadline nor a merge (the hot path of cached
		// verdicts).
		_, _ = d.shared.Record(ctx, id, key, res, d.now(), lim)
		return st
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), d.sharedTimeout)
	defer cancel()
	fs, err := d.shared.Record(ctx, id, key, res, d.now(), lim)
	if err != nil {
		return st
	}
	return mergeStanding(st, fs, lim)
}

// shareReserve records p's verification with the fleet (p nil: only
// looks) and adds the fleet's counts and verifications in flight to a
// standing that is Safe locally, so a request is answered early only
// when no limit can be passed fleet-wide either.
func (d *Detector) shareReserve(ctx context.Context, id string, p *probe, st Standing, lim Thresholds) Standing {
	if d.shared == nil || lim == (Thresholds{}) || (p == nil && !st.Safe) {
		return st
	}
	key := ""
	if p != nil {
		key = d.keyBase + strconv.FormatUint(d.keys.Add(1), 36)
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), d.sharedTimeout)
	defer cancel()
	fs, err := d.shared.Reserve(ctx, id, key, d.now(), lim)
	if err != nil {
		return st
	}
	if p != nil {
		p.key = key
	}
	fs.First = false
	return mergeStanding(st, fs, lim)
}

// settleNone ends a reservation without a verdict, here and with the
// fleet.
func (d *Detector) settleNone(id string, p *probe, lim Thresholds) {
	d.limiter.settle(id, nil, d.now(), lim)
	if p.key != "" {
		d.shareVerdict(d.ctx, id, p.key, nil, Standing{}, lim)
	}
}

// mergeStanding joins the local standing and the fleet's: the larger
// count of each (Redis may have lost counts in a restart), the fleet's
// crossing and First, or the local ones when the fleet saw no crossing.
func mergeStanding(local, fleet Standing, lim Thresholds) Standing {
	st := fleet
	st.Count, st.Long = max(local.Count, fleet.Count), max(local.Long, fleet.Long)
	st.Invalid, st.Valid = max(local.Invalid, fleet.Invalid), max(local.Valid, fleet.Valid)
	st.Pending = max(local.Pending, fleet.Pending)
	if fleet.Crossed == TriggerNone {
		st.Crossed, st.First = local.Crossed, local.First
	}
	p := st.Pending
	st.Safe = st.Crossed == TriggerNone &&
		(lim.Count == 0 || st.Count+p <= lim.Count) &&
		(lim.Long == 0 || st.Long+p <= lim.Long) &&
		!ratioCrossed(lim, st.Invalid+p, st.Valid)
	return st
}
