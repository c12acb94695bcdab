package main

import (
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// timeWindow posts a callback and returns the window in which the service
// must have received it.
func postTimed(t *testing.T, base string, ids ...int64) (from, to time.Time) {
	t.Helper()
	from = time.Now().Truncate(time.Microsecond)
	status, body := post(t, base, idsBody(ids...))
	to = time.Now()
	if status != http.StatusAccepted || !strings.Contains(body, `"journaled":true`) {
		t.Fatalf("status %d body %s, want 202 and journaled", status, body)
	}
	return from, to
}

func within(at, from, to time.Time) bool { return !at.Before(from) && !at.After(to) }

func TestEndToEnd(t *testing.T) {
	dsn := testDSN(t)
	db := openDB(t, dsn)
	up := newUpstream(t, 100*time.Millisecond, nil)
	svc := startService(t, dsn, up.URL, "-ttl", "3s", "-reap-every", "200ms")
	svc.waitReady(t)

	aFrom, aTo := postTimed(t, svc.base, 1, 2, 3, 4, 4)
	eventually(t, landWithin, "ids 2 and 4 in the table", func() bool { return len(objectsIn(t, db)) == 2 })
	got := objectsIn(t, db)
	for _, id := range []int64{2, 4} {
		if !within(got[id], aFrom, aTo) {
			t.Errorf("id %d: last_seen %s, want the receipt time in [%s, %s]", id, got[id], aFrom, aTo)
		}
	}

	time.Sleep(1500 * time.Millisecond)
	bFrom, bTo := postTimed(t, svc.base, 2, 6, 7)
	// Each id lands as its own lookup ends; the journal row goes once all
	// have.
	eventually(t, landWithin, "the second callback applied", func() bool { return journalDepth(t, db) == 0 })
	got = objectsIn(t, db)
	if !within(got[2], bFrom, bTo) || !within(got[6], bFrom, bTo) {
		t.Errorf("ids 2 and 6 at %s and %s, want the second callback's time", got[2], got[6])
	}
	if _, ok := got[7]; ok {
		t.Error("offline id 7 stored")
	}

	// Id 4 was last named by the first callback: it goes 3s after that,
	// while 2 and 6 live until 3s after the second.
	eventually(t, landWithin, "id 4 reaped", func() bool { _, ok := objectsIn(t, db)[4]; return !ok })
	if time.Since(aFrom) < 3*time.Second {
		t.Errorf("id 4 reaped %s after its callback, before the 3s TTL", time.Since(aFrom))
	}
	if _, ok := objectsIn(t, db)[2]; !ok && time.Since(bFrom) < 3*time.Second {
		t.Error("id 2 reaped before its TTL")
	}
	eventually(t, landWithin, "table empty after the TTL", func() bool { return len(objectsIn(t, db)) == 0 })

	if n := svc.metric(t, "objtrack_callbacks_accepted_total"); n != 2 {
		t.Errorf("accepted %v, want 2", n)
	}
	if n := svc.metric(t, "objtrack_rows_reaped_total"); n != 3 {
		t.Errorf("reaped %v, want 3", n)
	}
	if err := svc.stop(); err != nil {
		t.Errorf("stop: %v", err)
	}
}

// A later callback whose lookup finishes first must not be overwritten by
// the earlier callback's late result: the earlier lookup is held until the
// later callback's row is in, so the late write always comes second.
func TestOutOfOrderCompletionNeverMovesBack(t *testing.T) {
	dsn := testDSN(t)
	db := openDB(t, dsn)
	release := make(chan struct{})
	var once sync.Once
	free := func() { once.Do(func() { close(release) }) }
	t.Cleanup(free)
	up := newUpstream(t, 0, func(w http.ResponseWriter, r *http.Request, id int64, n int) bool {
		if n == 1 { // the first callback's lookup: held
			select {
			case <-release:
			case <-r.Context().Done():
			}
		}
		return false
	})
	svc := startService(t, dsn, up.URL, "-coalesce=false")
	svc.waitReady(t)
	postTimed(t, svc.base, 2)
	eventually(t, landWithin, "the first callback's lookup under way", func() bool { return up.count(2) == 1 })
	lateFrom, lateTo := postTimed(t, svc.base, 2)
	eventually(t, landWithin, "the later callback's row", func() bool { return within(objectsIn(t, db)[2], lateFrom, lateTo) })
	free()
	eventually(t, landWithin, "the earlier callback applied after it", func() bool {
		return svc.metric(t, "objtrack_callbacks_applied_total") == 2
	})
	if at := objectsIn(t, db)[2]; !within(at, lateFrom, lateTo) {
		t.Errorf("last_seen %s, want the later callback's time in [%s, %s]", at, lateFrom, lateTo)
	}
}

// A panic while a callback is processed (past its lookups, before its
// apply) is recovered and counted; the callback goes back to the journal
// and is replayed at its own receipt time, and the service keeps serving.
func TestPanicDuringProcessingLeavesServiceServing(t *testing.T) {
	dsn := testDSN(t)
	db := openDB(t, dsn)
	up := newUpstream(t, 0, nil)
	p := testApp(t, testConfig(t, "-dsn", dsn, "-upstream", up.URL, "-lease", "1s"), nil)
	var fired atomic.Bool
	p.pipe.beforeApply = func(cb *callback) {
		if slices.Contains(cb.objectIDs, 13) && fired.CompareAndSwap(false, true) {
			panic("injected processing panic")
		}
	}
	p.start()
	srv := httptest.NewServer(p.handler())
	t.Cleanup(srv.Close)
	eventually(t, readyWithin, "database ready", func() bool { return p.db.ready() == nil })

	from, to := postTimed(t, srv.URL, 12, 13, 14)
	eventually(t, landWithin, "the callback replayed from the journal", func() bool {
		return p.metrics.journalReplayed.Value() == 1 && journalDepth(t, db) == 0
	})
	got := objectsIn(t, db)
	if len(got) != 2 || !within(got[12], from, to) || !within(got[14], from, to) {
		t.Errorf("rows %v, want ids 12 and 14 at the receipt time in [%s, %s]", got, from, to)
	}
	postTimed(t, srv.URL, 16)
	eventually(t, landWithin, "id 16 in the table", func() bool { return len(objectsIn(t, db)) == 3 })
	if n := p.metrics.panics.Value(); n != 1 {
		t.Errorf("panics recovered %d, want 1", n)
	}
}

func TestStartsWithoutDatabaseAndCatchesUp(t *testing.T) {
	up := newUpstream(t, 50*time.Millisecond, nil)
	// Nothing listens on this port yet: the service must come up anyway.
	proxy := newTCPProxy(t, "")
	svc := startService(t, proxy.dsn(t, testDSN(t)), up.URL)
	resp, err := http.Get(svc.base + "/readyz")
	if err != nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("readyz %v %v, want 503 while the database is unreachable", resp, err)
	}
	resp.Body.Close()
	status, body := post(t, svc.base, idsBody(2, 4))
	if status != http.StatusAccepted || !strings.Contains(body, `"journaled":false`) || !strings.Contains(body, `"durable":"spill"`) {
		t.Fatalf("status %d body %s, want 202 into the spill", status, body)
	}
	proxy.setUp(true)
	svc.waitReady(t)
	db := openDB(t, proxy.target)
	eventually(t, landWithin, "callback applied once the database is back", func() bool { return len(objectsIn(t, db)) == 2 })
}

