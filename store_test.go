package main

import (
	"context"
	"errors"
	"testing"
	"time"
)

// dbParts are components on the test's own schema, with the schema applied.
func dbParts(t testing.TB, args ...string) *parts {
	t.Helper()
	dsn := testDSN(t)
	p := newParts(t, testConfig(t, append(args, "-dsn", dsn)...), nil)
	if err := p.store.applySchema(context.Background()); err != nil {
		t.Fatalf("apply schema: %v", err)
	}
	p.store.setUp(nil)
	return p
}

// resolved is a callback whose lookups are done: even ids online.
func resolved(at time.Time, ids ...int64) *callback {
	cb := newCallback(at.Round(0).Truncate(time.Microsecond), dedupe(ids))
	for i, id := range cb.ids {
		cb.results[i].Store(uint32(resultOffline))
		if id%2 == 0 {
			cb.results[i].Store(uint32(resultOnline))
		}
	}
	return cb
}

func applyNow(t *testing.T, s *Store, cbs ...*callback) []bool {
	t.Helper()
	reqs := make([]*storeReq, len(cbs))
	for i, cb := range cbs {
		reqs[i] = &storeReq{cb: cb, online: cb.takeOnline(), final: true}
	}
	_, expired, err := s.applyBatch(context.Background(), reqs)
	if err != nil {
		t.Fatalf("apply: %v", err)
	}
	return expired
}

func TestSchemaIsIdempotent(t *testing.T) {
	p := dbParts(t)
	for range 2 {
		if err := p.store.applySchema(context.Background()); err != nil {
			t.Fatalf("second apply: %v", err)
		}
	}
}

func TestApplyKeepsLatestTimeAndOnlyOnline(t *testing.T) {
	p := dbParts(t)
	db := openDB(t, testDSNOf(p))
	t0 := time.Now().Add(-5 * time.Second).Round(0).Truncate(time.Microsecond)

	// One batch naming id 2 twice must not trip "ON CONFLICT DO UPDATE
	// command cannot affect row a second time", and keeps the later time.
	applyNow(t, p.store, resolved(t0.Add(time.Second), 2, 3), resolved(t0, 2, 4, 5))
	// A late result for an earlier callback never moves a row back.
	applyNow(t, p.store, resolved(t0.Add(-time.Second), 2, 4))

	got := objectsIn(t, db)
	want := map[int64]time.Time{2: t0.Add(time.Second), 4: t0}
	if len(got) != len(want) {
		t.Fatalf("rows %v, want %v", got, want)
	}
	for id, at := range want {
		if !got[id].Equal(at) {
			t.Errorf("id %d: last_seen %s, want %s", id, got[id], at)
		}
	}
	if n := p.metrics.rowsUpserted.Value(); n != 2 {
		t.Errorf("rows upserted %d, want 2 (the late update changes nothing)", n)
	}
}

