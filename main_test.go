package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestFlagsFallBackToEnvironment(t *testing.T) {
	env := map[string]string{
		"DATABASE_URL":          "postgres://from-env@localhost/db",
		"OBJTRACK_TTL":          "45s",
		"OBJTRACK_MAX_INFLIGHT": "77",
		"OBJTRACK_COALESCE":     "false",
	}
	getenv := func(k string) string { return env[k] }
	cfg, err := parseConfig([]string{"-max-inflight", "99"}, getenv, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.dsn != env["DATABASE_URL"] || cfg.ttl != 45*time.Second || cfg.coalesce {
		t.Errorf("environment not used: %+v", cfg)
	}
	if cfg.maxInflight != 99 {
		t.Errorf("max-inflight %d: the command line must override the environment", cfg.maxInflight)
	}
}

func TestBadConfigurationIsReported(t *testing.T) {
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want string
	}{
		{"no dsn", nil, nil, "-dsn is required"},
		{"bad env value", []string{"-dsn", "x"}, map[string]string{"OBJTRACK_TTL": "soon"}, "OBJTRACK_TTL"},
		{"bad upstream", []string{"-dsn", "x", "-upstream", "localhost:9010"}, nil, "-upstream"},
		{"zero inflight", []string{"-dsn", "x", "-max-inflight", "0"}, nil, "-max-inflight"},
		{"slow journal", []string{"-dsn", "x", "-journal-timeout", "2s"}, nil, "-journal-timeout"},
		{"journal leaves the spill no time", []string{"-dsn", "x", "-journal-timeout", "800ms"}, nil, "-journal-timeout"},
		{"log format", []string{"-dsn", "x", "-log-format", "xml"}, nil, "-log-format"},
		{"stray argument", []string{"-dsn", "x", "extra"}, nil, "unexpected arguments"},
		{"healthcheck path", []string{"-healthcheck", "-healthcheck-path", "readyz"}, nil, "-healthcheck-path"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseConfig(tt.args, func(k string) string { return tt.env[k] }, &bytes.Buffer{})
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %v, want it to mention %q", err, tt.want)
			}
		})
	}
}

func TestHelpListsEveryFlagWithItsEnvironmentVariable(t *testing.T) {
	var out bytes.Buffer
	err := run(context.Background(), []string{"objtrack", "-help"}, func(string) string { return "" }, &out)
	if !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("run -help: %v", err)
	}
	for _, want := range []string{"-listen", "-upstream", "-dsn", "DATABASE_URL", "-ttl", "OBJTRACK_TTL", "-reap-every",
		"-max-inflight", "-max-ids", "-max-body", "-coalesce", "-grace", "-max-backlog", "-journal-timeout", "-lease",
		"-fetch-timeout", "-db-conns", "-log-level", "-log-format", "-pprof", "-healthcheck", "-healthcheck-path", "-version"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("-help does not mention %s", want)
		}
	}
	for _, mode := range []string{"OBJTRACK_HEALTHCHECK", "OBJTRACK_VERSION"} {
		if strings.Contains(out.String(), mode) {
			t.Errorf("-help offers %s, but a flag that changes the mode is read from the command line only", mode)
		}
	}
	if got := strings.Count(out.String(), "(command line only)"); got != len(modeFlags) {
		t.Errorf("-help marks %d flags as command line only, want %d", got, len(modeFlags))
	}
}

// A flag that changes what the program does is not read from the
// environment: OBJTRACK_HEALTHCHECK=true left in a service's environment
// must not turn it into a health-check client that exits at once.
func TestModeFlagsIgnoreEnvironment(t *testing.T) {
	env := map[string]string{
		"OBJTRACK_HEALTHCHECK":      "true",
		"OBJTRACK_HEALTHCHECK_PATH": "/readyz",
		"OBJTRACK_VERSION":          "true",
	}
	getenv := func(k string) string { return env[k] }
	t.Run("parseConfig", func(t *testing.T) {
		cfg, err := parseConfig([]string{"-dsn", "x"}, getenv, &bytes.Buffer{})
		if err != nil {
			t.Fatal(err)
		}
		if cfg.healthcheck || cfg.version || cfg.healthPath != "/healthz" {
			t.Errorf("healthcheck %v, version %v, healthcheck-path %q: want false, false, /healthz", cfg.healthcheck, cfg.version, cfg.healthPath)
		}
	})
	t.Run("run serves", func(t *testing.T) {
		env["DATABASE_URL"] = "postgres://x@127.0.0.1:1/x?sslmode=disable"
		out, err := runStopped(t, env)
		if err != nil || !strings.Contains(out, `msg=serving`) {
			t.Errorf("run: %v, want it to serve (output %q)", err, out)
		}
	})
}

