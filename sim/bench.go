package main

// Bench mode measures the service under load on this machine and prints two
// tables: it starts a fresh service process per load, drives it with this
// program in run mode (another process, so the simulator's sockets and CPU
// are its own, as in any other run), reads that run's SUMMARY line and the
// service's /metrics and /proc entries, and finally measures the bare-client
// ceiling of the simulated object service.
//
// The loads: the reference load; duplicate-heavy callbacks (200 ids from a
// space of 100) stepped through -dup-rates and unique ids stepped through
// -unique-rates, each kind until a rate does not hold; then an overload row
// per kind at twice its highest rate that held. The first table has the
// steps, the second the overload rows. Past capacity the service is meant
// to shed (answer 503 at once) rather than fail, so an overload row is not
// judged by whether it held but by overload targets: nothing acknowledged
// lost, few callbacks left without an answer, and the accepted rate close
// to what held. Then the closed-loop row (closed.go): the service's accepted
// callbacks per second under a closed-loop duplicate-heavy sender against a
// decode-and-202 server's, in its own table (-closed-loop-only runs it alone).
//
//	go build -o bin/objtrack . && go build -o bin/sim ./sim
//	scripts/with-postgres bin/sim -mode bench -service bin/objtrack

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"
)

// benchDuration is the sending time of every load but the reference when
// -duration is not given in bench mode.
const benchDuration = 30 * time.Second

// The service's metrics that bench mode reads.
const (
	metricFetches         = "objtrack_fetches_total"
	metricFetchesInFlight = "objtrack_fetches_in_flight"
	metricSpilled         = "objtrack_spill_appended_total"
	metricJournalFailures = "objtrack_journal_failures_total"
	metricShed            = "objtrack_callbacks_shed_total"
)

// shedReasons are the reason label values of metricShed, in the order a
// row prints them.
var shedReasons = []string{"backlog_full", "queue_wait", "busy", "not_durable"}

// benchLoad is one row of a table: run-mode flags and what must hold.
type benchLoad struct {
	name   string
	args   []string
	rate   float64 // callbacks per second
	unique bool
	// heldRate is set on overload rows only: the highest rate of the same
	// kind that held, which the overload targets are measured against.
	heldRate float64
	// edge is set on the edge-case rows (bench_edges.go), judged by their
	// own targets; sampleAfter keeps the service up and sampled this long
	// after the last callback.
	edge        string
	sampleAfter time.Duration
}

func (l benchLoad) overload() bool { return l.heldRate > 0 }

// Overload targets: past capacity the service may shed, but it must keep
// accepting at least this share of the rate it held. Duplicate-heavy
// callbacks carry 200 ids each through the journal and the handler while
// needing almost no fetches, so their load is CPU the simulator shares;
// they get more room.
const (
	uniqueGoodputShare = 0.90
	dupGoodputShare    = 0.80
	maxTimedOutPercent = 1
	maxUpstreamPerID   = 1.1
)

// benchSummary is what the table needs of a run's SUMMARY line.
type benchSummary struct {
	Sent          int     `json:"sent"`
	Accepted      int     `json:"accepted"`
	Failed        int     `json:"failed"`
	Missed        int     `json:"missed"`
	Shed          int     `json:"shed"`
	TimedOut      int     `json:"timed_out"`
	AckP50        float64 `json:"ack_p50_ms"`
	AckP99        float64 `json:"ack_p99_ms"`
	AckMax        float64 `json:"ack_max_ms"`
	UpstreamPerID float64 `json:"upstream_per_id"`
	// UpstreamPerAcceptedID counts only the ids of callbacks answered 2xx,
	// the only ones the service fetches: the overload rows' req/id.
	UpstreamPerAcceptedID float64 `json:"upstream_per_accepted_id"`
	UpstreamPerSec        float64 `json:"upstream_per_sec"`
	CatchupMS             float64 `json:"catchup_ms"`
	Lost                  int     `json:"lost"` // online ids of accepted callbacks that never reached the table
	Pass                  bool    `json:"pass"`
	Duration              float64 `json:"duration_s"`
	edgeSummary
	// ceiling mode
	RequestsPerSec float64 `json:"requests_per_sec"`
	Errors         int     `json:"errors"`
}

