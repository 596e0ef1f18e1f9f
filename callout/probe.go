package callout

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"time"
)

// run verifies one batch of recipients of the worker's domain and
// finishes every call in it.
func (w *worker) run(batch []*call) {
	v := w.v
	deadline := batch[0].deadline
	for _, c := range batch[1:] {
		if c.deadline.Before(deadline) {
			deadline = c.deadline
		}
	}
	// The calls' deadlines are by the injected clock; the context runs on
	// the real one.
	ctx, cancel := context.WithTimeout(v.ctx, deadline.Sub(v.cfg.Now()))
	defer cancel()
	finishAll := func(calls []*call, res Result) {
		for _, c := range calls {
			v.finish(c, res)
		}
	}

	hosts, err := v.cfg.Resolver.LookupMX(ctx, w.domain)
	if err != nil {
		res := v.dnsResult(ctx, err)
		if res.Status == StatusInvalid {
			v.learn(keyDomain+w.domain, res, v.cfg.NegativeTTL)
		}
		finishAll(batch, res)
		return
	}
	for _, h := range hosts {
		if matchDomain(v.cfg.AcceptAllMX, h.Name) {
			finishAll(batch, Result{Status: StatusUnknown, Reason: ReasonAcceptAll, Host: h.Name,
				Detail: "MX host accepts every recipient and bounces later; not probed"})
			return
		}
	}

	if len(hosts) > 0 {
		w.primary = hosts[0].Name
	}
	// Whatever happens below, every call of the batch ends finished.
	defer func() {
		for _, c := range batch {
			if c.finished {
				continue
			}
			res := c.res
			if res.Status == "" {
				res = Result{Status: StatusUnknown, Reason: ReasonUnreachable, Detail: "no MX host could be tried"}
			}
			v.finish(c, res)
		}
	}()
	w.tryHosts(ctx, hosts, batch)
}

// tryHosts asks the MX hosts in order for the calls no host has answered
// for good yet; each call left over keeps its tentative result.
func (w *worker) tryHosts(ctx context.Context, hosts []Host, remaining []*call) {
	v := w.v
	for _, h := range hosts {
		if len(remaining) == 0 {
			break
		}
		if res, ok := v.fact(keyRefusal + h.Name); ok {
			setAll(remaining, res)
			continue
		}
		ips := h.IPs
		if !v.cfg.AllowPrivate {
			ips = v.safeIPs(h.IPs)
		}
		switch {
		case len(ips) == 0 && len(h.IPs) > 0:
			setAll(remaining, Result{Status: StatusUnknown, Reason: ReasonUnsafeAddress, Host: h.Name,
				Detail: fmt.Sprintf("MX %s resolves only to non-public addresses (%s); set callout.allow_private to probe it", h.Name, joinIPs(h.IPs))})
			continue
		case len(ips) == 0:
			setAll(remaining, Result{Status: StatusUnknown, Reason: ReasonUnreachable, Host: h.Name,
				Detail: fmt.Sprintf("MX %s has no address", h.Name)})
			continue
		}
		remaining = w.probeHost(ctx, h, ips, remaining)
	}
}

func setAll(calls []*call, res Result) {
	for _, c := range calls {
		c.res = res
	}
}

// dnsResult turns a failed MX lookup into a verdict.
func (v *Verifier) dnsResult(ctx context.Context, err error) Result {
	r := Result{Detail: err.Error()}
	switch {
	case errors.Is(err, ErrNXDomain):
		r.Status, r.Reason = StatusInvalid, ReasonNXDomain
	case errors.Is(err, ErrNullMX):
		r.Status, r.Reason = StatusInvalid, ReasonNullMX
		r.Reply = Reply{Code: 556, Enhanced: [3]int{5, 1, 10}, Text: "domain does not accept mail (null MX, RFC 7505)"}
	case errors.Is(err, ErrNoMailHost):
		r.Status, r.Reason = StatusInvalid, ReasonNoMailHost
	default:
		r.Status, r.Reason = StatusUnknown, v.failureReason(ctx, ReasonDNSError)
	}
	return r
}

// failureReason names a failure without a reply: the Verifier closing, the
// time running out, or the given reason.
func (v *Verifier) failureReason(ctx context.Context, otherwise Reason) Reason {
	switch {
	case v.ctx.Err() != nil:
		return ReasonShutdown
	case ctx.Err() != nil:
		return ReasonTimeout
	}
	return otherwise
}

