package main

import (
	"context"
	"errors"
	"testing"
	"time"
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
