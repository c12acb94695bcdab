// Command sim simulates both sides of the reference tester for objtrack: it
// sends callbacks to the service (-target) and serves the slow object service
// the service asks (-listen), and, given the database (-dsn), checks the
// objects table against what it sent while the run goes on and at its end.
// In bench mode it measures the service under a series of loads, running
// itself for each of them (bench.go).
//
//	sim                              # reference load: a callback every 5 s
//	sim -rate 20 -unique -ids-min 200 -duration 30s
//	sim -mode upstream               # only the object service
//	sim -target http://a:9090/callback,http://b:9090/callback -check-journal
//	                                 # several instances in turn; the journal must end empty
//	sim -mode ceiling -ceiling-target http://127.0.0.1:9010 -concurrency 1000
//	sim -mode bench -service bin/objtrack   # the load benchmark (make bench)
//
// It exits 0 when nothing was missed and the table was exact, 1 when not,
// and 2 when it could not start; in bench mode 0 once the tables are printed
// and 1 when a measurement could not be made.
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
	"log"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	_ "github.com/lib/pq"
)

type config struct {
	mode          string
	target        string
	listen        string
	dsn           string
	rate          float64
	idsMax        int
	idsMin        int
	idSpace       int64
	unique        bool
	online        string
	latencyMin    time.Duration
	latencyMax    time.Duration
	duration      time.Duration
	count         int
	timeout       time.Duration
	ttl           time.Duration
	reapEvery     time.Duration
	tol           time.Duration
	poll          time.Duration
	settle        time.Duration
	checkExpiry   bool
	checkJournal  bool
	checkRefetch  bool
	killedTarget  int
	retryFor      time.Duration
	outageAfter   time.Duration
	outageFor     time.Duration
	faults        faults
	statusEvery   time.Duration
	json          bool
	concurrency   int
	ceilingTarget string
	floodConns    int
	// bench mode
	service      string
	refDuration  time.Duration
	uniqueRates  []float64
	dupRates     []float64
	refine       int
	edges        bool
	deadFor      time.Duration
	edgeCapacity float64
	// the closed-loop row (closed.go)
	closedLoop        bool
	closedOnly        bool
	closedConcurrency int
}

