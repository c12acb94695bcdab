package main

import (
	"bytes"
	"context"
	"slices"
	"strings"
	"testing"
	"time"
)

// The edge rows run the loads issue 20 names.
func TestEdgeLoads(t *testing.T) {
	c := config{duration: 30 * sec, deadFor: 60 * sec}
	cases := []struct {
		l    benchLoad
		want string
	}{
		{flakyLoad(c, 40), "-rate 10 -ids 200 -ids-min 200 -unique -duration 30s -fault-500 0.25"},
		{deadLoad(c), "-rate 20 -ids 200 -ids-min 200 -unique -duration 1m20s -outage-after 5s -outage-for 1m0s"},
		{deadHealthyLoad(c), "-rate 20 -ids 200 -ids-min 200 -unique -duration 1m20s"},
		{retryingLoad(c, 25), "-rate 50 -ids 200 -ids-min 200 -unique -duration 30s -retry-for 20s"},
	}
	for _, tc := range cases {
		if got := strings.Join(tc.l.args, " "); got != tc.want || tc.l.edge == "" || tc.l.overload() {
			t.Errorf("%s: args %q (edge %q), want %q", tc.l.name, got, tc.l.edge, tc.want)
		}
	}
	if _, err := parseFlags([]string{"-mode", "bench", "-dsn", "x", "-dead-for", "0s"}, &bytes.Buffer{}); err == nil {
		t.Error("-dead-for 0s accepted")
	}
}

func TestEdgeTargets(t *testing.T) {
	end := t0
	idle := func(vals ...float64) []sample {
		var s []sample
		for i, v := range vals {
			s = append(s, sample{end.Add(time.Duration(i) * 2 * sec), v})
		}
		return s
	}
	withEdge := func(s benchSummary, e edgeSummary) benchSummary { s.edgeSummary = e; return s }
	cases := []struct {
		name string
		r    benchResult
		want string
	}{
		{"flaky met", benchResult{benchLoad: benchLoad{edge: "flaky"},
			sum: withEdge(benchSummary{UpstreamPerAcceptedID: 1.40}, edgeSummary{UpstreamFaults: 10})},
			"lost 0 ok, req/id 1.400 (10 faults) ok"},
		{"flaky: too many requests", benchResult{benchLoad: benchLoad{edge: "flaky"},
			sum: withEdge(benchSummary{UpstreamPerAcceptedID: 1.46, Lost: 2}, edgeSummary{UpstreamFaults: 10})},
			"lost 2 MISS, req/id 1.460 (10 faults) MISS"},
		{"flaky: no faults injected", benchResult{benchLoad: benchLoad{edge: "flaky"},
			sum: withEdge(benchSummary{UpstreamPerAcceptedID: 1}, edgeSummary{})},
			"lost 0 ok, req/id 1.000 (0 faults) MISS"},
		{"dead met", benchResult{benchLoad: benchLoad{edge: "dead"}, idleGoroutines: 40, goroutines: idle(900, 400, 60),
			sum: withEdge(benchSummary{}, edgeSummary{LastSentMS: end.UnixMilli(), OutageAnswers: 5, LostExpired: 7})},
			"timed out 0 ok, lost 0 (and 7 whose TTL ran out in the outage) ok, goroutines idle 40, back near idle 4s after the last callback ok"},
		{"dead: goroutines late, timeouts, no outage", benchResult{benchLoad: benchLoad{edge: "dead"}, idleGoroutines: 40,
			goroutines: idle(900, 900, 900, 900, 900, 900, 60),
			sum:        withEdge(benchSummary{TimedOut: 1}, edgeSummary{LastSentMS: end.UnixMilli()})},
			"timed out 1 MISS, lost 0 (and 0 whose TTL ran out in the outage) MISS, goroutines idle 40, back near idle 12s after the last callback MISS"},
		{"dead: goroutines never back", benchResult{benchLoad: benchLoad{edge: "dead"}, idleGoroutines: 40, goroutines: idle(900, 71),
			sum: withEdge(benchSummary{}, edgeSummary{LastSentMS: end.UnixMilli(), OutageAnswers: 1})},
			"timed out 0 ok, lost 0 (and 0 whose TTL ran out in the outage) ok, goroutines idle 40, back near idle never (71 at +10s) after the last callback MISS"},
		{"retrying met", benchResult{benchLoad: benchLoad{edge: "retrying"},
			sum: withEdge(benchSummary{CatchupMS: 10000}, edgeSummary{Attempts: 1000, AttemptsTimedOut: 10})},
			`lost 0 ok, timed out 10 of 1000 attempts ok, caught up 10.0s after the last attempt ok, 0 WARN "object service not answering" ok`},
		{"retrying missed", benchResult{benchLoad: benchLoad{edge: "retrying"}, notAnswering: 2,
			sum: withEdge(benchSummary{CatchupMS: 10100}, edgeSummary{Attempts: 1000, AttemptsTimedOut: 11})},
			`lost 0 ok, timed out 11 of 1000 attempts MISS, caught up 10.1s after the last attempt MISS, 2 WARN "object service not answering" MISS`},
		{"retrying never exact", benchResult{benchLoad: benchLoad{edge: "retrying"},
			sum: withEdge(benchSummary{CatchupMS: -1}, edgeSummary{Attempts: 10})},
			`lost 0 ok, timed out 0 of 10 attempts ok, never caught up within -settle MISS, 0 WARN "object service not answering" ok`},
	}
	for _, tc := range cases {
		if got := targetsString(edgeTargets(tc.r)); got != tc.want {
			t.Errorf("%s:\n got %s\nwant %s", tc.name, got, tc.want)
		}
	}
}

