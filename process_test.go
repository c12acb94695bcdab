package main

import (
	"bytes"
	"context"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
	"time"
)

// scrape returns the samples of an exposition by series, labels included.
func scrape(t *testing.T, m *metrics) map[string]float64 {
	t.Helper()
	var b bytes.Buffer
	if _, err := m.WriteTo(&b); err != nil {
		t.Fatal(err)
	}
	samples := map[string]float64{}
	for _, line := range strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n") {
		if strings.HasPrefix(line, "#") {
			continue
		}
		match := sampleLine.FindStringSubmatch(line)
		if match == nil {
			t.Fatalf("unparseable line %q", line)
		}
		v, err := strconv.ParseFloat(match[3], 64)
		if err != nil {
			t.Fatalf("value in %q: %v", line, err)
		}
		samples[match[1]+match[2]] = v
	}
	return samples
}

// The standard process and Go metrics are there and hold plausible values;
// on Linux all of them, elsewhere at least those the runtime knows.
func TestProcessMetrics(t *testing.T) {
	linkBuild(t, "v9.8.7", "feedface")
	before := time.Now()
	samples := scrape(t, newMetrics())
	linux := runtime.GOOS == "linux"
	tests := []struct {
		series string
		ok     func(v float64) bool
		always bool // present on every platform
	}{
		{`objtrack_build_info{version="v9.8.7",revision="` + buildInfo{revision: "feedface", modified: embeddedBuild().modified}.revisionLabel() + `"}`, func(v float64) bool { return v == 1 }, true},
		{`go_info{version="` + runtime.Version() + `"}`, func(v float64) bool { return v == 1 }, true},
		{"go_goroutines", func(v float64) bool { return v >= 1 }, true},
		{"go_memstats_heap_inuse_bytes", func(v float64) bool { return v > 0 }, true},
		{"process_cpu_seconds_total", func(v float64) bool { return v > 0 }, true},
		{"process_max_fds", func(v float64) bool { return v >= samples["process_open_fds"] }, true},
		{"process_start_time_seconds", func(v float64) bool { return v <= float64(before.Unix()+1) && v > 0 }, true},
		{"process_resident_memory_bytes", func(v float64) bool { return v > 0 }, linux},
		{"process_virtual_memory_bytes", func(v float64) bool { return v >= samples["process_resident_memory_bytes"] }, linux},
		{"process_open_fds", func(v float64) bool { return v >= 3 }, linux}, // stdin, stdout, stderr at least
	}
	for _, tt := range tests {
		v, found := samples[tt.series]
		switch {
		case !found && tt.always:
			t.Errorf("%s missing from the exposition", tt.series)
		case found && !tt.ok(v):
			t.Errorf("%s = %v, not plausible", tt.series, v)
		}
	}
}

// A metric this platform cannot read is left out whole: no HELP or TYPE
// line without a sample.
func TestMetricsLeaveOutWhatCannotBeRead(t *testing.T) {
	m := &metrics{all: []exported{
		{"test_unreadable", "Never readable.", "gauge", sampled(func() (float64, bool) { return 0, false })},
		{"test_readable", "Always 2.", "gauge", sampled(func() (float64, bool) { return 2, true })},
	}}
	var b bytes.Buffer
	if _, err := m.WriteTo(&b); err != nil {
		t.Fatal(err)
	}
	want := "# HELP test_readable Always 2.\n# TYPE test_readable gauge\ntest_readable 2\n"
	if b.String() != want {
		t.Errorf("exposition %q, want %q", b.String(), want)
	}
}

// linkBuild sets the version and revision as -ldflags -X would, for the
// rest of the test.
func linkBuild(t *testing.T, version, revision string) {
	t.Helper()
	oldV, oldR := linkedVersion, linkedRevision
	linkedVersion, linkedRevision = version, revision
	t.Cleanup(func() { linkedVersion, linkedRevision = oldV, oldR })
}

// embeddedBuild reads the build information straight from the binary, as
// the tests' reference for readBuildInfo.
func embeddedBuild() buildInfo {
	b := buildInfo{version: "unknown", revision: "unknown"}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return b
	}
	if bi.Main.Version != "" {
		b.version = bi.Main.Version
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			b.revision = s.Value
		case "vcs.modified":
			b.modified = s.Value == "true"
		}
	}
	return b
}

// -version prints the version and the VCS revision and exits 0 (run
// returns nil) without a DSN; a version set at link time wins over the
// build information, which is read straight from the binary here.
func TestVersionFlag(t *testing.T) {
	embedded := embeddedBuild()
	tests := []struct {
		name              string
		version, revision string // linked
		want              string
	}{
		{"embedded", "", "", "objtrack " + embedded.version + " revision " + embedded.revisionLabel() + " " + runtime.Version() + "\n"},
		{"linked", "v1.2.3", "abc123", "objtrack v1.2.3 revision " + buildInfo{revision: "abc123", modified: embedded.modified}.revisionLabel() + " " + runtime.Version() + "\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			linkBuild(t, tt.version, tt.revision)
			var out bytes.Buffer
			if err := run(context.Background(), []string{"objtrack", "-version"}, func(string) string { return "" }, &out); err != nil {
				t.Fatalf("run -version: %v", err)
			}
			if out.String() != tt.want {
				t.Errorf("-version printed %q, want %q", out.String(), tt.want)
			}
		})
	}
}

// The start line says which build is serving.
func TestStartLineNamesTheBuild(t *testing.T) {
	linkBuild(t, "v9.8.7", "feedface")
	out, err := runStopped(t, nil, "-dsn", "postgres://x@127.0.0.1:1/x?sslmode=disable")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`msg=serving`, `version=v9.8.7`, `revision=` + buildInfo{revision: "feedface", modified: embeddedBuild().modified}.revisionLabel()} {
		if !strings.Contains(out, want) {
			t.Errorf("start line lacks %s:\n%s", want, out)
		}
	}
}

func TestBuildInfoRevisionLabel(t *testing.T) {
	tests := []struct {
		build buildInfo
		want  string
	}{
		{buildInfo{version: "v1", revision: "abc"}, "abc"},
		{buildInfo{version: "v1", revision: "abc", modified: true}, "abc-modified"},
	}
	for _, tt := range tests {
		if got := tt.build.revisionLabel(); got != tt.want {
			t.Errorf("%+v: revision label %q, want %q", tt.build, got, tt.want)
		}
	}
}
