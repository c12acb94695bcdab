package main

import (
	"errors"
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
			f := newFetcher(cfg, instantObjects{}, discardLogger(), m, &guard{log: discardLogger(), metrics: m})
			f.slots.setLimit(100)
			f.meter.observe(time.Second)
			l := newFetchLimiter(f.slots, &f.meter, &f.waiting, time.Second, nil, m)
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

func TestRetryBudgetIsATenthOfFirstAttempts(t *testing.T) {
	b := newRetryBudget()
	b.tokens = 0 // and almost no time passes for the trickle to add to it
	for range 100 {
		b.earn()
	}
	granted := 0
	for range 50 {
		if b.take() {
			granted++
		}
	}
	if granted != 10 {
		t.Errorf("%d retries granted after 100 first attempts, want 10", granted)
	}
}

func TestRetryBudgetTrickles(t *testing.T) {
	b := newRetryBudget()
	b.tokens = 0
	b.last = time.Now().Add(-time.Second) // a second without first attempts
	granted := 0
	for range 50 {
		if b.take() {
			granted++
		}
	}
	if granted < int(retryFloor) || granted > int(retryFloor)+1 {
		t.Errorf("%d retries granted after a quiet second, want %v", granted, retryFloor)
	}
}
