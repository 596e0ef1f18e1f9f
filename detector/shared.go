package detector

import (
	"context"
	"time"

	"github.com/rcptguard/rcptguard/callout"
)

// SharedCounter counts verdicts with the other servers of a fleet
// (several servers, one judgement: DESIGN.md). The detector counts every
// verdict in its own Limiter too, and falls back on it whenever the
// shared counter fails: a Redis outage makes a server judge alone, never
// leaves a request unanswered.
type SharedCounter interface {
	// Record counts res (an invalid verdict; a valid one when the ratio
	// trigger is on) for id and returns the fleet's standing with it:
	// Count, Long, Invalid, Valid, Crossed, and First for exactly one
	// verdict in the fleet, the one that took a count past its limit.
	// Pending and Safe are left to the caller.
	Record(ctx context.Context, id string, res *callout.Result, now time.Time, lim Thresholds) (Standing, error)
	// Standing returns the fleet's standing of id without counting.
	Standing(ctx context.Context, id string, now time.Time, lim Thresholds) (Standing, error)
}

// sharedTimeout bounds one shared counter call on top of the counter's
// own deadline.
const sharedTimeout = 250 * time.Millisecond

// shareVerdict counts a verdict with the fleet and returns the standing
// to act on: the fleet's counts, its crossing and its First; the local
// standing when the fleet cannot be asked.
func (d *Detector) shareVerdict(ctx context.Context, id string, res *callout.Result, st Standing, lim Thresholds) Standing {
	if d.shared == nil || res == nil || lim == (Thresholds{}) ||
		(res.Status != callout.StatusInvalid && (res.Status != callout.StatusValid || lim.Ratio == 0)) {
		return st
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), sharedTimeout)
	defer cancel()
	fs, err := d.shared.Record(ctx, id, res, d.now(), lim)
	if err != nil {
		return st
	}
	return mergeStanding(st, fs, lim)
}

// shareStanding adds the fleet's counts to a standing that is Safe
// locally, so a request is answered early only when no limit can be
// passed fleet-wide either.
func (d *Detector) shareStanding(ctx context.Context, id string, st Standing, lim Thresholds) Standing {
	if d.shared == nil || !st.Safe || lim == (Thresholds{}) {
		return st
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), sharedTimeout)
	defer cancel()
	fs, err := d.shared.Standing(ctx, id, d.now(), lim)
	if err != nil {
		return st
	}
	fs.First = false
	return mergeStanding(st, fs, lim)
}

// mergeStanding joins the local standing and the fleet's: the larger
// count of each (Redis may have lost counts in a restart), the fleet's
// crossing and First, or the local ones when the fleet saw no crossing.
func mergeStanding(local, fleet Standing, lim Thresholds) Standing {
	st := fleet
	st.Count, st.Long = max(local.Count, fleet.Count), max(local.Long, fleet.Long)
	st.Invalid, st.Valid = max(local.Invalid, fleet.Invalid), max(local.Valid, fleet.Valid)
	st.Pending = local.Pending
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
