package main

import (
	"context"
	"log/slog"
	"time"
)

// journalKeeper looks after the journal in the background: it renews the
// leases of the callbacks this instance holds, deletes rows past the TTL, and
// takes over rows whose lease ran out, from an instance that crashed or from
// this service's previous run.
type journalKeeper struct {
	store   *Store
	pipe    *pipeline
	ttl     time.Duration
	lease   time.Duration
	every   time.Duration
	log     *slog.Logger
	metrics *metrics
}

func newJournalKeeper(cfg config, s *Store, p *pipeline, log *slog.Logger, m *metrics) *journalKeeper {
	// Rounds at least five times per lease keep a held row's lease alive
	// through a few failed rounds; at least once a second so that parked or
	// orphaned rows are taken over soon after their lease runs out.
	return &journalKeeper{store: s, pipe: p, ttl: cfg.ttl, lease: cfg.lease, every: min(cfg.lease/5, time.Second), log: log, metrics: m}
}

func (k *journalKeeper) run(ctx context.Context) {
	t := time.NewTicker(k.every)
	defer t.Stop()
	for {
		if k.store.Ready() == nil && k.pipe.ctx.Err() == nil {
			k.round(ctx)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (k *journalKeeper) round(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, k.every*4)
	defer cancel()
	now := time.Now()
	if err := k.store.RenewLeases(ctx, k.pipe.heldJournalIDs(), now.Add(k.lease)); err != nil {
		k.store.warn("renewing journal leases failed", "err", err)
	}
	if n, err := k.store.DropExpired(ctx, now.Add(-k.ttl)); err != nil {
		k.store.warn("dropping expired journal rows failed", "err", err)
	} else if n > 0 {
		k.metrics.journalExpired.Add(uint64(n))
		k.log.Warn("dropped journal rows older than the TTL", "rows", n)
	}
	if room := min(k.pipe.room(), 1000); room > 0 {
		cbs, err := k.store.Claim(ctx, now, room)
		if err != nil {
			k.store.warn("taking over journal rows failed", "err", err)
		}
		for _, cb := range cbs {
			if k.pipe.admit(cb, true) == nil {
				k.pipe.start(cb)
			}
		}
		if len(cbs) > 0 {
			k.metrics.journalReplayed.Add(uint64(len(cbs)))
			k.log.Info("took over journal rows", "callbacks", len(cbs), "oldest", cbs[0].receivedAt)
		}
	}
	if n, err := k.store.JournalDepth(ctx); err == nil {
		k.metrics.journalDepth.Set(n)
	}
}
