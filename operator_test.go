package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/lib/pq"
)

// A configuration the service cannot run with is one line per mistake on
// stderr, naming the flag or environment variable, the value and an
// example, and exit code 2; the usage goes out with -help only.
func TestConfigurationErrorsSayWhatToDo(t *testing.T) {
	tests := []struct {
		name  string
		args  []string
		env   map[string]string
		lines []string // each printed line, exactly
	}{
		{"bad duration flag", []string{"-dsn", "x", "-ttl", "soon"}, nil,
			[]string{`objtrack: -ttl "soon": not a valid duration; for example -ttl 30s`}},
		{"bad int flag", []string{"-dsn", "x", "-max-ids", "many"}, nil,
			[]string{`objtrack: -max-ids "many": not a valid int; for example -max-ids 10000`}},
		{"bad bool flag", []string{"-dsn", "x", "-coalesce=maybe"}, nil,
			[]string{`objtrack: -coalesce "maybe": not a valid bool; for example -coalesce true`}},
		{"bad environment variable", []string{"-dsn", "x"}, map[string]string{"OBJTRACK_TTL": "soon"},
			[]string{`objtrack: environment OBJTRACK_TTL="soon": not a valid duration; for example OBJTRACK_TTL=30s`}},
		{"unknown flag", []string{"-dsn", "x", "-tll", "30s"}, nil,
			[]string{`objtrack: flag provided but not defined: -tll (objtrack -help lists the flags)`}},
		{"invalid value from the environment", []string{"-dsn", "x"}, map[string]string{"OBJTRACK_TTL": "-1s"},
			[]string{`objtrack: OBJTRACK_TTL (-ttl) "-1s": must be positive; for example OBJTRACK_TTL=30s`}},
		{"several invalid values", []string{"-dsn", "x", "-ttl", "0s", "-log-format", "xml"}, nil, []string{
			`objtrack: -ttl "0s": must be positive; for example -ttl 30s`,
			`objtrack: -log-format "xml": want text or json; for example -log-format text`,
		}},
		{"no dsn", nil, nil,
			[]string{`objtrack: -dsn is required: set DATABASE_URL in the environment (keeps the password out of ps), e.g. DATABASE_URL=postgres://objtrack@db.internal/objtrack`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			args := append([]string{"objtrack"}, tt.args...)
			code := exitCode(run(context.Background(), args, func(k string) string { return tt.env[k] }, &stdout), &stderr)
			if code != exitUsage {
				t.Errorf("exit code %d, want %d", code, exitUsage)
			}
			if stdout.Len() != 0 {
				t.Errorf("stdout %q, want nothing (the usage is for -help)", stdout.String())
			}
			got := strings.Split(strings.TrimSuffix(stderr.String(), "\n"), "\n")
			if strings.Join(got, "\n") != strings.Join(tt.lines, "\n") {
				t.Errorf("stderr:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tt.lines, "\n"))
			}
		})
	}
}

func TestHelpGoesToStdoutWithExitZero(t *testing.T) {
	var stdout, stderr bytes.Buffer
	code := exitCode(run(context.Background(), []string{"objtrack", "-help"}, func(string) string { return "" }, &stdout), &stderr)
	if code != 0 || stderr.Len() != 0 || !strings.Contains(stdout.String(), "Usage: objtrack") {
		t.Errorf("-help: exit %d, stderr %q, stdout %q; want 0, nothing, the usage", code, stderr.String(), stdout.String())
	}
	// The usage text still reads the flags' types and defaults (the error
	// path wraps the flag values while parsing).
	if !strings.Contains(stdout.String(), "-ttl duration") || !strings.Contains(stdout.String(), "(default 30s)") {
		t.Errorf("-help lost the flags' types or defaults:\n%s", stdout.String())
	}
}

// A listen address in use names both ways to choose another.
func TestListenErrorNamesFlagAndVariable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	up := newUpstream(t, 0, nil)
	args := []string{"objtrack", "-listen", ln.Addr().String(), "-upstream", up.URL, "-dsn", "postgres://x@127.0.0.1:1/x?sslmode=disable"}
	var stderr bytes.Buffer
	code := exitCode(run(context.Background(), args, func(string) string { return "" }, io.Discard), &stderr)
	if code != exitFailure || !strings.Contains(stderr.String(), "-listen") || !strings.Contains(stderr.String(), "OBJTRACK_LISTEN") ||
		!strings.Contains(stderr.String(), "address already in use") || strings.Count(stderr.String(), "\n") != 1 {
		t.Errorf("exit %d, stderr %q: want 1 and one line naming -listen, OBJTRACK_LISTEN and the cause", code, stderr.String())
	}
}

