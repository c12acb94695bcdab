package main

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// pipeline owns every callback held in memory, from acceptance to the commit
// that applies it, and bounds how many there are. New callbacks come in
// through accept, callbacks taken over from the journal through resume.
type pipeline struct {
	cfg       config
	fetcher   *fetcher
	writer    *writer
	admission *admission
	db        *database
	log       *slog.Logger
	metrics   *metrics
	guard     *guard
	spill     *spill // where a callback is made durable when its journal row is not committed in time

	// ctx ends when the grace period after SIGTERM is over: fetches and
	// writes stop and what is left is parked in the journal.
	ctx   context.Context
	abort context.CancelFunc

	memoryOnlyTold atomic.Bool // the memory-only state has been logged

	// beforeApply is a test seam, nil in the service: it runs in process
	// between a callback's lookups and its apply, where a test makes
	// processing panic.
	beforeApply func(*callback)

	wg      sync.WaitGroup // one per callback in memory
	mu      sync.Mutex
	held    map[int64]*callback // by journal id
	heldIDs int
}

func newPipeline(cfg config, f *fetcher, w *writer, a *admission, db *database, sp *spill, log *slog.Logger, m *metrics, g *guard) *pipeline {
	ctx, abort := context.WithCancel(context.Background())
	return &pipeline{
		cfg: cfg, fetcher: f, writer: w, admission: a, db: db, spill: sp, log: log, metrics: m, guard: g,
		ctx: ctx, abort: abort,
		held: make(map[int64]*callback),
	}
}

// accepted is what the sender is told about an accepted callback.
type accepted struct {
	journalID int64
	journaled bool   // its journal row was committed before the answer
	durable   string // where it was durable when answered: durablePostgres, durableSpill or durableMemory
}

// Where an accepted callback is durable when it is answered.
const (
	durablePostgres = "postgres" // a committed journal row
	durableSpill    = "spill"    // an fsynced record in the local spill
	durableMemory   = "memory"   // neither store took it in time: a crash loses it
)

// answerBy bounds the time from receipt to the answer. The sender gives up
// 1s after it sent, so an answer later than that reaches no one: a 2xx
// then is a promise nobody heard, and the sender's retry finds the service
// busier. A callback whose durable record is not there by answerBy gets a
// 503 with Retry-After instead (its work goes on, harmlessly twice).
const answerBy = 800 * time.Millisecond

// accept takes a callback received at receivedAt into the pipeline: admit
// (or errBacklogFull, or *overloaded when its new ids could not be fetched
// in time), journal, start its lookups. The journal comes before any fetch
// work for the callback.
func (p *pipeline) accept(receivedAt time.Time, objectIDs []int64) (accepted, error) {
	if err := p.admission.check(p.fetcher.countNew(objectIDs)); err != nil {
		return accepted{}, err
	}
	cb := newCallback(receivedAt, objectIDs)
	// The write is begun before the callback is visible in held: the
	// journal keeper begins a write of every callback it finds there
	// without one, and two writes of one callback must never run.
	cb.beginJournal()
	if err := p.admit(cb); err != nil {
		return accepted{}, err
	}
	journaled := p.journal(cb)
	durable := durablePostgres
	if !journaled {
		durable = p.spillOne(cb, receivedAt.Add(answerBy))
	}
	if durable == durableMemory {
		p.metrics.journalFailures.Inc()
		p.warnMemoryOnly()
	}
	// Its lookups start beside the answer, not before it: queueing new
	// flights takes the fetcher's lock, which a queue of retries (the
	// object service failing) can keep busy past the sender's 1 s.
	go p.start(cb)
	if durable == "" {
		return accepted{}, &overloaded{reason: "not_durable", retryAfter: time.Second}
	}
	return accepted{journalID: cb.journalID, journaled: journaled, durable: durable}, nil
}

