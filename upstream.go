package main

import (
	"context"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// upstreamHealth tells whether the object service answers, so that an
// unreachable or wrong -upstream is not silent: callbacks are still accepted
// and journaled (they are worth keeping: lookups retry until received time +
// TTL), but the operator hears of it within seconds. While it is down the
// fetch dispatcher only probes it (schedule.go).
//
// It is judged once a second on that second's attempts: down when some
// failed and none got a valid answer, up again at the first valid answer.
// A share of failures is a flaky service, not a dead one, and a second in
// which this process was starved of CPU (its own tick came late) is not
// judged: timeouts then are this machine's fault, not the object service's.
//
// Readiness does not follow it: every instance shares the one object
// service, so failing /readyz on it would make a load balancer drop them all
// and turn an object-service blip into refused callbacks, which are the one
// thing that must not happen. /readyz shows it instead.
type upstreamHealth struct {
	url     string
	log     *slog.Logger
	metrics *metrics
	guard   *guard

	down atomic.Bool

	mu       sync.Mutex
	known    bool // some attempt has ended
	answered int  // valid answers since the last judgement
	failures int  // failed attempts since the last judgement
	lastErr  error
}

const (
	// upstreamDownAfter is how many failed attempts, with no valid answer
	// in the same second, mark the object service down.
	upstreamDownAfter = 5
	// upstreamJudgeEvery is the window judged.
	upstreamJudgeEvery = time.Second
	// starvedAfter: a judging tick this late means the process was not
	// scheduled, so the window's timeouts say nothing of the object service.
	starvedAfter = upstreamJudgeEvery / 2
)

func newUpstreamHealth(url string, log *slog.Logger, m *metrics, g *guard) *upstreamHealth {
	m.upstreamUp.Set(math.NaN())
	return &upstreamHealth{url: url, log: log, metrics: m, guard: g}
}

// record takes the outcome of one attempt: nil for a valid answer. A valid
// answer ends a down state at once, so the queue resumes without waiting
// for the next judgement.
func (h *upstreamHealth) record(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.known {
		h.known = true
		if err == nil {
			h.metrics.upstreamUp.Set(1)
		}
	}
	if err != nil {
		h.failures++
		h.lastErr = err
		return
	}
	h.answered++
	if h.down.Load() {
		h.down.Store(false)
		h.metrics.upstreamUp.Set(1)
		h.log.Info("object service answering again", "object_service", h.url)
	}
}

// run judges the attempts of each second.
func (h *upstreamHealth) run(ctx context.Context) {
	last := time.Now()
	everyTick(ctx, upstreamJudgeEvery, func() {
		now := time.Now()
		h.judge(now.Sub(last) > upstreamJudgeEvery+starvedAfter)
		last = now
	})
}

// judge closes one window; starved says the process was not scheduled in
// time, and then the window is dropped unjudged.
func (h *upstreamHealth) judge(starved bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	answered, failures := h.answered, h.failures
	h.answered, h.failures = 0, 0
	if starved || answered > 0 || failures < upstreamDownAfter {
		if h.known && answered > 0 {
			h.metrics.upstreamUp.Set(1)
		}
		return
	}
	h.metrics.upstreamUp.Set(0)
	if !h.down.Swap(true) {
		h.guard.warn("object service not answering; callbacks are still accepted and journaled, lookups wait and probe it until received time + TTL",
			"object_service", h.url, "failed_attempts", failures, "err", h.lastErr)
	}
}

// isDown says whether the object service fails everything now.
func (h *upstreamHealth) isDown() bool { return h.down.Load() }

// state is "unknown" before any attempt ended, "up", or "down: " and the
// last error.
func (h *upstreamHealth) state() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case !h.known:
		return "unknown"
	case h.down.Load():
		return "down: " + h.lastErr.Error()
	default:
		return "up"
	}
}
