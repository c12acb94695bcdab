package main

import (
	"context"
	"database/sql"
	_ "embed"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/lib/pq"
)

//go:embed schema.sql
var schemaSQL string

var (
	errExpired = errors.New("callback expired before it could be applied")
	errAborted = errors.New("shutting down")
	errNotUp   = errors.New("database not available")
)

// Store is everything the service keeps in PostgreSQL: the objects table and
// the journal of accepted callbacks. Journal writes and applies are batched
// by writer goroutines, so that many callbacks share one round trip and one
// commit (group commit), which is what lets the journal keep up at hundreds
// of callbacks per second.
//
// All timestamps are the service's wall clock, passed in as parameters;
// SQL never calls now(), so there is one clock for received_at, last_seen,
// leases and the reaper's cutoff.
type Store struct {
	db        *sql.DB // applies, reaps, the journal keeper and health checks
	journalDB *sql.DB // journal writes only
	owner     string  // this instance's name on the journal rows it leases
	ttl       time.Duration
	lease     time.Duration
	log       *slog.Logger
	metrics   *metrics

	journalQ chan *storeReq
	applyQ   chan *storeReq

	up      atomic.Bool // schema applied and the last check reached the server
	mu      sync.Mutex
	downWhy error
	told    bool          // the current state has been logged
	checked chan struct{} // closed when the first connection attempt has an outcome
	cameUp  chan struct{} // signalled when the database becomes ready

	journalLag atomic.Int64                 // slowest receipt-to-commit since the last look, ns
	writing    [journalWriters]atomic.Int64 // per writer: receipt of the oldest callback being written, unix ns; 0 when idle
	lastWarn   time.Time                    // rate-limits the warnings of the write paths
}

// Writers and their tuning.
const (
	journalWriters = 2 // goroutines writing journal rows, each with its own connection
	applyWriters   = 2 // goroutines applying finished callbacks
	// queueSize bounds the requests waiting for a writer; a full journal
	// queue makes callbacks wait, up to -journal-timeout.
	queueSize = 1024
	// journalBatch is the most callbacks one journal statement carries.
	journalBatch = 512
	// journalAttemptTimeout bounds one journal statement; a slower one is
	// retried, so a connection hung on a dead server cannot stall the writer.
	journalAttemptTimeout = 5 * time.Second
	journalRetryMin       = 20 * time.Millisecond
	journalRetryMax       = time.Second
)

// storeReq is one callback waiting for a writer goroutine.
type storeReq struct {
	cb     *callback
	online []int64    // apply: the ids to upsert at cb.receivedAt
	final  bool       // apply: also delete cb's journal row
	done   chan error // buffered: the writer never blocks on a caller that gave up
}

func newStore(cfg config, log *slog.Logger, m *metrics) (*Store, error) {
	connector, err := pq.NewConnector(cfg.dsn)
	if err != nil {
		return nil, fmt.Errorf("parse -dsn %s: %w", redactDSN(cfg.dsn), err)
	}
	connector.Dialer(dialer{})
	// Journal writes have connections of their own, one per journal writer:
	// the answer to a callback waits for its journal row, and must never
	// queue for a connection behind applies, reaps or lease renewals.
	// Idle connections are kept so the hot path never waits for a TCP and
	// authentication handshake.
	pool := func(n int) *sql.DB {
		db := sql.OpenDB(connector)
		db.SetMaxOpenConns(n)
		db.SetMaxIdleConns(n)
		db.SetConnMaxIdleTime(5 * time.Minute)
		db.SetConnMaxLifetime(30 * time.Minute)
		return db
	}
	s := &Store{
		journalDB: pool(journalWriters),
		db:        pool(cfg.dbConns - journalWriters),
		owner:     fmt.Sprintf("%s-%d-%08x", hostname(), syscall.Getpid(), rand.Uint32()),
		ttl:       cfg.ttl,
		lease:     cfg.lease,
		log:       log,
		metrics:   m,
		journalQ:  make(chan *storeReq, queueSize),
		applyQ:    make(chan *storeReq, queueSize),
		downWhy:   errors.New("not connected yet"),
		checked:   make(chan struct{}),
		cameUp:    make(chan struct{}, 1),
	}
	return s, nil
}