// modes are the values of -mode.
var modes = []string{"run", "upstream", "ceiling", "bench", "flood", "closed", "baseline"}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func parseFlags(args []string, stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("sim", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.mode, "mode", "run", "one of "+strings.Join(modes, ", ")+"\n"+
		"run: send callbacks, serve the object service and check the table;\n"+
		"upstream: only serve the object service;\n"+
		"ceiling: measure a bare client's GETs per second against the object service;\n"+
		"bench: the load benchmark: start -service afresh for each load (reference,\n"+
		"duplicate-heavy ids at each of -dup-rates, then unique ids at each of\n"+
		"-unique-rates, each until one does not hold, then each kind at twice its\n"+
		"highest rate that held), drive it with this program in run mode, then measure\n"+
		"the ceiling at the service's peak fetch concurrency, and print two tables; it\n"+
		"needs -dsn and reads only -service, -dsn, -duration, -ref-duration, -dup-rates,\n"+
		"-unique-rates, -edges, -edge-capacity, -dead-for and the -closed-* flags;\n"+
		"flood: hold -flood-conns idle keep-alive connections to the service;\n"+
		"closed: -concurrency senders each posting the next callback (200 ids from 0-99, one\n"+
		"body) as soon as the last is answered, for -duration, serving the object service;\n"+
		"baseline: answer POST /callback on -listen with 202 after decoding it as the service does")
	fs.StringVar(&c.target, "target", "http://localhost:9090/callback", "the service's callback URL, or several separated by commas: callbacks go to them in turn\n(round robin, as a load balancer in front of several instances would send them)")
	fs.StringVar(&c.listen, "listen", "localhost:9010", "address of the simulated object service (empty: do not serve it)")
	fs.StringVar(&c.dsn, "dsn", os.Getenv("DATABASE_URL"), "PostgreSQL DSN to check the objects table in (default $DATABASE_URL; empty: no table checks);\nbench mode: required, and its objects and callback_journal tables are emptied before each load")
	fs.Float64Var(&c.rate, "rate", 0.2, "callbacks per second (open loop)")
	fs.IntVar(&c.idsMax, "ids", 200, "most ids per callback")
	fs.IntVar(&c.idsMin, "ids-min", 0, "fewest ids per callback")
	fs.Int64Var(&c.idSpace, "id-space", 100, "ids are drawn from [0, id-space), with repeats")
	fs.BoolVar(&c.unique, "unique", false, "never-repeating ids, counting up from a base taken from the clock, instead of -id-space")
	fs.StringVar(&c.online, "online", "even", "which objects are online: even, odd, all or none")
	fs.DurationVar(&c.latencyMin, "latency-min", 300*time.Millisecond, "shortest object-service answer time")
	fs.DurationVar(&c.latencyMax, "latency-max", 4*time.Second, "longest object-service answer time")
	fs.DurationVar(&c.duration, "duration", 2*time.Minute, "how long to send (0: until -count or Ctrl-C);\n"+
		"ceiling mode: how long to measure (0 or over 2m: 20s);\n"+
		"bench mode: sending time of every load but the reference, "+benchDuration.String()+" unless given")
	fs.IntVar(&c.count, "count", 0, "stop after this many callbacks (0: no limit)")
	fs.DurationVar(&c.timeout, "timeout", time.Second, "client timeout of one callback; no 2xx within it is a missed callback")
	fs.DurationVar(&c.ttl, "ttl", 30*time.Second, "the service's -ttl")
	fs.DurationVar(&c.reapEvery, "reap-every", time.Second, "the service's -reap-every")
	fs.DurationVar(&c.tol, "tolerance", time.Second, "how far last_seen may be from a callback's receipt")
	fs.DurationVar(&c.poll, "poll", 250*time.Millisecond, "shortest interval between table polls (it grows with the table, to keep the checker's load small)")
	fs.DurationVar(&c.settle, "settle", 30*time.Second, "after the last callback, how long the table may take to become exact")
	fs.BoolVar(&c.checkExpiry, "check-expiry", true, "after the run, wait out the TTL and check that every row of the run was reaped")
	fs.BoolVar(&c.checkJournal, "check-journal", false, "after the table is exact, wait (within -settle) for the service's journal table to be empty, and fail\nif it is not: every accepted callback was finished, none left behind (it counts all rows, so\nonly this run may send to the services on that database)")
	fs.BoolVar(&c.checkRefetch, "check-refetch", false, "fail if an id was asked by more service instances than received a callback carrying it, plus one\n"+
		"if the instance of -killed-target held it at the kill: a double claim. Give each instance its own\n"+
		"-upstream http://HOST:PORT/i/LABEL so the object service tells them apart (per-id counts are in the\n"+
		"SUMMARY either way)")
	fs.IntVar(&c.killedTarget, "killed-target", -1, "index in -target of the instance a drill kills: SIGUSR1 to this program marks the kill, SIGUSR2\n"+
		"that the instance listens again; callbacks to it in between may fail, and ids it held may be fetched twice")
	fs.DurationVar(&c.retryFor, "retry-for", 0, "retry a callback without a 2xx, as webhook senders do, until this long after its first attempt:\n"+
		"after Retry-After for a 503, with backoff and jitter after an error or a timeout, each time on the next\n"+
		"target; a 4xx is not retried (0: one attempt, an open loop like the reference tester)")
	fs.DurationVar(&c.outageAfter, "outage-after", 0, "with -outage-for: when the object service's outage starts, after it starts serving")
	fs.DurationVar(&c.outageFor, "outage-for", 0, "how long the object service answers every request 500 at once (0: no outage); accepted callbacks\n"+
		"whose receipt + TTL comes before its end + -latency-max cannot land and are counted apart, not lost")
	fs.Float64Var(&c.faults.status500, "fault-500", 0, "fraction of object-service answers that are 500")
	fs.Float64Var(&c.faults.garbage, "fault-garbage", 0, "fraction of object-service answers that are invalid JSON")
	fs.Float64Var(&c.faults.wrongID, "fault-wrong-id", 0, "fraction of object-service answers that name another id")
	fs.Float64Var(&c.faults.hang, "fault-hang", 0, "fraction of object-service requests that never get an answer")
	fs.Float64Var(&c.faults.drop, "fault-drop", 0, "fraction of object-service connections closed without an answer")
	fs.DurationVar(&c.statusEvery, "status-every", 10*time.Second, "print a status line this often (0: never)")
	fs.BoolVar(&c.json, "json", false, "end with one line 'SUMMARY {json}' on stdout, for scripts")
	fs.IntVar(&c.concurrency, "concurrency", 1000, "ceiling mode: concurrent client requests")
	fs.IntVar(&c.floodConns, "flood-conns", 18500, "flood mode: keep-alive connections to open to the host of -target, each idle after one GET /healthz,\nheld until -duration passes (0: until interrupted); see flood.go")
	fs.StringVar(&c.ceilingTarget, "ceiling-target", "", "ceiling mode: base URL of the object service (empty: serve one in this process on a free port)")
	fs.StringVar(&c.service, "service", "bin/objtrack", "bench mode: the service binary, started afresh for each load")
	fs.DurationVar(&c.refDuration, "ref-duration", 60*time.Second, "bench mode: sending time of the reference load")
	uniqueRates := fs.String("unique-rates", "10,20,25,30,35,40,50", "bench mode: callback rates to step through for the unique load, until one does not hold\n(one rate and short durations make a quick check: -unique-rates 10 -dup-rates 200 -duration 6s -ref-duration 5s)")
	fs.BoolVar(&c.edges, "edges", true, "bench mode: after the overload rows, run the edge-case rows: flaky (25% 500s), dead (every answer 500 for\n-dead-for) and a retrying sender (see bench_edges.go)")
	fs.Float64Var(&c.edgeCapacity, "edge-capacity", 0, "bench mode: the unique capacity (callbacks/s of 200 ids) the flaky and retrying rows scale from\n(0: the highest unique rate that held in this run)")
	fs.DurationVar(&c.deadFor, "dead-for", 60*time.Second, "bench mode: how long the dead row's object service answers every request 500")
	fs.BoolVar(&c.closedLoop, "closed-loop", true, "bench mode: after the overload rows, run the closed-loop duplicate-heavy row: -closed-concurrency senders\nagainst a decode-and-202 server, then against the service (see closed.go)")
	fs.BoolVar(&c.closedOnly, "closed-loop-only", false, "bench mode: run only the closed-loop row (with a short -duration: a quick check)")
	fs.IntVar(&c.closedConcurrency, "closed-concurrency", 200, "bench mode: concurrent senders of the closed-loop row")
	fs.IntVar(&c.refine, "refine", 2, "bench mode: after the first rate of a kind that does not hold, run this many more, each halfway between\nthe highest rate that held and the lowest that did not (the steps are 15-25% apart; the capacity lies between)")
	dupRates := fs.String("dup-rates", "200,2000,4000", "bench mode: callback rates to step through for the duplicate-heavy load, until one does not hold")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	if c.mode == "bench" && !given["duration"] {
		c.duration = benchDuration
	}
	var err error
	if c.uniqueRates, err = parseRates("unique-rates", *uniqueRates); err != nil {
		return c, err
	}
	if c.dupRates, err = parseRates("dup-rates", *dupRates); err != nil {
		return c, err
	}
	switch {
	case fs.NArg() > 0:
		return c, fmt.Errorf("unexpected arguments: %q", fs.Args())
	case !slices.Contains(modes, c.mode):
		return c, fmt.Errorf("-mode %q: want one of %s", c.mode, strings.Join(modes, ", "))
	case c.mode == "bench" && c.dsn == "":
		return c, errors.New("-mode bench needs -dsn or DATABASE_URL")
	case c.mode == "bench" && (c.duration <= 0 || c.refDuration <= 0):
		return c, errors.New("-duration and -ref-duration must be positive in bench mode")
	case slices.Contains(strings.Split(c.target, ","), ""):
		return c, fmt.Errorf("-target %q: an empty URL in the list", c.target)
	case c.rate <= 0:
		return c, errors.New("-rate must be positive")
	case c.idsMin < 0 || c.idsMax < c.idsMin:
		return c, errors.New("-ids-min and -ids must satisfy 0 <= ids-min <= ids")
	case !c.unique && c.idSpace <= 0:
		return c, errors.New("-id-space must be positive")
	case c.latencyMin < 0 || c.latencyMax < c.latencyMin:
		return c, errors.New("-latency-min and -latency-max must satisfy 0 <= min <= max")
	case c.faults.status500 < 0 || c.faults.garbage < 0 || c.faults.wrongID < 0 || c.faults.hang < 0 || c.faults.drop < 0 || c.faults.total() > 1:
		return c, errors.New("fault fractions must be >= 0 and add up to at most 1")
	case c.concurrency <= 0 || c.closedConcurrency <= 0:
		return c, errors.New("-concurrency and -closed-concurrency must be positive")
	case c.poll <= 0 || c.timeout <= 0 || c.ttl <= 0:
		return c, errors.New("-poll, -timeout and -ttl must be positive")
	case c.retryFor < 0 || c.outageAfter < 0 || c.outageFor < 0 || c.deadFor <= 0 || c.edgeCapacity < 0:
		return c, errors.New("-retry-for, -outage-after and -outage-for must not be negative")
	case c.killedTarget >= len(strings.Split(c.target, ",")):
		return c, fmt.Errorf("-killed-target %d: -target has %d URLs", c.killedTarget, len(strings.Split(c.target, ",")))
	}
	if onlineFunc(c.online) == nil {
		return c, fmt.Errorf("-online %q: want even, odd, all or none", c.online)
	}
	return c, nil
}

