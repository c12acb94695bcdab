package main

// Tests of the paths a normal run rarely walks: two instances at once,
// statements that fail or stall while PostgreSQL is up, outages longer
// than the TTL, a database that hangs, panics in the saver, and load past
// capacity. Each drives the service from the outside where it can and
// checks exact outcomes: receipt times in their window, each id fetched the
// number of times it must be, counters to the unit.

import (
	"context"
	"database/sql"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// schemaDSN is a test schema with the service's tables already created, so
// that a test can put triggers on them before the service starts; the
// store is for writing rows the way the service does.
func schemaDSN(t *testing.T) (string, *sql.DB, *store) {
	t.Helper()
	a := dbApp(t)
	return a.cfg.dsn, openDB(t, a.cfg.dsn), a.store
}

// failFirst makes the first n statements that insert into table fail, as
// a serialization failure or a dropped connection would, while PostgreSQL
// stays up. A sequence counts them: it is not rolled back with the failure.
func failFirst(t *testing.T, db *sql.DB, table string, n int) {
	t.Helper()
	execAll(t, db,
		fmt.Sprintf(`CREATE SEQUENCE fail_%s_seq`, table),
		fmt.Sprintf(`CREATE FUNCTION fail_%[1]s() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF nextval('fail_%[1]s_seq') <= %[2]d THEN
				RAISE EXCEPTION 'injected failure of an insert into %[1]s';
			END IF;
			RETURN NULL;
		END $$`, table, n),
		fmt.Sprintf(`CREATE TRIGGER fail_%[1]s BEFORE INSERT ON %[1]s FOR EACH STATEMENT EXECUTE FUNCTION fail_%[1]s()`, table))
}

// slowFirst makes the first statement that inserts into table take d.
func slowFirst(t *testing.T, db *sql.DB, table string, d time.Duration) {
	t.Helper()
	execAll(t, db,
		fmt.Sprintf(`CREATE SEQUENCE slow_%s_seq`, table),
		fmt.Sprintf(`CREATE FUNCTION slow_%[1]s() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF nextval('slow_%[1]s_seq') = 1 THEN
				PERFORM pg_sleep(%[2]f);
			END IF;
			RETURN NULL;
		END $$`, table, d.Seconds()),
		fmt.Sprintf(`CREATE TRIGGER slow_%[1]s BEFORE INSERT ON %[1]s FOR EACH STATEMENT EXECUTE FUNCTION slow_%[1]s()`, table))
}

func execAll(t *testing.T, db *sql.DB, stmts ...string) {
	t.Helper()
	for _, s := range stmts {
		if _, err := db.Exec(s); err != nil {
			t.Fatalf("%s: %v", s, err)
		}
	}
}

// insertOrphans writes n journal rows of an instance that died (its lease
// ran out a minute ago), each naming ids of its own: row i names the ids
// from i*per+1.
func insertOrphans(t *testing.T, s *store, n, per int, receivedAt time.Time) {
	t.Helper()
	rows := make([]journalRow, n)
	for i := range rows {
		ids := make([]int64, per)
		for j := range ids {
			ids[j] = int64(i*per + j + 1)
		}
		rows[i] = journalRow{journalID: int64(i + 1), receivedAt: receivedAt, objectIDs: ids}
	}
	if err := s.insertJournal(context.Background(), s.db.main, rows, "dead-instance", time.Now().Add(-time.Minute)); err != nil {
		t.Fatal(err)
	}
}

// Two live instances claiming orphaned rows at the same moment take
// disjoint sets that together are all the rows (FOR UPDATE SKIP LOCKED).
func TestConcurrentClaimsAreDisjoint(t *testing.T) {
	a := dbApp(t, "-lease", "30s")
	b := testApp(t, a.cfg, nil)
	b.db.setUp(nil)
	const rows = 400
	insertOrphans(t, a.store, rows, 1, at(time.Now()))
	claimed := make([][]int64, 2)
	var wg sync.WaitGroup
	for i, s := range []*store{a.store, b.store} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				now := time.Now()
				got, err := s.claim(context.Background(), now, now.Add(30*time.Second), now.Add(-time.Minute), 7)
				if err != nil {
					t.Errorf("claim: %v", err)
					return
				}
				if len(got) == 0 {
					return
				}
				for _, r := range got {
					claimed[i] = append(claimed[i], r.journalID)
				}
			}
		}()
	}
	wg.Wait()
	seen := map[int64]int{}
	for _, ids := range claimed {
		for _, id := range ids {
			seen[id]++
		}
	}
	for id, n := range seen {
		if n > 1 {
			t.Errorf("journal row %d claimed %d times", id, n)
		}
	}
	if len(seen) != rows {
		t.Errorf("%d rows claimed, want all %d", len(seen), rows)
	}
	t.Logf("claimed %d and %d rows", len(claimed[0]), len(claimed[1]))
}

