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

func TestFetchLimiterAdjusts(t *testing.T) {
	const target = 50 * time.Millisecond
	tests := []struct {
		name         string
		limit, inUse int
		lag          time.Duration
		want         int
	}{
		{"slow journal cuts to 3/4 of the fetches in flight", 800, 800, 200 * time.Millisecond, 600},
		{"slow journal with the limit mostly unused", 800, 400, 200 * time.Millisecond, 300},
		{"never below the floor", 80, 80, time.Second, minLimit},
		{"fast journal and the limit used: grow by a sixteenth", 800, 790, 10 * time.Millisecond, 850},
		{"journal near the target: hold", 800, 790, 40 * time.Millisecond, 800},
		{"fast journal and the limit unused: stay", 800, 100, 10 * time.Millisecond, 800},
		{"never above the hard cap", 1000, 1000, 0, 1024},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newFetchSlots(1024, tt.limit)
			for range tt.inUse {
				s.acquire(context.Background())
			}
			l := newFetchLimiter(s, &fetchMeter{}, new(atomic.Int64), target, nil, newMetrics())
			l.adjust(time.Now(), tt.lag)
			if got := s.limit(); got != tt.want {
				t.Errorf("limit %d, want %d", got, tt.want)
			}
			if got := l.metrics.fetchLimit.Value(); got != int64(tt.want) {
				t.Errorf("gauge %d, want %d", got, tt.want)
			}
		})
	}
}

// After a cut the limiter waits for in-flight fetches to drain before it
// cuts again, instead of driving the limit to the floor in a few ticks.
func TestFetchLimiterCutsOncePerCooldown(t *testing.T) {
	s := newFetchSlots(1024, 1000)
	for range 1000 {
		s.acquire(context.Background())
	}
	l := newFetchLimiter(s, &fetchMeter{}, new(atomic.Int64), 50*time.Millisecond, nil, newMetrics())
	now := time.Now()
	l.adjust(now, time.Second)
	l.adjust(now.Add(limitTick), time.Second)
	if got := s.limit(); got != 750 {
		t.Fatalf("limit %d after two slow ticks within the cooldown, want one cut to 750", got)
	}
	l.adjust(now.Add(limitCooldown), time.Second)
	if got := s.limit(); got != 750*3/4 {
		t.Fatalf("limit %d after the cooldown, want a second cut to %d", got, 750*3/4)
	}
}
