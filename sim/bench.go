package main

// Bench mode measures the service under load on this machine and prints one
// table: it starts a fresh service process per load, drives it with this
// program in run mode (another process, so the simulator's sockets and CPU
// are its own, as in any other run), reads that run's SUMMARY line and the
// service's /metrics and /proc entries, and finally measures the bare-client
// ceiling of the simulated object service.
//
//	go build -o bin/objtrack . && go build -o bin/sim ./sim
//	bin/sim -mode bench -service bin/objtrack -dsn "$DATABASE_URL"

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"sync"
	"time"
)

// benchDuration is the sending time of the duplicate-heavy and unique loads
// when -duration is not given in bench mode.
const benchDuration = 30 * time.Second

// The service's metrics that bench mode reads.
const (
	metricFetches         = "objtrack_fetches_total"
	metricFetchesInFlight = "objtrack_fetches_in_flight"
)

// benchLoad is one row of the table: run-mode flags and what must hold.
type benchLoad struct {
	name   string
	args   []string
	unique bool
}

// benchSummary is what the table needs of a run's SUMMARY line.
type benchSummary struct {
	Sent           int     `json:"sent"`
	Missed         int     `json:"missed"`
	Shed           int     `json:"shed"`
	TimedOut       int     `json:"timed_out"`
	AckP50         float64 `json:"ack_p50_ms"`
	AckP99         float64 `json:"ack_p99_ms"`
	AckMax         float64 `json:"ack_max_ms"`
	UpstreamPerID  float64 `json:"upstream_per_id"`
	UpstreamPerSec float64 `json:"upstream_per_sec"`
	CatchupMS      float64 `json:"catchup_ms"`
	Pass           bool    `json:"pass"`
	Duration       float64 `json:"duration_s"`
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
	held       bool
	note       string
}

func runBench(ctx context.Context, c config, stdout, stderr io.Writer) int {
	if err := bench(ctx, c, stdout, stderr); err != nil {
		fmt.Fprintln(stderr, "sim: bench:", err)
		return 1
	}
	return 0
}

// benchLoads are the loads in the order they run: the reference load, the
// duplicate-heavy one, then unique ids at each of -unique-rates.
func benchLoads(c config) []benchLoad {
	loads := []benchLoad{
		{name: "reference", args: []string{"-rate", "0.2", "-ids", "200", "-id-space", "100", "-duration", c.refDuration.String()}},
		{name: "duplicate-heavy", args: []string{"-rate", "200", "-ids", "200", "-ids-min", "200", "-id-space", "100", "-duration", c.duration.String()}},
	}
	for _, rate := range c.uniqueRates {
		loads = append(loads, benchLoad{name: fmt.Sprintf("unique %g/s", rate), unique: true,
			args: []string{"-rate", fmt.Sprint(rate), "-ids", "200", "-ids-min", "200", "-unique", "-duration", c.duration.String()}})
	}
	return loads
}

