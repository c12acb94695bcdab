package main

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"runtime/debug"
	"strconv"
	"strings"
)

// Memory is one budget, -max-memory, as file descriptors are (budget.go):
// the fetches in flight and a base take their share first, and the backlog
// of callbacks held in memory gets what is left, so that the default bounds
// -max-backlog and -max-backlog-ids follow from bytes rather than from
// counts that say nothing of what a callback costs. The same budget is the
// Go runtime's soft memory limit (GOMEMLIMIT), so the collector works
// harder as the process nears it instead of letting the heap double.
const (
	// defaultMemoryBudget: with the default -max-inflight of 16 384 it
	// gives bounds close to the counts that were the defaults before (4 M
	// ids; about 97 000 callbacks instead of 20 000, which a callback's
	// 1 KiB makes cheap), so a host sized for those needs no change. A
	// smaller host (a container with a memory limit) sets -max-memory to
	// that limit, less a margin, and the bounds follow.
	defaultMemoryBudget = 2 << 30
	// minMemoryBudget is the smallest budget accepted: the base alone.
	minMemoryBudget = baseBytes

	// heldCallbackBytes is what a callback held in memory costs besides its
	// ids: the callback and its place in the backlog (measured 225-240
	// bytes; BenchmarkBacklogMemory). No goroutine waits for its lookups;
	// when one did, it was 2.9-4.4 KiB.
	heldCallbackBytes = 1 << 10
	// heldIDBytes is what one of its ids costs while its lookup waits:
	// the decoded id, its result and its flight's address, and either a
	// share of a flight it joined (about 34 bytes in all, duplicate ids)
	// or a flight of its own (about 183 bytes, new ids; measured by
	// BenchmarkBacklogMemory). The bound must hold for the costlier case.
	heldIDBytes = 192
	// inflightFetchBytes is what a fetch in flight costs: a connection
	// with its two net/http goroutines and buffers, and the fetch's
	// goroutine (about 45 KiB, fitted to peak RSS in docs/PERFORMANCE.md).
	inflightFetchBytes = 45 << 10
	// baseBytes is the rest of the process: the runtime, the database
	// pool, inbound connections, pools and the journal's batches.
	baseBytes = 64 << 20
	// backlogShare of what the fetches and the base leave goes to the
	// backlog; the rest is headroom for the collector, which needs some
	// room between the live heap and the limit or it runs all the time.
	backlogShare = 0.75
	// callbackShare of the backlog's bytes bounds callbacks, the rest ids:
	// a callback of the usual 100-200 ids costs many times more in ids
	// than in itself. Both bounds full at once still fit the backlog.
	callbackShare = 0.1
)

// backlogBounds are the bounds derived from a memory budget.
type backlogBounds struct {
	fetchBytes   int64 // for the fetches in flight
	backlogBytes int64 // for the callbacks held and their lookups
	callbacks    int   // -max-backlog
	ids          int   // -max-backlog-ids
}

// errBudgetTooSmall is a budget that leaves nothing for the backlog.
var errBudgetTooSmall = errors.New("leaves no room for the backlog")

// planBacklog splits budget bytes: maxInflight fetches and the base first,
// then the backlog bounds from what is left.
func planBacklog(budget int64, maxInflight int) (backlogBounds, error) {
	b := backlogBounds{fetchBytes: int64(maxInflight) * inflightFetchBytes}
	left := budget - b.fetchBytes - baseBytes
	b.backlogBytes = int64(float64(left) * backlogShare)
	b.callbacks = int(float64(b.backlogBytes) * callbackShare / heldCallbackBytes)
	b.ids = int(float64(b.backlogBytes) * (1 - callbackShare) / heldIDBytes)
	// Fewer than a few hundred callbacks of a couple of hundred ids is no
	// backlog: a second of the reference load's worth at most.
	if b.callbacks < 100 || b.ids < 20000 {
		return b, fmt.Errorf("%w beside %d fetches in flight (%s) and the base (%s): want at least %s, or a lower -max-inflight",
			errBudgetTooSmall, maxInflight, formatBytes(b.fetchBytes), formatBytes(baseBytes),
			formatBytes(minBudgetFor(maxInflight)))
	}
	return b, nil
}

// minBudgetFor is the smallest budget whose backlog holds the minimum
// bounds of planBacklog with maxInflight fetches in flight.
func minBudgetFor(maxInflight int) int64 {
	need := max(100*heldCallbackBytes/callbackShare, 20000*heldIDBytes/(1-callbackShare))
	// A KiB more, so that planBacklog's rounding down never leaves it a
	// callback or an id short.
	return int64(maxInflight)*inflightFetchBytes + baseBytes + int64(math.Ceil(need/backlogShare)) + 1<<10
}

// byteSize is a flag value in bytes, written plainly (1073741824) or with a
// binary (KiB, MiB, GiB, TiB) or decimal (kB, MB, GB, TB) unit.
type byteSize int64

var byteUnits = []struct {
	suffix string
	size   int64
}{
	// Longest first, so that "MiB" is not read as "B" after "Mi".
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
	{"kB", 1e3}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
	{"B", 1},
}

func (s *byteSize) Set(v string) error {
	num, unit := strings.TrimSpace(v), int64(1)
	for _, u := range byteUnits {
		if n, ok := strings.CutSuffix(num, u.suffix); ok {
			num, unit = strings.TrimSpace(n), u.size
			break
		}
	}
	n, err := strconv.ParseFloat(num, 64)
	if err != nil || n < 0 || math.IsInf(n, 0) || math.IsNaN(n) {
		return errors.New("not a size in bytes (like 2GiB, 512MiB or 1073741824)")
	}
	if n*float64(unit) >= math.MaxInt64 {
		return errors.New("too large")
	}
	*s = byteSize(n * float64(unit))
	return nil
}

func (s *byteSize) String() string { return formatBytes(int64(*s)) }

// formatBytes writes n in the largest binary unit that divides it, so
// that it reads back exactly (2GiB, 1536MiB, 1000B).
func formatBytes(n int64) string {
	for i := 3; i >= 0; i-- {
		u := byteUnits[i]
		if n != 0 && n%u.size == 0 {
			return strconv.FormatInt(n/u.size, 10) + u.suffix
		}
	}
	return strconv.FormatInt(n, 10) + "B"
}

// applyMemoryBudget makes the budget the Go runtime's soft memory limit,
// unless GOMEMLIMIT is set (the runtime has applied that one already), and
// logs how the budget is shared, in one line.
func applyMemoryBudget(cfg config, getenv func(string) string, log *slog.Logger) {
	limit := formatBytes(cfg.maxMemory)
	if v := getenv("GOMEMLIMIT"); v != "" {
		limit = "GOMEMLIMIT=" + v
	} else {
		debug.SetMemoryLimit(cfg.maxMemory)
	}
	log.Info("memory budget", "max_memory", formatBytes(cfg.maxMemory), "go_memory_limit", limit,
		"fetches", formatBytes(int64(cfg.maxInflight)*inflightFetchBytes), "max_backlog", cfg.maxBacklog,
		"max_backlog_ids", cfg.maxBacklogIDs)
}
