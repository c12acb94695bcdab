package main

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lib/pq"
)

// applyNow runs writes as one batch of the apply writer and returns what
// each was answered.
func applyNow(t *testing.T, w *writer, reqs ...*writeReq) []error {
	t.Helper()
	for _, r := range reqs {
		r.done = make(chan error, 1)
	}
	if err := w.applyBatch(context.Background(), reqs); err != nil {
		t.Fatalf("apply: %v", err)
	}
	errs := make([]error, len(reqs))
	for i, r := range reqs {
		errs[i] = <-r.done
	}
	return errs
}

func upsertReq(id int64, lastSeen time.Time) *writeReq {
	return &writeReq{objects: []objectRow{{id, at(lastSeen)}}, newest: at(lastSeen)}
}

func TestApplyKeepsLatestTime(t *testing.T) {
	a := dbApp(t)
	db := openDB(t, a.cfg.dsn)
	t0 := at(time.Now().Add(-5 * time.Second))

	// One batch naming id 2 twice (two flights of it ended together) must
	// not trip "ON CONFLICT DO UPDATE command cannot affect row a second
	// time", and keeps the later time.
	applyNow(t, a.writer, upsertReq(2, t0.Add(time.Second)), upsertReq(2, t0), upsertReq(4, t0))
	// A late result for an earlier callback never moves a row back.
	applyNow(t, a.writer, upsertReq(2, t0.Add(-time.Second)), upsertReq(4, t0.Add(-time.Second)))

	wantObjects(t, db, map[int64]time.Time{2: t0.Add(time.Second), 4: t0})
	if n := a.metrics.rowsUpserted.Value(); n != 2 {
		t.Errorf("rows upserted %d, want 2 (the late update changes nothing)", n)
	}
}

// A finished callback's journal row goes, whatever its age; an object last
// seen before the TTL is left out, since the reaper would delete it at once.
func TestApplyDeletesJournalRowAndSkipsExpired(t *testing.T) {
	a := dbApp(t, "-ttl", "10s")
	db := openDB(t, a.cfg.dsn)
	now, old := time.Now(), time.Now().Add(-11*time.Second)
	fresh := newCallback(at(now), []int64{2})
	stale := newCallback(at(old), []int64{4})
	if err := a.writer.park(context.Background(), []*callback{fresh, stale}); err != nil {
		t.Fatal(err)
	}
	if n := journalDepth(t, db); n != 2 {
		t.Fatalf("journal depth %d, want 2", n)
	}
	errs := applyNow(t, a.writer, &writeReq{cb: fresh}, &writeReq{cb: stale}, upsertReq(2, now), upsertReq(4, old))
	if errs[0] != nil || !errors.Is(errs[1], errExpired) || errs[2] != nil || !errors.Is(errs[3], errExpired) {
		t.Errorf("answers %v, want [nil, expired, nil, expired]", errs)
	}
	if n := journalDepth(t, db); n != 0 {
		t.Errorf("journal depth %d after apply, want 0", n)
	}
	got := objectsIn(t, db)
	if _, ok := got[4]; ok || len(got) != 1 {
		t.Errorf("rows %v, want only id 2 (id 4 is past the TTL)", got)
	}
	if a.metrics.callbacksApplied.Value() != 1 || a.metrics.callbacksExpired.Value() != 1 {
		t.Errorf("callbacks applied %d, expired %d; want 1 and 1", a.metrics.callbacksApplied.Value(), a.metrics.callbacksExpired.Value())
	}
}

// panicOnce connects to PostgreSQL, except that its first connection
// attempt panics, as a bug in a driver or in a batch's statement would.
type panicOnce struct {
	driver.Connector
	fired atomic.Bool
}

func (p *panicOnce) Connect(ctx context.Context) (driver.Conn, error) {
	if p.fired.CompareAndSwap(false, true) {
		panic("test: connect panics")
	}
	return p.Connector.Connect(ctx)
}

// panicOncePool is a pool to the test's database whose first connection
// attempt panics; the pool it replaces is closed when the test ends.
func panicOncePool(t *testing.T, dsn string, replaced *sql.DB) *sql.DB {
	t.Helper()
	conn, err := pq.NewConnector(dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { replaced.Close() })
	return sql.OpenDB(&panicOnce{Connector: conn})
}

// A panic while a journal batch is written is a failed attempt: the
// writer retries it and answers the request, and the callback is not left
// marked as being journaled (which would hold its apply for good).
func TestPanicInJournalBatchIsRetried(t *testing.T) {
	a := dbApp(t)
	db := openDB(t, a.cfg.dsn)
	a.db.journal = panicOncePool(t, a.cfg.dsn, a.db.journal)
	a.loop("journal-writer", func(ctx context.Context) { a.writer.runJournalWriter(ctx, 0) })

	cb := newCallback(at(time.Now()), []int64{2})
	cb.beginJournal()
	// Retried within journalRetryMax of the panic; the bound is the TTL.
	ctx, cancel := context.WithTimeout(context.Background(), landWithin)
	defer cancel()
	a.writer.journal(ctx, cb)
	if !cb.journaled() {
		t.Fatalf("journal write after a panic: not committed (%v)", ctx.Err())
	}
	if err := cb.closeJournal(ctx); err != nil {
		t.Errorf("closing the journal after a panicked write: %v", err)
	}
	if n := a.metrics.panics.Value(); n != 1 {
		t.Errorf("panics recovered %d, want 1", n)
	}
	if n := journalDepth(t, db); n != 1 {
		t.Errorf("journal depth %d, want 1", n)
	}
}

// A panic while an apply batch is written is a failed attempt: the writer
// retries it and answers. A save left unanswered would keep the fetcher's
// saver busy for good, and no online row would be written again.
func TestPanicInApplyBatchIsRetried(t *testing.T) {
	a := dbApp(t)
	db := openDB(t, a.cfg.dsn)
	a.db.main = panicOncePool(t, a.cfg.dsn, a.db.main)
	a.loop("apply-writer", a.writer.runApplyWriter)

	now := at(time.Now())
	// Retried within applyRetryMax of the panic; the bound is the TTL.
	ctx, cancel := context.WithTimeout(context.Background(), landWithin)
	defer cancel()
	if err := a.writer.upsert(ctx, []objectRow{{2, now}}); err != nil {
		t.Fatalf("upsert after a panic: %v", err)
	}
	wantObjects(t, db, map[int64]time.Time{2: now})
	if n := a.metrics.panics.Value(); n != 1 {
		t.Errorf("panics recovered %d, want 1", n)
	}
	// The writer goes on: a second write is answered too.
	if err := a.writer.upsert(ctx, []objectRow{{4, now}}); err != nil {
		t.Fatalf("second upsert: %v", err)
	}
	wantObjects(t, db, map[int64]time.Time{2: now, 4: now})
}
