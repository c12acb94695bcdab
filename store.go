package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/lib/pq"
)

// store is the service's SQL: one method per statement, plain values in and
// out. Batching, retries and expiry are the writers' job (writer.go).
//
// All timestamps are the service's wall clock, passed in as parameters; SQL
// never calls now(), so there is one clock for received_at, last_seen,
// leases and the reaper's cutoff.
type store struct {
	db      *database
	owner   string // this instance's name on the journal rows it leases
	metrics *metrics

	mu    sync.Mutex
	stmts map[stmtKey]*sql.Stmt // see prepared
}

type stmtKey struct {
	pool  *sql.DB
	query string
}

func newStore(db *database, m *metrics) *store {
	return &store{db: db, owner: fmt.Sprintf("%s-%d-%08x", hostname(), syscall.Getpid(), rand.Uint32()), metrics: m,
		stmts: make(map[stmtKey]*sql.Stmt)}
}

// prepared returns query prepared on pool, preparing it on first use. The
// statements of the callback path run hundreds of times a second: with
// arguments, lib/pq otherwise parses and describes every call in a round
// trip of its own before it binds, and PostgreSQL plans it every time.
// database/sql prepares the statement again on each connection that runs
// it, so reconnects after an outage need nothing here.
func (s *store) prepared(ctx context.Context, pool *sql.DB, query string) (*sql.Stmt, error) {
	key := stmtKey{pool, query}
	s.mu.Lock()
	st, ok := s.stmts[key]
	s.mu.Unlock()
	if ok {
		return st, nil
	}
	st, err := pool.PrepareContext(ctx, query)
	if err != nil {
		return nil, fmt.Errorf("prepare: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if cur, ok := s.stmts[key]; ok { // prepared meanwhile by another writer
		st.Close()
		return cur, nil
	}
	s.stmts[key] = st
	return st, nil
}

// close closes the prepared statements.
func (s *store) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, st := range s.stmts {
		st.Close()
		delete(s.stmts, k)
	}
}

// The statements of the callback path, prepared (see prepared).
const (
	insertJournalSQL = `
		INSERT INTO callback_journal (id, received_at, object_ids, owner, lease_until)
		SELECT j.id, j.received_at, j.object_ids::bigint[], $4, $5
		FROM unnest($1::bigint[], $2::timestamptz[], $3::text[]) AS j(id, received_at, object_ids)
		ON CONFLICT (id) DO UPDATE SET owner = EXCLUDED.owner, lease_until = EXCLUDED.lease_until`
	// The WHERE skips updates that would not move last_seen, which saves
	// dead tuples; GREATEST states the rule on its own.
	applySQL = `
		WITH upserted AS (
			INSERT INTO objects (id, last_seen)
			SELECT * FROM unnest($1::bigint[], $2::timestamptz[])
			ON CONFLICT (id) DO UPDATE SET last_seen = GREATEST(objects.last_seen, EXCLUDED.last_seen)
			WHERE objects.last_seen < EXCLUDED.last_seen
			RETURNING 1
		), done AS (
			DELETE FROM callback_journal WHERE id = ANY($3::bigint[]) RETURNING 1
		)
		SELECT (SELECT count(*) FROM upserted), (SELECT count(*) FROM done)`
)

// hostname makes journal owners readable: which machine holds a lease.
func hostname() string {
	h, err := os.Hostname()
	if err != nil || h == "" {
		return "objtrack"
	}
	return h
}

// journalRow is one accepted callback as the journal keeps it.
type journalRow struct {
	journalID  int64
	receivedAt time.Time
	objectIDs  []int64
}

// objectRow is one online object and the receipt time of its callback.
type objectRow struct {
	id       int64
	lastSeen time.Time
}

// parkedOwner owns parked journal rows: no instance has a lease under that
// name, so any instance takes them over at once.
const parkedOwner = ""

