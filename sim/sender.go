package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	mathbits "math/bits"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// sender plays the callback sender: an open loop that POSTs a callback at
// every tick of the schedule whether or not earlier ones have answered, each
// with its own client timeout, as the reference tester does. With several
// targets, callbacks go to them in turn.
type sender struct {
	targets          []string
	rate             float64
	idsMin, idsMax   int
	idSpace          int64
	seen             []uint64 // distinct's bitmap; only the run loop uses it
	unique           bool
	nextUnique       int64
	timeout          time.Duration
	duration         time.Duration
	count            int
	check            *checker
	clients          []*http.Client // callback i goes through clients[i%len]
	sentN, acceptedN atomic.Int64
	failedN, idsN    atomic.Int64
	idsAcceptedN     atomic.Int64 // ids of the callbacks answered 2xx
	// Of the first attempts: answered 503 (shed: the service said at once
	// that it cannot take the callback now), and no answer within the
	// timeout. Without retries these are the failed callbacks' reasons.
	shedN, timedOutN atomic.Int64
	firstAcceptedN   atomic.Int64 // callbacks accepted on the first attempt
	firstFailure     atomic.Value // string

	// retryFor: with it, a callback without a 2xx is tried again (after
	// Retry-After for a 503, with backoff after an error or a timeout, each
	// time on the next target) until this long after its first attempt.
	retryFor time.Duration
	// Every attempt, first ones included: how many, and how they ended.
	attemptsN, attemptsOKN, attemptsShedN atomic.Int64
	attemptsTimedOutN, attemptsOtherN     atomic.Int64
	attemptsRefusedN                      atomic.Int64 // of the other: no connection
	lastAttempt                           atomic.Int64 // unix nanoseconds of the latest attempt's start

	mu   sync.Mutex
	acks []time.Duration
}

// senderConns is the most connections the sender holds to each target,
// spread over senderShards transports: one transport's pool is guarded by
// one mutex, which at thousands of callbacks a second was a tenth of the
// sender's CPU.
const (
	senderConns  = 2048
	senderShards = 16
)

func newSender(targets []string, timeout time.Duration) *sender {
	// A pool of connections, as a real sender keeps: past it, callbacks
	// wait for a connection (counted in their answer time) instead of
	// dialing new ones, which at thousands a second cost more CPU than the
	// requests; it stays under the service's default -max-conns (2500 with
	// 20 000 descriptors), past which the service closes idle connections.
	s := &sender{targets: targets, timeout: timeout}
	for range senderShards {
		per := senderConns / senderShards
		tr := senderTransport(per, timeout)
		s.clients = append(s.clients, &http.Client{Transport: tr, Timeout: timeout})
	}
	return s
}

// ids draws the ids of the next callback: a count in [idsMin, idsMax], from
// [0, idSpace) with repeats, or never-repeating ones counting up.
func (s *sender) ids() []int64 {
	n := s.idsMin
	if s.idsMax > s.idsMin {
		n += rand.IntN(s.idsMax - s.idsMin + 1)
	}
	ids := make([]int64, n)
	for i := range ids {
		if s.unique {
			ids[i] = s.nextUnique
			s.nextUnique++
		} else {
			ids[i] = rand.Int64N(s.idSpace)
		}
	}
	return ids
}

// run sends until the duration or count is reached or ctx ends, then waits
// for the answers still outstanding. It returns when the last callback was
// sent.
func (s *sender) run(ctx context.Context) (first, last time.Time) {
	var wg sync.WaitGroup
	start := time.Now()
	timer := time.NewTimer(0)
	defer timer.Stop()
	for i := 0; s.count == 0 || i < s.count; i++ {
		at := start.Add(time.Duration(float64(i) / s.rate * float64(time.Second)))
		if s.duration > 0 && at.Sub(start) >= s.duration {
			break
		}
		timer.Reset(time.Until(at))
		select {
		case <-ctx.Done():
			wg.Wait()
			return first, last
		case <-timer.C:
		}
		ids := s.ids()
		body := encode(ids)
		sendAt := time.Now()
		if first.IsZero() {
			first = sendAt
		}
		last = sendAt
		s.noteAttempt(sendAt)
		idx := s.check.sent(sendAt, s.distinct(ids))
		s.sentN.Add(1)
		s.idsN.Add(int64(len(ids)))
		wg.Add(1)
		n := len(ids)
		go func() {
			defer wg.Done()
			s.send(idx, sendAt, body, n)
		}()
	}
	wg.Wait()
	return first, last
}

// Retry pacing after an error or a timeout: full jitter over a doubling
// backoff, as webhook senders do, and the wait after a 503 without a usable
// Retry-After.
const (
	retryBackoffMin   = 250 * time.Millisecond
	retryBackoffMax   = 4 * time.Second
	retryAfterDefault = time.Second
)

// outcome is how one attempt ended.
type outcome int

const (
	outAccepted outcome = iota
	outShed             // 503: retry after Retry-After
	outTimedOut         // no answer within the timeout
	outRefused          // no connection: the service cannot have received it
	outRejected         // a 4xx: the callback itself is wrong, never retried
	outOther            // another error or status
)

