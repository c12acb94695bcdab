package main

import (
	"context"
	"sync/atomic"
	"testing"
	"time"
)

func TestFetchSlotsLimitInForce(t *testing.T) {
	s := newFetchSlots(10, 4)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	for i := range 4 {
		if !s.acquire(ctx) {
			t.Fatalf("slot %d of 4 not granted", i+1)
		}
	}
	if s.acquire(ctx) {
		t.Fatal("a fifth slot was granted under a limit of 4")
	}
	// Lowering the limit below what is in use parks slots as they return.
	s.setLimit(2)
	s.release()
	s.release()
	if got := s.inUse(); got != 2 {
		t.Fatalf("in use %d after two releases, want 2", got)
	}
	ctx2, cancel2 := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel2()
	if s.acquire(ctx2) {
		t.Fatal("a slot was granted above the lowered limit")
	}
	// Raising it frees parked slots at once.
	s.setLimit(5)
	for i := range 3 {
		if !s.acquire(context.Background()) {
			t.Fatalf("slot %d after raising the limit not granted", i+1)
		}
	}
	if s.limit() != 5 || s.inUse() != 5 {
		t.Fatalf("limit %d, in use %d, want 5 and 5", s.limit(), s.inUse())
	}
}

// limiterAt is a fetch limiter over a hard cap of 4096 slots with limit
// set and inUse of them taken.
func limiterAt(t *testing.T, limit, inUse int, waiting int64) (*fetchLimiter, *fetchSlots) {
	t.Helper()
	s := newFetchSlots(4096, limit)
	for range inUse {
		s.acquire(context.Background())
	}
	w := new(atomic.Int64)
	w.Store(waiting)
	return newFetchLimiter(s, &fetchMeter{}, w, nil, newMetrics()), s
}

func TestFetchLimiterAdjusts(t *testing.T) {
	tests := []struct {
		name         string
		limit, inUse int
		waiting      int64
		sample       lagSample
		want         int
	}{
		{"slow journal cuts to 3/4 of the fetches in flight", 800, 800, 0, lagSample{40, 4}, 600},
		{"slow journal with the limit mostly unused", 800, 400, 0, lagSample{40, 4}, 300},
		{"never below the floor", 80, 80, 0, lagSample{10, 10}, minLimit},
		{"one slow commit is noise: hold", 800, 790, 0, lagSample{3, 1}, 800},
		{"a few slow commits among many: hold", 800, 790, 0, lagSample{100, 4}, 800},
		{"fast journal and the limit used: grow by a sixteenth", 800, 790, 0, lagSample{40, 0}, 850},
		{"ids waiting: grow by a quarter, at most maxStep", 2000, 1990, 10, lagSample{40, 0}, 2000 + maxStep},
		{"ids waiting, small limit: grow by a quarter", 200, 190, 10, lagSample{40, 0}, 250},
		{"fast journal and the limit unused: stay", 800, 100, 0, lagSample{40, 0}, 800},
		{"never above the hard cap", 4000, 4000, 0, lagSample{}, 4096},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, s := limiterAt(t, tt.limit, tt.inUse, tt.waiting)
			l.adjust(time.Now(), tt.sample, fetchSample{})
			if got := s.limit(); got != tt.want {
				t.Errorf("limit %d, want %d", got, tt.want)
			}
			if got := l.metrics.fetchLimit.Value(); got != int64(tt.want) {
				t.Errorf("gauge %d, want %d", got, tt.want)
			}
		})
	}
}

// The controller judges a window of ticks: slow commits spread over
// several ticks count together, and a slow spell is remembered for the
// window after it, so the limit does not grow straight back.
func TestFetchLimiterJudgesAWindow(t *testing.T) {
	l, s := limiterAt(t, 800, 800, 0)
	now := time.Now()
	l.adjust(now, lagSample{10, 1}, fetchSample{})
	l.adjust(now.Add(limitTick), lagSample{10, 0}, fetchSample{})
	if got := s.limit(); got != 800 {
		t.Fatalf("limit %d after one slow commit, want 800", got)
	}
	l.adjust(now.Add(2*limitTick), lagSample{10, 1}, fetchSample{})
	if got := s.limit(); got != 600 {
		t.Fatalf("limit %d after two slow commits of 30 in the window, want 600", got)
	}
	for i := range lagWindow - 1 {
		l.adjust(now.Add(fetchCutCooldown+time.Duration(i)*limitTick), lagSample{10, 0}, fetchSample{})
		if got := s.limit(); got != 600 {
			t.Fatalf("limit %d %d ticks after the slow spell, still in the window: want 600", got, i+1)
		}
	}
}

// After a cut the limiter waits for in-flight fetches to drain before it
// cuts again or grows, instead of driving the limit to the floor in a few
// ticks; then it grows by probeStep at most while near the level it cut.
func TestFetchLimiterAfterACut(t *testing.T) {
	l, s := limiterAt(t, 1000, 1000, 100)
	slow := lagSample{10, 5}
	now := time.Now()
	l.adjust(now, slow, fetchSample{})
	l.adjust(now.Add(limitTick), slow, fetchSample{})
	if got := s.limit(); got != 750 {
		t.Fatalf("limit %d after two slow ticks within the cooldown, want one cut to 750", got)
	}
	l.adjust(now.Add(fetchCutCooldown), slow, fetchSample{})
	if got := s.limit(); got != 750*3/4 {
		t.Fatalf("limit %d after the cooldown, want a second cut to %d", got, 750*3/4)
	}
	// Then the journal is fast, the limit used up and ids wait: the limit
	// holds for the cooldown, then grows by probeStep a tick.
	cut := now.Add(fetchCutCooldown)
	for range s.limit() - s.inUse() {
		s.acquire(context.Background())
	}
	for i := 1; i <= int(fetchCutCooldown/limitTick)+1; i++ {
		l.adjust(cut.Add(time.Duration(i)*limitTick), lagSample{10, 0}, fetchSample{})
	}
	if got, want := s.limit(), 750*3/4+2*probeStep; got != want {
		t.Fatalf("limit %d a tick past the cooldown, want %d (probeStep twice)", got, want)
	}
}

// A cut to the floor (the journal stalled: the database going away, say)
// is not a level to probe around: past the cooldown the limit grows fast.
func TestFetchLimiterGrowsFastFromTheFloor(t *testing.T) {
	l, s := limiterAt(t, 80, 80, 100)
	now := time.Now()
	l.adjust(now, lagSample{1, 1}, fetchSample{})
	l.adjust(now.Add(limitTick), lagSample{1, 1}, fetchSample{})
	if got := s.limit(); got != minLimit {
		t.Fatalf("limit %d after a stall, want the floor %d", got, minLimit)
	}
	at := now
	for got := s.limit(); got < 1000; got = s.limit() {
		at = at.Add(limitTick)
		if at.Sub(now) > 4*time.Second {
			t.Fatalf("limit %d %s after a cut to the floor, want 1000 within 4 s", got, at.Sub(now))
		}
		for range got - s.inUse() {
			s.acquire(context.Background())
		}
		l.adjust(at, lagSample{10, 0}, fetchSample{})
	}
}
