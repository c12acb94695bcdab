package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"strings"
	"time"
)

// config is everything the flags set.
type config struct {
	listen         string
	upstream       string
	dsn            string
	ttl            time.Duration
	reapEvery      time.Duration
	maxInflight    int
	maxConns       int
	maxIDs         int
	maxBody        int64
	coalesce       bool
	grace          time.Duration
	maxBacklog     int
	maxBacklogIDs  int
	maxMemory      int64 // bytes: the budget the backlog bounds and GOMEMLIMIT come from (memory.go)
	journalTimeout time.Duration
	spillDir       string
	maxQueueWait   time.Duration
	lease          time.Duration
	fetchTimeout   time.Duration
	dbConns        int
	logLevel       string
	logFormat      string
	pprofAddr      string
	healthcheck    bool
	healthPath     string
	version        bool
}

// defaultSpillDir is relative to the working directory, so that `go run .`
// from a clean clone works; the container runs in / and mounts its volume
// at /objtrack-spill.
const defaultSpillDir = "objtrack-spill"

// modeFlags change what the program does instead of how the service runs;
// they come from the command line only, so that an environment meant for
// the service (OBJTRACK_HEALTHCHECK=true, say) cannot turn it into a
// one-shot client that exits.
var modeFlags = map[string]bool{"healthcheck": true, "healthcheck-path": true, "version": true}

