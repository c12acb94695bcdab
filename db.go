package main

import (
	"context"
	"database/sql"
	_ "embed"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/lib/pq"
)

//go:embed schema.sql
var schemaSQL string

// schemaLockKey is the advisory lock that serialises schema.sql across
// instances starting at once (any constant that no other application uses).
const schemaLockKey = 7295013514

// database is the connection to PostgreSQL: two pools, the dialer, and
// whether the server is reachable with the schema applied.
type database struct {
	main    *sql.DB // applies, reaps, the journal keeper and health checks
	journal *sql.DB // journal writes only
	log     *slog.Logger
	metrics *metrics

	up      atomic.Bool // schema applied and the last check reached the server
	mu      sync.Mutex
	downWhy error
	told    bool          // the current state has been logged
	checked chan struct{} // closed when the first connection attempt has an outcome
	cameUp  chan struct{} // signalled when the database becomes ready
}

// Pool tuning: connections are kept idle so the hot path never waits for a
// TCP and authentication handshake, and recycled now and then so a server
// failover or a configuration change is picked up.
const (
	connMaxIdleTime = 5 * time.Minute
	connMaxLifetime = 30 * time.Minute
)

func openDatabase(cfg config, log *slog.Logger, m *metrics) (*database, error) {
	connector, err := pq.NewConnector(cfg.dsn)
	if err != nil {
		return nil, dsnError(cfg.dsn, err) // not %w: pq's text may repeat the password
	}
	connector.Dialer(dialer{fd: newFDGuard(fdDatabase, log, m)})
	pool := func(n int) *sql.DB {
		db := sql.OpenDB(connector)
		db.SetMaxOpenConns(n)
		db.SetMaxIdleConns(n)
		db.SetConnMaxIdleTime(connMaxIdleTime)
		db.SetConnMaxLifetime(connMaxLifetime)
		return db
	}
	// Journal writes have connections of their own, one per journal writer:
	// the answer to a callback waits for its journal row, and must never
	// queue for a connection behind applies, reaps or lease renewals.
	return &database{
		main:    pool(cfg.dbConns - journalWriters),
		journal: pool(journalWriters),
		log:     log,
		metrics: m,
		downWhy: errors.New("not connected yet"),
		checked: make(chan struct{}),
		cameUp:  make(chan struct{}, 1),
	}, nil
}

func (d *database) close() error { return errors.Join(d.journal.Close(), d.main.Close()) }

// dialer bounds how long a dead PostgreSQL can hold a connection: TCP
// keepalive probes and TCP_USER_TIMEOUT turn a silent network failure into
// an error within seconds instead of the kernel's default of minutes. A
// dial that finds no free descriptor waits for one within the dial timeout
// (the pool's share of the budget is reserved, so this means another part
// overspent for a moment), instead of failing a journal write at once.
type dialer struct{ fd *fdGuard }

const (
	tcpUserTimeout   = 0x12 // TCP_USER_TIMEOUT on Linux
	dbDialTimeout    = 5 * time.Second
	dbUnackedTimeout = 15 * time.Second // unacknowledged data before the kernel gives up
	// dbFDRetry: PostgreSQL connections are few and dialed rarely, so a
	// dial out of descriptors tries again soon, well within the journal's
	// answer deadline.
	dbFDRetry = 50 * time.Millisecond
)

func (d dialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, dbDialTimeout)
	defer cancel()
	for {
		c, err := d.dial(ctx, network, addr)
		if !d.fd.note(err) {
			return c, err
		}
		select {
		case <-time.After(dbFDRetry):
		case <-ctx.Done():
			return nil, err
		}
	}
}

func (dialer) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	d := net.Dialer{
		KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: 5 * time.Second, Interval: 2 * time.Second, Count: 3},
		Control: func(network, address string, c syscall.RawConn) error {
			if runtime.GOOS != "linux" || network == "unix" {
				return nil
			}
			return c.Control(func(fd uintptr) {
				_ = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, tcpUserTimeout, int(dbUnackedTimeout/time.Millisecond))
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

// ready says whether the database is reachable and the schema applied, and
// if not, why.
func (d *database) ready() error {
	if d.up.Load() {
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.up.Load() { // came up while this waited for the lock
		return nil
	}
	return fmt.Errorf("%w: %v", errNotUp, d.downWhy)
}

// waitFirstCheck waits, within ctx, until the first connection attempt after
// start has an outcome.
func (d *database) waitFirstCheck(ctx context.Context) {
	select {
	case <-d.checked:
	case <-ctx.Done():
	}
}

// setUp records the result of a check, logging only changes of state.
func (d *database) setUp(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	changed := !d.told || d.up.Load() != (err == nil)
	d.downWhy = err
	d.up.Store(err == nil)
	// Only now that the state is recorded: a writer woken by the first
	// outcome reads it at once.
	if !d.told {
		close(d.checked)
	}
	d.told = true
	if err == nil {
		d.metrics.databaseUp.Set(1)
		if changed {
			d.log.Info("database ready")
			select {
			case d.cameUp <- struct{}{}:
			default:
			}
		}
		return
	}
	d.metrics.databaseUp.Set(0)
	if changed {
		d.log.Warn("database unavailable; callbacks are still accepted, retrying", "err", err)
	}
}

// Health checking: one check a second, each bounded so that a dead server
// cannot hold the loop.
const (
	checkEvery    = time.Second
	pingTimeout   = 2 * time.Second
	schemaTimeout = 10 * time.Second
)

// keepConnected applies the schema as soon as PostgreSQL can be reached, then
// checks it every second; after an outage the schema is applied again, which
// is idempotent and covers a database that came back empty.
func (d *database) keepConnected(ctx context.Context) {
	t := time.NewTicker(checkEvery)
	defer t.Stop()
	for {
		var err error
		if d.up.Load() {
			err = d.ping(ctx)
		} else {
			err = d.applySchema(ctx)
		}
		if ctx.Err() != nil {
			return
		}
		d.setUp(err)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// ping checks the database within pingTimeout. lib/pq ends a query at its
// context's end only by asking the server to cancel it, which a server that
// hangs (accepts, never answers) never does: so the ping is abandoned at the
// timeout instead, and its goroutine ends with its connection.
func (d *database) ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, pingTimeout)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- d.main.PingContext(ctx) }()
	var err error
	select {
	case err = <-done:
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err != nil {
		d.metrics.dbErrors.Inc("ping")
		return fmt.Errorf("ping: %w", err)
	}
	return nil
}

// applySchema runs schema.sql under an advisory lock, because concurrent
// CREATE ... IF NOT EXISTS from several starting instances can still collide.
func (d *database) applySchema(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, schemaTimeout)
	defer cancel()
	err := func() error {
		tx, err := d.main.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		defer tx.Rollback()
		if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock($1)`, schemaLockKey); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, schemaSQL); err != nil {
			return err
		}
		return tx.Commit()
	}()
	if err != nil {
		d.metrics.dbErrors.Inc("schema")
		return fmt.Errorf("apply schema: %w", err)
	}
	return nil
}
