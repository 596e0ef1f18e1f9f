package app

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rcptguard/rcptguard/cmd/rcptguard/queue"
	"github.com/rcptguard/rcptguard/notify"
)

func TestWatchQueueSpace(t *testing.T) {
	const gib = 1 << 30
	seq := []struct {
		s   queue.Space
		err error
	}{
		{queue.Space{Free: 50 * gib, Total: 100 * gib}, nil},
		{queue.Space{Free: 5 * gib, Total: 100 * gib}, nil}, // low: error line
		{queue.Space{Free: 4 * gib, Total: 100 * gib}, nil}, // still low: no repeat within 10m
		{queue.Space{}, errors.New("statfs failed")},
		{queue.Space{Free: 30 * gib, Total: 100 * gib}, nil}, // room again
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	i := 0
	space := func(string) (queue.Space, error) {
		v := seq[i]
		i++
		if i == len(seq) {
			cancel()
		}
		return v.s, v.err
	}
	var logs bytes.Buffer
	reg := prometheus.NewRegistry()
	var now queueSpaceNow
	var seen []*notify.QueueSpace
	spaceSeen := func(d string) (queue.Space, error) {
		if i > 0 {
			seen = append(seen, now.get())
		}
		return space(d)
	}
	watchQueueSpace(ctx, "/var/spool/postfix", time.Millisecond, spaceSeen, reg, slog.New(slog.NewTextHandler(&logs, nil)), &now)
	seen = append(seen, now.get())
	// What a report made after each reading would say.
	if len(seen) != len(seq) {
		t.Fatalf("%d readings seen, want %d", len(seen), len(seq))
	}
	for k, want := range seq {
		got := seen[k]
		switch {
		case want.err != nil:
			if got != nil {
				t.Errorf("reading %d failed, but reports get %+v", k, got)
			}
		case got == nil || got.FreeBytes != want.s.Free || got.Low != (want.s.FreeRatio() < 0.10):
			t.Errorf("reading %d: reports get %+v, want free %d low %v", k, got, want.s.Free, want.s.FreeRatio() < 0.10)
		}
	}
	var never *queueSpaceNow
	if never.get() != nil {
		t.Error("an unwatched queue has a reading")
	}
	out := logs.String()
	if n := strings.Count(out, "nearly full"); n != 1 {
		t.Errorf("%d nearly-full lines, want 1:\n%s", n, out)
	}
	if !strings.Contains(out, "level=ERROR") || !strings.Contains(out, "free_ratio=0.05") {
		t.Errorf("the nearly-full line is not an error with the ratio:\n%s", out)
	}
	if !strings.Contains(out, "statfs failed") || !strings.Contains(out, "has room again") {
		t.Errorf("missing lines:\n%s", out)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		got[mf.GetName()] = mf.GetMetric()[0].GetGauge().GetValue()
	}
	if got["rcptguard_queue_fs_free_ratio"] != 0.3 || got["rcptguard_queue_fs_free_bytes"] != 30*gib {
		t.Errorf("gauges %v, want the last reading", got)
	}
}

func TestQueueSpaceOfThisMachine(t *testing.T) {
	s, err := queue.FreeSpace(t.TempDir())
	if err != nil {
		t.Skip(err)
	}
	if s.Total == 0 || s.Free > s.Total {
		t.Fatalf("implausible space %+v", s)
	}
}
