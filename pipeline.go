package main

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// callback is one accepted callback on its way to the table.
type callback struct {
	id         int64     // journal row id, random so instances never collide
	receivedAt time.Time // becomes last_seen; the service's wall clock, µs precision
	ids        []int64   // sorted, without duplicates

	// The journal state, guarded by jmu: the handler, the journal writer,
	// the journal keeper and the callback's own processing all look at it.
	jmu      sync.Mutex
	jstate   journalState
	jwait    chan struct{} // closed when a write in progress ends
	answered bool          // the handler answered while the write was in progress

	// results[i] is set once, by the lookup of ids[i], and read while other
	// lookups are still landing, hence atomic.
	results []atomic.Uint32
	// written[i] says ids[i] went to the table in an early flush; only the
	// goroutine processing the callback touches it.
	written []bool
}

// result is what a lookup of one id came to.
type result uint8

const (
	resultPending result = iota
	resultOnline
	resultOffline
	resultExpired // no answer before the callback's deadline
	resultAborted // shutdown: the callback stays in the journal
)

// journalState is where a callback's journal row stands.
type journalState uint8

const (
	journalMissing journalState = iota // in memory only: no row committed yet
	journalWriting                     // a write is in progress
	journalWritten                     // the row is committed
	journalClosed                      // applied without a row: never write one now
)

// beginJournal marks a write as in progress, unless the callback already has
// a row, has a write under way, or is being applied.
func (cb *callback) beginJournal() bool {
	cb.jmu.Lock()
	defer cb.jmu.Unlock()
	if cb.jstate != journalMissing {
		return false
	}
	cb.jstate = journalWriting
	cb.jwait = make(chan struct{})
	return true
}

// endJournal records the outcome of the write begun by beginJournal and says
// whether the handler had already answered.
func (cb *callback) endJournal(committed bool) (answeredBefore bool) {
	cb.jmu.Lock()
	defer cb.jmu.Unlock()
	cb.jstate = journalMissing
	if committed {
		cb.jstate = journalWritten
	}
	close(cb.jwait)
	cb.jwait = nil
	answered := cb.answered
	cb.answered = false
	return answered
}

// answerEarly is called when the answer deadline passes: if the write is
// still in progress it goes on, and its outcome is counted as late.
func (cb *callback) answerEarly() bool {
	cb.jmu.Lock()
	defer cb.jmu.Unlock()
	if cb.jstate != journalWriting {
		return false
	}
	cb.answered = true
	return true
}

// journaled says whether the callback's row is committed.
func (cb *callback) journaled() bool {
	cb.jmu.Lock()
	defer cb.jmu.Unlock()
	return cb.jstate == journalWritten
}

// closeJournal is called before the apply that would delete the callback's
// journal row. It waits for a write in progress, so that a late insert can
// never land after that delete and leave a stray row, and stops a callback
// that has no row from getting one.
func (cb *callback) closeJournal(ctx context.Context) error {
	cb.jmu.Lock()
	for cb.jstate == journalWriting {
		w := cb.jwait
		cb.jmu.Unlock()
		select {
		case <-w:
		case <-ctx.Done():
			return ctx.Err()
		}
		cb.jmu.Lock()
	}
	if cb.jstate == journalMissing {
		cb.jstate = journalClosed
	}
	cb.jmu.Unlock()
	return nil
}

func newCallback(receivedAt time.Time, ids []int64) *callback {
	return &callback{
		id:         rand.Int64(),
		receivedAt: receivedAt,
		ids:        ids,
		results:    make([]atomic.Uint32, len(ids)),
		written:    make([]bool, len(ids)),
	}
}

func (cb *callback) result(i int) result { return result(cb.results[i].Load()) }

// takeOnline returns the ids found online and not yet written, and marks
// them written.
func (cb *callback) takeOnline() []int64 {
	var out []int64
	for i := range cb.ids {
		if !cb.written[i] && cb.result(i) == resultOnline {
			cb.written[i] = true
			out = append(out, cb.ids[i])
		}
	}
	return out
}

// aborted says whether some lookup ended without an answer.
func (cb *callback) aborted() bool {
	for i := range cb.ids {
		if cb.result(i) == resultAborted {
			return true
		}
	}
	return false
}

