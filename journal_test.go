package main

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
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

// A round that shutdown cancels fails every step; that is not a fault and
// logs no warning (make demo used to end with two). A round that runs out of
// its own time is a fault and is logged.
func TestKeeperRoundWarnsOnFaultsNotOnShutdown(t *testing.T) {
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	timedOut, cancel2 := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel2()
	for _, tc := range []struct {
		name string
		ctx  context.Context
		warn bool
	}{
		{"shutdown", cancelled, false},
		{"timed out", timedOut, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := dbApp(t)
			var logs bytes.Buffer
			a.keeper.guard = &guard{log: slog.New(slog.NewTextHandler(&logs, nil)), metrics: a.metrics}
			a.keeper.round(tc.ctx)
			if got := strings.Contains(logs.String(), "level=WARN"); got != tc.warn {
				t.Errorf("warned: %v, want %v; log:\n%s", got, tc.warn, logs.String())
			}
		})
	}
}