// Two running instances take over a dead one's journal between them: each
// row once, so each id is fetched exactly once, and each lands at its
// callback's receipt time.
func TestTwoInstancesTakeOverOrphansOnce(t *testing.T) {
	dsn, db, s := schemaDSN(t)
	up := newUpstream(t, 20*time.Millisecond, nil)
	const rows, per = 200, 3
	receivedAt := at(time.Now())
	insertOrphans(t, s, rows, per, receivedAt)
	// A small backlog makes each instance take the rows a few at a time,
	// round after round, so both claim while the other does.
	var svcs []*service
	for range 2 {
		svcs = append(svcs, startService(t, dsn, up.URL, "-lease", "1s", "-max-backlog", "10"))
	}
	eventually(t, landWithin, "every orphaned row applied", func() bool { return journalDepth(t, db) == 0 })
	got := objectsIn(t, db)
	for id := int64(1); id <= rows*per; id++ {
		if n := up.count(id); n != 1 {
			t.Errorf("id %d fetched %d times, want once", id, n)
		}
		if at, ok := got[id]; id%2 == 0 && (!ok || !at.Equal(receivedAt)) {
			t.Errorf("id %d: last_seen %s (present %v), want the receipt time %s", id, at, ok, receivedAt)
		}
	}
	var replayed []float64
	for _, svc := range svcs {
		replayed = append(replayed, svc.metric(t, "objtrack_journal_replayed_total"))
	}
	if replayed[0]+replayed[1] != rows {
		t.Errorf("rows taken over %v, want %d in all", replayed, rows)
	}
	t.Logf("rows taken over by each instance: %v", replayed)
}

