package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"testing/iotest"
	"time"
)

// answerCases are answers for id 7 and what attempt makes of them: every
// one is also checked against encoding/json, whose verdict the hand-written
// reader must repeat exactly.
var answerCases = []struct {
	name, body string
	outcome    string
}{
	{"usual online", `{"id":7,"online":true}`, outcomeOnline},
	{"usual offline", `{"id":7,"online":false}`, outcomeOffline},
	{"fields swapped", `{"online":true,"id":7}`, outcomeOnline},
	{"whitespace everywhere", " \t\r\n{ \"id\" :\n7 , \"online\"\t: false }\n", outcomeOffline},
	{"extra field", `{"id":7,"online":true,"name":"x"}`, outcomeOnline},
	{"extra nested field", `{"meta":{"a":[1,2,{"b":null}]},"id":7,"online":true}`, outcomeOnline},
	{"key in capitals", `{"ID":7,"Online":true}`, outcomeOnline},
	{"key with a dotless i", `{"ıd":7,"online":true}`, outcomeBody},
	{"key with the Kelvin sign", `{"id":7,"online":true,"K":1}`, outcomeOnline},
	{"escaped key", `{"\u0069d":7,"online":true}`, outcomeOnline},
	{"duplicate id, last wins", `{"id":8,"id":7,"online":true}`, outcomeOnline},
	{"duplicate id, last wrong", `{"id":7,"id":8,"online":true}`, outcomeWrongID},
	{"id nulled again", `{"id":7,"id":null,"online":true}`, outcomeBody},
	{"minus zero is zero", `{"id":-0,"online":true}`, outcomeWrongID},
	{"wrong id", `{"id":8,"online":true}`, outcomeWrongID},
	{"negative id", `{"id":-7,"online":true}`, outcomeWrongID},
	{"missing online", `{"id":7}`, outcomeBody},
	{"missing id", `{"online":true}`, outcomeBody},
	{"null online", `{"id":7,"online":null}`, outcomeBody},
	{"empty object", `{}`, outcomeBody},
	{"null", `null`, outcomeBody},
	{"empty", ``, outcomeBody},
	{"array", `[7,true]`, outcomeBody},
	{"id as string", `{"id":"7","online":true}`, outcomeBody},
	{"id as float", `{"id":7.0,"online":true}`, outcomeBody},
	{"id with exponent", `{"id":7e0,"online":true}`, outcomeBody},
	{"id with leading zero", `{"id":07,"online":true}`, outcomeBody},
	{"id beyond int64", `{"id":9223372036854775808,"online":true}`, outcomeBody},
	{"id at int64's end", `{"id":9223372036854775807,"online":true}`, outcomeWrongID},
	{"online as string", `{"id":7,"online":"true"}`, outcomeBody},
	{"online as number", `{"id":7,"online":1}`, outcomeBody},
	{"online misspelt", `{"id":7,"online":tru}`, outcomeBody},
	{"truncated", `{"id":7,"online":true`, outcomeBody},
	{"trailing comma", `{"id":7,"online":true,}`, outcomeBody},
	{"trailing garbage", `{"id":7,"online":true}x`, outcomeBody},
	{"two objects", `{"id":7,"online":true}{}`, outcomeBody},
	{"single quotes", `{'id':7,'online':true}`, outcomeBody},
	{"control character in a key", "{\"i\x01d\":7,\"id\":7,\"online\":true}", outcomeBody},
	{"bad escape", `{"id":7,"online":true,"x":"\q"}`, outcomeBody},
	{"byte order mark", "\ufeff{\"id\":7,\"online\":true}", outcomeBody},
	{"invalid UTF-8 in a value", "{\"id\":7,\"online\":true,\"x\":\"\xff\"}", outcomeOnline},
	{"padded past the buffer", `{"id":7,` + strings.Repeat(" ", 3*answerBuf) + `"online":true}`, outcomeOnline},
	{"too deep", `{"x":` + strings.Repeat("[", 10001) + strings.Repeat("]", 10001) + `,"id":7,"online":true}`, outcomeBody},
	{"cut at maxAnswer", `{"id":7,` + strings.Repeat(" ", maxAnswer) + `"online":true}`, outcomeBody},
	{"spaces past maxAnswer", `{"id":7,"online":true}` + strings.Repeat(" ", maxAnswer), outcomeOnline},
	{"padded to maxAnswer", `{"id":7,"online":true}` + strings.Repeat(" ", maxAnswer-22), outcomeOnline},
}

