package main

// The edge-case rows of bench mode (issue 20's "Measure it"), run after the
// overload rows, each judged by its own targets:
//
//   - flaky: 25% of object-service answers are 500, at a quarter of the
//     unique capacity measured in the same run;
//   - dead: every object-service answer is 500 for -dead-for, at 20
//     callbacks/s of 200 unique ids, then healthy again; compared with the
//     same load against a healthy object service;
//   - retrying sender: twice the unique capacity, the sender retrying each
//     callback for 20 s.

import (
	"context"
	"fmt"
	"io"
	"time"
)

const (
	// flakyShare of object-service answers are 500 in the flaky row.
	flakyShare = 0.25
	// maxFlakyPerID: 1/(1-0.25) = 1.33 requests per id are needed, plus
	// a little.
	maxFlakyPerID = 1.45

	// The dead row's load: the issue's, 20 callbacks/s of 200 ids.
	deadRate = 20
	// deadAfter is when the outage starts, once the load is steady;
	// deadTail how long the load goes on after it, so that callbacks
	// sent to a healthy object service follow.
	deadAfter = 5 * time.Second
	deadTail  = 15 * time.Second
	// maxDeadRSS is the dead row's peak RSS target, as a multiple of the
	// same load's against a healthy object service.
	maxDeadRSS = 1.5
	// Goroutines must be back near idle (at most idle * goroutineSlack +
	// goroutineMargin: a few for the connections and timers of a service
	// at rest) within goroutinesBackWithin of the last callback.
	goroutineSlack       = 1.25
	goroutineMargin      = 20
	goroutinesBackWithin = 10 * time.Second

	// The retrying sender's row: how long it retries a callback, and how
	// soon after its last attempt the table must be exact.
	retryingFor        = 20 * time.Second
	maxRetryingCatchup = 10 * time.Second

	// notAnsweringWarn is the service's WARN that the object service is
	// not answering: the retrying row counts it (it must not fire while
	// the object service answers).
	notAnsweringWarn = "object service not answering"

	metricGoroutines = "go_goroutines"
)

// edgeSummary is what the edge rows read of the SUMMARY line beyond
// benchSummary.
type edgeSummary struct {
	FirstAccepted    int   `json:"first_accepted"`
	Attempts         int   `json:"attempts"`
	AttemptsAccepted int   `json:"attempts_accepted"`
	AttemptsShed     int   `json:"attempts_shed"`
	AttemptsTimedOut int   `json:"attempts_timed_out"`
	LostExpired      int   `json:"lost_expired_in_outage"`
	UpstreamFaults   int   `json:"upstream_faults"`
	OutageAnswers    int   `json:"upstream_outage_answers"`
	LastSentMS       int64 `json:"last_sent_unix_ms"`
	LastAttemptMS    int64 `json:"last_attempt_unix_ms"`
}

func uniqueArgs(rate float64, d time.Duration) []string {
	return []string{"-rate", fmt.Sprint(rate), "-ids", "200", "-ids-min", "200", "-unique", "-duration", d.String()}
}

func flakyLoad(c config, capacity float64) benchLoad {
	rate := capacity / 4
	return benchLoad{name: fmt.Sprintf("flaky %g/s", rate), edge: "flaky", rate: rate, unique: true,
		args: append(uniqueArgs(rate, c.duration), "-fault-500", fmt.Sprint(flakyShare))}
}

func deadLoad(c config) benchLoad {
	return benchLoad{name: fmt.Sprintf("dead %s", c.deadFor), edge: "dead", rate: deadRate, unique: true,
		sampleAfter: goroutinesBackWithin + time.Second,
		args: append(uniqueArgs(deadRate, deadAfter+c.deadFor+deadTail),
			"-outage-after", deadAfter.String(), "-outage-for", c.deadFor.String())}
}

// deadHealthyLoad is the dead row's load with a healthy object service.
func deadHealthyLoad(c config) benchLoad {
	return benchLoad{name: "dead: healthy", edge: "healthy", rate: deadRate, unique: true,
		args: uniqueArgs(deadRate, deadAfter+c.deadFor+deadTail)}
}

func retryingLoad(c config, capacity float64) benchLoad {
	rate := 2 * capacity
	return benchLoad{name: fmt.Sprintf("retrying %g/s", rate), edge: "retrying", rate: rate, unique: true,
		args: append(uniqueArgs(rate, c.duration), "-retry-for", retryingFor.String())}
}

