package app

import (
	"context"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rcptguard/rcptguard/cmd/rcptguard/queue"
	"github.com/rcptguard/rcptguard/notify"
)

// queueSpaceLow is the free fraction of the queue file system below which
// the daemon warns: a spam run that fills the queue disk stops all mail.
const queueSpaceLow = 0.10

// queueSpaceRepeat is how often the warning is repeated while the space
// stays low.
const queueSpaceRepeat = 10 * time.Minute

// watchQueueSpace checks the free space of Postfix's queue file system
// every interval until ctx ends: gauges rcptguard_queue_fs_free_bytes and
// rcptguard_queue_fs_free_ratio, and an error log line when it is below
// queueSpaceLow (repeated every queueSpaceRepeat, and a line when it is
// fine again). space is queue.FreeSpace outside tests. Each reading goes
// to now too (nil: nowhere), for the reports.
func watchQueueSpace(ctx context.Context, dir string, interval time.Duration, space func(string) (queue.Space, error), reg prometheus.Registerer, log *slog.Logger, now *queueSpaceNow) {
	freeBytes := prometheus.NewGauge(prometheus.GaugeOpts{Name: "rcptguard_queue_fs_free_bytes", Help: "Bytes free on the file system of Postfix's queue directory."})
	freeRatio := prometheus.NewGauge(prometheus.GaugeOpts{Name: "rcptguard_queue_fs_free_ratio", Help: "Fraction free of the file system of Postfix's queue directory."})
	if reg != nil {
		reg.MustRegister(freeBytes, freeRatio)
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	var low bool
	var warned time.Time
	for {
		s, err := space(dir)
		now.set(s, err)
		switch {
		case err != nil:
			log.Warn("cannot check the free space of Postfix's queue", slog.String("queue_directory", dir), slog.Any("error", err))
		case s.FreeRatio() < queueSpaceLow:
			freeBytes.Set(float64(s.Free))
			freeRatio.Set(s.FreeRatio())
			if !low || time.Since(warned) >= queueSpaceRepeat {
				log.Error("Postfix queue file system nearly full: held mail may fill it; delete held spam with rcptguard purge",
					slog.String("queue_directory", dir), slog.Uint64("free_bytes", s.Free), slog.Float64("free_ratio", s.FreeRatio()))
				warned = time.Now()
			}
			low = true
		default:
			freeBytes.Set(float64(s.Free))
			freeRatio.Set(s.FreeRatio())
			if low {
				log.Info("Postfix queue file system has room again", slog.String("queue_directory", dir), slog.Float64("free_ratio", s.FreeRatio()))
			}
			low = false
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// queueSpaceNow is the last reading of watchQueueSpace, for the reports:
// an abuse report says when the queue file system is nearly full. Safe
// for concurrent use; the nil *queueSpaceNow reads as never checked.
type queueSpaceNow struct {
	p atomic.Pointer[notify.QueueSpace]
}

func (n *queueSpaceNow) set(s queue.Space, err error) {
	if n == nil {
		return
	}
	if err != nil {
		n.p.Store(nil)
		return
	}
	n.p.Store(&notify.QueueSpace{FreeBytes: s.Free, FreeRatio: s.FreeRatio(), Low: s.FreeRatio() < queueSpaceLow})
}

// get returns the last reading, nil when there is none (not watched, or
// the last check failed).
func (n *queueSpaceNow) get() *notify.QueueSpace {
	if n == nil {
		return nil
	}
	if p := n.p.Load(); p != nil {
		c := *p
		return &c
	}
	return nil
}
