package main

import (
	"bytes"
	"database/sql"
	"encoding/json"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// retrySummary is what the retry tests read of a run's SUMMARY line.
type retrySummary struct {
	Sent             int  `json:"sent"`
	Accepted         int  `json:"accepted"`
	Failed           int  `json:"failed"`
	Shed             int  `json:"shed"`
	TimedOut         int  `json:"timed_out"`
	FirstAccepted    int  `json:"first_accepted"`
	Attempts         int  `json:"attempts"`
	AttemptsAccepted int  `json:"attempts_accepted"`
	AttemptsShed     int  `json:"attempts_shed"`
	AttemptsTimedOut int  `json:"attempts_timed_out"`
	AttemptsOther    int  `json:"attempts_other"`
	AttemptsRefused  int  `json:"attempts_refused"`
	Pass             bool `json:"pass"`
}

// runRetrying runs the simulator against targets with no object service
// and no table, and returns its exit code and summary.
func runRetrying(t *testing.T, targets string, extra ...string) (int, retrySummary, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	args := append([]string{"-target", targets, "-listen", "", "-dsn", "", "-rate", "20", "-count", "3",
		"-status-every", "0", "-json"}, extra...)
	code := run(args, &out, &errOut)
	var sum retrySummary
	if err := parseSummary(out.Bytes(), &sum); err != nil {
		t.Fatalf("summary: %v\n%s%s", err, out.String(), errOut.String())
	}
	return code, sum, errOut.String()
}

// firstThen answers the first request of each body with first and every
// later one 202, and records when each request came.
type firstThen struct {
	first func(w http.ResponseWriter, r *http.Request)
	mu    sync.Mutex
	seen  map[string][]time.Time
}

func (f *firstThen) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var b bytes.Buffer
	b.ReadFrom(r.Body)
	f.mu.Lock()
	if f.seen == nil {
		f.seen = map[string][]time.Time{}
	}
	f.seen[b.String()] = append(f.seen[b.String()], time.Now())
	n := len(f.seen[b.String()])
	f.mu.Unlock()
	if n == 1 {
		f.first(w, r)
		return
	}
	w.WriteHeader(http.StatusAccepted)
}

// A retrying sender waits Retry-After after a 503 and counts the callback
// accepted by the retry; per first attempt it was shed.
func TestRetryingSenderAfter503(t *testing.T) {
	h := &firstThen{first: func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Retry-After", "1")
		w.WriteHeader(http.StatusServiceUnavailable)
	}}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	code, sum, log := runRetrying(t, srv.URL, "-retry-for", "5s", "-ids", "1", "-ids-min", "1", "-unique")
	want := retrySummary{Sent: 3, Accepted: 3, Shed: 3, Attempts: 6, AttemptsAccepted: 3, AttemptsShed: 3, Pass: true}
	if code != 0 || sum != want {
		t.Fatalf("exit %d, summary %+v, want 0 and %+v\n%s", code, sum, want, log)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for body, at := range h.seen {
		if len(at) != 2 || at[1].Sub(at[0]) < time.Second {
			t.Errorf("%s: attempts at %v, want a retry at least Retry-After (1s) after the first", body, at)
		}
	}
}

// A timeout is retried with backoff; without -retry-for it is a failure.
func TestRetryingSenderAfterTimeout(t *testing.T) {
	h := &firstThen{first: func(w http.ResponseWriter, r *http.Request) {
		<-r.Context().Done() // never answer: the client times out
	}}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	code, sum, log := runRetrying(t, srv.URL, "-retry-for", "5s", "-timeout", "200ms", "-ids", "1", "-ids-min", "1", "-unique")
	want := retrySummary{Sent: 3, Accepted: 3, TimedOut: 3, Attempts: 6, AttemptsAccepted: 3, AttemptsTimedOut: 3, Pass: true}
	if code != 0 || sum != want {
		t.Fatalf("exit %d, summary %+v, want 0 and %+v\n%s", code, sum, want, log)
	}
}

