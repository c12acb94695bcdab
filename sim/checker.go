package main

import (
	"fmt"
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
		runStart: runStart,
		ids:      map[int64]*idState{},
		errCount: map[string]int{},
		errSeen:  map[errKey]bool{},
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
		if cb.sendAt.Add(c.ttl).After(upTo) {
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
	for _, id := range cb.ids {
		if !c.online(id) {
			continue
		}
		if c.ids[id].maxSeen.Before(cb.sendAt.Add(-c.tol)) {
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
	examples    []string
}

func (c *checker) verdict() verdict {
	c.mu.Lock()
	defer c.mu.Unlock()
	v := verdict{lostIDs: c.lostIDs, lostCbs: c.lostCbs, examples: append([]string(nil), c.examples...)}
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