// parseRates parses the comma-separated callback rates of flag name.
func parseRates(name, list string) ([]float64, error) {
	var rates []float64
	for _, r := range strings.Split(list, ",") {
		rate, err := strconv.ParseFloat(strings.TrimSpace(r), 64)
		if err != nil || rate <= 0 {
			return nil, fmt.Errorf("-%s: %q is not a positive number", name, r)
		}
		rates = append(rates, rate)
	}
	return rates, nil
}

func onlineFunc(name string) func(int64) bool {
	switch name {
	case "even":
		return func(id int64) bool { return id%2 == 0 }
	case "odd":
		return func(id int64) bool { return id%2 != 0 }
	case "all":
		return func(int64) bool { return true }
	case "none":
		return func(int64) bool { return false }
	}
	return nil
}

func run(args []string, stdout, stderr io.Writer) int {
	c, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "sim:", err)
		return 2
	}
	if c.mode == "bench" {
		// The first signal ends the benchmark; the processes it started
		// are stopped on the way out.
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		return runBench(ctx, c, stdout, stderr)
	}
	raiseFileLimit()

	// The first signal ends sending and starts the final checks; a second
	// one abandons them.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sendCtx, stopSending := context.WithCancel(ctx)
	defer stopSending()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sigs
		switch c.mode {
		case "upstream":
			fmt.Fprintln(stderr, "sim: interrupted: stopping the object service")
		case "baseline":
			fmt.Fprintln(stderr, "sim: interrupted: stopping the baseline server")
		default:
			fmt.Fprintln(stderr, "sim: interrupted: no more callbacks; final checks (interrupt again to skip them)")
		}
		stopSending()
		<-sigs
		cancel()
	}()

	objects := &objectService{latencyMin: c.latencyMin, latencyMax: c.latencyMax, online: onlineFunc(c.online), faults: c.faults,
		outageAfter: c.outageAfter, outageFor: c.outageFor}
	switch c.mode {
	case "upstream":
		addr, err := serveObjects(ctx, c.listen, objects)
		if err != nil {
			fmt.Fprintln(stderr, "sim:", err)
			return 2
		}
		fmt.Fprintf(stderr, "sim: object service on http://%s; Ctrl-C to stop\n", addr)
		<-sendCtx.Done()
		fmt.Fprintf(stderr, "sim: served %d requests (%d with injected faults, %d in the outage)\n", objects.requests.Load(), objects.faulted.Load(), objects.outaged.Load())
		return 0
	case "flood":
		return runFlood(sendCtx, c, stdout, stderr)
	case "closed":
		return runClosedMode(sendCtx, c, objects, stdout, stderr)
	case "baseline":
		return runBaselineMode(sendCtx, c, stderr)
	case "ceiling":
		return runCeiling(ctx, c, objects, stdout, stderr)
	}
	return runLoad(ctx, sendCtx, c, objects, stdout, stderr)
}

