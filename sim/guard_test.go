package main

import (
	"strings"
	"testing"
)

// Bench mode empties tables only on the throwaway database that
// scripts/with-postgres marked, or when the user says the database may lose
// its data.
func TestBenchEmptiesOnlyAThrowawayDatabase(t *testing.T) {
	const dsn = "postgres://app:Sup3rSecret@db.prod/objects"
	tests := []struct {
		name string
		env  map[string]string
		ok   bool
	}{
		{"production DATABASE_URL", nil, false},
		{"throwaway marked", map[string]string{throwawayEnv: dsn}, true},
		{"marked throwaway is another database", map[string]string{throwawayEnv: "postgres://postgres@127.0.0.1:5999/postgres"}, false},
		{"marker set but empty", map[string]string{throwawayEnv: ""}, false},
		{"user vouches", map[string]string{truncateOKEnv: "1"}, true},
		{"user vouches vaguely", map[string]string{truncateOKEnv: "yes please"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := mayEmptyTables(dsn, func(k string) string { return tt.env[k] })
			if (err == nil) != tt.ok {
				t.Fatalf("mayEmptyTables: %v, want allowed=%v", err, tt.ok)
			}
			if err != nil {
				if strings.Contains(err.Error(), "Sup3rSecret") || !strings.Contains(err.Error(), truncateOKEnv) {
					t.Errorf("refusal %q: want it to name %s and hide the password", err, truncateOKEnv)
				}
			}
		})
	}
	// An empty DSN marked as the throwaway one is still no database to empty.
	if err := mayEmptyTables("", func(k string) string { return map[string]string{throwawayEnv: ""}[k] }); err == nil {
		t.Error("an empty DSN passed the check")
	}
}

// The refusal comes before anything is touched: resetTables, the one
// place that empties tables, checks too.
func TestResetTablesRefusesUnmarkedDatabase(t *testing.T) {
	t.Setenv(throwawayEnv, "")
	t.Setenv(truncateOKEnv, "")
	if err := resetTables("postgres://app:Sup3rSecret@127.0.0.1:1/objects"); err == nil || !strings.Contains(err.Error(), "refusing") {
		t.Errorf("resetTables: %v, want a refusal", err)
	}
}

// A DSN the driver rejects is reported with the driver's hint and without
// the password.
func TestSimDatabaseErrorsHidePassword(t *testing.T) {
	for _, dsn := range []string{"host=db password=Sup3r Secret", "postgres://app:Sup3rSecret@db:badport/x", "app:Sup3rSecret@db/x"} {
		_, err := openDB(dsn)
		if err == nil {
			t.Fatalf("openDB(%q) accepted it", dsn)
		}
		if strings.Contains(err.Error(), "Sup3r") || strings.Contains(err.Error(), "Secret") {
			t.Errorf("openDB(%q): %v shows the password", dsn, err)
		}
	}
	_, err := openDB("localhost")
	if err == nil || !strings.Contains(err.Error(), `missing "=" after "localhost"`) {
		t.Errorf("openDB(localhost): %v, want the driver's hint", err)
	}
}