// probeHost verifies calls on one MX host. It finishes the calls that got
// a final answer and returns those worth trying on the next host (a 4xx
// or a connection failure), each with its tentative result set.
//
// It is a loop over one step at a time: make sure there is a session that
// may take another RCPT (hostProbe.session), make sure a transaction is
// open (hostProbe.begin), then send one RCPT (hostProbe.ask): the next
// recipient, or, once they are all asked and some were accepted by a host
// not yet known to refuse random names, one random local part.
func (w *worker) probeHost(ctx context.Context, h Host, ips []netip.Addr, calls []*call) []*call {
	v := w.v
	hostKey := keyHostAll + w.domain + " " + h.Name
	_, checked := v.fact(hostKey)
	p := &hostProbe{w: w, ctx: ctx, h: h, ips: ips, calls: len(calls), todo: calls,
		single:    matchDomain(v.cfg.SingleRcptMX, h.Name),
		wantProbe: v.cfg.CatchAllProbe && !checked,
		unbind:    func() bool { return false }}
	defer func() { p.unbind() }()
	for p.more() {
		s := p.session()
		if s == nil {
			break
		}
		st := p.begin(s)
		if st == stepOn {
			st = p.ask(s)
		}
		if st == stepDone {
			break
		}
	}
	w.judgeAccepted(p.accepted, h, nil)
	p.end()
	return p.retry
}

// hostProbe is the state of probeHost's loop on one MX host.
type hostProbe struct {
	w      *worker
	ctx    context.Context
	h      Host
	ips    []netip.Addr
	calls  int  // calls the host was given: bounds the sessions opened
	single bool // the host takes one RCPT per session (callout.single_rcpt_mx)

	todo     []*call // still to ask, in order
	retry    []*call // to try on the next host, tentative result set
	accepted []*call // accepted, judged once the random name is asked

	wantProbe    bool // a random local part is to be asked once some are accepted
	probed       bool // it was asked (or could not be)
	opens        int  // sessions opened
	mailRetried  bool // MAIL FROM was sent again once on a fresh session
	probeRetried bool // the random RCPT was sent again once after a 503
	unbind       func() bool
}

// step says how probeHost's loop goes on after one of its steps.
type step int

const (
	stepOn    step = iota // go on to the next step of this round
	stepAgain             // start the next round
	stepDone              // leave the loop
)

// more reports whether there is an RCPT left to send.
func (p *hostProbe) more() bool {
	return len(p.todo) > 0 || len(p.accepted) > 0 && p.wantProbe && !p.probed
}

// failAll ends the loop: the calls still to ask take res, and go to the
// next host when next says it is worth it.
func (p *hostProbe) failAll(res Result, next bool) {
	for _, c := range p.todo {
		if next {
			c.res = res
			p.retry = append(p.retry, c)
		} else {
			p.w.v.finish(c, res)
		}
	}
	p.todo = nil
}

// probeDone ends the random-name probe and judges the accepted calls:
// failed is why the probe could not be made, nil when it was.
func (p *hostProbe) probeDone(failed *Result) {
	p.probed = true
	p.w.judgeAccepted(p.accepted, p.h, failed)
	p.accepted = nil
}

// session returns a session that may take another RCPT: the worker's, or
// a fresh one when there is none, it is to another host, it has had
// sessionErrorLimit error replies, or the host takes one RCPT per
// session. nil: none could be opened, and the calls left are failed.
func (p *hostProbe) session() *session {
	w := p.w
	s := w.sess
	if s != nil && (s.host.Name != p.h.Name || !s.usable() || s.errors >= sessionErrorLimit || p.single && s.rcpts > 0) {
		w.closeSession()
		s = nil
	}
	if s != nil {
		return s
	}
	if p.opens > p.calls+3 {
		// Cannot happen with a sane server; a bound all the same.
		p.failAll(Result{Status: StatusUnknown, Reason: ReasonUnreachable, Host: p.h.Name,
			Detail: "too many sessions needed for one batch"}, false)
		return nil
	}
	p.opens++
	s, res := w.open(p.ctx, p.h, p.ips)
	if s == nil {
		p.failAll(res, res.Reason != ReasonRateLimited)
		return nil
	}
	w.sess = s
	p.unbind()
	p.unbind = s.bind(p.ctx)
	return s
}

