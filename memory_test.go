package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
	"time"
)

// heldCost is what holding callbacks in memory costs, in bytes: live heap
// plus goroutine stacks, measured after a collection.
type heldCost struct {
	perCallback float64 // everything a callback of k ids costs
	ids         int     // ids per callback after dedupe, on average
}

// measureHeld holds n callbacks of k ids each in the real pipeline
// structures (the callback, its place in the backlog, its lookups queued
// or joined in the fetcher, any goroutine that waits with it; the fetcher
// has no dispatcher running, so every lookup waits) and returns what they
// cost.
// With dup the ids are drawn from 0-99, as the duplicate-heavy load sends
// them, so most lookups join a flight; otherwise every id is new and
// starts a flight of its own, the costlier case.
func measureHeld(tb testing.TB, n, k int, dup bool) heldCost {
	tb.Helper()
	a := testApp(tb, testConfig(tb, "-upstream", "http://objects.invalid", "-max-backlog", "1000000", "-max-backlog-ids", "1000000000"), nil)
	next := int64(1 << 40)
	// The decoded ids are part of what a held callback costs: they are made
	// inside the measured span.
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	total := 0
	for range n {
		ids := make([]int64, k)
		for i := range ids {
			if dup {
				ids[i] = rand.Int64N(100)
			} else {
				next++
				ids[i] = next
			}
		}
		ids = dedupe(ids)
		total += len(ids)
		cb := newCallback(time.Now(), ids)
		if err := a.pipe.admit(cb); err != nil {
			tb.Fatalf("admit: %v", err)
		}
		a.pipe.start(cb)
	}
	// Every lookup is either a flight of its own (waiting) or has joined
	// one (coalesced) once every callback's lookups have started.
	eventually(tb, 30*time.Second, "every lookup queued or joined", func() bool {
		return a.fetcher.waiting.Load()+int64(a.metrics.coalesced.Value()) == int64(total)
	})
	runtime.GC()
	runtime.ReadMemStats(&after)
	used := float64(after.HeapAlloc+after.StackInuse) - float64(before.HeapAlloc+before.StackInuse)
	// Let the goroutines go: abort the pipeline and the queue, as the end
	// of a shutdown's grace period does.
	a.pipe.abort()
	a.fetcher.abortQueued(context.Background())
	a.pipe.wg.Wait()
	return heldCost{perCallback: used / float64(n), ids: total / n}
}

// BenchmarkBacklogMemory prints what a held callback and a waiting lookup
// cost, the numbers behind heldCallbackBytes and heldIDBytes (budget.go):
//
//	go test -run '^$' -bench BacklogMemory -benchtime 1x .
//
// The per-callback cost is measured with callbacks of one id and the
// per-lookup cost from the difference to callbacks of 200 ids; "new" ids
// each start a flight, "dup" ids (0-99) mostly join one.
func BenchmarkBacklogMemory(b *testing.B) {
	const n = 4000
	for _, kind := range []struct {
		name string
		dup  bool
	}{{"new", false}, {"dup", true}} {
		b.Run(kind.name, func(b *testing.B) {
			var one, many heldCost
			for range b.N {
				one = measureHeld(b, n, 1, kind.dup)
				many = measureHeld(b, n, 200, kind.dup)
			}
			perID := (many.perCallback - one.perCallback) / float64(many.ids-one.ids)
			perCallback := one.perCallback - perID*float64(one.ids)
			b.ReportMetric(perCallback, "B/callback")
			b.ReportMetric(perID, "B/lookup")
			b.ReportMetric(many.perCallback, "B/callback-of-200")
			b.ReportMetric(float64(many.ids), "ids/callback-of-200")
		})
	}
}

// TestHeldCostsWithinTheBudgetConstants guards the constants the backlog
// bounds are derived from: if a change makes a held callback or lookup
// costlier than they say, the memory budget would be overrun, and they must
// be measured again (BenchmarkBacklogMemory). It measures the costlier
// case, new ids.
func TestHeldCostsWithinTheBudgetConstants(t *testing.T) {
	const n = 2000
	one := measureHeld(t, n, 1, false)
	many := measureHeld(t, n, 200, false)
	perID := (many.perCallback - one.perCallback) / float64(many.ids-one.ids)
	perCallback := one.perCallback - perID
	t.Logf("measured: %.0f B per callback, %.0f B per lookup", perCallback, perID)
	for _, c := range []struct {
		what           string
		measured, want float64
	}{
		{"per held callback", perCallback, heldCallbackBytes},
		{"per waiting lookup", perID, heldIDBytes},
	} {
		if c.measured > c.want {
			t.Errorf("%s: measured %.0f bytes, the budget assumes %.0f: measure again (%s) and raise the constant",
				c.what, c.measured, c.want, fmt.Sprintf("go test -run '^$' -bench BacklogMemory -benchtime 1x ."))
		}
	}
}

