package main

import (
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync/atomic"
	"syscall"
	"time"
)

// File descriptors are one budget, the open-file limit, and every part of
// the service spends from it: PostgreSQL connections, fetches to the object
// service, inbound connections and the files the process keeps. The budget
// is split once at start so that no part can spend another's share: the
// database first (the journal row is what a 2xx promises), then a margin for
// files, then inbound connections (capped by the limit listener,
// listener.go), and fetches get the rest, up to -max-inflight. When a part
// runs out anyway, fdGuard below makes it back off instead of spinning.

// fdBudget is how the open-file limit is shared out.
type fdBudget struct {
	nofile   int // the open-file limit in force
	database int // -db-conns plus dbFDMargin, reserved
	files    int // fileFDMargin
	inbound  int // inbound connections: the limit listener's cap
	fetch    int // fetch slots: the semaphore's hard cap
}

const (
	// dbFDMargin: database/sql can dial a replacement before the socket of
	// a broken connection is closed, so the pool briefly holds a few more
	// descriptors than -db-conns.
	dbFDMargin = 4
	// fileFDMargin is what the process holds besides connections: standard
	// streams, the runtime's poller, the listeners, a DNS socket for each
	// dial in progress (at most maxDials for fetches), /proc reads for
	// /metrics, a connection being refused by the limit listener and a few
	// -pprof connections.
	fileFDMargin = 128
	// inboundShare: by default inbound connections get an eighth of the
	// limit. A sender needs a connection or two; fetches do the work and
	// get the rest.
	inboundShare = 8
	// fallbackNofile is the usual soft limit, assumed when the limit cannot
	// be read.
	fallbackNofile = 1024
)

// planFDBudget splits nofile between the parts. maxConns is -max-conns (0:
// the default share); inbound connections get at most half of what the
// database and the margin leave, so fetches always get the other half, up
// to maxInflight.
func planFDBudget(nofile, dbConns, maxInflight, maxConns int) fdBudget {
	b := fdBudget{nofile: nofile, database: dbConns + dbFDMargin, files: fileFDMargin}
	left := max(nofile-b.database-b.files, 2)
	want := maxConns
	if want == 0 {
		want = nofile / inboundShare
	}
	b.inbound = max(min(want, left/2), 1)
	b.fetch = max(min(maxInflight, left-b.inbound), 1)
	return b
}

// spare is what no part was given; negative when the limit is too small for
// the database and the margin.
func (b fdBudget) spare() int { return b.nofile - b.database - b.files - b.inbound - b.fetch }

// openFileLimit reads the open-file limit. Go raises the soft limit to the
// hard one as the process starts (package syscall, since Go 1.19), so the
// soft limit is the one in force.
func openFileLimit() (int, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fallbackNofile, fmt.Errorf("read the open-file limit: %w", err)
	}
	return int(min(lim.Cur, 1<<30)), nil
}

// fitFDBudget plans the budget for cfg under the limit in force, logs the
// split in one line (and a warning for each flag it had to lower), and
// returns cfg with -max-inflight and -max-conns set to their shares.
func fitFDBudget(cfg config, log *slog.Logger) config {
	nofile, err := openFileLimit()
	if err != nil {
		log.Warn("assuming the usual open-file limit", "nofile", nofile, "err", err)
	}
	b := planFDBudget(nofile, cfg.dbConns, cfg.maxInflight, cfg.maxConns)
	log.Info("descriptor budget", "nofile", b.nofile, "database", b.database, "files", b.files,
		"inbound", b.inbound, "fetch", b.fetch, "spare", b.spare())
	if b.spare() < 0 {
		log.Warn("the open-file limit is too small for the database pool and the margin; raise it", "nofile", b.nofile)
	}
	if b.fetch < cfg.maxInflight {
		log.Warn("-max-inflight lowered to fit the open-file limit", "wanted", cfg.maxInflight, "chosen", b.fetch, "nofile", b.nofile)
	}
	if cfg.maxConns != 0 && b.inbound < cfg.maxConns {
		log.Warn("-max-conns lowered to fit the open-file limit", "wanted", cfg.maxConns, "chosen", b.inbound, "nofile", b.nofile)
	}
	cfg.maxInflight, cfg.maxConns = b.fetch, b.inbound
	return cfg
}

// isFDExhausted tells running out of file descriptors (this process's
// limit, EMFILE, or the system's, ENFILE) from a passing network error; it
// sees through the wrapping of net.OpError, os.SyscallError and url.Error.
func isFDExhausted(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE)
}

// Places that open descriptors, the label values of the exhaustion metrics.
const (
	fdAccept   = "accept"
	fdFetch    = "fetch"
	fdDatabase = "db"
)

var fdPlaces = []string{fdAccept, fdFetch, fdDatabase}

const (
	// fdCalm is how long a place must go without running out before it
	// counts as recovered: descriptors come and go by the thousand, and
	// one success between two failures is not a recovery worth a log line.
	fdCalm = 5 * time.Second
	// fdBackoff is about how long to wait after running out before trying
	// again: descriptors come back only as other work finishes, so trying
	// sooner only burns CPU (the failure itself is instant).
	fdBackoff = time.Second
)

// fdPause is the wait before the next try after running out of
// descriptors: fdBackoff, jittered down to half so that the waiting
// operations do not all come back at once.
func fdPause() time.Duration {
	return fdBackoff/2 + rand.N(fdBackoff/2)
}

// fdExhaustion is, for each place, whether it is out of descriptors: the
// gauge objtrack_fd_exhausted{where} and the state behind the warnings.
type fdExhaustion struct {
	places [3]fdPlace // indexed like fdPlaces
}

type fdPlace struct {
	exhausted atomic.Bool
	last      atomic.Int64 // unix nanoseconds of the last failure
}

func (x *fdExhaustion) write(b []byte, name string) []byte {
	for i, where := range fdPlaces {
		v := 0
		if x.places[i].exhausted.Load() {
			v = 1
		}
		b = fmt.Appendf(b, "%s{where=%q} %d\n", name, where, v)
	}
	return b
}

// fdGuard watches one place that opens descriptors: it counts the failures
// for lack of them and logs one warning when the place runs out and one
// when it has recovered. Handles for the same place share their state
// through the metrics, so any component can make its own.
type fdGuard struct {
	where   string
	place   *fdPlace
	log     *slog.Logger
	metrics *metrics
}

func newFDGuard(where string, log *slog.Logger, m *metrics) *fdGuard {
	for i, p := range fdPlaces {
		if p == where {
			return &fdGuard{where: where, place: &m.fdExhausted.places[i], log: log, metrics: m}
		}
	}
	panic("newFDGuard: unknown place " + where)
}

// note takes the outcome (nil for success) of every operation at the
// guard's place that opens a descriptor, and reports whether it failed for
// lack of descriptors; if so, wait fdPause() before trying again.
func (g *fdGuard) note(err error) (exhausted bool) {
	if isFDExhausted(err) {
		g.metrics.fdExhaustedTotal.Inc(g.where)
		g.place.last.Store(time.Now().UnixNano())
		if g.place.exhausted.CompareAndSwap(false, true) {
			g.log.Warn("out of file descriptors; backing off", "where", g.where, "err", err)
		}
		return true
	}
	if g.place.exhausted.Load() && time.Since(time.Unix(0, g.place.last.Load())) >= fdCalm &&
		g.place.exhausted.CompareAndSwap(true, false) {
		g.log.Warn("file descriptors available again", "where", g.where)
	}
	return false
}