func runCeiling(ctx context.Context, c config, objects *objectService, stdout, stderr io.Writer) int {
	target := c.ceilingTarget
	if target == "" {
		addr, err := serveObjects(ctx, "127.0.0.1:0", objects)
		if err != nil {
			fmt.Fprintln(stderr, "sim:", err)
			return 2
		}
		target = "http://" + addr
	}
	d := c.duration
	if d <= 0 || d > 2*time.Minute {
		d = 20 * time.Second
	}
	fmt.Fprintf(stderr, "sim: ceiling: %d concurrent GETs against %s for %s\n", c.concurrency, target, d)
	ok, failed, window, firstErr := ceiling(ctx, target, c.concurrency, d)
	rps := float64(ok) / window.Seconds()
	fmt.Fprintf(stderr, "sim: ceiling: %.0f GET/s at concurrency %d (%d answers in the last %s, %d errors)\n", rps, c.concurrency, ok, window.Round(time.Millisecond), failed)
	if firstErr != "" {
		fmt.Fprintf(stderr, "sim: ceiling: first error: %s\n", firstErr)
	}
	if c.json {
		printSummary(stdout, map[string]any{"requests_per_sec": rps, "errors": failed, "concurrency": c.concurrency, "pass": true})
	}
	return 0
}

// runLoad is the run mode: send, serve, poll the table, and judge.
func runLoad(ctx, sendCtx context.Context, c config, objects *objectService, stdout, stderr io.Writer) int {
	if c.listen != "" {
		addr, err := serveObjects(ctx, c.listen, objects)
		if err != nil {
			fmt.Fprintln(stderr, "sim:", err)
			return 2
		}
		fmt.Fprintf(stderr, "sim: object service on http://%s (latency %s-%s, online: %s)\n", addr, c.latencyMin, c.latencyMax, c.online)
	}
	runStart := time.Now()
	// A callback's receipt lies anywhere from its first attempt to the
	// answer of its last.
	check := newChecker(c.ttl, c.reapEvery, c.tol, c.timeout+c.retryFor, onlineFunc(c.online), runStart)
	check.killedTarget = c.killedTarget
	if _, to := objects.outageWindow(); !to.IsZero() {
		// A lookup that starts when the object service is back still
		// needs up to -latency-max to be answered.
		check.lostExcusedBefore = to.Add(c.latencyMax)
		from, _ := objects.outageWindow()
		fmt.Fprintf(stderr, "sim: object service outage (every answer 500) from %s to %s\n", from.Format("15:04:05"), to.Format("15:04:05"))
	}
	kill := watchKill(ctx)
	s := newSender(strings.Split(c.target, ","), c.timeout)
	s.rate, s.idsMin, s.idsMax, s.idSpace, s.unique = c.rate, c.idsMin, c.idsMax, c.idSpace, c.unique
	s.duration, s.count, s.check, s.retryFor = c.duration, c.count, check, c.retryFor
	// A base far above any id space a person would type, distinct per run.
	s.nextUnique = runStart.UnixMilli() * 1000

	var p *poller
	if c.dsn != "" {
		db, err := openDB(c.dsn)
		if err != nil {
			fmt.Fprintln(stderr, "sim:", err)
			return 2
		}
		defer db.Close()
		db.SetMaxOpenConns(2)
		p = &poller{db: db, check: check, every: c.poll,
			exact: make(chan struct{}), quit: make(chan struct{}), stopped: make(chan struct{})}
		go p.loop(ctx)
	} else {
		fmt.Fprintln(stderr, "sim: no -dsn: the table is not checked, only the callbacks' answers")
	}

	fmt.Fprintf(stderr, "sim: sending to %s: %g callbacks/s, %d-%d ids each, for %s\n", c.target, c.rate, c.idsMin, c.idsMax, c.duration)
	statusDone := make(chan struct{})
	if c.statusEvery > 0 {
		go func() {
			t := time.NewTicker(c.statusEvery)
			defer t.Stop()
			for {
				select {
				case <-statusDone:
					return
				case <-t.C:
					status(stderr, c, s, objects, p, check)
				}
			}
		}()
	}
	defer close(statusDone)

	first, last := s.run(sendCtx)
	settled := time.Now().Add(c.settle)
	if p != nil {
		// With retries the last callback is the last attempt.
		p.sendingDone(s.lastAttemptAt())
		select {
		case <-p.exact:
		case <-time.After(time.Until(settled)):
		case <-ctx.Done():
		}
	}
	journalLeft := 0
	if p != nil && c.checkJournal {
		journalLeft = p.waitJournalEmpty(ctx, settled, stderr)
	}
	notReaped := 0
	if p != nil && c.checkExpiry && ctx.Err() == nil && !last.IsZero() {
		// A retry's receipt may be as late as the last attempt.
		wait := time.Until(s.lastAttemptAt().Add(c.ttl + c.reapEvery + c.tol + 500*time.Millisecond))
		fmt.Fprintf(stderr, "sim: waiting %s for the reaper to empty the table\n", wait.Round(time.Second))
		select {
		case <-time.After(wait):
			rows, err := p.snapshot(ctx)
			if err != nil {
				fmt.Fprintln(stderr, "sim: expiry check:", err)
				notReaped = -1
			} else {
				notReaped = check.remaining(rows)
			}
		case <-ctx.Done():
		}
	}
	// Without the table there is nothing to judge lost.
	if p != nil {
		p.stop()
		check.finish()
	}
	return report(c, s, objects, p, check, kill, first, last, notReaped, journalLeft, stdout, stderr)
}