// hostname makes journal owners readable: which machine holds a lease.
func hostname() string {
	h, err := os.Hostname()
	if err != nil || h == "" {
		return "objtrack"
	}
	return h
}

// Close closes the connection pool.
func (s *Store) Close() error { return errors.Join(s.journalDB.Close(), s.db.Close()) }

// dialer bounds how long a dead PostgreSQL can hold a connection: TCP
// keepalive probes and TCP_USER_TIMEOUT turn a silent network failure into
// an error within seconds instead of the kernel's default of minutes.
type dialer struct{}

const tcpUserTimeout = 0x12 // TCP_USER_TIMEOUT on Linux

func (dialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	d := net.Dialer{
		Timeout:         5 * time.Second,
		KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: 5 * time.Second, Interval: 2 * time.Second, Count: 3},
		Control: func(network, address string, c syscall.RawConn) error {
			if runtime.GOOS != "linux" || network == "unix" {
				return nil
			}
			return c.Control(func(fd uintptr) {
				_ = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, tcpUserTimeout, 15000)
			})
		},
	}
	return d.DialContext(ctx, network, addr)
}

func (d dialer) Dial(network, addr string) (net.Conn, error) {
	return d.DialContext(context.Background(), network, addr)
}

func (d dialer) DialTimeout(network, addr string, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return d.DialContext(ctx, network, addr)
}

