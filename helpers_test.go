package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// testDSN gives each test a schema of its own in the database named by
// DATABASE_URL, so tests never see each other's tables. Without DATABASE_URL
// the test is skipped, unless CI is set: there a database test that cannot
// run must fail.
func testDSN(t testing.TB) string {
	t.Helper()
	base := os.Getenv("DATABASE_URL")
	if base == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("DATABASE_URL is not set in CI; database tests must run (use make test)")
		}
		t.Skip("DATABASE_URL not set; run make test for a throwaway PostgreSQL")
	}
	admin, err := sql.Open("postgres", base)
	if err != nil {
		t.Fatalf("open DATABASE_URL: %v", err)
	}
	defer admin.Close()
	schema := fmt.Sprintf("t_%d_%08x", os.Getpid(), rand.Uint32())
	if _, err := admin.Exec(`CREATE SCHEMA ` + schema); err != nil {
		t.Fatalf("cannot reach the test database: %v", err)
	}
	t.Cleanup(func() {
		db, err := sql.Open("postgres", base)
		if err != nil {
			return
		}
		defer db.Close()
		_, _ = db.Exec(`DROP SCHEMA ` + schema + ` CASCADE`)
	})
	return withSearchPath(t, base, schema)
}

func withSearchPath(t testing.TB, dsn, schema string) string {
	t.Helper()
	if u, err := url.Parse(dsn); err == nil && (u.Scheme == "postgres" || u.Scheme == "postgresql") {
		q := u.Query()
		q.Set("search_path", schema)
		u.RawQuery = q.Encode()
		return u.String()
	}
	return dsn + " search_path=" + schema
}

// openDB opens the test's database for checking the tables directly.
func openDB(t testing.TB, dsn string) *sql.DB {
	t.Helper()
	db, err := sql.Open("postgres", dsn)
	if err != nil {
		t.Fatalf("open %s: %v", dsn, err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// objectsIn reads the whole objects table.
func objectsIn(t testing.TB, db *sql.DB) map[int64]time.Time {
	t.Helper()
	rows, err := db.Query(`SELECT id, last_seen FROM objects`)
	if err != nil {
		t.Fatalf("read objects: %v", err)
	}
	defer rows.Close()
	out := map[int64]time.Time{}
	for rows.Next() {
		var id int64
		var at time.Time
		if err := rows.Scan(&id, &at); err != nil {
			t.Fatalf("scan objects: %v", err)
		}
		out[id] = at
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("read objects: %v", err)
	}
	return out
}

// wantObjects checks that the objects table holds exactly want.
func wantObjects(t testing.TB, db *sql.DB, want map[int64]time.Time) {
	t.Helper()
	got := objectsIn(t, db)
	if len(got) != len(want) {
		t.Fatalf("rows %v, want %v", got, want)
	}
	for id, at := range want {
		if !got[id].Equal(at) {
			t.Errorf("id %d: last_seen %s, want %s", id, got[id], at)
		}
	}
}

func journalDepth(t testing.TB, db *sql.DB) int {
	t.Helper()
	var n int
	if err := db.QueryRow(`SELECT count(*) FROM callback_journal`).Scan(&n); err != nil {
		t.Fatalf("count journal: %v", err)
	}
	return n
}

// landWithin is how long a test waits for acknowledged callbacks to reach the
// table: the promise is that they land before received time + TTL (30s by
// default) or are dropped, so waiting longer than that proves nothing and
// waiting less depends on the machine being idle.
const landWithin = 30*time.Second + 5*time.Second

// eventually polls cond until it holds or the timeout passes; detail, if
// given, says what was seen last when it did not.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool, detail ...func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			var seen string
			for _, d := range detail {
				seen += ": " + d()
			}
			t.Fatalf("timed out after %s waiting for %s%s", timeout, what, seen)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// upstream is a fake object service: online objects are the even ids, each
// answer takes delay, and behave (if set) can replace an answer. It records
// requests per id and the peak number of requests in flight.
type upstream struct {
	*httptest.Server
	delay  time.Duration
	behave func(w http.ResponseWriter, r *http.Request, id int64, n int) bool // true: handled

	mu       sync.Mutex
	requests map[int64]int
	inflight int
	peak     int
}

func newUpstream(t testing.TB, delay time.Duration, behave func(w http.ResponseWriter, r *http.Request, id int64, n int) bool) *upstream {
	t.Helper()
	u := &upstream{delay: delay, behave: behave, requests: map[int64]int{}}
	u.Server = httptest.NewServer(http.HandlerFunc(u.serve))
	t.Cleanup(u.Close)
	return u
}

func (u *upstream) serve(w http.ResponseWriter, r *http.Request) {
	id, err := strconv.ParseInt(strings.TrimPrefix(r.URL.Path, "/objects/"), 10, 64)
	if err != nil {
		http.NotFound(w, r)
		return
	}
	u.mu.Lock()
	u.requests[id]++
	n := u.requests[id]
	u.inflight++
	u.peak = max(u.peak, u.inflight)
	u.mu.Unlock()
	defer func() {
		u.mu.Lock()
		u.inflight--
		u.mu.Unlock()
	}()
	select {
	case <-time.After(u.delay):
	case <-r.Context().Done():
		return
	}
	if u.behave != nil && u.behave(w, r, id, n) {
		return
	}
	fmt.Fprintf(w, `{"id":%d,"online":%t}`, id, id%2 == 0)
}

func (u *upstream) count(id int64) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.requests[id]
}

func (u *upstream) total() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := 0
	for _, c := range u.requests {
		n += c
	}
	return n
}

func (u *upstream) peakInflight() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.peak
}

