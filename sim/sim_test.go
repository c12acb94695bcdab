package main

import (
	"bytes"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

var t0 = time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)

func at(d time.Duration) time.Time { return t0.Add(d) }

const sec = time.Second

// newTestChecker has a run that started 10 s before t0, with the reference
// TTL, reap interval, tolerance and timeout, and even ids online.
func newTestChecker(t *testing.T) *checker {
	t.Helper()
	return newChecker(30*sec, sec, sec, sec, onlineFunc("even"), at(-10*sec))
}

func TestCheckerSnapshots(t *testing.T) {
	type cb struct {
		sendAt   time.Duration
		ids      []int64
		accepted bool
	}
	cases := []struct {
		name      string
		cbs       []cb
		poll      time.Duration
		rows      map[int64]time.Duration
		wantExact bool
		wantErrs  string // verdict().byKind
	}{
		{"exact", []cb{{0, []int64{2, 3}, true}}, 3 * sec, map[int64]time.Duration{2: 1 * time.Millisecond}, true, ""},
		{"online id missing", []cb{{0, []int64{2, 3}, true}}, 3 * sec, nil, false, ""},
		{"offline id stored", []cb{{0, []int64{2, 3}, true}}, 3 * sec, map[int64]time.Duration{2: 0, 3: 0}, true, "offline_stored=1"},
		{"time of no callback", []cb{{0, []int64{2}, true}}, 3 * sec, map[int64]time.Duration{2: -5 * sec}, false, "wrong_time=1"},
		{"time in the future", []cb{{0, []int64{2}, true}}, 3 * sec, map[int64]time.Duration{2: 5 * sec}, true, "future=1"},
		{"outlived the TTL", []cb{{0, []int64{2}, true}}, 33 * sec, map[int64]time.Duration{2: 0}, true, "outlived_ttl=1"},
		{"reaped after the TTL", []cb{{0, []int64{2}, true}}, 33 * sec, nil, true, ""},
		{"foreign ids and old rows ignored", []cb{{0, []int64{2}, true}}, 3 * sec, map[int64]time.Duration{2: 0, 4: 0, 1: -5 * sec}, true, ""},
		{"older callback's time is stale", []cb{{0, []int64{2}, true}, {5 * sec, []int64{2}, true}}, 7 * sec, map[int64]time.Duration{2: 0}, false, ""},
		{"latest callback's time", []cb{{0, []int64{2}, true}, {5 * sec, []int64{2}, true}}, 7 * sec, map[int64]time.Duration{2: 5 * sec}, true, ""},
		{"failed callback may still have been received", []cb{{0, []int64{2}, true}, {5 * sec, []int64{2}, false}}, 7 * sec, map[int64]time.Duration{2: 5*sec + 500*time.Millisecond}, true, ""},
		{"within tolerance", []cb{{0, []int64{2}, true}}, 3 * sec, map[int64]time.Duration{2: -900 * time.Millisecond}, true, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := newTestChecker(t)
			for _, x := range tc.cbs {
				idx := c.sent(at(x.sendAt), x.ids)
				c.answered(idx, at(x.sendAt+5*time.Millisecond), x.accepted)
			}
			var rows []row
			for id, ls := range tc.rows {
				rows = append(rows, row{id, at(ls)})
			}
			if got := c.observe(at(tc.poll), rows); got != tc.wantExact {
				t.Errorf("exact = %v, want %v", got, tc.wantExact)
			}
			if v := c.verdict(); v.byKind != tc.wantErrs {
				t.Errorf("table errors %q, want %q (%v)", v.byKind, tc.wantErrs, v.examples)
			}
		})
	}
}

func TestCheckerPendingCallbackIsNotExact(t *testing.T) {
	c := newTestChecker(t)
	c.sent(at(0), []int64{3})
	if c.observe(at(sec), nil) {
		t.Fatal("exact while a callback has no answer yet")
	}
}

