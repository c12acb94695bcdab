package main

import (
	"math"
	"sync"
	"time"
)

// admission accepts only what the service can honour. A 2xx promises that
// the callback's online objects reach the table, and fresh: so a callback
// whose new ids would wait longer than -max-queue-wait for a fetch slot, at
// the fetch rate measured now, is answered 503 with Retry-After instead.
// Ids already being fetched cost nothing (they join that fetch) and are never
// a reason to shed. The decision is O(1): a queue length and a rate.
type admission struct {
	fetcher *fetcher
	limiter *fetchLimiter
	maxWait time.Duration
	metrics *metrics
}

// queueWaitShare caps -max-queue-wait at this share of the TTL: a callback
// must leave time for its own fetches (up to -fetch-timeout, with retries)
// and its write before received time + TTL.
const queueWaitShare = 5.0 / 6

func newAdmission(cfg config, f *fetcher, l *fetchLimiter, m *metrics) *admission {
	maxWait := min(cfg.maxQueueWait, time.Duration(float64(cfg.ttl)*queueWaitShare))
	return &admission{fetcher: f, limiter: l, maxWait: maxWait, metrics: m}
}

// overloaded is the answer to a callback the service cannot honour now.
type overloaded struct {
	reason     string // label of the shed counter
	retryAfter time.Duration
}

func (e *overloaded) Error() string { return "overloaded: " + e.reason }

// check decides for a callback with newIDs ids that start fetches of their
// own. A callback whose ids are all being fetched already waits for nothing
// and is always admitted, and so is any callback while nothing waits for a
// slot. The callback is decoded first: decoding 200 ids costs microseconds,
// and without its ids the rule above could not be kept.
func (a *admission) check(newIDs int) error {
	waiting := a.fetcher.waiting.Load()
	if waiting <= 0 {
		a.metrics.queueWait.Set(0)
		return nil
	}
	if newIDs == 0 {
		return nil
	}
	rate := a.limiter.rate()
	wait := time.Duration(float64(waiting+int64(newIDs)) / rate * float64(time.Second))
	a.metrics.queueWait.Set(int64(wait / time.Millisecond))
	if wait <= a.maxWait {
		return nil
	}
	return &overloaded{reason: "queue_wait", retryAfter: wait - a.maxWait}
}

// retryAfterSeconds is the Retry-After header for d: whole seconds, at
// least one.
func retryAfterSeconds(d time.Duration) int { return max(1, int(math.Ceil(d.Seconds()))) }

// retryBudget lets retries be at most a tenth of first attempts, plus a
// trickle, so that a failing or overloaded object service never sees its
// load multiplied by retries (the model is Finagle's RetryBudget). A retry
// that finds the budget spent waits and asks again, until its deadline.
type retryBudget struct {
	mu     sync.Mutex
	tokens float64
	last   time.Time
}

const (
	retryShare     = 0.1  // a retry for every ten first attempts
	retryFloor     = 10.0 // retries per second allowed whatever the traffic
	retryMaxTokens = 1000 // what a quiet spell can save up
)

func newRetryBudget() *retryBudget {
	return &retryBudget{tokens: retryFloor, last: time.Now()}
}

// earn credits a first attempt.
func (b *retryBudget) earn() {
	b.mu.Lock()
	b.tokens = min(retryMaxTokens, b.tokens+retryShare)
	b.mu.Unlock()
}

// take spends a retry if the budget allows one.
func (b *retryBudget) take() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	if now.After(b.last) {
		b.tokens = min(retryMaxTokens, b.tokens+now.Sub(b.last).Seconds()*retryFloor)
		b.last = now
	}
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}