// benchResult is one measured row.
type benchResult struct {
	benchLoad
	sum        benchSummary
	peakRSSMiB float64
	cpuPer1000 float64
	fetchRate  float64 // steady-state fetches per second, from /metrics
	peakFlight int64
	// The spill's part: callbacks fsynced to the spill because their
	// journal commit missed -journal-timeout, and 2xx answers with
	// neither record.
	spilled, journalFailures float64
	// shedBy is the service's own count of callbacks answered 503, by
	// reason, during the row: why it shed what the sender counts as shed.
	shedBy  map[string]float64
	held    bool
	note    string
	targets []target // overload and edge rows only, instead of held and note
	// For the edge rows: go_goroutines before the load and during it, and
	// the WARN lines saying the object service is not answering.
	idleGoroutines float64
	goroutines     []sample
	notAnswering   int
}

// sample is one reading of a gauge.
type sample struct {
	at    time.Time
	value float64
}

// target is one overload target and whether the row met it.
type target struct {
	what string // the measured value, as in "timed out 0.3%"
	ok   bool
}

func (t target) String() string {
	if t.ok {
		return t.what + " ok"
	}
	return t.what + " MISS"
}

func targetsString(ts []target) string {
	s := make([]string, len(ts))
	for i, t := range ts {
		s[i] = t.String()
	}
	return strings.Join(s, ", ")
}

// goodput is the accepted callbacks per second of sending.
func goodput(sum benchSummary) float64 {
	return ratio(float64(sum.Accepted), sum.Duration)
}

// overloadTargets judges an overload row, run at twice heldRate: nothing
// acknowledged may be lost, at most 1% of callbacks may go without an
// answer (a 503 is an answer: the sender can retry elsewhere at once, but
// a timeout costs it a second), the service must keep accepting close to
// the rate it held rather than collapse, and coalescing must still keep
// upstream requests to about one per id.
func overloadTargets(sum benchSummary, heldRate float64, unique bool) []target {
	share := dupGoodputShare
	if unique {
		share = uniqueGoodputShare
	}
	g := goodput(sum)
	return []target{
		{fmt.Sprintf("lost %d", sum.Lost), sum.Lost == 0},
		{fmt.Sprintf("timed out %.1f%%", 100*ratio(float64(sum.TimedOut), float64(sum.Sent))), 100*sum.TimedOut <= maxTimedOutPercent*sum.Sent},
		{fmt.Sprintf("goodput %.0f/s = %.0f%% of %g/s", g, 100*ratio(g, heldRate), heldRate), heldRate > 0 && g >= share*heldRate},
		{fmt.Sprintf("req/id %.4f", sum.UpstreamPerAcceptedID), sum.UpstreamPerAcceptedID <= maxUpstreamPerID},
	}
}

func runBench(ctx context.Context, c config, stdout, stderr io.Writer) int {
	if err := bench(ctx, c, stdout, stderr); err != nil {
		fmt.Fprintln(stderr, "sim: bench:", err)
		return 1
	}
	return 0
}

func referenceLoad(c config) benchLoad {
	return benchLoad{name: "reference", rate: 0.2,
		args: []string{"-rate", "0.2", "-ids", "200", "-id-space", "100", "-duration", c.refDuration.String()}}
}

// stepLoad is a duplicate-heavy or unique load at rate: 200 ids per
// callback, from a space of 100 or never repeating.
func stepLoad(c config, rate float64, unique bool) benchLoad {
	args := []string{"-rate", fmt.Sprint(rate), "-ids", "200", "-ids-min", "200", "-duration", c.duration.String()}
	if unique {
		return benchLoad{name: fmt.Sprintf("unique %g/s", rate), rate: rate, unique: true, args: append(args, "-unique")}
	}
	return benchLoad{name: fmt.Sprintf("dup-heavy %g/s", rate), rate: rate, args: append(args, "-id-space", "100")}
}

// overloadLoad is the load of held's kind at twice its rate.
func overloadLoad(c config, held benchLoad) benchLoad {
	l := stepLoad(c, 2*held.rate, held.unique)
	l.name = "dup-heavy overload"
	if held.unique {
		l.name = "unique overload"
	}
	l.heldRate = held.rate
	return l
}