// insertJournal writes journal rows owned by owner (this instance, or
// parkedOwner) with the given lease, in one statement, on pool (the
// journal's own connections, or the main pool). A row that exists already
// (a retry, or parking at shutdown) gets the new owner and lease.
func (s *store) insertJournal(ctx context.Context, pool *sql.DB, rows []journalRow, owner string, leaseUntil time.Time) error {
	ids := make([]int64, len(rows))
	times := make([]string, len(rows))
	for i, r := range rows {
		ids[i] = r.journalID
		times[i] = pgTime(r.receivedAt)
	}
	st, err := s.prepared(ctx, pool, insertJournalSQL)
	if err == nil {
		_, err = st.ExecContext(ctx, pq.Array(ids), pq.Array(times), pgArrayOfInt64Arrays(rows), owner, pgTime(leaseUntil))
	}
	if err != nil {
		return fmt.Errorf("insert %d journal rows: %w", len(rows), err)
	}
	return nil
}

// applyRows upserts objects and deletes the journal rows doneJournalIDs in
// one statement, so a callback is either still in the journal or fully
// applied. objects must not name an id twice (ON CONFLICT cannot affect a
// row twice); sorted by id, concurrent writers lock rows in the same order.
// It returns the rows that were inserted or moved forward.
func (s *store) applyRows(ctx context.Context, objects []objectRow, doneJournalIDs []int64) (int64, error) {
	ids := make([]int64, len(objects))
	times := make([]string, len(objects))
	for i, o := range objects {
		ids[i] = o.id
		times[i] = pgTime(o.lastSeen)
	}
	var upserted, deleted int64
	st, err := s.prepared(ctx, s.db.main, applySQL)
	if err == nil {
		err = st.QueryRowContext(ctx, pq.Array(ids), pq.Array(times), pq.Array(doneJournalIDs)).Scan(&upserted, &deleted)
	}
	if err != nil {
		s.metrics.dbErrors.Inc("apply")
		return 0, fmt.Errorf("apply %d rows, %d journal rows: %w", len(objects), len(doneJournalIDs), err)
	}
	return upserted, nil
}

// reapChunk bounds one reaping statement, so a large backlog of old rows is
// deleted in short transactions that never hold many locks.
const reapChunk = 10000

// reap deletes rows last seen before cutoff. Rows locked by a concurrent
// upsert are skipped (they are being refreshed; the next round sees them),
// which also means the reaper can never deadlock with a writer.
func (s *store) reap(ctx context.Context, cutoff time.Time) (int64, error) {
	var total int64
	for {
		res, err := s.db.main.ExecContext(ctx, `
			DELETE FROM objects WHERE id IN (
				SELECT id FROM objects WHERE last_seen < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)`,
			pgTime(cutoff), reapChunk)
		if err != nil {
			s.metrics.dbErrors.Inc("reap")
			return total, fmt.Errorf("reap rows older than %s: %w", cutoff.Format(time.RFC3339), err)
		}
		n, _ := res.RowsAffected()
		total += n
		if n < reapChunk {
			return total, nil
		}
	}
}

// renewLease extends this instance's lease on every journal row it owns: one
// row of journal_owners, however many callbacks it holds. (Updating each
// held row instead wrote several times the WAL of the journal's inserts at
// thousands of callbacks a second.)
func (s *store) renewLease(ctx context.Context, until time.Time) error {
	_, err := s.db.main.ExecContext(ctx, `
		INSERT INTO journal_owners (owner, lease_until) VALUES ($1, $2)
		ON CONFLICT (owner) DO UPDATE SET lease_until = EXCLUDED.lease_until`,
		s.owner, pgTime(until))
	if err != nil {
		s.metrics.dbErrors.Inc("renew")
		return fmt.Errorf("renew this instance's journal lease: %w", err)
	}
	return nil
}

// forgetOwners deletes the leases that ran out before cutoff: every
// instance restart adds an owner, and the rows of one gone that long were
// taken over or expired.
func (s *store) forgetOwners(ctx context.Context, cutoff time.Time) error {
	_, err := s.db.main.ExecContext(ctx, `DELETE FROM journal_owners WHERE lease_until < $1`, pgTime(cutoff))
	if err != nil {
		s.metrics.dbErrors.Inc("renew")
		return fmt.Errorf("forget old journal owners: %w", err)
	}
	return nil
}

