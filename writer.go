package main

import (
	"cmp"
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"time"
)

// writer batches the callback path's writes: journal rows before the answer,
// online objects as their lookups end, journal deletes once a callback's
// objects are all in. Writer goroutines take whatever is queued, so
// many callbacks share one round trip and one commit (group commit), which is
// what lets the journal keep up with thousands of callbacks per second. The
// rules of retry and expiry live here; the SQL is the store's.
type writer struct {
	store   *store
	db      *database
	ttl     time.Duration
	lease   time.Duration
	metrics *metrics
	guard   *guard

	journalQ chan *writeReq
	applyQ   chan *writeReq

	lag lagMeter // how far behind the journal is, for the fetch limiter
}

// Writers and their tuning.
const (
	journalWriters = 2 // goroutines writing journal rows, each with its own connection
	applyWriters   = 2 // goroutines writing online objects and deleting finished callbacks' rows
	// queueSize bounds the requests waiting for a writer; a full journal
	// queue makes callbacks wait, up to -journal-timeout.
	queueSize = 1024
	// journalBatch and applyBatch are the most callbacks one statement
	// carries: large enough to absorb a burst in one commit, small enough
	// that one statement stays well under a second.
	journalBatch = 512
	applyBatch   = 1000
	// A journal batch that finds journalGatherFrom requests queued waits
	// for more before it commits, in slices of journalGatherSlice until it
	// has journalGatherEnough or journalGather has passed (gather). Alone,
	// a callback commits at once; at 4000 callbacks/s this cut the
	// journal's commits from about 900 to 280 a second and PostgreSQL's
	// CPU by a third, for 5 ms more on the answer.
	journalGatherFrom   = 4
	journalGather       = 5 * time.Millisecond
	journalGatherSlice  = time.Millisecond
	journalGatherEnough = 32
	// journalAttemptTimeout bounds one journal statement; a slower one is
	// retried, so a connection hung on a dead server cannot stall the writer.
	journalAttemptTimeout = 5 * time.Second
	// Backoff between failed attempts, with jitter: short for the journal,
	// whose callers may be waiting; longer for applies, which wait out
	// outages.
	journalRetryMin = 20 * time.Millisecond
	journalRetryMax = time.Second
	applyRetryMin   = 100 * time.Millisecond
	applyRetryMax   = 2 * time.Second
)

// writeReq is one write waiting for a writer goroutine: a callback's
// journal row to insert (journal), or for the apply writer either an online
// object to upsert or a finished callback whose journal row goes.
type writeReq struct {
	cb      *callback   // journal, and apply's journal delete
	objects []objectRow // apply's upsert, when cb is nil
	newest  time.Time   // the latest last_seen of objects
	done    chan error  // buffered: the writer never blocks on a caller that gave up
}

// receivedAt is when the write's newest callback arrived: past it + TTL the
// write is pointless.
func (r *writeReq) receivedAt() time.Time {
	if r.cb != nil {
		return r.cb.receivedAt
	}
	return r.newest
}

func newWriter(cfg config, s *store, db *database, m *metrics, g *guard) *writer {
	return &writer{
		store: s, db: db, ttl: cfg.ttl, lease: cfg.lease, metrics: m, guard: g,
		lag:      lagMeter{target: cfg.journalTimeout / journalTargetShare},
		journalQ: make(chan *writeReq, queueSize),
		applyQ:   make(chan *writeReq, queueSize),
	}
}

// journal writes cb's journal row; the caller has called cb.beginJournal.
// It returns once the row is committed, the write has failed, or ctx ends,
// whichever comes first. When ctx ends first the write is not abandoned: it
// goes on, and its outcome is recorded on cb (cb.endJournal). When the
// database is known to be down it fails at once: the callback stays in
// memory only and the journal keeper writes its row when the database is
// back.
func (w *writer) journal(ctx context.Context, cb *callback) {
	if w.db.ready() != nil {
		// Right after start the first connection may still be under way:
		// wait for its outcome within ctx. Once the database is known to be
		// down, fail fast: no point making the sender wait for it.
		w.db.waitFirstCheck(ctx)
		if w.db.ready() != nil {
			cb.endJournal(false)
			return
		}
	}
	r := &writeReq{cb: cb, done: make(chan error, 1)}
	select {
	case w.journalQ <- r:
	case <-ctx.Done():
		cb.endJournal(false) // never queued: the keeper writes it later
		return
	}
	select {
	case <-r.done:
	case <-ctx.Done():
	}
}

// upsert writes online objects, each at its callbacks' latest receipt
// time; complete deletes the journal row of a callback whose objects are
// all written. Both retry through database outages until the callback
// expires (errExpired; for upsert, the newest of them).
func (w *writer) upsert(ctx context.Context, objects []objectRow) error {
	r := &writeReq{objects: objects}
	for _, o := range objects {
		if o.lastSeen.After(r.newest) {
			r.newest = o.lastSeen
		}
	}
	return w.apply(ctx, r)
}

func (w *writer) complete(ctx context.Context, cb *callback) error {
	return w.apply(ctx, &writeReq{cb: cb})
}

