package main

import (
	"database/sql"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestMain lets a test start the service as a real subprocess (to SIGKILL or
// SIGTERM it): the test binary runs main() when asked to.
func TestMain(m *testing.M) {
	if os.Getenv("OBJTRACK_TEST_SUBPROCESS") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// proc is the service running as a subprocess of the test.
type proc struct {
	cmd    *exec.Cmd
	base   string
	logs   *syncBuffer
	exited chan error
}

func startProc(t *testing.T, dsn, upstreamURL string, extra ...string) *proc {
	t.Helper()
	addr := freeAddr(t)
	args := append([]string{"-listen", addr, "-upstream", upstreamURL, "-dsn", dsn, "-log-level", "debug", "-spill-dir", t.TempDir()}, extra...)
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "OBJTRACK_TEST_SUBPROCESS=1")
	logs := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("start service: %v", err)
	}
	p := &proc{cmd: cmd, base: "http://" + addr, logs: logs, exited: make(chan error, 1)}
	go func() { p.exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		if t.Failed() {
			t.Logf("service %s log:\n%s", addr, tail(logs.String(), 40))
		}
	})
	waitReadyAt(t, p.base)
	return p
}

// signal sends sig and waits for the process to exit, returning its error.
func (p *proc) signal(t *testing.T, sig os.Signal, within time.Duration) error {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal: %v", err)
	}
	select {
	case err := <-p.exited:
		return err
	case <-time.After(within):
		t.Fatalf("service did not exit within %s of %s", within, sig)
		return nil
	}
}

// acked is a callback whose outcome the sender knows or may not know: its
// receipt time, which becomes its ids' last_seen, lies in [sent, answered].
type acked struct {
	ids            []int64
	sent, answered time.Time
}

// sender posts callbacks of n ids at the given interval to whichever base
// URL target returns, until stop is closed, and records the answers. The ids
// are fresh, or with overlap each callback repeats the second half of the
// one before, so that every id is named by callbacks received at different
// times (out-of-order completion, takeovers: GREATEST must keep the later).
type sender struct {
	overlap bool

	mu     sync.Mutex
	acked  []acked     // answered 2xx
	unsure []acked     // no answer (a transport error): maybe received
	failed int         // not answered 2xx
	codes  map[int]int // answers by status
	nextID int64
}

// ids picks the next callback's ids; s.mu is held.
func (s *sender) ids(n int) []int64 {
	ids := make([]int64, n)
	for i := range ids {
		ids[i] = s.nextID + 1 + int64(i)
	}
	step := int64(n)
	if s.overlap {
		step = int64(max(1, n/2))
	}
	s.nextID += step
	return ids
}

func (s *sender) run(t *testing.T, target func() string, n int, every time.Duration, stop <-chan struct{}) {
	client := &http.Client{Timeout: time.Second}
	tick := time.NewTicker(every)
	defer tick.Stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		s.mu.Lock()
		ids := s.ids(n)
		s.mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			sent := time.Now().Truncate(time.Microsecond)
			resp, err := client.Post(target()+"/callback", "application/json", strings.NewReader(idsBody(ids...)))
			var status int
			if err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				status = resp.StatusCode
			}
			answered := time.Now()
			s.mu.Lock()
			defer s.mu.Unlock()
			if err == nil {
				if s.codes == nil {
					s.codes = map[int]int{}
				}
				s.codes[status]++
			}
			switch {
			case errors.Is(err, syscall.ECONNREFUSED): // never received
				s.failed++
			case err != nil:
				s.failed++
				s.unsure = append(s.unsure, acked{ids: ids, sent: sent, answered: answered})
			case status != http.StatusAccepted:
				s.failed++
			default:
				s.acked = append(s.acked, acked{ids: ids, sent: sent, answered: answered})
			}
		}()
	}
}

// ackedCount is how many callbacks got a 202 so far.
func (s *sender) ackedCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.acked)
}

// window is where an id's last_seen must lie once every callback naming it
// is applied: at or after the latest send of a 2xx callback naming it, at
// or before the latest answer of one. A send that got no answer may have
// been received too, even after the sender gave up (the request waited in
// a backlog): an id it names has no upper end.
type window struct{ from, to time.Time }

