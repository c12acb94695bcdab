package main

import (
	"fmt"
	"math/bits"
	"sort"
	"strings"
	"sync"
	"time"
)

// checker compares the objects table with what the sender sent. It is fed
// the callbacks as they go out and answers come back, and a snapshot of the
// table (the rows of this run's ids) at each poll. All times are wall-clock
// times of this machine, the clock the service stamps receipt times with.
type checker struct {
	ttl, reapEvery, tol, timeout time.Duration
	online                       func(id int64) bool
	// killedTarget is the index of the target a drill kills (-1: none);
	// attempts to it are recorded for the kill allowances.
	killedTarget int
	// lostExcusedBefore: an accepted callback whose receipt + TTL came
	// before it is not counted lost but lostExcused (zero: none). Set when
	// the object service fails everything for a while: work whose TTL ran
	// out during the outage cannot land.
	lostExcusedBefore time.Time

	mu       sync.Mutex
	runStart time.Time
	cbs      []*cbRecord
	ids      map[int64]*idState
	// nextLost is the first callback (in send order, so in deadline order)
	// whose lost check has not run yet.
	nextLost int
	lo, hi   int64

	errCount map[string]int
	errSeen  map[errKey]bool
	examples []string
	lostIDs  int
	lostCbs  int
	// lostExcused counts the online ids that did not land but whose TTL
	// ran out before lostExcusedBefore.
	lostExcused int
}

type cbState int

const (
	cbPending cbState = iota
	cbAccepted
	cbFailed
)

type cbRecord struct {
	sendAt time.Time
	// endAt is when the answer came, or sendAt+timeout while none has:
	// the service stamps its receipt time somewhere in [sendAt, endAt].
	endAt time.Time
	ids   []int64 // deduplicated
	state cbState
	lost  bool
	// receivedBy has a bit for each target that may have received an
	// attempt (all but refused connections): each may fetch the ids.
	receivedBy uint64
	// firstKilled and lastKilled are the starts of the first and last
	// attempts to the killed target (zero: none).
	firstKilled, lastKilled time.Time
}

type idState struct {
	cbs            []int32 // callbacks that carried the id, in send order
	latestAccepted int32   // -1 when none
	maxSeen        time.Time
}

type errKey struct {
	kind string
	id   int64
}

// Kinds of table errors.
const (
	errOffline  = "offline_stored"
	errOutlived = "outlived_ttl"
	errWrongAt  = "wrong_time"
	errFuture   = "future"
)

type row struct {
	id       int64
	lastSeen time.Time
}

func newChecker(ttl, reapEvery, tol, timeout time.Duration, online func(int64) bool, runStart time.Time) *checker {
	return &checker{
		ttl: ttl, reapEvery: reapEvery, tol: tol, timeout: timeout, online: online,
		runStart:     runStart,
		killedTarget: -1,
		ids:          map[int64]*idState{},
		errCount:     map[string]int{},
		errSeen:      map[errKey]bool{},
	}
}

// sent records a callback that is about to go out and returns its index.
func (c *checker) sent(at time.Time, ids []int64) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	idx := len(c.cbs)
	c.cbs = append(c.cbs, &cbRecord{sendAt: at, endAt: at.Add(c.timeout), ids: ids})
	for _, id := range ids {
		if len(c.ids) == 0 || id < c.lo {
			c.lo = id
		}
		if len(c.ids) == 0 || id > c.hi {
			c.hi = id
		}
		st := c.ids[id]
		if st == nil {
			st = &idState{latestAccepted: -1}
			c.ids[id] = st
		}
		st.cbs = append(st.cbs, int32(idx))
	}
	return idx
}

// attempt records one attempt to send callback idx: to which target, when
// it started, and whether the service may have received it (a refused
// connection cannot have been).
func (c *checker) attempt(idx, target int, start time.Time, received bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	cb := c.cbs[idx]
	if received {
		cb.receivedBy |= 1 << min(target, maxInstances-1)
	}
	if target == c.killedTarget {
		if cb.firstKilled.IsZero() {
			cb.firstKilled = start
		}
		cb.lastKilled = start
	}
}

// answered records the sender's outcome for callback idx.
func (c *checker) answered(idx int, at time.Time, accepted bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	cb := c.cbs[idx]
	if !accepted {
		// The service may still have received it: keep the widest window.
		cb.state = cbFailed
		return
	}
	cb.state = cbAccepted
	cb.endAt = at
	for _, id := range cb.ids {
		st := c.ids[id]
		if st.latestAccepted < 0 || c.cbs[st.latestAccepted].sendAt.Before(cb.sendAt) {
			st.latestAccepted = int32(idx)
		}
	}
}

