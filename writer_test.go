package main

import (
	"context"
	"errors"
	"testing"
	"time"
)

// resolved is a callback whose lookups are done: even ids online.
func resolved(receivedAt time.Time, ids ...int64) *callback {
	cb := newCallback(at(receivedAt), dedupe(ids))
	for i, id := range cb.objectIDs {
		cb.results[i].Store(uint32(resultOffline))
		if id%2 == 0 {
			cb.results[i].Store(uint32(resultOnline))
		}
	}
	return cb
}

// completeNow applies callbacks as one batch of the apply writer and
// returns what each request was answered.
func completeNow(t *testing.T, w *writer, cbs ...*callback) []error {
	t.Helper()
	reqs := make([]*writeReq, len(cbs))
	for i, cb := range cbs {
		reqs[i] = &writeReq{cb: cb, online: cb.takeOnline(), completes: true, done: make(chan error, 1)}
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

func TestApplyKeepsLatestTimeAndOnlyOnline(t *testing.T) {
	a := dbApp(t)
	db := openDB(t, a.cfg.dsn)
	t0 := at(time.Now().Add(-5 * time.Second))

	// One batch naming id 2 twice must not trip "ON CONFLICT DO UPDATE
	// command cannot affect row a second time", and keeps the later time.
	completeNow(t, a.writer, resolved(t0.Add(time.Second), 2, 3), resolved(t0, 2, 4, 5))
	// A late result for an earlier callback never moves a row back.
	completeNow(t, a.writer, resolved(t0.Add(-time.Second), 2, 4))

	wantObjects(t, db, map[int64]time.Time{2: t0.Add(time.Second), 4: t0})
	if n := a.metrics.rowsUpserted.Value(); n != 2 {
		t.Errorf("rows upserted %d, want 2 (the late update changes nothing)", n)
	}
}

func TestApplyDeletesJournalRowAndSkipsExpired(t *testing.T) {
	a := dbApp(t, "-ttl", "10s")
	db := openDB(t, a.cfg.dsn)
	fresh := resolved(time.Now(), 2)
	stale := resolved(time.Now().Add(-11*time.Second), 4)
	if err := a.writer.park(context.Background(), []*callback{fresh, stale}); err != nil {
		t.Fatal(err)
	}
	if n := journalDepth(t, db); n != 2 {
		t.Fatalf("journal depth %d, want 2", n)
	}
	errs := completeNow(t, a.writer, fresh, stale)
	if errs[0] != nil || !errors.Is(errs[1], errExpired) {
		t.Errorf("answers %v, want [nil, expired]", errs)
	}
	if n := journalDepth(t, db); n != 0 {
		t.Errorf("journal depth %d after apply, want 0", n)
	}
	got := objectsIn(t, db)
	if _, ok := got[4]; ok || len(got) != 1 {
		t.Errorf("rows %v, want only id 2 (id 4's callback is past the TTL)", got)
	}
	if n := a.metrics.idsDropped.Value(); n != 1 {
		t.Errorf("ids dropped %d, want 1", n)
	}
}
