package main

import (
	"errors"
	"net/http"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Free slots go to the earliest deadline first: with one slot held by a
// plug, lookups queued newest first are fetched oldest first, so that
// taken-over and retried work goes before new work.
func TestFreeSlotsGoToTheEarliestDeadline(t *testing.T) {
	release := make(chan struct{})
	var mu sync.Mutex
	var order []int64
	up := newUpstream(t, 0, func(w http.ResponseWriter, r *http.Request, id int64, n int) bool {
		if id == 1000 {
			<-release
			return false
		}
		mu.Lock()
		order = append(order, id)
		mu.Unlock()
		return false
	})
	p := fetchApp(t, testConfig(t, "-upstream", up.URL, "-max-inflight", "1"), nil)
	now := time.Now()
	plug := newCallback(now, []int64{1000})
	var wg sync.WaitGroup
	wg.Add(1)
	p.fetcher.lookupAll(t.Context(), plug, wg.Done)
	eventually(t, landWithin, "the plug holding the one slot", func() bool { return up.count(1000) == 1 })
	// Queued newest first; each callback's receipt is its deadline - TTL.
	cbs := []*callback{
		newCallback(now, []int64{1, 2}),
		newCallback(now.Add(-10*time.Second), []int64{5, 6}), // taken over: oldest
		newCallback(now.Add(-5*time.Second), []int64{3, 4}),
	}
	for _, cb := range cbs {
		wg.Add(1)
		p.fetcher.lookupAll(t.Context(), cb, wg.Done)
	}
	if got := p.fetcher.waiting.Load(); got != 6 {
		t.Fatalf("%d flights queued, want 6", got)
	}
	close(release)
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	got := [3][]int64{}
	for i, id := range order {
		got[i/2] = append(got[i/2], id)
	}
	for i, want := range [][2]int64{{5, 6}, {3, 4}, {1, 2}} {
		if len(got[i]) != 2 || min(got[i][0], got[i][1]) != want[0] || max(got[i][0], got[i][1]) != want[1] {
			t.Fatalf("fetch order %v, want 5,6 then 3,4 then 1,2 (earliest deadline first)", order)
		}
	}
}

// A quarter of answers failing is paced by retries, never rationed into a
// drop: every lookup lands well within a short TTL, with one retry per
// failure and no more.
func TestRetriesOfAFlakyServiceAreNotRationed(t *testing.T) {
	up := newUpstream(t, 0, func(w http.ResponseWriter, r *http.Request, id int64, n int) bool {
		if id%4 == 0 && n == 1 { // a quarter of first attempts fail
			http.Error(w, "flaky", http.StatusInternalServerError)
			return true
		}
		return false
	})
	// With the old budget (a tenth of first attempts plus 10/s) the 100
	// retries needed here took longer than this TTL and lookups dropped.
	p := fetchApp(t, testConfig(t, "-upstream", up.URL, "-ttl", "3s"), nil)
	cbs := distinctCallbacks(10, 40)
	resolveAll(p.fetcher, cbs...)
	for _, cb := range cbs {
		wantResults(t, cb)
	}
	if got, want := up.total(), 400+100; got != want {
		t.Errorf("%d requests, want %d (one retry per failure)", got, want)
	}
	if got := p.metrics.retries.Value(); got != 100 {
		t.Errorf("retries %d, want 100", got)
	}
	if got := p.metrics.idsDropped.Value(); got != 0 {
		t.Errorf("%d ids dropped, want 0", got)
	}
}

// While the object service fails everything, the lookups wait as heap
// entries (no goroutine each), the service sees only a few probes a
// second, and once it answers again every lookup lands within its TTL.
func TestDeadObjectServiceIsProbedAndLookupsResume(t *testing.T) {
	var dead atomic.Bool
	dead.Store(true)
	up := newUpstream(t, 0, func(w http.ResponseWriter, r *http.Request, id int64, n int) bool {
		if dead.Load() {
			http.Error(w, "dead", http.StatusInternalServerError)
			return true
		}
		return false
	})
	// Few slots, so few connections and the goroutines that serve them.
	p := fetchApp(t, testConfig(t, "-upstream", up.URL, "-ttl", "20s", "-max-inflight", "8"), nil)
	ctx := t.Context()
	go p.fetcher.upstream.run(ctx)
	before := runtime.NumGoroutine()
	cbs := distinctCallbacks(40, 50) // 2000 lookups
	var wg sync.WaitGroup
	for _, cb := range cbs {
		wg.Add(1)
		p.fetcher.lookupAll(ctx, cb, wg.Done)
	}
	eventually(t, landWithin, "the object service judged down", p.fetcher.upstream.isDown)
	// Let the attempts that were out when it was judged come back.
	eventually(t, landWithin, "only probes out", func() bool { return p.fetcher.slots.inUse() <= 1 })
	if n := runtime.NumGoroutine() - before; n > 50 {
		t.Errorf("%d more goroutines while 2000 lookups wait, want under 50", n)
	}
	from, start := up.total(), time.Now()
	time.Sleep(2 * time.Second)
	probes, took := up.total()-from, time.Since(start)
	// One probe per probeEvery, and one more at each end of the window.
	if most := int(took/probeEvery) + 2; probes > most {
		t.Errorf("%d requests in %s while down, want at most %d (probes only)", probes, took.Round(time.Millisecond), most)
	}
	if probes == 0 {
		t.Error("no probe while the object service was down")
	}
	dead.Store(false)
	wg.Wait()
	for _, cb := range cbs {
		wantResults(t, cb)
	}
	if got := p.metrics.idsDropped.Value(); got != 0 {
		t.Errorf("%d ids dropped, want 0", got)
	}
}

// An attempt that cannot land before the deadline is not made: the lookup
// is dropped and counted without a request.
func TestLookupTooCloseToItsDeadlineIsNotAttempted(t *testing.T) {
	up := newUpstream(t, 0, nil)
	p := fetchApp(t, testConfig(t, "-upstream", up.URL, "-ttl", "10s"), nil)
	cb := newCallback(time.Now().Add(-10*time.Second+landMargin/2), []int64{2})
	resolveAll(p.fetcher, cb)
	if r := cb.result(0); r != resultExpired {
		t.Errorf("result %d, want expired", r)
	}
	if up.total() != 0 {
		t.Errorf("%d requests for a lookup that could not land", up.total())
	}
	if got := p.metrics.idsDropped.Value(); got != 1 {
		t.Errorf("ids dropped %d, want 1", got)
	}
}

// The object service is judged on each second's attempts: down only when
// some failed and none answered, and not in a second this process was
// starved of the CPU; it is "unknown" until an attempt ends.
func TestUpstreamHealthJudgesAWindow(t *testing.T) {
	errDown := http.ErrHandlerTimeout
	tests := []struct {
		name       string
		answered   int
		failures   int
		starved    bool
		wantDown   bool
		wantGauge  float64
		wantStatus string
	}{
		{"all failed", 0, 20, false, true, 0, "down: "},
		{"a quarter failed: flaky, not down", 15, 5, false, false, 1, "up"},
		{"too few failures to judge", 0, upstreamDownAfter - 1, false, false, -1, "up"},
		{"starved: not judged", 0, 20, true, false, -1, "up"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newMetrics()
			h := newUpstreamHealth("http://x", discardLogger(), m, &guard{log: discardLogger(), metrics: m})
			if got := h.state(); got != "unknown" {
				t.Fatalf("state before any attempt %q, want unknown", got)
			}
			if g := m.upstreamUp.Value(); g == g { // NaN != NaN
				t.Fatalf("objtrack_upstream_up %v before any attempt, want NaN", g)
			}
			for range tt.failures {
				h.record(errDown)
			}
			for range tt.answered {
				h.record(nil)
			}
			h.judge(tt.starved)
			if h.isDown() != tt.wantDown {
				t.Errorf("down %v, want %v", h.isDown(), tt.wantDown)
			}
			if got := h.state(); len(got) < len(tt.wantStatus) || got[:len(tt.wantStatus)] != tt.wantStatus {
				t.Errorf("state %q, want %q…", got, tt.wantStatus)
			}
			if g := m.upstreamUp.Value(); tt.wantGauge >= 0 && g != tt.wantGauge {
				t.Errorf("objtrack_upstream_up %v, want %v", g, tt.wantGauge)
			}
			h.record(nil)
			if h.isDown() {
				t.Error("still down after a valid answer")
			}
		})
	}
}