func (c *checker) fail(kind string, id int64, format string, args ...any) {
	c.errCount[kind]++
	k := errKey{kind, id}
	if c.errSeen[k] {
		return
	}
	c.errSeen[k] = true
	if len(c.examples) < 20 {
		c.examples = append(c.examples, fmt.Sprintf("%s: id %d: %s", kind, id, fmt.Sprintf(format, args...)))
	}
}

// observe checks one snapshot of the table taken at p and records what it
// saw for the lost checks. Rows of ids this run never sent, or older than
// the run, belong to someone else and are ignored. It reports whether the
// table is exact at p: every online id whose latest accepted callback is
// still within the TTL is stored with that callback's receipt time.
func (c *checker) observe(p time.Time, rows []row) (exact bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	present := make(map[int64]time.Time, len(rows))
	for _, r := range rows {
		st := c.ids[r.id]
		if st == nil || r.lastSeen.Before(c.runStart.Add(-c.tol)) {
			continue
		}
		present[r.id] = r.lastSeen
		switch {
		case !c.online(r.id):
			c.fail(errOffline, r.id, "offline object stored (last_seen %s)", stamp(r.lastSeen))
			continue
		case r.lastSeen.After(p.Add(c.tol)):
			c.fail(errFuture, r.id, "last_seen %s is after the poll at %s", stamp(r.lastSeen), stamp(p))
		case r.lastSeen.Before(p.Add(-c.ttl - c.reapEvery - c.tol)):
			c.fail(errOutlived, r.id, "last_seen %s still stored at %s", stamp(r.lastSeen), stamp(p))
		case !c.matchesCallback(st, r.lastSeen):
			c.fail(errWrongAt, r.id, "last_seen %s is not within %s of any callback that carried it", stamp(r.lastSeen), c.tol)
		}
		if r.lastSeen.After(st.maxSeen) {
			st.maxSeen = r.lastSeen
		}
	}
	exact = true
	for id, st := range c.ids {
		if !c.online(id) || st.latestAccepted < 0 {
			continue
		}
		latest := c.cbs[st.latestAccepted]
		if latest.sendAt.Before(p.Add(-c.ttl + c.tol)) {
			continue // reaped or about to be; both are right
		}
		if ls, ok := present[id]; !ok || ls.Before(latest.sendAt.Add(-c.tol)) {
			exact = false
		}
	}
	for _, cb := range c.cbs {
		if cb.state == cbPending {
			exact = false
			break
		}
	}
	return exact
}

// matchesCallback reports whether t is within the tolerance of the receipt
// window of some callback that carried the id.
func (c *checker) matchesCallback(st *idState, t time.Time) bool {
	// Callbacks are in send order: find the last one sent no later than
	// t+tol, then walk back while their windows could still reach t.
	i := sort.Search(len(st.cbs), func(i int) bool {
		return c.cbs[st.cbs[i]].sendAt.After(t.Add(c.tol))
	}) - 1
	for ; i >= 0; i-- {
		cb := c.cbs[st.cbs[i]]
		if cb.sendAt.Before(t.Add(-c.tol - c.timeout - c.tol)) {
			break
		}
		if !t.Before(cb.sendAt.Add(-c.tol)) && !t.After(cb.endAt.Add(c.tol)) {
			return true
		}
	}
	return false
}

// checkLost runs the lost check for every accepted callback whose TTL ran
// out before upTo (the start of the latest successful poll): each of its
// online ids must have been seen in the table with its receipt time or a
// later one. A check only at the end could not see these.
func (c *checker) checkLost(upTo time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.nextLost < len(c.cbs) {
		cb := c.cbs[c.nextLost]
		// The receipt may be as late as the answer (a retry's).
		if cb.endAt.Add(c.ttl).After(upTo) {
			return
		}
		c.lostCheck(cb)
		c.nextLost++
	}
}

// finish runs the lost check for the callbacks whose TTL has not run out.
func (c *checker) finish() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for ; c.nextLost < len(c.cbs); c.nextLost++ {
		c.lostCheck(c.cbs[c.nextLost])
	}
}

func (c *checker) lostCheck(cb *cbRecord) {
	if cb.state != cbAccepted {
		return
	}
	excused := !c.lostExcusedBefore.IsZero() && cb.endAt.Add(c.ttl).Before(c.lostExcusedBefore)
	for _, id := range cb.ids {
		if !c.online(id) {
			continue
		}
		if c.ids[id].maxSeen.Before(cb.sendAt.Add(-c.tol)) {
			if excused {
				c.lostExcused++
				continue
			}
			c.lostIDs++
			if !cb.lost {
				cb.lost = true
				c.lostCbs++
				if len(c.examples) < 20 {
					c.examples = append(c.examples, fmt.Sprintf("lost: id %d of the callback sent at %s never reached the table with its time", id, stamp(cb.sendAt)))
				}
			}
		}
	}
}

