package main

import (
	"context"
	"errors"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Sentinel errors of the callback path.
var (
	errBacklogFull = errors.New("backlog full")
	errDuplicate   = errors.New("callback already in memory")
	errExpired     = errors.New("callback expired before it could be applied")
	errAborted     = errors.New("shutting down")
	errNotUp       = errors.New("database not available")
)

// callback is one accepted callback on its way to the table.
type callback struct {
	journalID  int64     // its journal row's id, random so instances never collide
	receivedAt time.Time // becomes last_seen; the service's wall clock, µs precision
	objectIDs  []int64   // sorted, without duplicates

	// The journal state, guarded by jmu: the handler, the journal writer,
	// the journal keeper and the callback's own processing all look at it.
	jmu      sync.Mutex
	jstate   journalState
	jwait    chan struct{} // closed when a write in progress ends
	answered bool          // the handler answered while the write was in progress

	// Its lookups (fetcher.lookupAll): flights[i] answers objectIDs[i],
	// and results[i] is what it answered (online once the row is written).
	// next is the first id without a result: the callback waits on that
	// flight alone, and whoever settles it moves next on (advance).
	// whenDone is called once every id has its result. finishing is
	// claimed once, by whoever finishes the callback (pipeline.finish, or
	// the recovery after a panic in lookupAll).
	flights   []*flight
	next      int
	results   []atomic.Uint32
	whenDone  func()
	finishing atomic.Bool
}

func newCallback(receivedAt time.Time, objectIDs []int64) *callback {
	return &callback{
		journalID:  rand.Int64(),
		receivedAt: receivedAt,
		objectIDs:  objectIDs,
		results:    make([]atomic.Uint32, len(objectIDs)),
	}
}

// result is what a lookup of one id came to.
type result uint8

const (
	resultPending result = iota
	resultOnline
	resultOffline
	resultExpired // no answer before the callback's deadline
	resultAborted // shutdown: the callback stays in the journal
)

func (cb *callback) result(i int) result { return result(cb.results[i].Load()) }

// claimFinish says whether the caller is the one to finish the callback.
func (cb *callback) claimFinish() bool { return cb.finishing.CompareAndSwap(false, true) }

// aborted says whether some lookup ended without an answer.
func (cb *callback) aborted() bool {
	for i := range cb.objectIDs {
		if cb.result(i) == resultAborted {
			return true
		}
	}
	return false
}

// journalState is where a callback's journal row stands.
type journalState uint8

const (
	journalMissing journalState = iota // in memory only: no row committed yet
	journalWriting                     // a write is in progress
	journalWritten                     // the row is committed
	journalClosed                      // applied without a row: never write one now
)

// beginJournal marks a write as in progress, unless the callback already has
// a row, has a write under way, or is being applied.
func (cb *callback) beginJournal() bool {
	cb.jmu.Lock()
	defer cb.jmu.Unlock()
	if cb.jstate != journalMissing {
		return false
	}
	cb.jstate = journalWriting
	cb.jwait = make(chan struct{})
	return true
}

// endJournal records the outcome of the write begun by beginJournal and says
// whether the handler had already answered. A second end of one write (a
// bug elsewhere) changes nothing but a missing row that it says committed:
// it must not take down the writer that calls it.
func (cb *callback) endJournal(committed bool) (answeredBefore bool) {
	cb.jmu.Lock()
	defer cb.jmu.Unlock()
	if cb.jstate != journalWriting {
		if committed && cb.jstate == journalMissing {
			cb.jstate = journalWritten
		}
		return false
	}
	cb.jstate = journalMissing
	if committed {
		cb.jstate = journalWritten
	}
	close(cb.jwait)
	cb.jwait = nil
	answered := cb.answered
	cb.answered = false
	return answered
}

// answerEarly is called when the answer deadline passes: if the write is
// still in progress it goes on, and its outcome is counted as late.
func (cb *callback) answerEarly() bool {
	cb.jmu.Lock()
	defer cb.jmu.Unlock()
	if cb.jstate != journalWriting {
		return false
	}
	cb.answered = true
	return true
}

// journaled says whether the callback's row is committed.
func (cb *callback) journaled() bool {
	cb.jmu.Lock()
	defer cb.jmu.Unlock()
	return cb.jstate == journalWritten
}

// closeJournal is called before the apply that would delete the callback's
// journal row. It waits for a write in progress, so that a late insert can
// never land after that delete and leave a stray row, and stops a callback
// that has no row from getting one.
func (cb *callback) closeJournal(ctx context.Context) error {
	cb.jmu.Lock()
	for cb.jstate == journalWriting {
		w := cb.jwait
		cb.jmu.Unlock()
		select {
		case <-w:
		case <-ctx.Done():
			return ctx.Err()
		}
		cb.jmu.Lock()
	}
	if cb.jstate == journalMissing {
		cb.jstate = journalClosed
	}
	cb.jmu.Unlock()
	return nil
}

// dedupe sorts ids and removes repeats in place.
func dedupe(ids []int64) []int64 {
	slices.Sort(ids)
	return slices.Compact(ids)
}

// journalRow is the callback as the journal keeps it.
func (cb *callback) journalRow() journalRow {
	return journalRow{journalID: cb.journalID, receivedAt: cb.receivedAt, objectIDs: cb.objectIDs}
}

// journalRows lists callbacks as the journal keeps them.
func journalRows(cbs []*callback) []journalRow {
	rows := make([]journalRow, len(cbs))
	for i, cb := range cbs {
		rows[i] = cb.journalRow()
	}
	return rows
}

// resumed is a callback taken over from the journal: its row exists.
func resumed(r journalRow) *callback {
	cb := newCallback(r.receivedAt, dedupe(r.objectIDs))
	cb.journalID = r.journalID
	cb.jstate = journalWritten
	return cb
}