// envName is the environment variable that backs a flag: DATABASE_URL for
// -dsn (the usual name), OBJTRACK_<FLAG> for the rest.
func envName(flagName string) string {
	if flagName == "dsn" {
		return "DATABASE_URL"
	}
	return "OBJTRACK_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// flagExamples are the values an error message offers for flags whose
// default is not a good example (empty, or 0 meaning "derived").
var flagExamples = map[string]string{
	"dsn":             "postgres://objtrack@db.internal/objtrack",
	"pprof":           "localhost:6060",
	"max-conns":       "4096",
	"spill-dir":       "/var/lib/objtrack/spill",
	"max-backlog":     "20000",
	"max-backlog-ids": "4000000",
}

// flagExample is a value that -name accepts: the example above, or else its
// default.
func flagExample(f *flag.Flag) string {
	if v, ok := flagExamples[f.Name]; ok {
		return v
	}
	return f.DefValue
}

// usageError is a configuration the service cannot run with: main prints it
// without the usage text and exits 2, as command-line usage errors
// conventionally do. It may join several errors, one line each.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// recordingValue wraps a flag's value to remember the first value it
// rejected, so that the error can name the flag, the value and an example
// in one line, where the flag package has its own wording.
type recordingValue struct {
	flag.Value
	rejected **rejectedValue
	name     string
}

type rejectedValue struct {
	name, value string
	err         error
}

func (v recordingValue) Set(s string) error {
	err := v.Value.Set(s)
	if err != nil && *v.rejected == nil {
		*v.rejected = &rejectedValue{v.name, s, err}
	}
	return err
}

// IsBoolFlag keeps boolean flags usable without a value (-coalesce).
func (v recordingValue) IsBoolFlag() bool {
	b, ok := v.Value.(interface{ IsBoolFlag() bool })
	return ok && b.IsBoolFlag()
}

// valueError says what is wrong with a value the flag package rejected: its
// own "parse error" becomes "not a duration" (or int, ...).
func valueError(f *flag.Flag, err error) string {
	if err.Error() == "parse error" {
		typ, _ := flag.UnquoteUsage(f)
		if typ == "" {
			typ = "bool"
		}
		return "not a valid " + typ
	}
	return err.Error()
}

// settingName is how an error names where a flag's value came from: the
// flag, or the environment variable that set it.
type settingName func(flagName string) string

// parseConfig reads flags from args, falling back to the environment for any
// flag not given on the command line. With -help it writes the usage to out
// and returns flag.ErrHelp; every other error is a usageError.
func parseConfig(args []string, getenv func(string) string, out io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("objtrack", flag.ContinueOnError)
	// The flag package would print each error and the whole usage; the
	// error alone, as one line, says more (the usage is for -help).
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	fs.StringVar(&c.listen, "listen", "localhost:9090", "address to serve callbacks, /healthz, /readyz and /metrics on")
	fs.StringVar(&c.upstream, "upstream", "http://localhost:9010", "base URL of the object service; objects are fetched from {upstream}/objects/{id}")
	fs.StringVar(&c.dsn, "dsn", "", "PostgreSQL connection string (URL or key=value); prefer DATABASE_URL, since ps shows the command line; the password is never logged")
	fs.DurationVar(&c.ttl, "ttl", 30*time.Second, "forget an object this long after the last callback that named it")
	fs.DurationVar(&c.reapEvery, "reap-every", time.Second, "how often the reaper deletes rows older than -ttl")
	fs.IntVar(&c.maxInflight, "max-inflight", 16384, "most fetches in flight to the object service at once, across all callbacks; capped by the open-file limit")
	fs.IntVar(&c.maxConns, "max-conns", 0, "most inbound connections open at once; past it idle ones are closed, longest idle first, then new ones get 503 (0: an eighth of the open-file limit; capped by it)")
	fs.IntVar(&c.maxIDs, "max-ids", 10000, "most object ids accepted in one callback")
	fs.Int64Var(&c.maxBody, "max-body", 1<<20, "largest callback body accepted, in bytes")
	fs.BoolVar(&c.coalesce, "coalesce", true, "let concurrent lookups of the same id share one request to the object service")
	fs.DurationVar(&c.grace, "grace", 10*time.Second, "on SIGTERM/SIGINT, how long to finish in-flight callbacks before leaving the rest in the journal")
	memory := byteSize(defaultMemoryBudget)
	fs.Var(&memory, "max-memory", "memory budget of the process in `bytes` (like 2GiB or 512MiB): the fetches in flight take their share, the default -max-backlog and\n-max-backlog-ids are derived from the rest, and it is the Go runtime's soft memory limit unless GOMEMLIMIT is set")
	fs.IntVar(&c.maxBacklog, "max-backlog", 0, "most callbacks held in memory; past it callbacks get 503 with Retry-After (0: derived from -max-memory)")
	fs.IntVar(&c.maxBacklogIDs, "max-backlog-ids", 0, "most object ids held in memory across callbacks; past it callbacks get 503 with Retry-After (0: derived from -max-memory)")
	fs.DurationVar(&c.journalTimeout, "journal-timeout", 500*time.Millisecond, "how long a callback's answer waits for its journal row; a write still in progress then goes on, counted as late, and the callback is spilled; past 800ms from receipt with neither record it gets 503")
	fs.StringVar(&c.spillDir, "spill-dir", defaultSpillDir, "directory of this instance's local spill journal, where a callback is made durable when PostgreSQL is down or its journal commit misses -journal-timeout;\nlocked while in use: one directory (one volume) per instance")
	fs.DurationVar(&c.lease, "lease", 5*time.Second, "how long an instance's journal rows stay its own after it last renewed its lease (every second);\nanother instance takes them over after that")
	fs.DurationVar(&c.maxQueueWait, "max-queue-wait", 5*time.Second, "longest a new callback's ids may wait for a fetch slot, at the fetch rate measured now; past it, callbacks get 503 with Retry-After (capped at 5/6 of -ttl)")
	fs.DurationVar(&c.fetchTimeout, "fetch-timeout", 5*time.Second, "time limit for one request to the object service (it may take up to 4s)")
	fs.IntVar(&c.dbConns, "db-conns", 12, "most open PostgreSQL connections")
	fs.StringVar(&c.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.StringVar(&c.logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&c.pprofAddr, "pprof", "", "serve net/http/pprof on this address (off when empty)")
	fs.BoolVar(&c.healthcheck, "healthcheck", false, "only check that the service at -listen answers -healthcheck-path with 200, exit 0 if so (for container health checks)")
	fs.StringVar(&c.healthPath, "healthcheck-path", "/healthz", "the path -healthcheck asks for: /healthz (the process serves) or /readyz (PostgreSQL is there too)")
	fs.BoolVar(&c.version, "version", false, "print the version and VCS revision, then exit")

	// The environment fills in defaults; the command line overrides it.
	var envErr error
	fromEnv := map[string]bool{}
	fs.VisitAll(func(f *flag.Flag) {
		if modeFlags[f.Name] {
			f.Usage += " (command line only)"
			return
		}
		env := envName(f.Name)
		f.Usage += fmt.Sprintf(" (env %s)", env)
		if v := getenv(env); v != "" && envErr == nil {
			if err := f.Value.Set(v); err != nil {
				envErr = fmt.Errorf("environment %s=%q: %s; for example %s=%s", env, v, valueError(f, err), env, flagExample(f))
			}
			fromEnv[f.Name] = true
		}
	})
	if envErr != nil {
		return c, usageError{envErr}
	}
	var rejected *rejectedValue
	fs.VisitAll(func(f *flag.Flag) {
		f.Value = recordingValue{Value: f.Value, rejected: &rejected, name: f.Name}
	})
	err := fs.Parse(args)
	// The flag package reads the values' types for the usage text.
	fs.VisitAll(func(f *flag.Flag) { f.Value = f.Value.(recordingValue).Value })
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			printUsage(fs, out)
			return c, err
		}
		if r := rejected; r != nil {
			f := fs.Lookup(r.name)
			return c, usageError{fmt.Errorf("-%s %q: %s; for example -%s %s", r.name, r.value, valueError(f, r.err), r.name, flagExample(f))}
		}
		return c, usageError{fmt.Errorf("%w (objtrack -help lists the flags)", err)}
	}
	if fs.NArg() > 0 {
		return c, usageError{fmt.Errorf("unexpected arguments: %q (flags take -name value; objtrack -help lists them)", fs.Args())}
	}
	fs.Visit(func(f *flag.Flag) { delete(fromEnv, f.Name) })
	name := func(flagName string) string {
		if fromEnv[flagName] {
			return envName(flagName) + " (-" + flagName + ")"
		}
		return "-" + flagName
	}
	c.maxMemory = int64(memory)
	if err := c.validate(fs, name); err != nil {
		return c, usageError{err}
	}
	if err := c.deriveBacklog(name); err != nil {
		return c, usageError{err}
	}
	return c, nil
}