// remaining counts stored rows of this run that the reaper should have
// deleted by p (the expiry check after the last callback).
func (c *checker) remaining(rows []row) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, r := range rows {
		if c.ids[r.id] != nil && !r.lastSeen.Before(c.runStart.Add(-c.tol)) {
			n++
		}
	}
	return n
}

type verdict struct {
	tableErrors int
	byKind      string
	lostIDs     int
	lostCbs     int
	lostExcused int
	examples    []string
}

func (c *checker) verdict() verdict {
	c.mu.Lock()
	defer c.mu.Unlock()
	v := verdict{lostIDs: c.lostIDs, lostCbs: c.lostCbs, lostExcused: c.lostExcused, examples: append([]string(nil), c.examples...)}
	var kinds []string
	for k, n := range c.errCount {
		v.tableErrors += n
		kinds = append(kinds, fmt.Sprintf("%s=%d", k, n))
	}
	sort.Strings(kinds)
	v.byKind = strings.Join(kinds, " ")
	return v
}

// idRange is the smallest and largest id sent so far, to bound the poll.
func (c *checker) idRange() (lo, hi int64, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lo, c.hi, len(c.ids) > 0
}

func stamp(t time.Time) string { return t.Format("15:04:05.000000") }

// failedOutsideKill counts the callbacks without a 2xx that the kill does
// not explain: one is explained when an attempt of it went to the killed
// target from a timeout before the kill (killAt) until the instance was
// back (backAt; zero: never). Without a kill every failure counts.
func (c *checker) failedOutsideKill(killAt, backAt time.Time) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, cb := range c.cbs {
		if cb.state == cbAccepted {
			continue
		}
		inWindow := !killAt.IsZero() && !cb.lastKilled.IsZero() && !cb.lastKilled.Before(killAt.Add(-c.timeout)) &&
			(backAt.IsZero() || !cb.firstKilled.After(backAt))
		if !inWindow {
			n++
		}
	}
	return n
}

// refetch judges the object service's requests per id against what a
// correct fleet may ask. How often one instance asks is its own business
// (retries after faults or timeouts); but an id may be asked by only as
// many instances as received a callback carrying it, plus one when the
// killed instance held such a callback at the kill (an attempt to it
// before killAt, sent within the TTL before it: its journal row is taken
// over by another instance). More is a double claim. Instances are told
// apart by the object-service path they ask (see idCount); without it all
// requests count as one instance's.
type refetch struct {
	histogram  map[string]int // requests per id -> ids
	refetched  int            // ids asked more than once
	multi      int            // ids asked by more than one instance
	killHeld   int            // ids allowed another instance for the kill
	over       int            // ids asked by more instances than allowed
	overIDs    []int64        // a few of them
	overWhy    []string       // for each of overIDs: who asked, where it was sent
	maxPerID   int
	foreignIDs int // ids asked that this run never sent
}

func (c *checker) refetch(counts map[int64]idCount, names []string, killAt time.Time) refetch {
	c.mu.Lock()
	defer c.mu.Unlock()
	r := refetch{histogram: map[string]int{}}
	for id, n := range counts {
		r.histogram[fmt.Sprint(n.requests)]++
		r.maxPerID = max(r.maxPerID, int(n.requests))
		if n.requests > 1 {
			r.refetched++
		}
		if n.askedByN() > 1 {
			r.multi++
		}
		st := c.ids[id]
		if st == nil {
			r.foreignIDs++
			continue
		}
		var targets uint64
		held := false
		for _, i := range st.cbs {
			cb := c.cbs[i]
			targets |= cb.receivedBy
			if !killAt.IsZero() && !cb.firstKilled.IsZero() && cb.firstKilled.Before(killAt) && !cb.sendAt.Before(killAt.Add(-c.ttl)) {
				held = true
			}
		}
		allowed := bits.OnesCount64(targets)
		if held {
			allowed++
			r.killHeld++
		}
		if n.askedByN() > allowed {
			r.over++
			if len(r.overIDs) >= 10 {
				continue
			}
			r.overIDs = append(r.overIDs, id)
			var sentTo []int
			for _, i := range st.cbs {
				for t := range maxInstances {
					if c.cbs[i].receivedBy&(1<<t) != 0 {
						sentTo = append(sentTo, t)
					}
				}
			}
			r.overWhy = append(r.overWhy, fmt.Sprintf("id %d: asked %d times by instances %v; received by targets %v",
				id, n.requests, labels(n.askedBy, names), sentTo))
		}
	}
	return r
}

// labels names the instances of an askedBy bitmask; names[bit] is the
// label of an instance.
func labels(askedBy uint64, names []string) []string {
	var out []string
	for b := range min(len(names), maxInstances) {
		if askedBy&(1<<b) != 0 {
			out = append(out, names[b])
		}
	}
	return out
}