// begin opens a transaction on s when none is open. Calls that need
// SMTPUTF8 from a host that does not offer it are finished first.
func (p *hostProbe) begin(s *session) step {
	if s.started {
		return stepOn
	}
	needUTF8 := false
	keep := p.todo[:0:0]
	for _, c := range p.todo {
		if c.addr.UTF8 && !s.utf8 {
			p.w.v.finish(c, Result{Status: StatusUnknown, Reason: ReasonNoSMTPUTF8, Host: p.h.Name,
				Detail: "the local part needs SMTPUTF8, which " + p.h.Name + " does not offer"})
			continue
		}
		needUTF8 = needUTF8 || c.addr.UTF8
		keep = append(keep, c)
	}
	p.todo = keep
	if !p.more() {
		return stepDone
	}
	if err := s.mail(p.w.v.cfg.MailFrom, needUTF8); err != nil {
		return p.mailFailed(s, err)
	}
	return stepOn
}

// mailFailed handles a MAIL FROM that s did not take.
func (p *hostProbe) mailFailed(s *session, err error) step {
	w, v := p.w, p.w.v
	var se *stageError
	errors.As(err, &se)
	if (se.reply.IsZero() || se.reply.Code == 421) && s.rcpts > 0 && !p.mailRetried && p.ctx.Err() == nil {
		// The server closed the idle session meanwhile (or is closing it
		// with 421): start anew, once.
		p.mailRetried = true
		w.closeSession()
		return stepAgain
	}
	res := v.sessionFailure(p.ctx, p.h, err)
	w.closeSession()
	permanent := se.reply.Code/100 == 5
	if permanent {
		// A permanent refusal of the probe itself: leave this host alone
		// for a while, and do not try the others with the same sender.
		v.learn(keyRefusal+p.h.Name, Result{Status: StatusUnknown, Reason: ReasonRefusesProbes, Host: p.h.Name,
			Reply: se.reply, Detail: "MX refused our MAIL FROM recently; not probed until that is forgotten"}, v.cfg.RefusalTTL)
	}
	p.failAll(res, !permanent)
	return stepDone
}

// ask sends one RCPT on s: the next recipient, or the random local part
// (c nil) once they are all asked.
func (p *hostProbe) ask(s *session) step {
	w, v := p.w, p.w.v
	var c *call
	rcpt := ""
	if len(p.todo) > 0 {
		c, rcpt = p.todo[0], p.todo[0].addr.String()
	} else {
		rcpt = randomLocal() + "@" + w.domain
	}
	if why := v.takeRcpt(w.domain, s.ip); why != "" {
		res := v.rateLimited(p.h, why)
		if c == nil {
			p.probeDone(&res)
		} else {
			p.failAll(res, false)
		}
		return stepAgain
	}
	if c == nil {
		v.stats.probes.Add(1)
	}
	r, err := s.rcpt(rcpt)
	if err != nil {
		res := v.sessionFailure(p.ctx, p.h, err)
		w.closeSession()
		if c == nil {
			res.Status, res.Detail = StatusUnknown, "random-name probe failed: "+res.Detail
			p.probeDone(&res)
			return stepAgain
		}
		p.failAll(res, true)
		return stepDone
	}
	if r.Code == 503 && p.retryOnce(c) {
		// The server lost our transaction ("need MAIL command"): open it
		// again and ask once more.
		s.started = false
		return stepAgain
	}
	st, reason := classify(StageRcpt, r)
	res := Result{Status: st, Reason: reason, Host: p.h.Name, Reply: r}
	if c == nil {
		v.learnProbe(w.domain, p.h, w.primary, rcpt, res)
		p.probeDone(nil)
		return stepAgain
	}
	p.todo = p.todo[1:]
	p.answered(s, c, res)
	return stepAgain
}

// retryOnce reports whether the RCPT of c (nil: the random local part)
// may be sent again, once.
func (p *hostProbe) retryOnce(c *call) bool {
	if c == nil {
		again := !p.probeRetried
		p.probeRetried = true
		return again
	}
	again := !c.retried
	c.retried = true
	return again
}