// The password never reaches the logs, whatever the DSN form and however
// the connection fails.
func TestNoPasswordInLogs(t *testing.T) {
	up := newUpstream(t, 0, nil)
	closed := freeAddr(t)
	host, port, _ := strings.Cut(closed, ":")
	for _, dsn := range []string{
		"postgres://app:hunter2-secret@" + closed + "/objects?sslmode=disable&connect_timeout=1",
		"host=" + host + " port=" + port + " user=app password=hunter2-secret dbname=objects sslmode=disable connect_timeout=1",
	} {
		for _, format := range []string{"text", "json"} {
			svc := startService(t, dsn, up.URL, "-log-format", format, "-grace", "200ms")
			post(t, svc.base, idsBody(1, 2))
			eventually(t, readyWithin, "the log to say the database is unavailable", func() bool {
				return strings.Contains(svc.logs.String(), "database unavailable")
			})
			if err := svc.stop(); err != nil {
				t.Fatal(err)
			}
			logs := svc.logs.String()
			if strings.Contains(logs, "hunter2") {
				t.Fatalf("password in the %s logs:\n%s", format, logs)
			}
			if !strings.Contains(logs, "database unavailable") {
				t.Errorf("the %s logs do not say the database is unavailable:\n%s", format, logs)
			}
		}
	}
}

func TestPprofListener(t *testing.T) {
	up := newUpstream(t, 0, nil)
	addr := freeAddr(t)
	startService(t, "postgres://x@127.0.0.1:1/x?sslmode=disable", up.URL, "-pprof", addr)
	resp, err := http.Get("http://" + addr + "/debug/pprof/cmdline")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("pprof: %v %v", resp, err)
	}
	resp.Body.Close()
}

// A -pprof address that is taken stops the start with an error naming it,
// and the service's own address is given back.
func TestPprofAddressTaken(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { taken.Close() })
	listen := freeAddr(t)
	args := []string{"objtrack", "-listen", listen, "-dsn", "postgres://x@127.0.0.1:1/x?sslmode=disable", "-spill-dir", t.TempDir(), "-pprof", taken.Addr().String()}
	err = run(context.Background(), args, func(string) string { return "" }, &bytes.Buffer{})
	if err == nil || !strings.Contains(err.Error(), "pprof listen on "+taken.Addr().String()) {
		t.Fatalf("run with a taken -pprof address: %v, want an error naming it", err)
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		t.Fatalf("-listen %s still held after the failed start: %v", listen, err)
	}
	ln.Close()
}

// -healthcheck asks the running service for -healthcheck-path: /healthz
// answers while the process serves, /readyz only with the database, which
// this service does not have.
func TestHealthcheckFlag(t *testing.T) {
	up := newUpstream(t, 0, nil)
	svc := startService(t, "postgres://x@127.0.0.1:1/x?sslmode=disable", up.URL)
	listen := strings.TrimPrefix(svc.base, "http://")
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		wantErr string // "" for success
	}{
		{"healthz by default", []string{"-listen", listen}, nil, ""},
		{"healthz", []string{"-listen", listen, "-healthcheck-path", "/healthz"}, nil, ""},
		{"readyz without a database", []string{"-listen", listen, "-healthcheck-path", "/readyz"}, nil, "/readyz: status 503"},
		{"unknown path", []string{"-listen", listen, "-healthcheck-path", "/nope"}, nil, "/nope: status 404"},
		{"path not from the environment", []string{"-listen", listen}, map[string]string{"OBJTRACK_HEALTHCHECK_PATH": "/nope"}, ""},
		{"nothing listening", []string{"-listen", freeAddr(t)}, nil, "healthcheck"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"objtrack", "-healthcheck"}, tt.args...)
			err := run(context.Background(), args, func(k string) string { return tt.env[k] }, &bytes.Buffer{})
			switch {
			case tt.wantErr == "" && err != nil:
				t.Errorf("healthcheck: %v, want success", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Errorf("healthcheck: %v, want an error mentioning %q", err, tt.wantErr)
			}
		})
	}
}

