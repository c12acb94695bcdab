package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The spill journal end to end: the service as a subprocess, PostgreSQL
// taken away (through the TCP proxy) or made slow (its journal table
// locked), the process killed or stopped, and restarted on the same spill
// directory within the TTL.

// spillAcked is a callback answered 2xx: its online ids must land with a
// last_seen in [sent, answered], and durable is where the answer said it
// was durable.
type spillAcked struct {
	ids            []int64
	sent, answered time.Time
	durable        string
}

// spillSender posts callbacks of fresh ids and records the 2xx answers.
type spillSender struct {
	mu     sync.Mutex
	acked  []spillAcked
	other  map[string]int // answers that were not 2xx, by status or error
	nextID int64
}

// send posts one callback every `every` until stop closes, each in its own
// goroutine (the sender's 1s timeout), and waits for every answer.
func (s *spillSender) send(base string, n int, every time.Duration, stop <-chan struct{}) {
	client := &http.Client{Timeout: time.Second}
	tick := time.NewTicker(every)
	defer tick.Stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		s.mu.Lock()
		ids := make([]int64, n)
		for i := range ids {
			s.nextID++
			ids[i] = s.nextID
		}
		s.mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			sent := time.Now().Truncate(time.Microsecond)
			resp, err := client.Post(base+"/callback", "application/json", strings.NewReader(idsBody(ids...)))
			answered := time.Now()
			s.mu.Lock()
			defer s.mu.Unlock()
			if s.other == nil {
				s.other = map[string]int{}
			}
			if err != nil {
				s.other["error"]++
				return
			}
			defer resp.Body.Close()
			var body acceptedBody
			_ = json.NewDecoder(resp.Body).Decode(&body)
			if resp.StatusCode/100 != 2 {
				s.other[fmt.Sprint(resp.StatusCode)]++
				return
			}
			s.acked = append(s.acked, spillAcked{ids: ids, sent: sent, answered: answered, durable: body.Durable})
		}()
	}
}

// byDurable counts the 2xx answers by where they said the callback was.
func (s *spillSender) byDurable() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]int{}
	for _, a := range s.acked {
		out[a.durable]++
	}
	return out
}

// checkLanded waits until every online (even) id of every 2xx callback is
// in the table with last_seen in [sent, answered], and fails on an offline
// one.
func (s *spillSender) checkLanded(t *testing.T, dsn string) {
	t.Helper()
	db := openDB(t, dsn)
	s.mu.Lock()
	all := append([]spillAcked(nil), s.acked...)
	s.mu.Unlock()
	if len(all) == 0 {
		t.Fatal("no callback was answered 2xx")
	}
	var bad []string
	eventually(t, landWithin, "every online id of every 2xx callback in the table", func() bool {
		got := objectsIn(t, db)
		bad = bad[:0]
		for _, a := range all {
			for _, id := range a.ids {
				seen, ok := got[id]
				switch {
				case id%2 != 0 && ok:
					t.Fatalf("offline id %d stored", id)
				case id%2 == 0 && !ok:
					bad = append(bad, fmt.Sprintf("%d missing", id))
				case id%2 == 0 && (seen.Before(a.sent) || seen.After(a.answered)):
					t.Fatalf("id %d last_seen %s, want in [%s, %s]", id, seen.Format(time.RFC3339Nano), a.sent.Format(time.RFC3339Nano), a.answered.Format(time.RFC3339Nano))
				}
			}
		}
		return len(bad) == 0
	})
	t.Logf("%d callbacks answered 2xx all landed", len(all))
}

