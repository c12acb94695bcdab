package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"time"
)

// routes is the service's whole HTTP surface.
func routes(cfg config, pipe *pipeline, store *Store, m *metrics, log *slog.Logger, g *guard) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/callback", handleCallback(cfg, pipe, m, log))
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

// badRequest is a rejected callback: the status, the metric reason and the
// message for the sender.
type badRequest struct {
	status int
	reason string
	msg    string
}

func (e *badRequest) Error() string { return e.msg }

type callbackBody struct {
	// Kept raw: encoding/json would go through reflection for every id;
	// parseIDs reads the array in one pass.
	ObjectIDs json.RawMessage `json:"object_ids"`
}

// decodeCallback reads {"object_ids":[...]} and returns the ids sorted and
// without duplicates. Unknown fields are ignored; anything else that is not
// exactly one JSON object with an array of integers that fit int64 (not a
// string, not null, not 1.0 or 1e3) is a *badRequest.
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
	raw := cb.ObjectIDs
	if len(raw) == 0 || string(raw) == "null" {
		return nil, &badRequest{http.StatusBadRequest, "bad_json", `missing "object_ids": want {"object_ids": [1, 2, 3]}`}
	}
	if raw[0] != '[' {
		return nil, &badRequest{http.StatusBadRequest, "bad_json", fmt.Sprintf("object_ids: got %.40s, want an array of integers", raw)}
	}
	ids, err := parseIDs(raw, maxIDs)
	if err != nil {
		return nil, err
	}
	return dedupe(ids), nil
}

// parseIDs reads a JSON array that the decoder has already found valid, so
// it only has to tell integers from every other kind of element.
func parseIDs(raw []byte, maxIDs int) ([]int64, error) {
	ids := make([]int64, 0, min(maxIDs, bytes.Count(raw, []byte{','})+1))
	i := 1 // after '['
	for {
		for i < len(raw) && isSpace(raw[i]) {
			i++
		}
		if raw[i] == ']' {
			return ids, nil // only an empty array gets here
		}
		start := i
		for i < len(raw) && raw[i] != ',' && raw[i] != ']' && !isSpace(raw[i]) && raw[i] != '[' && raw[i] != '{' && raw[i] != '"' {
			i++
		}
		if i == start || i < len(raw) && (raw[i] == '[' || raw[i] == '{' || raw[i] == '"') {
			return nil, &badRequest{http.StatusBadRequest, "bad_id", fmt.Sprintf("object_ids: %.40s is not an integer", raw[start:])}
		}
		if len(ids) == maxIDs {
			return nil, &badRequest{http.StatusRequestEntityTooLarge, "too_many_ids", fmt.Sprintf("more than %d object ids; at most %d allowed", maxIDs, maxIDs)}
		}
		id, err := parseID(raw[start:i])
		if err != nil {
			return nil, err
		}
		ids = append(ids, id)
		for i < len(raw) && isSpace(raw[i]) {
			i++
		}
		if raw[i] == ']' {
			return ids, nil
		}
		i++ // ','
	}
}

// parseID reads one JSON number token as an int64.
func parseID(tok []byte) (int64, error) {
	neg := tok[0] == '-'
	digits := tok
	if neg {
		digits = tok[1:]
	}
	if len(digits) == 0 {
		return 0, &badRequest{http.StatusBadRequest, "bad_id", fmt.Sprintf("object_ids: %.40s is not an integer", tok)}
	}
	limit := uint64(math.MaxInt64)
	if neg {
		limit++
	}
	var n uint64
	for _, c := range digits {
		if c < '0' || c > '9' {
			return 0, &badRequest{http.StatusBadRequest, "bad_id", fmt.Sprintf("object_ids: %.40s is not an integer", tok)}
		}
		d := uint64(c - '0')
		if n > (limit-d)/10 {
			return 0, &badRequest{http.StatusBadRequest, "bad_id", fmt.Sprintf("object_ids: %.40s is out of range for a 64-bit integer", tok)}
		}
		n = n*10 + d
	}
	if neg {
		return int64(-n), nil
	}
	return int64(n), nil
}

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

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
