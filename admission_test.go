package main

import (
	"errors"
	"runtime"
	"sync"
	"testing"
	"time"
)

func TestAdmissionShedsOnlyNewIDsPastTheBound(t *testing.T) {
	// 100 fetch slots and attempts of 1 s: capacity 100 ids/s; the bound
	// is 2 s, so up to 200 ids may wait.
	tests := []struct {
		name      string
		waiting   int64
		newIDs    int
		shed      bool
		wantRetry time.Duration
	}{
		{"nothing waiting: admit whatever the size", 0, 10000, false, 0},
		{"every id already being fetched: admit", 5000, 0, false, 0},
		{"queue and new ids within the bound", 100, 100, false, 0},
		{"new ids past the bound", 150, 100, true, 500 * time.Millisecond},
		{"queue far past the bound", 1000, 1, true, 8010 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig(t, "-max-queue-wait", "2s")
			m := newMetrics()
			f := newFetcher(cfg, instantObjects{}, (&savedRows{}).save, discardLogger(), m, &guard{log: discardLogger(), metrics: m})
			f.slots.setLimit(100)
			f.meter.observe(time.Second, true, false)
			l := newFetchLimiter(f.slots, &f.meter, &f.waiting, nil, m)
			a := newAdmission(cfg, f, l, m)
			f.waiting.Store(tt.waiting)
			err := a.check(tt.newIDs)
			var o *overloaded
			if got := errors.As(err, &o); got != tt.shed {
				t.Fatalf("shed %v (%v), want %v", got, err, tt.shed)
			}
			if tt.shed && (o.reason != "queue_wait" || o.retryAfter.Round(10*time.Millisecond) != tt.wantRetry) {
				t.Errorf("shed %+v, want queue_wait and Retry-After %s", o, tt.wantRetry)
			}
		})
	}
}

func TestAdmissionBoundIsCappedByTheTTL(t *testing.T) {
	cfg := testConfig(t, "-max-queue-wait", "1m", "-ttl", "30s")
	if got := newAdmission(cfg, nil, nil, newMetrics()).maxWait; got != 25*time.Second {
		t.Errorf("bound %s, want 25s (5/6 of the TTL)", got)
	}
}

func TestAnswerLimiterAdjusts(t *testing.T) {
	const target = 250 * time.Millisecond
	tests := []struct {
		name                       string
		limit, answers, slow, peak int64
		want                       int64
	}{
		{"many slow answers cut to 3/4 of the peak in use", 800, 100, 10, 800, 600},
		{"many slow answers with the limit mostly unused", 800, 100, 10, 400, 300},
		{"never below the floor", 80, 100, 100, 80, minHandling},
		{"one slow answer in twenty: hold", 800, 100, 5, 790, 800},
		{"no slow answer and the limit used: grow by a sixteenth", 800, 100, 0, 790, 850},
		{"no slow answer and the limit unused: stay", 800, 100, 0, 100, 800},
		{"never above the cap", maxHandling, 100, 0, maxHandling, maxHandling},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := newAnswerLimiter(target, newMetrics())
			l.limit.Store(tt.limit)
			l.slowTicks = slowTicksToCut - 1 // the tick before was slow too
			l.adjust(time.Now(), tt.answers, tt.slow, tt.peak)
			if got := l.limit.Load(); got != tt.want {
				t.Errorf("limit %d, want %d", got, tt.want)
			}
			if got := l.metrics.handlingLimit.Value(); tt.want != tt.limit && got != tt.want {
				t.Errorf("gauge %d, want %d", got, tt.want)
			}
		})
	}
}

// One slow tick is a stall that ends by itself: no cut.
func TestAnswerLimiterIgnoresOneSlowTick(t *testing.T) {
	l := newAnswerLimiter(250*time.Millisecond, newMetrics())
	l.limit.Store(1000)
	now := time.Now()
	l.adjust(now, 100, 100, 1000)
	l.adjust(now.Add(limitTick), 100, 0, 100)
	l.adjust(now.Add(2*limitTick), 100, 100, 1000)
	if got := l.limit.Load(); got != 1000 {
		t.Fatalf("limit %d after slow ticks that were not in a row, want 1000", got)
	}
}

