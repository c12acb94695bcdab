package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"os"
	"strings"
	"testing"
)

// operationsDoc is the operator reference that must list every flag, metric
// and label value the code defines.
const operationsDoc = "docs/OPERATIONS.md"

// TestDocsListEveryFlagAndMetric keeps docs/OPERATIONS.md in step with the
// code: every flag from -help, every metric the service exports and every
// label value it can count must appear there. It needs no database.
func TestDocsListEveryFlagAndMetric(t *testing.T) {
	doc := readDoc(t, operationsDoc)

	t.Run("flags", func(t *testing.T) {
		names := helpFlagNames(t)
		if len(names) == 0 {
			t.Fatal("found no flags in the output of objtrack -help")
		}
		for _, name := range names {
			if !strings.Contains(doc, "`-"+name+"`") {
				t.Errorf("flag -%s is not documented in %s (want `-%s`)", name, operationsDoc, name)
			}
		}
	})

	t.Run("metrics", func(t *testing.T) {
		all := newMetrics().all
		if len(all) == 0 {
			t.Fatal("newMetrics().all is empty")
		}
		for _, e := range all {
			if !strings.Contains(doc, e.name) {
				t.Errorf("metric %s (%s, %q) is not documented in %s", e.name, e.kind, e.help, operationsDoc)
			}
		}
	})

	// The label values are read from the code at test time, so the test
	// follows any value added to or removed from these lists.
	labels := []struct {
		label, metric string
		values        []string
	}{
		{"reason", "objtrack_callbacks_rejected_total", rejectReasons},
		{"reason", "objtrack_callbacks_shed_total", shedReasons},
		{"outcome", "objtrack_fetches_total", fetchOutcomes},
		{"op", "objtrack_db_errors_total", dbOps},
		{"reason", "objtrack_inbound_closed_total", inboundCloseReasons},
		{"where", "objtrack_fd_exhausted_total", fdPlaces},
	}
	for _, l := range labels {
		t.Run("label "+l.label, func(t *testing.T) {
			for _, v := range l.values {
				if !strings.Contains(doc, "`"+v+"`") {
					t.Errorf("label value %s=%q of %s is not documented in %s (want `%s`)", l.label, v, l.metric, operationsDoc, v)
				}
			}
		})
	}
}

// readDoc returns the contents of a documentation file of this repository.
func readDoc(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return string(b)
}

// helpFlagNames runs the service with -help and returns the flag names that
// flag.PrintDefaults lists, one per line as "  -name type".
func helpFlagNames(t *testing.T) []string {
	t.Helper()
	var buf bytes.Buffer
	err := run(context.Background(), []string{"objtrack", "-help"}, func(string) string { return "" }, &buf)
	if !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("objtrack -help: got error %v, want flag.ErrHelp", err)
	}
	var names []string
	for _, line := range strings.Split(buf.String(), "\n") {
		rest, ok := strings.CutPrefix(line, "  -")
		if !ok {
			continue
		}
		name, _, _ := strings.Cut(rest, " ")
		names = append(names, name)
	}
	return names
}