// dropExpired deletes journal rows received before cutoff: their objects
// would be reaped as soon as they were written. It reads the rows through
// the owner index, one owner at a time (see journalOwners), so that the
// journal needs no index of its own on received_at: each index is written
// for every callback.
func (s *store) dropExpired(ctx context.Context, cutoff time.Time) (int64, error) {
	owners, _, err := journalOwners(ctx, s.db.main, time.Now())
	if err != nil {
		s.metrics.dbErrors.Inc("expire")
		return 0, fmt.Errorf("drop expired journal rows: %w", err)
	}
	if len(owners) == 0 {
		return 0, nil
	}
	res, err := s.db.main.ExecContext(ctx, `
		DELETE FROM callback_journal WHERE id IN (
			SELECT id FROM callback_journal
			WHERE owner = ANY($2::text[]) AND received_at < $1 FOR UPDATE SKIP LOCKED)`,
		pgTime(cutoff), pq.Array(owners))
	if err != nil {
		s.metrics.dbErrors.Inc("expire")
		return 0, fmt.Errorf("drop expired journal rows: %w", err)
	}
	return res.RowsAffected()
}

// claim takes over up to limit journal rows whose own lease and whose
// owner's lease ran out before now (their instance stopped or crashed, or
// parked them) and that were received since receivedSince, oldest first,
// leasing them until leaseUntil. SKIP LOCKED lets several instances claim
// at once without waiting for or double-claiming a row.
//
// The claim commits only once every row has been read: a claim cut short
// (ctx ends, the connection drops) rolls back and leaves its rows to the
// next claim, instead of leasing rows to this instance that it never heard
// of and so never works. A commit that failed on the way may still have
// committed, so the rows are then returned with its error, to be worked all
// the same (a row that stayed claimable may be worked twice; the upserts
// are idempotent); a transaction rolled back as ctx ended returns none.
func (s *store) claim(ctx context.Context, now, leaseUntil, receivedSince time.Time, limit int) ([]journalRow, error) {
	tx, err := s.db.main.BeginTx(ctx, nil)
	if err != nil {
		s.metrics.dbErrors.Inc("claim")
		return nil, fmt.Errorf("claim journal rows: begin: %w", err)
	}
	defer tx.Rollback() // a no-op once committed
	out, err := claimRows(ctx, tx, s.owner, now, leaseUntil, receivedSince, limit)
	if err != nil {
		s.metrics.dbErrors.Inc("claim")
		return nil, err
	}
	if ctx.Err() != nil { // the transaction is rolled back, its rows left
		s.metrics.dbErrors.Inc("claim")
		return nil, fmt.Errorf("claim journal rows: %w", ctx.Err())
	}
	if err := tx.Commit(); err != nil {
		s.metrics.dbErrors.Inc("claim")
		if errors.Is(err, sql.ErrTxDone) { // rolled back as ctx ended
			return nil, fmt.Errorf("claim journal rows: commit: %w", err)
		}
		return out, fmt.Errorf("claim journal rows: commit: %w", err)
	}
	return out, nil
}

// claimRows runs claim's statements in tx and reads every row it returns.
//
// The rows to take over are found through their owners, not through the
// rows: a skip scan of the owner index lists the few owners that have rows
// (one index descent each), and only the rows of owners without a live lease
// are read. Filtering every row on its lease instead read every row held
// longer than its own lease, each round: at 10 000 callbacks/s with lookups
// waiting a few seconds, 30 000 rows and 77-148 ms of PostgreSQL's time a
// second, more during an object-service outage, when rows wait up to the
// TTL.
func claimRows(ctx context.Context, tx *sql.Tx, owner string, now, leaseUntil, receivedSince time.Time, limit int) ([]journalRow, error) {
	_, orphans, err := journalOwners(ctx, tx, now)
	if err != nil || len(orphans) == 0 {
		return nil, err
	}
	// The owner's lease is checked once more here, in the statement that
	// takes the rows, so an owner that renewed since is left alone.
	rows, err := tx.QueryContext(ctx, `
		UPDATE callback_journal SET owner = $1, lease_until = $2
		WHERE id IN (
			SELECT j.id FROM callback_journal j
			WHERE j.owner = ANY($6::text[]) AND j.lease_until < $3 AND j.received_at >= $4
			  AND NOT EXISTS (SELECT 1 FROM journal_owners o WHERE o.owner = j.owner AND o.lease_until >= $3)
			ORDER BY j.received_at LIMIT $5 FOR UPDATE OF j SKIP LOCKED)
		RETURNING id, received_at, object_ids`,
		owner, pgTime(leaseUntil), pgTime(now), pgTime(receivedSince), limit, pq.Array(orphans))
	if err != nil {
		return nil, fmt.Errorf("claim journal rows: %w", err)
	}
	defer rows.Close()
	var out []journalRow
	for rows.Next() {
		var r journalRow
		var ids pq.Int64Array
		if err := rows.Scan(&r.journalID, &r.receivedAt, &ids); err != nil {
			return nil, fmt.Errorf("claim journal rows: scan: %w", err)
		}
		r.objectIDs = ids
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("claim journal rows: read: %w", err)
	}
	// RETURNING follows the order the rows were updated in, not the
	// subquery's: oldest first is restored here.
	slices.SortFunc(out, func(a, b journalRow) int { return a.receivedAt.Compare(b.receivedAt) })
	return out, nil
}