// killMarks are the times a drill marked with signals: SIGUSR1 when it
// killed the instance of -killed-target, SIGUSR2 when that instance
// listened again.
type killMarks struct {
	mu           sync.Mutex
	killAt, back time.Time
}

func (k *killMarks) times() (killAt, back time.Time) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.killAt, k.back
}

// watchKill records the drill's kill marks until ctx ends. It is set up in
// every run, so that a mark never ends the process (SIGUSR1's default).
func watchKill(ctx context.Context) *killMarks {
	k := &killMarks{}
	ch := make(chan os.Signal, 4)
	signal.Notify(ch, syscall.SIGUSR1, syscall.SIGUSR2)
	go func() {
		defer signal.Stop(ch)
		for {
			select {
			case <-ctx.Done():
				return
			case sig := <-ch:
				k.mu.Lock()
				if sig == syscall.SIGUSR1 && k.killAt.IsZero() {
					k.killAt = time.Now()
				} else if sig == syscall.SIGUSR2 && !k.killAt.IsZero() && k.back.IsZero() {
					k.back = time.Now()
				}
				k.mu.Unlock()
			}
		}
	}()
	return k
}

func status(w io.Writer, c config, s *sender, objects *objectService, p *poller, check *checker) {
	v := check.verdict()
	line := fmt.Sprintf("sim: %s sent=%d accepted=%d failed=%d", time.Now().Format("15:04:05"),
		s.sentN.Load(), s.acceptedN.Load(), s.failedN.Load())
	if c.listen != "" {
		line += fmt.Sprintf(" upstream=%d", objects.requests.Load())
	}
	if p != nil {
		line += fmt.Sprintf(" rows=%d table_errors=%d lost=%d poll_failures=%d", p.rows.Load(), v.tableErrors, v.lostIDs, p.failures.Load())
	}
	fmt.Fprintln(w, line)
}