func TestMemoryBudgetSetsTheBacklogBounds(t *testing.T) {
	plan := func(budget int64, inflight int) backlogBounds {
		t.Helper()
		b, err := planBacklog(budget, inflight)
		if err != nil {
			t.Fatalf("planBacklog(%d, %d): %v", budget, inflight, err)
		}
		return b
	}
	// The fetch slots the plan counts are those the open-file limit leaves.
	nofile, _ := openFileLimit()
	slots := func(maxInflight int) int { return planFDBudget(nofile, 12, maxInflight, 0).fetch }
	def := plan(defaultMemoryBudget, slots(16384))
	small := plan(512<<20, slots(1024))
	tests := []struct {
		name          string
		args          []string
		env           map[string]string
		memory        int64
		callbacks     int
		ids           int
		wantErr       string
		wantErrAbsent string
	}{
		{name: "defaults", memory: defaultMemoryBudget, callbacks: def.callbacks, ids: def.ids},
		{name: "binary unit", args: []string{"-max-memory", "512MiB", "-max-inflight", "1024"},
			memory: 512 << 20, callbacks: small.callbacks, ids: small.ids},
		{name: "from the environment", env: map[string]string{"OBJTRACK_MAX_MEMORY": "512MiB", "OBJTRACK_MAX_INFLIGHT": "1024"},
			memory: 512 << 20, callbacks: small.callbacks, ids: small.ids},
		{name: "plain bytes", args: []string{"-max-memory", "536870912", "-max-inflight", "1024"},
			memory: 512 << 20, callbacks: small.callbacks, ids: small.ids},
		{name: "decimal unit", args: []string{"-max-memory", "3GB"},
			memory: 3e9, callbacks: plan(3e9, slots(16384)).callbacks, ids: plan(3e9, slots(16384)).ids},
		{name: "explicit callbacks bound overrides", args: []string{"-max-backlog", "10"},
			memory: defaultMemoryBudget, callbacks: 10, ids: def.ids},
		{name: "explicit bounds need no room", args: []string{"-max-backlog", "10", "-max-backlog-ids", "99", "-max-memory", "100MiB"},
			memory: 100 << 20, callbacks: 10, ids: 99},
		{name: "not a size", args: []string{"-max-memory", "lots"}, wantErr: `-max-memory "lots": not a size in bytes`},
		{name: "unknown unit", args: []string{"-max-memory", "2XB"}, wantErr: "not a size in bytes"},
		{name: "negative", args: []string{"-max-memory", "-1GiB"}, wantErr: "not a size in bytes"},
		{name: "below the base", args: []string{"-max-memory", "1MiB"}, wantErr: "-max-memory \"1MiB\": must be at least 64MiB"},
		{name: "no room beside the fetches", args: []string{"-max-memory", "70MiB"}, wantErr: "leaves no room for the backlog beside"},
		{name: "no room, from the environment", env: map[string]string{"OBJTRACK_MAX_MEMORY": "70MiB"},
			wantErr: "OBJTRACK_MAX_MEMORY (-max-memory) \"70MiB\": leaves no room"},
		{name: "negative bound", args: []string{"-max-backlog-ids", "-1"}, wantErr: "-max-backlog-ids \"-1\": must not be negative"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"-dsn", "x"}, tt.args...)
			cfg, err := parseConfig(args, func(k string) string { return tt.env[k] }, io.Discard)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want it to contain %q", err, tt.wantErr)
				}
				if !errors.As(err, new(usageError)) {
					t.Errorf("error %T, want a usageError (exit 2)", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if cfg.maxMemory != tt.memory || cfg.maxBacklog != tt.callbacks || cfg.maxBacklogIDs != tt.ids {
				t.Errorf("memory %d, backlog %d callbacks and %d ids; want %d, %d and %d",
					cfg.maxMemory, cfg.maxBacklog, cfg.maxBacklogIDs, tt.memory, tt.callbacks, tt.ids)
			}
		})
	}
}

// The bounds derived from a budget keep the worst case, both bounds full
// of the costliest callbacks and lookups beside every fetch in flight,
// within the budget; and a larger budget never gives smaller bounds.
func TestPlannedBacklogFitsTheBudget(t *testing.T) {
	prev := backlogBounds{}
	for _, budget := range []int64{minBudgetFor(16384), 1 << 30, 2 << 30, 3e9, 8 << 30, 64 << 30} {
		b, err := planBacklog(budget, 16384)
		if err != nil {
			t.Fatalf("budget %s: %v", formatBytes(budget), err)
		}
		worst := b.fetchBytes + baseBytes + int64(b.callbacks)*heldCallbackBytes + int64(b.ids)*heldIDBytes
		if worst > budget {
			t.Errorf("budget %s: worst case %s is over it (%+v)", formatBytes(budget), formatBytes(worst), b)
		}
		if b.callbacks < prev.callbacks || b.ids < prev.ids {
			t.Errorf("budget %s gives smaller bounds %+v than a smaller budget's %+v", formatBytes(budget), b, prev)
		}
		prev = b
	}
	if _, err := planBacklog(minBudgetFor(16384)-1<<20, 16384); !errors.Is(err, errBudgetTooSmall) {
		t.Errorf("a budget 1MiB under minBudgetFor: error %v, want errBudgetTooSmall", err)
	}
}