// The sender gives up once the next attempt would start after -retry-for,
// and never retries a 4xx.
func TestRetryingSenderGivesUp(t *testing.T) {
	cases := []struct {
		name   string
		status int
		want   retrySummary
	}{
		// Attempts at 0 s and 1 s; a third at 2 s would be past 1.5 s.
		{"503 until the window ends", http.StatusServiceUnavailable, retrySummary{Sent: 3, Failed: 3, Shed: 3, Attempts: 6, AttemptsShed: 6}},
		{"400 at once", http.StatusBadRequest, retrySummary{Sent: 3, Failed: 3, Attempts: 3, AttemptsOther: 3}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Retry-After", "1")
				w.WriteHeader(tc.status)
			}))
			t.Cleanup(srv.Close)
			code, sum, log := runRetrying(t, srv.URL, "-retry-for", "1500ms", "-ids", "0")
			if code != 1 || sum != tc.want {
				t.Fatalf("exit %d, summary %+v, want 1 and %+v\n%s", code, sum, tc.want, log)
			}
		})
	}
}

// A refused connection goes to the next target; the callback counts as
// accepted there.
func TestRetryingSenderNextTarget(t *testing.T) {
	dead := httptest.NewServer(http.NotFoundHandler())
	dead.Close() // nothing listens there now
	var n int
	var mu sync.Mutex
	live := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		n++
		mu.Unlock()
		w.WriteHeader(http.StatusAccepted)
	}))
	t.Cleanup(live.Close)
	code, sum, log := runRetrying(t, dead.URL+","+live.URL, "-retry-for", "5s", "-count", "4", "-ids", "0")
	// Callbacks 0 and 2 go first to the dead target, then to the live one.
	want := retrySummary{Sent: 4, Accepted: 4, FirstAccepted: 2, Attempts: 6, AttemptsAccepted: 4, AttemptsOther: 2, AttemptsRefused: 2, Pass: true}
	if code != 0 || sum != want || n != 4 {
		t.Fatalf("exit %d, summary %+v, live got %d; want 0, %+v and 4\n%s", code, sum, n, want, log)
	}
}

func TestRetryAfterHeader(t *testing.T) {
	for h, want := range map[string]time.Duration{"3": 3 * time.Second, " 0 ": 0, "": retryAfterDefault,
		"Wed, 21 Oct 2015 07:28:00 GMT": retryAfterDefault, "-1": retryAfterDefault} {
		if got := retryAfter(h); got != want {
			t.Errorf("retryAfter(%q) = %s, want %s", h, got, want)
		}
	}
}