// edges runs the edge rows; the flaky and retrying rows need the unique
// capacity (-edge-capacity, or the highest unique rate that held) and are
// skipped without it.
// The dead row's healthy reference reuses the unique step at its rate when
// there is one.
func (b *bencher) edges(ctx context.Context, bestUnique *benchResult) (skipped []string, err error) {
	if !b.c.edges {
		return []string{"edge rows: not run (-edges=false)"}, nil
	}
	capacity := b.c.edgeCapacity
	if capacity == 0 && bestUnique != nil {
		capacity = bestUnique.rate
	}
	if capacity == 0 {
		skipped = append(skipped, "flaky, retrying: not run, no unique rate held (give -edge-capacity)")
	} else if _, err := b.run(ctx, flakyLoad(b.c, capacity)); err != nil {
		return nil, err
	}
	var healthy *benchResult
	for i := range b.results {
		if r := &b.results[i]; r.unique && r.rate == deadRate && !r.overload() && r.edge == "" {
			healthy = r
		}
	}
	if healthy == nil {
		r, err := b.run(ctx, deadHealthyLoad(b.c))
		if err != nil {
			return nil, err
		}
		healthy = &r
	}
	healthyRSS := healthy.peakRSSMiB
	dead, err := b.run(ctx, deadLoad(b.c))
	if err != nil {
		return nil, err
	}
	// The RSS target needs the healthy figure, known only now.
	last := &b.results[len(b.results)-1]
	last.targets = append(last.targets, target{
		fmt.Sprintf("peak RSS %.0f MiB = %.2fx of %.0f MiB healthy (%s)", dead.peakRSSMiB, ratio(dead.peakRSSMiB, healthyRSS), healthyRSS, healthy.name),
		healthyRSS > 0 && dead.peakRSSMiB <= maxDeadRSS*healthyRSS})
	if capacity > 0 {
		if _, err := b.run(ctx, retryingLoad(b.c, capacity)); err != nil {
			return nil, err
		}
	}
	return skipped, nil
}

// holdAfterLoad waits until after is past the last callback of sum's run,
// so that the samples cover it.
func holdAfterLoad(ctx context.Context, sum benchSummary, after time.Duration) {
	if sum.LastSentMS == 0 {
		return
	}
	select {
	case <-ctx.Done():
	case <-time.After(time.Until(time.UnixMilli(sum.LastSentMS).Add(after))):
	}
}

// goroutinesBack reports when go_goroutines was first back near idle at or
// after end, and whether it was within goroutinesBackWithin.
func goroutinesBack(r benchResult, end time.Time) (time.Duration, bool) {
	limit := r.idleGoroutines*goroutineSlack + goroutineMargin
	for _, s := range r.goroutines {
		if !s.at.Before(end) && s.value <= limit {
			d := s.at.Sub(end)
			return d, d <= goroutinesBackWithin
		}
	}
	return -1, false
}

// goroutinesAt is the last go_goroutines sample no later than t (-1: none).
func goroutinesAt(r benchResult, t time.Time) float64 {
	v := -1.0
	for _, s := range r.goroutines {
		if s.at.After(t) {
			break
		}
		v = s.value
	}
	return v
}

// edgeTargets judges an edge row (the dead row's RSS target is added by
// edges, once the healthy figure is known).
func edgeTargets(r benchResult) []target {
	s, e := r.sum, r.sum.edgeSummary
	lost := target{fmt.Sprintf("lost %d", s.Lost), s.Lost == 0}
	switch r.edge {
	case "flaky":
		return []target{lost,
			{fmt.Sprintf("req/id %.3f (%d faults)", s.UpstreamPerAcceptedID, e.UpstreamFaults), e.UpstreamFaults > 0 && s.UpstreamPerAcceptedID <= maxFlakyPerID}}
	case "dead":
		end := time.UnixMilli(e.LastSentMS)
		back, ok := goroutinesBack(r, end)
		backS := fmt.Sprintf("never (%.0f at +%s)", goroutinesAt(r, end.Add(goroutinesBackWithin)), goroutinesBackWithin)
		if back >= 0 {
			backS = back.Round(100 * time.Millisecond).String()
		}
		return []target{
			{fmt.Sprintf("timed out %d", s.TimedOut), s.TimedOut == 0},
			{fmt.Sprintf("lost %d (and %d whose TTL ran out in the outage)", s.Lost, e.LostExpired), s.Lost == 0 && e.OutageAnswers > 0},
			{fmt.Sprintf("goroutines idle %.0f, back near idle %s after the last callback", r.idleGoroutines, backS), ok},
		}
	case "retrying":
		catchup := time.Duration(s.CatchupMS * float64(time.Millisecond))
		caught := "never caught up within -settle"
		if s.CatchupMS >= 0 {
			caught = fmt.Sprintf("caught up %.1fs after the last attempt", s.CatchupMS/1000)
		}
		return []target{lost,
			{fmt.Sprintf("timed out %d of %d attempts", e.AttemptsTimedOut, e.Attempts), 100*e.AttemptsTimedOut <= maxTimedOutPercent*e.Attempts},
			{caught, s.CatchupMS >= 0 && catchup <= maxRetryingCatchup},
			{fmt.Sprintf("%d WARN %q", r.notAnswering, notAnsweringWarn), r.notAnswering == 0},
		}
	}
	return nil
}