// querier runs a statement on a pool or in a transaction.
type querier interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

// journalOwners lists the owners of journal rows, and of those the orphans:
// owners without a live lease at now (stopped or crashed instances, and
// parkedOwner). The recursive query walks the owner index from one owner to
// the next, newest row first (the oldest entries of an owner are mostly
// rows deleted since, which a scan would have to step over), so its cost
// follows the number of owners, not of rows.
func journalOwners(ctx context.Context, q querier, now time.Time) (all, orphans []string, err error) {
	rows, err := q.QueryContext(ctx, `
		WITH RECURSIVE owners(owner) AS (
			(SELECT owner FROM callback_journal ORDER BY owner DESC, received_at DESC LIMIT 1)
			UNION ALL
			SELECT (SELECT j.owner FROM callback_journal j WHERE j.owner < owners.owner
			        ORDER BY j.owner DESC, j.received_at DESC LIMIT 1)
			FROM owners WHERE owners.owner IS NOT NULL)
		SELECT owner, NOT EXISTS (SELECT 1 FROM journal_owners o WHERE o.owner = owners.owner AND o.lease_until >= $1)
		FROM owners WHERE owner IS NOT NULL`,
		pgTime(now))
	if err != nil {
		return nil, nil, fmt.Errorf("list journal owners: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var owner string
		var orphan bool
		if err := rows.Scan(&owner, &orphan); err != nil {
			return nil, nil, fmt.Errorf("list journal owners: scan: %w", err)
		}
		all = append(all, owner)
		if orphan {
			orphans = append(orphans, owner)
		}
	}
	if err := rows.Err(); err != nil {
		return nil, nil, fmt.Errorf("list journal owners: %w", err)
	}
	return all, orphans, nil
}

// journalDepth counts the journal rows of all instances.
func (s *store) journalDepth(ctx context.Context) (int64, error) {
	var n int64
	if err := s.db.main.QueryRowContext(ctx, `SELECT count(*) FROM callback_journal`).Scan(&n); err != nil {
		s.metrics.dbErrors.Inc("depth")
		return 0, fmt.Errorf("count journal rows: %w", err)
	}
	return n, nil
}

// pgTime formats t for a timestamptz parameter, to the microsecond that
// PostgreSQL stores.
func pgTime(t time.Time) string {
	return t.UTC().Format("2006-01-02T15:04:05.999999Z")
}

// pgArrayOfInt64Arrays formats the rows' object ids as one text[] literal
// whose elements are bigint[] literals, {"{1,2}","{3}"}, in one buffer:
// at thousands of callbacks a second, a string per row that lib/pq then
// quoted again was a fifth of the service's allocations. The elements hold
// only digits, '-', ',' and braces, so the quotes need no escapes.
func pgArrayOfInt64Arrays(rows []journalRow) string {
	n := 2
	for _, r := range rows {
		n += 5 + len(r.objectIDs)*8
	}
	b := make([]byte, 0, n)
	b = append(b, '{')
	for i, r := range rows {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, '"', '{')
		for j, id := range r.objectIDs {
			if j > 0 {
				b = append(b, ',')
			}
			b = strconv.AppendInt(b, id, 10)
		}
		b = append(b, '}', '"')
	}
	return string(append(b, '}'))
}
