package main

import (
	"encoding/json"
	"io"
)

// This file reads the object service's answer, {"id": 7, "online": true},
// a few dozen bytes, into a buffer its fetch worker reuses, and checks it.

// answerBuf is the size of a fetch worker's answer buffer: the usual answer
// fits many times over; a larger one is read into a temporary buffer, up
// to maxAnswer.
const answerBuf = 512

// objectAnswer is the object service's answer; pointers tell a missing field
// from a zero one.
type objectAnswer struct {
	ID     *int64 `json:"id"`
	Online *bool  `json:"online"`
}

// readAnswer reads body into buf, growing past it if need be, up to
// maxAnswer bytes, as io.ReadAll(io.LimitReader(body, maxAnswer)) would,
// without allocating for a usual answer. done says body is known to be
// read to its end.
func readAnswer(body io.Reader, buf []byte) (b []byte, done bool, err error) {
	n := 0
	for {
		if n == maxAnswer {
			return buf[:n], false, nil
		}
		if n == len(buf) {
			buf = append(buf, make([]byte, min(max(2*len(buf), answerBuf), maxAnswer)-len(buf))...)
		}
		m, err := body.Read(buf[n:])
		n += m
		if err == io.EOF {
			return buf[:n], true, nil
		}
		if err != nil {
			return buf[:n], false, err
		}
	}
}

// parseAnswer reads an answer exactly as json.Unmarshal into objectAnswer
// does, and ok says both fields were there. The usual shape (the two
// fields, in either order, with whitespace anywhere JSON allows it) is read
// by hand: encoding/json's reflection cost 4 allocations per fetch and 2%
// of the fetch path's CPU. Anything else, from escapes and other fields to
// invalid JSON, goes to json.Unmarshal, which has the last word.
func parseAnswer(b []byte) (id int64, online, ok bool) {
	if id, online, ok := parseUsualAnswer(b); ok {
		return id, online, true
	}
	var a objectAnswer
	if err := json.Unmarshal(b, &a); err != nil || a.ID == nil || a.Online == nil {
		return 0, false, false
	}
	return *a.ID, *a.Online, true
}

// parseUsualAnswer reads {"id":N,"online":B} or {"online":B,"id":N} with
// optional whitespace, N an integer of at most 18 digits (so it cannot
// overflow); ok is false for anything else, which is left to encoding/json.
func parseUsualAnswer(b []byte) (id int64, online, ok bool) {
	p := answerParser{b: b}
	p.space()
	if !p.byte('{') {
		return 0, false, false
	}
	var haveID, haveOnline bool
	for i := 0; i < 2; i++ {
		if i == 1 && !p.byte(',') {
			return 0, false, false
		}
		p.space()
		switch {
		case !haveID && p.literal(`"id"`):
			haveID = p.colon() && p.int(&id)
			if !haveID {
				return 0, false, false
			}
		case !haveOnline && p.literal(`"online"`):
			haveOnline = p.colon() && p.bool(&online)
			if !haveOnline {
				return 0, false, false
			}
		default:
			return 0, false, false
		}
		p.space()
	}
	if !p.byte('}') {
		return 0, false, false
	}
	p.space()
	return id, online, p.i == len(p.b)
}

// answerParser walks an answer; every method consumes what it matched and
// nothing otherwise.
type answerParser struct {
	b []byte
	i int
}

// space skips JSON whitespace.
func (p *answerParser) space() {
	for p.i < len(p.b) {
		switch p.b[p.i] {
		case ' ', '\t', '\n', '\r':
			p.i++
		default:
			return
		}
	}
}

func (p *answerParser) byte(c byte) bool {
	if p.i < len(p.b) && p.b[p.i] == c {
		p.i++
		return true
	}
	return false
}

func (p *answerParser) literal(s string) bool {
	if len(p.b)-p.i >= len(s) && string(p.b[p.i:p.i+len(s)]) == s {
		p.i += len(s)
		return true
	}
	return false
}

// colon reads the ':' after a key, with the whitespace around it.
func (p *answerParser) colon() bool {
	p.space()
	ok := p.byte(':')
	p.space()
	return ok
}

// int reads -?(0|[1-9][0-9]*) of at most 18 digits. A fraction or an
// exponent after it is no ',' or '}', so the usual shape fails there.
func (p *answerParser) int(v *int64) bool {
	neg := p.byte('-')
	start := p.i
	var n int64
	for p.i < len(p.b) && '0' <= p.b[p.i] && p.b[p.i] <= '9' {
		n = n*10 + int64(p.b[p.i]-'0')
		p.i++
	}
	digits := p.i - start
	if digits == 0 || digits > 18 || (digits > 1 && p.b[start] == '0') {
		return false
	}
	if neg {
		n = -n
	}
	*v = n
	return true
}

func (p *answerParser) bool(v *bool) bool {
	switch {
	case p.literal("true"):
		*v = true
	case p.literal("false"):
		*v = false
	default:
		return false
	}
	return true
}