// In the outage window every request is answered 500 at once and counted;
// before and after it the object service answers as usual.
func TestObjectServiceOutage(t *testing.T) {
	o := &objectService{online: onlineFunc("all"), outageAfter: time.Hour, outageFor: time.Hour}
	mux := http.NewServeMux()
	mux.Handle("GET /objects/{id}", o)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	get := func() int {
		t.Helper()
		resp, err := http.Get(srv.URL + "/objects/4")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	now := time.Now()
	for _, tc := range []struct {
		name    string
		start   time.Time
		want    int
		outaged int64
	}{
		{"before", now, 200, 0},
		{"in the window", now.Add(-90 * time.Minute), 500, 1},
		{"after", now.Add(-3 * time.Hour), 200, 1},
	} {
		o.start = tc.start
		if got := get(); got != tc.want || o.outaged.Load() != tc.outaged {
			t.Errorf("%s: status %d, %d outage answers; want %d and %d", tc.name, got, o.outaged.Load(), tc.want, tc.outaged)
		}
	}
	if c := o.perID()[4]; c.requests != 3 || c.retryable != 1 || c.askedBy != 1 {
		t.Errorf("id 4 counted %+v, want 3 requests of which 1 retryable", c)
	}
}

// The object service counts requests per id, and which of them could not
// answer: a fault, or the caller hanging up first.
func TestObjectServiceCountsPerID(t *testing.T) {
	o := &objectService{online: onlineFunc("all"), latencyMin: 300 * time.Millisecond, latencyMax: 300 * time.Millisecond}
	srv := httptest.NewServer(o.mux())
	t.Cleanup(srv.Close)
	get := func(id string, timeout time.Duration) {
		resp, err := (&http.Client{Timeout: timeout}).Get(srv.URL + "/objects/" + id)
		if err == nil {
			resp.Body.Close()
		}
	}
	get("1", 5*time.Second)
	get("1", 5*time.Second)
	get("2", 50*time.Millisecond) // hangs up before the answer
	// The abandoned request is counted when the handler sees the hang-up.
	if err := waitFor(5*time.Second, func() error {
		if o.abandoned.Load() != 1 {
			return errString("not yet abandoned")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	get2 := func(path string) {
		resp, err := http.Get(srv.URL + path)
		if err == nil {
			resp.Body.Close()
		}
	}
	get2("/i/b/objects/1") // another instance
	get2("/i/b/objects/3")
	got := o.perID()
	want := map[int64]idCount{1: {3, 0, 0b11}, 2: {1, 1, 0b1}, 3: {1, 0, 0b10}}
	if !maps.Equal(got, want) {
		t.Errorf("per id %+v, want %+v", got, want)
	}
}

type errString string

func (e errString) Error() string { return string(e) }

// refetch allows an id to be asked by as many instances as received a
// callback carrying it, plus one when the killed instance held it; how
// often each instance asks does not matter.
func TestCheckerRefetch(t *testing.T) {
	killAt := at(20 * sec)
	cases := []struct {
		name     string
		sendAt   time.Duration
		attempts []int // targets, all received
		killed   bool  // the kill was marked
		askedBy  uint64
		wantOver int
		wantHeld int
	}{
		{"one instance", 0, []int{0}, false, 0b1, 0, 0},
		{"two instances, no reason", 0, []int{0}, false, 0b11, 1, 0},
		{"two instances, two attempts received", 0, []int{0, 1}, false, 0b11, 0, 0},
		{"two instances, held by the killed one", 0, []int{2}, true, 0b101, 0, 1},
		{"three instances, held by the killed one: a double claim", 0, []int{2}, true, 0b111, 1, 1},
		{"two instances, sent to a survivor", 0, []int{1}, true, 0b11, 1, 0},
		{"two instances, sent to the killed target after the kill", 25 * sec, []int{2}, true, 0b101, 1, 0},
		{"two instances, sent more than a TTL before the kill", -11 * sec, []int{2}, true, 0b101, 1, 0},
		{"two instances, no kill marked", 0, []int{2}, false, 0b101, 1, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := newTestChecker(t)
			c.killedTarget = 2
			idx := c.sent(at(tc.sendAt), []int64{8})
			for _, target := range tc.attempts {
				c.attempt(idx, target, at(tc.sendAt), true)
			}
			c.answered(idx, at(tc.sendAt+10*time.Millisecond), true)
			var k time.Time
			if tc.killed {
				k = killAt
			}
			// Many requests per instance are the instance's own business.
			r := c.refetch(map[int64]idCount{8: {requests: 5, askedBy: tc.askedBy}, 99: {requests: 1, askedBy: 1}}, []string{"a", "b", "c"}, k)
			if r.over != tc.wantOver || r.killHeld != tc.wantHeld || r.foreignIDs != 1 {
				t.Errorf("refetch %+v, want %d over, %d held for the kill, 1 foreign id", r, tc.wantOver, tc.wantHeld)
			}
			if want := map[string]int{"1": 1, "5": 1}; !maps.Equal(r.histogram, want) || r.maxPerID != 5 || r.refetched != 1 {
				t.Errorf("histogram %v, max %d, refetched %d; want %v, 5, 1", r.histogram, r.maxPerID, r.refetched, want)
			}
		})
	}
}

// A refused attempt cannot have been received: it allows no instance.
func TestCheckerRefetchRefusedAttempt(t *testing.T) {
	c := newTestChecker(t)
	idx := c.sent(at(0), []int64{8})
	c.attempt(idx, 0, at(0), false)
	c.attempt(idx, 1, at(sec), true)
	c.answered(idx, at(sec), true)
	r := c.refetch(map[int64]idCount{8: {requests: 2, askedBy: 0b11}}, []string{"a", "b"}, time.Time{})
	if r.over != 1 || len(r.overWhy) != 1 || r.overWhy[0] != "id 8: asked 2 times by instances [a b]; received by targets [1]" {
		t.Errorf("refetch %+v, want the id over: only one target received it", r)
	}
}

// A failed callback is excused only when an attempt of it went to the
// killed target from a timeout before the kill until it was back.
func TestCheckerFailedOutsideKill(t *testing.T) {
	c := newTestChecker(t)
	c.killedTarget = 0
	fail := func(sendAt time.Duration, target int) {
		idx := c.sent(at(sendAt), nil)
		c.attempt(idx, target, at(sendAt), true)
		c.answered(idx, at(sendAt+sec), false)
	}
	fail(5*sec, 0)                      // long before the kill: counts
	fail(9*sec+500*time.Millisecond, 0) // in flight at the kill: excused
	fail(11*sec, 0)                     // while it was down: excused
	fail(11*sec, 1)                     // to another target: counts
	fail(13*sec, 0)                     // after it was back: counts
	ok := c.sent(at(6*sec), nil)
	c.answered(ok, at(6*sec), true)
	if got := c.failedOutsideKill(at(10*sec), at(12*sec)); got != 3 {
		t.Errorf("failed outside the kill = %d, want 3", got)
	}
	if got := c.failedOutsideKill(time.Time{}, time.Time{}); got != 5 {
		t.Errorf("failed without a kill = %d, want all 5", got)
	}
}

// Ids that did not land are excused when their TTL ran out before the
// outage's end (plus the longest answer); later ones are lost.
func TestCheckerLostExcusedInOutage(t *testing.T) {
	c := newTestChecker(t)
	c.lostExcusedBefore = at(40 * sec)
	c.answered(c.sent(at(0), []int64{2, 3}), at(10*time.Millisecond), true)          // deadline 30 s: excused
	c.answered(c.sent(at(15*sec), []int64{4, 5}), at(15*sec+time.Millisecond), true) // deadline 45 s: lost
	c.finish()
	v := c.verdict()
	if v.lostExcused != 1 || v.lostIDs != 1 || v.lostCbs != 1 {
		t.Errorf("verdict %+v, want 1 id excused, 1 lost of 1 callback", v)
	}
	if !strings.Contains(strings.Join(v.examples, "\n"), "id 4") {
		t.Errorf("examples %v do not name id 4", v.examples)
	}
}

// A callback accepted on a retry is received at the retry: the table row
// with that time is right, neither lost nor a wrong time, though it lies
// seconds after the first attempt.
func TestRunRetriedCallbackLandsWithTheRetryTime(t *testing.T) {
	dsn := testSchema(t)
	db, err := sql.Open("postgres", dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if _, err := db.Exec(`CREATE TABLE objects (id BIGINT PRIMARY KEY, last_seen TIMESTAMPTZ NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	// A service that sheds the first attempt for 3 s, then stores the
	// online (even) ids with the retry's receipt time before answering.
	h := &firstThen{first: func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Retry-After", "3")
		w.WriteHeader(http.StatusServiceUnavailable)
	}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		var cb struct {
			IDs []int64 `json:"object_ids"`
		}
		json.Unmarshal(body, &cb)
		h.mu.Lock()
		retry := len(h.seen[string(body)]) > 0
		h.mu.Unlock()
		if retry {
			for _, id := range cb.IDs {
				if id%2 == 0 {
					if _, err := db.Exec(`INSERT INTO objects VALUES ($1, now())`, id); err != nil {
						t.Error(err)
					}
				}
			}
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	var out, errOut bytes.Buffer
	code := run([]string{"-target", srv.URL, "-listen", "", "-dsn", dsn, "-unique", "-ids-min", "4", "-ids", "4",
		"-rate", "20", "-count", "2", "-retry-for", "10s", "-settle", "5s", "-check-expiry=false", "-json", "-status-every", "0"}, &out, &errOut)
	var sum struct {
		Accepted, Lost int
		TableErrors    int     `json:"table_errors"`
		Catchup        float64 `json:"catchup_ms"`
		Attempts       int     `json:"attempts"`
	}
	if err := parseSummary(out.Bytes(), &sum); err != nil {
		t.Fatalf("summary %q: %v", out.String(), err)
	}
	if code != 0 || sum.Accepted != 2 || sum.Lost != 0 || sum.TableErrors != 0 || sum.Attempts != 4 || sum.Catchup < 0 {
		t.Fatalf("exit %d, summary %+v; want a pass, 2 accepted on 4 attempts, nothing lost, no table error\n%s", code, sum, errOut.String())
	}
}

// A callback accepted on a late retry is judged lost only a TTL after the
// retry's answer, when its row (received at the retry) may have expired.
func TestCheckerLostWaitsForTheRetry(t *testing.T) {
	c := newChecker(30*sec, sec, sec, 21*sec, onlineFunc("even"), at(-10*sec))
	c.answered(c.sent(at(0), []int64{2}), at(15*sec), true)
	c.checkLost(at(31 * sec)) // a TTL after the first attempt: too early
	c.observe(at(40*sec), []row{{2, at(14*sec + 900*time.Millisecond)}})
	c.checkLost(at(46 * sec))
	if v := c.verdict(); v.lostIDs != 0 || v.tableErrors != 0 {
		t.Errorf("verdict %+v, want nothing lost and no table error", v)
	}
}
