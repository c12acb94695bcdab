package main

import (
	"encoding/json"
	"errors"
	"slices"
	"strconv"
	"strings"
	"testing"
)

func TestDecodeCallbackAccepts(t *testing.T) {
	tests := []struct {
		name, body string
		want       []int64
	}{
		{"empty list", `{"object_ids": []}`, []int64{}},
		{"duplicates removed and sorted", `{"object_ids": [3, 1, 3, 2, 1]}`, []int64{1, 2, 3}},
		{"unknown fields ignored", `{"sender": "x", "object_ids": [5], "extra": {"a": [1]}}`, []int64{5}},
		{"extremes", `{"object_ids": [-9223372036854775808, 9223372036854775807, 0, -1]}`, []int64{-9223372036854775808, -1, 0, 9223372036854775807}},
		{"whitespace around", " \n{\"object_ids\":[7]}\n ", []int64{7}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := decodeCallback(strings.NewReader(tt.body), 10)
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("ids %v, want %v", got, tt.want)
			}
		})
	}
}

// FuzzDecodeCallback: the decoder never panics, accepts only valid JSON,
// returns sorted unique ids within the limit, rejects with a 4xx, and agrees
// with encoding/json plus strconv about which ids a body holds.
func FuzzDecodeCallback(f *testing.F) {
	for _, s := range []string{
		`{"object_ids":[1,2,3]}`, `{"object_ids":[]}`, `{"object_ids":[1.5]}`, `{"object_ids":["1"]}`,
		`{"object_ids":[9223372036854775807,-9223372036854775808]}`, `{"object_ids":[1]} x`, `[]`, ``, `{`,
		`{"object_ids":[null]}`, `{"a":{"b":[1,{"c":"\u00e9"}]},"object_ids":[4,4]}`,
		// Near misses of the fast path's one shape.
		`{"object_ids":[01]}`, `{"object_ids":[-]}`, `{"object_ids":[1,]}`, `{"object_ids":[1 2]}`,
		`{"object_ids":[1]}}`, `{"object_ids":[1],"object_ids":[2]}`, `{"OBJECT_IDS":[3]}`, `{"object_ids":[-0, 1e2]}`,
		`{"object_ids":[9223372036854775808]}`, ` { "object_ids" : [ 5 , 6 ] } `,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		ids, err := decodeCallback(strings.NewReader(string(body)), 50)
		if err != nil {
			var bad *badRequest
			if !errors.As(err, &bad) || bad.status < 400 || bad.status > 499 || bad.msg == "" {
				t.Fatalf("error %v is not a 4xx badRequest", err)
			}
			return
		}
		if !json.Valid(body) {
			t.Fatalf("accepted invalid JSON %q", body)
		}
		if len(ids) > 50 || !slices.IsSorted(ids) || len(slices.Compact(slices.Clone(ids))) != len(ids) {
			t.Fatalf("ids %v: want sorted, unique, at most 50", ids)
		}
		var ref struct {
			ObjectIDs []json.Number `json:"object_ids"`
		}
		dec := json.NewDecoder(strings.NewReader(string(body)))
		dec.UseNumber()
		if err := dec.Decode(&ref); err != nil {
			t.Fatalf("accepted %q, which encoding/json rejects: %v", body, err)
		}
		var want []int64
		for _, n := range ref.ObjectIDs {
			id, err := strconv.ParseInt(string(n), 10, 64)
			if err != nil {
				t.Fatalf("accepted %q with id %s: %v", body, n, err)
			}
			want = append(want, id)
		}
		slices.Sort(want)
		if want = slices.Compact(want); !slices.Equal(ids, want) && len(ids)+len(want) > 0 {
			t.Fatalf("%q: ids %v, encoding/json says %v", body, ids, want)
		}
	})
}

