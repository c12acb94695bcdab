package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
)

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
