package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// closeWithin is how long a test waits for a connection the service is
// expected to close at once. Nothing else would close it for minutes (the
// test servers' timeouts are long), so a generous wait proves "at once"
// without depending on an idle machine.
const closeWithin = 10 * time.Second

// limited is an http.Server behind a limitListener, as serve() builds it,
// but with timeouts long enough that only the listener closes connections.
type limited struct {
	ln      *limitListener
	metrics *metrics
	addr    string
}

func startLimited(t *testing.T, maxConns int) *limited {
	t.Helper()
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	m := newMetrics()
	ln := newLimitListener(inner, maxConns, m, newFDGuard(fdAccept, discardLogger(), m))
	srv := &http.Server{
		Handler:           handleHealthz(),
		ReadHeaderTimeout: time.Minute,
		IdleTimeout:       time.Minute,
		ConnState:         ln.connState,
		ErrorLog:          log.New(io.Discard, "", 0),
	}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return &limited{ln: ln, metrics: m, addr: inner.Addr().String()}
}

func (l *limited) counts() (open, idle int) {
	l.ln.mu.Lock()
	defer l.ln.mu.Unlock()
	return l.ln.open, l.ln.idle.Len()
}

// rawConn is a keep-alive client connection driven by hand, so the test
// decides when it is idle.
type rawConn struct {
	net.Conn
	r *bufio.Reader
}

func dialRaw(t *testing.T, addr string) *rawConn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return &rawConn{Conn: c, r: bufio.NewReader(c)}
}

// get sends GET /healthz on the connection and reads the answer.
func (c *rawConn) get() (int, error) {
	if _, err := io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: objtrack\r\n\r\n"); err != nil {
		return 0, err
	}
	_ = c.SetReadDeadline(time.Now().Add(closeWithin))
	resp, err := http.ReadResponse(c.r, nil)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, nil
}

// closedByServer reports whether the server closes the connection within
// closeWithin (a read that ends in anything but a timeout).
func (c *rawConn) closedByServer() bool {
	_ = c.SetReadDeadline(time.Now().Add(closeWithin))
	_, err := c.r.ReadByte()
	var ne net.Error
	return err != nil && !(errors.As(err, &ne) && ne.Timeout())
}

// idleConns opens n connections one after the other, each idle after one
// GET, so that they went idle in that order.
func (l *limited) idleConns(t *testing.T, n int) []*rawConn {
	t.Helper()
	conns := make([]*rawConn, n)
	for i := range conns {
		_, idleBefore := l.counts()
		conns[i] = dialRaw(t, l.addr)
		if code, err := conns[i].get(); err != nil || code != http.StatusOK {
			t.Fatalf("GET on connection %d: %d, %v", i, code, err)
		}
		eventually(t, closeWithin, fmt.Sprintf("connection %d idle", i), func() bool {
			_, idle := l.counts()
			return idle == idleBefore+1
		})
	}
	return conns
}

func TestLimitListenerClosesTheLongestIdleFirst(t *testing.T) {
	l := startLimited(t, 3)
	conns := l.idleConns(t, 3)

	late := dialRaw(t, l.addr)
	if code, err := late.get(); err != nil || code != http.StatusOK {
		t.Fatalf("GET past the cap with idle connections: %d, %v; want 200", code, err)
	}
	if !conns[0].closedByServer() {
		t.Error("the longest idle connection is still open")
	}
	for i, c := range conns[1:] {
		if code, err := c.get(); err != nil || code != http.StatusOK {
			t.Errorf("connection %d: %d, %v; want it open and served", i+1, code, err)
		}
	}
	if got := l.metrics.inboundClosed.Value(closedIdleEvicted); got != 1 {
		t.Errorf("closed idle_evicted = %d, want 1", got)
	}
	if open, _ := l.counts(); open != 3 {
		t.Errorf("%d connections counted open, want 3", open)
	}
}

// TestLimitListenerRefusesAtOnceWhenNothingIsIdle: connections that have
// not sent a request are not idle, so past the cap a new connection gets
// the 503 and is closed, instead of waiting in the kernel's queue.
func TestLimitListenerRefusesAtOnceWhenNothingIsIdle(t *testing.T) {
	l := startLimited(t, 2)
	held := []*rawConn{dialRaw(t, l.addr), dialRaw(t, l.addr)}
	eventually(t, closeWithin, "both connections accepted", func() bool {
		open, _ := l.counts()
		return open == 2
	})

	refused := dialRaw(t, l.addr)
	_ = refused.SetReadDeadline(time.Now().Add(closeWithin))
	resp, err := http.ReadResponse(refused.r, nil)
	if err != nil {
		t.Fatalf("read the refusal: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read the refusal's body: %v", err)
	}
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") != "1" ||
		string(body) != "{\"error\":\"too many connections, retry later\"}\n" {
		t.Errorf("refusal: %d, Retry-After %q, body %q; want 503, 1 and the JSON error", resp.StatusCode, resp.Header.Get("Retry-After"), body)
	}
	if !refused.closedByServer() {
		t.Error("the refused connection was left open")
	}
	if got := l.metrics.inboundClosed.Value(closedRefused); got != 1 {
		t.Errorf("closed refused = %d, want 1", got)
	}

	// Room comes back as soon as a connection closes.
	held[0].Close()
	eventually(t, closeWithin, "the closed connection uncounted", func() bool {
		open, _ := l.counts()
		return open == 1
	})
	if code, err := dialRaw(t, l.addr).get(); err != nil || code != http.StatusOK {
		t.Errorf("GET after a connection closed: %d, %v; want 200", code, err)
	}
}

