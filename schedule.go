package main

import (
	"container/heap"
	"context"
	"math/rand/v2"
	"time"
)

// This file is the fetcher's queue: every flight that waits, for a fetch
// slot or for its retry's backoff, waits here as a heap entry, not as a
// goroutine, and one dispatcher hands the free slots out earliest deadline
// first. A flight's deadline is its waiters' latest receipt time plus the
// TTL: after it the row would be reaped at once, so work that can no longer
// land by then is dropped and counted, and nothing is dropped before.
// Taken-over and retried flights are older than new ones, so they go first:
// work already promised comes before new promises.

// Where a flight is: in which heap, or out with an attempt.
const (
	flightOut   = iota // an attempt is under way (or it is being delivered)
	flightReady        // waiting for a slot, in f.ready
	flightLater        // waiting out a retry's backoff, in f.later
)

// Tuning of the queue.
const (
	// landMargin is the least time before its deadline at which an
	// attempt is still worth starting: the answer must come back and its
	// row be committed before the deadline.
	landMargin = 100 * time.Millisecond
	// expireEvery bounds how long an expired flight waits in the queue to
	// be dropped while nothing else wakes the dispatcher.
	expireEvery = time.Second
	// probeEvery paces attempts while the object service fails nearly
	// everything (upstreamHealth.down): a few probes a second find out when
	// it is back, and the waiting flights resume then, earliest deadline
	// first, instead of each retrying into a dead service.
	probeEvery = 200 * time.Millisecond
	// workerRetireEvery is how often most of the idle fetch workers are
	// told to exit, so a burst's workers go away within seconds of it,
	// while a steady load keeps about as many as it keeps busy.
	workerRetireEvery = time.Second
)

// byDeadline orders the flights waiting for a slot, earliest deadline
// (latest receipt) first.
type byDeadline []*flight

func (h byDeadline) Len() int           { return len(h) }
func (h byDeadline) Less(i, j int) bool { return h[i].latest.Before(h[j].latest) }
func (h byDeadline) Swap(i, j int)      { h[i], h[j] = h[j], h[i]; h[i].idx = i; h[j].idx = j }
func (h *byDeadline) Push(x any)        { fl := x.(*flight); fl.idx = len(*h); *h = append(*h, fl) }
func (h *byDeadline) Pop() any          { return popLast((*[]*flight)(h)) }

// byRetry orders the flights waiting out a backoff, soonest retry first.
type byRetry []*flight

func (h byRetry) Len() int           { return len(h) }
func (h byRetry) Less(i, j int) bool { return h[i].retryAt.Before(h[j].retryAt) }
func (h byRetry) Swap(i, j int)      { h[i], h[j] = h[j], h[i]; h[i].idx = i; h[j].idx = j }
func (h *byRetry) Push(x any)        { fl := x.(*flight); fl.idx = len(*h); *h = append(*h, fl) }
func (h *byRetry) Pop() any          { return popLast((*[]*flight)(h)) }

func popLast(h *[]*flight) any {
	old := *h
	fl := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	fl.idx = -1
	return fl
}

// deadline is when fl's work stops being worth doing; f.mu is held.
func (f *fetcher) deadline(fl *flight) time.Time { return fl.latest.Add(f.ttl) }

// enqueue puts new flights in the queue and wakes the dispatcher.
func (f *fetcher) enqueue(ctx context.Context, fls []*flight) {
	if len(fls) == 0 {
		return
	}
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		for _, fl := range fls {
			f.deliver(ctx, fl, resultAborted)
		}
		return
	}
	for _, fl := range fls {
		fl.where = flightReady
		heap.Push(&f.ready, fl)
	}
	f.queued()
	f.mu.Unlock()
	f.poke()
}

// joined moves fl within the queue after a waiter with a later receipt
// joined it; f.mu is held.
func (f *fetcher) joined(fl *flight) {
	if fl.where == flightReady {
		heap.Fix(&f.ready, fl.idx)
	}
}

// retryLater queues fl again after a failed attempt, after a backoff with
// full jitter, unless its deadline comes first (resultExpired) or the queue
// is closed by shutdown (resultAborted); resultPending means queued.
func (f *fetcher) retryLater(fl *flight, minPause time.Duration) result {
	pause := max(time.Duration(rand.Int64N(int64(fl.backoff))+1), minPause)
	fl.backoff = min(2*fl.backoff, fetchRetryMax)
	now := time.Now()
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return resultAborted
	}
	if now.Add(pause).Add(landMargin).After(f.deadline(fl)) {
		f.mu.Unlock()
		return resultExpired
	}
	fl.retryAt = now.Add(pause)
	fl.where = flightLater
	heap.Push(&f.later, fl)
	f.queued()
	f.mu.Unlock()
	f.poke()
	return resultPending
}

// queued publishes the queue's length for admission; f.mu is held.
func (f *fetcher) queued() {
	n := int64(f.ready.Len() + f.later.Len())
	f.waiting.Store(n)
	f.metrics.fetchQueue.Set(n)
}

// poke wakes the dispatcher if it sleeps.
func (f *fetcher) poke() {
	select {
	case f.wake <- struct{}{}:
	default:
	}
}

