package main

import (
	"context"
	"testing"
	"time"
)

// The keeper renews this instance's one lease every round, and forgets the
// leases of instances gone for longer than the TTL.
func TestKeeperRenewsTheOwnersLease(t *testing.T) {
	a := dbApp(t, "-lease", "5s", "-ttl", "30s")
	db := openDB(t, a.cfg.dsn)
	ctx := context.Background()
	gone := testApp(t, a.cfg, nil).store
	if err := gone.renewLease(ctx, time.Now().Add(-time.Minute)); err != nil {
		t.Fatal(err)
	}
	a.keeper.round(ctx)
	leases := map[string]time.Time{}
	rows, err := db.Query(`SELECT owner, lease_until FROM journal_owners`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	for rows.Next() {
		var owner string
		var until time.Time
		if err := rows.Scan(&owner, &until); err != nil {
			t.Fatal(err)
		}
		leases[owner] = until
	}
	if until, ok := leases[a.store.owner]; !ok || until.Before(time.Now().Add(4*time.Second)) {
		t.Errorf("this instance's lease: %v (present %v), want about now + 5s", until, ok)
	}
	if _, ok := leases[gone.owner]; ok {
		t.Errorf("the lease of an instance gone for a minute is still there")
	}
}
