package main

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// fetchSlots is the semaphore that bounds the fetches in flight: a buffered
// channel whose capacity is the hard cap (-max-inflight, fitted to the
// open-file limit). The limit in force is lower when the controller holds
// some of the slots itself ("parked"): it keeps a slot that a finishing
// fetch gives back instead of freeing it, and frees parked slots to raise the
// limit again. Acquiring a slot stays one channel send.
type fetchSlots struct {
	sem    chan struct{}
	parked atomic.Int64 // slots the controller holds
	want   atomic.Int64 // slots it wants to hold
}

func newFetchSlots(hardCap, limit int) *fetchSlots {
	s := &fetchSlots{sem: make(chan struct{}, hardCap)}
	s.setLimit(limit)
	return s
}

func (s *fetchSlots) acquire(ctx context.Context) bool {
	select {
	case s.sem <- struct{}{}:
		return true
	case <-ctx.Done():
		return false
	}
}

func (s *fetchSlots) release() {
	for {
		p := s.parked.Load()
		if p >= s.want.Load() {
			break
		}
		if s.parked.CompareAndSwap(p, p+1) {
			return // the slot stays taken: the limit shrinks by one
		}
	}
	<-s.sem
}

// setLimit makes n slots usable. Slots in use above a lower limit are parked
// as their fetches finish; free ones are parked at once.
func (s *fetchSlots) setLimit(n int) {
	want := int64(cap(s.sem) - max(1, min(n, cap(s.sem))))
	s.want.Store(want)
	for {
		p := s.parked.Load()
		if p <= want {
			break
		}
		if s.parked.CompareAndSwap(p, p-1) {
			<-s.sem
		}
	}
	for s.parked.Load() < want {
		select {
		case s.sem <- struct{}{}:
			s.parked.Add(1)
		default:
			return // every slot is in use: the rest are parked on release
		}
	}
}

// limit is the number of fetches allowed in flight now.
func (s *fetchSlots) limit() int { return cap(s.sem) - int(s.want.Load()) }

// inUse is the number of fetches in flight.
func (s *fetchSlots) inUse() int { return max(0, len(s.sem)-int(s.parked.Load())) }

// Tuning of the fetch concurrency controller.
const (
	// limitTick is how often the controller looks at the journal.
	limitTick = 100 * time.Millisecond
	// initialLimit is where the limit starts, so that a burst right after
	// a start (a takeover of many journal rows) cannot take the CPU before
	// the controller has seen a single commit.
	initialLimit = 1024
	// minLimit keeps fetching going however slow the journal is: fetches
	// must go on, or accepted callbacks would expire.
	minLimit = 64
	// fetchCutCooldown is the same for fetches, which take 0.3-4 s: a cut
	// shows only as fetches in flight finish, and cutting again before it
	// has would drive the limit far below what the machine sustains.
	fetchCutCooldown = 2 * time.Second
	// lagWindow is how many ticks of journal commits the controller judges
	// at once: a tick holds only a few commits under a unique-id load.
	lagWindow = 10
	// maxStep bounds the growth per tick: each slot added starts a fetch at
	// once, and a burst of thousands takes the CPU the journal needs.
	maxStep = 256
	// probeStep is the growth per tick within probeAfter of a cut, near
	// the level cut: a cut shows only after fetches in flight finish, so
	// fast growth would overshoot again first.
	probeStep  = 64
	probeAfter = 10 * time.Second
	// journalTargetShare: the limiter keeps journal commits under this
	// fraction of -journal-timeout, leaving the rest as headroom for a spike.
	journalTargetShare = 2
)

// lagMeter measures how far behind the journal is: how many batches
// committed since the last look and how many of them took longer than
// target from the receipt of their oldest callback. A write in progress for
// longer than target counts as one more slow commit: a stalled write
// commits nothing to report. Journal writer n calls begin and end around
// each batch.
type lagMeter struct {
	target  time.Duration
	commits atomic.Int64
	slow    atomic.Int64
	writing [journalWriters]atomic.Int64 // receipt of the oldest callback being written, unix ns; 0 when idle
}

// lagSample is what the lag meter saw in one look.
type lagSample struct{ commits, slow int64 }

