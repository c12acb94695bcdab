package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"time"
)

// routes is the service's whole HTTP surface.
func routes(cfg config, pipe *pipeline, store *Store, m *metrics, log *slog.Logger, g *guard) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/callback", handleCallback(cfg, pipe, store, m, log))
	mux.Handle("GET /healthz", handleHealthz())
	mux.Handle("GET /readyz", handleReadyz(store))
	mux.Handle("GET /metrics", handleMetrics(m))
	return recoverPanics(mux, g)
}

type acceptedBody struct {
	Status    string `json:"status"`
	IDs       int    `json:"ids"`
	Journaled bool   `json:"journaled"`
}

// handleCallback decodes and validates a callback, journals it and answers
// 202; the lookups happen afterwards, so the sender never waits for the
// object service. When the journal cannot be written in time the callback is
// still accepted, into memory only: availability comes first.
func handleCallback(cfg config, pipe *pipeline, store *Store, m *metrics, log *slog.Logger) http.Handler {
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
		cb := newCallback(receivedAt, ids)
		if err := pipe.admit(cb, false); err != nil {
			m.callbacksRejected.Inc("backlog_full")
			w.Header().Set("Retry-After", "1")
			writeError(w, http.StatusServiceUnavailable, "too many callbacks in progress, retry later")
			return
		}
		// A sender that hangs up must not cost the callback its journal row.
		ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), cfg.journalTimeout)
		err = store.Journal(ctx, cb)
		cancel()
		if err == nil {
			cb.journaled = true
			m.journalWrites.Inc()
		} else {
			m.journalFailures.Inc()
			store.warn("callbacks accepted into memory only, the journal is unavailable", "err", err)
		}
		pipe.start(cb)
		m.callbacksAccepted.Inc()
		m.idsReceived.Add(uint64(len(ids)))
		log.Debug("callback accepted", "journal_id", cb.id, "ids", len(ids), "journaled", cb.journaled)
		writeJSON(w, http.StatusAccepted, acceptedBody{Status: "accepted", IDs: len(ids), Journaled: cb.journaled})
	})
}

// badRequest is a rejected callback: the status, the metric reason and the
// message for the sender.
type badRequest struct {
	status int
	reason string
	msg    string
}

func (e *badRequest) Error() string { return e.msg }

type callbackBody struct {
	ObjectIDs *[]objectID `json:"object_ids"`
}

// objectID accepts only a JSON integer that fits int64: not a string, not
// null, not 1.0 or 1e3.
type objectID int64

func (id *objectID) UnmarshalJSON(b []byte) error {
	if len(b) == 0 || (b[0] != '-' && (b[0] < '0' || b[0] > '9')) {
		return &badRequest{http.StatusBadRequest, "bad_id", fmt.Sprintf("object_ids: %.40s is not an integer", b)}
	}
	n, err := strconv.ParseInt(string(b), 10, 64)
	if err != nil {
		if errors.Is(err, strconv.ErrRange) {
			return &badRequest{http.StatusBadRequest, "bad_id", fmt.Sprintf("object_ids: %.40s is out of range for a 64-bit integer", b)}
		}
		return &badRequest{http.StatusBadRequest, "bad_id", fmt.Sprintf("object_ids: %.40s is not an integer", b)}
	}
	*id = objectID(n)
	return nil
}

// decodeCallback reads {"object_ids":[...]} and returns the ids sorted and
// without duplicates. Unknown fields are ignored; anything else that is not
// exactly one JSON object with an array of integers is a *badRequest.
func decodeCallback(body io.Reader, maxIDs int) ([]int64, error) {
	dec := json.NewDecoder(body)
	var cb callbackBody
	if err := dec.Decode(&cb); err != nil {
		return nil, decodeError(err)
	}
	if _, err := dec.Token(); err != io.EOF {
		if err != nil {
			return nil, decodeError(err)
		}
		return nil, &badRequest{http.StatusBadRequest, "bad_json", "trailing data after the JSON object"}
	}
	if cb.ObjectIDs == nil {
		return nil, &badRequest{http.StatusBadRequest, "bad_json", `missing "object_ids": want {"object_ids": [1, 2, 3]}`}
	}
	raw := *cb.ObjectIDs
	if len(raw) > maxIDs {
		return nil, &badRequest{http.StatusRequestEntityTooLarge, "too_many_ids", fmt.Sprintf("%d object ids, at most %d allowed", len(raw), maxIDs)}
	}
	ids := make([]int64, len(raw))
	for i, id := range raw {
		ids[i] = int64(id)
	}
	return dedupe(ids), nil
}

func decodeError(err error) error {
	var (
		bad     *badRequest
		maxErr  *http.MaxBytesError
		syntax  *json.SyntaxError
		typeErr *json.UnmarshalTypeError
	)
	switch {
	case errors.As(err, &bad):
		return bad
	case errors.As(err, &maxErr):
		return &badRequest{http.StatusRequestEntityTooLarge, "body_too_large", fmt.Sprintf("body larger than %d bytes", maxErr.Limit)}
	case errors.Is(err, io.EOF):
		return &badRequest{http.StatusBadRequest, "bad_json", `empty body: want {"object_ids": [1, 2, 3]}`}
	case errors.Is(err, io.ErrUnexpectedEOF):
		return &badRequest{http.StatusBadRequest, "bad_json", "malformed JSON: unexpected end of body"}
	case errors.As(err, &syntax):
		return &badRequest{http.StatusBadRequest, "bad_json", fmt.Sprintf("malformed JSON at byte %d: %v", syntax.Offset, syntax)}
	case errors.As(err, &typeErr):
		if typeErr.Field == "" {
			return &badRequest{http.StatusBadRequest, "bad_json", fmt.Sprintf(`body is a JSON %s, want an object {"object_ids": [1, 2, 3]}`, typeErr.Value)}
		}
		return &badRequest{http.StatusBadRequest, "bad_json", fmt.Sprintf("%s: got a JSON %s, want an array of integers", typeErr.Field, typeErr.Value)}
	default:
		return &badRequest{http.StatusBadRequest, "bad_json", "reading body: " + err.Error()}
	}
}

func handleHealthz() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
}

// handleReadyz is 200 only while PostgreSQL is reachable and the schema is
// applied; callbacks are still accepted when it is not.
func handleReadyz(store *Store) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := store.Ready(); err != nil {
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

// recoverPanics turns a panic in a handler into a logged, counted 500
// instead of a dropped connection.
func recoverPanics(next http.Handler, g *guard) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				g.panicked("http "+r.Method+" "+r.URL.Path, v)
				writeError(w, http.StatusInternalServerError, "internal error")
			}
		}()
		next.ServeHTTP(w, r)
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
