// Command objtrack takes callbacks that name objects, asks the object service
// about each one, and keeps the online objects in PostgreSQL with the time the
// callback was received, forgetting them once they stop arriving.
//
// The callback path reads handler.go → pipeline.go → fetcher.go → store.go;
// journal.go and reaper.go are the background loops.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/url"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args, os.Getenv, os.Stdout); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "objtrack:", err)
		os.Exit(1)
	}
}

// config is everything the flags set.
type config struct {
	listen         string
	upstream       string
	dsn            string
	ttl            time.Duration
	reapEvery      time.Duration
	maxInflight    int
	maxIDs         int
	maxBody        int64
	coalesce       bool
	grace          time.Duration
	maxBacklog     int
	maxBacklogIDs  int
	journalTimeout time.Duration
	lease          time.Duration
	fetchTimeout   time.Duration
	dbConns        int
	logLevel       string
	logFormat      string
	pprofAddr      string
	healthcheck    bool
}

// envName is the environment variable that backs a flag: DATABASE_URL for
// -dsn (the usual name), OBJTRACK_<FLAG> for the rest.
func envName(flagName string) string {
	if flagName == "dsn" {
		return "DATABASE_URL"
	}
	return "OBJTRACK_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// parseConfig reads flags from args, falling back to the environment for any
// flag not given on the command line.
func parseConfig(args []string, getenv func(string) string, out io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("objtrack", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&c.listen, "listen", "localhost:9090", "address to serve callbacks, /healthz, /readyz and /metrics on")
	fs.StringVar(&c.upstream, "upstream", "http://localhost:9010", "base URL of the object service; objects are fetched from {upstream}/objects/{id}")
	fs.StringVar(&c.dsn, "dsn", "", "PostgreSQL connection string (URL or key=value); the password is never logged")
	fs.DurationVar(&c.ttl, "ttl", 30*time.Second, "forget an object this long after the last callback that named it")
	fs.DurationVar(&c.reapEvery, "reap-every", time.Second, "how often the reaper deletes rows older than -ttl")
	fs.IntVar(&c.maxInflight, "max-inflight", 16384, "most fetches in flight to the object service at once, across all callbacks; capped by the open-file limit")
	fs.IntVar(&c.maxIDs, "max-ids", 10000, "most object ids accepted in one callback")
	fs.Int64Var(&c.maxBody, "max-body", 1<<20, "largest callback body accepted, in bytes")
	fs.BoolVar(&c.coalesce, "coalesce", true, "let concurrent lookups of the same id share one request to the object service")
	fs.DurationVar(&c.grace, "grace", 10*time.Second, "on SIGTERM/SIGINT, how long to finish in-flight callbacks before leaving the rest in the journal")
	fs.IntVar(&c.maxBacklog, "max-backlog", 20000, "most callbacks held in memory; past it callbacks get 503 with Retry-After")
	fs.IntVar(&c.maxBacklogIDs, "max-backlog-ids", 4000000, "most object ids held in memory across callbacks; past it callbacks get 503 with Retry-After")
	fs.DurationVar(&c.journalTimeout, "journal-timeout", 500*time.Millisecond, "how long a callback's answer waits for its journal row; a write still in progress then goes on, and its commit is counted as late")
	fs.DurationVar(&c.lease, "lease", 5*time.Second, "how long a journal row stays claimed without renewal; another instance takes it over after that")
	fs.DurationVar(&c.fetchTimeout, "fetch-timeout", 5*time.Second, "time limit for one request to the object service (it may take up to 4s)")
	fs.IntVar(&c.dbConns, "db-conns", 12, "most open PostgreSQL connections")
	fs.StringVar(&c.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.StringVar(&c.logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&c.pprofAddr, "pprof", "", "serve net/http/pprof on this address (off when empty)")
	fs.BoolVar(&c.healthcheck, "healthcheck", false, "only check that the service at -listen answers /healthz, exit 0 if so (for container health checks)")

	// The environment fills in defaults; the command line overrides it.
	var envErr error
	fs.VisitAll(func(f *flag.Flag) {
		env := envName(f.Name)
		f.Usage += fmt.Sprintf(" (env %s)", env)
		if v := getenv(env); v != "" && envErr == nil {
			if err := f.Value.Set(v); err != nil {
				envErr = fmt.Errorf("environment %s=%q: %w", env, v, err)
			}
		}
	})
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: objtrack [flags]\n\nServes POST /callback {\"object_ids\":[...]}, looks each id up at {upstream}/objects/{id},\nand keeps online objects in the PostgreSQL table objects(id, last_seen).\n\nFlags (each falls back to the environment variable shown):\n")
		fs.PrintDefaults()
	}
	if envErr != nil {
		return c, envErr
	}
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	return c, c.validate()
}

func (c config) validate() error {
	var errs []error
	check := func(ok bool, format string, a ...any) {
		if !ok {
			errs = append(errs, fmt.Errorf(format, a...))
		}
	}
	u, err := url.Parse(c.upstream)
	check(err == nil && (u.Scheme == "http" || u.Scheme == "https") && u.Host != "", "-upstream %q: want an http(s) URL with a host", c.upstream)
	check(c.dsn != "" || c.healthcheck, "-dsn is required (or set DATABASE_URL)")
	check(c.ttl > 0, "-ttl must be positive")
	check(c.reapEvery > 0, "-reap-every must be positive")
	check(c.maxInflight > 0, "-max-inflight must be positive")
	check(c.maxIDs > 0, "-max-ids must be positive")
	check(c.maxBody > 0, "-max-body must be positive")
	check(c.grace >= 0, "-grace must not be negative")
	check(c.maxBacklog > 0, "-max-backlog must be positive")
	check(c.maxBacklogIDs > 0, "-max-backlog-ids must be positive")
	check(c.journalTimeout > 0 && c.journalTimeout < time.Second, "-journal-timeout must be between 0 and 1s (the sender gives up after 1s)")
	check(c.lease >= time.Second, "-lease must be at least 1s")
	check(c.fetchTimeout > 0, "-fetch-timeout must be positive")
	check(c.dbConns >= 4, "-db-conns must be at least 4")
	check(c.logFormat == "text" || c.logFormat == "json", "-log-format must be text or json")
	var lvl slog.Level
	check(lvl.UnmarshalText([]byte(c.logLevel)) == nil, "-log-level %q: want debug, info, warn or error", c.logLevel)
	return errors.Join(errs...)
}

func newLogger(c config, out io.Writer) *slog.Logger {
	var lvl slog.Level
	_ = lvl.UnmarshalText([]byte(c.logLevel))
	opts := &slog.HandlerOptions{Level: lvl}
	if c.logFormat == "json" {
		return slog.New(slog.NewJSONHandler(out, opts))
	}
	return slog.New(slog.NewTextHandler(out, opts))
}

// run is the whole service: main only adds the signal context, so tests start
// it in-process with their own arguments and environment.
func run(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	cfg, err := parseConfig(args[1:], getenv, stdout)
	if err != nil {
		return err
	}
	if cfg.healthcheck {
		return healthcheck(cfg.listen)
	}
	log := newLogger(cfg, stdout)
	m := newMetrics()
	g := &guard{log: log, metrics: m}

	cfg.maxInflight = fetchLimit(cfg.maxInflight, cfg.dbConns, log)

	store, err := newStore(cfg, log, m)
	if err != nil {
		return err
	}
	defer store.Close()
	fetcher := newFetcher(cfg, nil, log, m, g)
	pipe := newPipeline(cfg, fetcher, store, log, m, g)

	// Background work lives until the pipeline has drained at shutdown.
	bg, stopBG := context.WithCancel(context.Background())
	defer stopBG()
	var bgWG sync.WaitGroup
	startLoop := func(name string, fn func(context.Context)) {
		bgWG.Add(1)
		go func() {
			defer bgWG.Done()
			g.loop(bg, name, fn)
		}()
	}
	startLoop("store", store.keepConnected)
	for i := range journalWriters {
		startLoop("journal-writer", func(ctx context.Context) { store.runJournalWriter(ctx, i) })
	}
	for range applyWriters {
		startLoop("apply-writer", store.runApplyWriter)
	}
	startLoop("fetch-limit", newFetchLimiter(fetcher.slots, cfg.journalTimeout/journalTargetShare, store.TakeJournalLag, m).run)
	startLoop("reaper", newReaper(cfg, store, log, m).run)
	startLoop("journal", newJournalKeeper(cfg, store, pipe, log, m).run)

	ln, err := net.Listen("tcp", cfg.listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", cfg.listen, err)
	}
	srv := &http.Server{
		Handler:           routes(cfg, pipe, store, m, log, g),
		ReadHeaderTimeout: 2 * time.Second,
		ReadTimeout:       5 * time.Second,
		WriteTimeout:      10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	serveErr := make(chan error, 1)
	go func() {
		defer g.recover("http-server")
		serveErr <- srv.Serve(ln)
	}()
	if cfg.pprofAddr != "" {
		if err := servePprof(bg, cfg.pprofAddr, log, g); err != nil {
			_ = srv.Close()
			return err
		}
	}
	log.Info("serving", "listen", ln.Addr().String(), "upstream", cfg.upstream,
		"database", redactDSN(cfg.dsn), "ttl", cfg.ttl, "max_inflight", cfg.maxInflight,
		"coalesce", cfg.coalesce, "max_backlog", cfg.maxBacklog)

	select {
	case <-ctx.Done():
	case err := <-serveErr:
		return fmt.Errorf("http server: %w", err)
	}

	// Shutdown: stop taking callbacks, let what is in memory finish within
	// the grace period, then journal whatever is left for the next start.
	log.Info("shutting down", "grace", cfg.grace)
	deadline := time.Now().Add(cfg.grace)
	shutCtx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	if err := srv.Shutdown(shutCtx); err != nil {
		log.Warn("http shutdown incomplete", "err", err)
		_ = srv.Close()
	}
	left := pipe.drain(shutCtx)
	if left > 0 {
		log.Warn("grace period over, leaving callbacks in the journal", "callbacks", left)
		saveCtx, cancelSave := context.WithTimeout(context.Background(), 3*time.Second)
		err := store.Park(saveCtx, pipe.unfinished())
		cancelSave()
		if err != nil {
			log.Error("could not journal unfinished callbacks; they are lost", "callbacks", left, "err", err)
		}
	}
	stopBG()
	bgWG.Wait()
	log.Info("stopped")
	return nil
}

// fetchLimit raises the open-file soft limit to the hard limit and keeps the
// fetch semaphore below it: each fetch holds one socket, and the process also
// needs descriptors for PostgreSQL, the listener and incoming callbacks.
func fetchLimit(want, dbConns int, log *slog.Logger) int {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		log.Warn("cannot read the open-file limit; keeping -max-inflight", "err", err)
		return want
	}
	if lim.Cur < lim.Max {
		raised := lim
		raised.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised); err == nil {
			lim = raised
		}
	}
	reserve := uint64(1024 + dbConns)
	allowed := 1
	if lim.Cur > reserve {
		allowed = int(min(lim.Cur-reserve, 1<<30))
	}
	if want > allowed {
		log.Warn("-max-inflight lowered to fit the open-file limit", "wanted", want, "chosen", allowed, "nofile", lim.Cur)
		return allowed
	}
	log.Info("fetch concurrency", "max_inflight", want, "nofile", lim.Cur)
	return want
}

