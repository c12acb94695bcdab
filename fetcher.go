package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// fetcher asks the object service whether objects are online, and writes
// the online ones to the table.
//
// One semaphore (a buffered channel) bounds the requests in flight across all
// callbacks. With coalescing on, lookups of an id that is already being
// fetched join that fetch instead of sending another request: every callback
// that asked for a flight's id hears its one answer (the model is
// golang.org/x/sync/singleflight, without a goroutine per waiter). A flight
// that finds its object online saves one row for all those callbacks, at the
// latest receipt time among them, before any of them hears the answer: a
// callback whose every id has an answer is applied, and only its journal
// row is left to delete.
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

	// Load, read by admission and the limiter: flights queued (waiting
	// for a slot or for a retry), and the attempts' rate and latency.
	waiting  atomic.Int64
	meter    fetchMeter
	upstream *upstreamHealth
	fd       *fdGuard

	// save upserts online objects and returns once they are committed, or
	// with errExpired when all are past the TTL, or ctx's error (the
	// writer's upsert).
	save func(ctx context.Context, rows []objectRow) error
	// Online answers waiting for save, written by one goroutine at a time
	// (started on demand) in batches: while the database is down they wait
	// here, a few words each, rather than as blocked fetch goroutines.
	smu    sync.Mutex
	toSave []pendingSave
	saving bool

	// The flights, and the queue of those waiting (schedule.go), guarded
	// by mu; wake rouses the dispatcher.
	mu      sync.Mutex
	flights map[int64]*flight
	ready   byDeadline
	later   byRetry
	closed  bool // shutdown: nothing is queued any more
	wake    chan struct{}

	// work hands a flight, with its slot, from the dispatcher to an idle
	// worker (schedule.go); workers counts the live ones.
	work    chan *flight
	workers atomic.Int64
}

// flight is one fetch of one id, with everyone waiting for its answer.
type flight struct {
	id int64
	// Guarded by fetcher.mu: latest is the latest receipt time of the
	// callbacks it answers, the last_seen its row gets, and + TTL its
	// deadline; lookups counts those callbacks; where and idx place it in
	// the queue.
	latest  time.Time
	lookups int
	where   int
	idx     int
	// Used only by whoever holds the flight out of the queue.
	retryAt time.Time
	backoff time.Duration
	// result is resultPending until the flight is settled; waiters are the
	// callbacks whose next id without a result is this one (advance).
	// Both change under wmu; result is also read without it.
	wmu     sync.Mutex
	result  atomic.Uint32
	waiters []*callback
}

// Tuning of the requests to the object service.
const (
	// maxAnswer bounds how much of an answer is read.
	maxAnswer = 64 << 10
	// Backoff between failed attempts of one fetch, with full jitter.
	fetchRetryMin = 50 * time.Millisecond
	fetchRetryMax = 2 * time.Second
)

// newFetcher builds the fetcher, which saves online objects through save.
// A nil transport means the tuned default.
func newFetcher(cfg config, transport http.RoundTripper, save func(context.Context, []objectRow) error, log *slog.Logger, m *metrics, g *guard) *fetcher {
	if transport == nil {
		dialer := &net.Dialer{Timeout: dialTimeout, KeepAlive: tcpKeepAlive}
		transport = newTransport(cfg, dialer.DialContext)
	}
	return &fetcher{
		client:       &http.Client{Transport: transport}, // timed by fetchWorker
		objectsURL:   strings.TrimRight(cfg.upstream, "/") + "/objects/",
		slots:        newFetchSlots(cfg.maxInflight, min(cfg.maxInflight, initialLimit)),
		coalesce:     cfg.coalesce,
		ttl:          cfg.ttl,
		fetchTimeout: cfg.fetchTimeout,
		log:          log,
		metrics:      m,
		guard:        g,
		flights:      make(map[int64]*flight),
		wake:         make(chan struct{}, 1),
		work:         make(chan *flight),
		upstream:     newUpstreamHealth(cfg.upstream, log, m, g),
		fd:           newFDGuard(fdFetch, log, m),
		save:         save,
	}
}

