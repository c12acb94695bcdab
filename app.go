package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// app is the whole service wired together: run() builds it, and so do the
// tests, so there is one wiring. Components are built in the order of the
// callback path; start and shutdown are the one place that orders the
// background work.
type app struct {
	cfg     config
	log     *slog.Logger
	metrics *metrics
	guard   *guard

	db      *database
	spill   *spill
	replay  spillReplay // what the spill held at start, taken up by start
	store   *store
	writer  *writer
	fetcher *fetcher
	limiter *fetchLimiter
	answers *answerLimiter
	pipe    *pipeline
	keeper  *journalKeeper
	reaper  *reaper

	// Background loops live until the pipeline has drained at shutdown.
	bg     context.Context
	stopBG context.CancelFunc
	loops  sync.WaitGroup
}

// newApp builds every component; nothing runs until start. A nil transport
// means the tuned transport to the object service.
func newApp(cfg config, log *slog.Logger, transport http.RoundTripper) (*app, error) {
	m := newMetrics()
	g := &guard{log: log, metrics: m}
	// The spill first: a directory another process holds stops the start
	// before anything else is opened.
	sp, replay, err := openSpill(cfg.spillDir, cfg.ttl, log, m, g)
	if err != nil {
		return nil, err
	}
	db, err := openDatabase(cfg, log, m)
	if err != nil {
		_ = sp.close()
		return nil, err
	}
	a := &app{cfg: cfg, log: log, metrics: m, guard: g, db: db, spill: sp, replay: replay}
	a.store = newStore(db, m)
	a.writer = newWriter(cfg, a.store, db, m, g)
	a.fetcher = newFetcher(cfg, transport, a.writer.upsert, log, m, g)
	a.limiter = newFetchLimiter(a.fetcher.slots, &a.fetcher.meter, &a.fetcher.waiting, a.writer.lag.take, m)
	a.limiter.probing = a.fetcher.upstream.isDown
	a.answers = newAnswerLimiter(cfg.journalTimeout/answerTargetShare, m)
	a.pipe = newPipeline(cfg, a.fetcher, a.writer, newAdmission(cfg, a.fetcher, a.limiter, m), db, sp, log, m, g)
	a.keeper = newJournalKeeper(cfg, a.store, db, a.pipe, log, m, g)
	a.reaper = newReaper(cfg, a.store, db, log, m, g)
	a.bg, a.stopBG = context.WithCancel(context.Background())
	return a, nil
}

// handler is the HTTP surface (routes in handler.go).
func (a *app) handler() http.Handler {
	return routes(a.cfg, a.pipe, a.answers, a.db, a.metrics, a.log, a.guard)
}

// start takes up what the spill held at start, then runs the background
// loops: the database check first (the writers wait for its first outcome),
// then the writers the callback path needs, then the loops that tune, reap
// and keep the journal. The caller serves callbacks only after start.
func (a *app) start() {
	if r := a.replay; len(r.rows) > 0 || r.corrupt > 0 || r.expired > 0 {
		n := a.pipe.replaySpill(r.rows)
		a.log.Info("replayed the spill left by the previous run", "dir", a.cfg.spillDir, "callbacks", n,
			"expired", r.expired, "corrupt", r.corrupt, "torn_tails_cut", r.cut)
	}
	a.replay = spillReplay{}
	a.loop("database", a.db.keepConnected)
	for i := range journalWriters {
		a.loop("journal-writer", func(ctx context.Context) { a.writer.runJournalWriter(ctx, i) })
	}
	for range applyWriters {
		a.loop("apply-writer", a.writer.runApplyWriter)
	}
	// The fetch queue lives as long as the pipeline: when the grace period
	// after SIGTERM is over, it aborts what is queued.
	a.loop("fetch-dispatch", func(context.Context) { a.fetcher.run(a.pipe.ctx) })
	a.loop("fetch-limit", a.limiter.run)
	a.loop("object-service-health", a.fetcher.upstream.run)
	a.loop("answer-limit", a.answers.run)
	a.loop("reaper", a.reaper.run)
	a.loop("journal", a.keeper.run)
}

// loop runs fn in a goroutine of its own under the panic guard until
// shutdown.
func (a *app) loop(name string, fn func(context.Context)) {
	a.loops.Add(1)
	go func() {
		defer a.loops.Done()
		a.guard.loop(a.bg, name, fn)
	}()
}

// parkTimeout bounds journaling what the grace period did not finish.
const parkTimeout = 3 * time.Second

// shutdown lets the callbacks in memory finish until ctx ends (the grace
// period), journals whatever is left for the next start (in PostgreSQL, or
// else in the spill), then stops the background loops and closes the
// database and the spill. The HTTP server must already have stopped taking
// callbacks. It fails only when some accepted callbacks could be made
// durable in neither store: they are lost.
func (a *app) shutdown(ctx context.Context) error {
	defer a.close()
	left := a.pipe.drain(ctx)
	if left == 0 {
		return nil
	}
	cbs := a.pipe.unfinished()
	parkCtx, cancel := context.WithTimeout(context.Background(), parkTimeout)
	err := a.writer.park(parkCtx, cbs)
	cancel()
	if err == nil {
		a.log.Warn("grace period over, leaving callbacks in the journal", "callbacks", left)
		ids := make([]int64, len(cbs))
		for i, cb := range cbs {
			ids[i] = cb.journalID
		}
		a.spill.moved(ids...)
		return nil
	}
	// PostgreSQL did not take them: those with a journal row or a spill
	// record are safe; spill the rest.
	var rows []journalRow
	for _, cb := range cbs {
		if !cb.journaled() && !a.spill.has(cb.journalID) {
			rows = append(rows, cb.journalRow())
		}
	}
	spillCtx, cancel := context.WithTimeout(context.Background(), parkTimeout)
	lost := a.spillAll(spillCtx, rows)
	cancel()
	if lost > 0 {
		a.log.Error("could not journal unfinished callbacks in PostgreSQL nor in the spill; they are lost", "callbacks", left, "lost", lost, "err", err)
		return fmt.Errorf("%d accepted callbacks lost at shutdown: neither PostgreSQL nor the spill in %s took them", lost, a.cfg.spillDir)
	}
	a.log.Warn("grace period over and PostgreSQL unavailable: leaving callbacks in the spill (and the journal rows they have) for the next start", "callbacks", left, "spilled_now", len(rows), "dir", a.cfg.spillDir, "err", err)
	return nil
}

// spillAll appends rows to the spill at once, so that they share fsyncs, and
// returns how many it could not make durable.
func (a *app) spillAll(ctx context.Context, rows []journalRow) int {
	var lost atomic.Int64
	var wg sync.WaitGroup
	for _, r := range rows {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer a.guard.catch("spill at shutdown")
			if err := a.spill.append(ctx, r); err != nil {
				lost.Add(1)
			}
		}()
	}
	wg.Wait()
	return int(lost.Load())
}

// close stops the background loops and closes the database; tests that
// never started the app call it too.
func (a *app) close() {
	a.pipe.abort()
	a.stopBG()
	a.loops.Wait()
	a.store.close()
	_ = a.db.close()
	if err := a.spill.close(); err != nil {
		a.log.Warn("closing the spill failed", "dir", a.cfg.spillDir, "err", err)
	}
}