// printEdgeTable prints the edge rows, each followed by its targets.
func printEdgeTable(w io.Writer, results []benchResult, skipped []string) {
	fmt.Fprintf(w, "\n%-18s %7s %8s %8s %8s %9s %8s %9s %8s %8s %8s\n", "edge case", "sent", "accepted", "gave up",
		"t/o", "1st acc", "attempts", "att t/o", "lost ids", "req/id", "RSS MiB")
	for _, r := range results {
		if r.edge == "" {
			continue
		}
		s, e := r.sum, r.sum.edgeSummary
		fmt.Fprintf(w, "%-18s %7d %8d %8d %8d %9d %8d %9d %8d %8.4f %8.0f\n", r.name, s.Sent, s.Accepted, s.Failed,
			s.TimedOut, e.FirstAccepted, e.Attempts, e.AttemptsTimedOut, s.Lost, s.UpstreamPerAcceptedID, r.peakRSSMiB)
		if len(r.targets) > 0 {
			fmt.Fprintf(w, "  targets: %s\n", targetsString(r.targets))
		}
	}
	for _, s := range skipped {
		fmt.Fprintln(w, s)
	}
	fmt.Fprintf(w, "rows: flaky = %.0f%% of object-service answers 500, a quarter of the unique capacity (the highest unique rate\n", 100*flakyShare)
	fmt.Fprintln(w, "that held, or -edge-capacity);")
	fmt.Fprintf(w, "dead = %d callbacks/s of 200 unique ids, every object-service answer 500 at once from %s to %s + -dead-for,\n", deadRate, deadAfter, deadAfter)
	fmt.Fprintf(w, "then healthy for %s (dead: healthy = the same load, healthy throughout, unless a unique %d/s step ran);\n", deadTail, deadRate)
	fmt.Fprintf(w, "retrying = twice the unique capacity, the sender retrying each callback for %s\n", retryingFor)
	fmt.Fprintln(w, "(after Retry-After for a 503, with backoff after an error or timeout).")
	fmt.Fprintln(w, "columns: sent = callbacks; accepted = a 2xx on any attempt; gave up = no 2xx; t/o = first attempts")
	fmt.Fprintln(w, "without an answer within 1 s; 1st acc = accepted on the first attempt; att t/o = attempts without an answer;")
	fmt.Fprintln(w, "lost ids = online ids of accepted callbacks never in the table with their time (dead: not counting those whose")
	fmt.Fprintln(w, "receipt + TTL came before the end of the outage + the longest object-service answer); req/id = upstream")
	fmt.Fprintln(w, "requests per id of accepted callbacks.")
	fmt.Fprintf(w, "targets: flaky: lost 0, req/id <= %g; dead: timed out 0, lost 0, peak RSS <= %gx healthy, go_goroutines\n", maxFlakyPerID, maxDeadRSS)
	fmt.Fprintf(w, "<= idle x %g + %d within %s of the last callback; retrying: lost 0, attempts timed out <= %d%%, table\n",
		goroutineSlack, goroutineMargin, goroutinesBackWithin, maxTimedOutPercent)
	fmt.Fprintf(w, "exact within %s of the last attempt, no %q WARN. MISS marks a target not met.\n", maxRetryingCatchup, notAnsweringWarn)
}