// Failed attempts count toward neither the rate nor the latency, and while
// the object service is only probed the rate does not learn: admission
// keeps the capacity measured while it answered.
func TestFetchMeterLearnsOnlyFromAnswers(t *testing.T) {
	var m fetchMeter
	m.observe(2*time.Second, true, false)
	for range 50 {
		m.observe(time.Millisecond, false, false)
	}
	if m.latency != 2 {
		t.Errorf("latency %vs after fast failures, want 2s (answers only)", m.latency)
	}
	if s := m.tick(true, time.Second); s.attempts != 51 || s.failed != 50 {
		t.Errorf("tick %+v, want 51 attempts, 50 failed", s)
	}
	if m.rate != 0.2 { // one answer in a saturated second, weighted 0.2
		t.Errorf("rate %v after a tick of 1 answer and 50 failures, want 0.2", m.rate)
	}
	rate := m.rate
	m.observe(time.Millisecond, true, false)
	m.tick(false, time.Second) // probing: not saturated as far as the rate goes
	if m.rate != rate {
		t.Errorf("rate moved from %v to %v on an unsaturated tick", rate, m.rate)
	}
}

// Most attempts failing cuts the fetch limit (an overloaded object service
// needs fewer at once); a quarter failing does not.
func TestFetchLimiterCutsOnObjectServiceDistress(t *testing.T) {
	tests := []struct {
		name    string
		fetched fetchSample
		want    int
	}{
		{"most failed: cut to 3/4 in use", fetchSample{attempts: 100, failed: 60}, 750},
		{"a quarter failed: grow", fetchSample{attempts: 100, failed: 25}, 1000 + 1000/16},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, s := limiterAt(t, 1000, 1000, 0)
			l.adjust(time.Now(), lagSample{10, 0}, tt.fetched)
			if got := s.limit(); got != tt.want {
				t.Errorf("limit %d, want %d", got, tt.want)
			}
		})
	}
}

