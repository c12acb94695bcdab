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
	journaled  bool      // its journal row was written before it was acknowledged

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
