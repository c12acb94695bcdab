package main

import (
	"context"
	"log/slog"
	"time"
)

// reaper deletes objects not seen within the TTL. It runs on a time.Ticker;
// if one round is slow, the ticker drops the ticks it missed rather than
// queueing a burst of rounds.
type reaper struct {
	store   *Store
	ttl     time.Duration
	every   time.Duration
	log     *slog.Logger
	metrics *metrics
}

func newReaper(cfg config, s *Store, log *slog.Logger, m *metrics) *reaper {
	return &reaper{store: s, ttl: cfg.ttl, every: cfg.reapEvery, log: log, metrics: m}
}

func (r *reaper) run(ctx context.Context) {
	t := time.NewTicker(r.every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if r.store.Ready() != nil {
			continue
		}
		r.round(ctx)
	}
}

func (r *reaper) round(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, max(r.every, 5*time.Second))
	defer cancel()
	n, err := r.store.Reap(ctx, time.Now().Add(-r.ttl))
	if err != nil {
		r.store.warn("reaping failed", "err", err)
		return
	}
	r.metrics.rowsReaped.Add(uint64(n))
	if n > 0 {
		r.log.Debug("reaped", "rows", n)
	}
}
