package main

import (
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	rtmetrics "runtime/metrics"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// What the process knows about itself: the build it runs (for -version, the
// start line and objtrack_build_info) and the standard process_* and go_*
// metrics every Prometheus dashboard expects, read when /metrics is scraped.

// Builds without VCS information to stamp (the container build: .git is not
// in its context) can set these with
// -ldflags "-X main.linkedVersion=... -X main.linkedRevision=...".
var (
	linkedVersion  string
	linkedRevision string
)

// processStart is read once, as the process starts.
var processStart = time.Now()

type buildInfo struct {
	version  string // the main module's version, "(devel)" for a plain go build
	revision string // the VCS commit, "unknown" when not stamped
	modified bool   // built from a working tree with uncommitted changes
}

func readBuildInfo() buildInfo {
	b := buildInfo{version: "unknown", revision: "unknown"}
	if bi, ok := debug.ReadBuildInfo(); ok {
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
	}
	if linkedVersion != "" {
		b.version = linkedVersion
	}
	if linkedRevision != "" {
		b.revision = linkedRevision
	}
	return b
}

// revisionLabel is the revision, marked when the tree had local changes, so
// that two different binaries never report the same revision.
func (b buildInfo) revisionLabel() string {
	if b.modified {
		return b.revision + "-modified"
	}
	return b.revision
}

func (b buildInfo) String() string {
	return fmt.Sprintf("objtrack %s revision %s %s", b.version, b.revisionLabel(), runtime.Version())
}

func processMetrics(build buildInfo) []exported {
	return []exported{
		{"objtrack_build_info", "The running binary's version and VCS revision (always 1).", "gauge", info{"version", build.version, "revision", build.revisionLabel()}},
		{"go_info", "The Go version the binary was built with (always 1).", "gauge", info{"version", runtime.Version()}},
		{"go_goroutines", "Goroutines that currently exist.", "gauge", sampled(goroutines)},
		{"go_memstats_heap_inuse_bytes", "Bytes in heap spans in use (objects and their free slots).", "gauge", sampled(heapInuse)},
		{"process_cpu_seconds_total", "User and system CPU time spent, in seconds.", "counter", sampled(cpuSeconds)},
		{"process_resident_memory_bytes", "Resident memory size in bytes.", "gauge", sampled(residentMemory)},
		{"process_virtual_memory_bytes", "Virtual memory size in bytes.", "gauge", sampled(virtualMemory)},
		{"process_open_fds", "Open file descriptors.", "gauge", sampled(openFDs)},
		{"process_max_fds", "The open-file limit (soft RLIMIT_NOFILE).", "gauge", sampled(maxFDs)},
		{"process_start_time_seconds", "Start time of the process since the Unix epoch, in seconds.", "gauge", sampled(startTime)},
	}
}

// sampled is a gauge or counter read at scrape time; false means this
// platform cannot tell, and the metric is left out of the exposition.
type sampled func() (float64, bool)

func (f sampled) write(b []byte, name string) []byte {
	v, ok := f()
	if !ok {
		return b
	}
	return fmt.Appendf(b, "%s %s\n", name, strconv.FormatFloat(v, 'g', -1, 64))
}

// info is a constant 1 whose labels (name, value pairs) carry the facts.
type info []string

var labelEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)

func (l info) write(b []byte, name string) []byte {
	b = append(b, name...)
	for i := 0; i+1 < len(l); i += 2 {
		sep := byte(',')
		if i == 0 {
			sep = '{'
		}
		b = fmt.Appendf(b, `%c%s="%s"`, sep, l[i], labelEscaper.Replace(l[i+1]))
	}
	return append(b, "} 1\n"...)
}

func goroutines() (float64, bool) { return float64(runtime.NumGoroutine()), true }

// heapInuse is MemStats.HeapInuse without the stop-the-world of
// runtime.ReadMemStats.
func heapInuse() (float64, bool) {
	s := []rtmetrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}, {Name: "/memory/classes/heap/unused:bytes"}}
	rtmetrics.Read(s)
	var sum uint64
	for _, x := range s {
		if x.Value.Kind() != rtmetrics.KindUint64 {
			return 0, false
		}
		sum += x.Value.Uint64()
	}
	return float64(sum), true
}

func cpuSeconds() (float64, bool) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0, false
	}
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9, true
}

func residentMemory() (float64, bool) { return statmPages(1) }
func virtualMemory() (float64, bool)  { return statmPages(0) }

// statmPages reads field i of Linux's /proc/self/statm (sizes in pages).
func statmPages(i int) (float64, bool) {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0, false
	}
	fields := strings.Fields(string(b))
	if len(fields) <= i {
		return 0, false
	}
	pages, err := strconv.ParseUint(fields[i], 10, 64)
	if err != nil {
		return 0, false
	}
	return float64(pages) * float64(os.Getpagesize()), true
}

func openFDs() (float64, bool) {
	d, err := os.Open("/proc/self/fd")
	if err != nil {
		return 0, false
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return 0, false
	}
	return float64(len(names) - 1), true // not counting d itself
}

func maxFDs() (float64, bool) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, false
	}
	return float64(lim.Cur), true
}

func startTime() (float64, bool) {
	return float64(processStart.UnixNano()) / 1e9, true
}