// Taken-over callbacks are promised work: their lookups wait in the same
// queue, admission counts them, and new callbacks are shed while they
// drain.
func TestAdmissionCountsTakenOverWork(t *testing.T) {
	up := newUpstream(t, time.Hour, nil) // lookups never finish: the queue stays
	p := testApp(t, testConfig(t, "-upstream", up.URL, "-max-inflight", "2", "-max-queue-wait", "1s"), nil)
	runFetchQueue(t, p.fetcher)
	ids := make([]int64, 50)
	for i := range ids {
		ids[i] = int64(i)
	}
	if n := p.pipe.resume([]journalRow{{journalID: 1, receivedAt: time.Now().Add(-5 * time.Second), objectIDs: ids}}); n != 1 {
		t.Fatalf("resumed %d callbacks, want 1", n)
	}
	eventually(t, landWithin, "the taken-over lookups queued", func() bool { return p.fetcher.waiting.Load() == 48 })
	err := p.pipe.admission.check(p.fetcher.countNew([]int64{100, 101}))
	var o *overloaded
	if !errors.As(err, &o) || o.reason != "queue_wait" {
		t.Errorf("a new callback while 48 taken-over lookups wait for 2 slots: %v, want shed for queue_wait", err)
	}
}

// Answers near the time limit are distress too: the limiter cuts when most
// attempts fail or answer slowly.
func TestFetchMeterCountsSlowAnswersAsDistress(t *testing.T) {
	var m fetchMeter
	for range 6 {
		m.observe(4*time.Second, true, true)
	}
	for range 4 {
		m.observe(time.Second, true, false)
	}
	m.observe(time.Millisecond, false, false)
	if s := m.tick(true, time.Second); s.attempts != 11 || s.failed != 7 {
		t.Errorf("tick %+v, want 11 attempts, 7 in distress (6 slow, 1 failed)", s)
	}
}

// Attempts run on long-lived workers, about one per slot, not on a new
// goroutine each; once the load is gone, the idle workers are retired.
func TestFetchWorkersOutliveAttemptsAndRetire(t *testing.T) {
	up := newUpstream(t, time.Millisecond, nil)
	p := fetchApp(t, testConfig(t, "-upstream", up.URL, "-max-inflight", "8"), nil)
	cbs := distinctCallbacks(20, 50) // 1000 flights through 8 slots
	resolveAll(p.fetcher, cbs...)
	for _, cb := range cbs {
		wantResults(t, cb)
	}
	// A worker that has handed out its answer may still be on its way
	// back when the dispatcher takes its slot again: a few more than 8.
	if n := p.fetcher.workers.Load(); n < 1 || n > 16 {
		t.Errorf("%d fetch workers after 1000 attempts through 8 slots, want 1-16 still idle", n)
	}
	eventually(t, 20*time.Second, "idle fetch workers retired", func() bool { return p.fetcher.workers.Load() == 0 })
}
