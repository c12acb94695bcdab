package main

import (
	"context"
	"math"
	runtimemetrics "runtime/metrics"
	"sync/atomic"
	"time"
)

// admission accepts only what the service can honour. A 2xx promises that
// the callback's online objects reach the table, and fresh: so a callback
// whose new ids would wait longer than -max-queue-wait for a fetch slot, at
// the fetch rate measured now, is answered 503 with Retry-After instead.
// Ids already being fetched cost nothing (they join that fetch) and are never
// a reason to shed. The decision is O(1): a queue length and a rate.
type admission struct {
	fetcher *fetcher
	limiter *fetchLimiter
	maxWait time.Duration
	metrics *metrics
}

// queueWaitShare caps -max-queue-wait at this share of the TTL: a callback
// must leave time for its own fetches (up to -fetch-timeout, with retries)
// and its write before received time + TTL.
const queueWaitShare = 5.0 / 6

func newAdmission(cfg config, f *fetcher, l *fetchLimiter, m *metrics) *admission {
	maxWait := min(cfg.maxQueueWait, time.Duration(float64(cfg.ttl)*queueWaitShare))
	return &admission{fetcher: f, limiter: l, maxWait: maxWait, metrics: m}
}

// overloaded is the answer to a callback the service cannot honour now.
type overloaded struct {
	reason     string // label of the shed counter
	retryAfter time.Duration
}

func (e *overloaded) Error() string { return "overloaded: " + e.reason }

// check decides for a callback with newIDs ids that start fetches of their
// own. The queue it weighs holds every flight promised and not yet under
// way: new, retried, taken over, and joined by other callbacks; its rate is
// the one measured while the object service answered, so a failing object
// service does not open the gate (see fetchMeter). A callback whose ids are all being fetched already waits for nothing
// and is always admitted, and so is any callback while nothing waits for a
// slot. The callback is decoded first: decoding 200 ids costs microseconds,
// and without its ids the rule above could not be kept.
func (a *admission) check(newIDs int) error {
	waiting := a.fetcher.waiting.Load()
	if waiting <= 0 {
		a.metrics.queueWait.Set(0)
		return nil
	}
	if newIDs == 0 {
		return nil
	}
	rate := a.limiter.rate()
	wait := time.Duration(float64(waiting+int64(newIDs)) / rate * float64(time.Second))
	a.metrics.queueWait.Set(wait.Seconds())
	if wait <= a.maxWait {
		return nil
	}
	return &overloaded{reason: "queue_wait", retryAfter: wait - a.maxWait}
}

// retryAfterSeconds is the Retry-After header for d: whole seconds, at
// least one.
func retryAfterSeconds(d time.Duration) int { return max(1, int(math.Ceil(d.Seconds()))) }

// answerLimiter bounds the callbacks being handled at once (read, decoded,
// journaled, not yet answered) with a limit that adapts to how long answers
// take, as the fetch limiter does for fetches (AIMD, the model is Netflix's
// concurrency-limits). Past capacity on a busy machine the answer time is
// what breaks first: every accepted callback brings lookups, applies and
// goroutines that compete with the journal writer and the handlers for the
// CPU, so acceptance must slow down before answers pass the sender's
// timeout. When more than one answer in slowShare took longer than target
// for slowTicksToCut ticks in a row, the limit drops to three quarters of
// the peak in use (at most once per cooldown); a tick with no answer over
// the target and the limit nearly used up grows it by a sixteenth. A share
// rather than the slowest answer: one answer held up by a collector pause
// must not shed the next hundred. A tick in which the process's goroutines
// waited too long for a CPU counts as slow too (see schedMeter): that wait
// comes before the handler's clock starts. A callback over the limit is shed
// before its body is read: a 503 costs microseconds.
type answerLimiter struct {
	inUse   atomic.Int64
	limit   atomic.Int64
	peak    atomic.Int64 // most in use since the last tick
	answers atomic.Int64 // answers since the last tick
	slow    atomic.Int64 // of them, those that took longer than target
	target  time.Duration
	metrics *metrics
	lastCut time.Time
	// slowTicks counts the ticks in a row with too many slow answers.
	slowTicks int
	sched     *schedMeter
}

// answerTargetShare sets the answer time the limiter keeps under: half of
// -journal-timeout, which leaves most of the sender's 1 s for the network
// and for a machine busier than this one.
const answerTargetShare = 2

// Bounds of the answer limit. At 4000 callbacks/s with 50 ms answers about
// 200 are handled at once; minHandling keeps a trickle of answers coming
// however slow the machine, maxHandling bounds what a flood can hold.
const (
	initialHandling = 1024
	minHandling     = 64
	maxHandling     = 4096
)

