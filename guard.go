package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"runtime/debug"
	"sync"
	"time"
)

// guard is how every goroutine survives a panic: it logs the stack, counts it,
// and lets the goroutine's owner carry on.
type guard struct {
	log     *slog.Logger
	metrics *metrics

	mu     sync.Mutex
	warned map[string]time.Time // when each rate-limited warning was last logged
}

const (
	// restartDelay keeps a background loop that panics at once from
	// spinning: it restarts a tenth of a second later.
	restartDelay = 100 * time.Millisecond
	// warnEvery is the most often one rate-limited warning is logged.
	warnEvery = 5 * time.Second
)

// catch recovers a panic in the goroutine that defers it; it must be
// deferred directly (recover only works there), and is not named recover so
// as not to shadow the builtin.
func (g *guard) catch(where string) {
	if r := recover(); r != nil {
		g.panicked(where, r)
	}
}

func (g *guard) panicked(where string, r any) {
	g.metrics.panics.Inc()
	g.log.Error("panic recovered", "where", where, "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
}

// loop runs fn until ctx ends, restarting it after a panic so that a bug in
// one round of a background loop never stops the loop for good.
func (g *guard) loop(ctx context.Context, name string, fn func(context.Context)) {
	for ctx.Err() == nil {
		func() {
			defer g.catch(name)
			fn(ctx)
		}()
		select {
		case <-ctx.Done():
		case <-time.After(restartDelay):
		}
	}
}

// warn logs a warning at most once per warnEvery for the same message:
// during an outage every batch fails, and one line per batch would flood
// the log.
func (g *guard) warn(msg string, args ...any) {
	g.mu.Lock()
	now := time.Now()
	if last, ok := g.warned[msg]; ok && now.Sub(last) < warnEvery {
		g.mu.Unlock()
		return
	}
	if g.warned == nil {
		g.warned = make(map[string]time.Time)
	}
	g.warned[msg] = now
	g.mu.Unlock()
	g.log.Warn(msg, args...)
}

// recoverPanics turns a panic in a handler into a logged, counted 500
// instead of a dropped connection.
func recoverPanics(next http.Handler, g *guard) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				g.panicked("http "+r.Method+" "+r.URL.Path, v)
				writeError(w, http.StatusInternalServerError, "internal error")
			}
		}()
		next.ServeHTTP(w, r)
	})
}

// everyTick calls fn every d until ctx ends: the shape of the service's
// periodic loops (the limiters, the reaper).
func everyTick(ctx context.Context, d time.Duration, fn func()) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		fn()
	}
}