// lookupAll starts a lookup of every id of cb; done is called once each has
// a result (an answer, resultExpired once the deadline passed, or
// resultAborted at shutdown), by whoever hands out the last one. Ids
// already being fetched join that flight (when coalescing); the rest become
// flights at once, so that later callbacks see them, and go into the
// queue, where the dispatcher gives them a slot in deadline order. It never
// blocks on the object service, and nothing waits for the lookups: a
// callback costs no goroutine while its flights are out, and it waits on
// one flight at a time, not on each (see advance).
func (f *fetcher) lookupAll(ctx context.Context, cb *callback, done func()) {
	cb.whenDone = done
	cb.flights = make([]*flight, len(cb.objectIDs))
	var starts []*flight // most ids of a busy service join a flight: grown as needed
	joined := 0
	f.mu.Lock()
	for i, id := range cb.objectIDs {
		if cur, ok := f.flights[id]; ok && f.coalesce {
			cb.flights[i] = cur
			cur.lookups++
			if cb.receivedAt.After(cur.latest) {
				cur.latest = cb.receivedAt
				f.joined(cur)
			}
			joined++
			continue
		}
		fl := &flight{id: id, latest: cb.receivedAt, lookups: 1, idx: -1, backoff: fetchRetryMin}
		cb.flights[i] = fl
		if f.coalesce {
			f.flights[id] = fl
		}
		starts = append(starts, fl)
	}
	f.mu.Unlock()
	f.metrics.coalesced.Add(uint64(joined))
	f.enqueue(ctx, starts)
	advance(cb)
}

// advance records the results of cb's settled flights from cb.next on, and
// at the first unsettled one adds cb to its waiters and returns: settle
// advances it again. Flights settle in no order, so a callback of n ids is
// woken about ln(n) times (the times a flight settles after all before it
// in cb's order), not n; at 9 000 callbacks/s of 86 distinct ids a waiter
// per id was 15% of the service's CPU. Only one goroutine advances a
// callback at a time: the one that took it from a flight's waiters (or
// lookupAll, before it is in any).
func advance(cb *callback) {
	for cb.next < len(cb.flights) {
		fl := cb.flights[cb.next]
		r := result(fl.result.Load())
		if r == resultPending {
			fl.wmu.Lock()
			if r = result(fl.result.Load()); r == resultPending {
				fl.waiters = append(fl.waiters, cb)
				fl.wmu.Unlock()
				return
			}
			fl.wmu.Unlock()
		}
		cb.results[cb.next].Store(uint32(r))
		cb.next++
	}
	cb.flights = nil // they may be collected once settled
	cb.whenDone()
}

// settle gives fl its result and advances the callbacks waiting on it.
func settle(fl *flight, r result) {
	fl.wmu.Lock()
	fl.result.Store(uint32(r))
	waiters := fl.waiters
	fl.waiters = nil
	fl.wmu.Unlock()
	for _, cb := range waiters {
		advance(cb)
	}
}