// jsonVerdict is what attempt made of an answer body before parseAnswer:
// encoding/json into objectAnswer, after the read limit.
func jsonVerdict(body []byte) (id int64, online, ok bool) {
	var a objectAnswer
	if err := json.Unmarshal(body[:min(len(body), maxAnswer)], &a); err != nil || a.ID == nil || a.Online == nil {
		return 0, false, false
	}
	return *a.ID, *a.Online, true
}

func TestAnswerIsCheckedAsEncodingJSONWould(t *testing.T) {
	var bodies []string
	for _, tt := range answerCases {
		bodies = append(bodies, tt.body)
	}
	// GET /{case}/objects/{id} answers the case's body.
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		i, _ := strconv.Atoi(strings.Split(r.URL.Path, "/")[1])
		fmt.Fprint(w, bodies[i])
	}))
	t.Cleanup(up.Close)
	for i, tt := range answerCases {
		t.Run(tt.name, func(t *testing.T) {
			id, online, ok := parseAnswer([]byte(tt.body[:min(len(tt.body), maxAnswer)]))
			wid, wonline, wok := jsonVerdict([]byte(tt.body))
			if id != wid || online != wonline || ok != wok {
				t.Errorf("parseAnswer(%.80q) = %d, %v, %v; encoding/json says %d, %v, %v", tt.body, id, online, ok, wid, wonline, wok)
			}
			// Through a real attempt: the upstream's path picks the case.
			p := testApp(t, testConfig(t, "-upstream", up.URL+"/"+strconv.Itoa(i)), nil)
			w := newFetchWorker(context.Background())
			t.Cleanup(w.close)
			_, outcome, err := p.fetcher.attempt(w, 7, time.Now().Add(time.Minute))
			if outcome != tt.outcome {
				t.Errorf("attempt with answer %.80q: outcome %s (%v), want %s", tt.body, outcome, err, tt.outcome)
			}
		})
	}
}

// The answer is read in pieces as the network delivers it.
func TestReadAnswerInPieces(t *testing.T) {
	body := `{"id":7,` + strings.Repeat(" ", 2*answerBuf) + `"online":true}`
	b, done, err := readAnswer(iotest.OneByteReader(strings.NewReader(body)), make([]byte, answerBuf))
	if string(b) != body || !done || err != nil {
		t.Fatalf("readAnswer = %d bytes, %v, %v; want all %d, true, nil", len(b), done, err, len(body))
	}
	b, done, err = readAnswer(iotest.TimeoutReader(strings.NewReader(body)), make([]byte, answerBuf))
	if done || err == nil {
		t.Fatalf("readAnswer of a failing reader = %d bytes, %v, %v; want an error", len(b), done, err)
	}
}

func FuzzParseAnswer(f *testing.F) {
	for _, tt := range answerCases {
		if len(tt.body) < 200 {
			f.Add([]byte(tt.body))
		}
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		id, online, ok := parseAnswer(body)
		wid, wonline, wok := jsonVerdict(body)
		if len(body) <= maxAnswer && (id != wid || online != wonline || ok != wok) {
			t.Errorf("parseAnswer(%q) = %d, %v, %v; encoding/json says %d, %v, %v", body, id, online, ok, wid, wonline, wok)
		}
	})
}

// An attempt ends at its lookup's deadline when that comes before
// -fetch-timeout, as a timeout; the worker's next attempt, on a fresh
// context, is not cut short by the one that timed out.
func TestAttemptEndsAtItsDeadlineAndTheWorkerCarriesOn(t *testing.T) {
	hang := make(chan struct{})
	t.Cleanup(func() { close(hang) })
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/1") {
			select {
			case <-hang:
			case <-r.Context().Done():
			}
			return
		}
		fmt.Fprint(w, `{"id":2,"online":true}`)
	}))
	t.Cleanup(up.Close)
	p := testApp(t, testConfig(t, "-upstream", up.URL, "-fetch-timeout", "1m"), nil)
	w := newFetchWorker(context.Background())
	t.Cleanup(w.close)
	start := time.Now()
	_, outcome, err := p.fetcher.attempt(w, 1, time.Now().Add(100*time.Millisecond))
	// Generous: the point is that it did not wait for the 1 min timeout.
	if outcome != outcomeTimeout || time.Since(start) > 30*time.Second {
		t.Fatalf("hung attempt: outcome %s (%v) after %s, want a timeout at its deadline", outcome, err, time.Since(start))
	}
	for range 3 {
		online, outcome, err := p.fetcher.attempt(w, 2, time.Now().Add(time.Minute))
		if !online || err != nil {
			t.Fatalf("attempt after a timeout: %v, %s, %v; want online", online, outcome, err)
		}
	}
}
