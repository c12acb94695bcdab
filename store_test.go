package main

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"
)

// dbApp is the service on the test's own schema, with the schema applied
// and the database marked up; no background loop runs.
func dbApp(t testing.TB, args ...string) *app {
	t.Helper()
	dsn := testDSN(t)
	a := testApp(t, testConfig(t, append(args, "-dsn", dsn)...), nil)
	if err := a.db.applySchema(context.Background()); err != nil {
		t.Fatalf("apply schema: %v", err)
	}
	a.db.setUp(nil)
	return a
}

// at is a time as PostgreSQL stores it.
func at(t time.Time) time.Time { return t.Round(0).Truncate(time.Microsecond) }

func TestSchemaIsIdempotent(t *testing.T) {
	a := dbApp(t)
	for range 2 {
		if err := a.db.applySchema(context.Background()); err != nil {
			t.Fatalf("second apply: %v", err)
		}
	}
}

// A late result for an earlier callback never moves a row back, and rows
// that do not move last_seen are not counted as upserted.
func TestApplyRowsNeverMovesLastSeenBack(t *testing.T) {
	a := dbApp(t)
	db := openDB(t, a.cfg.dsn)
	ctx := context.Background()
	t0 := at(time.Now().Add(-5 * time.Second))
	n, err := a.store.applyRows(ctx, []objectRow{{2, t0.Add(time.Second)}, {4, t0}}, nil)
	if err != nil || n != 2 {
		t.Fatalf("first apply: %d rows, %v; want 2", n, err)
	}
	n, err = a.store.applyRows(ctx, []objectRow{{2, t0.Add(-time.Second)}, {4, t0}}, nil)
	if err != nil || n != 0 {
		t.Fatalf("late apply: %d rows, %v; want 0", n, err)
	}
	wantObjects(t, db, map[int64]time.Time{2: t0.Add(time.Second), 4: t0})
}