// freeAddr finds a loopback port nobody listens on.
func freeAddr(t testing.TB) string {
	t.Helper()
	// Below the kernel's ephemeral range: an address handed out here is
	// listened on later (by a subprocess, or again by the database proxy
	// after an outage), and a port from the ephemeral range may be taken
	// meanwhile by any outgoing connection on the machine.
	low := ephemeralLow()
	for range 1000 {
		addr := fmt.Sprintf("127.0.0.1:%d", 10000+rand.IntN(low-10000))
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		ln.Close()
		return addr
	}
	t.Fatalf("no free port below %d", low)
	return ""
}

// ephemeralLow is the bottom of the kernel's ephemeral port range (32768
// when it cannot be read), at least 12000.
func ephemeralLow() int {
	low := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) > 0 {
			if n, err := strconv.Atoi(f[0]); err == nil {
				low = n
			}
		}
	}
	return max(low, 12000)
}

// syncBuffer collects a service's log output safely across goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// service is an instance started in-process through run().
type service struct {
	base string // http://host:port
	logs *syncBuffer
	stop func() error
}

// startService runs the whole service through run() with the given flags
// (after -listen, -upstream and -dsn) and waits for /healthz. It is stopped
// at the end of the test if the test has not stopped it.
func startService(t testing.TB, dsn, upstreamURL string, extra ...string) *service {
	t.Helper()
	addr := freeAddr(t)
	args := append([]string{"objtrack", "-listen", addr, "-upstream", upstreamURL, "-dsn", dsn, "-log-level", "debug", "-spill-dir", t.TempDir()}, extra...)
	ctx, cancel := context.WithCancel(context.Background())
	logs := &syncBuffer{}
	done := make(chan error, 1)
	go func() { done <- run(ctx, args, func(string) string { return "" }, logs) }()
	var once sync.Once
	var runErr error
	stop := func() error {
		once.Do(func() {
			cancel()
			select {
			case runErr = <-done:
			case <-time.After(30 * time.Second):
				runErr = fmt.Errorf("service did not stop within 30s")
			}
		})
		return runErr
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("service stopped with error: %v", err)
		}
		if t.Failed() {
			t.Logf("service log:\n%s", tail(logs.String(), 60))
		}
	})
	s := &service{base: "http://" + addr, logs: logs, stop: stop}
	eventually(t, readyWithin, "service /healthz", func() bool {
		select {
		case err := <-done:
			done <- err // for stop, which the cleanup calls
			t.Fatalf("service exited at start: %v\n%s", err, logs.String())
		default:
		}
		resp, err := http.Get(s.base + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return s
}

func tail(s string, lines int) string {
	parts := strings.Split(s, "\n")
	if len(parts) > lines {
		parts = parts[len(parts)-lines:]
	}
	return strings.Join(parts, "\n")
}

// post sends a callback and returns the status and body. It stops the test
// on a transport error, so only the test's goroutine may call it; other
// goroutines use tryPost.
func post(t testing.TB, base string, body string) (int, string) {
	t.Helper()
	status, b, err := tryPost(base, body, 5*time.Second)
	if err != nil {
		t.Fatalf("post callback: %v", err)
	}
	return status, b
}

// tryPost sends a callback with a client that gives up after timeout.
func tryPost(base, body string, timeout time.Duration) (int, string, error) {
	client := &http.Client{Timeout: timeout}
	resp, err := client.Post(base+"/callback", "application/json", strings.NewReader(body))
	if err != nil {
		return 0, "", fmt.Errorf("post callback: %w", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, string(b), fmt.Errorf("read answer: %w", err)
	}
	return resp.StatusCode, string(b), nil
}

func idsBody(ids ...int64) string {
	b, _ := json.Marshal(map[string][]int64{"object_ids": ids})
	return string(b)
}

// waitReady waits until the service reports the database ready.
func (s *service) waitReady(t testing.TB) {
	t.Helper()
	waitReadyAt(t, s.base)
}

// readyWithin is how long a starting service may take to reach PostgreSQL
// and apply the schema: the first check runs at once, but a busy machine
// may take seconds to start a process and open connections.
const readyWithin = 30 * time.Second

// waitReadyAt waits until the service at base answers /readyz with 200.
func waitReadyAt(t testing.TB, base string) {
	t.Helper()
	eventually(t, readyWithin, base+"/readyz", func() bool {
		resp, err := http.Get(base + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

// metric reads one sample from the service's /metrics, e.g.
// `objtrack_callbacks_accepted_total` or `objtrack_fetches_total{outcome="online"}`.
func (s *service) metric(t testing.TB, name string) float64 {
	t.Helper()
	return metricAt(t, s.base, name)
}

// metricAt reads one sample from /metrics of the service at base.
func metricAt(t testing.TB, base, name string) float64 {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatalf("get metrics: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("metric %s: %v", name, err)
			}
			return f
		}
	}
	t.Fatalf("metric %s not found", name)
	return 0
}

// testConfig is the default configuration with the given flags.
func testConfig(t testing.TB, args ...string) config {
	t.Helper()
	if !hasFlag(args, "-dsn") {
		args = append(args, "-dsn", "postgres://nobody@127.0.0.1:1/none?sslmode=disable&connect_timeout=1")
	}
	cfg, err := parseConfig(args, func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatalf("config %v: %v", args, err)
	}
	return cfg
}

func hasFlag(args []string, name string) bool {
	for _, a := range args {
		if a == name {
			return true
		}
	}
	return false
}

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// testApp builds the service as run() does, without starting its background
// loops, for tests of one piece; it is closed when the test ends.
func testApp(t testing.TB, cfg config, transport http.RoundTripper) *app {
	t.Helper()
	cfg.spillDir = t.TempDir() // each app its own, even two built from one config
	a, err := newApp(cfg, discardLogger(), transport)
	if err != nil {
		t.Fatalf("newApp: %v", err)
	}
	t.Cleanup(a.close)
	return a
}