// bencher runs loads one after another and keeps their results.
type bencher struct {
	c       config
	self    string
	stderr  io.Writer
	results []benchResult
	// runLoad runs one step; nil means run (a test seam).
	runLoad func(context.Context, benchLoad) (benchResult, error)
}

func (b *bencher) step(ctx context.Context, l benchLoad) (benchResult, error) {
	if b.runLoad != nil {
		return b.runLoad(ctx, l)
	}
	return b.run(ctx, l)
}

func (b *bencher) run(ctx context.Context, l benchLoad) (benchResult, error) {
	if ctx.Err() != nil {
		return benchResult{}, ctx.Err()
	}
	fmt.Fprintf(b.stderr, "sim: bench: %s ...\n", l.name)
	r, err := measure(ctx, b.c, b.self, l, b.stderr)
	if err != nil {
		return r, fmt.Errorf("%s: %w", l.name, err)
	}
	b.results = append(b.results, r)
	fmt.Fprintf(b.stderr, "sim: bench: %s: %s\n", l.name, r.verdict())
	return r, nil
}

// closed runs the closed-loop row (closed.go).
func (b *bencher) closed(ctx context.Context) (*closedResult, error) {
	fmt.Fprintf(b.stderr, "sim: bench: closed loop, %d senders ...\n", b.c.closedConcurrency)
	r, err := measureClosed(ctx, b.c, b.self, b.stderr)
	if err != nil {
		return nil, fmt.Errorf("closed loop: %w", err)
	}
	fmt.Fprintf(b.stderr, "sim: bench: closed loop: %.0f/s against %.0f/s, %.0f%%\n", r.service.AcceptedPerSec, r.baselineRate(), 100*r.ratio())
	return &r, nil
}

// steps runs the load of one kind at each rate in turn until one does not
// hold, and returns the last one that held (nil if none did).
// steps runs rates in order until one does not hold, then narrows the gap
// between it and the highest rate that held, b.c.refine times by halves: it
// returns the highest rate that held.
func (b *bencher) steps(ctx context.Context, rates []float64, unique bool) (*benchResult, error) {
	var best *benchResult
	failed := 0.0
	for _, rate := range rates {
		r, err := b.step(ctx, stepLoad(b.c, rate, unique))
		if err != nil {
			return nil, err
		}
		if !r.held {
			failed = rate
			break
		}
		best = &r
	}
	if best == nil || failed == 0 {
		return best, nil
	}
	for range b.c.refine {
		rate := math.Round((best.rate+failed)/2*100) / 100
		if rate <= best.rate || rate >= failed {
			break
		}
		r, err := b.step(ctx, stepLoad(b.c, rate, unique))
		if err != nil {
			return nil, err
		}
		if r.held {
			best = &r
		} else {
			failed = rate
		}
	}
	return best, nil
}

func bench(ctx context.Context, c config, stdout, stderr io.Writer) error {
	if err := mayEmptyTables(c.dsn, os.Getenv); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find this program to run it: %w", err)
	}
	b := &bencher{c: c, self: self, stderr: stderr}
	if c.closedOnly {
		r, err := b.closed(ctx)
		if err != nil {
			return err
		}
		printClosedTable(stdout, r)
		return nil
	}
	if _, err := b.run(ctx, referenceLoad(c)); err != nil {
		return err
	}
	bestDup, err := b.steps(ctx, c.dupRates, false)
	if err != nil {
		return err
	}
	bestUnique, err := b.steps(ctx, c.uniqueRates, true)
	if err != nil {
		return err
	}

	// The overload rows, after all the steps.
	var skipped []string
	for _, o := range []struct {
		kind string
		best *benchResult
	}{{"unique", bestUnique}, {"dup-heavy", bestDup}} {
		if o.best == nil {
			skipped = append(skipped, fmt.Sprintf("%s overload: not run, no %s rate held", o.kind, o.kind))
			continue
		}
		if _, err := b.run(ctx, overloadLoad(c, o.best.benchLoad)); err != nil {
			return err
		}
	}

	var closed *closedResult
	if c.closedLoop {
		if closed, err = b.closed(ctx); err != nil {
			return err
		}
	}

	var ceiling benchSummary
	if bestUnique != nil {
		fmt.Fprintf(stderr, "sim: bench: ceiling at concurrency %d ...\n", bestUnique.peakFlight)
		ceiling, err = measureCeiling(ctx, self, max(bestUnique.peakFlight, 1), stderr)
		if err != nil {
			return fmt.Errorf("ceiling: %w", err)
		}
	}
	edgeSkipped, err := b.edges(ctx, bestUnique)
	if err != nil {
		return err
	}
	printBenchTable(stdout, b.results, bestDup, bestUnique, ceiling)
	printOverloadTable(stdout, b.results, skipped)
	printClosedTable(stdout, closed)
	printEdgeTable(stdout, b.results, edgeSkipped)
	printSpillLine(stdout, b.results)
	return nil
}