// Ready says whether the database is reachable and the schema applied, and
// if not, why.
func (s *Store) Ready() error {
	if s.up.Load() {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return fmt.Errorf("%w: %v", errNotUp, s.downWhy)
}

// setUp records the result of a check, logging only changes of state.
func (s *Store) setUp(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	changed := !s.told || s.up.Load() != (err == nil)
	if !s.told {
		close(s.checked)
	}
	s.told = true
	s.downWhy = err
	s.up.Store(err == nil)
	if err == nil {
		s.metrics.databaseUp.Set(1)
		if changed {
			s.log.Info("database ready")
			select {
			case s.cameUp <- struct{}{}:
			default:
			}
		}
		return
	}
	s.metrics.databaseUp.Set(0)
	if changed {
		s.log.Warn("database unavailable; callbacks are still accepted, retrying", "err", err)
	}
}

// keepConnected applies the schema as soon as PostgreSQL can be reached, then
// checks it every second; after an outage the schema is applied again, which
// is idempotent and covers a database that came back empty.
func (s *Store) keepConnected(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		var err error
		if s.up.Load() {
			err = s.ping(ctx)
		} else {
			err = s.applySchema(ctx)
		}
		if ctx.Err() != nil {
			return
		}
		s.setUp(err)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (s *Store) ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := s.db.PingContext(ctx); err != nil {
		s.metrics.dbErrors.Inc("ping")
		return fmt.Errorf("ping: %w", err)
	}
	return nil
}

// applySchema runs schema.sql under an advisory lock, because concurrent
// CREATE ... IF NOT EXISTS from several starting instances can still collide.
func (s *Store) applySchema(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	err := func() error {
		tx, err := s.db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		defer tx.Rollback()
		if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock(7295013514)`); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, schemaSQL); err != nil {
			return err
		}
		return tx.Commit()
	}()
	if err != nil {
		s.metrics.dbErrors.Inc("schema")
		return fmt.Errorf("apply schema: %w", err)
	}
	return nil
}

// warn logs a write-path failure at most once every five seconds: during an
// outage every batch fails, and one line per batch would flood the log.
func (s *Store) warn(msg string, args ...any) {
	s.mu.Lock()
	now := time.Now()
	if now.Sub(s.lastWarn) < 5*time.Second {
		s.mu.Unlock()
		return
	}
	s.lastWarn = now
	s.mu.Unlock()
	s.log.Warn(msg, args...)
}

// Journal writes cb's journal row; the caller has called cb.beginJournal.
// It returns once the row is committed, the write has failed, or ctx ends,
// whichever comes first. When ctx ends first the write is not abandoned: it
// goes on, and its outcome is recorded on cb (cb.endJournal). When the
// database is known to be down it fails at once: the callback stays in
// memory only and the journal keeper writes its row when the database is
// back.
func (s *Store) Journal(ctx context.Context, cb *callback) {
	if s.Ready() != nil {
		// Right after start the first connection may still be under way:
		// wait for its outcome within ctx. Once the database is known to be
		// down, fail fast: no point making the sender wait for it.
		select {
		case <-s.checked:
		case <-ctx.Done():
		}
		if s.Ready() != nil {
			cb.endJournal(false)
			return
		}
	}
	r := &storeReq{cb: cb, done: make(chan error, 1)}
	select {
	case s.journalQ <- r:
	case <-ctx.Done():
		cb.endJournal(false) // never queued: the keeper writes it later
		return
	}
	select {
	case <-r.done:
	case <-ctx.Done():
	}
}

// Apply upserts online, ids of cb, at cb's receipt time. The final apply of
// a callback also deletes its journal row, in the same statement, so the
// callback is either still in the journal or fully applied. Apply retries
// through database outages until the callback expires.
func (s *Store) Apply(ctx context.Context, cb *callback, online []int64, final bool) error {
	r := &storeReq{cb: cb, online: online, final: final, done: make(chan error, 1)}
	select {
	case s.applyQ <- r:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-r.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// collect waits for one request and then takes whatever else is queued, up
// to max, so that a busy writer batches and an idle one does not wait.
func collect(ctx context.Context, q chan *storeReq, batch []*storeReq, max int) []*storeReq {
	if len(batch) == 0 {
		select {
		case r := <-q:
			batch = append(batch, r)
		case <-ctx.Done():
			return batch
		}
	}
	for len(batch) < max {
		select {
		case r := <-q:
			batch = append(batch, r)
		default:
			return batch
		}
	}
	return batch
}

// runJournalWriter writes queued journal requests in batches, on the
// connections reserved for the journal, and records each outcome on its
// callback.
func (s *Store) runJournalWriter(ctx context.Context, writer int) {
	var batch []*storeReq
	for ctx.Err() == nil {
		batch = collect(ctx, s.journalQ, batch[:0], journalBatch)
		if len(batch) == 0 {
			continue
		}
		s.writing[writer].Store(batch[0].cb.receivedAt.UnixNano())
		err := s.writeJournal(ctx, batch)
		s.writing[writer].Store(0)
		now := time.Now()
		s.noteJournalLag(now.Sub(batch[0].cb.receivedAt))
		for _, r := range batch {
			late := r.cb.endJournal(err == nil)
			if err == nil {
				s.metrics.journalWrites.Inc()
				s.metrics.journalCommit.Observe(now.Sub(r.cb.receivedAt).Seconds())
				if late {
					s.metrics.journalLate.Inc()
				}
			}
			r.done <- err
		}
	}
}

// noteJournalLag records how long the oldest callback of a batch waited for
// its row; the fetch limiter reads the slowest since its last look.
func (s *Store) noteJournalLag(d time.Duration) {
	for {
		cur := s.journalLag.Load()
		if int64(d) <= cur || s.journalLag.CompareAndSwap(cur, int64(d)) {
			return
		}
	}
}

// TakeJournalLag returns how far behind the journal is: the slowest commit
// since the last call, or the age of the oldest callback still being
// written if that is more (a stalled write commits nothing to report).
func (s *Store) TakeJournalLag() time.Duration {
	lag := time.Duration(s.journalLag.Swap(0))
	now := time.Now().UnixNano()
	for i := range s.writing {
		if since := s.writing[i].Load(); since != 0 {
			lag = max(lag, time.Duration(now-since))
		}
	}
	return lag
}

// writeJournal commits the rows of a batch. While the database is up a
// failed attempt is retried, however long it takes: callbacks may already
// have been answered, and their rows are what makes that answer true. It
// gives up only when the database is known to be down (those callbacks stay
// in memory and the journal keeper writes them when it is back), when every
// callback of the batch is past the TTL, or at shutdown.
func (s *Store) writeJournal(ctx context.Context, batch []*storeReq) error {
	cbs := make([]*callback, len(batch))
	var newest time.Time
	for i, r := range batch {
		cbs[i] = r.cb
		if r.cb.receivedAt.After(newest) {
			newest = r.cb.receivedAt
		}
	}
	backoff := journalRetryMin
	for {
		if err := s.Ready(); err != nil {
			return err
		}
		actx, cancel := context.WithTimeout(ctx, journalAttemptTimeout)
		err := s.insertJournal(actx, s.journalDB, cbs, time.Now().Add(s.lease))
		cancel()
		if err == nil {
			return nil
		}
		s.metrics.dbErrors.Inc("journal")
		if ctx.Err() != nil || time.Since(newest) > s.ttl {
			return err
		}
		s.warn("journal write failed; retrying", "callbacks", len(batch), "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff/2 + rand.N(backoff/2)):
		}
		backoff = min(2*backoff, journalRetryMax)
	}
}

// insertJournal writes callbacks with the given lease in one statement. A row
// that exists already (a retry, or parking at shutdown) gets the new lease.
func (s *Store) insertJournal(ctx context.Context, db *sql.DB, cbs []*callback, leaseUntil time.Time) error {
	ids := make([]int64, len(cbs))
	times := make([]string, len(cbs))
	objects := make([]string, len(cbs))
	for i, cb := range cbs {
		ids[i] = cb.id
		times[i] = pgTime(cb.receivedAt)
		objects[i] = pgInt64Array(cb.ids)
	}
	_, err := db.ExecContext(ctx, `
		INSERT INTO callback_journal (id, received_at, object_ids, owner, lease_until)
		SELECT j.id, j.received_at, j.object_ids::bigint[], $4, $5
		FROM unnest($1::bigint[], $2::timestamptz[], $3::text[]) AS j(id, received_at, object_ids)
		ON CONFLICT (id) DO UPDATE SET owner = EXCLUDED.owner, lease_until = EXCLUDED.lease_until`,
		pq.Array(ids), pq.Array(times), pq.Array(objects), s.owner, pgTime(leaseUntil))
	if err != nil {
		return fmt.Errorf("insert %d journal rows: %w", len(cbs), err)
	}
	return nil
}

// Park journals callbacks with an already expired lease, so that the next
// instance to look (this one after a restart, or another) takes them over at
// once. Used at shutdown for whatever the grace period did not finish.
func (s *Store) Park(ctx context.Context, cbs []*callback) error {
	if len(cbs) == 0 {
		return nil
	}
	if err := s.insertJournal(ctx, s.db, cbs, time.Now().Add(-time.Second)); err != nil {
		s.metrics.dbErrors.Inc("park")
		return err
	}
	return nil
}

// Rejournal writes the rows of callbacks that were accepted into memory only
// while the database was down; the caller has called beginJournal on each.
func (s *Store) Rejournal(ctx context.Context, cbs []*callback) error {
	err := s.insertJournal(ctx, s.db, cbs, time.Now().Add(s.lease))
	if err != nil {
		s.metrics.dbErrors.Inc("journal")
	}
	for _, cb := range cbs {
		cb.endJournal(err == nil)
	}
	if err == nil {
		s.metrics.journalRejournaled.Add(uint64(len(cbs)))
	}
	return err
}

// runApplyWriter commits completed callbacks in batches. On failure it keeps
// the batch, adds whatever arrived meanwhile, drops what has expired, and
// tries again with backoff, so a database outage costs nothing that is still
// within its TTL.
func (s *Store) runApplyWriter(ctx context.Context) {
	const maxBatch = 1000
	var pending []*storeReq
	backoff := 100 * time.Millisecond
	for {
		pending = collect(ctx, s.applyQ, pending, maxBatch)
		if ctx.Err() != nil {
			for _, r := range pending {
				r.done <- errAborted
			}
			return
		}
		if len(pending) == 0 {
			continue
		}
		batch := pending[:min(len(pending), maxBatch)]
		applied, expired, err := s.applyBatch(ctx, batch)
		if err == nil {
			for i, r := range batch {
				if expired[i] {
					r.done <- errExpired
				} else {
					r.done <- nil
				}
			}
			s.metrics.callbacksApplied.Add(uint64(applied))
			pending = append(pending[:0], pending[len(batch):]...)
			backoff = 100 * time.Millisecond
			continue
		}
		s.metrics.dbErrors.Inc("apply")
		s.warn("apply failed; will retry", "callbacks", len(pending), "err", err)
		// Callbacks past their deadline are dropped now; their journal rows
		// are removed by the journal keeper's expiry sweep.
		cutoff := time.Now().Add(-s.ttl)
		kept := pending[:0]
		for _, r := range pending {
			if r.cb.receivedAt.Before(cutoff) {
				if r.final {
					s.metrics.callbacksExpired.Inc()
				}
				r.done <- errExpired
				continue
			}
			kept = append(kept, r)
		}
		pending = kept
		select {
		case <-ctx.Done():
		case <-time.After(backoff/2 + rand.N(backoff/2)):
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// applyBatch upserts the online objects of a batch of apply requests and
// deletes the journal rows of the final ones, in one statement. Objects of
// callbacks older than the TTL are left out (the reaper would delete them at
// once) but their journal rows go.
func (s *Store) applyBatch(ctx context.Context, batch []*storeReq) (applied int, expired []bool, err error) {
	cutoff := time.Now().Add(-s.ttl)
	journalIDs := make([]int64, 0, len(batch))
	expired = make([]bool, len(batch))
	type row struct {
		id int64
		at time.Time
	}
	var rows []row
	for i, r := range batch {
		if r.final {
			journalIDs = append(journalIDs, r.cb.id)
		}
		if r.cb.receivedAt.Before(cutoff) {
			expired[i] = true
			s.metrics.idsDropped.Add(uint64(len(r.online)))
			continue
		}
		if r.final {
			applied++
		}
		for _, id := range r.online {
			rows = append(rows, row{id, r.cb.receivedAt})
		}
	}
	// One statement must not name an id twice (ON CONFLICT cannot affect a
	// row twice): sort by id, latest time first, and keep the first of each.
	// Sorted ids also make concurrent writers lock rows in the same order.
	slices.SortFunc(rows, func(a, b row) int {
		if a.id != b.id {
			if a.id < b.id {
				return -1
			}
			return 1
		}
		return b.at.Compare(a.at)
	})
	rows = slices.CompactFunc(rows, func(a, b row) bool { return a.id == b.id })
	ids := make([]int64, len(rows))
	times := make([]string, len(rows))
	for i, r := range rows {
		ids[i] = r.id
		times[i] = pgTime(r.at)
	}
	// The WHERE skips updates that would not move last_seen, which saves
	// dead tuples; GREATEST states the rule on its own.
	var upserted, deleted int64
	err = s.db.QueryRowContext(ctx, `
		WITH upserted AS (
			INSERT INTO objects (id, last_seen)
			SELECT * FROM unnest($1::bigint[], $2::timestamptz[])
			ON CONFLICT (id) DO UPDATE SET last_seen = GREATEST(objects.last_seen, EXCLUDED.last_seen)
			WHERE objects.last_seen < EXCLUDED.last_seen
			RETURNING 1
		), done AS (
			DELETE FROM callback_journal WHERE id = ANY($3::bigint[]) RETURNING 1
		)
		SELECT (SELECT count(*) FROM upserted), (SELECT count(*) FROM done)`,
		pq.Array(ids), pq.Array(times), pq.Array(journalIDs)).Scan(&upserted, &deleted)
	if err != nil {
		return 0, nil, fmt.Errorf("apply %d callbacks (%d rows): %w", len(batch), len(rows), err)
	}
	s.metrics.rowsUpserted.Add(uint64(upserted))
	for i := range expired {
		if expired[i] && batch[i].final {
			s.metrics.callbacksExpired.Inc()
		}
	}
	return applied, expired, nil
}

// Reap deletes rows last seen before cutoff. Rows locked by a concurrent
// upsert are skipped (they are being refreshed; the next round sees them),
// which also means the reaper can never deadlock with a writer.
func (s *Store) Reap(ctx context.Context, cutoff time.Time) (int64, error) {
	const chunk = 10000
	var total int64
	for {
		res, err := s.db.ExecContext(ctx, `
			DELETE FROM objects WHERE id IN (
				SELECT id FROM objects WHERE last_seen < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)`,
			pgTime(cutoff), chunk)
		if err != nil {
			s.metrics.dbErrors.Inc("reap")
			return total, fmt.Errorf("reap rows older than %s: %w", cutoff.Format(time.RFC3339), err)
		}
		n, _ := res.RowsAffected()
		total += n
		if n < chunk {
			return total, nil
		}
	}
}

// RenewLeases extends the leases of the journal rows this instance holds.
func (s *Store) RenewLeases(ctx context.Context, ids []int64, until time.Time) error {
	if len(ids) == 0 {
		return nil
	}
	_, err := s.db.ExecContext(ctx, `
		UPDATE callback_journal SET owner = $2, lease_until = $3
		WHERE id IN (SELECT id FROM callback_journal WHERE id = ANY($1::bigint[]) FOR UPDATE SKIP LOCKED)`,
		pq.Array(ids), s.owner, pgTime(until))
	if err != nil {
		s.metrics.dbErrors.Inc("renew")
		return fmt.Errorf("renew %d leases: %w", len(ids), err)
	}
	return nil
}

// DropExpired deletes journal rows received before cutoff: their objects
// would be reaped as soon as they were written.
func (s *Store) DropExpired(ctx context.Context, cutoff time.Time) (int64, error) {
	res, err := s.db.ExecContext(ctx, `
		DELETE FROM callback_journal WHERE id IN (
			SELECT id FROM callback_journal WHERE received_at < $1 FOR UPDATE SKIP LOCKED)`,
		pgTime(cutoff))
	if err != nil {
		s.metrics.dbErrors.Inc("expire")
		return 0, fmt.Errorf("drop expired journal rows: %w", err)
	}
	return res.RowsAffected()
}

// Claim takes over up to limit journal rows whose lease ran out (their
// instance stopped or crashed), oldest first. SKIP LOCKED lets several
// instances claim at once without waiting for or double-claiming a row.
func (s *Store) Claim(ctx context.Context, now time.Time, limit int) ([]*callback, error) {
	rows, err := s.db.QueryContext(ctx, `
		UPDATE callback_journal SET owner = $1, lease_until = $2
		WHERE id IN (
			SELECT id FROM callback_journal
			WHERE lease_until < $3 AND received_at >= $4
			ORDER BY received_at LIMIT $5 FOR UPDATE SKIP LOCKED)
		RETURNING id, received_at, object_ids`,
		s.owner, pgTime(now.Add(s.lease)), pgTime(now), pgTime(now.Add(-s.ttl)), limit)
	if err != nil {
		s.metrics.dbErrors.Inc("claim")
		return nil, fmt.Errorf("claim journal rows: %w", err)
	}
	defer rows.Close()
	var out []*callback
	for rows.Next() {
		var id int64
		var at time.Time
		var ids pq.Int64Array
		if err := rows.Scan(&id, &at, &ids); err != nil {
			return out, fmt.Errorf("scan journal row: %w", err)
		}
		cb := newCallback(at, dedupe([]int64(ids)))
		cb.id = id
		cb.jstate = journalWritten
		out = append(out, cb)
	}
	if err := rows.Err(); err != nil {
		s.metrics.dbErrors.Inc("claim")
		return out, fmt.Errorf("claim journal rows: %w", err)
	}
	return out, nil
}

// JournalDepth counts the journal rows of all instances.
func (s *Store) JournalDepth(ctx context.Context) (int64, error) {
	var n int64
	if err := s.db.QueryRowContext(ctx, `SELECT count(*) FROM callback_journal`).Scan(&n); err != nil {
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

// pgInt64Array formats ids as a PostgreSQL array literal.
func pgInt64Array(ids []int64) string {
	b := make([]byte, 0, 2+len(ids)*8)
	b = append(b, '{')
	for i, id := range ids {
		if i > 0 {
			b = append(b, ',')
		}
		b = strconv.AppendInt(b, id, 10)
	}
	return string(append(b, '}'))
}