func report(c config, s *sender, objects *objectService, p *poller, check *checker, kill *killMarks, first, last time.Time, notReaped, journalLeft int, stdout, stderr io.Writer) int {
	v := check.verdict()
	p50, p99, maxAck := s.ackPercentiles()
	sent, accepted, failed := s.sentN.Load(), s.acceptedN.Load(), s.failedN.Load()
	span := last.Sub(first)
	if span < time.Duration(float64(time.Second)/c.rate) {
		span = time.Duration(float64(time.Second) / c.rate)
	}
	reqs := objects.requests.Load()
	lastAttempt := s.lastAttemptAt()
	catchup := -1.0
	pollFailures := int64(0)
	if p != nil {
		if at := p.exactAt(); !at.IsZero() {
			catchup = float64(at.Sub(lastAttempt).Microseconds()) / 1000
		}
		pollFailures = p.failures.Load()
	}
	killAt, backAt := kill.times()
	failedOutside := failed
	if c.killedTarget >= 0 {
		failedOutside = int64(check.failedOutsideKill(killAt, backAt))
	}
	rf := check.refetch(objects.perID(), objects.instanceNames(), killAt)
	missed := failedOutside + int64(v.lostCbs)
	pass := missed == 0 && v.tableErrors == 0 && notReaped == 0 && journalLeft == 0 && (p == nil || catchup >= 0) &&
		(accepted > 0 || sent == 0) && (!c.checkRefetch || rf.over == 0)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	unixMS := func(t time.Time) int64 {
		if t.IsZero() {
			return 0
		}
		return t.UnixMilli()
	}
	outFrom, outTo := objects.outageWindow()
	sum := map[string]any{
		"sent": sent, "accepted": accepted, "failed": failed, "missed": missed,
		"failed_outside_kill": failedOutside,
		"shed":                s.shedN.Load(), "timed_out": s.timedOutN.Load(), "first_accepted": s.firstAcceptedN.Load(),
		"attempts": s.attemptsN.Load(), "attempts_accepted": s.attemptsOKN.Load(), "attempts_shed": s.attemptsShedN.Load(),
		"attempts_timed_out": s.attemptsTimedOutN.Load(), "attempts_other": s.attemptsOtherN.Load(),
		"attempts_refused": s.attemptsRefusedN.Load(),
		"retry_for_s":      c.retryFor.Seconds(),
		"ack_p50_ms":       ms(p50), "ack_p99_ms": ms(p99), "ack_max_ms": ms(maxAck),
		"ids_sent": s.idsN.Load(), "upstream_requests": reqs,
		"upstream_per_id": ratio(float64(reqs), float64(s.idsN.Load())),
		// The service fetches only for the callbacks it accepts: past
		// capacity this is the figure that shows whether retries multiply.
		"ids_accepted":             s.idsAcceptedN.Load(),
		"upstream_per_accepted_id": ratio(float64(reqs), float64(s.idsAcceptedN.Load())),
		"upstream_per_sec":         ratio(float64(reqs), span.Seconds()),
		"upstream_faults":          objects.faulted.Load(),
		"upstream_outage_answers":  objects.outaged.Load(),
		"upstream_abandoned":       objects.abandoned.Load(),
		"upstream_per_id_counts":   rf.histogram,
		"upstream_max_per_id":      rf.maxPerID,
		"upstream_ids_refetched":   rf.refetched,
		"upstream_ids_multi":       rf.multi,
		"upstream_ids_kill_held":   rf.killHeld,
		"upstream_ids_over":        rf.over,
		"upstream_over_examples":   rf.overIDs,
		"catchup_ms":               catchup, "table_errors": v.tableErrors, "lost": v.lostIDs,
		"lost_expired_in_outage": v.lostExcused,
		"not_reaped":             notReaped, "poll_failures": pollFailures, "pass": pass,
		"duration_s":         span.Seconds(),
		"first_sent_unix_ms": unixMS(first), "last_sent_unix_ms": unixMS(last), "last_attempt_unix_ms": unixMS(lastAttempt),
		"kill_unix_ms": unixMS(killAt), "back_unix_ms": unixMS(backAt),
		"outage_from_unix_ms": unixMS(outFrom), "outage_to_unix_ms": unixMS(outTo),
	}
	if p != nil && c.checkJournal {
		sum["journal_left"] = journalLeft
	}

	out := stderr
	if !c.json {
		out = stdout
	}
	fmt.Fprintf(out, "sim: sent %d callbacks (%d ids) in %s: %d accepted, %d failed", sent, s.idsN.Load(), span.Round(time.Millisecond), accepted, failed)
	if f, ok := s.firstFailure.Load().(string); ok {
		fmt.Fprintf(out, " (first: %s)", f)
	}
	if c.killedTarget >= 0 {
		fmt.Fprintf(out, "; %d failed outside the kill window", failedOutside)
	}
	if c.retryFor > 0 {
		fmt.Fprintf(out, "\nsim: retrying for %s: first attempts %d accepted, %d shed, %d timed out; all %d attempts: %d accepted, %d shed, %d timed out, %d other (%d refused)",
			c.retryFor, s.firstAcceptedN.Load(), s.shedN.Load(), s.timedOutN.Load(), s.attemptsN.Load(), s.attemptsOKN.Load(),
			s.attemptsShedN.Load(), s.attemptsTimedOutN.Load(), s.attemptsOtherN.Load(), s.attemptsRefusedN.Load())
	}
	fmt.Fprintf(out, "\nsim: answer time p50 %s, p99 %s, max %s\n", p50.Round(time.Microsecond), p99.Round(time.Microsecond), maxAck.Round(time.Microsecond))
	if c.listen != "" {
		fmt.Fprintf(out, "sim: object service: %d requests (%.4f per id sent, %.0f/s), %d with injected faults (%d in the outage), %d abandoned by the caller\n",
			reqs, sum["upstream_per_id"], sum["upstream_per_sec"], objects.faulted.Load(), objects.outaged.Load(), objects.abandoned.Load())
		fmt.Fprintf(out, "sim: object service per id: %d ids asked more than once (at most %d times), %d by more than one instance, %d allowed another instance for the kill, %d asked by more instances than allowed %v\n",
			rf.refetched, rf.maxPerID, rf.multi, rf.killHeld, rf.over, rf.overIDs)
		for _, why := range rf.overWhy {
			fmt.Fprintln(out, "sim:   ", why)
		}
	}
	if p != nil {
		catch := "never within -settle"
		if catchup >= 0 {
			catch = fmt.Sprintf("%.2fs after the last callback", catchup/1000)
		}
		fmt.Fprintf(out, "sim: table exact %s; %d table errors %s; %d online ids lost from %d callbacks; %d polls failed\n",
			catch, v.tableErrors, v.byKind, v.lostIDs, v.lostCbs, pollFailures)
		if !outTo.IsZero() {
			fmt.Fprintf(out, "sim: %d online ids did not land whose TTL ran out in the outage (not counted lost)\n", v.lostExcused)
		}
		switch {
		case !c.checkJournal:
		case journalLeft < 0:
			fmt.Fprintln(out, "sim: journal check could not run")
		default:
			fmt.Fprintf(out, "sim: %d journal rows left after the run\n", journalLeft)
		}
		switch {
		case !c.checkExpiry:
		case notReaped < 0:
			fmt.Fprintln(out, "sim: expiry check could not run")
		default:
			fmt.Fprintf(out, "sim: %d rows of the run left after TTL + reap interval\n", notReaped)
		}
		for _, e := range v.examples {
			fmt.Fprintln(out, "sim:   ", e)
		}
	}
	verdictWord := "PASS"
	if !pass {
		verdictWord = "FAIL"
	}
	fmt.Fprintf(out, "sim: %s: %d missed callbacks\n", verdictWord, missed)
	if c.json {
		printSummary(stdout, sum)
	}
	if !pass {
		return 1
	}
	return 0
}