func (r benchResult) verdict() string {
	if r.overload() || r.edge != "" {
		return "targets: " + targetsString(r.targets)
	}
	if r.held {
		return "held"
	}
	return "did not hold: " + r.note
}

// freshService empties the tables and starts the service under test, with
// an object-service address of its own, for one measured load.
func freshService(c config) (*serviceProc, string, error) {
	if err := resetTables(c.dsn); err != nil {
		return nil, "", err
	}
	simAddr, err := freeAddr()
	if err != nil {
		return nil, "", err
	}
	svc, err := startService(c.service, simAddr, c.dsn)
	if err != nil {
		return nil, "", err
	}
	return svc, simAddr, nil
}

// measure runs one load against a fresh service process.
func measure(ctx context.Context, c config, self string, l benchLoad, stderr io.Writer) (benchResult, error) {
	res := benchResult{benchLoad: l}
	svc, simAddr, err := freshService(c)
	if err != nil {
		return res, err
	}
	stopped := false
	defer func() {
		if !stopped {
			svc.stop()
		}
	}()
	pid := svc.cmd.Process.Pid
	cpu0 := cpuSeconds(pid)
	m0 := scrape(svc.base)
	fetches0 := m0.sum(metricFetches)
	res.idleGoroutines = m0[metricGoroutines]

	// Sample /metrics while the load runs: peak fetches in flight, and the
	// fetch count a few seconds in and at the end of sending, for a
	// steady-state rate that leaves out ramp-up and drain.
	sampleCtx, stopSampling := context.WithCancel(ctx)
	var mu sync.Mutex
	type point struct {
		at      time.Time
		fetches float64
	}
	var points []point
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-sampleCtx.Done():
				return
			case <-t.C:
			}
			m := scrape(svc.base)
			mu.Lock()
			res.peakFlight = max(res.peakFlight, int64(m[metricFetchesInFlight]))
			points = append(points, point{time.Now(), m.sum(metricFetches)})
			if g, ok := m[metricGoroutines]; ok {
				res.goroutines = append(res.goroutines, sample{time.Now(), g})
			}
			mu.Unlock()
		}
	}()

	args := append([]string{"-target", svc.base + "/callback", "-listen", simAddr,
		"-json", "-check-expiry=false", "-settle", "20s"}, l.args...)
	start := time.Now()
	sum, err := runSelfEnv(ctx, self, args, []string{"DATABASE_URL=" + c.dsn}, stderr)
	if err == nil && l.sampleAfter > 0 {
		holdAfterLoad(ctx, sum, l.sampleAfter)
	}
	// Wait for the sampler (at most one scrape, 2 s) so that it no longer
	// writes res.peakFlight.
	stopSampling()
	<-sampled
	if err != nil {
		return res, err
	}
	res.sum = sum
	cpu := cpuSeconds(pid) - cpu0
	m1 := scrape(svc.base)
	fetches := m1.sum(metricFetches) - fetches0
	res.spilled = m1[metricSpilled] - m0[metricSpilled]
	res.journalFailures = m1[metricJournalFailures] - m0[metricJournalFailures]
	res.shedBy = map[string]float64{}
	for _, reason := range shedReasons {
		if n := m1[shedSeries(reason)] - m0[shedSeries(reason)]; n > 0 {
			res.shedBy[reason] = n
		}
	}
	if fetches > 0 {
		res.cpuPer1000 = cpu / fetches * 1000
	}
	res.peakRSSMiB = peakRSSMiB(pid)
	svc.stop()
	stopped = true
	res.notAnswering = strings.Count(svc.logs.String(), notAnsweringWarn)

	mu.Lock()
	sendEnd := start.Add(time.Duration(sum.Duration * float64(time.Second)))
	var first, last *point
	for i := range points {
		p := &points[i]
		if p.at.Before(start.Add(5*time.Second)) || p.at.After(sendEnd) {
			continue
		}
		if first == nil {
			first = p
		}
		last = p
	}
	if first != nil && last != nil && last.at.After(first.at) {
		res.fetchRate = (last.fetches - first.fetches) / last.at.Sub(first.at).Seconds()
	}
	mu.Unlock()

	if l.edge != "" {
		res.targets = edgeTargets(res)
		return res, nil
	}
	// An overload row sheds by design: the run-mode verdict (FAIL on any
	// callback without a 2xx) does not apply to it, its targets do.
	if l.overload() {
		res.targets = overloadTargets(sum, l.heldRate, l.unique)
		return res, nil
	}
	switch {
	case sum.Missed > 0:
		res.note = fmt.Sprintf("%d callbacks missed (%d shed with 503%s, %d timed out)", sum.Missed, sum.Shed, res.shedReasonsString(), sum.TimedOut)
	case !sum.Pass:
		res.note = "simulator verdict FAIL"
	case l.unique && (sum.CatchupMS < 0 || sum.CatchupMS > 6000):
		res.note = fmt.Sprintf("catch-up %.1fs > 6s", sum.CatchupMS/1000)
	default:
		res.held = true
	}
	return res, nil
}