func TestCheckerLost(t *testing.T) {
	cases := []struct {
		name     string
		seenAt   time.Duration // when the row was observed; <0: never
		lastSeen time.Duration
		wantLost int
	}{
		{"seen with its time", 3 * sec, 0, 0},
		{"seen with a later time", 3 * sec, 4 * sec, 0},
		{"never seen", -1, 0, 1},
		{"seen only with an older time", 3 * sec, -5 * sec, 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := newTestChecker(t)
			// Callbacks are recorded in send order.
			if tc.lastSeen < 0 {
				c.answered(c.sent(at(tc.lastSeen), []int64{2}), at(tc.lastSeen), true)
			}
			c.answered(c.sent(at(0), []int64{2, 3}), at(10*time.Millisecond), true)
			if tc.lastSeen > 0 {
				c.answered(c.sent(at(tc.lastSeen), []int64{2}), at(tc.lastSeen), true)
			}
			if tc.seenAt >= 0 {
				c.observe(at(tc.seenAt), []row{{2, at(tc.lastSeen)}})
			}
			c.checkLost(at(29 * sec)) // before the TTL ran out: nothing judged yet
			if v := c.verdict(); v.lostIDs != 0 {
				t.Fatalf("lost judged before the deadline: %+v", v)
			}
			c.checkLost(at(31 * sec))
			if v := c.verdict(); v.lostIDs != tc.wantLost {
				t.Errorf("lost ids = %d, want %d (%v)", v.lostIDs, tc.wantLost, v.examples)
			}
		})
	}
}

func TestCheckerFinishJudgesTheRest(t *testing.T) {
	c := newTestChecker(t)
	c.answered(c.sent(at(0), []int64{2}), at(time.Millisecond), true)
	c.answered(c.sent(at(sec), []int64{4}), at(sec), false) // never accepted: not judged
	c.observe(at(2*sec), nil)
	c.finish()
	if v := c.verdict(); v.lostIDs != 1 || v.lostCbs != 1 {
		t.Fatalf("verdict %+v, want one lost id of one callback", v)
	}
}

func TestFlags(t *testing.T) {
	cases := []struct {
		args []string
		want string // substring of the error; "" for none
	}{
		{nil, ""},
		{[]string{"-rate", "0"}, "-rate"},
		{[]string{"-ids-min", "5", "-ids", "2"}, "ids-min"},
		{[]string{"-online", "sometimes"}, "-online"},
		{[]string{"-fault-500", "0.7", "-fault-hang", "0.5"}, "fault"},
		{[]string{"-mode", "fast"}, "-mode"},
		{[]string{"-latency-min", "2s", "-latency-max", "1s"}, "latency"},
		{[]string{"extra"}, "unexpected"},
		{[]string{"-target", "http://a/callback,,http://b/callback"}, "-target"},
		{[]string{"-target", "http://a/callback,http://b/callback"}, ""},
		{[]string{"-mode", "bench", "-dsn", ""}, "-dsn"},
		{[]string{"-mode", "bench", "-dsn", "x", "-unique-rates", "10,fast"}, "-unique-rates"},
		{[]string{"-mode", "bench", "-dsn", "x", "-ref-duration", "0s"}, "-ref-duration"},
		{[]string{"-mode", "bench", "-dsn", "x", "-unique-rates", "10, 20", "-duration", "5s"}, ""},
		{[]string{"-mode", "bench", "-dsn", "x", "-dup-rates", "200,-5"}, "-dup-rates"},
		{[]string{"-mode", "bench", "-dsn", "x", "-dup-rates", ""}, "-dup-rates"},
	}
	for _, tc := range cases {
		_, err := parseFlags(tc.args, &bytes.Buffer{})
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%q: %v", tc.args, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%q: error %v, want one about %s", tc.args, err, tc.want)
		}
	}
}

// Bench mode sends its loads for 30 s unless -duration says otherwise; the
// other modes keep their own default.
func TestBenchDurationDefault(t *testing.T) {
	cases := []struct {
		args []string
		want time.Duration
	}{
		{[]string{"-mode", "bench", "-dsn", "x"}, benchDuration},
		{[]string{"-mode", "bench", "-dsn", "x", "-duration", "5s"}, 5 * sec},
		{nil, 2 * time.Minute},
	}
	for _, tc := range cases {
		c, err := parseFlags(tc.args, &bytes.Buffer{})
		if err != nil || c.duration != tc.want {
			t.Errorf("%q: duration %s (%v), want %s", tc.args, c.duration, err, tc.want)
		}
	}
}

