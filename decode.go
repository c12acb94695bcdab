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
		i = valueEnd(raw, i)
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

// valueEnd returns the index just past the JSON value that starts at
// raw[i], an element of a valid array: only strings (which may hold any
// byte) and nested arrays and objects need care.
func valueEnd(raw []byte, i int) int {
	depth, inString := 0, false
	for ; i < len(raw); i++ {
		switch c := raw[i]; {
		case inString:
			if c == '\\' {
				i++ // the escaped byte cannot end the string
			} else if c == '"' {
				inString = false
				if depth == 0 {
					return i + 1
				}
			}
		case c == '"':
			inString = true
		case c == '[' || c == '{':
			depth++
		case c == ']' || c == '}':
			if depth == 0 {
				return i // the end of the enclosing array
			}
			if depth--; depth == 0 {
				return i + 1
			}
		case depth == 0 && (c == ',' || isSpace(c)):
			return i
		}
	}
	return i
}

// maxTokenShown is how much of a bad id an error quotes: enough to find it
// in the body, little enough to keep the answer one short line.
const maxTokenShown = 40

func notInteger(tok []byte) error {
	shown := string(tok)
	if len(tok) > maxTokenShown {
		shown = string(tok[:maxTokenShown]) + "..."
	}
	return &badRequest{http.StatusBadRequest, "bad_id", fmt.Sprintf("object_ids: %s is not an integer", shown)}
}

// parseID reads one array element as an int64; anything but a JSON integer
// (a string, a fraction, an exponent, null, a nested value) is rejected.
func parseID(tok []byte) (int64, error) {
	neg := tok[0] == '-'
	digits := tok
	if neg {
		digits = tok[1:]
	}
	if len(digits) == 0 {
		return 0, notInteger(tok)
	}
	limit := uint64(math.MaxInt64)
	if neg {
		limit++
	}
	var n uint64
	for _, c := range digits {
		if c < '0' || c > '9' {
			return 0, notInteger(tok)
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
