// Command bench measures the service under load on this machine and prints
// one table: it starts a fresh service process per load, drives it with the
// simulator (../sim), reads the simulator's verdict and the service's
// /metrics and /proc entries, and finally measures the bare-client ceiling of
// the simulated object service.
//
//	go build -o bin/objtrack . && go build -o bin/sim ./sim
//	go run ./bench -service bin/objtrack -sim bin/sim -dsn "$DATABASE_URL"
package main

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	_ "github.com/lib/pq"
)

// load is one row of the table: simulator flags and what must hold.
type load struct {
	name    string
	simArgs []string
	unique  bool
}

// summary is what the table needs of the simulator's SUMMARY line.
type summary struct {
	Sent           int     `json:"sent"`
	Missed         int     `json:"missed"`
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

// result is one measured row.
type result struct {
	load
	sum        summary
	peakRSSMiB float64
	cpuPer1000 float64
	fetchRate  float64 // steady-state fetches per second, from /metrics
	peakFlight int64
	held       bool
	note       string
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run() error {
	service := flag.String("service", "bin/objtrack", "service binary")
	sim := flag.String("sim", "bin/sim", "simulator binary")
	dsn := flag.String("dsn", os.Getenv("DATABASE_URL"), "PostgreSQL DSN (default $DATABASE_URL); its objects and journal tables are emptied before each load")
	duration := flag.Duration("duration", 30*time.Second, "sending time of the duplicate-heavy and unique loads")
	refDuration := flag.Duration("ref-duration", 60*time.Second, "sending time of the reference load")
	rates := flag.String("unique-rates", "10,20,25,30,35,40,50", "callback rates to step through for the unique load, until one does not hold")
	flag.Parse()
	if *dsn == "" {
		return errors.New("-dsn or DATABASE_URL is required")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	loads := []load{
		{name: "reference", simArgs: []string{"-rate", "0.2", "-ids", "200", "-id-space", "100", "-duration", refDuration.String()}},
		{name: "duplicate-heavy", simArgs: []string{"-rate", "200", "-ids", "200", "-ids-min", "200", "-id-space", "100", "-duration", duration.String()}},
	}
	for _, r := range strings.Split(*rates, ",") {
		rate, err := strconv.ParseFloat(strings.TrimSpace(r), 64)
		if err != nil {
			return fmt.Errorf("-unique-rates: %w", err)
		}
		loads = append(loads, load{name: fmt.Sprintf("unique %g/s", rate), unique: true,
			simArgs: []string{"-rate", fmt.Sprint(rate), "-ids", "200", "-ids-min", "200", "-unique", "-duration", duration.String()}})
	}

	var results []result
	var bestUnique *result
	for _, l := range loads {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		fmt.Fprintf(os.Stderr, "bench: %s ...\n", l.name)
		r, err := measure(ctx, *service, *sim, *dsn, l)
		if err != nil {
			return fmt.Errorf("%s: %w", l.name, err)
		}
		results = append(results, r)
		fmt.Fprintf(os.Stderr, "bench: %s: %s\n", l.name, r.verdict())
		if l.unique {
			if !r.held {
				break
			}
			bestUnique = &results[len(results)-1]
		}
	}

	var ceiling summary
	if bestUnique != nil {
		fmt.Fprintf(os.Stderr, "bench: ceiling at concurrency %d ...\n", bestUnique.peakFlight)
		c, err := measureCeiling(ctx, *sim, max(bestUnique.peakFlight, 1))
		if err != nil {
			return fmt.Errorf("ceiling: %w", err)
		}
		ceiling = c
	}
	printTable(os.Stdout, results, bestUnique, ceiling)
	return nil
}

func (r result) verdict() string {
	if r.held {
		return "held"
	}
	return "did not hold: " + r.note
}

// measure runs one load against a fresh service process.
func measure(ctx context.Context, service, sim, dsn string, l load) (result, error) {
	res := result{load: l}
	if err := resetTables(dsn); err != nil {
		return res, err
	}
	svcAddr, simAddr := freeAddr(), freeAddr()
	cmd := exec.Command(service, "-listen", svcAddr, "-upstream", "http://"+simAddr, "-dsn", dsn, "-log-level", "warn")
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		return res, fmt.Errorf("start service: %w", err)
	}
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	}()
	base := "http://" + svcAddr
	if err := waitReady(base, 15*time.Second); err != nil {
		return res, fmt.Errorf("%w\n%s", err, logs.String())
	}
	pid := cmd.Process.Pid
	cpu0 := cpuSeconds(pid)
	fetches0 := fetchesTotal(base)

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
			m := scrape(base)
			mu.Lock()
			res.peakFlight = max(res.peakFlight, int64(m["objtrack_fetches_in_flight"]))
			points = append(points, point{time.Now(), sumPrefix(m, "objtrack_fetches_total")})
			mu.Unlock()
		}
	}()

	simArgs := append([]string{"-target", base + "/callback", "-listen", simAddr, "-dsn", dsn,
		"-json", "-check-expiry=false", "-settle", "20s"}, l.simArgs...)
	start := time.Now()
	sum, err := runSim(ctx, sim, simArgs)
	stopSampling()
	if err != nil {
		return res, err
	}
	res.sum = sum
	cpu := cpuSeconds(pid) - cpu0
	fetches := fetchesTotal(base) - fetches0
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
		res.note = fmt.Sprintf("%d callbacks missed", sum.Missed)
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
func measureCeiling(ctx context.Context, sim string, concurrency int64) (summary, error) {
	addr := freeAddr()
	up := exec.CommandContext(ctx, sim, "-mode", "upstream", "-listen", addr)
	up.Stderr = os.Stderr
	if err := up.Start(); err != nil {
		return summary{}, fmt.Errorf("start the object service: %w", err)
	}
	defer func() {
		_ = up.Process.Signal(os.Interrupt)
		_ = up.Wait()
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		conn, err := net.Dial("tcp", addr)
		if err == nil {
			conn.Close()
			break
		}
		if time.Now().After(deadline) {
			return summary{}, fmt.Errorf("object service did not come up: %w", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return runSim(ctx, sim, []string{"-mode", "ceiling", "-ceiling-target", "http://" + addr,
		"-concurrency", fmt.Sprint(concurrency), "-duration", "20s", "-json"})
}

// runSim runs the simulator and returns its SUMMARY line; a failing verdict
// (exit 1) still returns the summary.
func runSim(ctx context.Context, sim string, args []string) (summary, error) {
	cmd := exec.CommandContext(ctx, sim, args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = os.Stderr
	err := cmd.Run()
	var sum summary
	sc := bufio.NewScanner(&out)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	found := false
	for sc.Scan() {
		if js, ok := strings.CutPrefix(sc.Text(), "SUMMARY "); ok {
			if jerr := json.Unmarshal([]byte(js), &sum); jerr != nil {
				return sum, fmt.Errorf("parse simulator summary: %w", jerr)
			}
			found = true
		}
	}
	if !found {
		return sum, fmt.Errorf("simulator printed no summary (%v):\n%s", err, out.String())
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

func freeAddr() string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func waitReady(base string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		resp, err := http.Get(base + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("service not ready within %s", timeout)
}

// scrape reads the service's /metrics into name{labels} → value.
func scrape(base string) map[string]float64 {
	out := map[string]float64{}
	client := &http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get(base + "/metrics")
	if err != nil {
		return out
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			out[line[:i]] = v
		}
	}
	return out
}

func sumPrefix(m map[string]float64, prefix string) float64 {
	var s float64
	for k, v := range m {
		if strings.HasPrefix(k, prefix) {
			s += v
		}
	}
	return s
}

func fetchesTotal(base string) float64 { return sumPrefix(scrape(base), "objtrack_fetches_total") }

// cpuSeconds is the user+system CPU time of a process, from /proc.
func cpuSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name, which is in parentheses.
	fields := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	utime, _ := strconv.ParseFloat(fields[11], 64)
	stime, _ := strconv.ParseFloat(fields[12], 64)
	return (utime + stime) / 100 // USER_HZ is 100 on Linux
}

// peakRSSMiB is the process's high-water resident set size.
func peakRSSMiB(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			return kb / 1024
		}
	}
	return 0
}

func printTable(w io.Writer, results []result, best *result, ceiling summary) {
	fmt.Fprintf(w, "\n%-18s %6s %6s %24s %9s %9s %9s %9s %9s %6s\n", "load", "sent", "missed",
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
		fmt.Fprintf(w, "%-18s %6d %6d %24s %9s %9.4f %9.0f %9.0f %9.0f %6.2f%s\n", r.name, r.sum.Sent, r.sum.Missed,
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
	fmt.Fprintln(w, "columns: req/id = upstream requests per id sent; req/s = upstream requests per second over the run;")
	fmt.Fprintln(w, "fetch/s = the service's fetches per second while sending (after 5 s); RSS = peak resident set of the service;")
	fmt.Fprintln(w, "cpu/1k = service CPU seconds per 1000 fetches; catch-up = last callback to an exact table.")
}