func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

func printSummary(w io.Writer, sum map[string]any) {
	b, _ := json.Marshal(sum)
	fmt.Fprintf(w, "SUMMARY %s\n", b)
}

// parseSummary decodes into v the SUMMARY line that printSummary wrote
// among the lines of out.
func parseSummary(out []byte, v any) error {
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if js, ok := strings.CutPrefix(sc.Text(), "SUMMARY "); ok {
			if err := json.Unmarshal([]byte(js), v); err != nil {
				return fmt.Errorf("parse the SUMMARY line: %w", err)
			}
			return nil
		}
	}
	return errors.New("no SUMMARY line")
}

// poller snapshots the table from the first callback to the end and hands
// each snapshot to the checker.
type poller struct {
	db       *sql.DB
	check    *checker
	every    time.Duration
	exact    chan struct{} // closed at the first exact snapshot after sending
	rows     atomic.Int64
	failures atomic.Int64

	mu       sync.Mutex
	done     bool
	last     time.Time
	exactT   time.Time
	stopped  chan struct{}
	stopOnce sync.Once
	quit     chan struct{}
}

func (p *poller) sendingDone(last time.Time) {
	p.mu.Lock()
	p.done, p.last = true, last
	p.mu.Unlock()
}

func (p *poller) exactAt() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exactT
}

