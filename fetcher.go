package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// fetcher asks the object service whether objects are online.
//
// One semaphore (a buffered channel) bounds the requests in flight across all
// callbacks. With coalescing on, lookups of an id that is already being
// fetched join that fetch instead of sending another request: a flight
// carries the waiters of every callback that asked for its id and hands each
// the one answer (the model is golang.org/x/sync/singleflight, without a
// goroutine per waiter).
type fetcher struct {
	client       *http.Client
	objectsURL   string // upstream + "/objects/"
	slots        *fetchSlots
	coalesce     bool
	ttl          time.Duration
	fetchTimeout time.Duration
	log          *slog.Logger
	metrics      *metrics
	guard        *guard

	mu      sync.Mutex
	flights map[int64]*flight
}

// flight is one fetch of one id, with everyone waiting for its answer.
type flight struct {
	id       int64
	deadline time.Time // the latest deadline of its waiters; guarded by fetcher.mu
	waiters  []waiter  // guarded by fetcher.mu
}

// waiter is one callback's slot for the answer about one id.
type waiter struct {
	slot *atomic.Uint32
	wg   *sync.WaitGroup
}

// Tuning of the requests to the object service.
const (
	// maxDials bounds the connections being opened at once.
	maxDials = 64
	// dialTimeout: the object service is expected close by; a dial that
	// takes longer is a failed attempt, retried.
	dialTimeout = 2 * time.Second
	// tcpKeepAlive probes idle connections, so a dead peer is noticed.
	tcpKeepAlive = 30 * time.Second
	// idleConnTimeout closes connections a quiet spell left unused.
	idleConnTimeout = 90 * time.Second
	// Answers are a few dozen bytes: small buffers keep ten thousand
	// connections cheap.
	readBufferSize  = 2048
	writeBufferSize = 1024
	// maxAnswer bounds how much of an answer is read.
	maxAnswer = 64 << 10
	// Backoff between failed attempts of one fetch, with full jitter.
	fetchRetryMin = 50 * time.Millisecond
	fetchRetryMax = 2 * time.Second
)

// newFetcher builds the fetcher. A nil transport means the tuned default.
func newFetcher(cfg config, transport http.RoundTripper, log *slog.Logger, m *metrics, g *guard) *fetcher {
	if transport == nil {
		dialer := &net.Dialer{Timeout: dialTimeout, KeepAlive: tcpKeepAlive}
		transport = newTransport(cfg, dialer.DialContext)
	}
	return &fetcher{
		client:       &http.Client{Transport: transport, Timeout: cfg.fetchTimeout},
		objectsURL:   strings.TrimRight(cfg.upstream, "/") + "/objects/",
		slots:        newFetchSlots(cfg.maxInflight, min(cfg.maxInflight, initialLimit)),
		coalesce:     cfg.coalesce,
		ttl:          cfg.ttl,
		fetchTimeout: cfg.fetchTimeout,
		log:          log,
		metrics:      m,
		guard:        g,
		flights:      make(map[int64]*flight),
	}
}

// newTransport is the one transport to the object service, tuned for many
// concurrent requests to a single host; dial opens a connection.
func newTransport(cfg config, dial func(ctx context.Context, network, addr string) (net.Conn, error)) *http.Transport {
	// A burst of new ids (a start, a takeover of many journal rows) would
	// open thousands of connections at once and take the CPU the handler
	// needs to answer in time. Bounding the dials in progress spreads them
	// out, and a request waiting for a dial often gets a connection another
	// request freed instead.
	dials := make(chan struct{}, maxDials)
	return &http.Transport{
		Proxy: http.ProxyFromEnvironment,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			select {
			case dials <- struct{}{}:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			defer func() { <-dials }()
			return dial(ctx, network, addr)
		},
		// Every fetch slot may hold a connection; with the default of 2
		// idle connections per host almost every request would dial.
		MaxIdleConns:        cfg.maxInflight,
		MaxIdleConnsPerHost: cfg.maxInflight,
		// Idle and dialing connections count too: without this cap, a
		// request that took a freed connection while its own dial was under
		// way leaves one more idle socket, and the total can grow past the
		// open-file limit that -max-inflight was sized to.
		MaxConnsPerHost:       cfg.maxInflight,
		IdleConnTimeout:       idleConnTimeout,
		TLSHandshakeTimeout:   dialTimeout,
		ResponseHeaderTimeout: cfg.fetchTimeout,
		DisableCompression:    true,
		ReadBufferSize:        readBufferSize,
		WriteBufferSize:       writeBufferSize,
	}
}

// lookupAll starts a lookup of every id of cb; wg is done once each has a
// result: an answer, resultExpired once the callback's deadline passed, or
// resultAborted when ctx ends. It returns when the last lookup has started,
// which waits for semaphore slots.
func (f *fetcher) lookupAll(ctx context.Context, cb *callback, wg *sync.WaitGroup) {
	wg.Add(len(cb.objectIDs))
	deadline := cb.receivedAt.Add(f.ttl)
	for i, id := range cb.objectIDs {
		f.lookup(ctx, id, deadline, waiter{slot: &cb.results[i], wg: wg})
	}
}