func shedSeries(reason string) string {
	return metricShed + `{reason="` + reason + `"}`
}

// shedReasonsString lists the service's 503s by reason, as in
// ": busy 12, queue_wait 3", or nothing when it shed none.
func (r benchResult) shedReasonsString() string {
	var parts []string
	for _, reason := range shedReasons {
		if n := r.shedBy[reason]; n > 0 {
			parts = append(parts, fmt.Sprintf("%s %.0f", reason, n))
		}
	}
	if len(parts) == 0 {
		return ""
	}
	return ": " + strings.Join(parts, ", ")
}

// measureCeiling runs the simulated object service in one process and a
// bare client in another, as the service and the simulator are during the
// loads, so each side has the same file-descriptor budget it had there.
func measureCeiling(ctx context.Context, self string, concurrency int64, stderr io.Writer) (benchSummary, error) {
	addr, err := freeAddr()
	if err != nil {
		return benchSummary{}, err
	}
	up := exec.CommandContext(ctx, self, "-mode", "upstream", "-listen", addr)
	up.Stderr = stderr
	if err := up.Start(); err != nil {
		return benchSummary{}, fmt.Errorf("start the object service: %w", err)
	}
	defer func() {
		_ = up.Process.Signal(os.Interrupt)
		_ = up.Wait()
	}()
	err = waitFor(10*time.Second, func() error {
		conn, err := net.Dial("tcp", addr)
		if err == nil {
			conn.Close()
		}
		return err
	})
	if err != nil {
		return benchSummary{}, fmt.Errorf("object service did not come up: %w", err)
	}
	return runSelf(ctx, self, []string{"-mode", "ceiling", "-ceiling-target", "http://" + addr,
		"-concurrency", fmt.Sprint(concurrency), "-duration", "20s", "-json"}, stderr)
}

// runSelf runs this program with args and returns its SUMMARY line; a
// failing verdict (exit 1) still returns the summary.
func runSelf(ctx context.Context, self string, args []string, stderr io.Writer) (benchSummary, error) {
	return runSelfEnv(ctx, self, args, nil, stderr)
}

