package main

import (
	"context"
	"log/slog"
	"time"
)

// journalKeeper looks after the journal in the background: it writes the
// rows of callbacks accepted into memory only, renews this instance's lease
// on the rows it owns, deletes rows past the TTL, and takes over
// rows whose lease ran out, from an instance that crashed or from this
// service's previous run.
type journalKeeper struct {
	store   *store
	db      *database
	pipe    *pipeline
	ttl     time.Duration
	lease   time.Duration
	every   time.Duration
	rounds  int // rounds run, for what is done only every few rounds
	log     *slog.Logger
	metrics *metrics
	guard   *guard
}

// maxClaim bounds the journal rows taken over in one round, so that a
// takeover of a large journal comes in steps the fetch limiter can follow.
const maxClaim = 1000

// depthEvery is how many rounds apart the journal's rows are counted.
const depthEvery = 10

func newJournalKeeper(cfg config, s *store, db *database, p *pipeline, log *slog.Logger, m *metrics, g *guard) *journalKeeper {
	// Rounds at least five times per lease keep a held row's lease alive
	// through a few failed rounds; at least once a second so that parked or
	// orphaned rows are taken over soon after their lease runs out.
	return &journalKeeper{store: s, db: db, pipe: p, ttl: cfg.ttl, lease: cfg.lease,
		every: min(cfg.lease/5, time.Second), log: log, metrics: m, guard: g}
}

func (k *journalKeeper) run(ctx context.Context) {
	t := time.NewTicker(k.every)
	defer t.Stop()
	for {
		switch {
		case k.pipe.stopped(): // shutdown parks what is left
		case k.db.ready() == nil:
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
		case <-k.db.cameUp:
		}
	}
}

func (k *journalKeeper) round(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, k.every*4)
	defer cancel()
	k.rejournal(ctx)
	k.pipe.spillMoved()
	now := time.Now()
	if err := k.store.renewLease(ctx, now.Add(k.lease)); err != nil {
		k.warn(ctx, "renewing the journal lease failed", "err", err)
	}
	if n, err := k.store.dropExpired(ctx, now.Add(-k.ttl)); err != nil {
		k.warn(ctx, "dropping expired journal rows failed", "err", err)
	} else if n > 0 {
		k.metrics.journalExpired.Add(uint64(n))
		k.log.Warn("dropped journal rows older than the TTL", "rows", n)
	}
	if room := min(k.pipe.room(), maxClaim); room > 0 {
		rows, err := k.store.claim(ctx, now, now.Add(k.lease), now.Add(-k.ttl), room)
		if err != nil {
			k.warn(ctx, "taking over journal rows failed", "err", err)
		}
		if n := k.pipe.resume(rows); n > 0 {
			k.metrics.journalReplayed.Add(uint64(n))
			k.log.Info("took over journal rows", "callbacks", n, "oldest", rows[0].receivedAt)
		}
	}
	// Counting is a scan of the whole table, which under heavy load cost
	// PostgreSQL more than the journal writes: once every depthEvery rounds.
	if k.rounds%depthEvery == 0 {
		if n, err := k.store.journalDepth(ctx); err == nil {
			k.metrics.journalDepth.Set(n)
		}
		if err := k.store.forgetOwners(ctx, now.Add(-k.ttl)); err != nil {
			k.warn(ctx, "forgetting old journal owners failed", "err", err)
		}
	}
	k.rounds++
}

// warn logs a failed step of a round, unless shutdown cancelled the round:
// that is not a fault, and the next instance's keeper picks up the rows.
// (The round's own timeout ends its context with DeadlineExceeded, which is
// a fault and is logged.)
func (k *journalKeeper) warn(ctx context.Context, msg string, args ...any) {
	if ctx.Err() == context.Canceled {
		return
	}
	k.guard.warn(msg, args...)
}

// rejournal writes the journal rows of the callbacks accepted into memory
// only (the database was down, or a write missed its chance), so that a
// crash from now on loses none of them.
func (k *journalKeeper) rejournal(ctx context.Context) {
	cbs := k.pipe.unjournaled()
	for start := 0; start < len(cbs); start += journalBatch {
		chunk := cbs[start:min(start+journalBatch, len(cbs))]
		if err := k.writeRows(ctx, chunk); err != nil {
			k.warn(ctx, "journaling callbacks held in memory failed; will retry", "callbacks", len(cbs)-start, "err", err)
			for _, cb := range cbs[start+len(chunk):] {
				cb.endJournal(false)
			}
			k.pipe.setMemoryOnly(len(cbs) - start)
			return
		}
	}
	if len(cbs) > 0 {
		k.log.Info("journaled callbacks that were held in memory only", "callbacks", len(cbs))
	}
	k.pipe.setMemoryOnly(0)
}

// writeRows writes the rows of callbacks that were accepted into memory
// only; the caller has called beginJournal on each. A panic in the write is
// a failed write: the callbacks stay in memory for the next round.
func (k *journalKeeper) writeRows(ctx context.Context, cbs []*callback) error {
	err := attempt(k.guard, "rejournal", func() error {
		return k.store.insertJournal(ctx, k.db.main, journalRows(cbs), k.store.owner, time.Now().Add(k.lease))
	})
	if err != nil {
		k.metrics.dbErrors.Inc("journal")
	}
	for _, cb := range cbs {
		cb.endJournal(err == nil)
	}
	if err == nil {
		k.metrics.journalRejournaled.Add(uint64(len(cbs)))
	}
	return err
}
