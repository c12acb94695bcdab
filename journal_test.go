package main

import (
	"context"
	"testing"
	"time"
)

// The keeper renews the lease of a held row that is about to run out, and
// leaves alone the rows whose lease has long to go: renewing every held row
// every round wrote more to the journal than the callbacks themselves.
func TestKeeperRenewsOnlyLeasesAboutToEnd(t *testing.T) {
	a := dbApp(t, "-lease", "2s")
	db := openDB(t, a.cfg.dsn)
	ctx := context.Background()
	now := time.Now()
	due := resumed(journalRow{journalID: 1, receivedAt: at(now.Add(-1500 * time.Millisecond)), objectIDs: []int64{1}})
	fresh := resumed(journalRow{journalID: 2, receivedAt: at(now), objectIDs: []int64{2}})
	for _, cb := range []*callback{due, fresh} {
		lease := cb.receivedAt.Add(a.cfg.lease)
		if err := a.store.insertJournal(ctx, a.db.main, []journalRow{cb.journalRow()}, lease); err != nil {
			t.Fatal(err)
		}
		if err := a.pipe.adopt(cb); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { a.pipe.forget(cb); a.pipe.wg.Done() })
	}
	leaseOf := func(id int64) time.Time {
		t.Helper()
		var until time.Time
		if err := db.QueryRow(`SELECT lease_until FROM callback_journal WHERE id = $1`, id).Scan(&until); err != nil {
			t.Fatal(err)
		}
		return until
	}
	before := map[int64]time.Time{1: leaseOf(1), 2: leaseOf(2)}

	a.keeper.round(ctx)

	if got := leaseOf(1); !got.After(now.Add(a.cfg.lease / 2)) {
		t.Errorf("lease about to end: now until %s, want renewed to about now + lease (%s)", got, now.Add(a.cfg.lease))
	}
	if got := leaseOf(2); !got.Equal(before[2]) {
		t.Errorf("lease with long to go: moved from %s to %s, want untouched", before[2], got)
	}
	if ids := a.pipe.dueLeases(time.Now().Add(a.cfg.lease / 2)); len(ids) != 0 {
		t.Errorf("after the round, leases still due: %v", ids)
	}
}
