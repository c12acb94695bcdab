package main

import (
	"bytes"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// promtool returns the path of Prometheus's promtool (Debian: apt-get
// install prometheus). Without it the test is skipped, except in CI, where
// .ci/run installs it and a missing tool must not pass for a clean check.
func promtool(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("promtool not found; CI installs it (apt-get install prometheus)")
		}
		t.Skip("promtool not found (apt-get install prometheus)")
	}
	return path
}

// The metrics are written by hand: Prometheus's own linter reads a live
// /metrics of a service that has taken callbacks, and must find nothing.
func TestMetricsPassPromtool(t *testing.T) {
	tool := promtool(t)
	up := newUpstream(t, 0, nil)
	svc := startService(t, testDSN(t), up.URL)
	svc.waitReady(t)
	if code, body := post(t, svc.base, idsBody(1, 2, 3)); code != http.StatusAccepted {
		t.Fatalf("callback: %d %s", code, body)
	}
	eventually(t, 10*time.Second, "the callback applied", func() bool {
		return svc.metric(t, "objtrack_callbacks_applied_total") >= 1
	})
	resp, err := http.Get(svc.base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	exposition, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(tool, "check", "metrics")
	cmd.Stdin = bytes.NewReader(exposition)
	out, err := cmd.CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "" {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}

// docs/alerts.yaml is valid (promtool check rules) and its unit tests pass
// (promtool test rules docs/alerts_test.yaml).
func TestAlertRules(t *testing.T) {
	tool := promtool(t)
	for _, args := range [][]string{
		{"check", "rules", "docs/alerts.yaml"},
		{"test", "rules", "docs/alerts_test.yaml"},
	} {
		out, err := exec.Command(tool, args...).CombinedOutput()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}
