package main

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestCallbackRejectsBadInput(t *testing.T) {
	cfg := testConfig(t, "-max-ids", "5", "-max-body", "200")
	h := testApp(t, cfg, nil).handler()
	tests := []struct {
		name, method, body string
		status             int
		errContains        string
	}{
		{"malformed JSON", "POST", `{"object_ids": [1, 2`, 400, "malformed JSON"},
		{"not JSON at all", "POST", `hello`, 400, "malformed JSON"},
		{"empty body", "POST", ``, 400, "empty body"},
		{"trailing data", "POST", `{"object_ids": [1]} {"object_ids": [2]}`, 400, "trailing data"},
		{"trailing garbage", "POST", `{"object_ids": [1]} x`, 400, "malformed JSON"},
		{"array at top level", "POST", `[1, 2]`, 400, "want an object"},
		{"ids not an array", "POST", `{"object_ids": 5}`, 400, "want an array of integers"},
		{"ids an object", "POST", `{"object_ids": {"a": 1}}`, 400, "want an array of integers"},
		{"missing ids", "POST", `{"ids": [1]}`, 400, `missing "object_ids"`},
		{"null ids", "POST", `{"object_ids": null}`, 400, `missing "object_ids"`},
		{"string id", "POST", `{"object_ids": ["7"]}`, 400, "not an integer"},
		{"string id before others", "POST", `{"object_ids": ["x", 3]}`, 400, `object_ids: "x" is not an integer`},
		{"float id", "POST", `{"object_ids": [1.5]}`, 400, "not an integer"},
		{"integral float id", "POST", `{"object_ids": [2.0]}`, 400, "not an integer"},
		{"exponent id", "POST", `{"object_ids": [1e3]}`, 400, "not an integer"},
		{"null id", "POST", `{"object_ids": [null]}`, 400, "not an integer"},
		{"bool id", "POST", `{"object_ids": [true]}`, 400, "not an integer"},
		{"nested id", "POST", `{"object_ids": [[1]]}`, 400, "not an integer"},
		{"too large id", "POST", `{"object_ids": [9223372036854775808]}`, 400, "out of range"},
		{"too small id", "POST", `{"object_ids": [-9223372036854775809]}`, 400, "out of range"},
		{"too many ids", "POST", `{"object_ids": [1, 2, 3, 4, 5, 6]}`, 413, "at most 5"},
		{"body too large", "POST", `{"object_ids": [1], "pad": "` + strings.Repeat("x", 300) + `"}`, 413, "larger than 200 bytes"},
		{"GET", "GET", ``, 405, "use POST"},
		{"PUT", "PUT", `{"object_ids": [1]}`, 405, "use POST"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(tt.method, "/callback", strings.NewReader(tt.body)))
			if rec.Code != tt.status {
				t.Fatalf("status %d, want %d (body %s)", rec.Code, tt.status, rec.Body)
			}
			var body struct{ Error string }
			if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
				t.Fatalf("error body is not JSON: %q", rec.Body)
			}
			if !strings.Contains(body.Error, tt.errContains) {
				t.Errorf("error %q, want it to mention %q", body.Error, tt.errContains)
			}
			if got := rec.Header().Get("Content-Type"); got != "application/json" {
				t.Errorf("Content-Type %q", got)
			}
			if tt.status == 405 && rec.Header().Get("Allow") != "POST" {
				t.Errorf("Allow %q, want POST", rec.Header().Get("Allow"))
			}
		})
	}
}

// With the database known to be down the callback is still accepted, into
// the spill, at once: there is no point making the sender wait.
func TestCallbackAcceptedWithoutDatabase(t *testing.T) {
	up := newUpstream(t, 0, nil)
	p := testApp(t, testConfig(t, "-upstream", up.URL), nil)
	runFetchQueue(t, p.fetcher)
	p.db.setUp(errors.New("connection refused"))
	start := time.Now()
	rec := httptest.NewRecorder()
	p.handler().ServeHTTP(rec, httptest.NewRequest("POST", "/callback", strings.NewReader(`{"object_ids":[1,2,2]}`)))
	if rec.Code != http.StatusAccepted {
		t.Fatalf("status %d (%s), want 202", rec.Code, rec.Body)
	}
	if d := time.Since(start); d >= p.cfg.journalTimeout {
		t.Errorf("answer took %s with the database down, want less than -journal-timeout (%s)", d, p.cfg.journalTimeout)
	}
	var body acceptedBody
	if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || body.IDs != 2 || body.Journaled || body.Durable != durableSpill {
		t.Errorf("body %s: want 2 ids, not journaled, durable in the spill", rec.Body)
	}
	if got := p.metrics.journalFailures.Value(); got != 0 {
		t.Errorf("journal failures %d, want 0 (the spill took it)", got)
	}
	eventually(t, landWithin, "both ids fetched", func() bool { return up.count(1) == 1 && up.count(2) == 1 })
}

