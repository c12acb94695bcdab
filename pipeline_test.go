package main

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"
)

// A callback being accepted is never journaled twice. The journal keeper
// looks for callbacks in memory without a row; it must never begin a write
// of one whose accept has not begun its own yet, or both writes end the
// callback's journal state and the second panics (close of a nil channel),
// leaving the callback to wait for a write that never ends.
func TestAcceptAndRejournalNeverWriteOneCallbackTwice(t *testing.T) {
	a := testApp(t, testConfig(t), nil)
	// Known to be down (the DSN leads nowhere): accept's write and the
	// keeper's both fail at once, so the two race as fast as they can.
	a.db.setUp(errors.New("down"))
	ctx := context.Background()

	stop := make(chan struct{})
	var keeper sync.WaitGroup
	keeper.Add(1)
	go func() {
		defer keeper.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			func() {
				defer a.guard.catch("test rejournal")
				a.keeper.rejournal(ctx)
			}()
		}
	}()
	const callbacks = 3000
	accepted := 0
	for range callbacks {
		func() {
			defer a.guard.catch("test accept")
			// No ids: nothing to fetch, the callback waits for its apply.
			if _, err := a.pipe.accept(time.Now(), []int64{}); err == nil {
				accepted++
			}
		}()
	}
	close(stop)
	keeper.Wait()
	if n := a.metrics.panics.Value(); n != 0 {
		t.Errorf("%d panics accepting %d callbacks while the keeper rejournals, want 0", n, accepted)
	}
	for _, cb := range a.pipe.unfinished() {
		cb.jmu.Lock()
		state := cb.jstate
		cb.jmu.Unlock()
		if state == journalWriting {
			t.Fatalf("callback %d is still marked as being journaled, with no write under way", cb.journalID)
		}
	}
}

// Ending a journal write twice (a bug elsewhere) must not panic, and a
// committed row is not forgotten by a second, failed end.
func TestEndJournalTwiceIsHarmless(t *testing.T) {
	tests := []struct {
		first, second bool
		want          journalState
	}{
		{true, true, journalWritten},
		{true, false, journalWritten},
		{false, true, journalWritten},
		{false, false, journalMissing},
	}
	for _, tt := range tests {
		cb := newCallback(time.Now(), []int64{1})
		if !cb.beginJournal() {
			t.Fatal("beginJournal on a new callback refused")
		}
		cb.endJournal(tt.first)
		func() {
			defer func() {
				if r := recover(); r != nil {
					t.Errorf("end(%v) then end(%v): panic %v", tt.first, tt.second, r)
				}
			}()
			cb.endJournal(tt.second)
		}()
		if cb.jstate != tt.want {
			t.Errorf("end(%v) then end(%v): state %d, want %d", tt.first, tt.second, cb.jstate, tt.want)
		}
	}
}

// A callback whose processing panicked is parked in the journal for a
// replay; while the park fails (the database is away) the callback stays in
// memory and the park is retried, until it lands.
func TestCallbackParkedAfterPanicOutlastsTheDatabase(t *testing.T) {
	dsn := testDSN(t)
	proxy := newTCPProxy(t, dsn)
	a := testApp(t, testConfig(t, "-dsn", proxy.dsn(t, dsn)), nil)
	db := openDB(t, dsn)
	proxy.setUp(true)
	a.db.setUp(a.db.applySchema(context.Background()))
	proxy.setUp(false)

	cb := newCallback(at(time.Now()), []int64{2})
	if err := a.pipe.adopt(cb); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer a.pipe.wg.Done() // as process does
		a.pipe.recoverCallback(cb)
	}()
	eventually(t, recoverTimeout*2, "a failed park", func() bool { return a.metrics.dbErrors.Value("park") > 0 })
	// Between attempts it is in memory, where a shutdown would park it.
	eventually(t, recoverTimeout*2, "the callback in memory after a failed park", func() bool {
		return slices.Contains(a.pipe.unfinished(), cb)
	})
	proxy.setUp(true)
	// Retried within recoverRetryMax; the bound is the TTL.
	eventually(t, landWithin, "the callback parked", func() bool {
		var owner string
		err := db.QueryRow(`SELECT owner FROM callback_journal WHERE id = $1`, cb.journalID).Scan(&owner)
		return err == nil && owner == parkedOwner
	})
	select {
	case <-done:
	case <-time.After(landWithin):
		t.Fatal("recoverCallback did not return after the park")
	}
	if slices.Contains(a.pipe.unfinished(), cb) {
		t.Error("the callback is still in memory after it was parked")
	}
}