// noEnd is the upper end of a window left open.
var noEnd = time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC)

// windows gives the window of every id of the 2xx callbacks.
func (s *sender) windows() map[int64]window {
	s.mu.Lock()
	defer s.mu.Unlock()
	w := map[int64]window{}
	for _, a := range s.acked {
		for _, id := range a.ids {
			cur := w[id]
			if a.sent.After(cur.from) {
				cur.from = a.sent
			}
			if a.answered.After(cur.to) {
				cur.to = a.answered
			}
			w[id] = cur
		}
	}
	for _, a := range s.unsure {
		for _, id := range a.ids {
			if cur, ok := w[id]; ok {
				cur.to = noEnd
				w[id] = cur
			}
		}
	}
	return w
}

// checkAllLanded waits until every online (even) id of every 2xx callback is
// in the table with last_seen exactly its latest receipt time, as far as
// the sender can tell: within its window. A last_seen past the window, or
// one that moved back below it, fails at once; no offline id may be
// stored. Then it waits for the journal to empty (callbacks taken over late
// are applied) and checks every row once more.
func (s *sender) checkAllLanded(t *testing.T, dsn string, timeout time.Duration) {
	t.Helper()
	db := openDB(t, dsn)
	want := s.windows()
	if len(want) == 0 {
		t.Fatal("no callback was acknowledged")
	}
	// An id seen in its window has landed, even if the reaper takes it
	// later: the wait may outlast the TTL.
	landed := map[int64]bool{}
	var got map[int64]time.Time
	var missing []int64 // the first few, for the message
	var nMissing int
	eventually(t, timeout, "every acknowledged callback in the table at its receipt time", func() bool {
		got = objectsIn(t, db)
		missing, nMissing = missing[:0], 0
		for id, w := range want {
			at, ok := got[id]
			switch {
			case id%2 != 0:
				if ok {
					t.Fatalf("offline id %d stored", id)
				}
			case ok && at.After(w.to):
				t.Fatalf("id %d: last_seen %s is after the last answer of a callback naming it (%s): not a receipt time",
					id, at.Format(time.RFC3339Nano), w.to.Format(time.RFC3339Nano))
			case landed[id] && ok && at.Before(w.from):
				t.Fatalf("id %d: last_seen moved back to %s, before the last callback naming it was sent (%s)",
					id, at.Format(time.RFC3339Nano), w.from.Format(time.RFC3339Nano))
			case landed[id]:
			case ok && !at.Before(w.from):
				landed[id] = true
			default:
				nMissing++
				if len(missing) < 5 {
					missing = append(missing, id)
				}
			}
		}
		return nMissing == 0
	}, func() string {
		b := strings.Builder{}
		fmt.Fprintf(&b, "%d ids missing or early: ", nMissing)
		for _, id := range missing {
			w := want[id]
			fmt.Fprintf(&b, "id %d at %s, want [%s, %s]; ", id, got[id].Format(time.RFC3339Nano),
				w.from.Format(time.RFC3339Nano), w.to.Format(time.RFC3339Nano))
		}
		return b.String()
	})
	// Every id has landed, but a callback taken over late (an earlier one
	// naming the same ids) may still be on its way: once the journal is
	// empty it is in, and no row may have moved back.
	eventually(t, timeout, "the journal empty", func() bool { return journalDepth(t, db) == 0 })
	for id, at := range objectsIn(t, db) {
		if w, ok := want[id]; ok && (at.Before(w.from) || at.After(w.to)) {
			t.Errorf("id %d: last_seen %s at the end, want the latest receipt time of its callbacks in [%s, %s]",
				id, at.Format(time.RFC3339Nano), w.from.Format(time.RFC3339Nano), w.to.Format(time.RFC3339Nano))
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	t.Logf("%d acknowledged callbacks all landed at their receipt time (%d sends failed while a service was down)", len(s.acked), s.failed)
}

// slowUpstream answers after upto: lookups take a while, so plenty of
// callbacks are in flight at a kill.
func slowUpstream(t *testing.T, from, upto time.Duration) *upstream {
	return newUpstream(t, 0, func(w http.ResponseWriter, r *http.Request, id int64, n int) bool {
		time.Sleep(from + time.Duration(id%7)*(upto-from)/6)
		return false
	})
}

// journalRowsOf counts the journal rows leased by the instance running as
// process pid (an owner is named host-pid-random).
func journalRowsOf(t testing.TB, db *sql.DB, pid int) int {
	t.Helper()
	var n int
	if err := db.QueryRow(`SELECT count(*) FROM callback_journal WHERE owner ~ ('-' || $1::text || '-[0-9a-f]{8}$')`, pid).Scan(&n); err != nil {
		t.Fatalf("count journal rows of %d: %v", pid, err)
	}
	return n
}

// killWithWorkInFlight waits until p has acknowledged callbacks whose
// journal rows are still there (their lookups are under way), SIGKILLs it,
// and returns how many of its journal rows the kill left behind: a test of a
// takeover proves nothing unless that is more than zero. The wait is bounded
// by the start of a process plus a few lookups.
func killWithWorkInFlight(t *testing.T, p *proc, s *sender, db *sql.DB) int {
	t.Helper()
	eventually(t, readyWithin, "acknowledged callbacks in the journal", func() bool {
		return s.ackedCount() >= 10 && journalRowsOf(t, db, p.cmd.Process.Pid) > 0
	})
	_ = p.signal(t, syscall.SIGKILL, 5*time.Second)
	held := journalRowsOf(t, db, p.cmd.Process.Pid)
	if held == 0 {
		t.Fatal("the kill left no journal row behind: nothing was in flight, the takeover is untested")
	}
	t.Logf("killed with %d callbacks in the journal", held)
	return held
}

// wantReplayed checks that the instance at base took over journal rows.
func wantReplayed(t *testing.T, base string) {
	t.Helper()
	if n := metricAt(t, base, "objtrack_journal_replayed_total"); n == 0 {
		t.Error("the surviving instance took over no journal row")
	}
}

// A SIGKILL with callbacks in flight loses none: the restarted instance
// takes them over, and every id lands at its callback's receipt time, the
// later of two when two callbacks name it.
func TestSIGKILLAndRestartLosesNoAcknowledgedCallback(t *testing.T) {
	dsn := testDSN(t)
	db := openDB(t, dsn)
	up := slowUpstream(t, 300*time.Millisecond, 1200*time.Millisecond)
	spillDir := t.TempDir() // the restart replays what the killed one spilled
	a := startProc(t, dsn, up.URL, "-lease", "1s", "-spill-dir", spillDir)
	var mu sync.Mutex
	target := a.base
	s := &sender{overlap: true}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.run(t, func() string { mu.Lock(); defer mu.Unlock(); return target }, 20, 20*time.Millisecond, stop)
	}()
	killWithWorkInFlight(t, a, s, db)
	b := startProc(t, dsn, up.URL, "-lease", "1s", "-spill-dir", spillDir)
	mu.Lock()
	target = b.base
	mu.Unlock()
	before := s.ackedCount()
	eventually(t, readyWithin, "callbacks acknowledged by the restarted instance", func() bool { return s.ackedCount() >= before+10 })
	close(stop)
	<-done
	s.checkAllLanded(t, dsn, landWithin)
	wantReplayed(t, b.base)
}

// busyLoops keeps every core busy, as other processes on a shared machine
// do, until the returned func or the end of the test stops them. Each loop
// is bounded by timeout(1), so none outlives a test binary that dies; the
// stop sends SIGTERM, which timeout passes on to its loop (a SIGKILL would
// orphan the loop).
func busyLoops(t *testing.T) (stop func()) {
	t.Helper()
	var cmds []*exec.Cmd
	for range runtime.NumCPU() {
		cmd := exec.Command("timeout", "120", "sh", "-c", "while :; do :; done")
		if err := cmd.Start(); err != nil {
			t.Fatalf("start busy loop: %v", err)
		}
		cmds = append(cmds, cmd)
	}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			for _, cmd := range cmds {
				_ = cmd.Process.Signal(syscall.SIGTERM)
				_ = cmd.Wait()
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// The promise on a busy machine: with every core taken by busy loops, each
// callback answered 2xx has its journal row committed once its answer is
// out (none is left in memory only), so a SIGKILL loses none of them.
func TestKillUnderCPUPressureLosesNoAcknowledgedCallback(t *testing.T) {
	dsn := testDSN(t)
	db := openDB(t, dsn)
	// A tenth of the lookups hang until the kill, so that it finds their
	// callbacks in the journal; the rest take 0.3-1.2 s.
	release := make(chan struct{})
	var once sync.Once
	free := func() { once.Do(func() { close(release) }) }
	t.Cleanup(free)
	up := newUpstream(t, 0, func(w http.ResponseWriter, r *http.Request, id int64, n int) bool {
		if id%10 == 0 {
			select {
			case <-release:
			case <-r.Context().Done():
			}
			return false
		}
		time.Sleep(time.Duration(300+id%7*150) * time.Millisecond)
		return false
	})
	spillDir := t.TempDir() // the restart replays what the killed one spilled
	a := startProc(t, dsn, up.URL, "-lease", "1s", "-spill-dir", spillDir)
	stopBusy := busyLoops(t)
	s := &sender{}
	stop := make(chan struct{})
	go func() { time.Sleep(2 * time.Second); close(stop) }()
	s.run(t, func() string { return a.base }, 50, 100*time.Millisecond, stop)
	// Every answer is in. A journal write that missed its answer deadline
	// goes on while PostgreSQL is up: it commits (late) within the retries
	// of one attempt, or the callback is in memory only and the kill
	// loses it.
	// A journal write that missed its answer deadline has spilled its
	// callback before the answer: none is answered from memory only.
	failures := metricAt(t, a.base, "objtrack_journal_failures_total")
	t.Logf("%d callbacks acknowledged under CPU pressure; %v answered with neither a journal row nor a spill record", len(s.acked), failures)
	if failures != 0 {
		t.Errorf("%v callbacks were answered with neither a journal row nor a spill record", failures)
	}
	_ = a.signal(t, syscall.SIGKILL, 5*time.Second)
	// Each callback names a multiple of ten, whose lookup hangs.
	// (A callback whose journal commit was late may be in the spill only.)
	if held := journalRowsOf(t, db, a.cmd.Process.Pid); held == 0 {
		t.Fatalf("no journal row at the kill of %d acknowledged callbacks: the takeover is untested", len(s.acked))
	}
	// The takeover is the other tests' subject; under busy loops the
	// fake object service in this process is starved past the fetch
	// timeout (seen on a loaded machine) and the takeover outlasts the TTL.
	stopBusy()
	free()
	b := startProc(t, dsn, up.URL, "-lease", "1s", "-spill-dir", spillDir)
	s.checkAllLanded(t, dsn, landWithin)
	wantReplayed(t, b.base)
}

// Two instances share the load and one is killed: the other takes over its
// journal rows, and ids named by callbacks on both land at the later
// receipt time (GREATEST across a takeover).
func TestTwoInstancesOneKilled(t *testing.T) {
	dsn := testDSN(t)
	db := openDB(t, dsn)
	up := slowUpstream(t, 300*time.Millisecond, 1200*time.Millisecond)
	a := startProc(t, dsn, up.URL, "-lease", "1s")
	b := startProc(t, dsn, up.URL, "-lease", "1s")
	var mu sync.Mutex
	n := 0
	aAlive := true
	target := func() string { // alternate while both live
		mu.Lock()
		defer mu.Unlock()
		n++
		if aAlive && n%2 == 0 {
			return a.base
		}
		return b.base
	}
	s := &sender{overlap: true}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { defer close(done); s.run(t, target, 20, 20*time.Millisecond, stop) }()
	killWithWorkInFlight(t, a, s, db)
	mu.Lock()
	aAlive = false
	mu.Unlock()
	before := s.ackedCount()
	eventually(t, readyWithin, "callbacks acknowledged by the survivor", func() bool { return s.ackedCount() >= before+10 })
	close(stop)
	<-done
	s.checkAllLanded(t, dsn, landWithin)
	wantReplayed(t, b.base)
}

func TestSIGTERMFinishesInFlightWork(t *testing.T) {
	dsn := testDSN(t)
	up := newUpstream(t, 800*time.Millisecond, nil)
	p := startProc(t, dsn, up.URL, "-grace", "10s")
	s := &sender{}
	stop := make(chan struct{})
	go func() { time.Sleep(500 * time.Millisecond); close(stop) }()
	s.run(t, func() string { return p.base }, 10, 50*time.Millisecond, stop)
	if err := p.signal(t, syscall.SIGTERM, 15*time.Second); err != nil {
		t.Fatalf("exit after SIGTERM: %v, want 0", err)
	}
	// Everything was finished before exit: nothing left for a next start,
	// so the table is complete at once.
	s.checkAllLanded(t, dsn, 0)
	if depth := journalDepth(t, openDB(t, dsn)); depth != 0 {
		t.Errorf("journal has %d rows after a clean drain", depth)
	}
}

func TestSIGTERMPastGraceParksTheRestForTheNextStart(t *testing.T) {
	dsn := testDSN(t)
	hanging := newUpstream(t, time.Hour, nil)
	p := startProc(t, dsn, hanging.URL, "-grace", "500ms", "-lease", "30s")
	s := &sender{}
	stop := make(chan struct{})
	go func() { time.Sleep(300 * time.Millisecond); close(stop) }()
	s.run(t, func() string { return p.base }, 10, 50*time.Millisecond, stop)
	start := time.Now()
	if err := p.signal(t, syscall.SIGTERM, 10*time.Second); err != nil {
		t.Fatalf("exit after SIGTERM: %v, want 0", err)
	}
	t.Logf("exited %s after SIGTERM", time.Since(start).Round(time.Millisecond))
	if depth := journalDepth(t, openDB(t, dsn)); depth != len(s.acked) || depth == 0 {
		t.Fatalf("journal has %d rows, want the %d unfinished callbacks", depth, len(s.acked))
	}
	// Parked rows carry an expired lease: the next start takes them at once,
	// not after the 30s lease.
	up := newUpstream(t, 0, nil)
	next := startProc(t, dsn, up.URL, "-lease", "30s")
	s.checkAllLanded(t, dsn, landWithin)
	if n := metricAt(t, next.base, "objtrack_journal_replayed_total"); n != float64(len(s.acked)) {
		t.Errorf("the next start took over %v rows, want the %d parked", n, len(s.acked))
	}
}

func TestDatabaseOutageMidRun(t *testing.T) {
	dsn := testDSN(t)
	proxy := newTCPProxy(t, "")
	proxied := proxy.dsn(t, dsn)
	proxy.setUp(true)
	up := newUpstream(t, 200*time.Millisecond, nil)
	svc := startService(t, proxied, up.URL)
	svc.waitReady(t)

	s := &sender{overlap: true}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { defer close(done); s.run(t, func() string { return svc.base }, 10, 50*time.Millisecond, stop) }()
	eventually(t, readyWithin, "callbacks acknowledged before the outage", func() bool { return s.ackedCount() >= 5 })
	proxy.setUp(false) // cut every connection and refuse new ones
	eventually(t, readyWithin, "readyz 503 during the outage", func() bool {
		status, _ := getBody(t, svc.base+"/readyz")
		return status == http.StatusServiceUnavailable
	})
	// The outage catches work: callbacks accepted into the spill.
	eventually(t, landWithin, "callbacks spilled during the outage", func() bool {
		return svc.metric(t, "objtrack_spill_appended_total") >= 10
	})
	proxy.setUp(true)
	svc.waitReady(t)
	before := s.ackedCount()
	eventually(t, readyWithin, "callbacks acknowledged after the outage", func() bool { return s.ackedCount() >= before+5 })
	close(stop)
	<-done
	if s.failed != 0 {
		t.Errorf("%d callbacks not acknowledged during the outage", s.failed)
	}
	s.checkAllLanded(t, dsn, landWithin)
	if n := svc.metric(t, "objtrack_journal_failures_total"); n != 0 {
		t.Errorf("%v callbacks answered with neither a journal row nor a spill record, want 0", n)
	}
	if n := svc.metric(t, "objtrack_spill_appended_total"); n == 0 {
		t.Error("nothing spilled during the outage")
	}
	// The callbacks spilled during the outage were journaled once
	// PostgreSQL was back (or finished before that).
	eventually(t, landWithin, "no callback in memory only", func() bool {
		return svc.metric(t, "objtrack_callbacks_memory_only") == 0
	})
}

func TestFloodBeyondBacklogGets503NotACrash(t *testing.T) {
	dsn := testDSN(t)
	up := newUpstream(t, time.Second, nil)
	svc := startService(t, dsn, up.URL, "-max-backlog", "40")
	svc.waitReady(t)
	var mu sync.Mutex
	codes := map[int]int{}
	var wg sync.WaitGroup
	for i := range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, _, err := tryPost(svc.base, idsBody(int64(i*2)), 5*time.Second)
			if err != nil {
				t.Errorf("post: %v", err)
			}
			mu.Lock()
			codes[status]++
			mu.Unlock()
		}()
	}
	wg.Wait()
	if codes[http.StatusAccepted] < 40 || codes[http.StatusServiceUnavailable] == 0 || codes[http.StatusAccepted]+codes[http.StatusServiceUnavailable] != 200 {
		t.Fatalf("codes %v, want at least 40×202, some 503 and nothing else", codes)
	}
	if status, _ := getBody(t, svc.base+"/healthz"); status != http.StatusOK {
		t.Fatalf("healthz after the flood: %d", status)
	}
	db := openDB(t, dsn)
	eventually(t, landWithin, "accepted callbacks applied", func() bool {
		return len(objectsIn(t, db)) == codes[http.StatusAccepted]
	})
}

// Callbacks accepted while PostgreSQL is down (into the spill) are
// journaled in PostgreSQL as soon as it is back, so a SIGKILL after the
// outage loses none of them even without the spill (the restart below uses
// a new spill directory).
func TestMemoryOnlyCallbacksAreJournaledWhenTheDatabaseReturns(t *testing.T) {
	dsn := testDSN(t)
	proxy := newTCPProxy(t, "")
	proxied := proxy.dsn(t, dsn)
	proxy.setUp(true)
	// Lookups hang until released, so the callbacks stay in memory.
	release := make(chan struct{})
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) })
	up := newUpstream(t, 0, func(w http.ResponseWriter, r *http.Request, id int64, n int) bool {
		select {
		case <-release:
		case <-r.Context().Done():
		}
		return false
	})
	a := startProc(t, proxied, up.URL, "-lease", "1s")
	proxy.setUp(false)
	eventually(t, landWithin, "readyz 503 during the outage", func() bool {
		status, _ := getBody(t, a.base+"/readyz")
		return status == http.StatusServiceUnavailable
	})
	s := &sender{}
	stop := make(chan struct{})
	go func() { time.Sleep(500 * time.Millisecond); close(stop) }()
	s.run(t, func() string { return a.base }, 10, 100*time.Millisecond, stop)
	if len(s.acked) == 0 {
		t.Fatal("no callback was acknowledged during the outage")
	}
	eventually(t, landWithin, "callbacks spilled", func() bool {
		return metricAt(t, a.base, "objtrack_spill_records") == float64(len(s.acked)) &&
			metricAt(t, a.base, "objtrack_callbacks_memory_only") == 0
	})
	proxy.setUp(true)
	eventually(t, landWithin, "memory-only callbacks journaled", func() bool {
		return metricAt(t, a.base, "objtrack_journal_rejournaled_total") == float64(len(s.acked)) &&
			metricAt(t, a.base, "objtrack_callbacks_memory_only") == 0 &&
			metricAt(t, a.base, "objtrack_spill_moved_total") == float64(len(s.acked))
	})
	_ = a.signal(t, syscall.SIGKILL, 5*time.Second)
	once.Do(func() { close(release) })
	b := startProc(t, dsn, up.URL, "-lease", "1s")
	s.checkAllLanded(t, dsn, landWithin)
	if n := metricAt(t, b.base, "objtrack_journal_replayed_total"); n != float64(len(s.acked)) {
		t.Errorf("the restarted instance took over %v rows, want the %d journaled after the outage", n, len(s.acked))
	}
}