// A callback whose spill fsync does not come by the answer deadline (a
// starved machine, a slow disk) gets a 503 with Retry-After: never a 2xx
// without a durable record, nor one after the sender's 1s. Its work goes
// on.
func TestSpillTooSlowAnswers503(t *testing.T) {
	up := newUpstream(t, 0, nil)
	p := testApp(t, testConfig(t, "-upstream", up.URL), nil)
	runFetchQueue(t, p.fetcher)
	p.db.setUp(errors.New("connection refused"))
	p.spill.mu.Lock() // the spill writer blocks before its write: no fsync comes
	locked := true
	t.Cleanup(func() {
		if locked {
			p.spill.mu.Unlock()
		}
	})
	start := time.Now()
	rec := httptest.NewRecorder()
	p.handler().ServeHTTP(rec, httptest.NewRequest("POST", "/callback", strings.NewReader(`{"object_ids":[1,2]}`)))
	took := time.Since(start)
	if rec.Code != http.StatusServiceUnavailable || rec.Header().Get("Retry-After") == "" {
		t.Fatalf("status %d (%s), Retry-After %q: want 503 with Retry-After", rec.Code, rec.Body, rec.Header().Get("Retry-After"))
	}
	if took < answerBy {
		t.Errorf("answered after %s, before the answer deadline (%s): the spill had time left", took, answerBy)
	}
	if got := p.metrics.callbacksShed.Value("not_durable"); got != 1 {
		t.Errorf("shed not_durable %d, want 1", got)
	}
	if got := p.metrics.journalFailures.Value(); got != 0 {
		t.Errorf("journal failures %d, want 0 (no 2xx went out)", got)
	}
	p.spill.mu.Unlock()
	locked = false
	eventually(t, landWithin, "both ids fetched", func() bool { return up.count(1) == 1 && up.count(2) == 1 })
}

func TestBacklogFullAnswers503(t *testing.T) {
	up := newUpstream(t, time.Hour, nil) // lookups never finish: callbacks stay in memory
	p := testApp(t, testConfig(t, "-upstream", up.URL, "-max-backlog", "3"), nil)
	codes := map[int]int{}
	for i := range 6 {
		rec := httptest.NewRecorder()
		p.handler().ServeHTTP(rec, httptest.NewRequest("POST", "/callback", strings.NewReader(idsBody(int64(i)))))
		codes[rec.Code]++
		if rec.Code == http.StatusServiceUnavailable && rec.Header().Get("Retry-After") == "" {
			t.Error("503 without Retry-After")
		}
	}
	if codes[202] != 3 || codes[503] != 3 {
		t.Errorf("codes %v, want 3×202 and 3×503", codes)
	}
	if got := p.metrics.callbacksShed.Value("backlog_full"); got != 3 {
		t.Errorf("shed backlog_full %d, want 3", got)
	}
	// With the backlog full, the body is not even read.
	body := &readCounter{r: strings.NewReader(idsBody(9))}
	rec := httptest.NewRecorder()
	p.handler().ServeHTTP(rec, httptest.NewRequest("POST", "/callback", body))
	if rec.Code != http.StatusServiceUnavailable || body.read {
		t.Errorf("status %d, body read %v; want 503 without reading the body", rec.Code, body.read)
	}
}

func TestPanicInHandlerIs500(t *testing.T) {
	m := newMetrics()
	g := &guard{log: discardLogger(), metrics: m}
	h := recoverPanics(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { panic("boom") }), g)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/", nil))
	if rec.Code != 500 || m.panics.Value() != 1 {
		t.Errorf("status %d panics %d, want 500 and 1", rec.Code, m.panics.Value())
	}
}