// A rejected id is quoted alone in the error, however it is spelled, so the
// sender sees which element is wrong and not the rest of the array.
func TestDecodeCallbackNamesTheBadToken(t *testing.T) {
	long := `"` + strings.Repeat("y", 60) + `"`
	tests := []struct {
		name, ids, want string
	}{
		{"string", `["x", 3]`, `object_ids: "x" is not an integer`},
		{"string after ids", `[1, 2, "x", 3]`, `object_ids: "x" is not an integer`},
		{"string with an escaped quote and a comma", `["a\",b", 3]`, `object_ids: "a\",b" is not an integer`},
		{"string with a bracket", `["]", 3]`, `object_ids: "]" is not an integer`},
		{"string ending in a backslash", `["a\\", 3]`, `object_ids: "a\\" is not an integer`},
		{"numeric string", `["7"]`, `object_ids: "7" is not an integer`},
		{"object", `[{"a": [1, "]"]}, 3]`, `object_ids: {"a": [1, "]"]} is not an integer`},
		{"array", `[[1, 2], 3]`, `object_ids: [1, 2] is not an integer`},
		{"nested arrays", `[[[1], [2]], 3]`, `object_ids: [[1], [2]] is not an integer`},
		{"true", `[true, 3]`, `object_ids: true is not an integer`},
		{"null", `[1, null]`, `object_ids: null is not an integer`},
		{"fraction", `[1, 2.5, 3]`, `object_ids: 2.5 is not an integer`},
		{"exponent", `[1e3 ,3]`, `object_ids: 1e3 is not an integer`},
		{"minus fraction", `[-0.5]`, `object_ids: -0.5 is not an integer`},
		{"long string cut", `[` + long + `, 3]`, `object_ids: ` + long[:maxTokenShown] + `... is not an integer`},
		{"out of range", `[9223372036854775808, 1]`, `object_ids: 9223372036854775808 is out of range for a 64-bit integer`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := decodeCallback(strings.NewReader(`{"object_ids": `+tt.ids+`}`), 10)
			var bad *badRequest
			if !errors.As(err, &bad) {
				t.Fatalf("error %v, want a *badRequest", err)
			}
			if bad.msg != tt.want || bad.reason != "bad_id" {
				t.Errorf("error %q (reason %s), want %q (bad_id)", bad.msg, bad.reason, tt.want)
			}
		})
	}
}

// The fast path takes the shape senders send and leaves every near miss to
// the full decoder; where it answers, it answers as the full decoder does.
func TestFastPathTakesOnlyTheCommonShape(t *testing.T) {
	tests := []struct {
		body string
		fast bool
	}{
		{`{"object_ids":[3,1,2]}`, true},
		{" { \"object_ids\" :\n[ -5 , 0,9223372036854775807 ] }\n", true},
		{`{"object_ids":[]}`, true},
		{`{"object_ids":[-0]}`, true},
		{`{"object_ids":[01]}`, false},
		{`{"object_ids":[1.0]}`, false},
		{`{"object_ids":[1e3]}`, false},
		{`{"object_ids":[1,]}`, false},
		{`{"object_ids":[9223372036854775808]}`, false},
		{`{"object_ids":[1],"x":1}`, false},
		{`{"x":1,"object_ids":[1]}`, false},
		{`{"object_\u0069ds":[1]}`, false},
		{`{"object_ids":[1,2,3,4,5,6,7,8,9,10,11]}`, false}, // more than the limit
		{`{"object_ids":[1]} {}`, false},
	}
	for _, tt := range tests {
		t.Run(tt.body, func(t *testing.T) {
			fast, ok := fastIDs([]byte(tt.body), 10)
			if ok != tt.fast {
				t.Fatalf("fast path taken: %v, want %v", ok, tt.fast)
			}
			if !ok {
				return
			}
			slow, err := slowIDs([]byte(tt.body), 10)
			if err != nil {
				t.Fatalf("full decoder rejects what the fast path took: %v", err)
			}
			if fast = dedupe(fast); !slices.Equal(fast, slow) {
				t.Errorf("fast path %v, full decoder %v", fast, slow)
			}
		})
	}
}