// dedupe sorts ids and removes repeats in place.
func dedupe(ids []int64) []int64 {
	slices.Sort(ids)
	return slices.Compact(ids)
}

var errBacklogFull = errors.New("backlog full")

// pipeline owns every callback held in memory, from acceptance to the commit
// that applies it, and bounds how many there are.
type pipeline struct {
	cfg     config
	fetcher *Fetcher
	store   *Store
	log     *slog.Logger
	metrics *metrics
	guard   *guard

	// ctx ends when the grace period after SIGTERM is over: fetches and
	// writes stop and what is left is parked in the journal.
	ctx   context.Context
	abort context.CancelFunc

	memoryOnlyTold atomic.Bool // the memory-only state has been logged

	wg      sync.WaitGroup // one per callback in memory
	mu      sync.Mutex
	held    map[int64]*callback // by journal id
	heldIDs int
}

func newPipeline(cfg config, f *Fetcher, s *Store, log *slog.Logger, m *metrics, g *guard) *pipeline {
	ctx, abort := context.WithCancel(context.Background())
	return &pipeline{
		cfg: cfg, fetcher: f, store: s, log: log, metrics: m, guard: g,
		ctx: ctx, abort: abort,
		held: make(map[int64]*callback),
	}
}

// admit takes cb into memory unless the backlog is full. Replayed journal
// rows are forced in: the journal keeper only claims what fits, and a row it
// claimed must not be left with a lease nobody renews.
func (p *pipeline) admit(cb *callback, force bool) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, dup := p.held[cb.id]; dup {
		return errDuplicate
	}
	if !force && (len(p.held) >= p.cfg.maxBacklog || p.heldIDs+len(cb.ids) > p.cfg.maxBacklogIDs) {
		return errBacklogFull
	}
	p.held[cb.id] = cb
	p.heldIDs += len(cb.ids)
	p.wg.Add(1)
	p.metrics.callbacksInMemory.Set(int64(len(p.held)))
	p.metrics.idsInMemory.Set(int64(p.heldIDs))
	return nil
}

var errDuplicate = errors.New("callback already in memory")

// accepted is what the sender is told about an accepted callback.
type accepted struct {
	journalID int64
	journaled bool // its journal row was committed before the answer
}

// accept takes a callback received at receivedAt into the pipeline: admit
// (or errBacklogFull), journal, start its lookups. The journal comes before
// any fetch work for the callback.
func (p *pipeline) accept(receivedAt time.Time, ids []int64) (accepted, error) {
	cb := newCallback(receivedAt, ids)
	if err := p.admit(cb, false); err != nil {
		return accepted{}, err
	}
	journaled := p.journal(cb)
	if !journaled {
		p.metrics.journalFailures.Inc()
		p.warnMemoryOnly()
	}
	p.start(cb)
	return accepted{journalID: cb.id, journaled: journaled}, nil
}

// journal writes cb's journal row, waiting for it at most -journal-timeout.
// A write still in progress then goes on; the callback is answered anyway,
// since the sender gives up after 1s, and the late commit is counted.
func (p *pipeline) journal(cb *callback) bool {
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.journalTimeout)
	defer cancel()
	cb.beginJournal()
	p.store.Journal(ctx, cb)
	return !cb.answerEarly() && cb.journaled()
}

// warnMemoryOnly logs, once per change of state, that callbacks are being
// answered without a committed journal row.
func (p *pipeline) warnMemoryOnly() {
	if p.memoryOnlyTold.Swap(true) {
		return
	}
	p.log.Warn("callbacks answered before their journal row was committed; they are journaled as soon as the database allows", "database", errString(p.store.Ready()))
}

func errString(err error) string {
	if err == nil {
		return "up"
	}
	return err.Error()
}

// unjournaled takes the callbacks in memory that have no journal row and no
// write in progress, marking a write begun on each: the journal keeper
// writes them as soon as the database is back.
func (p *pipeline) unjournaled() []*callback {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []*callback
	for _, cb := range p.held {
		if cb.beginJournal() {
			out = append(out, cb)
		}
	}
	return out
}

// memoryOnly counts the callbacks in memory without a journal row.
func (p *pipeline) memoryOnly() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, cb := range p.held {
		if !cb.journaled() {
			n++
		}
	}
	return n
}