func (p *poller) stop() {
	p.stopOnce.Do(func() { close(p.quit) })
	<-p.stopped
}

func (p *poller) snapshot(ctx context.Context) ([]row, error) {
	lo, hi, ok := p.check.idRange()
	if !ok {
		return nil, nil
	}
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	rs, err := p.db.QueryContext(qctx, `SELECT id, last_seen FROM objects WHERE id BETWEEN $1 AND $2`, lo, hi)
	if err != nil {
		return nil, fmt.Errorf("poll the objects table: %w", err)
	}
	defer rs.Close()
	var rows []row
	for rs.Next() {
		var r row
		if err := rs.Scan(&r.id, &r.lastSeen); err != nil {
			return nil, fmt.Errorf("poll the objects table: %w", err)
		}
		rows = append(rows, r)
	}
	if err := rs.Err(); err != nil {
		return nil, fmt.Errorf("poll the objects table: %w", err)
	}
	return rows, nil
}

// waitJournalEmpty polls the service's journal table until it is empty or
// the deadline passes, and returns the rows left (-1 when it cannot count
// them).
func (p *poller) waitJournalEmpty(ctx context.Context, deadline time.Time, stderr io.Writer) int {
	for {
		qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		var n int
		err := p.db.QueryRowContext(qctx, `SELECT count(*) FROM callback_journal`).Scan(&n)
		cancel()
		if err != nil {
			fmt.Fprintf(stderr, "sim: count the journal: %v\n", err)
			return -1
		}
		if n == 0 || time.Now().After(deadline) || ctx.Err() != nil {
			return n
		}
		select {
		case <-ctx.Done():
		case <-time.After(p.every):
		}
	}
}

func (p *poller) loop(ctx context.Context) {
	defer close(p.stopped)
	var lastErr string
	for {
		at := time.Now()
		rows, err := p.snapshot(ctx)
		took := time.Since(at)
		if err != nil {
			p.failures.Add(1)
			if err.Error() != lastErr {
				fmt.Fprintf(os.Stderr, "sim: %v (the checker keeps polling)\n", err)
				lastErr = err.Error()
			}
		} else {
			lastErr = ""
			p.rows.Store(int64(len(rows)))
			exact := p.check.observe(at, rows)
			p.check.checkLost(at)
			p.mu.Lock()
			if exact && p.done && p.exactT.IsZero() && !p.last.IsZero() {
				p.exactT = at
				close(p.exact)
			}
			p.mu.Unlock()
		}
		select {
		case <-ctx.Done():
			return
		case <-p.quit:
			return
		case <-time.After(max(p.every, 3*took)):
		}
	}
}

// raiseFileLimit lifts the soft open-files limit to the hard one: the
// object service holds a connection per in-flight fetch of the service.
func raiseFileLimit() {
	var lim syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
}

// quietLog keeps the HTTP server's per-connection errors (clients that hang
// up, which the fault injection does on purpose) out of the output.
func quietLog() *log.Logger { return log.New(io.Discard, "", 0) }
