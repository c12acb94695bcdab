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
		switch {
		case k.pipe.stopped(): // shutdown parks what is left
		case k.store.Ready() == nil:
			k.round(ctx)
		default:
			k.pipe.setMemoryOnly(k.pipe.memoryOnly())
		}
		// A round starts at once when the database comes back, so that the
		// callbacks accepted into memory only during the outage are
		// journaled first thing.
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-k.store.cameUp:
		}
	}
}

func (k *journalKeeper) round(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, k.every*4)
	defer cancel()
	k.rejournal(ctx)
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

// rejournal writes the journal rows of the callbacks accepted into memory
// only (the database was down, or a write missed its chance), so that a
// crash from now on loses none of them.
func (k *journalKeeper) rejournal(ctx context.Context) {
	cbs := k.pipe.unjournaled()
	if len(cbs) == 0 {
		k.pipe.setMemoryOnly(0)
		return
	}
	for start := 0; start < len(cbs); start += journalBatch {
		chunk := cbs[start:min(start+journalBatch, len(cbs))]
		if err := k.store.Rejournal(ctx, chunk); err != nil {
			k.store.warn("journaling callbacks held in memory failed; will retry", "callbacks", len(cbs)-start, "err", err)
			for _, cb := range cbs[start+len(chunk):] {
				cb.endJournal(false)
			}
			k.pipe.setMemoryOnly(len(cbs) - start)
			return
		}
	}
	k.log.Info("journaled callbacks that were held in memory only", "callbacks", len(cbs))
	k.pipe.setMemoryOnly(0)
}
