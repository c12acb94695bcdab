package main

import (
	"log/slog"
	"sync"
)

// upstreamHealth tells whether the object service answers, so that an
// unreachable or wrong -upstream is not silent: callbacks are still accepted
// and journaled (they are worth keeping: lookups retry until received time +
// TTL), but the operator hears of it within seconds.
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

	mu       sync.Mutex
	failures int // consecutive failed attempts
	down     bool
	lastErr  error
}

// upstreamDownAfter is how many failed attempts in a row, with no answer in
// between, mark the object service down: enough that the odd bad answer of
// a healthy service (a 500, a dropped connection) does not.
const upstreamDownAfter = 5

func newUpstreamHealth(url string, log *slog.Logger, m *metrics, g *guard) *upstreamHealth {
	m.upstreamUp.Set(1)
	return &upstreamHealth{url: url, log: log, metrics: m, guard: g}
}

// record takes the outcome of one attempt: nil for a valid answer.
func (h *upstreamHealth) record(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if err == nil {
		h.failures = 0
		if h.down {
			h.down = false
			h.metrics.upstreamUp.Set(1)
			h.log.Info("object service answering again", "object_service", h.url)
		}
		return
	}
	h.failures++
	h.lastErr = err
	if !h.down && h.failures >= upstreamDownAfter {
		h.down = true
		h.metrics.upstreamUp.Set(0)
		h.guard.warn("object service not answering; callbacks are still accepted and journaled, lookups retry until received time + TTL",
			"object_service", h.url, "failed_attempts", h.failures, "err", err)
	}
}

// state is "up", or "down: " and the last error.
func (h *upstreamHealth) state() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.down {
		return "up"
	}
	return "down: " + h.lastErr.Error()
}