// runSelfEnv is runSelf with env added to this program's environment.
func runSelfEnv(ctx context.Context, self string, args, env []string, stderr io.Writer) (benchSummary, error) {
	cmd := exec.CommandContext(ctx, self, args...)
	cmd.Env = append(os.Environ(), env...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, stderr
	runErr := cmd.Run()
	var sum benchSummary
	if err := parseSummary(out.Bytes(), &sum); err != nil {
		return sum, fmt.Errorf("simulator: %w (%v):\n%s", err, runErr, out.String())
	}
	return sum, nil
}

// Bench mode empties the objects and callback_journal tables before each
// load. It does so only on a database known to be a throwaway: the one
// scripts/with-postgres started, which it names in throwawayEnv, or one the
// user vouches for with truncateOKEnv=1. An exported DATABASE_URL that
// names a production database is refused.
const (
	throwawayEnv  = "OBJTRACK_THROWAWAY_DB"
	truncateOKEnv = "OBJTRACK_BENCH_MAY_TRUNCATE"
)

func mayEmptyTables(dsn string, getenv func(string) string) error {
	if dsn != "" && getenv(throwawayEnv) == dsn || getenv(truncateOKEnv) == "1" {
		return nil
	}
	return fmt.Errorf("refusing to empty the objects and callback_journal tables of %s: run it as make bench "+
		"(scripts/with-postgres starts a throwaway PostgreSQL when DATABASE_URL is unset), or, if that database "+
		"may lose its data, set %s=1", redactDSN(dsn), truncateOKEnv)
}

func resetTables(dsn string) error {
	if err := mayEmptyTables(dsn, os.Getenv); err != nil {
		return err
	}
	db, err := openDB(dsn)
	if err != nil {
		return err
	}
	defer db.Close()
	// The tables may not exist before the first service start.
	_, err = db.Exec(`DO $$ BEGIN
		IF to_regclass('objects') IS NOT NULL THEN TRUNCATE objects; END IF;
		IF to_regclass('callback_journal') IS NOT NULL THEN TRUNCATE callback_journal; END IF;
	END $$`)
	if err != nil {
		return fmt.Errorf("empty the tables: %w", err)
	}
	return nil
}

// printBenchTable prints the reference and step rows of results, the
// highest rates that held and the ceiling.
func printBenchTable(w io.Writer, results []benchResult, bestDup, bestUnique *benchResult, ceiling benchSummary) {
	fmt.Fprintf(w, "\n%-18s %6s %6s %6s %6s %24s %9s %9s %9s %9s %9s %6s\n", "load", "sent", "missed", "shed", "t/o",
		"ack p50/p99/max ms", "catch-up", "req/id", "req/s", "fetch/s", "RSS MiB", "cpu/1k")
	for _, r := range results {
		if r.overload() || r.edge != "" {
			continue
		}
		catchup := "never"
		if r.sum.CatchupMS >= 0 {
			catchup = fmt.Sprintf("%.1fs", r.sum.CatchupMS/1000)
		}
		mark := ""
		if !r.held {
			mark = "  <- " + r.note
		}
		fmt.Fprintf(w, "%-18s %6d %6d %6d %6d %24s %9s %9.4f %9.0f %9.0f %9.0f %6.2f%s\n", r.name, r.sum.Sent, r.sum.Missed, r.sum.Shed, r.sum.TimedOut,
			fmt.Sprintf("%.1f/%.1f/%.1f", r.sum.AckP50, r.sum.AckP99, r.sum.AckMax), catchup,
			r.sum.UpstreamPerID, r.sum.UpstreamPerSec, r.fetchRate, r.peakRSSMiB, r.cpuPer1000, mark)
	}
	fmt.Fprintln(w)
	if bestDup == nil {
		fmt.Fprintln(w, "no dup-heavy rate held")
	} else {
		fmt.Fprintf(w, "highest dup-heavy rate that held: %s\n", bestDup.name)
	}
	if bestUnique == nil {
		fmt.Fprintln(w, "no unique-id rate held")
	} else {
		fmt.Fprintf(w, "highest unique rate that held: %s (%.0f fetches/s steady, peak %d in flight)\n", bestUnique.name, bestUnique.fetchRate, bestUnique.peakFlight)
		if ceiling.RequestsPerSec > 0 {
			fmt.Fprintf(w, "bare-client ceiling at %d concurrent: %.0f GET/s (%d errors); the service reached %.0f%% of it\n",
				bestUnique.peakFlight, ceiling.RequestsPerSec, ceiling.Errors, 100*bestUnique.fetchRate/ceiling.RequestsPerSec)
		}
	}
	fmt.Fprintln(w, "rows: reference = a callback every 5 s of up to 200 ids from 0-99; dup-heavy N/s = N callbacks/s of 200 ids")
	fmt.Fprintln(w, "from 0-99; unique N/s = N callbacks/s of 200 never-repeating ids; each kind steps up its rates until one")
	fmt.Fprintln(w, "does not hold (a callback missed, the run's verdict FAIL, or for unique ids a catch-up over 6 s).")
	fmt.Fprintln(w, "columns: missed = callbacks without a 2xx, plus accepted ones with an online id lost from the table;")
	fmt.Fprintln(w, "of them shed = answered 503 at once, t/o = no answer within 1 s;")
	fmt.Fprintln(w, "req/id = upstream requests per id sent; req/s = upstream requests per second over the run;")
	fmt.Fprintln(w, "fetch/s = the service's fetches per second while sending (after 5 s); RSS = peak resident set of the service;")
	fmt.Fprintln(w, "cpu/1k = service CPU seconds per 1000 fetches; catch-up = last callback to an exact table.")
}

// printSpillLine says what the spill cost each row: callbacks spilled
// (their journal commit was late) and 2xx answers with neither record.
func printSpillLine(w io.Writer, results []benchResult) {
	var rows []string
	for _, r := range results {
		rows = append(rows, fmt.Sprintf("%s %.0f/%.0f", r.name, r.spilled, r.journalFailures))
	}
	fmt.Fprintf(w, "\nspill (callbacks spilled because their journal commit was late / 2xx with neither record), per row: %s\n",
		strings.Join(rows, ", "))
}

// printOverloadTable prints the overload rows of results, each followed by
// its targets, and the rows that could not run.
func printOverloadTable(w io.Writer, results []benchResult, skipped []string) {
	fmt.Fprintf(w, "\n%-18s %9s %8s %8s %8s %9s %8s %8s %10s %8s\n", "overload", "offered", "accepted", "shed", "t/o",
		"goodput", "lost ids", "req/id", "ack p99 ms", "RSS MiB")
	for _, r := range results {
		if !r.overload() {
			continue
		}
		fmt.Fprintf(w, "%-18s %9s %8d %8d %8d %9s %8d %8.4f %10.1f %8.0f\n", r.name, fmt.Sprintf("%.0f/s", ratio(float64(r.sum.Sent), r.sum.Duration)),
			r.sum.Accepted, r.sum.Shed, r.sum.TimedOut, fmt.Sprintf("%.0f/s", goodput(r.sum)), r.sum.Lost,
			r.sum.UpstreamPerAcceptedID, r.sum.AckP99, r.peakRSSMiB)
		fmt.Fprintf(w, "  targets: %s\n", targetsString(r.targets))
		if why := r.shedReasonsString(); why != "" {
			fmt.Fprintf(w, "  the service's 503s by reason%s\n", why)
		}
		// Failures that are neither a 503 nor a timeout (a refused or
		// reset connection, another status) are in no column above.
		if other := r.sum.Failed - r.sum.Shed - r.sum.TimedOut; other > 0 {
			fmt.Fprintf(w, "  and %d callbacks failed otherwise (no 2xx, not a 503, not a timeout)\n", other)
		}
	}
	for _, s := range skipped {
		fmt.Fprintln(w, s)
	}
	fmt.Fprintln(w, "rows: each kind at twice its highest rate that held, same ids and duration; shedding is expected.")
	fmt.Fprintln(w, "columns: offered = callbacks/s sent (measured, of the 2x rate asked for); accepted = callbacks answered 2xx; shed = answered 503;")
	fmt.Fprintln(w, "t/o = no answer within 1 s; goodput = accepted callbacks per second of sending;")
	fmt.Fprintln(w, "lost ids = online ids of accepted callbacks that never reached the table with their time;")
	fmt.Fprintln(w, "req/id = upstream requests per id of the accepted callbacks (the only ones fetched); ack p99 = of all answers,")
	fmt.Fprintln(w, "503s included, timeouts counted at 1 s; RSS = peak resident set of the service.")
	fmt.Fprintf(w, "targets: lost ids 0; timed out <= %d%% of sent; goodput >= %.0f%% (unique) / %.0f%% (dup-heavy) of the\n",
		maxTimedOutPercent, 100*uniqueGoodputShare, 100*dupGoodputShare)
	fmt.Fprintf(w, "highest rate that held; req/id <= %g. MISS marks a target not met.\n", maxUpstreamPerID)
}