func (m *lagMeter) begin(n int, oldest time.Time) { m.writing[n].Store(oldest.UnixNano()) }

func (m *lagMeter) end(n int, took time.Duration) {
	m.writing[n].Store(0)
	m.commits.Add(1)
	if took > m.target {
		m.slow.Add(1)
	}
}

// take returns what was seen since the last call.
func (m *lagMeter) take() lagSample {
	s := lagSample{commits: m.commits.Swap(0), slow: m.slow.Swap(0)}
	now := time.Now().UnixNano()
	for i := range m.writing {
		if since := m.writing[i].Load(); since != 0 && time.Duration(now-since) > m.target {
			s.commits++
			s.slow++
		}
	}
	return s
}

// fetchMeter measures the fetch path for admission and the limiter: how
// long a valid answer takes, how many valid answers come per second while
// flights wait for slots (the service rate when saturated), and how many
// attempts failed.
type fetchMeter struct {
	mu       sync.Mutex
	latency  float64 // moving average of an attempt with a valid answer, seconds
	answered int     // valid answers since the last tick
	slow     int     // of them, those near the time limit
	failed   int     // failed attempts since the last tick
	rate     float64 // moving average of valid answers per second while saturated
}

// Moving-average weights and the starting guesses before anything is
// measured: the object service answers in 0.3-4 s.
const (
	latencyWeight  = 0.05
	rateWeight     = 0.2
	initialLatency = time.Second
)

// observe records one attempt; ok says whether it got a valid answer, slow
// whether that answer came near the time limit (a sign of distress, like a
// failure, for the limiter). Only valid answers count toward the rate and
// the latency: a 500 that comes at once says nothing of how long an answer
// takes, and a burst of them at the start of an outage must not make the
// capacity look larger.
func (m *fetchMeter) observe(d time.Duration, ok, slow bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !ok {
		m.failed++
		return
	}
	m.answered++
	if slow {
		m.slow++
	}
	if m.latency == 0 { // the first answer replaces the guess
		m.latency = d.Seconds()
		return
	}
	m.latency += latencyWeight * (d.Seconds() - m.latency)
}

// fetchSample is what the meter saw in one tick: attempts, and of them
// those in distress (failed, or answered near the time limit).
type fetchSample struct{ attempts, failed int64 }

// tick closes one limiter tick and returns its attempts. The rate learns
// only from saturated ticks, when the answers measure capacity rather
// than demand; not while probing a failing object service, whose pace is
// set by probeEvery and says nothing of capacity.
func (m *fetchMeter) tick(saturated bool, every time.Duration) fetchSample {
	m.mu.Lock()
	defer m.mu.Unlock()
	if saturated {
		m.rate += rateWeight * (float64(m.answered)/every.Seconds() - m.rate)
	}
	s := fetchSample{attempts: int64(m.answered + m.failed), failed: int64(m.failed + m.slow)}
	m.answered, m.slow, m.failed = 0, 0, 0
	return s
}

// capacity estimates valid answers per second with limit slots: the rate
// measured, or what limit slots give at the latency measured (Little's
// law), whichever is more; the second leads while the limit grows or a
// burst's first attempts are still out.
func (m *fetchMeter) capacity(limit int) float64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	latency := m.latency
	if latency == 0 {
		latency = initialLatency.Seconds()
	}
	return max(m.rate, float64(limit)/latency)
}

