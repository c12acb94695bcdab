package main

// The closed-loop duplicate-heavy row (issue 23): -concurrency senders, each
// posting the next callback as soon as it has the answer to the last, all
// with one body of 200 ids drawn from 0-99, as `hey -c 200` does. Its
// number is the accepted callbacks per second, against a server that only
// decodes the body as the service does (servicedecode.go, a copy of the
// service's decode.go) and answers 202: the ceiling of the machine's HTTP
// path, measured in the same run with the same sender, before and after the
// service. A 2xx counts only if it is durable: the 202 body says "postgres"
// or "spill", and the service's objtrack_journal_failures_total stays 0.
//
//	sim -mode closed -target http://127.0.0.1:9090/callback -concurrency 200 -duration 15s
//	sim -mode baseline -listen 127.0.0.1:9191     # the decode-and-202 server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Of the closed loop: the ids of its one body, and the service's limits
// that the baseline applies as the service does (its -max-body and
// -max-ids defaults).
const (
	closedIDs       = 200
	closedIDSpace   = 100
	baselineMaxBody = 1 << 20
	baselineMaxIDs  = 10000
	// closedGoal is the goal: the service accepts at least this
	// share of the baseline's callbacks per second.
	closedGoal = 0.5
)

// closedLoop counts what the senders got.
type closedLoop struct {
	sent, accepted, shed, timedOut, failed atomic.Int64
	// The 2xx answers by the durable field of their body.
	durablePostgres, durableSpill, durableMemory, durableOther atomic.Int64
	firstFailure                                               atomic.Value // string
}

// closedBody is the one callback body the closed loop sends: closedIDs ids
// drawn from [0, closedIDSpace).
func closedBody() []byte {
	ids := make([]int64, closedIDs)
	for i := range ids {
		ids[i] = rand.Int64N(closedIDSpace)
	}
	return encode(ids)
}

// runClosed sends for d with n senders to target, each waiting for the
// answer (or timeout) to its callback before the next, and returns the
// counts and the time spent.
func runClosed(ctx context.Context, target string, n int, d, timeout time.Duration) (*closedLoop, time.Duration) {
	tr := senderTransport(n, timeout)
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: timeout}
	body := closedBody()
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	l := &closedLoop{}
	start := time.Now()
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				l.post(client, target, body)
			}
		}()
	}
	wg.Wait()
	return l, time.Since(start)
}

// post sends one callback and counts its answer. It is not cut short by
// the end of the run: an answer already under way is counted.
func (l *closedLoop) post(client *http.Client, target string, body []byte) {
	l.sent.Add(1)
	resp, err := client.Post(target, "application/json", bytes.NewReader(body))
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			l.timedOut.Add(1)
		} else {
			l.failed.Add(1)
		}
		l.firstFailure.CompareAndSwap(nil, err.Error())
		return
	}
	answer, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	switch {
	case resp.StatusCode/100 == 2:
		l.accepted.Add(1)
		// Read as the service writes it (json.Marshal: no spaces).
		switch {
		case bytes.Contains(answer, []byte(`"durable":"postgres"`)):
			l.durablePostgres.Add(1)
		case bytes.Contains(answer, []byte(`"durable":"spill"`)):
			l.durableSpill.Add(1)
		case bytes.Contains(answer, []byte(`"durable":"memory"`)):
			l.durableMemory.Add(1)
		default:
			l.durableOther.Add(1)
		}
	case resp.StatusCode == http.StatusServiceUnavailable:
		l.shed.Add(1)
	default:
		l.failed.Add(1)
		l.firstFailure.CompareAndSwap(nil, fmt.Sprintf("status %d: %.200s", resp.StatusCode, answer))
	}
}

// summary is the SUMMARY line of a closed-loop run.
func (l *closedLoop) summary(took time.Duration) map[string]any {
	first, _ := l.firstFailure.Load().(string)
	return map[string]any{
		"sent": l.sent.Load(), "accepted": l.accepted.Load(), "shed": l.shed.Load(),
		"timed_out": l.timedOut.Load(), "failed": l.failed.Load(),
		"accepted_per_sec": ratio(float64(l.accepted.Load()), took.Seconds()),
		"durable_postgres": l.durablePostgres.Load(), "durable_spill": l.durableSpill.Load(),
		"durable_memory": l.durableMemory.Load(), "durable_other": l.durableOther.Load(),
		"duration_s": took.Seconds(), "first_failure": first, "pass": true,
	}
}

// dedupeInPlace is the service's dedupe (callback.go), which the copy of
// its decoder calls: it sorts the decoded ids in place, where this
// program's dedupe copies them first.
func dedupeInPlace(ids []int64) []int64 {
	slices.Sort(ids)
	return slices.Compact(ids)
}