// lookup joins the flight for id or starts one. Starting one waits for a
// semaphore slot, which is what holds back a flood of new ids.
func (f *fetcher) lookup(ctx context.Context, id int64, deadline time.Time, w waiter) {
	fl := &flight{id: id, deadline: deadline, waiters: []waiter{w}}
	if f.coalesce {
		f.mu.Lock()
		if cur, ok := f.flights[id]; ok {
			cur.waiters = append(cur.waiters, w)
			if deadline.After(cur.deadline) {
				cur.deadline = deadline
			}
			f.mu.Unlock()
			f.metrics.coalesced.Inc()
			return
		}
		f.flights[id] = fl
		f.mu.Unlock()
	}
	if !f.acquire(ctx) {
		f.deliver(fl, resultAborted)
		return
	}
	go f.fetch(ctx, fl)
}

func (f *fetcher) acquire(ctx context.Context) bool {
	if !f.slots.acquire(ctx) {
		return false
	}
	f.metrics.fetchesInFlight.Add(1)
	return true
}

func (f *fetcher) release() {
	f.slots.release()
	f.metrics.fetchesInFlight.Add(-1)
}

// fetch gets the answer for fl.id, holding a semaphore slot on entry, and
// retries failed attempts with exponential backoff and full jitter until the
// latest deadline of its waiters. The slot is released while it sleeps.
func (f *fetcher) fetch(ctx context.Context, fl *flight) {
	outcome := resultAborted
	defer func() { f.deliver(fl, outcome) }()
	defer f.guard.catch("fetch")
	backoff := fetchRetryMin
	for {
		start := time.Now()
		online, kind, err := f.attempt(ctx, fl.id)
		f.release()
		f.metrics.fetches.Inc(kind)
		f.metrics.fetchLatency.Observe(time.Since(start).Seconds())
		if err == nil {
			outcome = resultOffline
			if online {
				outcome = resultOnline
			}
			return
		}
		if ctx.Err() != nil {
			return
		}
		f.log.Debug("fetch failed", "id", fl.id, "outcome", kind, "err", err)

		sleep := time.Duration(rand.Int64N(int64(backoff)) + 1)
		backoff = min(2*backoff, fetchRetryMax)
		f.mu.Lock()
		deadline := fl.deadline
		f.mu.Unlock()
		if time.Now().Add(sleep).After(deadline) {
			outcome = resultExpired
			return
		}
		f.metrics.retries.Inc()
		select {
		case <-time.After(sleep):
		case <-ctx.Done():
			return
		}
		if !f.acquire(ctx) {
			return
		}
	}
}

// deliver hands the outcome to every waiter of fl. Taking fl out of the map
// under the lock first means no waiter can join after the answer is out.
func (f *fetcher) deliver(fl *flight, r result) {
	f.mu.Lock()
	if f.coalesce && f.flights[fl.id] == fl {
		delete(f.flights, fl.id)
	}
	waiters := fl.waiters
	f.mu.Unlock()
	if r == resultExpired {
		f.metrics.idsDropped.Add(uint64(len(waiters)))
	}
	for _, w := range waiters {
		w.slot.Store(uint32(r))
		w.wg.Done()
	}
}

// Attempt outcomes, the label values of the fetch counter.
const (
	outcomeOnline    = "online"
	outcomeOffline   = "offline"
	outcomeStatus    = "bad_status"
	outcomeBody      = "bad_body"
	outcomeWrongID   = "wrong_id"
	outcomeTransport = "transport_error"
	outcomeTimeout   = "timeout"
	outcomePanic     = "panic"
)

// objectAnswer is the object service's answer; pointers tell a missing field
// from a zero one.
type objectAnswer struct {
	ID     *int64 `json:"id"`
	Online *bool  `json:"online"`
}

// attempt is one GET of one object. Only a 200 with a JSON body naming the
// id asked for counts; everything else is a failed attempt, and so is a panic
// (in a transport, say), which must not strand the flight's waiters.
func (f *fetcher) attempt(ctx context.Context, id int64) (online bool, outcome string, err error) {
	defer func() {
		if r := recover(); r != nil {
			f.guard.panicked("fetch", r)
			online, outcome, err = false, outcomePanic, fmt.Errorf("panic: %v", r)
		}
	}()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, f.objectsURL+strconv.FormatInt(id, 10), nil)
	if err != nil {
		return false, outcomeTransport, fmt.Errorf("build request: %w", err)
	}
	resp, err := f.client.Do(req)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) || isTimeout(err) {
			return false, outcomeTimeout, fmt.Errorf("get object %d: %w", id, err)
		}
		return false, outcomeTransport, fmt.Errorf("get object %d: %w", id, err)
	}
	// Reading the body to the end lets the connection be reused.
	body, readErr := io.ReadAll(io.LimitReader(resp.Body, maxAnswer))
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxAnswer))
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return false, outcomeStatus, fmt.Errorf("get object %d: status %d", id, resp.StatusCode)
	}
	if readErr != nil {
		return false, outcomeTransport, fmt.Errorf("get object %d: read body: %w", id, readErr)
	}
	var a objectAnswer
	if err := json.Unmarshal(body, &a); err != nil || a.ID == nil || a.Online == nil {
		return false, outcomeBody, fmt.Errorf("get object %d: want {\"id\":..,\"online\":..}, got %.100q", id, body)
	}
	if *a.ID != id {
		return false, outcomeWrongID, fmt.Errorf("get object %d: answer names id %d", id, *a.ID)
	}
	if *a.Online {
		return true, outcomeOnline, nil
	}
	return false, outcomeOffline, nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