// TestLimitListenerShortensIdleUnderPressure: above 3/4 of the cap, a new
// connection closes those idle for pressureIdleTimeout or more, and only
// those.
func TestLimitListenerShortensIdleUnderPressure(t *testing.T) {
	l := startLimited(t, 8)
	conns := l.idleConns(t, 7) // pressure starts above 6
	// The first three went idle pressureIdleTimeout ago.
	l.ln.mu.Lock()
	e := l.ln.idle.Front()
	for range 3 {
		e.Value.(*limitedConn).idleAt = time.Now().Add(-pressureIdleTimeout)
		e = e.Next()
	}
	l.ln.mu.Unlock()

	if code, err := dialRaw(t, l.addr).get(); err != nil || code != http.StatusOK {
		t.Fatalf("GET under pressure: %d, %v; want 200", code, err)
	}
	for i, c := range conns[:3] {
		if !c.closedByServer() {
			t.Errorf("connection %d, idle for the pressure timeout, is still open", i)
		}
	}
	for i, c := range conns[3:] {
		if code, err := c.get(); err != nil || code != http.StatusOK {
			t.Errorf("connection %d, idle briefly: %d, %v; want it open and served", i+3, code, err)
		}
	}
	if got := l.metrics.inboundClosed.Value(closedIdlePressure); got != 3 {
		t.Errorf("closed idle_pressure = %d, want 3", got)
	}
}

// emfileListener fails every Accept as a process out of descriptors does.
type emfileListener struct {
	net.Listener
	calls  atomic.Int64
	closed atomic.Bool
}

func (l *emfileListener) Accept() (net.Conn, error) {
	if l.closed.Load() {
		return nil, net.ErrClosed
	}
	l.calls.Add(1)
	return nil, &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
}

func (l *emfileListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }

func (l *emfileListener) Close() error {
	l.closed.Store(true)
	return nil
}

// TestAcceptOutOfDescriptorsIsCountedAndBacksOff: EMFILE on accept is
// counted and warned about once, and the server waits between tries (its
// backoff grows to a second) instead of spinning.
func TestAcceptOutOfDescriptorsIsCountedAndBacksOff(t *testing.T) {
	var logs syncBuffer
	m := newMetrics()
	inner := &emfileListener{}
	ln := newLimitListener(inner, 10, m, newFDGuard(fdAccept, slog.New(slog.NewTextHandler(&logs, nil)), m))
	srv := &http.Server{Handler: handleHealthz(), ConnState: ln.connState, ErrorLog: log.New(io.Discard, "", 0)}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	// A spinning loop would make hundreds of thousands of tries in this
	// window; the backoff makes about ten, and a busy machine fewer.
	const window = 2 * time.Second
	const mostTries = 50
	eventually(t, closeWithin, "the first accept", func() bool { return inner.calls.Load() > 0 })
	time.Sleep(window)
	_ = srv.Close()
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		t.Errorf("Serve: %v, want ErrServerClosed", err)
	}

	tries := inner.calls.Load()
	t.Logf("%d accepts in %s", tries, window)
	if tries > mostTries {
		t.Errorf("%d accepts in %s: the server spins on EMFILE", tries, window)
	}
	if got := m.fdExhaustedTotal.Value(fdAccept); got != uint64(tries) {
		t.Errorf("objtrack_fd_exhausted_total{where=accept} = %d, want %d (every try)", got, tries)
	}
	if n := strings.Count(logs.String(), "out of file descriptors"); n != 1 {
		t.Errorf("%d warnings, want 1:\n%s", n, logs.String())
	}
}

