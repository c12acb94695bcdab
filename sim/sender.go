package main

import (
	"bytes"
	"context"
	"io"
	mathbits "math/bits"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"sort"
	"strconv"
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
	// Of the failed: answered 503 (shed: the service said at once that it
	// cannot take the callback now), and no answer within the timeout.
	shedN, timedOutN atomic.Int64
	firstFailure     atomic.Value // string

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
		tr := &http.Transport{
			MaxConnsPerHost:     per,
			MaxIdleConns:        per,
			MaxIdleConnsPerHost: per,
			IdleConnTimeout:     90 * time.Second,
			DialContext:         (&net.Dialer{Timeout: timeout}).DialContext,
		}
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

func (s *sender) send(idx int, sendAt time.Time, body []byte, ids int) {
	resp, err := s.clients[idx%len(s.clients)].Post(s.targets[idx%len(s.targets)], "application/json", bytes.NewReader(body))
	ok := false
	reason := ""
	if err != nil {
		reason = err.Error()
		if ne, isNet := err.(net.Error); isNet && ne.Timeout() {
			s.timedOutN.Add(1)
		}
	} else {
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		ok = resp.StatusCode >= 200 && resp.StatusCode < 300
		reason = resp.Status
		if resp.StatusCode == http.StatusServiceUnavailable {
			s.shedN.Add(1)
		}
	}
	end := time.Now()
	s.check.answered(idx, end, ok)
	s.mu.Lock()
	s.acks = append(s.acks, end.Sub(sendAt))
	s.mu.Unlock()
	if ok {
		s.acceptedN.Add(1)
		s.idsAcceptedN.Add(int64(ids))
		return
	}
	s.failedN.Add(1)
	s.firstFailure.CompareAndSwap(nil, reason)
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
