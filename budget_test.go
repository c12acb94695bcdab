package main

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestPlanFDBudget(t *testing.T) {
	tests := []struct {
		name                              string
		nofile, dbConns, inflight, conns  int
		wantDatabase, wantInbound, wantFD int
	}{
		{"the issue's host keeps the default fetch slots", 20000, 12, 16384, 0, 16, 2500, 16384},
		{"a smaller limit lowers the fetch slots", 4096, 12, 16384, 0, 16, 512, 3440},
		{"-max-conns is taken as given when it fits", 20000, 12, 16384, 50, 16, 50, 16384},
		{"-max-conns gets at most half of what is left", 20000, 12, 16384, 19000, 16, 9928, 9928},
		{"the usual soft limit of 1024", 1024, 12, 16384, 0, 16, 128, 752},
		{"a limit too small for the margin still gives one of each", 100, 12, 16384, 0, 16, 1, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := planFDBudget(tt.nofile, tt.dbConns, tt.inflight, tt.conns)
			if b.database != tt.wantDatabase || b.inbound != tt.wantInbound || b.fetch != tt.wantFD || b.files != fileFDMargin {
				t.Errorf("got %+v, want database %d, files %d, inbound %d, fetch %d",
					b, tt.wantDatabase, fileFDMargin, tt.wantInbound, tt.wantFD)
			}
			if fits := tt.nofile >= b.database+b.files+2; fits && b.spare() < 0 {
				t.Errorf("%+v spends %d descriptors more than the limit", b, -b.spare())
			}
		})
	}
}

// TestFitFDBudgetLogsTheSplit checks the start line and that the flags come
// back fitted to the limit of this process, whatever it is.
func TestFitFDBudgetLogsTheSplit(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	cfg := testConfig(t, "-max-inflight", "1000000000")
	got := fitFDBudget(cfg, log)

	nofile, err := openFileLimit()
	if err != nil {
		t.Fatalf("openFileLimit: %v", err)
	}
	if spent := got.maxInflight + got.maxConns + cfg.dbConns + dbFDMargin + fileFDMargin; spent > nofile {
		t.Errorf("fetch %d + inbound %d + database and margins spend %d descriptors, over the limit %d", got.maxInflight, got.maxConns, spent, nofile)
	}
	line := ""
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, `msg="descriptor budget"`) {
			line = l
		}
	}
	for _, part := range []string{"nofile=", "database=", "files=", "inbound=", "fetch=", "spare="} {
		if !strings.Contains(line, part) {
			t.Errorf("budget line %q lacks %s", line, part)
		}
	}
	if !strings.Contains(logs.String(), "-max-inflight lowered to fit the open-file limit") {
		t.Errorf("no warning that -max-inflight was lowered:\n%s", logs.String())
	}
}

func TestIsFDExhausted(t *testing.T) {
	opErr := func(op string, errno syscall.Errno) error {
		return &net.OpError{Op: op, Net: "tcp", Err: os.NewSyscallError("socket", errno)}
	}
	tests := []struct {
		name string
		err  error
		want bool
	}{
		{"nil", nil, false},
		{"EMFILE", syscall.EMFILE, true},
		{"ENFILE", syscall.ENFILE, true},
		{"EMFILE from a dial", opErr("dial", syscall.EMFILE), true},
		{"ENFILE from accept", opErr("accept", syscall.ENFILE), true},
		{"EMFILE through url.Error", &url.Error{Op: "Get", URL: "http://objects/1", Err: opErr("dial", syscall.EMFILE)}, true},
		{"EMFILE wrapped with %w", fmt.Errorf("get object 1: %w", &url.Error{Op: "Get", URL: "http://objects/1", Err: opErr("dial", syscall.EMFILE)}), true},
		{"connection refused", opErr("dial", syscall.ECONNREFUSED), false},
		{"only the words", errors.New("socket: too many open files"), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := isFDExhausted(tt.err); got != tt.want {
				t.Errorf("isFDExhausted(%v) = %v, want %v", tt.err, got, tt.want)
			}
		})
	}
}

// TestFDGuardWarnsOncePerChangeOfState: many failures make one warning and
// one gauge change; recovery needs fdCalm without a failure, and makes one
// more warning.
func TestFDGuardWarnsOncePerChangeOfState(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	m := newMetrics()
	g := newFDGuard(fdFetch, log, m)
	emfile := &url.Error{Op: "Get", URL: "http://objects/1", Err: &net.OpError{Op: "dial", Err: os.NewSyscallError("socket", syscall.EMFILE)}}

	for range 3 {
		if !g.note(emfile) {
			t.Fatal("note(EMFILE) = false, want true")
		}
	}
	if g.note(nil) {
		t.Fatal("note(nil) = true, want false")
	}
	if got := m.fdExhaustedTotal.Value(fdFetch); got != 3 {
		t.Errorf("objtrack_fd_exhausted_total{where=fetch} = %d, want 3", got)
	}
	gauge := func() string { return string(m.fdExhausted.write(nil, "g")) }
	if want := "g{where=\"fetch\"} 1\n"; !strings.Contains(gauge(), want) {
		t.Errorf("gauge after failures:\n%s\nwant a line %q", gauge(), want)
	}
	if n := strings.Count(logs.String(), "out of file descriptors"); n != 1 {
		t.Errorf("%d warnings on running out, want 1:\n%s", n, logs.String())
	}

	// Another handle for the same place sees the same state; a success
	// fdCalm after the last failure is the recovery.
	other := newFDGuard(fdFetch, log, m)
	other.place.last.Store(time.Now().Add(-fdCalm).UnixNano())
	other.note(nil)
	g.note(nil)
	if n := strings.Count(logs.String(), "file descriptors available again"); n != 1 {
		t.Errorf("%d warnings on recovery, want 1:\n%s", n, logs.String())
	}
	if strings.Contains(gauge(), "} 1") {
		t.Errorf("gauge after recovery:\n%s\nwant every place at 0", gauge())
	}
}