// startUnready starts the service as a subprocess, as startProc does, but
// waits only for /healthz: PostgreSQL may be down. It is killed at the end.
func startUnready(t *testing.T, dsn, upstreamURL string, extra ...string) string {
	t.Helper()
	addr := freeAddr(t)
	cmd := exec.Command(os.Args[0], append([]string{"-listen", addr, "-upstream", upstreamURL, "-dsn", dsn, "-log-level", "debug"}, extra...)...)
	cmd.Env = append(os.Environ(), "OBJTRACK_TEST_SUBPROCESS=1")
	logs := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("start service: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("service %s log:\n%s", addr, tail(logs.String(), 40))
		}
	})
	base := "http://" + addr
	eventually(t, landWithin, "service /healthz", func() bool {
		resp, err := http.Get(base + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return base
}

// waitDown waits for the service to see PostgreSQL gone.
func waitDown(t *testing.T, base string) {
	t.Helper()
	eventually(t, landWithin, "readyz 503 while PostgreSQL is down", func() bool {
		resp, err := http.Get(base + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusServiceUnavailable
	})
}

// outageThenStop runs a service through a PostgreSQL outage during which
// callbacks are answered from the spill, stops it with sig, restarts it on
// the same spill directory (after PostgreSQL is back, or before when
// restartFirst) and checks that every 2xx callback landed. It returns the
// first process's exit error.
func outageThenStop(t *testing.T, sig syscall.Signal, restartFirst bool) error {
	dsn := testDSN(t)
	proxy := newTCPProxy(t, "")
	proxied := proxy.dsn(t, dsn)
	proxy.setUp(true)
	up := newUpstream(t, 50*time.Millisecond, nil)
	dir := t.TempDir()
	a := startProc(t, proxied, up.URL, "-spill-dir", dir, "-grace", "1s")
	waitReadyAt(t, a.base)
	proxy.setUp(false)
	waitDown(t, a.base)

	s := &spillSender{}
	stop := make(chan struct{})
	go func() { time.Sleep(time.Second); close(stop) }()
	s.send(a.base, 10, 20*time.Millisecond, stop)
	got := s.byDurable()
	if got[durableSpill] == 0 || len(got) != 1 {
		t.Fatalf("answers by durable %v (others %v), want every 2xx from the spill", got, s.other)
	}
	if n := metricAt(t, a.base, "objtrack_journal_failures_total"); n != 0 {
		t.Fatalf("objtrack_journal_failures_total %v, want 0", n)
	}
	// Callbacks whose answer the sender gave up on may be spilled too.
	if n := metricAt(t, a.base, "objtrack_spill_records"); n < float64(got[durableSpill]) {
		t.Fatalf("objtrack_spill_records %v, want at least the %d spilled callbacks answered 2xx", n, got[durableSpill])
	}
	t.Logf("answers: 2xx by durable %v, others %v", got, s.other)
	exit := a.signal(t, sig, 15*time.Second)

	var b *proc
	if restartFirst {
		// PostgreSQL still down: the replayed callbacks are held in
		// memory, still durable in the spill, and their lookups run.
		base := startUnready(t, proxied, up.URL, "-spill-dir", dir)
		eventually(t, landWithin, "the spill replayed into memory", func() bool {
			return metricAt(t, base, "objtrack_callbacks_in_memory") >= float64(got[durableSpill]) &&
				metricAt(t, base, "objtrack_callbacks_memory_only") == 0
		})
		proxy.setUp(true)
		waitReadyAt(t, base)
		b = &proc{base: base}
	} else {
		proxy.setUp(true)
		b = startProc(t, dsn, up.URL, "-spill-dir", dir)
	}
	s.checkLanded(t, dsn)
	eventually(t, landWithin, "the spill moved into PostgreSQL", func() bool {
		return metricAt(t, b.base, "objtrack_spill_moved_total") >= float64(got[durableSpill]) &&
			metricAt(t, b.base, "objtrack_spill_records") == 0
	})
	return exit
}

func TestSpillOutageSIGKILLRestartLosesNothing(t *testing.T) {
	_ = outageThenStop(t, syscall.SIGKILL, false)
}

func TestSpillReplayedWhilePostgreSQLIsStillDown(t *testing.T) {
	_ = outageThenStop(t, syscall.SIGKILL, true)
}

func TestSpillOutageSIGTERMExitsZeroLosesNothing(t *testing.T) {
	if err := outageThenStop(t, syscall.SIGTERM, false); err != nil {
		t.Fatalf("exit after SIGTERM with PostgreSQL down: %v, want 0", err)
	}
}

// Journal commits that miss the answer deadline (the journal table is
// locked by the test) make the handler spill the callback before its 2xx;
// a SIGKILL before the commits land loses none of them.
func TestSpillSlowCommitsSIGKILLLosesNothing(t *testing.T) {
	dsn := testDSN(t)
	up := newUpstream(t, 50*time.Millisecond, nil)
	dir := t.TempDir()
	a := startProc(t, dsn, up.URL, "-spill-dir", dir, "-journal-timeout", "200ms")
	waitReadyAt(t, a.base)

	db := openDB(t, dsn)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback() }()
	// EXCLUSIVE conflicts with the ROW EXCLUSIVE every INSERT takes: every
	// journal commit waits until the test lets go.
	if _, err := tx.Exec("LOCK TABLE callback_journal IN EXCLUSIVE MODE"); err != nil {
		t.Fatal(err)
	}
	s := &spillSender{}
	stop := make(chan struct{})
	go func() { time.Sleep(time.Second); close(stop) }()
	s.send(a.base, 10, 20*time.Millisecond, stop)
	got := s.byDurable()
	if got[durableSpill] == 0 || got[durableMemory] != 0 || got[durablePostgres] != 0 {
		t.Fatalf("answers by durable %v (others %v), want every 2xx from the spill", got, s.other)
	}
	if n := metricAt(t, a.base, "objtrack_journal_failures_total"); n != 0 {
		t.Fatalf("objtrack_journal_failures_total %v, want 0", n)
	}
	_ = a.signal(t, syscall.SIGKILL, 5*time.Second)
	_ = tx.Rollback()

	startProc(t, dsn, up.URL, "-spill-dir", dir)
	s.checkLanded(t, dsn)
}

// A second service on a spill directory in use stops at start, saying which
// directory and what to do.
func TestSpillDirectoryInUseStopsASecondService(t *testing.T) {
	up := newUpstream(t, 0, nil)
	dir := t.TempDir()
	startService(t, "postgres://nobody@127.0.0.1:1/none?sslmode=disable", up.URL, "-spill-dir", dir)
	args := []string{"objtrack", "-listen", freeAddr(t), "-upstream", up.URL, "-dsn", "postgres://nobody@127.0.0.1:1/none?sslmode=disable", "-spill-dir", dir}
	err := run(context.Background(), args, func(string) string { return "" }, &syncBuffer{})
	if !errors.Is(err, errSpillLocked) || !strings.Contains(err.Error(), dir) || !strings.Contains(err.Error(), "-spill-dir") {
		t.Fatalf("second service on %s: %v, want errSpillLocked naming the directory and -spill-dir", dir, err)
	}
}