// healthcheck asks a running service for /healthz, so a container image
// without curl can still have a HEALTHCHECK.
func healthcheck(listen string) error {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return fmt.Errorf("-listen %q: %w", listen, err)
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	client := &http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get("http://" + net.JoinHostPort(host, port) + "/healthz")
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthcheck: status %d", resp.StatusCode)
	}
	return nil
}

// redactDSN hides the password in either DSN form so it can be logged.
func redactDSN(dsn string) string {
	if u, err := url.Parse(dsn); err == nil && u.Scheme != "" {
		// lib/pq also takes the password as a query parameter.
		if q := u.Query(); q.Has("password") {
			q.Set("password", "xxxxx")
			u.RawQuery = q.Encode()
		}
		return u.Redacted()
	}
	fields := strings.Fields(dsn)
	for i, f := range fields {
		if k, _, ok := strings.Cut(f, "="); ok && strings.EqualFold(k, "password") {
			fields[i] = k + "=xxxxx"
		}
	}
	return strings.Join(fields, " ")
}

func servePprof(ctx context.Context, addr string, log *slog.Logger, g *guard) error {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("pprof listen on %s: %w", addr, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		defer g.recover("pprof-server")
		<-ctx.Done()
		_ = srv.Close()
	}()
	go func() {
		defer g.recover("pprof-server")
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("pprof server stopped", "err", err)
		}
	}()
	log.Info("pprof serving", "addr", ln.Addr().String())
	return nil
}

// guard is how every goroutine survives a panic: it logs the stack, counts it,
// and lets the goroutine's owner carry on.
type guard struct {
	log     *slog.Logger
	metrics *metrics
}

// recover must be deferred directly.
func (g *guard) recover(where string) {
	if r := recover(); r != nil {
		g.panicked(where, r)
	}
}

func (g *guard) panicked(where string, r any) {
	g.metrics.panics.Inc()
	g.log.Error("panic recovered", "where", where, "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
}

// loop runs fn until ctx ends, restarting it after a panic so that a bug in
// one round of a background loop never stops the loop for good.
func (g *guard) loop(ctx context.Context, name string, fn func(context.Context)) {
	for ctx.Err() == nil {
		func() {
			defer g.recover(name)
			fn(ctx)
		}()
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
}
