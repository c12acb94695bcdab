package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"
)

// routes is the service's whole HTTP surface.
func routes(cfg config, pipe *pipeline, db *database, m *metrics, log *slog.Logger, g *guard) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/callback", handleCallback(cfg, pipe, m, log))
	mux.Handle("GET /healthz", handleHealthz())
	mux.Handle("GET /readyz", handleReadyz(db))
	mux.Handle("GET /metrics", handleMetrics(m))
	return recoverPanics(mux, g)
}

type acceptedBody struct {
	Status    string `json:"status"`
	IDs       int    `json:"ids"`
	Journaled bool   `json:"journaled"`
}

// handleCallback decodes and validates a callback, has the pipeline accept
// it (which journals it) and answers 202; the lookups happen afterwards, so
// the sender never waits for the object service.
func handleCallback(cfg config, pipe *pipeline, m *metrics, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// last_seen is the time the callback arrived, on the service's clock.
		receivedAt := time.Now().Round(0).Truncate(time.Microsecond)
		if r.Method != http.MethodPost {
			w.Header().Set("Allow", http.MethodPost)
			m.callbacksRejected.Inc("bad_method")
			writeError(w, http.StatusMethodNotAllowed, fmt.Sprintf("method %s not allowed, use POST", r.Method))
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
			m.callbacksRejected.Inc("backlog_full")
			w.Header().Set("Retry-After", "1")
			writeError(w, http.StatusServiceUnavailable, "too many callbacks in progress, retry later")
			return
		}
		m.callbacksAccepted.Inc()
		m.idsReceived.Add(uint64(len(ids)))
		log.Debug("callback accepted", "journal_id", acc.journalID, "ids", len(ids), "journaled", acc.journaled)
		writeJSON(w, http.StatusAccepted, acceptedBody{Status: "accepted", IDs: len(ids), Journaled: acc.journaled})
		m.answer.Observe(time.Since(receivedAt).Seconds())
	})
}

func handleHealthz() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
}

// handleReadyz is 200 only while PostgreSQL is reachable and the schema is
// applied; callbacks are still accepted when it is not.
func handleReadyz(db *database) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := db.ready(); err != nil {
			writeError(w, http.StatusServiceUnavailable, err.Error())
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
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

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}
