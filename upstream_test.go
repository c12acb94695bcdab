package main

import (
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
)

// An object service that does not answer is not silent: a WARN that names
// it, the gauge at 0 and /readyz saying so (still 200: the database is up),
// and an INFO once it answers again.
func TestUnreachableObjectServiceIsReported(t *testing.T) {
	dsn := testDSN(t)
	var broken atomic.Bool
	broken.Store(true)
	up := newUpstream(t, 0, func(w http.ResponseWriter, r *http.Request, id int64, n int) bool {
		if broken.Load() {
			http.Error(w, "down", http.StatusBadGateway)
			return true
		}
		return false
	})
	svc := startService(t, dsn, up.URL)
	svc.waitReady(t)
	postTimed(t, svc.base, 2, 4, 6, 8, 10, 12)
	eventually(t, landWithin, "objtrack_upstream_up 0", func() bool { return svc.metric(t, "objtrack_upstream_up") == 0 })
	if logs := svc.logs.String(); !strings.Contains(logs, "level=WARN msg=\"object service not answering") || !strings.Contains(logs, up.URL) {
		t.Errorf("no WARN naming the object service:\n%s", tail(logs, 20))
	}
	status, body := getBody(t, svc.base+"/readyz")
	if status != http.StatusOK || !strings.Contains(body, `"object_service":"down: `) {
		t.Errorf("readyz %d %s, want 200 with the object service down", status, body)
	}
	broken.Store(false)
	eventually(t, landWithin, "objtrack_upstream_up 1", func() bool { return svc.metric(t, "objtrack_upstream_up") == 1 })
	if !strings.Contains(svc.logs.String(), "object service answering again") {
		t.Error("no INFO when the object service answers again")
	}
}

// Lookups given up at the TTL are logged at WARN with a count, and
// /readyz says the object service is down.
func TestDroppedLookupsAreLogged(t *testing.T) {
	svc := startService(t, "postgres://x@127.0.0.1:1/x?sslmode=disable", "http://127.0.0.1:1", "-ttl", "1s")
	// Ten ids: ten failed first attempts, more than it takes to call the
	// object service down whatever the retries.
	post(t, svc.base, idsBody(1, 2, 3, 4, 5, 6, 7, 8, 9, 10))
	eventually(t, landWithin, "ids dropped", func() bool { return svc.metric(t, "objtrack_ids_dropped_total") == 10 })
	eventually(t, landWithin, "the WARN", func() bool {
		return strings.Contains(svc.logs.String(), "lookups given up: no answer from the object service before received time + TTL")
	})
	// The object service is judged once a second: within a second or two
	// of the failures, /readyz says so.
	var body string
	eventually(t, landWithin, "readyz saying the object service is down", func() bool {
		_, body = getBody(t, svc.base+"/readyz")
		return strings.Contains(body, `"object_service":"down: `)
	})
}