func TestApplyDeletesJournalRowAndSkipsExpired(t *testing.T) {
	p := dbParts(t, "-ttl", "10s")
	db := openDB(t, testDSNOf(p))
	fresh := resolved(time.Now(), 2)
	stale := resolved(time.Now().Add(-11*time.Second), 4)
	if err := p.store.insertJournal(context.Background(), p.store.db, []*callback{fresh, stale}, time.Now().Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if n := journalDepth(t, db); n != 2 {
		t.Fatalf("journal depth %d, want 2", n)
	}
	expired := applyNow(t, p.store, fresh, stale)
	if expired[0] || !expired[1] {
		t.Errorf("expired %v, want [false true]", expired)
	}
	if n := journalDepth(t, db); n != 0 {
		t.Errorf("journal depth %d after apply, want 0", n)
	}
	got := objectsIn(t, db)
	if _, ok := got[4]; ok || len(got) != 1 {
		t.Errorf("rows %v, want only id 2 (id 4's callback is past the TTL)", got)
	}
	if n := p.metrics.idsDropped.Value(); n != 1 {
		t.Errorf("ids dropped %d, want 1", n)
	}
}

func TestReapDeletesOnlyRowsOlderThanTTL(t *testing.T) {
	p := dbParts(t)
	db := openDB(t, testDSNOf(p))
	now := time.Now()
	if _, err := db.Exec(`INSERT INTO objects VALUES (1, $1), (2, $2), (3, $3)`,
		now.Add(-40*time.Second), now.Add(-31*time.Second), now.Add(-29*time.Second)); err != nil {
		t.Fatal(err)
	}
	n, err := p.store.Reap(context.Background(), now.Add(-30*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	got := objectsIn(t, db)
	if n != 2 || len(got) != 1 {
		t.Errorf("reaped %d, left %v; want 2 reaped and id 3 left", n, got)
	}
}

func TestReaperLoopRuns(t *testing.T) {
	p := dbParts(t, "-ttl", "1s", "-reap-every", "100ms")
	db := openDB(t, testDSNOf(p))
	applyNow(t, p.store, resolved(time.Now(), 2, 4))
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go newReaper(p.cfg, p.store, discardLogger(), p.metrics).run(ctx)
	eventually(t, 5*time.Second, "rows reaped", func() bool { return len(objectsIn(t, db)) == 0 })
	if n := p.metrics.rowsReaped.Value(); n != 2 {
		t.Errorf("rows reaped %d, want 2", n)
	}
}

func TestJournalLeaseClaimAndExpiry(t *testing.T) {
	p := dbParts(t, "-lease", "5s", "-ttl", "30s")
	db := openDB(t, testDSNOf(p))
	ctx := context.Background()
	other, err := newStore(p.cfg, discardLogger(), newMetrics()) // a second instance
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Close() })

	now := time.Now()
	cb := resolved(now, 1, 2, 3)
	if err := p.store.insertJournal(ctx, p.store.db, []*callback{cb}, now.Add(5*time.Second)); err != nil {
		t.Fatal(err)
	}
	claim := func(at time.Time) []*callback {
		t.Helper()
		got, err := other.Claim(ctx, at, 10)
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	if got := claim(now.Add(time.Second)); len(got) != 0 {
		t.Fatalf("claimed %d rows under a live lease", len(got))
	}
	// Renewal keeps the row: at now+6s it is still leased until now+8s.
	if err := p.store.RenewLeases(ctx, []int64{cb.id}, now.Add(8*time.Second)); err != nil {
		t.Fatal(err)
	}
	if got := claim(now.Add(6 * time.Second)); len(got) != 0 {
		t.Fatalf("claimed a renewed row")
	}
	got := claim(now.Add(9 * time.Second))
	if len(got) != 1 || got[0].id != cb.id || !got[0].receivedAt.Equal(cb.receivedAt) || len(got[0].ids) != 3 || !got[0].journaled() {
		t.Fatalf("claimed %+v, want the row with its time and ids", got)
	}
	if again := claim(now.Add(9 * time.Second)); len(again) != 0 {
		t.Fatalf("a claimed row was claimed again")
	}
	n, err := p.store.DropExpired(ctx, now.Add(time.Millisecond))
	if err != nil || n != 1 || journalDepth(t, db) != 0 {
		t.Errorf("drop expired: %d rows, %v; want 1 and an empty journal", n, err)
	}
}

func TestParkedCallbacksAreClaimableAtOnce(t *testing.T) {
	p := dbParts(t)
	ctx := context.Background()
	cb := resolved(time.Now(), 8)
	if err := p.store.insertJournal(ctx, p.store.db, []*callback{cb}, time.Now().Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	unjournaled := resolved(time.Now(), 10)
	if err := p.store.Park(ctx, []*callback{cb, unjournaled}); err != nil {
		t.Fatal(err)
	}
	got, err := p.store.Claim(ctx, time.Now(), 10)
	if err != nil || len(got) != 2 {
		t.Fatalf("claimed %d rows (%v), want both parked callbacks", len(got), err)
	}
}

// testDSNOf returns the DSN the parts were built with.
func testDSNOf(p *parts) string { return p.cfg.dsn }

// A journal write that comes while the first connection to PostgreSQL is
// still being made waits for its outcome (within its context) instead of
// failing at once, so the first callbacks after a start are journaled.
func TestJournalWaitsForTheFirstConnection(t *testing.T) {
	dsn := testDSN(t)
	p := newParts(t, testConfig(t, "-dsn", dsn), nil)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go p.store.runJournalWriter(ctx, 0)

	first := newCallback(time.Now(), []int64{1})
	done := make(chan struct{})
	go func() {
		jctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		first.beginJournal()
		p.store.Journal(jctx, first)
		close(done)
	}()
	time.Sleep(200 * time.Millisecond) // the connection attempt takes a while
	select {
	case <-done:
		t.Fatal("journal write returned before the first connection")
	default:
	}
	p.store.setUp(p.store.applySchema(ctx))
	<-done
	if !first.journaled() {
		t.Fatal("journal write after the first connection did not commit")
	}

	// Once the database is known to be down, writes fail at once.
	p.store.setUp(errors.New("down"))
	start := time.Now()
	jctx, cancel2 := context.WithTimeout(ctx, 5*time.Second)
	defer cancel2()
	second := newCallback(time.Now(), []int64{2})
	second.beginJournal()
	p.store.Journal(jctx, second)
	if second.journaled() || time.Since(start) > time.Second {
		t.Fatalf("journal write with the database down: journaled=%v after %s, want a fast failure", second.journaled(), time.Since(start))
	}
}
