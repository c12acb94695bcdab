// Code copied from the service's decode.go by hand; TestServiceDecoderCopy
// fails when the two differ. DO NOT EDIT: change ../decode.go and copy it
// again (dedupe renamed dedupeInPlace, the service's, which sorts in place).

package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"sync"
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
	buf := bodyBuffers.Get().(*bytes.Buffer)
	defer func() {
		// A rare huge body's buffer is left to the collector rather than
		// kept for every later callback.
		if buf.Cap() <= maxPooledBody {
			bodyBuffers.Put(buf)
		}
	}()
	buf.Reset()
	if _, err := buf.ReadFrom(body); err != nil {
		return nil, decodeError(err)
	}
	if ids, ok := fastIDs(buf.Bytes(), maxIDs); ok {
		return dedupeInPlace(ids), nil
	}
	return slowIDs(buf.Bytes(), maxIDs)
}

// bodyBuffers holds the buffers bodies are read into: a callback's body is
// read whole, and at thousands of callbacks a second growing a fresh buffer
// for each was a large part of decoding.
var bodyBuffers = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// maxPooledBody is the largest buffer kept for reuse: room for a few
// thousand ids.
const maxPooledBody = 64 << 10

// fastIDs reads the one shape senders send, {"object_ids":[1,2,3]} with any
// whitespace, in a single pass. Anything else, however small the difference
// (another field, an escaped key, a bad or out-of-range element, too many
// ids), returns false and goes to slowIDs, which alone decides what is
// wrong with it; so fastIDs never rejects a body, it only accepts bodies
// that slowIDs would accept with the same ids.
func fastIDs(b []byte, maxIDs int) ([]int64, bool) {
	const key = `"object_ids"`
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return nil, false
	}
	i = skipSpace(b, i+1)
	if !bytes.HasPrefix(b[i:], []byte(key)) {
		return nil, false
	}
	i = skipSpace(b, i+len(key))
	if i >= len(b) || b[i] != ':' {
		return nil, false
	}
	i = skipSpace(b, i+1)
	if i >= len(b) || b[i] != '[' {
		return nil, false
	}
	ids := make([]int64, 0, min(maxIDs, bytes.Count(b[i:], []byte{','})+1))
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == ']' {
		i++
	} else {
		for {
			if len(ids) == maxIDs {
				return nil, false
			}
			id, end, ok := jsonInt(b, i)
			if !ok {
				return nil, false
			}
			ids = append(ids, id)
			i = skipSpace(b, end)
			if i < len(b) && b[i] == ',' {
				i = skipSpace(b, i+1)
				continue
			}
			if i < len(b) && b[i] == ']' {
				i++
				break
			}
			return nil, false
		}
	}
	i = skipSpace(b, i)
	if i >= len(b) || b[i] != '}' {
		return nil, false
	}
	return ids, skipSpace(b, i+1) == len(b)
}

// jsonInt reads a JSON integer (-?(0|[1-9][0-9]*)) that fits int64 at
// b[i:], and returns it with the index just past it.
func jsonInt(b []byte, i int) (int64, int, bool) {
	neg := i < len(b) && b[i] == '-'
	if neg {
		i++
	}
	start := i
	var n uint64
	limit := uint64(math.MaxInt64)
	if neg {
		limit++
	}
	for ; i < len(b) && b[i] >= '0' && b[i] <= '9'; i++ {
		d := uint64(b[i] - '0')
		if n > (limit-d)/10 {
			return 0, 0, false
		}
		n = n*10 + d
	}
	switch {
	case i == start, b[start] == '0' && i-start > 1:
		return 0, 0, false
	case i < len(b) && (b[i] == '.' || b[i] == 'e' || b[i] == 'E'):
		return 0, 0, false
	}
	if neg {
		return int64(-n), i, true
	}
	return int64(n), i, true
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && isSpace(b[i]) {
		i++
	}
	return i
}

// slowIDs lets encoding/json check the body and find object_ids, then reads
// the array with parseIDs.
func slowIDs(body []byte, maxIDs int) ([]int64, error) {
	dec := json.NewDecoder(bytes.NewReader(body))
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
	return dedupeInPlace(ids), nil
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