func TestAnswerLimiterCutsOncePerCooldown(t *testing.T) {
	l := newAnswerLimiter(250*time.Millisecond, newMetrics())
	l.limit.Store(1000)
	now := time.Now()
	l.adjust(now, 100, 100, 1000)
	l.adjust(now.Add(limitTick), 100, 100, 1000)
	l.adjust(now.Add(2*limitTick), 100, 100, 1000)
	if got := l.limit.Load(); got != 750 {
		t.Fatalf("limit %d after three slow ticks within the cooldown, want one cut to 750", got)
	}
	l.adjust(now.Add(2*limitTick+limitCooldown), 100, 100, 750)
	if got := l.limit.Load(); got != 750*3/4 {
		t.Fatalf("limit %d after the cooldown, want a second cut to %d", got, 750*3/4)
	}
}

// Two starved ticks in a row cut the limit however fast the handlers
// answered, and a starved tick stops it growing; fast answers alone grow it.
func TestAnswerLimiterCutsWhenStarvedOfCPU(t *testing.T) {
	tests := []struct {
		name    string
		starved []bool
		want    int64
	}{
		{"fast answers, not starved: grow twice", []bool{false, false}, 1000 + 1000/16 + 1062/16},
		{"fast answers, starved twice: cut to 3/4", []bool{true, true}, 750},
		{"starved once: hold", []bool{false, true}, 1000 + 1000/16},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := newAnswerLimiter(250*time.Millisecond, newMetrics())
			l.limit.Store(1000)
			now := time.Now()
			for i, starved := range tt.starved {
				for range l.limit.Load() {
					l.enter()
				}
				for range l.limit.Load() {
					l.leave(time.Millisecond)
				}
				l.tick(now.Add(time.Duration(i)*limitTick), starved)
			}
			if got := l.limit.Load(); got != tt.want {
				t.Errorf("limit %d, want %d", got, tt.want)
			}
		})
	}
}

// The meter sees goroutines kept waiting for a CPU: on one P, eight
// goroutines that spin for 300 ms share it in 10 ms slices, each waiting
// about 70 ms for its next one. Goroutines that only hand each other a
// value are not starved.
func TestSchedMeterSeesGoroutinesWaitingForACPU(t *testing.T) {
	s := newSchedMeter()
	s.starved()
	pingPong(1000)
	if s.starved() {
		t.Fatal("starved while goroutines only handed values to each other")
	}
	procs := runtime.GOMAXPROCS(1)
	t.Cleanup(func() { runtime.GOMAXPROCS(procs) })
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for end := time.Now().Add(300 * time.Millisecond); time.Now().Before(end); {
			}
		})
	}
	wg.Wait()
	if !s.starved() {
		t.Error("not starved after 8 goroutines shared one P for 300 ms")
	}
	pingPong(1000)
	if s.starved() {
		t.Error("starved after the spinning ended, while goroutines only handed values to each other")
	}
}

// pingPong has two goroutines hand a value back and forth n times: n quick
// waits to run.
func pingPong(n int) {
	ping, pong := make(chan int), make(chan int)
	go func() {
		for v := range ping {
			pong <- v
		}
	}()
	for i := range n {
		ping <- i
		<-pong
	}
	close(ping)
}

func TestAnswerLimiterEnterAndLeave(t *testing.T) {
	l := newAnswerLimiter(250*time.Millisecond, newMetrics())
	l.limit.Store(2)
	if !l.enter() || !l.enter() {
		t.Fatal("the first two callbacks must get a place")
	}
	if l.enter() {
		t.Fatal("a third callback got a place past the limit of 2")
	}
	l.leave(300 * time.Millisecond)
	if !l.enter() {
		t.Fatal("a place given back must be taken again")
	}
	l.leave(10 * time.Millisecond)
	l.leave(0) // not accepted: not an answer time
	if peak, answers, slow := l.peak.Load(), l.answers.Load(), l.slow.Load(); peak != 2 || answers != 2 || slow != 1 {
		t.Errorf("peak %d, answers %d, slow %d; want 2, 2 and 1", peak, answers, slow)
	}
}