// spillOne makes cb durable in the local spill, for when its journal row
// was not committed by the answer deadline (PostgreSQL down or slow). The
// answer waits for the fsync until answerAt; the PostgreSQL write, if any,
// goes on. It returns "" when neither record is there by answerAt (a
// starved machine or a slow disk): the callback must not get a 2xx, while
// the record may still come. A spill that fails outright (a broken disk)
// leaves memory only, counted.
func (p *pipeline) spillOne(cb *callback, answerAt time.Time) string {
	ctx, cancel := context.WithDeadline(context.Background(), answerAt)
	defer cancel()
	if err := p.spill.append(ctx, cb.journalRow()); err != nil {
		if cb.journaled() { // the row committed meanwhile
			return durablePostgres
		}
		if errors.Is(err, context.DeadlineExceeded) {
			return ""
		}
		p.guard.warn("could not spill a callback; answering it from memory only", "err", err)
		return durableMemory
	}
	if cb.journaled() { // the row committed meanwhile: the record is not needed
		p.spill.moved(cb.journalID)
	}
	return durableSpill
}

// replaySpill takes up the callbacks a previous run left in the spill,
// oldest first, before any new callback: they are held in memory without a
// journal row, so the journal keeper moves them into PostgreSQL as soon as
// it can, and their lookups start at once (their earlier deadlines put them
// first in the fetch queue). It returns how many it took.
func (p *pipeline) replaySpill(rows []journalRow) int {
	n := 0
	for _, r := range rows {
		cb := newCallback(r.receivedAt, dedupe(r.objectIDs))
		cb.journalID = r.journalID
		if p.adopt(cb) == nil {
			p.start(cb)
			n++
		}
	}
	return n
}

// spillMoved marks as moved the spill records of the callbacks in memory
// whose journal row has committed since they were spilled (by the journal
// writer, late, or by the journal keeper).
func (p *pipeline) spillMoved() {
	ids := p.spill.pending()
	if len(ids) == 0 {
		return
	}
	var done []int64
	p.mu.Lock()
	for _, id := range ids {
		if cb, ok := p.held[id]; ok && cb.journaled() {
			done = append(done, id)
		}
	}
	p.mu.Unlock()
	p.spill.moved(done...)
}

// resume takes over journal rows that the journal keeper claimed and starts
// them; it returns how many it took (a row already in memory is skipped).
// Claimed rows are taken even past the backlog bound: the keeper only claims
// what fits, and a claimed row must not be left unworked under this
// instance's lease.
func (p *pipeline) resume(rows []journalRow) int {
	n := 0
	for _, r := range rows {
		cb := resumed(r)
		if p.adopt(cb) == nil {
			p.start(cb)
			n++
		}
	}
	return n
}

// admit takes a new callback into memory unless the backlog is full.
func (p *pipeline) admit(cb *callback) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.held) >= p.cfg.maxBacklog || p.heldIDs+len(cb.objectIDs) > p.cfg.maxBacklogIDs {
		return errBacklogFull
	}
	return p.hold(cb)
}

// adopt takes a resumed callback into memory whatever the backlog.
func (p *pipeline) adopt(cb *callback) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.hold(cb)
}

// hold adds cb to the callbacks in memory; p.mu is held.
func (p *pipeline) hold(cb *callback) error {
	if err := p.put(cb); err != nil {
		return err
	}
	p.wg.Add(1)
	return nil
}

// put records cb among the callbacks in memory; p.mu is held.
func (p *pipeline) put(cb *callback) error {
	if _, dup := p.held[cb.journalID]; dup {
		return errDuplicate
	}
	p.held[cb.journalID] = cb
	p.heldIDs += len(cb.objectIDs)
	p.metrics.callbacksInMemory.Set(int64(len(p.held)))
	p.metrics.idsInMemory.Set(int64(p.heldIDs))
	return nil
}

// restore puts back a callback that forget took out while its goroutine
// goes on (recoverCallback), unless it was taken over meanwhile.
func (p *pipeline) restore(cb *callback) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.put(cb)
}

