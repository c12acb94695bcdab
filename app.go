package main

import (
	"context"
	"log/slog"
	"net/http"
	"sync"
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
	db, err := openDatabase(cfg, log, m)
	if err != nil {
		return nil, err
	}
	a := &app{cfg: cfg, log: log, metrics: m, guard: g, db: db}
	a.store = newStore(db, m)
	a.writer = newWriter(cfg, a.store, db, m, g)
	a.fetcher = newFetcher(cfg, transport, a.writer.upsert, log, m, g)
	a.limiter = newFetchLimiter(a.fetcher.slots, &a.fetcher.meter, &a.fetcher.waiting, a.writer.lag.take, m)
	a.limiter.probing = a.fetcher.upstream.isDown
	a.answers = newAnswerLimiter(cfg.journalTimeout/answerTargetShare, m)
	a.pipe = newPipeline(cfg, a.fetcher, a.writer, newAdmission(cfg, a.fetcher, a.limiter, m), db, log, m, g)
	a.keeper = newJournalKeeper(cfg, a.store, db, a.pipe, log, m, g)
	a.reaper = newReaper(cfg, a.store, db, log, m, g)
	a.bg, a.stopBG = context.WithCancel(context.Background())
	return a, nil
}

// handler is the HTTP surface (routes in handler.go).
func (a *app) handler() http.Handler {
	return routes(a.cfg, a.pipe, a.answers, a.db, a.metrics, a.log, a.guard)
}

// start runs the background loops: the database check first (the writers
// wait for its first outcome), then the writers the callback path needs,
// then the loops that tune, reap and keep the journal.
func (a *app) start() {
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
// period), journals whatever is left for the next start, then stops the
// background loops and closes the database. The HTTP server must already
// have stopped taking callbacks.
func (a *app) shutdown(ctx context.Context) {
	if left := a.pipe.drain(ctx); left > 0 {
		a.log.Warn("grace period over, leaving callbacks in the journal", "callbacks", left)
		parkCtx, cancel := context.WithTimeout(context.Background(), parkTimeout)
		err := a.writer.park(parkCtx, a.pipe.unfinished())
		cancel()
		if err != nil {
			a.log.Error("could not journal unfinished callbacks; they are lost", "callbacks", left, "err", err)
		}
	}
	a.close()
}

// close stops the background loops and closes the database; tests that
// never started the app call it too.
func (a *app) close() {
	a.pipe.abort()
	a.stopBG()
	a.loops.Wait()
	a.store.close()
	_ = a.db.close()
}