// TestSlowSendersAreCutOff proves the service's own server timeouts: a
// sender that dribbles its headers is cut off at readHeaderTimeout, one
// that dribbles its body at readTimeout, long before it would finish.
func TestSlowSendersAreCutOff(t *testing.T) {
	dsn := testDSN(t)
	up := newUpstream(t, 0, nil)
	s := startService(t, dsn, up.URL)
	addr := strings.TrimPrefix(s.base, "http://")

	const dribbleFor = 60 * time.Second // far past both timeouts
	tests := []struct {
		name    string
		head    string // sent at once
		dribble string // then a byte every dribbleEvery
		timeout time.Duration
	}{
		{"headers", "POST /callback HTTP/1.1\r\nHost: objtrack\r\n", "X-Slow: " + strings.Repeat("a", 1000), readHeaderTimeout},
		{"body", "POST /callback HTTP/1.1\r\nHost: objtrack\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n",
			`{"object_ids":[` + strings.Repeat(" ", 985), readTimeout},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			const dribbleEvery = 100 * time.Millisecond
			start := time.Now()
			c := dialRaw(t, addr)
			if _, err := io.WriteString(c, tt.head); err != nil {
				t.Fatalf("write: %v", err)
			}
			var wg sync.WaitGroup
			stop := make(chan struct{})
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < len(tt.dribble) && time.Since(start) < dribbleFor; i++ {
					select {
					case <-stop:
						return
					case <-time.After(dribbleEvery):
					}
					if _, err := c.Write([]byte{tt.dribble[i]}); err != nil {
						return
					}
				}
			}()
			defer wg.Wait()
			defer close(stop)

			// The server answers (an error: the request never completes)
			// or just closes; either way the connection ends.
			_ = c.SetReadDeadline(start.Add(dribbleFor))
			status := "no answer"
			if resp, err := http.ReadResponse(c.r, nil); err == nil {
				status = resp.Status
				if resp.StatusCode < 400 {
					t.Errorf("a request cut off by the timeout was answered %s", resp.Status)
				}
				resp.Body.Close()
			}
			_, err := io.Copy(io.Discard, c.r)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("the connection was still open after %s of dribbling (%s)", dribbleFor, status)
			}
			took := time.Since(start)
			if took < tt.timeout {
				t.Errorf("cut off after %s, before the %s timeout: something else closed it (%s)", took, tt.timeout, status)
			}
			t.Logf("cut off after %s (%s)", took.Round(time.Millisecond), status)
		})
	}
}

// TestIdleFloodPastTheCapLeavesRoomForCallbacks: inbound connections up to
// the cap and more, all idle, then callbacks. Each callback is answered (its
// connection closes an idle one) or refused at once, none hangs, and no
// fetch or database operation fails for lack of descriptors.
func TestIdleFloodPastTheCapLeavesRoomForCallbacks(t *testing.T) {
	const maxConns, flood, callbacks = 50, 75, 20
	dsn := testDSN(t)
	up := newUpstream(t, 10*time.Millisecond, nil)
	s := startService(t, dsn, up.URL, "-max-conns", fmt.Sprint(maxConns))
	s.waitReady(t)
	addr := strings.TrimPrefix(s.base, "http://")

	for i := range flood {
		if code, err := dialRaw(t, addr).get(); err != nil || code != http.StatusOK {
			t.Fatalf("flood connection %d: GET /healthz: %d, %v", i, code, err)
		}
	}

	// Each callback on a connection of its own, all at once; the client
	// timeout is far above an answer's time, so hitting it means a hang.
	client := &http.Client{Timeout: closeWithin, Transport: &http.Transport{DisableKeepAlives: true}}
	type result struct {
		ids    []int64
		status int
		err    error
	}
	results := make([]result, callbacks)
	var wg sync.WaitGroup
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ids := []int64{int64(1000 + 2*i)} // even: online
			results[i].ids = ids
			resp, err := client.Post(s.base+"/callback", "application/json", strings.NewReader(idsBody(ids...)))
			if err != nil {
				results[i].err = err
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			results[i].status = resp.StatusCode
		}()
	}
	wg.Wait()

	var accepted []int64
	for i, r := range results {
		var ne net.Error
		switch {
		case r.err != nil && errors.As(r.err, &ne) && ne.Timeout():
			t.Errorf("callback %d hung until the client timeout: %v", i, r.err)
		case r.err != nil:
			t.Logf("callback %d refused: %v", i, r.err)
		case r.status == http.StatusAccepted:
			accepted = append(accepted, r.ids...)
		case r.status == http.StatusServiceUnavailable:
			t.Logf("callback %d refused: 503", i)
		default:
			t.Errorf("callback %d: status %d, want 202 or a refusal", i, r.status)
		}
	}
	if len(accepted) == 0 {
		t.Fatal("no callback got through the flood")
	}
	db := openDB(t, dsn)
	eventually(t, landWithin, "accepted callbacks in the table", func() bool {
		rows := objectsIn(t, db)
		for _, id := range accepted {
			if _, ok := rows[id]; !ok {
				return false
			}
		}
		return true
	})

	if got := s.metric(t, "objtrack_inbound_connections"); got > maxConns {
		t.Errorf("%g inbound connections open, over the cap of %d", got, maxConns)
	}
	if got := s.metric(t, `objtrack_inbound_closed_total{reason="idle_evicted"}`); got < flood-maxConns {
		t.Errorf("%g idle connections closed to make room, want at least %d", got, flood-maxConns)
	}
	zero := []string{`objtrack_fetches_total{outcome="transport_error"}`, `objtrack_fetches_total{outcome="timeout"}`}
	for _, op := range dbOps {
		zero = append(zero, fmt.Sprintf("objtrack_db_errors_total{op=%q}", op))
	}
	for _, where := range fdPlaces {
		zero = append(zero, fmt.Sprintf("objtrack_fd_exhausted_total{where=%q}", where))
	}
	for _, name := range zero {
		if got := s.metric(t, name); got != 0 {
			t.Errorf("%s = %g, want 0", name, got)
		}
	}
}
