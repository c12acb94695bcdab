package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// routes is the service's whole HTTP surface. Every answer, errors
// included, is JSON (but /metrics): so the GET routes check their method
// themselves rather than leaving a plain-text 405 to the mux, and "/" turns
// any other path into a JSON 404.
func routes(cfg config, pipe *pipeline, handling *answerLimiter, db *database, m *metrics, log *slog.Logger, g *guard) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/callback", handleCallback(cfg, pipe, handling, m, log))
	mux.Handle("/healthz", onlyGET(handleHealthz()))
	mux.Handle("/readyz", onlyGET(handleReadyz(db, pipe.fetcher.upstream)))
	mux.Handle("/metrics", onlyGET(handleMetrics(m)))
	mux.Handle("/", handleNotFound())
	return recoverPanics(mux, g)
}

// acceptedBody is the 202's body. Durable says where the callback was
// durable when answered: "postgres" (a committed journal row), "spill" (an
// fsynced record on this instance's disk) or "memory" (neither: a crash
// would lose it). Journaled is the older field, true for "postgres" only.
type acceptedBody struct {
	Status    string `json:"status"`
	IDs       int    `json:"ids"`
	Journaled bool   `json:"journaled"`
	Durable   string `json:"durable"`
}

// handleCallback decodes and validates a callback, has the pipeline accept
// it (which journals it) and answers 202; the lookups happen afterwards, so
// the sender never waits for the object service.
func handleCallback(cfg config, pipe *pipeline, handling *answerLimiter, m *metrics, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// last_seen is the time the callback arrived, on the service's clock.
		receivedAt := time.Now().Round(0).Truncate(time.Microsecond)
		if r.Method != http.MethodPost {
			w.Header().Set("Allow", http.MethodPost)
			m.callbacksRejected.Inc("bad_method")
			writeError(w, http.StatusMethodNotAllowed, fmt.Sprintf("method %s not allowed, use POST", r.Method))
			return
		}
		// Past the answer limit a callback is shed before its body is
		// read, so a flood of senders costs a 503 each instead of queueing
		// for the CPU.
		if !handling.enter() {
			shed(w, m, &overloaded{reason: "busy", retryAfter: time.Second})
			return
		}
		var answered time.Duration
		defer func() { handling.leave(answered) }()
		if pipe.full() {
			shed(w, m, errBacklogFull)
			return
		}
		ids, err := decodeCallback(http.MaxBytesReader(w, r.Body, cfg.maxBody), cfg.maxIDs)
		if err != nil {
			var bad *badRequest
			if !errors.As(err, &bad) {
				bad = &badRequest{http.StatusBadRequest, "bad_json", err.Error()}
			}
			m.callbacksRejected.Inc(bad.reason)
			writeError(w, bad.status, bad.msg)
			return
		}
		acc, err := pipe.accept(receivedAt, ids)
		if err != nil {
			shed(w, m, err)
			return
		}
		m.callbacksAccepted.Inc()
		m.idsReceived.Add(uint64(len(ids)))
		log.Debug("callback accepted", "journal_id", acc.journalID, "ids", len(ids), "durable", acc.durable)
		writeAccepted(w, acceptedBody{Status: "accepted", IDs: len(ids), Journaled: acc.journaled, Durable: acc.durable})
		answered = time.Since(receivedAt)
		m.answer.Observe(answered.Seconds())
	})
}

// shed answers a callback the service cannot honour now: 503 with
// Retry-After, at once.
func shed(w http.ResponseWriter, m *metrics, err error) {
	var o *overloaded
	if !errors.As(err, &o) {
		o = &overloaded{reason: "backlog_full", retryAfter: time.Second}
	}
	m.callbacksShed.Inc(o.reason)
	w.Header().Set("Retry-After", strconv.Itoa(retryAfterSeconds(o.retryAfter)))
	writeError(w, http.StatusServiceUnavailable, "cannot take this callback now ("+strings.ReplaceAll(o.reason, "_", " ")+"), retry later")
}

// onlyGET answers any method but GET and HEAD with a JSON 405 and Allow.
func onlyGET(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			writeError(w, http.StatusMethodNotAllowed, fmt.Sprintf("method %s not allowed, use GET", r.Method))
			return
		}
		next.ServeHTTP(w, r)
	})
}

func handleNotFound() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no such path %q: the service answers POST /callback, GET /healthz, GET /readyz and GET /metrics", r.URL.Path))
	})
}

func handleHealthz() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
}

// handleReadyz is 200 only while PostgreSQL is reachable and the schema is
// applied; callbacks are still accepted when it is not.
// The body also shows the object service's state, which readiness does not
// follow (see upstreamHealth).
func handleReadyz(db *database, upstream *upstreamHealth) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := db.ready(); err != nil {
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": err.Error(), "object_service": upstream.state()})
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"status": "ready", "object_service": upstream.state()})
	})
}

func handleMetrics(m *metrics) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		_, _ = m.WriteTo(w)
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status, b = http.StatusInternalServerError, []byte(`{"error":"encoding response"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

// jsonContentType is the Content-Type header of every JSON answer, built
// once: the 202 is written thousands of times a second.
var jsonContentType = []string{"application/json"}

// writeAccepted writes the 202 with the bytes json.Marshal would give
// (TestWriteAcceptedIsTheJSONEncoding), without its reflection: at 10 000
// callbacks/s encoding/json was 2% of the service's CPU. Status and
// Durable are fixed words that need no escaping.
func writeAccepted(w http.ResponseWriter, body acceptedBody) {
	b := make([]byte, 0, 96)
	b = append(b, `{"status":"`...)
	b = append(b, body.Status...)
	b = append(b, `","ids":`...)
	b = strconv.AppendInt(b, int64(body.IDs), 10)
	b = append(b, `,"journaled":`...)
	b = strconv.AppendBool(b, body.Journaled)
	b = append(b, `,"durable":"`...)
	b = append(b, body.Durable...)
	b = append(b, "\"}\n"...)
	w.Header()["Content-Type"] = jsonContentType
	w.WriteHeader(http.StatusAccepted)
	_, _ = w.Write(b)
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}