func bench(ctx context.Context, c config, stdout, stderr io.Writer) error {
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find this program to run it: %w", err)
	}
	var results []benchResult
	var bestUnique *benchResult
	for _, l := range benchLoads(c) {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		fmt.Fprintf(stderr, "sim: bench: %s ...\n", l.name)
		r, err := measure(ctx, c, self, l, stderr)
		if err != nil {
			return fmt.Errorf("%s: %w", l.name, err)
		}
		results = append(results, r)
		fmt.Fprintf(stderr, "sim: bench: %s: %s\n", l.name, r.verdict())
		if l.unique {
			if !r.held {
				break
			}
			bestUnique = &results[len(results)-1]
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
	printBenchTable(stdout, results, bestUnique, ceiling)
	return nil
}

func (r benchResult) verdict() string {
	if r.held {
		return "held"
	}
	return "did not hold: " + r.note
}

// measure runs one load against a fresh service process.
func measure(ctx context.Context, c config, self string, l benchLoad, stderr io.Writer) (benchResult, error) {
	res := benchResult{benchLoad: l}
	if err := resetTables(c.dsn); err != nil {
		return res, err
	}
	simAddr, err := freeAddr()
	if err != nil {
		return res, err
	}
	svc, err := startService(c.service, simAddr, c.dsn)
	if err != nil {
		return res, err
	}
	defer svc.stop()
	pid := svc.cmd.Process.Pid
	cpu0 := cpuSeconds(pid)
	fetches0 := scrape(svc.base).sum(metricFetches)

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
	go func() {
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
			mu.Unlock()
		}
	}()

	args := append([]string{"-target", svc.base + "/callback", "-listen", simAddr, "-dsn", c.dsn,
		"-json", "-check-expiry=false", "-settle", "20s"}, l.args...)
	start := time.Now()
	sum, err := runSelf(ctx, self, args, stderr)
	stopSampling()
	if err != nil {
		return res, err
	}
	res.sum = sum
	cpu := cpuSeconds(pid) - cpu0
	fetches := scrape(svc.base).sum(metricFetches) - fetches0
	if fetches > 0 {
		res.cpuPer1000 = cpu / fetches * 1000
	}
	res.peakRSSMiB = peakRSSMiB(pid)

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

	switch {
	case sum.Missed > 0:
		res.note = fmt.Sprintf("%d callbacks missed (%d shed with 503, %d timed out)", sum.Missed, sum.Shed, sum.TimedOut)
	case !sum.Pass:
		res.note = "simulator verdict FAIL"
	case l.unique && (sum.CatchupMS < 0 || sum.CatchupMS > 6000):
		res.note = fmt.Sprintf("catch-up %.1fs > 6s", sum.CatchupMS/1000)
	default:
		res.held = true
	}
	return res, nil
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
	cmd := exec.CommandContext(ctx, self, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, stderr
	runErr := cmd.Run()
	var sum benchSummary
	if err := parseSummary(out.Bytes(), &sum); err != nil {
		return sum, fmt.Errorf("simulator: %w (%v):\n%s", err, runErr, out.String())
	}
	return sum, nil
}

func resetTables(dsn string) error {
	db, err := sql.Open("postgres", dsn)
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

func printBenchTable(w io.Writer, results []benchResult, best *benchResult, ceiling benchSummary) {
	fmt.Fprintf(w, "\n%-18s %6s %6s %6s %6s %24s %9s %9s %9s %9s %9s %6s\n", "load", "sent", "missed", "shed", "t/o",
		"ack p50/p99/max ms", "catch-up", "req/id", "req/s", "fetch/s", "RSS MiB", "cpu/1k")
	for _, r := range results {
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
	if best == nil {
		fmt.Fprintln(w, "\nno unique-id rate held")
		return
	}
	fmt.Fprintf(w, "\nhighest unique rate that held: %s (%.0f fetches/s steady, peak %d in flight)\n", best.name, best.fetchRate, best.peakFlight)
	if ceiling.RequestsPerSec > 0 {
		fmt.Fprintf(w, "bare-client ceiling at %d concurrent: %.0f GET/s (%d errors); the service reached %.0f%% of it\n",
			best.peakFlight, ceiling.RequestsPerSec, ceiling.Errors, 100*best.fetchRate/ceiling.RequestsPerSec)
	}
	fmt.Fprintln(w, "columns: missed = callbacks without a 2xx, of them shed = answered 503 at once, t/o = no answer within 1 s;")
	fmt.Fprintln(w, "req/id = upstream requests per id sent; req/s = upstream requests per second over the run;")
	fmt.Fprintln(w, "fetch/s = the service's fetches per second while sending (after 5 s); RSS = peak resident set of the service;")
	fmt.Fprintln(w, "cpu/1k = service CPU seconds per 1000 fetches; catch-up = last callback to an exact table.")
}
