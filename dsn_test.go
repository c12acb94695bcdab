package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/lib/pq"
)

// dsnCases are DSNs in every form, well-formed or not, with the pieces of
// their password that must never be printed.
var dsnCases = []struct {
	name, dsn string
	redacted  string   // what redactDSN prints
	secrets   []string // pieces of the password
}{
	{"url", "postgres://app:Sup3rSecret@db:5432/objects?sslmode=disable",
		"postgres://app:xxxxx@db:5432/objects?sslmode=disable", []string{"Sup3rSecret"}},
	{"url without password", "postgresql://app@db/objects",
		"postgresql://app@db/objects", nil},
	{"url, escaped password", "postgres://app:Sup3r%40Secret@db/objects",
		"postgres://app:xxxxx@db/objects", []string{"Sup3r", "Secret"}},
	{"url, bad port", "postgres://app:Sup3rSecret@db:badport/objects",
		"postgres://app:xxxxx@db:badport/objects", []string{"Sup3r", "Secret"}},
	{"url, bad escape", "postgres://app:Sup3r%tSecret@db/objects",
		"postgres://app:xxxxx@db/objects", []string{"Sup3r", "Secret"}},
	{"url, unescaped @ / ? in password", "postgres://app:Sup3r@Se/cr?et@db/objects",
		"postgres://app:xxxxx@db/objects", []string{"Sup3r", "Se/cr", "et@"}},
	{"url, password parameter", "postgres://app@db/objects?sslmode=disable&password=Sup3rSecret",
		"postgres://app@db/objects?sslmode=disable&password=xxxxx", []string{"Sup3rSecret"}},
	{"url, escaped password parameter", "postgres://db/objects?pass%77ord=Sup3r%tSecret",
		"postgres://db/objects?pass%77ord=xxxxx", []string{"Sup3r", "Secret"}},
	{"url, parameter holding @", "postgres://db/objects?password=Sup3r@Secret",
		"postgres://db/objects?password=xxxxx", []string{"Sup3r", "Secret"}},
	{"url, sslpassword parameter", "postgres://app@db/objects?sslpassword=Sup3rSecret",
		"postgres://app@db/objects?sslpassword=xxxxx", []string{"Sup3rSecret"}},
	{"key=value", "host=db user=app password=Sup3rSecret dbname=objects",
		"host=db user=app password=xxxxx dbname=objects", []string{"Sup3rSecret"}},
	{"key=value, quoted with a space", "host=db password='Sup3r Secret' dbname=objects",
		"host=db password=xxxxx dbname=objects", []string{"Sup3r", "Secret"}},
	{"key=value, quoted with escaped quotes", `host=db password='Sup3r\' \\Secret' dbname=objects`,
		"host=db password=xxxxx dbname=objects", []string{"Sup3r", "Secret"}},
	{"key=value, escaped space", `password=Sup3r\ Secret host=db`,
		"password=xxxxx host=db", []string{"Sup3r", "Secret"}},
	{"key=value, spaces around =", "host = db password = Sup3rSecret",
		"host=db password=xxxxx", []string{"Sup3rSecret"}},
	{"key=value, upper case key", "PASSWORD=Sup3rSecret host=db",
		"PASSWORD=xxxxx host=db", []string{"Sup3rSecret"}},
	{"key=value, key without value after a quoted password", "host=db password='Sup3r Secret' port",
		"host=db password=xxxxx ...", []string{"Sup3r", "Secret"}},
	{"key=value, unquoted space in password", "host=db password=Sup3r Secret",
		"host=db password=xxxxx ...", []string{"Sup3r", "Secret"}},
	{"key=value, unterminated quote", "host=db password='Sup3r Secret",
		"host=db ...", []string{"Sup3r", "Secret"}},
	{"key=value, trailing backslash", `host=db password=Sup3rSecret\`,
		"host=db ...", []string{"Sup3r", "Secret"}},
	{"not a DSN", "mysql:Sup3rSecret",
		"...", []string{"Sup3rSecret"}},
	{"empty", "", "", nil},
}

func TestRedactDSN(t *testing.T) {
	for _, tt := range dsnCases {
		t.Run(tt.name, func(t *testing.T) {
			got := redactDSN(tt.dsn)
			if got != tt.redacted {
				t.Errorf("redactDSN(%q) = %q, want %q", tt.dsn, got, tt.redacted)
			}
			assertNoSecret(t, "redactDSN", got, tt.secrets)
		})
	}
}

// The driver's error for a DSN it rejects repeats what it could not parse;
// dsnError keeps what is safe of it and none of the password.
func TestRedactDSNErrors(t *testing.T) {
	for _, tt := range dsnCases {
		t.Run(tt.name, func(t *testing.T) {
			_, err := pq.NewConnector(tt.dsn)
			if err == nil {
				t.Skip("lib/pq accepts this DSN")
			}
			got := dsnError(tt.dsn, err).Error()
			assertNoSecret(t, "dsnError", got, tt.secrets)
			if !strings.Contains(got, tt.redacted) {
				t.Errorf("dsnError = %q, want it to show the DSN as %q", got, tt.redacted)
			}
		})
	}
	// What is safe of the driver's message stays, so the operator sees
	// what is wrong.
	_, err := pq.NewConnector("postgres://app:Sup3rSecret@db:badport/objects")
	if got := dsnError("postgres://app:Sup3rSecret@db:badport/objects", err).Error(); !strings.Contains(got, `invalid port ":badport"`) {
		t.Errorf("dsnError = %q, want it to name the bad port", got)
	}
}

// Running the service with any of these DSNs, on the command line or from
// DATABASE_URL, never writes the password to its output or its error: not
// when the DSN does not parse, not in the start line, not at shutdown.
func TestNoPasswordInRunOutput(t *testing.T) {
	for _, tt := range dsnCases {
		if len(tt.secrets) == 0 {
			continue
		}
		// A DSN that parses points at a closed port, so the run starts,
		// logs and stops without waiting on a network.
		dsn := strings.NewReplacer("@db:5432/", "@127.0.0.1:1/", "@db/", "@127.0.0.1:1/", "://db/", "://127.0.0.1:1/",
			"host=db", "host=127.0.0.1 port=1", "host = db", "host = 127.0.0.1 port=1").Replace(tt.dsn)
		for _, from := range []string{"flag", "env"} {
			t.Run(tt.name+" "+from, func(t *testing.T) {
				args := []string{"-log-format", "json"}
				env := map[string]string{}
				if from == "flag" {
					args = append(args, "-dsn", dsn)
				} else {
					env["DATABASE_URL"] = dsn
				}
				out, err := runStopped(t, env, args...)
				if err != nil {
					assertNoSecret(t, "run error", err.Error(), tt.secrets)
				}
				assertNoSecret(t, "run output", out, tt.secrets)
			})
		}
	}
}

// runStopped runs the service with a context already cancelled: it parses
// its configuration, opens the database, listens, logs its start line and
// shuts down at once. It returns the output and run's error.
func runStopped(t *testing.T, env map[string]string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var out bytes.Buffer
	args = append([]string{"objtrack", "-listen", "127.0.0.1:0", "-log-level", "debug", "-grace", "1s", "-spill-dir", t.TempDir()}, args...)
	err := run(ctx, args, func(k string) string { return env[k] }, &out)
	return out.String(), err
}

func assertNoSecret(t *testing.T, what, got string, secrets []string) {
	t.Helper()
	for _, s := range secrets {
		if strings.Contains(got, s) {
			t.Errorf("%s shows %q of the password: %s", what, s, got)
		}
	}
}
