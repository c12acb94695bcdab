// Command objtrack takes callbacks that name objects, asks the object service
// about each one, and keeps the online objects in PostgreSQL with the time the
// callback was received, forgetting them once they stop arriving.
//
// The callback path reads decode.go → handler.go → pipeline.go → writer.go
// (the journal row) → fetcher.go → writer.go (the upsert) → store.go;
// journal.go and reaper.go are the background loops, app.go wires it all.
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
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := exitCode(run(ctx, os.Args, os.Getenv, os.Stdout), os.Stderr)
	stop()
	os.Exit(code)
}

// Exit codes: 2 for a command line or environment the service cannot run
// with, as command-line usage errors conventionally do; 1 for a failure.
const (
	exitFailure = 1
	exitUsage   = 2
)

// exitCode prints run's error to stderr, one line per error with the
// program's name in front, and returns the exit code for it.
func exitCode(err error, stderr io.Writer) int {
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return 0
	}
	var errs []error
	if joined, ok := unwrapJoined(err); ok {
		errs = joined
	} else {
		errs = []error{err}
	}
	for _, e := range errs {
		for _, line := range strings.Split(e.Error(), "\n") {
			fmt.Fprintln(stderr, "objtrack:", line)
		}
	}
	if errors.As(err, new(usageError)) {
		return exitUsage
	}
	return exitFailure
}

// unwrapJoined returns the errors that errors.Join put together in err (or
// in the usageError around it).
func unwrapJoined(err error) ([]error, bool) {
	if u, ok := err.(usageError); ok {
		err = u.err
	}
	j, ok := err.(interface{ Unwrap() []error })
	if !ok {
		return nil, false
	}
	return j.Unwrap(), true
}

// run is the whole service: parse, build, serve. main only adds the signal
// context, so tests start it in-process with their own arguments and
// environment.
func run(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	cfg, err := parseConfig(args[1:], getenv, stdout)
	if err != nil {
		return err
	}
	if cfg.version {
		_, err := fmt.Fprintln(stdout, readBuildInfo())
		return err
	}
	if cfg.healthcheck {
		return healthcheck(cfg.listen, cfg.healthPath)
	}
	log := newLogger(cfg, stdout)
	cfg = fitFDBudget(cfg, log)
	applyMemoryBudget(cfg, getenv, log)
	a, err := newApp(cfg, log, nil)
	if err != nil {
		return err
	}
	return serve(ctx, a)
}

// HTTP server limits: a slow sender cannot hold a connection or a handler
// for long, and headers stay small.
const (
	readHeaderTimeout = 2 * time.Second
	readTimeout       = 5 * time.Second
	writeTimeout      = 10 * time.Second
	idleTimeout       = 2 * time.Minute
	maxHeaderBytes    = 64 << 10
)

// serve starts the app and its listener, and on ctx's end shuts down in
// order: stop taking callbacks, let what is in memory finish within the
// grace period, journal whatever is left for the next start.
func serve(ctx context.Context, a *app) error {
	cfg, log := a.cfg, a.log
	inner, err := net.Listen("tcp", cfg.listen)
	if err != nil {
		a.close()
		return fmt.Errorf("listen on %s (set by -listen or OBJTRACK_LISTEN; choose a free address): %w", cfg.listen, err)
	}
	ln := newLimitListener(inner, cfg.maxConns, a.metrics, newFDGuard(fdAccept, log, a.metrics))
	a.start()
	srv := &http.Server{
		Handler:           a.handler(),
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		ConnState:         ln.connState,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	// pprof listens before the service serves: once /healthz answers,
	// every listener is there.
	if cfg.pprofAddr != "" {
		if err := servePprof(a.bg, cfg.pprofAddr, log, a.guard); err != nil {
			_ = ln.Close()
			a.close()
			return err
		}
	}
	serveErr := make(chan error, 1)
	go func() {
		defer a.guard.catch("http-server")
		serveErr <- srv.Serve(ln)
	}()
	build := readBuildInfo()
	log.Info("serving", "version", build.version, "revision", build.revisionLabel(), "listen", ln.Addr().String(), "upstream", cfg.upstream,
		"database", redactDSN(cfg.dsn), "ttl", cfg.ttl, "max_inflight", cfg.maxInflight,
		"coalesce", cfg.coalesce, "max_backlog", cfg.maxBacklog)

	select {
	case <-ctx.Done():
	case err := <-serveErr:
		a.close()
		return fmt.Errorf("http server: %w", err)
	}
	log.Info("shutting down", "grace", cfg.grace)
	shutCtx, cancel := context.WithTimeout(context.Background(), cfg.grace)
	defer cancel()
	if err := srv.Shutdown(shutCtx); err != nil {
		log.Warn("http shutdown incomplete", "err", err)
		_ = srv.Close()
	}
	err = a.shutdown(shutCtx)
	log.Info("stopped")
	return err
}

// healthcheck asks a running service for path (/healthz or /readyz), so a
// container image without curl can still have a HEALTHCHECK.
func healthcheck(listen, path string) error {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return fmt.Errorf("-listen %q: %w", listen, err)
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	client := &http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get("http://" + net.JoinHostPort(host, port) + path)
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthcheck %s: status %d", path, resp.StatusCode)
	}
	return nil
}

func servePprof(ctx context.Context, addr string, log *slog.Logger, g *guard) error {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	// pprof.Cmdline would serve os.Args, -dsn and its password included.
	mux.HandleFunc("/debug/pprof/cmdline", redactedCmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("pprof listen on %s: %w", addr, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		defer g.catch("pprof-server")
		<-ctx.Done()
		_ = srv.Close()
	}()
	go func() {
		defer g.catch("pprof-server")
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("pprof server stopped", "err", err)
		}
	}()
	log.Info("pprof serving", "addr", ln.Addr().String())
	return nil
}

// redactedCmdline answers as pprof.Cmdline does (the arguments separated by
// NUL bytes), with the DSN's password hidden: -dsn's value, in any of the
// flag package's forms, goes through redactDSN.
func redactedCmdline(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	fmt.Fprint(w, strings.Join(redactArgs(os.Args), "\x00"))
}

// redactArgs returns args with the value of every -dsn (or --dsn) hidden by
// redactDSN, whether given as "-dsn=VALUE" or as "-dsn VALUE".
func redactArgs(args []string) []string {
	out := make([]string, len(args))
	copy(out, args)
	for i := 1; i < len(out); i++ {
		name, value, hasValue := strings.Cut(strings.TrimLeft(out[i], "-"), "=")
		if !strings.HasPrefix(out[i], "-") || name != "dsn" {
			continue
		}
		if hasValue {
			out[i] = out[i][:len(out[i])-len(value)] + redactDSN(value)
		} else if i+1 < len(out) {
			out[i+1] = redactDSN(out[i+1])
			i++
		}
	}
	return out
}