// The apply statement deletes the journal rows of the callbacks it
// completes, in the same statement as the upsert.
func TestApplyRowsDeletesJournalRows(t *testing.T) {
	a := dbApp(t)
	db := openDB(t, a.cfg.dsn)
	ctx := context.Background()
	now := at(time.Now())
	rows := []journalRow{{11, now, []int64{2}}, {12, now, []int64{4}}}
	if err := a.store.insertJournal(ctx, a.db.main, rows, a.store.owner, now.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if _, err := a.store.applyRows(ctx, []objectRow{{2, now}}, []int64{11}); err != nil {
		t.Fatal(err)
	}
	if n := journalDepth(t, db); n != 1 {
		t.Errorf("journal depth %d after completing one of two, want 1", n)
	}
}

func TestReapDeletesOnlyRowsOlderThanTTL(t *testing.T) {
	a := dbApp(t)
	db := openDB(t, a.cfg.dsn)
	now := time.Now()
	if _, err := db.Exec(`INSERT INTO objects VALUES (1, $1), (2, $2), (3, $3)`,
		now.Add(-40*time.Second), now.Add(-31*time.Second), now.Add(-29*time.Second)); err != nil {
		t.Fatal(err)
	}
	n, err := a.store.reap(context.Background(), now.Add(-30*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	got := objectsIn(t, db)
	if n != 2 || len(got) != 1 {
		t.Errorf("reaped %d, left %v; want 2 reaped and id 3 left", n, got)
	}
}

func TestReaperLoopRuns(t *testing.T) {
	a := dbApp(t, "-ttl", "1s", "-reap-every", "100ms")
	db := openDB(t, a.cfg.dsn)
	if _, err := a.store.applyRows(context.Background(), []objectRow{{2, at(time.Now())}, {4, at(time.Now())}}, nil); err != nil {
		t.Fatal(err)
	}
	a.loop("reaper", a.reaper.run)
	eventually(t, landWithin, "rows reaped", func() bool { return len(objectsIn(t, db)) == 0 })
	if n := a.metrics.rowsReaped.Value(); n != 2 {
		t.Errorf("rows reaped %d, want 2", n)
	}
}

func TestJournalLeaseClaimAndExpiry(t *testing.T) {
	a := dbApp(t, "-lease", "5s", "-ttl", "30s")
	db := openDB(t, a.cfg.dsn)
	ctx := context.Background()
	other := testApp(t, a.cfg, nil).store // a second instance

	now := at(time.Now())
	row := journalRow{journalID: 7, receivedAt: now, objectIDs: []int64{1, 2, 3}}
	if err := a.store.insertJournal(ctx, a.db.main, []journalRow{row}, a.store.owner, now.Add(5*time.Second)); err != nil {
		t.Fatal(err)
	}
	claim := func(at time.Time) []journalRow {
		t.Helper()
		got, err := other.claim(ctx, at, at.Add(5*time.Second), at.Add(-30*time.Second), 10)
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	if got := claim(now.Add(time.Second)); len(got) != 0 {
		t.Fatalf("claimed %d rows under a live lease", len(got))
	}
	// The owner's lease keeps the row: at now+6s the row's own lease has
	// run out, but its owner's lasts until now+8s.
	if err := a.store.renewLease(ctx, now.Add(8*time.Second)); err != nil {
		t.Fatal(err)
	}
	if got := claim(now.Add(6 * time.Second)); len(got) != 0 {
		t.Fatalf("claimed a row whose owner's lease lasts")
	}
	got := claim(now.Add(9 * time.Second))
	if len(got) != 1 || got[0].journalID != row.journalID || !got[0].receivedAt.Equal(row.receivedAt) || len(got[0].objectIDs) != 3 {
		t.Fatalf("claimed %+v, want the row with its time and ids", got)
	}
	if again := claim(now.Add(9 * time.Second)); len(again) != 0 {
		t.Fatalf("a claimed row was claimed again")
	}
	n, err := a.store.dropExpired(ctx, now.Add(time.Millisecond))
	if err != nil || n != 1 || journalDepth(t, db) != 0 {
		t.Errorf("drop expired: %d rows, %v; want 1 and an empty journal", n, err)
	}
}

func TestParkedCallbacksAreClaimableAtOnce(t *testing.T) {
	a := dbApp(t)
	ctx := context.Background()
	cb := newCallback(at(time.Now()), []int64{8})
	if err := a.store.insertJournal(ctx, a.db.main, []journalRow{cb.journalRow()}, a.store.owner, time.Now().Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	// Parked rows are claimable at once even while their instance's lease
	// lasts (it parks them when it is shutting down).
	if err := a.store.renewLease(ctx, time.Now().Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	unjournaled := newCallback(at(time.Now()), []int64{10})
	if err := a.writer.park(ctx, []*callback{cb, unjournaled}); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	got, err := a.store.claim(ctx, now, now.Add(time.Minute), now.Add(-time.Minute), 10)
	if err != nil || len(got) != 2 {
		t.Fatalf("claimed %d rows (%v), want both parked callbacks", len(got), err)
	}
}

// A journal write that comes while the first connection to PostgreSQL is
// still being made waits for its outcome (within its context) instead of
// failing at once, so the first callbacks after a start are journaled.
func TestJournalWaitsForTheFirstConnection(t *testing.T) {
	dsn := testDSN(t)
	a := testApp(t, testConfig(t, "-dsn", dsn), nil)
	a.loop("journal-writer", func(ctx context.Context) { a.writer.runJournalWriter(ctx, 0) })
	ctx := context.Background()

	first := newCallback(time.Now(), []int64{1})
	done := make(chan struct{})
	go func() {
		jctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		first.beginJournal()
		a.writer.journal(jctx, first)
		close(done)
	}()
	time.Sleep(200 * time.Millisecond) // the connection attempt takes a while
	select {
	case <-done:
		t.Fatal("journal write returned before the first connection")
	default:
	}
	a.db.setUp(a.db.applySchema(ctx))
	<-done
	if !first.journaled() {
		t.Fatal("journal write after the first connection did not commit")
	}

	// Once the database is known to be down, writes fail at once.
	a.db.setUp(errors.New("down"))
	start := time.Now()
	jctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	second := newCallback(time.Now(), []int64{2})
	second.beginJournal()
	a.writer.journal(jctx, second)
	if second.journaled() || time.Since(start) > time.Second {
		t.Fatalf("journal write with the database down: journaled=%v after %s, want a fast failure", second.journaled(), time.Since(start))
	}
}

// Journal rows come back with exactly the ids they were written with: the
// extremes, an empty list, many ids.
func TestJournalRowsRoundTrip(t *testing.T) {
	a := dbApp(t)
	ctx := context.Background()
	now := at(time.Now())
	many := make([]int64, 1000)
	for i := range many {
		many[i] = int64(i*7919) - 500
	}
	want := []journalRow{
		{journalID: 1, receivedAt: now, objectIDs: []int64{-9223372036854775808, -1, 0, 9223372036854775807}},
		{journalID: 2, receivedAt: now.Add(time.Millisecond), objectIDs: []int64{}},
		{journalID: 3, receivedAt: now.Add(2 * time.Millisecond), objectIDs: many},
	}
	if err := a.store.insertJournal(ctx, a.db.main, want, a.store.owner, now.Add(-time.Second)); err != nil {
		t.Fatal(err)
	}
	got, err := a.store.claim(ctx, now, now.Add(time.Minute), now.Add(-time.Minute), 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("claimed %d rows, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i].journalID != want[i].journalID || !got[i].receivedAt.Equal(want[i].receivedAt) || !slices.Equal(got[i].objectIDs, want[i].objectIDs) {
			t.Errorf("row %d: got %d at %s with %d ids, want %d at %s with %d ids", i,
				got[i].journalID, got[i].receivedAt, len(got[i].objectIDs), want[i].journalID, want[i].receivedAt, len(want[i].objectIDs))
		}
	}
}