// countNew counts the ids that would start a fetch of their own now: an id
// already being fetched costs nothing more.
func (f *fetcher) countNew(ids []int64) int {
	if !f.coalesce {
		return len(ids)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, id := range ids {
		if _, ok := f.flights[id]; !ok {
			n++
		}
	}
	return n
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

// fetch makes one attempt for fl, holding a semaphore slot on entry, and
// hands the answer to its waiters, or queues it for a retry after a backoff
// with full jitter while its deadline allows.
func (f *fetcher) fetch(ctx context.Context, fl *flight, w *fetchWorker) {
	outcome := resultAborted
	defer func() {
		if outcome != resultPending {
			f.deliver(ctx, fl, outcome)
		}
	}()
	defer f.guard.catch("fetch")
	f.mu.Lock()
	deadline := f.deadline(fl)
	f.mu.Unlock()
	start := time.Now()
	online, kind, err := f.attempt(w, fl.id, deadline)
	took := time.Since(start)
	f.release()
	f.meter.observe(took, err == nil, took > time.Duration(slowAnswerShare*float64(f.fetchTimeout)))
	f.metrics.fetches.Inc(kind)
	f.metrics.fetchLatency.Observe(took.Seconds())
	// Running out of file descriptors is not the object service's fault,
	// and retrying at once would only spin.
	exhausted := f.fd.note(err)
	if ctx.Err() == nil && !exhausted {
		f.upstream.record(err)
	}
	switch {
	case err == nil && online:
		outcome = resultOnline
	case err == nil:
		outcome = resultOffline
	case ctx.Err() != nil:
		outcome = resultAborted
	default:
		f.log.Debug("fetch failed", "id", fl.id, "outcome", kind, "err", err)
		var minPause time.Duration
		if exhausted {
			minPause = fdPause()
		}
		outcome = f.retryLater(fl, minPause)
		if outcome == resultPending {
			f.metrics.retries.Inc()
		}
	}
}

// deliver settles fl with the outcome; an online one is saved first.
// Taking fl out of the map under the lock first means no callback can join
// after the answer is out, so the row is saved at the latest receipt time
// of exactly the callbacks that hear it.
func (f *fetcher) deliver(ctx context.Context, fl *flight, r result) {
	f.mu.Lock()
	if f.coalesce && f.flights[fl.id] == fl {
		delete(f.flights, fl.id)
	}
	latest, lookups := fl.latest, fl.lookups
	f.mu.Unlock()
	switch r {
	case resultOnline:
		f.queueSave(ctx, pendingSave{objectRow{fl.id, latest}, fl, lookups})
		return
	case resultExpired:
		f.dropped(lookups, "lookups given up: no answer from the object service before received time + TTL", "object_service", f.upstream.url)
	}
	settle(fl, r)
}

// dropped counts and logs (rate-limited) ids whose lookups expired.
func (f *fetcher) dropped(n int, msg string, args ...any) {
	f.metrics.idsDropped.Add(uint64(n))
	f.guard.warn(msg, append([]any{"ids", n, "ids_dropped_total", f.metrics.idsDropped.Value()}, args...)...)
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

// errAttemptTimeout ends an attempt that reached -fetch-timeout or its
// lookup's deadline.
var errAttemptTimeout = fmt.Errorf("fetch attempt timed out: %w", context.DeadlineExceeded)

// fetchWorker is what a fetch worker keeps from one attempt to the next:
// the answer buffer, and a context that its one timer cancels when an
// attempt runs out of time. A context and a timer of their own for each
// attempt (the http.Client's Timeout) cost 15% of the fetch path's
// instructions. The context is replaced only after a timeout.
type fetchWorker struct {
	parent context.Context
	ctx    context.Context
	cancel context.CancelCauseFunc
	timer  *time.Timer
	buf    []byte
}

// newFetchWorker is a worker's state; its attempts end with parent too.
func newFetchWorker(parent context.Context) *fetchWorker {
	w := &fetchWorker{parent: parent, buf: make([]byte, answerBuf)}
	w.renew()
	return w
}

// renew makes a fresh context and its timer, disarmed. The timer's
// function cancels the context it was made with, never a later one.
func (w *fetchWorker) renew() {
	ctx, cancel := context.WithCancelCause(w.parent)
	w.ctx, w.cancel = ctx, cancel
	w.timer = time.AfterFunc(time.Hour, func() { cancel(errAttemptTimeout) })
	w.timer.Stop()
}

// arm returns the context for an attempt that must end within d.
func (w *fetchWorker) arm(d time.Duration) context.Context {
	w.timer.Reset(d)
	return w.ctx
}

// disarm ends an attempt's clock. A timer that already fired has cancelled
// (or is about to cancel) the context, so the next attempt gets a new one.
func (w *fetchWorker) disarm() {
	if !w.timer.Stop() {
		w.renew()
	}
}

// close releases the worker's context from its parent.
func (w *fetchWorker) close() {
	w.timer.Stop()
	w.cancel(nil)
}

// attempt is one GET of one object. Only a 200 with a JSON body naming the
// id asked for counts; everything else is a failed attempt, and so is a panic
// (in a transport, say), which must not strand the flight's waiters.
// It runs on worker w.
func (f *fetcher) attempt(w *fetchWorker, id int64, deadline time.Time) (online bool, outcome string, err error) {
	defer func() {
		if r := recover(); r != nil {
			f.guard.panicked("fetch", r)
			online, outcome, err = false, outcomePanic, fmt.Errorf("panic: %v", r)
		}
	}()
	// An answer after the deadline is worthless: the attempt ends there,
	// or after -fetch-timeout, whichever comes first, reading the answer
	// included.
	ctx := w.arm(min(f.fetchTimeout, time.Until(deadline)))
	defer w.disarm()
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
	body, done, readErr := readAnswer(resp.Body, w.buf)
	if !done {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxAnswer))
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return false, outcomeStatus, fmt.Errorf("get object %d: status %d", id, resp.StatusCode)
	}
	if readErr != nil {
		return false, outcomeTransport, fmt.Errorf("get object %d: read body: %w", id, readErr)
	}
	named, online, ok := parseAnswer(body)
	if !ok {
		return false, outcomeBody, fmt.Errorf("get object %d: want {\"id\":..,\"online\":..}, got %.100q", id, body)
	}
	if named != id {
		return false, outcomeWrongID, fmt.Errorf("get object %d: answer names id %d", id, named)
	}
	if online {
		return true, outcomeOnline, nil
	}
	return false, outcomeOffline, nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