// Every error answer outside /callback is JSON too: an unknown path is a 404
// and a wrong method on a GET route a 405 with Allow, not the mux's text.
func TestNotFoundAndWrongMethodAreJSON(t *testing.T) {
	h := testApp(t, testConfig(t), nil).handler()
	tests := []struct {
		method, path string
		status       int
		allow        string
		errContains  string
	}{
		{"GET", "/", 404, "", `no such path "/"`},
		{"GET", "/nope", 404, "", `no such path "/nope"`},
		{"POST", "/callbacks", 404, "", `no such path "/callbacks"`},
		{"GET", "/callback/1", 404, "", `no such path "/callback/1"`},
		{"GET", "/healthz/", 404, "", `no such path "/healthz/"`},
		{"POST", "/healthz", 405, "GET, HEAD", "use GET"},
		{"DELETE", "/readyz", 405, "GET, HEAD", "use GET"},
		{"PUT", "/metrics", 405, "GET, HEAD", "use GET"},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(tt.method, tt.path, nil))
			if rec.Code != tt.status {
				t.Fatalf("status %d, want %d (body %s)", rec.Code, tt.status, rec.Body)
			}
			if got := rec.Header().Get("Content-Type"); got != "application/json" {
				t.Errorf("Content-Type %q, want application/json", got)
			}
			var body struct{ Error string }
			if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || !strings.Contains(body.Error, tt.errContains) {
				t.Errorf("body %q (%v), want a JSON error mentioning %q", rec.Body, err, tt.errContains)
			}
			if got := rec.Header().Get("Allow"); got != tt.allow {
				t.Errorf("Allow %q, want %q", got, tt.allow)
			}
		})
	}
}

// The GET routes still answer GET and HEAD.
func TestGETRoutesAnswerGETAndHEAD(t *testing.T) {
	h := testApp(t, testConfig(t), nil).handler()
	for _, path := range []string{"/healthz", "/metrics"} {
		for _, method := range []string{"GET", "HEAD"} {
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(method, path, nil))
			if rec.Code != http.StatusOK {
				t.Errorf("%s %s: status %d, want 200", method, path, rec.Code)
			}
		}
	}
}

// readCounter is a request body that records whether it was read.
type readCounter struct {
	r    io.Reader
	read bool
}

func (c *readCounter) Read(p []byte) (int, error) { c.read = true; return c.r.Read(p) }

// Past the answer limit a callback is answered 503 busy without its body
// being read: shedding must cost less than accepting.
func TestCallbackPastAnswerLimitIsShedUnread(t *testing.T) {
	up := newUpstream(t, 0, nil)
	p := testApp(t, testConfig(t, "-upstream", up.URL), nil)
	p.answers.limit.Store(1)
	if !p.answers.enter() {
		t.Fatal("could not take the one place")
	}
	body := &readCounter{r: strings.NewReader(idsBody(1))}
	rec := httptest.NewRecorder()
	p.handler().ServeHTTP(rec, httptest.NewRequest("POST", "/callback", body))
	if rec.Code != http.StatusServiceUnavailable || rec.Header().Get("Retry-After") == "" {
		t.Fatalf("status %d, Retry-After %q; want 503 with Retry-After", rec.Code, rec.Header().Get("Retry-After"))
	}
	if body.read {
		t.Error("the body of a shed callback was read")
	}
	if got := p.metrics.callbacksShed.Value("busy"); got != 1 {
		t.Errorf("shed busy %d, want 1", got)
	}
}

// The 202 written by hand is byte for byte what encoding/json gives, for
// every body the service sends.
func TestWriteAcceptedIsTheJSONEncoding(t *testing.T) {
	for _, durable := range []string{durablePostgres, durableSpill, durableMemory} {
		for _, ids := range []int{0, 1, 200, 10000} {
			body := acceptedBody{Status: "accepted", IDs: ids, Journaled: durable == durablePostgres, Durable: durable}
			rec := httptest.NewRecorder()
			writeAccepted(rec, body)
			want := httptest.NewRecorder()
			writeJSON(want, http.StatusAccepted, body)
			if rec.Code != want.Code || rec.Body.String() != want.Body.String() || rec.Header().Get("Content-Type") != want.Header().Get("Content-Type") {
				t.Errorf("%+v: %d %q (%s), want %d %q (%s)", body, rec.Code, rec.Body.String(), rec.Header().Get("Content-Type"),
					want.Code, want.Body.String(), want.Header().Get("Content-Type"))
			}
		}
	}
}