// closedSummary is what bench mode reads of a closed-loop run.
type closedSummary struct {
	Sent            int     `json:"sent"`
	Accepted        int     `json:"accepted"`
	Shed            int     `json:"shed"`
	TimedOut        int     `json:"timed_out"`
	Failed          int     `json:"failed"`
	AcceptedPerSec  float64 `json:"accepted_per_sec"`
	DurablePostgres int     `json:"durable_postgres"`
	DurableSpill    int     `json:"durable_spill"`
	DurableMemory   int     `json:"durable_memory"`
	DurableOther    int     `json:"durable_other"`
	Duration        float64 `json:"duration_s"`
	FirstFailure    string  `json:"first_failure"`
}

// runClosedMode is -mode closed: the closed loop against -target, serving
// the object service on -listen (unless empty) for the service to ask.
func runClosedMode(ctx context.Context, c config, objects *objectService, stdout, stderr io.Writer) int {
	if c.listen != "" {
		if _, err := serveObjects(ctx, c.listen, objects); err != nil {
			fmt.Fprintln(stderr, "sim:", err)
			return 2
		}
	}
	target := strings.Split(c.target, ",")[0]
	d := c.duration
	if d <= 0 {
		d = 15 * time.Second
	}
	fmt.Fprintf(stderr, "sim: closed loop: %d senders, one body of %d ids from 0-%d, against %s for %s\n",
		c.concurrency, closedIDs, closedIDSpace-1, target, d)
	l, took := runClosed(ctx, target, c.concurrency, d, c.timeout)
	sum := l.summary(took)
	fmt.Fprintf(stderr, "sim: closed loop: %.0f accepted/s (%d accepted, %d shed, %d timed out, %d failed otherwise)\n",
		sum["accepted_per_sec"], l.accepted.Load(), l.shed.Load(), l.timedOut.Load(), l.failed.Load())
	if c.json {
		printSummary(stdout, sum)
	}
	return 0
}

// baselineHandler decodes a callback as the service's handler does (the
// same body limit, the same decoder) and answers 202 with a body of the
// service's shape; it journals nothing and looks nothing up.
func baselineHandler() http.Handler {
	type acceptedBody struct {
		Status    string `json:"status"`
		IDs       int    `json:"ids"`
		Journaled bool   `json:"journaled"`
		Durable   string `json:"durable"`
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			w.Header().Set("Allow", http.MethodPost)
			http.Error(w, `{"error":"use POST"}`, http.StatusMethodNotAllowed)
			return
		}
		ids, err := decodeCallback(http.MaxBytesReader(w, r.Body, baselineMaxBody), baselineMaxIDs)
		if err != nil {
			http.Error(w, `{"error":"bad callback"}`, http.StatusBadRequest)
			return
		}
		b, _ := json.Marshal(acceptedBody{Status: "accepted", IDs: len(ids), Durable: "none"})
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusAccepted)
		_, _ = w.Write(append(b, '\n'))
	})
}

// runBaselineMode is -mode baseline: the decode-and-202 server on -listen
// until interrupted.
func runBaselineMode(ctx context.Context, c config, stderr io.Writer) int {
	ln, err := net.Listen("tcp", c.listen)
	if err != nil {
		fmt.Fprintln(stderr, "sim: baseline:", err)
		return 2
	}
	srv := &http.Server{Handler: baselineHandler(), ReadHeaderTimeout: 2 * time.Second}
	go func() {
		<-ctx.Done()
		_ = srv.Close()
	}()
	fmt.Fprintf(stderr, "sim: baseline (decode and 202) on http://%s/callback; Ctrl-C to stop\n", ln.Addr())
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintln(stderr, "sim: baseline:", err)
		return 1
	}
	return 0
}

// Bench mode's closed-loop row.

// closedResult is the row: the baseline's runs (before and after the
// service's, so that a machine whose load drifts during the row moves both
// sides of the ratio alike), the service's run, and the service's journal
// failures.
type closedResult struct {
	concurrency     int
	baseline        closedSummary
	baselineAfter   closedSummary
	service         closedSummary
	journalFailures float64
	peakRSSMiB      float64
}

// baselineRate is the mean of the baseline's two runs.
func (r closedResult) baselineRate() float64 {
	return (r.baseline.AcceptedPerSec + r.baselineAfter.AcceptedPerSec) / 2
}

func (r closedResult) ratio() float64 {
	return ratio(r.service.AcceptedPerSec, r.baselineRate())
}

// durable says whether every 2xx of the service was durable when sent.
func (r closedResult) durable() bool {
	return r.journalFailures == 0 && r.service.DurableMemory == 0 && r.service.DurableOther == 0 &&
		r.service.DurablePostgres+r.service.DurableSpill == r.service.Accepted
}