// journal writes cb's journal row, whose write the caller has begun
// (cb.beginJournal), waiting for it at most -journal-timeout. A write still
// in progress then goes on; the callback is answered anyway, since the
// sender gives up after 1s, and the late commit is counted.
func (p *pipeline) journal(cb *callback) bool {
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.journalTimeout)
	defer cancel()
	p.writer.journal(ctx, cb)
	return !cb.answerEarly() && cb.journaled()
}

// warnMemoryOnly logs, once per change of state, that callbacks are being
// answered with neither a committed journal row nor a spill record.
func (p *pipeline) warnMemoryOnly() {
	if p.memoryOnlyTold.Swap(true) {
		return
	}
	state := "up"
	if err := p.db.ready(); err != nil {
		state = err.Error()
	}
	p.log.Warn("callbacks answered with neither a journal row nor a spill record (a crash would lose them); they are journaled as soon as the database allows", "database", state)
}

// unjournaled takes the callbacks in memory that have no journal row and no
// write in progress, oldest first, marking a write begun on each: the
// journal keeper writes them as soon as the database is back.
func (p *pipeline) unjournaled() []*callback {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []*callback
	for _, cb := range p.held {
		if cb.beginJournal() {
			out = append(out, cb)
		}
	}
	slices.SortFunc(out, func(a, b *callback) int { return a.receivedAt.Compare(b.receivedAt) })
	return out
}

// memoryOnly counts the callbacks in memory with neither a journal row nor
// a spill record.
func (p *pipeline) memoryOnly() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, cb := range p.held {
		if !cb.journaled() && !p.spill.has(cb.journalID) {
			n++
		}
	}
	return n
}

// setMemoryOnly records how many callbacks are in memory without a journal
// row; once none are, the next episode is logged again.
func (p *pipeline) setMemoryOnly(n int) {
	p.metrics.callbacksMemoryOnly.Set(int64(n))
	if n == 0 && p.memoryOnlyTold.Swap(false) {
		p.log.Info("every callback in memory has its journal row again")
	}
}

// full says whether the backlog has no room for another callback, whatever
// its ids: the handler asks before it reads a body, so that past capacity a
// full backlog costs a 503 and not a decode. (admit decides for the ids.)
func (p *pipeline) full() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.held) >= p.cfg.maxBacklog || p.heldIDs >= p.cfg.maxBacklogIDs
}

// room is how many more callbacks fit in the backlog.
func (p *pipeline) room() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return max(0, p.cfg.maxBacklog-len(p.held))
}

func (p *pipeline) forget(cb *callback) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.held[cb.journalID]; !ok {
		return
	}
	delete(p.held, cb.journalID)
	p.heldIDs -= len(cb.objectIDs)
	p.metrics.callbacksInMemory.Set(int64(len(p.held)))
	p.metrics.idsInMemory.Set(int64(p.heldIDs))
}

// stopped says whether the grace period after SIGTERM is over.
func (p *pipeline) stopped() bool { return p.ctx.Err() != nil }

// start begins the lookups of an admitted callback. It does not wait for
// them: the last lookup to end starts finish in a goroutine of its own.
func (p *pipeline) start(cb *callback) {
	defer func() {
		if r := recover(); r != nil {
			p.guard.panicked("start lookups", r)
			if cb.claimFinish() {
				go p.recoverPanicked(cb)
			}
		}
	}()
	p.fetcher.lookupAll(p.ctx, cb, func() { go p.finish(cb) })
}

// finish applies a callback whose lookups have all ended, which has written
// its online objects, by deleting its journal row; it returns without
// forgetting cb when shutdown cut it short, so drain can park it.
func (p *pipeline) finish(cb *callback) {
	if !cb.claimFinish() {
		return // its lookups panicked and it is being parked (start)
	}
	defer p.wg.Done()
	defer func() {
		if r := recover(); r != nil {
			p.guard.panicked("process callback", r)
			p.recoverCallback(cb)
		}
	}()
	// Every lookup ends, shutdown included: an aborted one is delivered as
	// resultAborted.
	if p.ctx.Err() != nil {
		return
	}
	if cb.aborted() {
		// A lookup ended without an answer though nothing is shutting down
		// (it panicked): give the callback back to the journal for a retry.
		p.recoverCallback(cb)
		return
	}
	if p.beforeApply != nil {
		p.beforeApply(cb)
	}
	if cb.closeJournal(p.ctx) != nil {
		return
	}
	switch err := p.writer.complete(p.ctx, cb); {
	case err == nil:
		p.metrics.completion.Observe(time.Since(cb.receivedAt).Seconds())
	case errors.Is(err, errExpired):
		p.log.Debug("callback expired before it could be applied", "journal_id", cb.journalID, "received_at", cb.receivedAt)
	default: // aborted by shutdown
		return
	}
	p.spill.moved(cb.journalID) // applied: a spill record of it is spent
	p.forget(cb)
}