// send delivers callback idx, first sent at sendAt, retrying within
// retryFor, and records the outcome.
func (s *sender) send(idx int, sendAt time.Time, body []byte, ids int) {
	deadline := sendAt.Add(s.retryFor)
	backoff := retryBackoffMin
	start := sendAt
	for attempt := 0; ; attempt++ {
		target := (idx + attempt) % len(s.targets)
		out, retryAfter, reason := s.try(idx, target, body)
		end := time.Now()
		s.check.attempt(idx, target, start, out != outRefused)
		s.mu.Lock()
		s.acks = append(s.acks, end.Sub(start))
		s.mu.Unlock()
		s.attemptsN.Add(1)
		switch out {
		case outAccepted:
			s.attemptsOKN.Add(1)
		case outShed:
			s.attemptsShedN.Add(1)
		case outTimedOut:
			s.attemptsTimedOutN.Add(1)
		default:
			s.attemptsOtherN.Add(1)
			if out == outRefused {
				s.attemptsRefusedN.Add(1)
			}
		}
		if attempt == 0 {
			switch out {
			case outAccepted:
				s.firstAcceptedN.Add(1)
			case outShed:
				s.shedN.Add(1)
			case outTimedOut:
				s.timedOutN.Add(1)
			}
		}
		if out == outAccepted {
			s.check.answered(idx, end, true)
			s.acceptedN.Add(1)
			s.idsAcceptedN.Add(int64(ids))
			return
		}
		wait := retryAfter
		if out != outShed {
			wait = backoff/2 + rand.N(backoff/2)
			backoff = min(2*backoff, retryBackoffMax)
		}
		if s.retryFor <= 0 || out == outRejected || end.Add(wait).After(deadline) {
			s.check.answered(idx, end, false)
			s.failedN.Add(1)
			s.firstFailure.CompareAndSwap(nil, reason)
			return
		}
		time.Sleep(wait)
		start = time.Now()
		s.noteAttempt(start)
	}
}

// noteAttempt records that an attempt starts at t.
func (s *sender) noteAttempt(t time.Time) {
	for {
		prev := s.lastAttempt.Load()
		if prev >= t.UnixNano() || s.lastAttempt.CompareAndSwap(prev, t.UnixNano()) {
			return
		}
	}
}

// lastAttemptAt is the start of the latest attempt (zero: none).
func (s *sender) lastAttemptAt() time.Time {
	if n := s.lastAttempt.Load(); n != 0 {
		return time.Unix(0, n)
	}
	return time.Time{}
}

// try makes one attempt of callback idx at target, and returns how it
// ended, after a 503 how long the service asked to wait, and a reason for
// the report.
func (s *sender) try(idx, target int, body []byte) (outcome, time.Duration, string) {
	resp, err := s.clients[idx%len(s.clients)].Post(s.targets[target], "application/json", bytes.NewReader(body))
	if err != nil {
		var ne net.Error
		var op *net.OpError
		switch {
		case errors.As(err, &ne) && ne.Timeout():
			return outTimedOut, 0, err.Error()
		case errors.As(err, &op) && op.Op == "dial":
			return outRefused, 0, err.Error()
		}
		return outOther, 0, err.Error()
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		return outAccepted, 0, resp.Status
	case resp.StatusCode == http.StatusServiceUnavailable:
		return outShed, retryAfter(resp.Header.Get("Retry-After")), resp.Status
	case resp.StatusCode >= 400 && resp.StatusCode < 500:
		return outRejected, 0, resp.Status
	}
	return outOther, 0, resp.Status
}

// retryAfter reads a Retry-After header in seconds; anything else (a date,
// nothing) waits retryAfterDefault.
func retryAfter(h string) time.Duration {
	if n, err := strconv.Atoi(strings.TrimSpace(h)); err == nil && n >= 0 {
		return time.Duration(n) * time.Second
	}
	return retryAfterDefault
}

// ackPercentiles returns p50, p99 and the maximum answer time.
func (s *sender) ackPercentiles() (p50, p99, maxd time.Duration) {
	s.mu.Lock()
	acks := slices.Clone(s.acks)
	s.mu.Unlock()
	if len(acks) == 0 {
		return 0, 0, 0
	}
	sort.Slice(acks, func(i, j int) bool { return acks[i] < acks[j] })
	at := func(q float64) time.Duration { return acks[min(len(acks)-1, int(q*float64(len(acks))))] }
	return at(0.50), at(0.99), acks[len(acks)-1]
}

func encode(ids []int64) []byte {
	b := make([]byte, 0, 16+len(ids)*8)
	b = append(b, `{"object_ids":[`...)
	for i, id := range ids {
		if i > 0 {
			b = append(b, ',')
		}
		b = strconv.AppendInt(b, id, 10)
	}
	return append(b, "]}"...)
}

// distinct returns the ids sorted and without repeats, as a new slice. Ids
// from a small space are marked in a bitmap and read back in order, which
// at thousands of callbacks a second costs a tenth of sorting them.
func (s *sender) distinct(ids []int64) []int64 {
	if s.unique || s.idSpace > maxBitmapSpace {
		return dedupe(ids)
	}
	words := int((s.idSpace + 63) / 64)
	if len(s.seen) < words {
		s.seen = make([]uint64, words)
	}
	for _, id := range ids {
		s.seen[id/64] |= 1 << (id % 64)
	}
	out := make([]int64, 0, len(ids))
	for w := range s.seen[:words] {
		for bits := s.seen[w]; bits != 0; bits &= bits - 1 {
			out = append(out, int64(w*64+mathbits.TrailingZeros64(bits)))
		}
		s.seen[w] = 0
	}
	return out
}

// maxBitmapSpace is the largest id space distinct marks in a bitmap (8 KiB).
const maxBitmapSpace = 1 << 16

func dedupe(ids []int64) []int64 {
	out := slices.Clone(ids)
	slices.Sort(out)
	return slices.Compact(out)
}

// senderTransport is a sender's transport: n connections to the target at
// most, all of them kept idle between callbacks, dials bounded by timeout.
func senderTransport(n int, timeout time.Duration) *http.Transport {
	return &http.Transport{
		MaxConnsPerHost:     n,
		MaxIdleConns:        n,
		MaxIdleConnsPerHost: n,
		IdleConnTimeout:     90 * time.Second,
		DialContext:         (&net.Dialer{Timeout: timeout}).DialContext,
	}
}