// setMemoryOnly records how many callbacks are in memory without a journal
// row; once none are, the next episode is logged again.
func (p *pipeline) setMemoryOnly(memoryOnly int) {
	p.metrics.callbacksMemoryOnly.Set(int64(memoryOnly))
	if memoryOnly == 0 && p.memoryOnlyTold.Swap(false) {
		p.log.Info("every callback in memory has its journal row again")
	}
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
	if _, ok := p.held[cb.id]; !ok {
		return
	}
	delete(p.held, cb.id)
	p.heldIDs -= len(cb.ids)
	p.metrics.callbacksInMemory.Set(int64(len(p.held)))
	p.metrics.idsInMemory.Set(int64(p.heldIDs))
}

// heldJournalIDs lists the journal rows this instance is working on, whose
// leases it must keep renewing.
func (p *pipeline) heldJournalIDs() []int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	ids := make([]int64, 0, len(p.held))
	for id := range p.held {
		ids = append(ids, id)
	}
	return ids
}

// stopped says whether the grace period after SIGTERM is over.
func (p *pipeline) stopped() bool { return p.ctx.Err() != nil }

// start processes an admitted callback in its own goroutine.
func (p *pipeline) start(cb *callback) {
	go p.process(cb)
}

// earlyFlush is how long a callback's finished lookups wait for its slowest
// one before they are written anyway, so that one hanging request does not
// hold back the other rows of its callback.
const earlyFlush = time.Second

// process looks up every id of cb and applies the online ones; it returns
// without forgetting cb when shutdown cut it short, so drain can park it.
func (p *pipeline) process(cb *callback) {
	defer p.wg.Done()
	defer func() {
		if r := recover(); r != nil {
			p.guard.panicked("process callback", r)
			p.recoverCallback(cb)
		}
	}()
	// The WaitGroup joins the callback's lookups; waiting on it in its own
	// goroutine lets this one flush early results meanwhile.
	var lookups sync.WaitGroup
	p.fetcher.lookupAll(p.ctx, cb, &lookups)
	done := make(chan struct{})
	go func() {
		defer p.guard.recover("wait for lookups")
		lookups.Wait()
		close(done)
	}()
	flush := time.NewTicker(earlyFlush)
	defer flush.Stop()
	for waiting := true; waiting; {
		select {
		case <-done:
			waiting = false
		case <-flush.C:
			if rows := cb.takeOnline(); len(rows) > 0 {
				// Upserts only: the journal row stays until the final apply.
				if err := p.store.Apply(p.ctx, cb, rows, false); p.ctx.Err() != nil {
					return
				} else if err != nil && !errors.Is(err, errExpired) {
					p.log.Warn("early flush failed", "journal_id", cb.id, "err", err)
				}
			}
		}
	}
	if p.ctx.Err() != nil {
		return
	}
	if cb.aborted() {
		// A lookup ended without an answer though nothing is shutting down
		// (it panicked): give the callback back to the journal for a retry.
		p.recoverCallback(cb)
		return
	}
	if cb.closeJournal(p.ctx) != nil {
		return
	}
	switch err := p.store.Apply(p.ctx, cb, cb.takeOnline(), true); {
	case err == nil:
		p.metrics.completion.Observe(time.Since(cb.receivedAt).Seconds())
	case errors.Is(err, errExpired):
		p.log.Debug("callback expired before it could be applied", "journal_id", cb.id, "received_at", cb.receivedAt)
	default: // aborted by shutdown
		return
	}
	p.forget(cb)
}

// recoverCallback hands a callback whose processing panicked back to the
// journal with an expired lease, so that it is replayed rather than lost.
func (p *pipeline) recoverCallback(cb *callback) {
	ctx, cancel := context.WithTimeout(p.ctx, 2*time.Second)
	defer cancel()
	if err := p.store.Park(ctx, []*callback{cb}); err != nil {
		p.log.Error("could not journal a callback after a panic; it is lost", "journal_id", cb.id, "ids", len(cb.ids), "err", err)
	}
	p.forget(cb)
}

// drain waits for the callbacks in memory until ctx ends, then aborts the
// rest and reports how many are left unfinished.
func (p *pipeline) drain(ctx context.Context) int {
	done := make(chan struct{})
	go func() {
		defer p.guard.recover("drain")
		p.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		p.abort()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
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