// A DSN the driver rejects keeps the driver's hint; only what may be a
// password goes.
func TestDSNErrorKeepsTheDriversHint(t *testing.T) {
	tests := []struct{ dsn, want string }{
		{"localhost", `-dsn localhost: missing "=" after "localhost" in connection info string`},
		{"host=localhost dbname", `-dsn host=localhost dbname: missing "=" after "dbname" in connection info string`},
		{"host=db password=Sup3r Secret", `-dsn host=db password=xxxxx ...: missing "=" after "..." in connection info string`},
		{"app:Sup3rSecret@db/objects", `-dsn ...: missing "=" after "..." in connection info string`},
	}
	for _, tt := range tests {
		_, err := pq.NewConnector(tt.dsn)
		if err == nil {
			t.Fatalf("lib/pq accepts %q", tt.dsn)
		}
		if got := dsnError(tt.dsn, err).Error(); got != tt.want {
			t.Errorf("dsnError(%q) = %q, want %q", tt.dsn, got, tt.want)
		}
	}
}

// /debug/pprof/cmdline serves the command line with the DSN's password
// hidden, however -dsn was written.
func TestPprofCmdlineHidesPassword(t *testing.T) {
	for _, tt := range []struct{ args, want []string }{
		{[]string{"objtrack", "-dsn", "postgres://app:hunter2@db/x"}, []string{"objtrack", "-dsn", "postgres://app:xxxxx@db/x"}},
		{[]string{"objtrack", "--dsn=host=db password=hunter2"}, []string{"objtrack", "--dsn=host=db password=xxxxx"}},
		{[]string{"objtrack", "-ttl", "5s", "-dsn=postgres://app:hunter2@db/x", "-dsn"}, []string{"objtrack", "-ttl", "5s", "-dsn=postgres://app:xxxxx@db/x", "-dsn"}},
	} {
		if got := redactArgs(tt.args); strings.Join(got, " ") != strings.Join(tt.want, " ") {
			t.Errorf("redactArgs(%q) = %q, want %q", tt.args, got, tt.want)
		}
	}

	saved := os.Args
	t.Cleanup(func() { os.Args = saved })
	os.Args = []string{"objtrack", "-dsn", "postgres://app:hunter2@127.0.0.1:1/x?sslmode=disable", "-ttl", "30s"}
	up := newUpstream(t, 0, nil)
	addr := freeAddr(t)
	startService(t, "postgres://x@127.0.0.1:1/x?sslmode=disable", up.URL, "-pprof", addr)
	resp, err := http.Get("http://" + addr + "/debug/pprof/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	want := "objtrack\x00-dsn\x00postgres://app:xxxxx@127.0.0.1:1/x?sslmode=disable\x00-ttl\x0030s"
	if resp.StatusCode != http.StatusOK || string(body) != want {
		t.Errorf("cmdline: %d %q, want 200 %q", resp.StatusCode, body, want)
	}
}

// The simulator redacts its database errors with a copy of dsn.go (it is
// another package main); the copy must not drift from the original.
func TestSimDSNIsACopy(t *testing.T) {
	if readDoc(t, "dsn.go") != readDoc(t, "sim/dsn.go") {
		t.Error("sim/dsn.go differs from dsn.go: copy it again (cp dsn.go sim/dsn.go)")
	}
}

// The example an error offers for each flag is a value the flag accepts.
func TestFlagExamplesAreAccepted(t *testing.T) {
	for _, name := range helpFlagNames(t) {
		if modeFlags[name] {
			continue
		}
		example := flagExamples[name]
		args := []string{"-dsn", "x"}
		if example != "" {
			args = append(args, "-"+name+"="+example)
		}
		if _, err := parseConfig(args, func(string) string { return "" }, io.Discard); err != nil {
			t.Errorf("-%s=%s: %v", name, example, err)
		}
	}
}
