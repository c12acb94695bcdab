package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The baseline decodes with the service's decoder: servicedecode.go is
// ../decode.go with its header and dedupe renamed, nothing else.
func TestServiceDecoderCopy(t *testing.T) {
	orig, err := os.ReadFile("../decode.go")
	if err != nil {
		t.Fatal(err)
	}
	copied, err := os.ReadFile("servicedecode.go")
	if err != nil {
		t.Fatal(err)
	}
	_, body, ok := strings.Cut(string(copied), "\n\n")
	if !ok {
		t.Fatal("servicedecode.go: no header")
	}
	if want := strings.ReplaceAll(string(orig), "dedupe(", "dedupeInPlace("); body != want {
		t.Error("sim/servicedecode.go differs from decode.go: copy it again (see its header)")
	}
}

// The closed loop keeps exactly its number of callbacks in flight, sends
// one body of 200 ids from 0-99 every time, and counts each answer by its
// status and durable field.
func TestClosedLoopSender(t *testing.T) {
	const senders = 4
	var (
		mu       sync.Mutex
		bodies   = map[string]int{}
		inFlight atomic.Int64
		peak     atomic.Int64
		n        atomic.Int64
	)
	answers := []struct {
		status int
		body   string
	}{
		{202, `{"status":"accepted","ids":87,"journaled":true,"durable":"postgres"}`},
		{202, `{"status":"accepted","ids":87,"journaled":false,"durable":"spill"}`},
		{202, `{"status":"accepted","ids":87,"journaled":false,"durable":"memory"}`},
		{202, `{"status":"accepted"}`},
		{503, `{"error":"busy"}`},
		{400, `{"error":"bad"}`},
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		now := inFlight.Add(1)
		defer inFlight.Add(-1)
		for {
			p := peak.Load()
			if now <= p || peak.CompareAndSwap(p, now) {
				break
			}
		}
		b := new(bytes.Buffer)
		_, _ = b.ReadFrom(r.Body)
		mu.Lock()
		bodies[b.String()]++
		mu.Unlock()
		// Give the other senders time to be in flight too.
		time.Sleep(2 * time.Millisecond)
		a := answers[(n.Add(1)-1)%int64(len(answers))]
		w.WriteHeader(a.status)
		_, _ = w.Write([]byte(a.body))
	}))
	t.Cleanup(srv.Close)

	l, _ := runClosed(context.Background(), srv.URL, senders, 300*time.Millisecond, time.Second)
	sent := l.sent.Load()
	if sent < int64(len(answers)) || sent != n.Load() {
		t.Fatalf("sent %d, the server saw %d; want them equal and at least %d", sent, n.Load(), len(answers))
	}
	if got := peak.Load(); got != senders {
		t.Errorf("at most %d callbacks in flight, want exactly %d (one per sender)", got, senders)
	}
	if len(bodies) != 1 {
		t.Fatalf("%d different bodies, want one", len(bodies))
	}
	for b := range bodies {
		var cb struct {
			ObjectIDs []int64 `json:"object_ids"`
		}
		if err := json.Unmarshal([]byte(b), &cb); err != nil || len(cb.ObjectIDs) != closedIDs {
			t.Fatalf("body %.80q: %v, %d ids; want %d", b, err, len(cb.ObjectIDs), closedIDs)
		}
		for _, id := range cb.ObjectIDs {
			if id < 0 || id >= closedIDSpace {
				t.Fatalf("id %d outside 0-%d", id, closedIDSpace-1)
			}
		}
	}
	// Each answer kind came in turn: counts differ by at most one.
	counts := map[string]int64{
		"postgres": l.durablePostgres.Load(), "spill": l.durableSpill.Load(), "memory": l.durableMemory.Load(),
		"other": l.durableOther.Load(), "shed": l.shed.Load(), "failed": l.failed.Load(),
	}
	for what, c := range counts {
		if c < sent/int64(len(answers)) || c > sent/int64(len(answers))+1 {
			t.Errorf("%s: %d of %d sent, want about a sixth: %v", what, c, sent, counts)
		}
	}
	if acc := l.accepted.Load(); acc != counts["postgres"]+counts["spill"]+counts["memory"]+counts["other"] {
		t.Errorf("accepted %d, want the sum of the durable kinds %v", acc, counts)
	}
	if l.timedOut.Load() != 0 {
		t.Errorf("timed out %d, want 0", l.timedOut.Load())
	}
}

// A callback without an answer within the client timeout is counted as
// timed out, not as failed.
func TestClosedLoopCountsTimeouts(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-release
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(release) })
	l, _ := runClosed(context.Background(), srv.URL, 2, 10*time.Millisecond, 50*time.Millisecond)
	if l.timedOut.Load() != 2 || l.sent.Load() != 2 || l.failed.Load() != 0 {
		t.Errorf("sent %d, timed out %d, failed %d; want 2, 2 and 0", l.sent.Load(), l.timedOut.Load(), l.failed.Load())
	}
}

// The baseline answers what the service's decoder accepts with 202 and the
// service's body shape, and the rest as errors.
func TestBaselineDecodesAndAnswers202(t *testing.T) {
	srv := httptest.NewServer(baselineHandler())
	t.Cleanup(srv.Close)
	tests := []struct {
		name, method, body string
		status             int
		ids                int
	}{
		{"the closed loop's body", "POST", string(encode([]int64{3, 1, 3, 2})), 202, 3},
		{"no ids", "POST", `{"object_ids":[]}`, 202, 0},
		{"another field, the slow path", "POST", `{"x":1,"object_ids":[5]}`, 202, 1},
		{"malformed", "POST", `{"object_ids":[1,`, 400, 0},
		{"not integers", "POST", `{"object_ids":["1"]}`, 400, 0},
		{"too large", "POST", `{"object_ids":[` + strings.Repeat("1,", baselineMaxBody) + `1]}`, 400, 0},
		{"wrong method", "GET", "", 405, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, err := http.NewRequest(tt.method, srv.URL+"/callback", strings.NewReader(tt.body))
			if err != nil {
				t.Fatal(err)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d, want %d", resp.StatusCode, tt.status)
			}
			if tt.status != 202 {
				return
			}
			var got struct {
				Status  string `json:"status"`
				IDs     int    `json:"ids"`
				Durable string `json:"durable"`
			}
			if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
				t.Fatal(err)
			}
			if got.Status != "accepted" || got.IDs != tt.ids || got.Durable != "none" {
				t.Errorf("body %+v, want accepted, %d ids, durable none", got, tt.ids)
			}
		})
	}
}

// The row counts as durable only when every 2xx body said postgres or
// spill and the service counted no journal failure.
func TestClosedRowDurable(t *testing.T) {
	ok := closedSummary{Accepted: 10, DurablePostgres: 8, DurableSpill: 2}
	tests := []struct {
		name     string
		sum      closedSummary
		failures float64
		want     bool
	}{
		{"postgres and spill", ok, 0, true},
		{"a journal failure", ok, 1, false},
		{"a memory answer", closedSummary{Accepted: 10, DurablePostgres: 9, DurableMemory: 1}, 0, false},
		{"an answer without the field", closedSummary{Accepted: 10, DurablePostgres: 9, DurableOther: 1}, 0, false},
	}
	for _, tt := range tests {
		if got := (closedResult{service: tt.sum, journalFailures: tt.failures}).durable(); got != tt.want {
			t.Errorf("%s: durable %v, want %v", tt.name, got, tt.want)
		}
	}
}