// A journal insert that fails while PostgreSQL is up is retried by the
// journal writer itself: the callback is journaled before its answer (or
// just after, counted late), never left to the keeper as memory-only.
func TestJournalWriteIsRetriedWhileTheDatabaseIsUp(t *testing.T) {
	dsn, db, _ := schemaDSN(t)
	failFirst(t, db, "callback_journal", 3)
	up := newUpstream(t, 0, nil)
	svc := startService(t, dsn, up.URL)
	svc.waitReady(t)
	from, to := postAccepted(t, svc.base, 2, 4, 5)
	eventually(t, landWithin, "the callback applied", func() bool {
		return svc.metric(t, "objtrack_callbacks_applied_total") == 1 && journalDepth(t, db) == 0
	})
	wantRows(t, db, map[int64][2]time.Time{2: {from, to}, 4: {from, to}})
	for name, want := range map[string]float64{
		`objtrack_db_errors_total{op="journal"}`: 3,
		"objtrack_journal_writes_total":          1,
		"objtrack_journal_rejournaled_total":     0,
		"objtrack_callbacks_memory_only":         0,
	} {
		if got := svc.metric(t, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	if failures, late := svc.metric(t, "objtrack_journal_failures_total"), svc.metric(t, "objtrack_journal_late_total"); failures != late {
		t.Errorf("%v callbacks answered before their commit, %v committed late: the rest were left in memory only", failures, late)
	}
}

// An apply (upsert plus journal delete) that fails while PostgreSQL is up
// is retried by the apply writer: each id is fetched once, lands at its
// receipt time, and nothing goes back to the journal.
func TestApplyIsRetriedWhileTheDatabaseIsUp(t *testing.T) {
	dsn, db, _ := schemaDSN(t)
	failFirst(t, db, "objects", 3)
	up := newUpstream(t, 0, nil)
	svc := startService(t, dsn, up.URL, "-lease", "1s")
	svc.waitReady(t)
	from, to := postTimed(t, svc.base, 2, 4, 5)
	eventually(t, landWithin, "the callback applied", func() bool {
		return svc.metric(t, "objtrack_callbacks_applied_total") == 1 && journalDepth(t, db) == 0
	})
	wantRows(t, db, map[int64][2]time.Time{2: {from, to}, 4: {from, to}})
	for _, id := range []int64{2, 4, 5} {
		if n := up.count(id); n != 1 {
			t.Errorf("id %d fetched %d times, want once", id, n)
		}
	}
	for name, want := range map[string]float64{
		`objtrack_db_errors_total{op="apply"}`: 3,
		"objtrack_journal_replayed_total":      0,
		"objtrack_panics_recovered_total":      0,
	} {
		if got := svc.metric(t, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
}

// postAccepted is postTimed for a callback that may be answered before its
// journal commit (journaled true or false): it returns the receipt window.
func postAccepted(t *testing.T, base string, ids ...int64) (from, to time.Time) {
	t.Helper()
	from = time.Now().Truncate(time.Microsecond)
	status, body := post(t, base, idsBody(ids...))
	to = time.Now()
	if status != http.StatusAccepted {
		t.Fatalf("status %d body %s, want 202", status, body)
	}
	return from, to
}

// wantRows checks that the objects table holds exactly the given ids, each
// with last_seen in its window.
func wantRows(t *testing.T, db *sql.DB, want map[int64][2]time.Time) {
	t.Helper()
	got := objectsIn(t, db)
	if len(got) != len(want) {
		t.Errorf("rows %v, want ids %v", got, slices.Sorted(maps.Keys(want)))
	}
	for id, w := range want {
		if at, ok := got[id]; !ok || !within(at, w[0], w[1]) {
			t.Errorf("id %d: last_seen %s (present %v), want the receipt time in [%s, %s]", id, at, ok, w[0], w[1])
		}
	}
}

// A journal commit slower than the answer deadline: the callback is
// spilled and answered (durable in the spill), the write goes on and commits late, and
// the apply that deletes the row waits for it, so no stray row is left
// behind and the late commit is counted.
func TestLateJournalCommitComesBeforeTheApply(t *testing.T) {
	dsn, db, _ := schemaDSN(t)
	cfg := testConfig(t, "-dsn", dsn)
	slowFirst(t, db, "callback_journal", 2*cfg.journalTimeout)
	up := newUpstream(t, 0, nil)
	svc := startService(t, dsn, up.URL)
	svc.waitReady(t)
	from := time.Now().Truncate(time.Microsecond)
	status, body := post(t, svc.base, idsBody(2, 4))
	to := time.Now()
	if status != http.StatusAccepted || !strings.Contains(body, `"durable":"spill"`) {
		t.Fatalf("status %d body %s, want 202 answered from the spill before the journal commit", status, body)
	}
	if to.Sub(from) >= time.Second {
		t.Errorf("answered after %s, past the sender's 1s", to.Sub(from))
	}
	// The late commit is counted once its insert is in: only then would a
	// stray row show.
	eventually(t, landWithin, "the callback applied and its late commit counted", func() bool {
		return svc.metric(t, "objtrack_callbacks_applied_total") == 1 && svc.metric(t, "objtrack_journal_late_total") == 1
	})
	if n := journalDepth(t, db); n != 0 {
		t.Errorf("journal depth %d after the apply: the late insert landed after the delete", n)
	}
	wantRows(t, db, map[int64][2]time.Time{2: {from, to}, 4: {from, to}})
	for name, want := range map[string]float64{
		"objtrack_journal_failures_total":    0,
		"objtrack_spill_appended_total":      1,
		"objtrack_journal_rejournaled_total": 0,
	} {
		if got := svc.metric(t, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
}

// An outage longer than the TTL: work that could not be written before
// received time + TTL is dropped and counted, the journal rows of those
// callbacks go once PostgreSQL is back, and nothing stale is written.
func TestOutageLongerThanTheTTLDropsAndCounts(t *testing.T) {
	dsn := testDSN(t)
	db := openDB(t, dsn)
	proxy := newTCPProxy(t, "")
	proxied := proxy.dsn(t, dsn)
	proxy.setUp(true)
	release := make(chan struct{})
	var once sync.Once
	free := func() { once.Do(func() { close(release) }) }
	t.Cleanup(free)
	up := newUpstream(t, 0, func(w http.ResponseWriter, r *http.Request, id int64, n int) bool {
		select {
		case <-release:
		case <-r.Context().Done():
		}
		return false
	})
	const ttl = 2 * time.Second
	svc := startService(t, proxied, up.URL, "-ttl", ttl.String(), "-reap-every", "100ms", "-lease", "1s")
	svc.waitReady(t)
	postTimed(t, svc.base, 2, 4) // journaled, its lookups held
	proxy.setUp(false)
	eventually(t, readyWithin, "readyz 503 during the outage", func() bool {
		status, _ := getBody(t, svc.base+"/readyz")
		return status == http.StatusServiceUnavailable
	})
	if status, body := post(t, svc.base, idsBody(6, 8)); status != http.StatusAccepted || !strings.Contains(body, `"journaled":false`) {
		t.Fatalf("status %d body %s during the outage, want 202 into memory", status, body)
	}
	free() // the answers come now, with PostgreSQL still away
	eventually(t, ttl+landWithin, "both callbacks dropped at their TTL", func() bool {
		return svc.metric(t, "objtrack_callbacks_in_memory") == 0
	})
	eventually(t, landWithin, "no callback counted as in memory only", func() bool {
		return svc.metric(t, "objtrack_callbacks_memory_only") == 0
	})
	for name, want := range map[string]float64{
		"objtrack_ids_dropped_total":       4,
		"objtrack_callbacks_expired_total": 2,
	} {
		if got := svc.metric(t, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	proxy.setUp(true)
	svc.waitReady(t)
	eventually(t, landWithin, "the expired callback's journal row gone", func() bool { return journalDepth(t, db) == 0 })
	if n := svc.metric(t, "objtrack_journal_expired_total"); n != 1 {
		t.Errorf("journal rows expired %v, want 1", n)
	}
	if got := objectsIn(t, db); len(got) != 0 || svc.metric(t, "objtrack_rows_upserted_total") != 0 {
		t.Errorf("rows %v written after their TTL", got)
	}
}

// A panic in the saver (the write of an online answer) hands the waiting
// callback back to the journal: it is replayed at its own receipt time and
// the service goes on saving.
func TestSaverPanicIsReplayed(t *testing.T) {
	dsn := testDSN(t)
	db := openDB(t, dsn)
	up := newUpstream(t, 0, nil)
	p := testApp(t, testConfig(t, "-dsn", dsn, "-upstream", up.URL, "-lease", "1s"), nil)
	save := p.fetcher.save
	var fired atomic.Bool
	p.fetcher.save = func(ctx context.Context, rows []objectRow) error {
		if fired.CompareAndSwap(false, true) {
			panic("injected save panic")
		}
		return save(ctx, rows)
	}
	p.start()
	srv := httptest.NewServer(p.handler())
	t.Cleanup(srv.Close)
	eventually(t, readyWithin, "database ready", func() bool { return p.db.ready() == nil })
	from, to := postTimed(t, srv.URL, 12)
	eventually(t, landWithin, "the callback replayed from the journal", func() bool {
		return p.metrics.journalReplayed.Value() == 1 && journalDepth(t, db) == 0
	})
	from2, to2 := postTimed(t, srv.URL, 14)
	eventually(t, landWithin, "the next callback applied", func() bool { return journalDepth(t, db) == 0 && len(objectsIn(t, db)) == 2 })
	wantRows(t, db, map[int64][2]time.Time{12: {from, to}, 14: {from2, to2}})
	if n := p.metrics.panics.Value(); n != 1 {
		t.Errorf("panics recovered %d, want 1", n)
	}
}

// Two instances reap one table while rows are refreshed: a row refreshed
// within the TTL is never lost, every expired one goes, and neither reaper
// nor writer fails (no deadlock, no lock wait error).
func TestReaperWithTwoInstancesAndConcurrentUpserts(t *testing.T) {
	// The TTL outlasts the test's rounds even on a busy machine: no
	// refreshed row may expire before the end.
	const ttl = 10 * time.Second
	a := dbApp(t, "-ttl", ttl.String(), "-reap-every", "20ms")
	b := testApp(t, a.cfg, nil)
	b.db.setUp(nil)
	db := openDB(t, a.cfg.dsn)
	a.loop("reaper", a.reaper.run)
	b.loop("reaper", b.reaper.run)
	ctx := context.Background()
	// Each round inserts a batch of expired rows, and both instances
	// refresh the even ones of it at once, racing the reapers for them.
	const rounds, batch = 40, 100
	refreshed := map[int64]time.Time{}
	for r := range rounds {
		old := at(time.Now().Add(-2 * ttl))
		rows := make([]objectRow, batch)
		for i := range rows {
			rows[i] = objectRow{int64(r*batch + i), old}
		}
		if _, err := a.store.applyRows(ctx, rows, nil); err != nil {
			t.Fatalf("insert expired rows: %v", err)
		}
		now := at(time.Now())
		var fresh []objectRow
		for _, row := range rows {
			if row.id%2 == 0 {
				fresh = append(fresh, objectRow{row.id, now})
				refreshed[row.id] = now
			}
		}
		var wg sync.WaitGroup
		for _, s := range []*store{a.store, b.store} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := s.applyRows(ctx, fresh, nil); err != nil {
					t.Errorf("refresh: %v", err)
				}
			}()
		}
		wg.Wait()
	}
	eventually(t, ttl, "every expired row reaped", func() bool {
		return len(objectsIn(t, db)) == len(refreshed)
	})
	got := objectsIn(t, db)
	for id, want := range refreshed {
		if !got[id].Equal(want) {
			t.Errorf("refreshed id %d: last_seen %s (present %v), want %s", id, got[id], !got[id].IsZero(), want)
		}
	}
	reaped := []uint64{a.metrics.rowsReaped.Value(), b.metrics.rowsReaped.Value()}
	if reaped[0]+reaped[1] < rounds*batch/2 {
		t.Errorf("rows reaped %v, want at least the %d never refreshed", reaped, rounds*batch/2)
	}
	for _, m := range []*metrics{a.metrics, b.metrics} {
		if n := m.dbErrors.Value("reap"); n != 0 {
			t.Errorf("%d reaping errors", n)
		}
	}
	t.Logf("rows reaped by each instance: %v", reaped)
}

// A database that hangs (accepts connections, never answers) instead of
// refusing them: callbacks are still answered within the sender's 1s,
// readyz says so, and once it answers again everything lands.
func TestHangingDatabase(t *testing.T) {
	dsn := testDSN(t)
	proxy := newTCPProxy(t, "")
	proxied := proxy.dsn(t, dsn)
	proxy.setUp(true)
	up := newUpstream(t, 100*time.Millisecond, nil)
	svc := startService(t, proxied, up.URL)
	t.Cleanup(func() { proxy.setHang(false) }) // before the service stops
	svc.waitReady(t)
	s := &sender{overlap: true}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { defer close(done); s.run(t, func() string { return svc.base }, 10, 50*time.Millisecond, stop) }()
	eventually(t, readyWithin, "callbacks acknowledged before the hang", func() bool { return s.ackedCount() >= 5 })
	proxy.setHang(true)
	eventually(t, readyWithin, "readyz 503 while the database hangs", func() bool {
		status, _ := getBody(t, svc.base+"/readyz")
		return status == http.StatusServiceUnavailable
	})
	before := s.ackedCount()
	eventually(t, readyWithin, "callbacks acknowledged during the hang", func() bool { return s.ackedCount() >= before+10 })
	proxy.setHang(false)
	svc.waitReady(t)
	before = s.ackedCount()
	eventually(t, readyWithin, "callbacks acknowledged after the hang", func() bool { return s.ackedCount() >= before+5 })
	close(stop)
	<-done
	if len(s.unsure) != 0 || s.codes[http.StatusAccepted]+s.codes[http.StatusServiceUnavailable] != len(s.acked)+s.failed {
		t.Errorf("answers %v, %d without an answer within 1s; want only 202s and 503s", s.codes, len(s.unsure))
	}
	s.checkAllLanded(t, dsn, landWithin)
}

// Past capacity every callback is answered 202 or 503 within the sender's
// 1s, never a timeout, while the limiters adapt; and everything accepted
// lands at its receipt time.
func TestNeverATimeoutPastCapacity(t *testing.T) {
	dsn := testDSN(t)
	// 64 fetches at a time, a second each: 64 ids a second, against 400
	// offered.
	up := newUpstream(t, time.Second, nil)
	svc := startService(t, dsn, up.URL, "-max-inflight", "64", "-max-queue-wait", "2s")
	svc.waitReady(t)
	s := &sender{}
	stop := make(chan struct{})
	go func() { time.Sleep(3 * time.Second); close(stop) }()
	s.run(t, func() string { return svc.base }, 20, 50*time.Millisecond, stop)
	if len(s.unsure) != 0 || s.codes[http.StatusAccepted] == 0 || s.codes[http.StatusServiceUnavailable] == 0 || len(s.codes) != 2 {
		t.Errorf("answers %v, %d without an answer within 1s; want only 202s and 503s, some of each", s.codes, len(s.unsure))
	}
	t.Logf("answers %v", s.codes)
	s.checkAllLanded(t, dsn, landWithin)
}

// A journal so slow that its commits miss their target: the fetch limit
// goes down, and callbacks are still answered within 1s.
func TestSlowJournalLowersTheFetchLimit(t *testing.T) {
	dsn := testDSN(t)
	proxy := newTCPProxy(t, "")
	proxied := proxy.dsn(t, dsn)
	proxy.setUp(true)
	up := newUpstream(t, 500*time.Millisecond, nil)
	svc := startService(t, proxied, up.URL, "-max-inflight", "512")
	svc.waitReady(t)
	initial := svc.metric(t, "objtrack_fetch_limit")
	cfg := testConfig(t)
	// Each way: a commit takes at least the answer deadline, twice the
	// limiter's target.
	proxy.setDelay(cfg.journalTimeout / 2)
	s := &sender{}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { defer close(done); s.run(t, func() string { return svc.base }, 20, 50*time.Millisecond, stop) }()
	eventually(t, landWithin, "the fetch limit lowered", func() bool { return svc.metric(t, "objtrack_fetch_limit") < initial })
	t.Logf("fetch limit %v, from %v", svc.metric(t, "objtrack_fetch_limit"), initial)
	close(stop)
	<-done
	if len(s.unsure) != 0 || s.ackedCount() == 0 {
		t.Errorf("%d callbacks without an answer within 1s, %d acknowledged", len(s.unsure), s.ackedCount())
	}
	proxy.setDelay(0)
	s.checkAllLanded(t, dsn, landWithin)
}