// deriveBacklog sets the backlog bounds not given (0) from -max-memory. It
// plans with the fetch slots the descriptor budget will leave (budget.go):
// -max-inflight, unless the open-file limit lowers it.
func (c *config) deriveBacklog(name settingName) error {
	if c.maxBacklog > 0 && c.maxBacklogIDs > 0 {
		return nil
	}
	nofile, _ := openFileLimit() // on error, the usual limit: fewer slots, a larger backlog, as fitFDBudget will choose
	inflight := planFDBudget(nofile, c.dbConns, c.maxInflight, c.maxConns).fetch
	b, err := planBacklog(c.maxMemory, inflight)
	if err != nil {
		example := "-max-memory " + formatBytes(minBudgetFor(inflight))
		if n := name("max-memory"); n != "-max-memory" {
			example = envName("max-memory") + "=" + formatBytes(minBudgetFor(inflight))
		}
		return fmt.Errorf("%s %q: %w; for example %s", name("max-memory"), formatBytes(c.maxMemory), err, example)
	}
	if c.maxBacklog == 0 {
		c.maxBacklog = b.callbacks
	}
	if c.maxBacklogIDs == 0 {
		c.maxBacklogIDs = b.ids
	}
	return nil
}

func printUsage(fs *flag.FlagSet, out io.Writer) {
	fs.SetOutput(out)
	fmt.Fprintf(out, "Usage: objtrack [flags]\n\nServes POST /callback {\"object_ids\":[...]}, looks each id up at {upstream}/objects/{id},\nand keeps online objects in the PostgreSQL table objects(id, last_seen).\n\nFlags (each falls back to the environment variable shown; those that make\nobjtrack do something else than serve are read from the command line only):\n")
	fs.PrintDefaults()
}

// validate checks the values together; each error names the flag (or the
// environment variable that set it), the value and an example.
func (c config) validate(fs *flag.FlagSet, name settingName) error {
	var errs []error
	check := func(ok bool, flagName, want string) {
		if ok {
			return
		}
		f := fs.Lookup(flagName)
		example := "-" + flagName + " " + flagExample(f)
		if n := name(flagName); n != "-"+flagName {
			example = envName(flagName) + "=" + flagExample(f)
		}
		errs = append(errs, fmt.Errorf("%s %q: %s; for example %s", name(flagName), f.Value.String(), want, example))
	}
	u, err := url.Parse(c.upstream)
	check(err == nil && (u.Scheme == "http" || u.Scheme == "https") && u.Host != "", "upstream", "want an http(s) URL with a host")
	if c.dsn == "" && !c.healthcheck && !c.version {
		errs = append(errs, errors.New("-dsn is required: set DATABASE_URL in the environment (keeps the password out of ps), e.g. DATABASE_URL=postgres://objtrack@db.internal/objtrack"))
	}
	check(strings.HasPrefix(c.healthPath, "/"), "healthcheck-path", "want a path starting with /")
	check(c.ttl > 0, "ttl", "must be positive")
	check(c.reapEvery > 0, "reap-every", "must be positive")
	check(c.maxInflight > 0, "max-inflight", "must be positive")
	check(c.maxConns >= 0, "max-conns", "must not be negative (0: the default share)")
	check(c.maxIDs > 0, "max-ids", "must be positive")
	check(c.maxBody > 0, "max-body", "must be positive")
	check(c.grace >= 0, "grace", "must not be negative")
	check(c.maxBacklog >= 0, "max-backlog", "must not be negative (0: derived from -max-memory)")
	check(c.maxBacklogIDs >= 0, "max-backlog-ids", "must not be negative (0: derived from -max-memory)")
	check(c.maxMemory >= minMemoryBudget, "max-memory", "must be at least "+formatBytes(minMemoryBudget))
	check(c.journalTimeout > 0 && c.journalTimeout < answerBy, "journal-timeout", "must be between 0 and "+answerBy.String()+" (the latest answer; the spill needs the rest of it)")
	check(c.spillDir != "", "spill-dir", "must not be empty")
	check(c.lease >= time.Second, "lease", "must be at least 1s")
	check(c.fetchTimeout > 0, "fetch-timeout", "must be positive")
	check(c.maxQueueWait > 0, "max-queue-wait", "must be positive")
	check(c.dbConns >= 4, "db-conns", "must be at least 4")
	check(c.logFormat == "text" || c.logFormat == "json", "log-format", "want text or json")
	var lvl slog.Level
	check(lvl.UnmarshalText([]byte(c.logLevel)) == nil, "log-level", "want debug, info, warn or error")
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