// measureClosed runs the closed loop against the baseline, then against a
// fresh service, each in a process of its own as the service is in the
// other rows.
func measureClosed(ctx context.Context, c config, self string, stderr io.Writer) (closedResult, error) {
	res := closedResult{concurrency: c.closedConcurrency}
	args := func(target string) []string {
		return []string{"-mode", "closed", "-target", target, "-concurrency", fmt.Sprint(c.closedConcurrency),
			"-duration", c.duration.String(), "-json"}
	}
	if err := measureBaseline(ctx, self, args, stderr, &res.baseline); err != nil {
		return res, err
	}
	// Then the service, asking the object service the sender serves.
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
	err = runSummary(ctx, self, append(args(svc.base+"/callback"), "-listen", simAddr), nil, stderr, &res.service)
	if err != nil {
		return res, fmt.Errorf("service: %w", err)
	}
	m := scrape(svc.base)
	failures, ok := m[metricJournalFailures]
	if !ok {
		return res, fmt.Errorf("service: no %s in /metrics", metricJournalFailures)
	}
	res.journalFailures = failures
	res.peakRSSMiB = peakRSSMiB(svc.cmd.Process.Pid)
	svc.stop()
	stopped = true
	if err := measureBaseline(ctx, self, args, stderr, &res.baselineAfter); err != nil {
		return res, err
	}
	return res, nil
}

// measureBaseline runs the closed loop against a decode-and-202 server in
// a process of its own.
func measureBaseline(ctx context.Context, self string, args func(string) []string, stderr io.Writer, sum *closedSummary) error {
	addr, err := freeAddr()
	if err != nil {
		return err
	}
	base := exec.CommandContext(ctx, self, "-mode", "baseline", "-listen", addr)
	base.Stderr = stderr
	if err := base.Start(); err != nil {
		return fmt.Errorf("start the baseline: %w", err)
	}
	defer func() {
		_ = base.Process.Signal(os.Interrupt)
		_ = base.Wait()
	}()
	if err := waitFor(10*time.Second, func() error { return dialable(addr) }); err != nil {
		return fmt.Errorf("baseline did not come up: %w", err)
	}
	if err := runSummary(ctx, self, append(args("http://"+addr+"/callback"), "-listen", ""), nil, stderr, sum); err != nil {
		return fmt.Errorf("baseline: %w", err)
	}
	return nil
}

func dialable(addr string) error {
	conn, err := net.Dial("tcp", addr)
	if err == nil {
		conn.Close()
	}
	return err
}

// runSummary runs this program with args and parses its SUMMARY line into v.
func runSummary(ctx context.Context, self string, args, env []string, stderr io.Writer, v any) error {
	cmd := exec.CommandContext(ctx, self, args...)
	cmd.Env = append(os.Environ(), env...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, stderr
	runErr := cmd.Run()
	if err := parseSummary(out.Bytes(), v); err != nil {
		return fmt.Errorf("simulator: %w (%v):\n%s", err, runErr, out.String())
	}
	return nil
}

// printClosedTable prints the closed-loop row and its verdict.
func printClosedTable(w io.Writer, r *closedResult) {
	if r == nil {
		return
	}
	fmt.Fprintf(w, "\n%-22s %11s %8s %8s %6s %6s %9s %8s\n", "closed loop", "accepted/s", "accepted", "shed", "t/o", "other", "durable", "RSS MiB")
	for _, b := range []struct {
		name string
		sum  closedSummary
	}{{"decode-and-202 before", r.baseline}, {"decode-and-202 after", r.baselineAfter}} {
		fmt.Fprintf(w, "%-22s %11.0f %8d %8d %6d %6d %9s %8s\n", b.name, b.sum.AcceptedPerSec,
			b.sum.Accepted, b.sum.Shed, b.sum.TimedOut, b.sum.Failed, "-", "-")
	}
	durable := "yes"
	if !r.durable() {
		durable = "NO"
	}
	fmt.Fprintf(w, "%-22s %11.0f %8d %8d %6d %6d %9s %8.0f\n", "objtrack", r.service.AcceptedPerSec,
		r.service.Accepted, r.service.Shed, r.service.TimedOut, r.service.Failed, durable, r.peakRSSMiB)
	verdict := "ok"
	if r.ratio() < closedGoal || !r.durable() {
		verdict = "MISS"
	}
	fmt.Fprintf(w, "objtrack accepted %.0f%% of the decode-and-202 server's callbacks/s (%.0f/s, the mean of its runs before and after;\ngoal >= %.0f%%, every 2xx durable): %s\n",
		100*r.ratio(), r.baselineRate(), 100*closedGoal, verdict)
	fmt.Fprintf(w, "2xx bodies: %d postgres, %d spill, %d memory, %d other; %s %.0f\n", r.service.DurablePostgres,
		r.service.DurableSpill, r.service.DurableMemory, r.service.DurableOther, metricJournalFailures, r.journalFailures)
	fmt.Fprintf(w, "rows: %d senders, each posting the next callback when it has the answer to the last (client timeout 1 s), one body of\n", r.concurrency)
	fmt.Fprintln(w, "200 ids from 0-99, for the run's -duration; the baseline decodes it as the service does and answers 202, nothing else;")
	fmt.Fprintln(w, "it runs before and after the service, so that a drift in the machine's load moves both sides of the ratio.")
	fmt.Fprintln(w, "durable = every 2xx body says postgres or spill, and the service counted no journal failure.")
}
