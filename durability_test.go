package main

import (
	"encoding/json"
	"fmt"
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

// acked is a callback that got a 202: its online ids must reach the table
// with a last_seen no earlier than when it was sent.
type acked struct {
	ids  []int64
	sent time.Time
}

// sender posts callbacks of n fresh ids at the given interval to whichever
// base URL target returns, until stop is closed, and records the acked ones.
type sender struct {
	mu     sync.Mutex
	acked  []acked
	failed int
	nextID int64
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
		ids := make([]int64, n)
		for i := range ids {
			s.nextID++
			ids[i] = s.nextID
		}
		s.mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			sent := time.Now().Truncate(time.Microsecond)
			resp, err := client.Post(target()+"/callback", "application/json", strings.NewReader(idsBody(ids...)))
			s.mu.Lock()
			defer s.mu.Unlock()
			if err != nil {
				s.failed++
				return
			}
			defer resp.Body.Close()
			var body acceptedBody
			_ = json.NewDecoder(resp.Body).Decode(&body)
			if resp.StatusCode != http.StatusAccepted {
				s.failed++
				return
			}
			s.acked = append(s.acked, acked{ids: ids, sent: sent})
		}()
	}
}

// checkAllLanded waits until every online id of every acked callback is in
// the table with last_seen at or after its send time.
func (s *sender) checkAllLanded(t *testing.T, dsn string, timeout time.Duration) {
	t.Helper()
	db := openDB(t, dsn)
	s.mu.Lock()
	all := append([]acked(nil), s.acked...)
	s.mu.Unlock()
	if len(all) == 0 {
		t.Fatal("no callback was acknowledged")
	}
	var missing []string
	eventually(t, timeout, "every acknowledged callback in the table", func() bool {
		got := objectsIn(t, db)
		missing = missing[:0]
		for _, a := range all {
			for _, id := range a.ids {
				if id%2 == 0 && (got[id].IsZero() || got[id].Before(a.sent)) {
					missing = append(missing, fmt.Sprint(id))
				}
				if id%2 != 0 && !got[id].IsZero() {
					t.Fatalf("offline id %d stored", id)
				}
			}
		}
		return len(missing) == 0
	})
	t.Logf("%d acknowledged callbacks all landed (%d sends failed while a service was down)", len(all), s.failed)
}

func slowUpstream(t *testing.T) *upstream {
	// Lookups take a while, so plenty of callbacks are in flight at a kill.
	return newUpstream(t, 0, func(w http.ResponseWriter, r *http.Request, id int64, n int) bool {
		time.Sleep(time.Duration(300+id%7*150) * time.Millisecond)
		return false
	})
}

func TestSIGKILLAndRestartLosesNoAcknowledgedCallback(t *testing.T) {
	dsn := testDSN(t)
	up := slowUpstream(t)
	spillDir := t.TempDir() // the restart replays what the killed one spilled
	a := startProc(t, dsn, up.URL, "-lease", "1s", "-spill-dir", spillDir)
	var mu sync.Mutex
	target := a.base
	s := &sender{}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.run(t, func() string { mu.Lock(); defer mu.Unlock(); return target }, 20, 20*time.Millisecond, stop)
	}()
	time.Sleep(1500 * time.Millisecond)
	_ = a.signal(t, syscall.SIGKILL, 5*time.Second)
	b := startProc(t, dsn, up.URL, "-lease", "1s", "-spill-dir", spillDir)
	mu.Lock()
	target = b.base
	mu.Unlock()
	time.Sleep(time.Second)
	close(stop)
	<-done
	s.checkAllLanded(t, dsn, landWithin)
	// A callback's rows land as their lookups end; its journal row goes
	// just after the last of them.
	db := openDB(t, dsn)
	eventually(t, landWithin, "the journal empty after catching up", func() bool { return journalDepth(t, db) == 0 })
}

// busyLoops keeps every core busy for the rest of the test, as other
// processes on a shared machine do. Each loop is bounded by timeout(1), so
// none outlives a test binary that dies; the cleanup sends SIGTERM, which
// timeout passes on to its loop (a SIGKILL would orphan the loop).
func busyLoops(t *testing.T) {
	t.Helper()
	for range runtime.NumCPU() {
		cmd := exec.Command("timeout", "120", "sh", "-c", "while :; do :; done")
		if err := cmd.Start(); err != nil {
			t.Fatalf("start busy loop: %v", err)
		}
		t.Cleanup(func() {
			_ = cmd.Process.Signal(syscall.SIGTERM)
			_ = cmd.Wait()
		})
	}
}

