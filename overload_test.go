package main

import (
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Past capacity a callback with new ids gets a 503 with Retry-After at
// once, while a callback whose ids are already being fetched is accepted:
// they cost nothing.
func TestOverloadShedsNewIDsOnly(t *testing.T) {
	up := newUpstream(t, time.Hour, nil) // lookups never finish: the queue stays
	p := testApp(t, testConfig(t, "-upstream", up.URL, "-max-inflight", "2", "-max-queue-wait", "1s"), nil)
	runFetchQueue(t, p.fetcher)
	p.db.setUp(errNotUp) // journal in memory: this test is about admission
	send := func(ids ...int64) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		p.handler().ServeHTTP(rec, httptest.NewRequest("POST", "/callback", strings.NewReader(idsBody(ids...))))
		return rec
	}
	if rec := send(1, 2, 3, 4, 5, 6, 7, 8, 9, 10); rec.Code != http.StatusAccepted {
		t.Fatalf("first callback: %d %s", rec.Code, rec.Body)
	}
	// Two slots: eight ids wait, at an estimated 2 fetches/s.
	eventually(t, landWithin, "ids waiting for slots", func() bool { return p.fetcher.waiting.Load() == 8 })
	start := time.Now()
	rec := send(11, 12, 13)
	if rec.Code != http.StatusServiceUnavailable {
		t.Fatalf("callback of new ids past the bound: %d %s, want 503", rec.Code, rec.Body)
	}
	if d := time.Since(start); d >= p.cfg.journalTimeout {
		t.Errorf("shedding took %s, want less than -journal-timeout (%s)", d, p.cfg.journalTimeout)
	}
	if ra, err := strconv.Atoi(rec.Header().Get("Retry-After")); err != nil || ra < 1 {
		t.Errorf("Retry-After %q, want whole seconds", rec.Header().Get("Retry-After"))
	}
	if got := p.metrics.callbacksShed.Value("queue_wait"); got != 1 {
		t.Errorf("shed queue_wait %d, want 1", got)
	}
	if rec := send(3, 4, 5); rec.Code != http.StatusAccepted {
		t.Errorf("callback of ids already being fetched: %d %s, want 202", rec.Code, rec.Body)
	}
}
