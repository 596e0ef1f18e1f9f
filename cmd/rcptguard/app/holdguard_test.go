package app

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rcptguard/rcptguard/detector"
)

func TestHoldGuard(t *testing.T) {
	blocked := map[string]bool{"spammer@customer.test": true}
	inner := detector.HandlerFunc(func(_ context.Context, req *detector.Request) detector.Action {
		if blocked[strings.ToLower(req.SASLUsername)] {
			return "HOLD blocked"
		}
		return detector.ActionDunno
	})
	cfg := &Config{Detector: DetectorConfig{HoldMax: 2, HoldMaxBytes: 1000, HoldMaxAction: "REJECT 5.7.1 account suspended"}}
	var logs bytes.Buffer
	reg := prometheus.NewRegistry()
	g := newHoldGuard(cfg, inner, slog.New(slog.NewTextHandler(&logs, nil)), reg).(*holdGuard)
	const reject = detector.Action("REJECT 5.7.1 account suspended")
	steps := []struct {
		name, user, instance, size, state string
		want                              detector.Action
	}{
		{"first message held", "spammer@customer.test", "m1", "100", "RCPT", "HOLD blocked"},
		{"its second recipient too", "spammer@customer.test", "m1", "100", "RCPT", "HOLD blocked"},
		{"another user is not counted", "honest@customer.test", "h1", "100", "RCPT", detector.ActionDunno},
		{"not RCPT: passed through", "spammer@customer.test", "m9", "100", "DATA", "HOLD blocked"},
		{"second message held", "Spammer@Customer.test", "m2", "100", "RCPT", "HOLD blocked"},
		{"third message: past hold_max", "spammer@customer.test", "m3", "100", "RCPT", reject},
		{"its next recipient: the same", "spammer@customer.test", "m3", "100", "RCPT", reject},
		{"a recipient of a held message: still HOLD", "spammer@customer.test", "m2", "100", "RCPT", "HOLD blocked"},
		{"fourth message", "spammer@customer.test", "m4", "100", "RCPT", reject},
	}
	run := func(user, instance, size, state string) detector.Action {
		return g.Decide(context.Background(), &detector.Request{ProtocolState: state, SASLUsername: user, Instance: instance, Size: size, Recipient: "x@dest.test"})
	}
	for _, s := range steps {
		if got := run(s.user, s.instance, s.size, s.state); got != s.want {
			t.Errorf("%s: got %q, want %q", s.name, got, s.want)
		}
	}
	if n := counterValue(t, reg, "rcptguard_hold_guard_switches_total"); n != 1 {
		t.Errorf("switches counted %v, want 1", n)
	}
	if !strings.Contains(logs.String(), "hold queue guard") || !strings.Contains(logs.String(), "identity=spammer@customer.test") ||
		!strings.Contains(logs.String(), "held_messages=2") || strings.Count(logs.String(), "hold queue guard") != 1 {
		t.Errorf("guard log:\n%s", logs.String())
	}

	// Unblocked: answers pass through and the count starts afresh.
	delete(blocked, "spammer@customer.test")
	if got := run("spammer@customer.test", "m5", "100", "RCPT"); got != detector.ActionDunno {
		t.Fatalf("unblocked: got %q", got)
	}
	blocked["spammer@customer.test"] = true
	if got := run("spammer@customer.test", "m6", "100", "RCPT"); got != "HOLD blocked" {
		t.Fatalf("blocked again: got %q, want a fresh count", got)
	}

	// Bytes: declared sizes add up to hold_max_bytes.
	blocked["big@customer.test"] = true
	for i, want := range []detector.Action{"HOLD blocked", "HOLD blocked", reject} {
		if got := run("big@customer.test", string(rune('a'+i)), "600", "RCPT"); got != want {
			t.Errorf("big message %d: got %q, want %q", i, got, want)
		}
	}
}

func TestHoldGuardOffAndValidation(t *testing.T) {
	inner := detector.HandlerFunc(func(context.Context, *detector.Request) detector.Action { return "HOLD" })
	if h := newHoldGuard(&Config{}, inner, nil, nil); h == nil {
		t.Fatal("nil handler")
	} else if _, ok := h.(*holdGuard); ok {
		t.Fatal("guard on with hold_max and hold_max_bytes 0")
	}
	for _, c := range []struct{ text, key string }{
		{"[detector]\nhold_max = -1\n", "detector.hold_max:"},
		{"[detector]\nhold_max_bytes = -1\n", "detector.hold_max_bytes:"},
		{"[detector]\nhold_max_action = \"HOLD\"\n", "detector.hold_max_action:"},
		{"[detector]\nhold_max_action = \"DISCARD x\"\n", "detector.hold_max_action:"},
		{"[detector]\nhold_max_action = \"whatever\"\n", "detector.hold_max_action:"},
	} {
		if _, err := LoadConfig(writeConfig(t, c.text)); err == nil || !strings.Contains(err.Error(), c.key) {
			t.Errorf("%q: error %v, want one naming %s", c.text, err, c.key)
		}
	}
	if _, err := LoadConfig(writeConfig(t, "[detector]\nhold_max_action = \"450 4.7.1 try later\"\n")); err != nil {
		t.Errorf("a 4xx hold_max_action refused: %v", err)
	}
}

// counterValue reads a counter from a registry.
func counterValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}