func (w *writer) apply(ctx context.Context, r *writeReq) error {
	r.done = make(chan error, 1)
	select {
	case w.applyQ <- r:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-r.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// collect waits for one request and then takes whatever else is queued, up
// to max, so that a busy writer batches and an idle one does not wait.
func collect(ctx context.Context, q chan *writeReq, batch []*writeReq, max int) []*writeReq {
	if len(batch) == 0 {
		select {
		case r := <-q:
			batch = append(batch, r)
		case <-ctx.Done():
			return batch
		}
	}
	for len(batch) < max {
		select {
		case r := <-q:
			batch = append(batch, r)
		default:
			return batch
		}
	}
	return batch
}

// runJournalWriter writes queued journal requests in batches, on the
// connections reserved for the journal, and records each outcome on its
// callback. n numbers the writer, for the lag it reports.
func (w *writer) runJournalWriter(ctx context.Context, n int) {
	var batch []*writeReq
	for ctx.Err() == nil {
		batch = collect(ctx, w.journalQ, batch[:0], journalBatch)
		if len(batch) == 0 {
			continue
		}
		if len(batch) >= journalGatherFrom {
			batch = w.gather(ctx, batch)
		}
		w.journalBatch(ctx, n, batch)
	}
}

// gather waits for more journal requests to join a busy batch, up to
// journalGather, until it has journalGatherEnough: each commit saved is a
// WAL flush and a round trip saved, and past a few dozen callbacks one
// commit more costs little. At 4000 callbacks/s a batch waits the whole
// journalGather, as before; senders that wait for their answer before they
// send again (a closed loop) fill it sooner, and would otherwise wait on
// each other.
func (w *writer) gather(ctx context.Context, batch []*writeReq) []*writeReq {
	for waited := time.Duration(0); waited < journalGather && len(batch) < journalGatherEnough; waited += journalGatherSlice {
		if !sleep(ctx, journalGatherSlice) {
			return batch
		}
		batch = collect(ctx, w.journalQ, batch, journalBatch)
	}
	return batch
}

// journalBatch writes one batch and answers each of its requests once,
// whatever happens. A panic in an attempt is a failed attempt (see
// writeJournal); a panic anywhere else answers the rest as failed, so their
// callbacks stay in memory for the journal keeper to write: a request left
// unanswered would keep its callback marked as being journaled for good.
func (w *writer) journalBatch(ctx context.Context, n int, batch []*writeReq) {
	answered := 0
	defer func() {
		if p := recover(); p != nil {
			w.guard.panicked("journal batch", p)
			err := fmt.Errorf("journal batch: panic: %v", p)
			for _, r := range batch[answered:] {
				r.cb.endJournal(false)
				r.done <- err
			}
		}
	}()
	w.lag.begin(n, batch[0].cb.receivedAt)
	err := w.writeJournal(ctx, batch)
	now := time.Now()
	w.lag.end(n, now.Sub(batch[0].cb.receivedAt))
	for _, r := range batch {
		late := r.cb.endJournal(err == nil)
		if err == nil {
			w.metrics.journalWrites.Inc()
			w.metrics.journalCommit.Observe(now.Sub(r.cb.receivedAt).Seconds())
			if late {
				w.metrics.journalLate.Inc()
			}
		}
		r.done <- err
		answered++
	}
}

// attempt runs one attempt at a statement and turns a panic in it into an
// error, so that the attempt is retried like any failed one (with backoff:
// a panic that repeats does not spin) instead of unwinding the writer and
// losing the requests it holds.
func attempt(g *guard, where string, fn func() error) (err error) {
	defer func() {
		if p := recover(); p != nil {
			g.panicked(where, p)
			err = fmt.Errorf("%s: panic: %v", where, p)
		}
	}()
	return fn()
}

// writeJournal commits the rows of a batch. While the database is up a
// failed attempt is retried, however long it takes: callbacks may already
// have been answered, and their rows are what makes that answer true. It
// gives up only when the database is known to be down (those callbacks stay
// in memory and the journal keeper writes them when it is back), when every
// callback of the batch is past the TTL, or at shutdown.
func (w *writer) writeJournal(ctx context.Context, batch []*writeReq) error {
	rows := make([]journalRow, len(batch))
	var newest time.Time
	for i, r := range batch {
		rows[i] = r.cb.journalRow()
		if r.cb.receivedAt.After(newest) {
			newest = r.cb.receivedAt
		}
	}
	backoff := journalRetryMin
	for {
		if err := w.db.ready(); err != nil {
			return err
		}
		actx, cancel := context.WithTimeout(ctx, journalAttemptTimeout)
		err := attempt(w.guard, "journal write", func() error {
			return w.store.insertJournal(actx, w.db.journal, rows, w.store.owner, time.Now().Add(w.lease))
		})
		cancel()
		if err == nil {
			return nil
		}
		w.metrics.dbErrors.Inc("journal")
		if ctx.Err() != nil || time.Since(newest) > w.ttl {
			return err
		}
		w.guard.warn("journal write failed; retrying", "callbacks", len(batch), "err", err)
		if !sleep(ctx, jitter(backoff)) {
			return ctx.Err()
		}
		backoff = min(2*backoff, journalRetryMax)
	}
}

// park journals callbacks with an already expired lease, so that the next
// instance to look (this one after a restart, or another) takes them over at
// once. Used at shutdown for whatever the grace period did not finish.
func (w *writer) park(ctx context.Context, cbs []*callback) error {
	if len(cbs) == 0 {
		return nil
	}
	err := attempt(w.guard, "park", func() error {
		return w.store.insertJournal(ctx, w.db.main, journalRows(cbs), parkedOwner, time.Now().Add(-time.Second))
	})
	if err != nil {
		w.metrics.dbErrors.Inc("park")
		return err
	}
	return nil
}

// runApplyWriter commits completed callbacks in batches. On failure it keeps
// the batch, adds whatever arrived meanwhile, drops what has expired, and
// tries again with backoff, so a database outage costs nothing that is still
// within its TTL.
func (w *writer) runApplyWriter(ctx context.Context) {
	var pending []*writeReq
	backoff := applyRetryMin
	for {
		pending = collect(ctx, w.applyQ, pending, applyBatch)
		if ctx.Err() != nil {
			for _, r := range pending {
				r.done <- errAborted
			}
			return
		}
		if len(pending) == 0 {
			continue
		}
		batch := pending[:min(len(pending), applyBatch)]
		if err := w.applyBatch(ctx, batch); err != nil {
			w.guard.warn("apply failed; will retry", "writes", len(pending), "err", err)
			pending = w.dropExpired(pending)
			if !sleep(ctx, jitter(backoff)) {
				continue // the next round answers everything with errAborted
			}
			backoff = min(2*backoff, applyRetryMax)
			continue
		}
		pending = append(pending[:0], pending[len(batch):]...)
		backoff = applyRetryMin
	}
}

// dropExpired answers the requests whose callbacks are past the TTL with
// errExpired and returns the rest; their journal rows are removed by the
// journal keeper's expiry sweep.
func (w *writer) dropExpired(pending []*writeReq) []*writeReq {
	cutoff := time.Now().Add(-w.ttl)
	kept := pending[:0]
	for _, r := range pending {
		if r.receivedAt().Before(cutoff) {
			if r.cb != nil {
				w.metrics.callbacksExpired.Inc()
			}
			r.done <- errExpired
			continue
		}
		kept = append(kept, r)
	}
	return kept
}

// applyBatch upserts the online objects of a batch of apply requests and
// deletes the journal rows of the finished callbacks, in one statement, and
// answers each request once it has committed; on failure (a panic in the
// statement included) it answers none, and the caller retries. Objects last
// seen before the TTL are left out (the reaper would delete them at once)
// but journal rows go whatever their age.
func (w *writer) applyBatch(ctx context.Context, batch []*writeReq) error {
	cutoff := time.Now().Add(-w.ttl)
	var upserted int64
	err := attempt(w.guard, "apply", func() (err error) {
		upserted, err = w.applyStatement(ctx, batch, cutoff)
		return err
	})
	if err != nil {
		return err
	}
	w.metrics.rowsUpserted.Add(uint64(upserted))
	for _, r := range batch {
		expired := r.receivedAt().Before(cutoff)
		if r.cb != nil {
			if expired {
				w.metrics.callbacksExpired.Inc()
			} else {
				w.metrics.callbacksApplied.Inc()
			}
		}
		if expired {
			r.done <- errExpired
			continue
		}
		r.done <- nil
	}
	return nil
}

// applyStatement runs the statement of applyBatch.
func (w *writer) applyStatement(ctx context.Context, batch []*writeReq, cutoff time.Time) (int64, error) {
	var done []int64
	buf := rowBuffers.Get().(*[]objectRow)
	defer rowBuffers.Put(buf)
	rows := (*buf)[:0]
	defer func() { *buf = rows[:0] }()
	for _, r := range batch {
		if r.cb != nil {
			done = append(done, r.cb.journalID)
		}
		for _, o := range r.objects {
			if !o.lastSeen.Before(cutoff) {
				rows = append(rows, o)
			}
		}
	}
	// One statement must not name an id twice (two flights of one id can
	// end close together): sort by id, latest time first, and keep the
	// first of each.
	slices.SortFunc(rows, func(a, b objectRow) int {
		if c := cmp.Compare(a.id, b.id); c != 0 {
			return c
		}
		return b.lastSeen.Compare(a.lastSeen)
	})
	rows = slices.CompactFunc(rows, func(a, b objectRow) bool { return a.id == b.id })
	return w.store.applyRows(ctx, rows, done)
}

// rowBuffers holds the buffers apply batches gather their rows in, so that
// a batch does not grow a fresh slice each time.
var rowBuffers = sync.Pool{New: func() any { return new([]objectRow) }}

// jitter spreads retries over [d/2, d) so that writers that failed together
// do not retry together.
func jitter(d time.Duration) time.Duration { return d/2 + rand.N(d/2) }

// sleep waits d unless ctx ends first, and says whether it slept.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
