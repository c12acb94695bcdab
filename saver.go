package main

import (
	"context"
	"errors"
	"time"
)

// This file is the fetcher's last step for an online answer: the row is
// committed before the flight's callbacks hear it. Answers queue here and one
// goroutine, started on demand, writes them in batches.

// pendingSave is an online answer waiting to be written, with the flight
// that is settled once it is, and the lookups it answers.
type pendingSave struct {
	row     objectRow
	flight  *flight
	lookups int
}

// queueSave queues an online answer and starts the saving goroutine unless
// it is running.
func (f *fetcher) queueSave(ctx context.Context, s pendingSave) {
	f.smu.Lock()
	f.toSave = append(f.toSave, s)
	start := !f.saving
	f.saving = true
	f.smu.Unlock()
	if start {
		go f.saveQueued(ctx)
	}
}

// saveQueued writes what is queued, in one request per round, until the
// queue is empty. Rows already past the TTL are not written: the reaper
// would delete them at once. (The write, the one call that could panic, is
// recovered in saveRows, so the queue is never left without its goroutine.)
func (f *fetcher) saveQueued(ctx context.Context) {
	defer f.guard.catch("save online objects")
	for {
		f.smu.Lock()
		batch := f.toSave
		f.toSave = nil
		if len(batch) == 0 {
			f.saving = false
			f.smu.Unlock()
			return
		}
		f.smu.Unlock()
		cutoff := time.Now().Add(-f.ttl)
		rows := make([]objectRow, 0, len(batch))
		for _, s := range batch {
			if !s.row.lastSeen.Before(cutoff) {
				rows = append(rows, s.row)
			}
		}
		r := f.saveRows(ctx, rows)
		for _, s := range batch {
			r := r
			if s.row.lastSeen.Before(cutoff) {
				r = resultExpired
			}
			if r == resultExpired {
				f.dropped(s.lookups, "online objects not written: answered or committed after received time + TTL")
			}
			settle(s.flight, r)
		}
	}
}

// saveRows writes rows and says what their waiters hear: online once they
// are committed, expired when they could not be before the TTL, aborted at
// shutdown (their callbacks stay in the journal). A panic counts as
// aborted too, so that no waiter is ever stranded.
func (f *fetcher) saveRows(ctx context.Context, rows []objectRow) (r result) {
	if len(rows) == 0 {
		return resultOnline
	}
	defer func() {
		if p := recover(); p != nil {
			f.guard.panicked("save online objects", p)
			r = resultAborted
		}
	}()
	switch err := f.save(ctx, rows); {
	case err == nil:
		return resultOnline
	case errors.Is(err, errExpired):
		return resultExpired
	default:
		return resultAborted
	}
}
