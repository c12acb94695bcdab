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
	store   *store
	db      *database
	ttl     time.Duration
	every   time.Duration
	log     *slog.Logger
	metrics *metrics
	guard   *guard
}

// minReapTimeout bounds one round even when -reap-every is short: deleting a
// large backlog of old rows after an outage takes a while.
const minReapTimeout = 5 * time.Second

func newReaper(cfg config, s *store, db *database, log *slog.Logger, m *metrics, g *guard) *reaper {
	return &reaper{store: s, db: db, ttl: cfg.ttl, every: cfg.reapEvery, log: log, metrics: m, guard: g}
}

func (r *reaper) run(ctx context.Context) {
	everyTick(ctx, r.every, func() {
		if r.db.ready() == nil {
			r.round(ctx)
		}
	})
}

func (r *reaper) round(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, max(r.every, minReapTimeout))
	defer cancel()
	n, err := r.store.reap(ctx, time.Now().Add(-r.ttl))
	if err != nil {
		r.guard.warn("reaping failed", "err", err)
		return
	}
	r.metrics.rowsReaped.Add(uint64(n))
	if n > 0 {
		r.log.Debug("reaped", "rows", n)
	}
}