// run is the dispatcher: it waits for a flight and a free slot, and starts
// an attempt for the flight with the earliest deadline. It runs until ctx
// (the pipeline's: it ends when the grace period after SIGTERM is over)
// ends, and then aborts every flight still queued.
func (f *fetcher) run(ctx context.Context) {
	defer func() {
		// Only shutdown aborts the queue: after a panic the loop restarts
		// and the queue carries on.
		if ctx.Err() != nil {
			f.abortQueued(ctx)
		}
	}()
	timer := time.NewTimer(expireEvery)
	defer timer.Stop()
	lastProbe := time.Time{}
	lastRetire := time.Now()
	for ctx.Err() == nil {
		if now := time.Now(); now.Sub(lastRetire) >= workerRetireEvery {
			lastRetire = now
			f.retireWorkers()
		}
		wait := f.promote(ctx, time.Now())
		if f.readyLen() == 0 {
			timer.Reset(wait)
			select {
			case <-ctx.Done():
			case <-f.wake:
			case <-timer.C:
			}
			continue
		}
		if f.upstream.isDown() {
			// Probing: one attempt per probeEvery.
			if next := lastProbe.Add(probeEvery); time.Now().Before(next) {
				timer.Reset(time.Until(next))
				select {
				case <-ctx.Done():
				case <-timer.C:
				}
				continue
			}
			lastProbe = time.Now()
		}
		if !f.acquire(ctx) {
			return
		}
		f.promote(ctx, time.Now())
		f.mu.Lock()
		var fl *flight
		if f.ready.Len() > 0 {
			fl = heap.Pop(&f.ready).(*flight)
			fl.where = flightOut
			f.queued()
		}
		f.mu.Unlock()
		if fl == nil {
			f.release()
			continue
		}
		f.dispatch(ctx, fl)
	}
}

// dispatch gives fl, with the slot just taken for it, to an idle fetch worker,
// or to a new one when none is idle. Workers outlive their attempts: a new
// goroutine per attempt grew its stack again each time through net/http's
// deep calls (copystack was 9% of the fetch path's CPU).
func (f *fetcher) dispatch(ctx context.Context, fl *flight) {
	select {
	case f.work <- fl:
	default:
		f.workers.Add(1)
		go f.worker(ctx, fl)
	}
}

// worker makes attempts, starting with fl, until ctx ends or the
// dispatcher retires it (a nil flight), with one answer buffer and one
// attempt timer for all of them. A panic in fetch is recovered there, so
// the worker carries on.
func (f *fetcher) worker(ctx context.Context, fl *flight) {
	defer f.workers.Add(-1)
	defer f.guard.catch("fetch worker")
	w := newFetchWorker(ctx)
	defer w.close()
	for fl != nil {
		f.fetch(ctx, fl, w)
		select {
		case fl = <-f.work:
		case <-ctx.Done():
			return
		}
	}
}

// retireWorkers tells three quarters of the idle workers (rounded up) to
// exit: after a burst of 16 384 they are down to a few dozen within 5 s
// (by halves it took 8-9 s, and the dead-object-service bench row's
// goroutines missed their 10 s to get back near idle). A
// worker starts only for a slot taken while none idles, so the workers
// without a slot are about the idle ones (a few may still be handing out an
// answer).
func (f *fetcher) retireWorkers() {
	for n := (3*(f.workers.Load()-int64(f.slots.inUse())) + 3) / 4; n > 0; n-- {
		select {
		case f.work <- nil:
		default:
			return
		}
	}
}

func (f *fetcher) readyLen() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ready.Len()
}

// promote moves the flights whose backoff is over to the ready heap, and
// drops those whose deadline is too close for an attempt to land. It
// returns how long the dispatcher may sleep before the next of these.
func (f *fetcher) promote(ctx context.Context, now time.Time) time.Duration {
	var expired []*flight
	f.mu.Lock()
	for f.later.Len() > 0 && !f.later[0].retryAt.After(now) {
		fl := heap.Pop(&f.later).(*flight)
		fl.where = flightReady
		heap.Push(&f.ready, fl)
	}
	for f.ready.Len() > 0 && now.Add(landMargin).After(f.deadline(f.ready[0])) {
		fl := heap.Pop(&f.ready).(*flight)
		fl.where = flightOut
		expired = append(expired, fl)
	}
	wait := expireEvery
	if f.later.Len() > 0 {
		wait = min(wait, f.later[0].retryAt.Sub(now))
	}
	if f.ready.Len() > 0 {
		wait = min(wait, f.deadline(f.ready[0]).Add(-landMargin).Sub(now))
	}
	f.queued()
	f.mu.Unlock()
	for _, fl := range expired {
		f.deliver(ctx, fl, resultExpired)
	}
	return max(wait, time.Millisecond)
}

// abortQueued hands every queued flight resultAborted, and every flight
// queued from now on: shutdown leaves their callbacks in the journal.
func (f *fetcher) abortQueued(ctx context.Context) {
	f.mu.Lock()
	f.closed = true
	all := append(append([]*flight(nil), f.ready...), f.later...)
	f.ready, f.later = nil, nil
	for _, fl := range all {
		fl.where = flightOut
	}
	f.queued()
	f.mu.Unlock()
	for _, fl := range all {
		f.deliver(ctx, fl, resultAborted)
	}
}