func TestBenchRates(t *testing.T) {
	cases := []struct {
		args         []string
		unique, dups []float64
	}{
		{[]string{"-mode", "bench", "-dsn", "x"}, []float64{10, 20, 25, 30, 35, 40, 50}, []float64{200, 2000, 4000}},
		{[]string{"-mode", "bench", "-dsn", "x", "-unique-rates", "10", "-dup-rates", " 200 , 2500"}, []float64{10}, []float64{200, 2500}},
	}
	for _, tc := range cases {
		c, err := parseFlags(tc.args, &bytes.Buffer{})
		if err != nil || !slices.Equal(c.uniqueRates, tc.unique) || !slices.Equal(c.dupRates, tc.dups) {
			t.Errorf("%q: unique %v dup %v (%v), want %v and %v", tc.args, c.uniqueRates, c.dupRates, err, tc.unique, tc.dups)
		}
	}
}

// An overload row runs the load of the kind that held at twice its rate,
// and is judged against the rate that held.
func TestOverloadLoad(t *testing.T) {
	c := config{duration: 30 * sec}
	for _, unique := range []bool{false, true} {
		l := overloadLoad(c, stepLoad(c, 4000, unique))
		args := strings.Join(l.args, " ")
		if !l.overload() || l.heldRate != 4000 || l.rate != 8000 || l.unique != unique ||
			!strings.Contains(args, "-rate 8000 ") || strings.Contains(args, "-unique") != unique {
			t.Errorf("overload of the %v load at 4000/s: %+v", unique, l)
		}
	}
	if l := stepLoad(c, 200, false); l.overload() || l.name != "dup-heavy 200/s" ||
		strings.Join(l.args, " ") != "-rate 200 -ids 200 -ids-min 200 -duration 30s -id-space 100" {
		t.Errorf("dup-heavy step at 200/s: %+v", l)
	}
}

func TestOverloadTargets(t *testing.T) {
	// A 30 s overload run at twice 4000/s.
	base := benchSummary{Sent: 240000, Accepted: 120000, Shed: 119000, TimedOut: 1000, Duration: 30, UpstreamPerAcceptedID: 0.0001}
	with := func(f func(*benchSummary)) benchSummary {
		s := base
		f(&s)
		return s
	}
	cases := []struct {
		name   string
		sum    benchSummary
		held   float64
		unique bool
		want   string // targetsString
	}{
		{"all met", base, 4000, false,
			"lost 0 ok, timed out 0.4% ok, goodput 4000/s = 100% of 4000/s ok, req/id 0.0001 ok"},
		{"a lost id", with(func(s *benchSummary) { s.Lost = 3 }), 4000, false,
			"lost 3 MISS, timed out 0.4% ok, goodput 4000/s = 100% of 4000/s ok, req/id 0.0001 ok"},
		{"1% timed out is met", with(func(s *benchSummary) { s.TimedOut = 2400 }), 4000, false,
			"lost 0 ok, timed out 1.0% ok, goodput 4000/s = 100% of 4000/s ok, req/id 0.0001 ok"},
		{"over 1% timed out", with(func(s *benchSummary) { s.TimedOut = 2401 }), 4000, false,
			"lost 0 ok, timed out 1.0% MISS, goodput 4000/s = 100% of 4000/s ok, req/id 0.0001 ok"},
		{"85% goodput is enough for dup-heavy", with(func(s *benchSummary) { s.Accepted = 102000 }), 4000, false,
			"lost 0 ok, timed out 0.4% ok, goodput 3400/s = 85% of 4000/s ok, req/id 0.0001 ok"},
		{"but not for unique ids", with(func(s *benchSummary) { s.Accepted = 102000 }), 4000, true,
			"lost 0 ok, timed out 0.4% ok, goodput 3400/s = 85% of 4000/s MISS, req/id 0.0001 ok"},
		{"75% goodput", with(func(s *benchSummary) { s.Accepted = 90000 }), 4000, false,
			"lost 0 ok, timed out 0.4% ok, goodput 3000/s = 75% of 4000/s MISS, req/id 0.0001 ok"},
		{"too many upstream requests", with(func(s *benchSummary) { s.UpstreamPerAcceptedID = 1.2 }), 4000, true,
			"lost 0 ok, timed out 0.4% ok, goodput 4000/s = 100% of 4000/s ok, req/id 1.2000 MISS"},
		{"nothing sent", benchSummary{}, 25, true,
			"lost 0 ok, timed out 0.0% ok, goodput 0/s = 0% of 25/s MISS, req/id 0.0000 ok"},
	}
	for _, tc := range cases {
		if got := targetsString(overloadTargets(tc.sum, tc.held, tc.unique)); got != tc.want {
			t.Errorf("%s:\n got %s\nwant %s", tc.name, got, tc.want)
		}
	}
}