// fetchLimiter adapts the fetch concurrency to what the machine sustains,
// with the journal's commit latency as the signal. The Go scheduler has no
// priorities: thousands of runnable fetch goroutines delay the goroutines
// that write a callback's journal row and answer it. Fetches wait in the
// TTL's slack; answers cannot. Judged over the last lagWindow ticks:
//   - when more than one commit in slowShare took longer than the target
//     (and more than one: a checkpoint's fsync or a collector pause slows a
//     single commit), the limit drops to three quarters of the fetches in
//     flight (multiplicative decrease);
//   - when none did and the limit is nearly used up, it grows by a
//     sixteenth per tick, or a quarter while ids wait for slots (a start, a
//     surge), never by more than maxStep, and by probeStep at most within
//     probeAfter of a cut while below 5/4 of the fetches in flight then:
//     near a level that slowed the journal, growth must be slow, but after
//     a cut to the floor (a stall) it need not be.
//
// The object service's own distress cuts the limit the same way: when more
// than failShare of the attempts of the window failed (errors, invalid
// answers, timeouts) or answered slowly (past slowAnswerShare of
// -fetch-timeout), fewer at once is what an overloaded object service
// needs. While it fails nearly everything the dispatcher only probes it
// (probeEvery), and the limit holds still.
//
// A cut shows only as the fetches in flight finish, so for fetchCutCooldown
// after one the limit neither drops nor grows. Past capacity the limit
// settles just under the fetch rate that slows the journal, and admission
// sheds what that rate cannot fetch in time.
type fetchLimiter struct {
	slots   *fetchSlots
	meter   *fetchMeter
	waiting *atomic.Int64    // ids waiting for a slot
	lag     func() lagSample // journal commits since the last call
	metrics *metrics
	// probing says whether the dispatcher only probes the object service
	// (it fails nearly everything); nil means never.
	probing func() bool
	window  [lagWindow]lagSample   // the last ticks' journal samples, a ring
	fetched [lagWindow]fetchSample // the same ticks' attempts
	tick    int
	lastCut time.Time
	cutFrom int // fetches in flight at the last cut
}

// failShare: the limit is cut when more than this share of the window's
// attempts failed. A quarter of answers failing at random (a flaky
// service) is paced by retries, not cut; most failing is overload.
const failShare = 0.5

// slowAnswerShare: a valid answer later than this share of -fetch-timeout
// counts as distress; the reference object service answers within 4 s of
// the default 5 s limit, so only its slowest few percent do.
const slowAnswerShare = 0.75

func newFetchLimiter(slots *fetchSlots, meter *fetchMeter, waiting *atomic.Int64, lag func() lagSample, m *metrics) *fetchLimiter {
	m.fetchLimit.Set(int64(slots.limit()))
	return &fetchLimiter{slots: slots, meter: meter, waiting: waiting, lag: lag, metrics: m}
}

func (l *fetchLimiter) run(ctx context.Context) {
	everyTick(ctx, limitTick, func() {
		probing := l.probing != nil && l.probing()
		f := l.meter.tick(l.waiting.Load() > 0 && !probing, limitTick)
		if probing {
			f = fetchSample{}
		}
		l.adjust(time.Now(), l.lag(), f)
	})
}

// rate is the fetch capacity now, in attempts per second.
func (l *fetchLimiter) rate() float64 { return l.meter.capacity(l.slots.limit()) }

// adjust applies one tick's sample to the limit.
func (l *fetchLimiter) adjust(now time.Time, s lagSample, f fetchSample) {
	l.window[l.tick%lagWindow] = s
	l.fetched[l.tick%lagWindow] = f
	l.tick++
	var seen lagSample
	var tried fetchSample
	for i := range l.window {
		seen.commits += l.window[i].commits
		seen.slow += l.window[i].slow
		tried.attempts += l.fetched[i].attempts
		tried.failed += l.fetched[i].failed
	}
	distress := tried.failed > 1 && float64(tried.failed) > failShare*float64(tried.attempts)
	limit, inUse := l.slots.limit(), l.slots.inUse()
	hardCap := cap(l.slots.sem)
	next := limit
	switch {
	case now.Sub(l.lastCut) < fetchCutCooldown:
	case seen.slow > 1 && seen.slow*slowShare > seen.commits, distress:
		l.cutFrom = min(limit, inUse)
		next = max(min(minLimit, hardCap), l.cutFrom*3/4)
		l.lastCut = now
	case seen.slow == 0 && !distress && inUse >= limit*7/8:
		step := limit / 16
		if l.waiting.Load() > 0 {
			step = limit / 4
		}
		if now.Sub(l.lastCut) < probeAfter && limit < l.cutFrom*5/4 {
			step = min(step, probeStep)
		}
		next = min(hardCap, limit+max(1, min(step, maxStep)))
	}
	if next != limit {
		l.slots.setLimit(next)
		l.metrics.fetchLimit.Set(int64(l.slots.limit()))
	}
}
