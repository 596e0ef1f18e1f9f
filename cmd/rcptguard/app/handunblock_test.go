package app

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rcptguard/rcptguard/blocklist"
	"github.com/rcptguard/rcptguard/callout"
	"github.com/rcptguard/rcptguard/detector"
)

// noMailbox says no recipient exists.
type noMailbox struct{}

func (noMailbox) Verify(_ context.Context, addr string) callout.Result {
	return callout.Result{Address: addr, Status: callout.StatusInvalid, Reason: callout.ReasonNoMailbox}
}

// onMessage is a log handler that calls fn on each record with message
// msg: a way into the moment the daemon logs it.
type onMessage struct {
	msg string
	fn  atomic.Pointer[func()]
}

func (h *onMessage) Enabled(context.Context, slog.Level) bool { return true }
func (h *onMessage) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *onMessage) WithGroup(string) slog.Handler            { return h }
func (h *onMessage) Handle(_ context.Context, r slog.Record) error {
	if fn := h.fn.Load(); fn != nil && r.Message == h.msg {
		(*fn)()
	}
	return nil
}

// An identity unblocked outside the daemon (rcptguard unblock, by hand)
// is judged on fresh counts from the moment it is no longer blocked: its
// next invalid recipient, even one asked while the daemon is still
// handling the change (here: when it logs the unblock), counts one and
// does not block it again.
func TestHandUnblockForgetsCountsFirst(t *testing.T) {
	path := filepath.Join(t.TempDir(), "blocklist")
	logs := &onMessage{msg: "rcptguard unblocked"}
	s := &service{cfg: &Config{Blocklist: BlocklistConfig{Path: path}}, log: slog.New(logs), times: newBlockTimes()}
	if err := s.openState(); err != nil {
		t.Fatal(err)
	}
	d, err := detector.New(detector.Config{Verifier: noMailbox{}, Blocklist: s.bl, Limit: 3, Period: time.Hour,
		Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close(time.Second)
	s.mu.Lock()
	s.det = d
	s.mu.Unlock()

	const id = "abused@example.com"
	n := 0
	ask := func() detector.Action {
		n++
		return d.Decide(context.Background(), &detector.Request{Request: "smtpd_access_policy", ProtocolState: "RCPT",
			SASLUsername: id, Sender: id, Recipient: fmt.Sprintf("nobody%d@dest.test", n), ClientAddress: "198.51.100.7",
			ClientName: "pc.example.net", QueueID: "4F2A1C0E3B"})
	}
	for range 3 {
		if a := ask(); a != detector.ActionDunno {
			t.Fatalf("below the limit: %q", a)
		}
	}
	if a := ask(); !strings.HasPrefix(string(a), "HOLD") {
		t.Fatalf("at limit+1: %q, want HOLD", a)
	}

	// rcptguard unblock, another process, removes the entry.
	cli, _, err := blocklist.Open(blocklist.Config{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := cli.Remove(context.Background(), id); !ok || err != nil {
		t.Fatalf("unblock: %v %v", ok, err)
	}
	var during detector.Action
	fn := func() { during = ask() }
	logs.fn.Store(&fn)
	if _, err := s.bl.Reload(); err != nil {
		t.Fatal(err)
	}
	logs.fn.Store(nil)
	if during != detector.ActionDunno {
		t.Errorf("a recipient asked while the unblock was being handled: %q, want DUNNO (judged on fresh counts)", during)
	}
	if a := ask(); a != detector.ActionDunno {
		t.Errorf("the next recipient: %q, want DUNNO", a)
	}
	if _, ok := s.bl.Lookup(id); ok {
		t.Error("the identity is blocked again")
	}
}