// The promise on a busy machine: with every core taken by busy loops, each
// callback answered 2xx has its journal row committed (none is left in
// memory only), so a SIGKILL loses none of them.
func TestKillUnderCPUPressureLosesNoAcknowledgedCallback(t *testing.T) {
	dsn := testDSN(t)
	up := slowUpstream(t)
	spillDir := t.TempDir() // the restart replays what the killed one spilled
	a := startProc(t, dsn, up.URL, "-lease", "1s", "-spill-dir", spillDir)
	busyLoops(t)
	s := &sender{}
	stop := make(chan struct{})
	go func() { time.Sleep(4 * time.Second); close(stop) }()
	s.run(t, func() string { return a.base }, 50, 100*time.Millisecond, stop)
	// Every answer is in; a journal write that missed its answer deadline
	// must have committed since, or the kill loses its callback.
	failures := metricAt(t, a.base, "objtrack_journal_failures_total")
	late := metricAt(t, a.base, "objtrack_journal_late_total")
	_ = a.signal(t, syscall.SIGKILL, 5*time.Second)
	t.Logf("%d callbacks acknowledged under CPU pressure; %v answered before their journal commit, %v of them committed late", len(s.acked), failures, late)
	if failures != 0 {
		t.Errorf("%v callbacks were answered with neither a journal row nor a spill record", failures)
	}
	startProc(t, dsn, up.URL, "-lease", "1s", "-spill-dir", spillDir)
	s.checkAllLanded(t, dsn, landWithin)
}

func TestTwoInstancesOneKilled(t *testing.T) {
	dsn := testDSN(t)
	up := slowUpstream(t)
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
	s := &sender{}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { defer close(done); s.run(t, target, 20, 20*time.Millisecond, stop) }()
	time.Sleep(1500 * time.Millisecond)
	mu.Lock()
	aAlive = false
	mu.Unlock()
	_ = a.signal(t, syscall.SIGKILL, 5*time.Second)
	time.Sleep(time.Second)
	close(stop)
	<-done
	s.checkAllLanded(t, dsn, landWithin)
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
	// Everything was finished before exit: nothing left for a next start.
	s.checkAllLanded(t, dsn, time.Second)
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
	if depth := journalDepth(t, openDB(t, dsn)); depth != len(s.acked) {
		t.Fatalf("journal has %d rows, want the %d unfinished callbacks", depth, len(s.acked))
	}
	// Parked rows carry an expired lease: the next start takes them at once,
	// not after the 30s lease.
	up := newUpstream(t, 0, nil)
	startProc(t, dsn, up.URL, "-lease", "30s")
	s.checkAllLanded(t, dsn, landWithin)
}

func TestDatabaseOutageMidRun(t *testing.T) {
	dsn := testDSN(t)
	proxy := newTCPProxy(t, "")
	proxied := proxy.dsn(t, dsn)
	proxy.setUp(true)
	up := newUpstream(t, 200*time.Millisecond, nil)
	svc := startService(t, proxied, up.URL)
	svc.waitReady(t)

	s := &sender{}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { defer close(done); s.run(t, func() string { return svc.base }, 10, 50*time.Millisecond, stop) }()
	time.Sleep(500 * time.Millisecond)
	proxy.setUp(false) // cut every connection and refuse new ones
	eventually(t, 5*time.Second, "readyz 503 during the outage", func() bool {
		resp, err := http.Get(svc.base + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusServiceUnavailable
	})
	time.Sleep(2 * time.Second)
	proxy.setUp(true)
	time.Sleep(500 * time.Millisecond)
	close(stop)
	<-done
	if s.failed != 0 {
		t.Errorf("%d callbacks not acknowledged during the outage", s.failed)
	}
	svc.waitReady(t)
	s.checkAllLanded(t, dsn, landWithin)
	if n := svc.metric(t, "objtrack_journal_failures_total"); n != 0 {
		t.Errorf("%v callbacks answered with neither a journal row nor a spill record, want 0", n)
	}
	if n := svc.metric(t, "objtrack_spill_appended_total"); n == 0 {
		t.Error("nothing spilled during the outage")
	}
	// The callbacks accepted into memory only during the outage were
	// journaled once PostgreSQL was back (or finished before that).
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
			status, _ := post(t, svc.base, idsBody(int64(i*2)))
			mu.Lock()
			codes[status]++
			mu.Unlock()
		}()
	}
	wg.Wait()
	if codes[http.StatusAccepted] < 40 || codes[http.StatusServiceUnavailable] == 0 || codes[http.StatusAccepted]+codes[http.StatusServiceUnavailable] != 200 {
		t.Fatalf("codes %v, want at least 40×202, some 503 and nothing else", codes)
	}
	resp, err := http.Get(svc.base + "/healthz")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("healthz after the flood: %v %v", resp, err)
	}
	resp.Body.Close()
	db := openDB(t, dsn)
	eventually(t, 10*time.Second, "accepted callbacks applied", func() bool {
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
	startProc(t, dsn, up.URL, "-lease", "1s")
	s.checkAllLanded(t, dsn, landWithin)
}
