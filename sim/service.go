package main

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// serviceProc is a service process started from its binary, for a bench
// load or a test, and what can be read of it from outside: /metrics and
// /proc.
type serviceProc struct {
	cmd   *exec.Cmd
	base  string       // http://host:port
	logs  bytes.Buffer // stdout and stderr; read it only after stop
	spill string       // its -spill-dir, made for it and removed at stop
}

// startService starts the service binary on a free port, asking the object
// service at upstream (host:port) and storing in dsn (passed as DATABASE_URL
// in its environment, where ps does not show it), at log level warn, with
// extra flags after those, and waits until /readyz answers 200.
func startService(bin, upstream, dsn string, extra ...string) (*serviceProc, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	spill, err := os.MkdirTemp("", "objtrack-sim-spill-")
	if err != nil {
		return nil, fmt.Errorf("spill directory: %w", err)
	}
	s := &serviceProc{base: "http://" + addr, spill: spill}
	args := append([]string{"-listen", addr, "-upstream", "http://" + upstream, "-log-level", "warn", "-spill-dir", spill}, extra...)
	s.cmd = exec.Command(bin, args...)
	// In the environment, not the arguments, where ps would show the password.
	s.cmd.Env = append(os.Environ(), "DATABASE_URL="+dsn)
	s.cmd.Stdout, s.cmd.Stderr = &s.logs, &s.logs
	if err := s.cmd.Start(); err != nil {
		_ = os.RemoveAll(spill)
		return nil, fmt.Errorf("start the service: %w", err)
	}
	if err := waitFor(15*time.Second, func() error { return ready(s.base) }); err != nil {
		s.stop()
		return nil, fmt.Errorf("service not ready: %w\n%s", err, s.logs.String())
	}
	return s, nil
}

// stop ends the service as an operator would, with SIGTERM, and waits for it.
func (s *serviceProc) stop() {
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	_ = s.cmd.Wait()
	_ = os.RemoveAll(s.spill)
}

func ready(base string) error {
	client := &http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get(base + "/readyz")
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("/readyz: %s", resp.Status)
	}
	return nil
}

// waitFor calls try every 50 ms until it returns nil, or returns its last
// error once timeout has passed.
func waitFor(timeout time.Duration, try func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := try()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not within %s: %w", timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// freeAddr returns a loopback address with a port no one listens on now.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("find a free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// metricsSample is one reading of a service's /metrics: the value of each
// series, keyed by name{labels} as the exposition writes it.
type metricsSample map[string]float64

// scrape reads one sample of the service's /metrics; it is empty when the
// service does not answer.
func scrape(base string) metricsSample {
	out := metricsSample{}
	client := &http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get(base + "/metrics")
	if err != nil {
		return out
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			out[line[:i]] = v
		}
	}
	return out
}

// sum adds up the series whose name{labels} starts with prefix: all the
// label values of one metric.
func (m metricsSample) sum(prefix string) float64 {
	var s float64
	for k, v := range m {
		if strings.HasPrefix(k, prefix) {
			s += v
		}
	}
	return s
}

// cpuSeconds is the user+system CPU time of a process, from /proc.
func cpuSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name, which is in parentheses.
	fields := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	utime, _ := strconv.ParseFloat(fields[11], 64)
	stime, _ := strconv.ParseFloat(fields[12], 64)
	return (utime + stime) / 100 // USER_HZ is 100 on Linux
}

// peakRSSMiB is the process's high-water resident set size.
func peakRSSMiB(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			return kb / 1024
		}
	}
	return 0
}