func TestScrape(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "# HELP objtrack_fetches_total Fetches.\n# TYPE objtrack_fetches_total counter\n"+
			"objtrack_fetches_total{outcome=\"ok\"} 3\nobjtrack_fetches_total{outcome=\"error\"} 2\n"+
			"objtrack_fetches_in_flight 7\n")
	}))
	m := scrape(srv.URL)
	if got := m.sum(metricFetches); got != 5 {
		t.Errorf("sum of %s = %g, want 5 (%v)", metricFetches, got, m)
	}
	if got := m[metricFetchesInFlight]; got != 7 {
		t.Errorf("%s = %g, want 7 (%v)", metricFetchesInFlight, got, m)
	}
	srv.Close()
	if m := scrape(srv.URL); len(m) != 0 {
		t.Errorf("scrape of a closed server = %v, want empty", m)
	}
}

func TestObjectServiceAnswers(t *testing.T) {
	o := &objectService{online: onlineFunc("even")}
	mux := http.NewServeMux()
	mux.Handle("GET /objects/{id}", o)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	for id, want := range map[string]bool{"7": false, "8": true} {
		resp, err := http.Get(srv.URL + "/objects/" + id)
		if err != nil {
			t.Fatal(err)
		}
		var body struct {
			ID     int64 `json:"id"`
			Online bool  `json:"online"`
		}
		err = json.NewDecoder(resp.Body).Decode(&body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 || body.Online != want {
			t.Errorf("GET /objects/%s: %d %+v %v, want online=%v", id, resp.StatusCode, body, err, want)
		}
	}
}

func TestObjectServiceFaults(t *testing.T) {
	cases := []struct {
		name  string
		f     faults
		check func(*http.Response, error) bool
	}{
		{"500", faults{status500: 1}, func(r *http.Response, err error) bool { return err == nil && r.StatusCode == 500 }},
		{"garbage", faults{garbage: 1}, func(r *http.Response, err error) bool {
			var v map[string]any
			return err == nil && r.StatusCode == 200 && json.NewDecoder(r.Body).Decode(&v) != nil
		}},
		{"wrong id", faults{wrongID: 1}, func(r *http.Response, err error) bool {
			var v struct{ ID int64 }
			return err == nil && json.NewDecoder(r.Body).Decode(&v) == nil && v.ID == 5
		}},
		{"hang", faults{hang: 1}, func(r *http.Response, err error) bool { return err != nil }},
		{"drop", faults{drop: 1}, func(r *http.Response, err error) bool { return err != nil }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			o := &objectService{online: onlineFunc("all"), faults: tc.f}
			mux := http.NewServeMux()
			mux.Handle("GET /objects/{id}", o)
			srv := httptest.NewServer(mux)
			t.Cleanup(srv.Close)
			client := &http.Client{Timeout: 300 * time.Millisecond}
			resp, err := client.Get(srv.URL + "/objects/4")
			if !tc.check(resp, err) {
				t.Errorf("fault %s not injected: %v %v", tc.name, resp, err)
			}
			if err == nil {
				resp.Body.Close()
			}
		})
	}
}