var (
	helpLine   = regexp.MustCompile(`^# HELP ([a-z_]+) \S.*$`)
	typeLine   = regexp.MustCompile(`^# TYPE ([a-z_]+) (counter|gauge|histogram)$`)
	sampleLine = regexp.MustCompile(`^([a-z_]+)(\{[a-z_]+="[^"]*"(?:,[a-z_]+="[^"]*")*\})? (\S+)$`)
)

// The exposition parses as Prometheus text format, names follow the
// conventions, and the counters move when callbacks flow.
func TestMetricsExposition(t *testing.T) {
	dsn := testDSN(t)
	up := newUpstream(t, 0, nil)
	svc := startService(t, dsn, up.URL)
	svc.waitReady(t)
	postTimed(t, svc.base, 1, 2, 3, 4)
	post(t, svc.base, "nonsense")
	eventually(t, landWithin, "callback applied", func() bool { return svc.metric(t, "objtrack_callbacks_applied_total") == 1 })

	resp, err := http.Get(svc.base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain; version=0.0.4") {
		t.Errorf("Content-Type %q", ct)
	}
	var body bytes.Buffer
	_, _ = body.ReadFrom(resp.Body)
	types := map[string]string{}
	lastBucket := map[string]float64{}
	for _, line := range strings.Split(strings.TrimSuffix(body.String(), "\n"), "\n") {
		if m := typeLine.FindStringSubmatch(line); m != nil {
			types[m[1]] = m[2]
			if m[2] == "counter" && !strings.HasSuffix(m[1], "_total") {
				t.Errorf("counter %s does not end in _total", m[1])
			}
			continue
		}
		if helpLine.MatchString(line) {
			continue
		}
		m := sampleLine.FindStringSubmatch(line)
		if m == nil {
			t.Errorf("unparseable line %q", line)
			continue
		}
		v, err := strconv.ParseFloat(m[3], 64)
		if err != nil {
			t.Errorf("value in %q: %v", line, err)
		}
		name := m[1]
		base := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(name, "_bucket"), "_sum"), "_count")
		if types[name] == "" && types[base] != "histogram" {
			t.Errorf("sample %s has no TYPE line before it", name)
		}
		if strings.HasSuffix(name, "_bucket") {
			if v < lastBucket[base] {
				t.Errorf("histogram %s buckets not cumulative at %q", base, line)
			}
			lastBucket[base] = v
		}
	}
	for name, want := range map[string]float64{
		"objtrack_callbacks_accepted_total":                    1,
		`objtrack_callbacks_rejected_total{reason="bad_json"}`: 1,
		"objtrack_ids_received_total":                          4,
		`objtrack_fetches_total{outcome="online"}`:             2,
		`objtrack_fetches_total{outcome="offline"}`:            2,
		"objtrack_rows_upserted_total":                         2,
		"objtrack_journal_writes_total":                        1,
		"objtrack_database_up":                                 1,
		"objtrack_callback_completion_seconds_count":           1,
		"objtrack_fetch_duration_seconds_count":                4,
		"objtrack_callback_answer_seconds_count":               1,
	} {
		if got := svc.metric(t, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
}

// /readyz follows the database: 503 with the reason while it is away, 200
// once it is back; /healthz stays 200 throughout.
func TestReadyzFollowsDatabase(t *testing.T) {
	proxy := newTCPProxy(t, "")
	dsn := proxy.dsn(t, testDSN(t))
	proxy.setUp(true)
	svc := startService(t, dsn, newUpstream(t, 0, nil).URL)
	status := func(path string) int {
		resp, err := http.Get(svc.base + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	eventually(t, readyWithin, "ready", func() bool { return status("/readyz") == 200 })
	proxy.setUp(false)
	eventually(t, readyWithin, "not ready while the database is away", func() bool { return status("/readyz") == 503 })
	if status("/healthz") != 200 {
		t.Error("healthz not 200 while the database is away")
	}
	_, body := getBody(t, svc.base+"/readyz")
	if !strings.Contains(body, "database not available") {
		t.Errorf("readyz body %q does not give the reason", body)
	}
	proxy.setUp(true)
	eventually(t, readyWithin, "ready again", func() bool { return status("/readyz") == 200 })
}

func getBody(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	_, _ = b.ReadFrom(resp.Body)
	return resp.StatusCode, b.String()
}