// The spill line names every row with its spilled callbacks and its 2xx
// answers without a record.
func TestPrintSpillLine(t *testing.T) {
	var b strings.Builder
	printSpillLine(&b, []benchResult{
		{benchLoad: benchLoad{name: "dup-heavy 200/s"}},
		{benchLoad: benchLoad{name: "retrying 20/s"}, spilled: 12, journalFailures: 1},
	})
	want := "dup-heavy 200/s 0/0, retrying 20/s 12/1\n"
	if !strings.HasSuffix(b.String(), want) {
		t.Errorf("spill line %q, want it to end %q", b.String(), want)
	}
}

// The steps go up until a rate does not hold, then halve the gap to the
// highest that held -refine times; the best is the highest that held.
func TestStepsRefineTheKnee(t *testing.T) {
	cases := []struct {
		name   string
		refine int
		holds  func(rate float64) bool
		want   []float64 // the rates run, in order
		best   float64   // 0: none held
	}{
		{"knee at 33", 2, func(r float64) bool { return r <= 33 }, []float64{10, 20, 25, 30, 35, 32.5, 33.75}, 32.5},
		{"knee at 31", 2, func(r float64) bool { return r <= 31 }, []float64{10, 20, 25, 30, 35, 32.5, 31.25}, 30},
		{"no refining", 0, func(r float64) bool { return r <= 33 }, []float64{10, 20, 25, 30, 35}, 30},
		{"every rate holds", 2, func(float64) bool { return true }, []float64{10, 20, 25, 30, 35, 40}, 40},
		{"none holds", 2, func(float64) bool { return false }, []float64{10}, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var ran []float64
			b := &bencher{c: config{refine: tc.refine, duration: 30 * sec}, runLoad: func(_ context.Context, l benchLoad) (benchResult, error) {
				ran = append(ran, l.rate)
				return benchResult{benchLoad: l, held: tc.holds(l.rate)}, nil
			}}
			best, err := b.steps(t.Context(), []float64{10, 20, 25, 30, 35, 40}, true)
			if err != nil {
				t.Fatal(err)
			}
			got := 0.0
			if best != nil {
				got = best.rate
			}
			if !slices.Equal(ran, tc.want) || got != tc.best {
				t.Errorf("ran %v, best %g; want %v, best %g", ran, got, tc.want, tc.best)
			}
		})
	}
}