// answered files c by the reply to its RCPT: to try again on the next host
// (4xx), accepted (judged once the random name is asked) or finished.
func (p *hostProbe) answered(s *session, c *call, res Result) {
	switch {
	case res.Reply.Code/100 == 4:
		c.res = res
		p.retry = append(p.retry, c)
		if res.Reply.Code == 421 {
			// The server is closing the connection.
			s.broken = true
			p.failAll(res, true)
		}
	case res.Status == StatusValid:
		c.res = res
		p.accepted = append(p.accepted, c)
	default:
		p.w.v.finish(c, res)
	}
}

// end leaves the worker's session ready for the next host or batch.
func (p *hostProbe) end() {
	w := p.w
	s := w.sess
	if s == nil {
		return
	}
	switch {
	case p.single || s.errors >= sessionErrorLimit:
		// No use keeping it open for more recipients.
		w.closeSession()
	case s.started:
		if err := s.reset(); err != nil {
			w.closeSession()
		}
	}
}

// judgeAccepted finishes the calls whose recipient h accepted. Acceptance
// is valid only when h is known to refuse a random local part of the
// domain (or the operator turned that check off); when h accepts
// everything the verdict is unknown, reason catch-all; when the check
// could not be made (failed) the verdict is unknown with failed's reason.
func (w *worker) judgeAccepted(accepted []*call, h Host, failed *Result) {
	v := w.v
	for _, c := range accepted {
		res := c.res
		switch known, ok := v.fact(keyHostAll + w.domain + " " + h.Name); {
		case failed != nil:
			res.Status, res.Reason, res.Detail = StatusUnknown, failed.Reason, "accepted, but whether "+h.Name+" accepts every name could not be checked: "+failed.Detail
		case !v.cfg.CatchAllProbe:
		case !ok:
			res.Status, res.Reason, res.Detail = StatusUnknown, ReasonUnchecked, "accepted, but whether "+h.Name+" accepts every name is not known"
		case known.Reason == ReasonCatchAll:
			res.Status, res.Reason, res.Detail = StatusUnknown, ReasonCatchAll, h.Name+" accepts every local part"
		case known.Status != StatusValid:
			res.Status, res.Reason, res.Detail = StatusUnknown, ReasonUnchecked, "accepted, but "+h.Name+" gave no clear answer to a random name: "+known.Reply.String()
		}
		v.finish(c, res)
	}
}

// learnProbe keeps, for CatchAllTTL whatever the answer, what a random
// local part at domain got from h: so a domain's MX sees at most one such
// probe from us per CatchAllTTL. When the primary MX accepts it, the whole
// domain is known to be a catch-all and is not probed again meanwhile.
func (v *Verifier) learnProbe(domain string, h Host, primary, probe string, res Result) {
	fact := Result{Status: StatusUnknown, Reason: ReasonUnchecked, Host: h.Name, Reply: res.Reply,
		Detail: "unclear answer to the random local part " + probe}
	switch res.Status {
	case StatusValid:
		fact.Reason, fact.Detail = ReasonCatchAll, h.Name+" accepted the random local part "+probe
		if h.Name == primary {
			v.learn(keyCatchAll+domain, fact, v.cfg.CatchAllTTL)
		}
	case StatusInvalid:
		fact.Status, fact.Reason, fact.Detail = StatusValid, ReasonAccepted, h.Name+" refused the random local part "+probe
	}
	v.learn(keyHostAll+domain+" "+h.Name, fact, v.cfg.CatchAllTTL)
}

