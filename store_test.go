package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"
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

// Expiry and takeover find rows through their owners: rows of several
// owners (this live instance, a crashed one whose lease ran out, one that
// never renewed, parked rows) are each dropped once past the TTL and taken
// over only when their owner has no live lease, whatever the order of the
// owners in the index.
func TestJournalRowsOfEveryOwner(t *testing.T) {
	a := dbApp(t, "-lease", "5s", "-ttl", "30s")
	db := openDB(t, a.cfg.dsn)
	ctx := context.Background()
	now := at(time.Now())
	if err := a.store.renewLease(ctx, now.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`INSERT INTO journal_owners (owner, lease_until) VALUES ('crashed', $1), ('~live', $2)`,
		pgTime(now.Add(-time.Second)), pgTime(now.Add(time.Minute))); err != nil {
		t.Fatal(err)
	}
	owners := []struct {
		name    string
		orphan  bool
		idsFrom int64
	}{
		{a.store.owner, false, 100},
		{"crashed", true, 200},
		{"never-renewed", true, 300},
		{"~live", false, 400},
		{parkedOwner, true, 500},
	}
	var wantLeft, wantClaimed []int64
	for _, o := range owners {
		rows := []journalRow{
			{journalID: o.idsFrom, receivedAt: now.Add(-40 * time.Second), objectIDs: []int64{1}},
			{journalID: o.idsFrom + 1, receivedAt: now.Add(-10 * time.Second), objectIDs: []int64{2}},
			{journalID: o.idsFrom + 2, receivedAt: now.Add(-time.Second), objectIDs: []int64{3}},
		}
		if err := a.store.insertJournal(ctx, a.db.main, rows, o.name, now.Add(-time.Second)); err != nil {
			t.Fatal(err)
		}
		wantLeft = append(wantLeft, o.idsFrom+1, o.idsFrom+2)
		if o.orphan {
			wantClaimed = append(wantClaimed, o.idsFrom+1, o.idsFrom+2)
		}
	}
	n, err := a.store.dropExpired(ctx, now.Add(-30*time.Second))
	if err != nil || n != int64(len(owners)) {
		t.Fatalf("drop expired: %d rows, %v; want one of each of %d owners", n, err, len(owners))
	}
	var left []int64
	rows, err := db.Query(`SELECT id FROM callback_journal ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		left = append(left, id)
	}
	if !slices.Equal(left, wantLeft) {
		t.Errorf("rows left after expiry %v, want %v", left, wantLeft)
	}
	other := testApp(t, a.cfg, nil).store
	got, err := other.claim(ctx, now, now.Add(5*time.Second), now.Add(-30*time.Second), 100)
	if err != nil {
		t.Fatal(err)
	}
	var claimed []int64
	for i, r := range got {
		claimed = append(claimed, r.journalID)
		if i > 0 && r.receivedAt.Before(got[i-1].receivedAt) {
			t.Errorf("claimed rows out of receipt order: %v", got)
		}
	}
	slices.Sort(claimed)
	if !slices.Equal(claimed, wantClaimed) {
		t.Errorf("claimed %v, want the rows of owners without a live lease %v", claimed, wantClaimed)
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

// cutProxy sits between the service and PostgreSQL and cuts one answer off
// part way: once a client has sent a statement containing match, it passes
// on only the first `rows` rows of the answer, reads the rest of it from
// the server up to its end (ReadyForQuery, so that whatever the server
// commits, it commits), and then drops that connection. Every other
// exchange passes through.
type cutProxy struct {
	t       testing.TB
	ln      net.Listener
	backend string
	match   []byte
	rows    int
	done    atomic.Bool // the one cut has been armed
	cutDone chan struct{}
}

func newCutProxy(t testing.TB, dsn, match string, rows int) (*cutProxy, string) {
	t.Helper()
	u, err := url.Parse(dsn)
	if err != nil || u.Host == "" {
		t.Fatalf("the cut proxy needs DATABASE_URL as a postgres:// URL, got %q", dsn)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{t: t, ln: ln, backend: u.Host, match: []byte(match), rows: rows, cutDone: make(chan struct{})}
	var conns sync.WaitGroup
	t.Cleanup(func() { ln.Close(); conns.Wait() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b, err := net.Dial("tcp", p.backend)
			if err != nil {
				c.Close()
				continue
			}
			var armed atomic.Bool
			conns.Add(2)
			go func() { defer conns.Done(); p.fromClient(c, b, &armed) }()
			go func() { defer conns.Done(); p.fromServer(c, b, &armed) }()
		}
	}()
	u.Host = ln.Addr().String()
	return p, u.String()
}

// fromClient passes what the client sends, arming the cut when the
// statement goes by.
func (p *cutProxy) fromClient(c, b net.Conn, armed *atomic.Bool) {
	defer b.Close()
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if bytes.Contains(buf[:n], p.match) && p.done.CompareAndSwap(false, true) {
				armed.Store(true)
			}
			if _, werr := b.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// fromServer passes the server's messages on, whole, and makes the cut.
func (p *cutProxy) fromServer(c, b net.Conn, armed *atomic.Bool) {
	defer c.Close()
	defer b.Close()
	r := bufio.NewReader(b)
	passed, cutting := 0, false
	for {
		var head [5]byte
		if _, err := io.ReadFull(r, head[:]); err != nil {
			return
		}
		msg := make([]byte, 5+int(binary.BigEndian.Uint32(head[1:]))-4)
		copy(msg, head[:])
		if _, err := io.ReadFull(r, msg[5:]); err != nil {
			return
		}
		if cutting {
			if head[0] == 'Z' { // the answer is over, commit included
				close(p.cutDone)
				return
			}
			continue
		}
		if armed.Load() && head[0] == 'D' {
			if passed == p.rows {
				cutting = true
				continue
			}
			passed++
		}
		if _, err := c.Write(msg); err != nil {
			return
		}
	}
}

// A claim whose answer is cut off part way (the connection drops after the
// server ran the statement) leaves no row under this instance's lease that
// is not taken into memory: each row is either in what the claim returned,
// to be worked, or left for the next claim to take.
func TestClaimCutOffLeavesNoRowUnworked(t *testing.T) {
	dsn := testDSN(t)
	proxy, via := newCutProxy(t, dsn, "UPDATE callback_journal SET owner", 2)
	a := testApp(t, testConfig(t, "-dsn", via, "-lease", "5s", "-ttl", "30s"), nil)
	ctx := context.Background()
	if err := a.db.applySchema(ctx); err != nil {
		t.Fatal(err)
	}
	a.db.setUp(nil)
	db := openDB(t, dsn)

	now := at(time.Now())
	var parked []journalRow
	for i := range 5 {
		parked = append(parked, journalRow{journalID: int64(100 + i), receivedAt: now.Add(time.Duration(i) * time.Millisecond), objectIDs: []int64{int64(i)}})
	}
	if err := a.store.insertJournal(ctx, a.db.main, parked, parkedOwner, now.Add(-time.Second)); err != nil {
		t.Fatal(err)
	}
	// This instance's lease lives: rows it owns are nobody else's to take.
	if err := a.store.renewLease(ctx, now.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	claimAt := time.Now()
	got, err := a.store.claim(ctx, claimAt, claimAt.Add(5*time.Second), claimAt.Add(-30*time.Second), 10)
	if err == nil {
		t.Fatalf("claim through a connection cut after 2 of 5 rows succeeded with %d rows", len(got))
	}
	select {
	case <-proxy.cutDone:
	case <-time.After(landWithin):
		t.Fatal("the proxy never cut the claim's answer")
	}
	inMemory := map[int64]bool{}
	for _, r := range got {
		inMemory[r.journalID] = true
	}
	// The server ends the cut connection's transaction as it notices the
	// drop; the bound is the lease, past which the question is moot.
	var stranded []int64
	eventually(t, 5*time.Second, "every claimed row taken into memory or claimable again", func() bool {
		rows, err := db.Query(`SELECT id FROM callback_journal WHERE owner = $1`, a.store.owner)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		stranded = stranded[:0]
		for rows.Next() {
			var id int64
			if err := rows.Scan(&id); err != nil {
				t.Fatal(err)
			}
			if !inMemory[id] {
				stranded = append(stranded, id)
			}
		}
		return rows.Err() == nil && len(stranded) == 0
	})
	// The next claim takes whatever the cut one did not return.
	now2 := time.Now()
	again, err := a.store.claim(ctx, now2, now2.Add(5*time.Second), now2.Add(-30*time.Second), 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(got)+len(again) != len(parked) {
		t.Errorf("claimed %d rows, then %d; want %d in all", len(got), len(again), len(parked))
	}
}