func newAnswerLimiter(target time.Duration, m *metrics) *answerLimiter {
	l := &answerLimiter{target: target, metrics: m, sched: newSchedMeter()}
	l.limit.Store(initialHandling)
	m.handlingLimit.Set(initialHandling)
	return l
}

// enter takes a place for one callback, or says there is none.
func (l *answerLimiter) enter() bool {
	n := l.inUse.Add(1)
	if n > l.limit.Load() {
		l.inUse.Add(-1)
		return false
	}
	atomicMax(&l.peak, n)
	return true
}

// leave gives the place back; took is the time to an answer, or 0 for a
// callback that was not accepted (a bad request, a shed one).
func (l *answerLimiter) leave(took time.Duration) {
	l.inUse.Add(-1)
	if took == 0 {
		return
	}
	l.answers.Add(1)
	if took > l.target {
		l.slow.Add(1)
	}
}

func atomicMax(v *atomic.Int64, n int64) {
	for {
		cur := v.Load()
		if n <= cur || v.CompareAndSwap(cur, n) {
			return
		}
	}
}

func (l *answerLimiter) run(ctx context.Context) {
	everyTick(ctx, limitTick, func() { l.tick(time.Now(), l.sched.starved()) })
}

// tick closes one tick: its answers, and whether the process was starved of
// CPU in it.
func (l *answerLimiter) tick(now time.Time, starved bool) {
	answers, slow := l.answers.Swap(0), l.slow.Swap(0)
	if starved {
		// Every answer of the tick was late for its sender by the time it
		// waited to be read and written.
		slow = answers
	}
	l.adjust(now, answers, slow, l.peak.Swap(l.inUse.Load()))
}

// The limit is cut when more than 1 in slowShare answers took longer than
// the target in slowTicksToCut ticks in a row: a stall of one tick (a
// checkpoint's fsync, a collector pause) ends by itself, and cutting for it
// only shed the burst that came after; overload does not end by itself.
const (
	slowShare      = 20
	slowTicksToCut = 2
	// limitCooldown is how long a cut of the answer limit is given to show
	// before the next one.
	limitCooldown = time.Second
)

// adjust applies one tick's worth of signal to the limit: answers and slow
// ones since the last tick, and the most callbacks in use.
func (l *answerLimiter) adjust(now time.Time, answers, slow, peak int64) {
	limit := l.limit.Load()
	next := limit
	if slow*slowShare > answers {
		l.slowTicks++
	} else {
		l.slowTicks = 0
	}
	switch {
	case l.slowTicks >= slowTicksToCut:
		if now.Sub(l.lastCut) >= limitCooldown {
			next = max(minHandling, min(limit, peak)*3/4)
			l.lastCut = now
		}
	case slow == 0 && peak >= limit*7/8:
		next = min(maxHandling, limit+max(1, limit/16))
	}
	if next != limit {
		l.limit.Store(next)
		l.metrics.handlingLimit.Set(next)
	}
}

// schedMeter tells whether this process is starved of CPU: whether more than
// 1 in starvedShare of its goroutines, since the last call, waited longer
// than starvedWait to run once runnable (the runtime's
// /sched/latencies:seconds). Past capacity on a machine shared with the
// sender, the wait grows before the handler starts (reading the request)
// and after it ends (writing the answer), where no answer time sees it:
// an 8000/s duplicate-heavy flood on 2 cores had 5-15% of waits over 50 ms
// and 1-5% of callbacks timed out at the sender while every answer took
// under 0.5 s by the handler's clock. A full CPU alone is not starvation:
// 200 closed-loop senders using both cores had none over 50 ms and a p99
// of 10 ms.
type schedMeter struct {
	sample []runtimemetrics.Sample
	prev   []uint64
}

const (
	starvedWait  = 40 * time.Millisecond
	starvedShare = 100
)

func newSchedMeter() *schedMeter {
	return &schedMeter{sample: []runtimemetrics.Sample{{Name: "/sched/latencies:seconds"}}}
}

// starved reads the histogram and compares it with the last call's. A
// bucket counts as long when it starts at starvedWait or later.
func (s *schedMeter) starved() bool {
	runtimemetrics.Read(s.sample)
	if s.sample[0].Value.Kind() != runtimemetrics.KindFloat64Histogram {
		return false
	}
	h := s.sample[0].Value.Float64Histogram()
	if len(s.prev) != len(h.Counts) {
		s.prev = make([]uint64, len(h.Counts))
	}
	var total, long uint64
	for i, c := range h.Counts {
		n := c - s.prev[i]
		s.prev[i] = c
		total += n
		if h.Buckets[i] >= starvedWait.Seconds() {
			long += n
		}
	}
	return long*starvedShare > total
}