// open starts a session to h within the caps: the global budget of new
// sessions and the domain's, then, address by address, the address's
// connection rate and concurrent connections. The time left is split
// between the addresses so a dead first one does not eat it all.
func (w *worker) open(ctx context.Context, h Host, ips []netip.Addr) (*session, Result) {
	v := w.v
	now := v.cfg.Now()
	switch v.takeCaps(now, windowKey{"s", v.cfg.SessionRate}, windowKey{"d:" + w.domain, v.cfg.PerDomainRate}) {
	case 0:
		return nil, v.rateLimited(h, fmt.Sprintf("more than %d new probe sessions a minute in all (callout.session_rate)", v.cfg.SessionRate))
	case 1:
		return nil, v.rateLimited(h, fmt.Sprintf("more than %d new sessions a minute for %s (callout.per_domain_rate)", v.cfg.PerDomainRate, w.domain))
	}
	var last error
	limited := ""
	for i, ip := range ips {
		left := time.Until(deadlineOf(ctx))
		if left <= 0 {
			break
		}
		key := ip.String()
		if v.takeCaps(now, windowKey{"c:" + key, v.cfg.PerHostRate}) >= 0 {
			limited = fmt.Sprintf("more than %d new connections a minute to %s (callout.per_host_rate)", v.cfg.PerHostRate, key)
			continue
		}
		if err := v.hosts.acquire(ctx, key); err != nil {
			return nil, Result{Status: StatusUnknown, Reason: v.failureReason(ctx, ReasonTimeout), Host: h.Name,
				Detail: fmt.Sprintf("no free connection slot to %s (%s) in time (callout.per_host %d)", h.Name, key, v.cfg.PerHost)}
		}
		dctx, cancel := context.WithTimeout(ctx, left/time.Duration(min(len(ips)-i, 3)))
		s, err := v.dialSession(dctx, h, ip)
		cancel()
		if err == nil {
			v.stats.sessions.Add(1)
			return s, Result{}
		}
		if s != nil {
			v.closeSession(s) // QUIT, then the slot is free
		} else {
			v.hosts.release(key)
		}
		last = err
		var se *stageError
		if errors.As(err, &se) && !se.reply.IsZero() {
			break // the host answered: its other addresses would say the same
		}
	}
	if last == nil && limited != "" {
		return nil, v.rateLimited(h, limited)
	}
	if last == nil {
		last = &stageError{stage: StageConnect, text: "no time left to connect", timeout: true}
	}
	return nil, v.sessionFailure(ctx, h, last)
}

// takeRcpt counts one RCPT to domain at ip against the caps and returns
// "" when it may be sent, else which cap is reached.
func (v *Verifier) takeRcpt(domain string, ip netip.Addr) string {
	switch v.takeCaps(v.cfg.Now(), windowKey{"r:" + domain, v.cfg.PerDomainRcptRate}, windowKey{"q:" + ip.String(), v.cfg.PerHostRcptRate}) {
	case 0:
		return fmt.Sprintf("more than %d recipients a minute asked at %s (callout.per_domain_rcpt_rate)", v.cfg.PerDomainRcptRate, domain)
	case 1:
		return fmt.Sprintf("more than %d recipients a minute asked at %s (callout.per_host_rcpt_rate)", v.cfg.PerHostRcptRate, ip)
	}
	return ""
}

// rateLimited is the verdict past a cap. It logs, at most one line per
// capLogEvery, how many verdicts the caps turned unknown.
func (v *Verifier) rateLimited(h Host, why string) Result {
	now := v.cfg.Now()
	v.capMu.Lock()
	v.capHits++
	if now.Sub(v.capLogged) >= capLogEvery {
		v.log.Warn("callout cap reached: verdicts are unknown rate-limited, nothing sent", slog.String("cap", why),
			slog.String("mx", h.Name), slog.Int("since_last_line", v.capHits))
		v.capLogged, v.capHits = now, 0
	}
	v.capMu.Unlock()
	return Result{Status: StatusUnknown, Reason: ReasonRateLimited, Host: h.Name, Detail: why}
}

// capLogEvery is the least time between two "cap reached" log lines.
const capLogEvery = 10 * time.Second

func deadlineOf(ctx context.Context) time.Time {
	d, ok := ctx.Deadline()
	if !ok {
		return time.Now().Add(time.Hour)
	}
	return d
}

// sessionFailure turns a failure to talk to h into a verdict.
func (v *Verifier) sessionFailure(ctx context.Context, h Host, err error) Result {
	res := Result{Status: StatusUnknown, Host: h.Name, Detail: err.Error()}
	var se *stageError
	if errors.As(err, &se) && !se.reply.IsZero() {
		res.Reply = se.reply
		res.Status, res.Reason = classify(se.stage, se.reply)
		return res
	}
	res.Reason = v.failureReason(ctx, ReasonUnreachable)
	if se != nil && se.garbled && res.Reason == ReasonUnreachable {
		res.Reason = ReasonProtocol
		return res
	}
	var ne net.Error
	if res.Reason == ReasonUnreachable && (errors.As(err, &se) && se.timeout || errors.As(err, &ne) && ne.Timeout()) {
		res.Reason = ReasonTimeout
	}
	return res
}

// randomLocal makes a local part no real mailbox has.
func randomLocal() string {
	const letters = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 20)
	for i := range b {
		b[i] = letters[rand.IntN(len(letters))]
	}
	return string(b)
}