// recoverPanicked parks a callback whose lookups panicked as they started.
func (p *pipeline) recoverPanicked(cb *callback) {
	defer p.wg.Done()
	defer p.guard.catch("park callback")
	p.recoverCallback(cb)
}

// Parking a callback whose processing panicked: each attempt is bounded by
// recoverTimeout; a failed one (the database is away) is retried after a
// backoff that grows from recoverRetryMin to recoverRetryMax, so a long
// outage costs a try every couple of seconds.
const (
	recoverTimeout  = 2 * time.Second
	recoverRetryMin = 100 * time.Millisecond
	recoverRetryMax = 2 * time.Second
)

// recoverCallback hands a callback whose processing panicked back to the
// journal with an expired lease, so that it is replayed from the start
// (here or by another instance) rather than lost. A failed park is retried
// until the callback's deadline; between attempts the callback is in
// memory, so that a shutdown parks it with the rest. A panic that repeats
// does not spin: each replay waits for the journal keeper to take the row
// over.
func (p *pipeline) recoverCallback(cb *callback) {
	// A journal write still in progress could commit after the park and
	// take the row back under this instance's lease, where no one would
	// work it: wait for it first.
	if cb.closeJournal(p.ctx) != nil {
		return
	}
	deadline := cb.receivedAt.Add(p.cfg.ttl)
	backoff := recoverRetryMin
	for {
		// Out of memory before the park commits: the journal keeper may
		// take the parked row over at once, and must then be able to
		// adopt it.
		p.forget(cb)
		ctx, cancel := context.WithTimeout(p.ctx, recoverTimeout)
		err := p.writer.park(ctx, []*callback{cb})
		cancel()
		if err == nil {
			p.spill.moved(cb.journalID) // in PostgreSQL now: a spill record of it is spent
			return
		}
		// A park whose commit went unheard may have landed and been
		// taken over: then the row is worked, and this is done.
		if p.restore(cb) != nil || p.ctx.Err() != nil {
			return
		}
		pause := jitter(backoff)
		if time.Now().Add(pause).After(deadline) {
			p.log.Error("could not journal a callback after a panic before its deadline; it is dropped", "journal_id", cb.journalID, "ids", len(cb.objectIDs), "err", err)
			p.metrics.callbacksExpired.Inc()
			p.forget(cb)
			return
		}
		p.guard.warn("could not journal a callback after a panic; retrying", "journal_id", cb.journalID, "err", err)
		if !sleep(p.ctx, pause) {
			return
		}
		backoff = min(2*backoff, recoverRetryMax)
	}
}

// unwindTimeout is how long drain waits, after aborting, for callbacks to
// notice and stop.
const unwindTimeout = 5 * time.Second

// drain waits for the callbacks in memory until ctx ends, then aborts the
// rest and reports how many are left unfinished.
func (p *pipeline) drain(ctx context.Context) int {
	done := make(chan struct{})
	go func() {
		defer p.guard.catch("drain")
		p.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		p.abort()
		select {
		case <-done:
		case <-time.After(unwindTimeout):
			p.log.Warn("callbacks still unwinding after abort")
		}
	}
	p.abort()
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.held)
}

// unfinished lists the callbacks still in memory.
func (p *pipeline) unfinished() []*callback {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]*callback, 0, len(p.held))
	for _, cb := range p.held {
		out = append(out, cb)
	}
	return out
}