// Each online object is written as soon as its lookup ends: one slow
// lookup does not hold back the rows of the rest of its callback, and the
// journal row stays until the callback is complete.
func TestFinishedLookupsAreWrittenAtOnce(t *testing.T) {
	dsn := testDSN(t)
	db := openDB(t, dsn)
	release := make(chan struct{})
	var once sync.Once
	free := func() { once.Do(func() { close(release) }) }
	t.Cleanup(free)
	up := newUpstream(t, 0, func(w http.ResponseWriter, r *http.Request, id int64, n int) bool {
		if id == 4 { // held until id 2 is in
			select {
			case <-release:
			case <-r.Context().Done():
			}
		}
		return false
	})
	svc := startService(t, dsn, up.URL)
	svc.waitReady(t)
	from, to := postTimed(t, svc.base, 2, 4)
	eventually(t, landWithin, "id 2 written before id 4 answers", func() bool { _, ok := objectsIn(t, db)[2]; return ok })
	if _, ok := objectsIn(t, db)[4]; ok || journalDepth(t, db) != 1 {
		t.Fatal("id 4 present or journal row gone before id 4 answered")
	}
	free()
	eventually(t, landWithin, "id 4 written and journal row deleted", func() bool {
		_, ok := objectsIn(t, db)[4]
		return ok && journalDepth(t, db) == 0
	})
	got := objectsIn(t, db)
	if !within(got[2], from, to) || !within(got[4], from, to) {
		t.Errorf("rows %v, want both at the receipt time in [%s, %s]", got, from, to)
	}
}