// A service that accepts callbacks but never stores anything must fail the
// run: the online ids are missing from the table.
func TestRunFailsWhenNothingIsStored(t *testing.T) {
	dsn := testSchema(t)
	db, err := sql.Open("postgres", dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if _, err := db.Exec(`CREATE TABLE objects (id BIGINT PRIMARY KEY, last_seen TIMESTAMPTZ NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	blackHole := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusAccepted)
	}))
	t.Cleanup(blackHole.Close)
	var out, errOut bytes.Buffer
	code := run([]string{"-target", blackHole.URL, "-listen", "", "-dsn", dsn, "-unique", "-ids-min", "4", "-ids", "4",
		"-rate", "20", "-count", "5", "-settle", "1s", "-check-expiry=false", "-json", "-status-every", "0"}, &out, &errOut)
	if code != 1 {
		t.Fatalf("exit %d, want 1\n%s%s", code, out.String(), errOut.String())
	}
	var sum struct {
		Sent, Missed, Lost int
		Catchup            float64 `json:"catchup_ms"`
	}
	if err := parseSummary(out.Bytes(), &sum); err != nil {
		t.Fatalf("summary %q: %v", out.String(), err)
	}
	if sum.Sent != 5 || sum.Missed != 5 || sum.Lost != 10 || sum.Catchup != -1 {
		t.Errorf("summary %+v, want 5 sent, 5 missed, 10 lost ids, never exact", sum)
	}
}

// With several targets, callbacks go to each in turn.
func TestSenderRoundRobin(t *testing.T) {
	var targets []string
	var got []*atomic.Int64
	for range 3 {
		n := &atomic.Int64{}
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			n.Add(1)
			w.WriteHeader(http.StatusAccepted)
		}))
		t.Cleanup(srv.Close)
		targets = append(targets, srv.URL)
		got = append(got, n)
	}
	var out, errOut bytes.Buffer
	code := run([]string{"-target", strings.Join(targets, ","), "-listen", "", "-dsn", "", "-rate", "50", "-count", "9",
		"-status-every", "0"}, &out, &errOut)
	if code != 0 {
		t.Fatalf("exit %d, want 0\n%s%s", code, out.String(), errOut.String())
	}
	for i, n := range got {
		if n.Load() != 3 {
			t.Errorf("target %d got %d callbacks, want 3 of 9", i, n.Load())
		}
	}
}

// -check-journal passes only when the service's journal table is empty by
// the end of -settle: a row left behind is a callback never finished.
func TestRunChecksTheJournal(t *testing.T) {
	cases := []struct {
		name     string
		leftover bool
		wantCode int
		wantLeft int
	}{
		{"empty journal", false, 0, 0},
		{"row left behind", true, 1, 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dsn := testSchema(t)
			db, err := sql.Open("postgres", dsn)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { db.Close() })
			if _, err := db.Exec(`CREATE TABLE objects (id BIGINT PRIMARY KEY, last_seen TIMESTAMPTZ NOT NULL);
				CREATE TABLE callback_journal (id BIGINT PRIMARY KEY)`); err != nil {
				t.Fatal(err)
			}
			if tc.leftover {
				if _, err := db.Exec(`INSERT INTO callback_journal VALUES (1)`); err != nil {
					t.Fatal(err)
				}
			}
			// Callbacks without ids: the table is exact at once, so only the
			// journal decides.
			accept := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(http.StatusAccepted)
			}))
			t.Cleanup(accept.Close)
			var out, errOut bytes.Buffer
			code := run([]string{"-target", accept.URL, "-listen", "", "-dsn", dsn, "-ids", "0", "-rate", "20", "-count", "2",
				"-settle", "1s", "-check-expiry=false", "-check-journal", "-json", "-status-every", "0"}, &out, &errOut)
			var sum struct {
				JournalLeft *int `json:"journal_left"`
			}
			if err := parseSummary(out.Bytes(), &sum); err != nil {
				t.Fatalf("summary %q: %v", out.String(), err)
			}
			if code != tc.wantCode || sum.JournalLeft == nil || *sum.JournalLeft != tc.wantLeft {
				t.Errorf("exit %d, journal_left %v, want exit %d and %d left\n%s", code, sum.JournalLeft, tc.wantCode, tc.wantLeft, errOut.String())
			}
		})
	}
}

// Callbacks that get no 2xx within the timeout are missed.
func TestRunCountsUnansweredCallbacks(t *testing.T) {
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.Contains(r.URL.Path, "slow") {
			time.Sleep(300 * time.Millisecond)
		}
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	t.Cleanup(slow.Close)
	// A 503 is counted as shed, no answer within the timeout as timed out;
	// both are missed callbacks.
	for _, tt := range []struct {
		path           string
		shed, timedOut int
	}{{"/slow", 0, 3}, {"/unavailable", 3, 0}} {
		var out, errOut bytes.Buffer
		code := run([]string{"-target", slow.URL + tt.path, "-listen", "", "-dsn", "", "-timeout", "100ms",
			"-rate", "50", "-count", "3", "-status-every", "0", "-json"}, &out, &errOut)
		var sum struct {
			Shed     int `json:"shed"`
			TimedOut int `json:"timed_out"`
		}
		err := parseSummary(out.Bytes(), &sum)
		if code != 1 || err != nil || !strings.Contains(errOut.String(), "FAIL: 3 missed") {
			t.Errorf("%s: exit %d (%v), want 1 with 3 missed:\n%s%s", tt.path, code, err, out.String(), errOut.String())
		}
		if sum.Shed != tt.shed || sum.TimedOut != tt.timedOut {
			t.Errorf("%s: shed %d, timed out %d; want %d and %d", tt.path, sum.Shed, sum.TimedOut, tt.shed, tt.timedOut)
		}
	}
}

// The real service, built from the repository root, under the simulator:
// a short run of never-repeating ids with a 5 s TTL, checked live, for
// exactness at the end, and for expiry after the TTL.
func TestServiceUnderSimulator(t *testing.T) {
	dsn := testSchema(t)
	bin := filepath.Join(t.TempDir(), "objtrack")
	if out, err := exec.Command("go", "build", "-o", bin, "..").CombinedOutput(); err != nil {
		t.Fatalf("build the service: %v\n%s", err, out)
	}
	objAddr, err := freeAddr()
	if err != nil {
		t.Fatal(err)
	}
	svc, err := startService(bin, objAddr, dsn, "-ttl", "5s")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		svc.stop()
		if t.Failed() {
			t.Logf("service log:\n%s", svc.logs.String())
		}
	})

	// The sender retries 503s, as senders must: on a busy machine the
	// service may shed a few callbacks at the start (queue_wait, while its
	// fetch limit settles), which is an answer, not a miss.
	var out, errOut bytes.Buffer
	code := run([]string{"-target", svc.base + "/callback", "-listen", objAddr, "-dsn", dsn,
		"-rate", "20", "-unique", "-ids-min", "50", "-ids", "50", "-duration", "5s", "-retry-for", "3s",
		"-latency-min", "50ms", "-latency-max", "500ms", "-ttl", "5s", "-settle", "10s",
		"-json", "-status-every", "0"}, &out, &errOut)
	var sum struct {
		Sent, Accepted, Missed, Lost int
		TableErrors                  int     `json:"table_errors"`
		NotReaped                    int     `json:"not_reaped"`
		Catchup                      float64 `json:"catchup_ms"`
		Pass                         bool
	}
	if err := parseSummary(out.Bytes(), &sum); err != nil {
		t.Fatalf("summary %q: %v\n%s", out.String(), err, errOut.String())
	}
	if code != 0 || !sum.Pass || sum.Sent != 100 || sum.Accepted != 100 || sum.Missed != 0 || sum.Lost != 0 ||
		sum.TableErrors != 0 || sum.NotReaped != 0 || sum.Catchup < 0 {
		t.Fatalf("exit %d, summary %+v, want a pass with 100 accepted\n%s", code, sum, errOut.String())
	}
}

// testSchema gives the test a schema of its own in the database of
// DATABASE_URL and returns a DSN that uses it. Without DATABASE_URL the test
// is skipped, unless CI is set: there it fails.
func testSchema(t *testing.T) string {
	t.Helper()
	dsn := os.Getenv("DATABASE_URL")
	if dsn == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("DATABASE_URL is not set in CI")
		}
		t.Skip("DATABASE_URL not set")
	}
	db, err := sql.Open("postgres", dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	schema := fmt.Sprintf("sim_test_%d_%d", os.Getpid(), time.Now().UnixNano()%1e9)
	if _, err := db.Exec(`CREATE SCHEMA ` + schema); err != nil {
		t.Fatalf("database from DATABASE_URL: %v", err)
	}
	t.Cleanup(func() { db.Exec(`DROP SCHEMA ` + schema + ` CASCADE`) })
	if u, err := url.Parse(dsn); err == nil && u.Scheme != "" {
		q := u.Query()
		q.Set("search_path", schema)
		u.RawQuery = q.Encode()
		return u.String()
	}
	return dsn + " search_path=" + schema
}

// distinct agrees with sorting and compacting, for small id spaces (the
// bitmap) and large ones.
func TestDistinctAgreesWithSort(t *testing.T) {
	for _, space := range []int64{1, 64, 100, 1000, maxBitmapSpace, maxBitmapSpace + 1} {
		s := &sender{idSpace: space, idsMin: 200, idsMax: 200}
		for range 20 {
			ids := s.ids()
			if got, want := s.distinct(ids), dedupe(ids); !slices.Equal(got, want) {
				t.Fatalf("space %d: distinct %v, want %v", space, got, want)
			}
		}
	}
}