func TestByteSizeReadsBack(t *testing.T) {
	for _, v := range []string{"2GiB", "512MiB", "1536MiB", "1000B", "3KiB", "1TiB"} {
		var s byteSize
		if err := s.Set(v); err != nil {
			t.Fatalf("Set(%q): %v", v, err)
		}
		if got := s.String(); got != v {
			t.Errorf("Set(%q).String() = %q", v, got)
		}
	}
}

// The pipeline sheds at the bounds derived from the budget: the smallest
// budget that -max-inflight 1 allows gives a backlog of 100-odd callbacks;
// the one past the bound, or past the ids bound, is refused.
func TestPipelineShedsAtTheDerivedBound(t *testing.T) {
	cfg := testConfig(t, "-max-inflight", "1", "-max-memory", strconv.FormatInt(minBudgetFor(1), 10))
	b, err := planBacklog(cfg.maxMemory, 1)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.maxBacklog != b.callbacks || cfg.maxBacklogIDs != b.ids || b.callbacks > 1000 {
		t.Fatalf("bounds %d callbacks, %d ids; want the derived %d and %d (and a small backlog)", cfg.maxBacklog, cfg.maxBacklogIDs, b.callbacks, b.ids)
	}
	t.Run("callbacks", func(t *testing.T) {
		a := testApp(t, cfg, nil)
		for i := range b.callbacks {
			if err := a.pipe.admit(newCallback(time.Now(), []int64{int64(i)})); err != nil {
				t.Fatalf("callback %d of %d: %v", i+1, b.callbacks, err)
			}
		}
		if !a.pipe.full() {
			t.Error("the backlog at its derived bound does not say it is full")
		}
		if err := a.pipe.admit(newCallback(time.Now(), []int64{1})); !errors.Is(err, errBacklogFull) {
			t.Errorf("callback past the bound: %v, want errBacklogFull", err)
		}
		// And the sender hears it: 503 with Retry-After, counted as backlog_full.
		rec := httptest.NewRecorder()
		a.handler().ServeHTTP(rec, httptest.NewRequest("POST", "/callback", strings.NewReader(idsBody(1))))
		if rec.Code != http.StatusServiceUnavailable || rec.Header().Get("Retry-After") == "" || a.metrics.callbacksShed.Value("backlog_full") != 1 {
			t.Errorf("status %d, Retry-After %q, shed backlog_full %d; want 503, a Retry-After and 1",
				rec.Code, rec.Header().Get("Retry-After"), a.metrics.callbacksShed.Value("backlog_full"))
		}
	})
	t.Run("ids", func(t *testing.T) {
		a := testApp(t, cfg, nil)
		ids := make([]int64, b.ids/2)
		for i := range ids {
			ids[i] = int64(i)
		}
		for range 2 {
			if err := a.pipe.admit(newCallback(time.Now(), ids)); err != nil {
				t.Fatalf("callback of %d ids within the ids bound %d: %v", len(ids), b.ids, err)
			}
		}
		if err := a.pipe.admit(newCallback(time.Now(), []int64{1, 2, 3})); !errors.Is(err, errBacklogFull) {
			t.Errorf("callback past the ids bound: %v, want errBacklogFull", err)
		}
	})
}

// The budget is the runtime's soft memory limit, unless GOMEMLIMIT is set:
// the runtime applied that one itself, and it wins.
func TestMemoryBudgetSetsTheGoMemoryLimit(t *testing.T) {
	before := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(before) })
	cfg := testConfig(t, "-max-memory", "3GiB")
	tests := []struct {
		name string
		env  map[string]string
		want int64
	}{
		{"no GOMEMLIMIT", nil, 3 << 30},
		{"GOMEMLIMIT set", map[string]string{"GOMEMLIMIT": "1GiB"}, 123 << 20},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			debug.SetMemoryLimit(123 << 20) // as if the runtime had read GOMEMLIMIT
			var logs bytes.Buffer
			applyMemoryBudget(cfg, func(k string) string { return tt.env[k] }, slog.New(slog.NewTextHandler(&logs, nil)))
			if got := debug.SetMemoryLimit(-1); got != tt.want {
				t.Errorf("memory limit %d, want %d", got, tt.want)
			}
			if !strings.Contains(logs.String(), `msg="memory budget" max_memory=3GiB`) {
				t.Errorf("log %q, want the memory budget line", logs.String())
			}
		})
	}
}
