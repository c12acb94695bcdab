package main

import (
	"container/list"
	"net"
	"net/http"
	"sync"
	"time"
)

// limitListener caps the inbound connections at their share of the
// descriptor budget (-max-conns), in the manner of
// golang.org/x/net/netutil.LimitListener, except that Accept never waits
// for a free place: a connection nobody has room for would only queue in
// the kernel while its sender's timeout runs out. Past the cap, idle
// keep-alive connections make room first, the longest idle first; with
// none idle, the new connection is answered 503 and closed at once.
//
// Idle means what http.Server says through ConnState (its ConnState hook
// must be connState), so a connection is never closed in the middle of a
// request it is known to serve. Slow senders (headers or a body dribbled
// byte by byte) are bounded by the server's ReadHeaderTimeout and
// ReadTimeout, not here.
type limitListener struct {
	net.Listener
	max      int // most connections open at once
	pressure int // above this many open, idle ones last pressureIdleTimeout at most
	metrics  *metrics
	fd       *fdGuard

	mu   sync.Mutex
	open int
	idle list.List // of *limitedConn, longest idle first
}

const (
	// pressureIdleTimeout replaces the server's idle timeout (minutes)
	// once the connections fill three quarters of the cap: longer than a
	// steady sender's interval (5 s), so it keeps its connection, and
	// short enough that idle connections do not pile up. It is applied as
	// connections arrive, since idle ones cost nothing until the room is
	// needed.
	pressureIdleTimeout = 10 * time.Second
	// Pressure starts above three quarters of the cap.
	pressureNum, pressureDen = 3, 4
	// refuseWriteTimeout bounds writing the 503 to a refused connection;
	// a new socket's send buffer is empty, so the write never waits.
	refuseWriteTimeout = 100 * time.Millisecond
)

// refusal is the whole answer to a connection past the cap: the same 503
// with Retry-After that the service gives for any load it cannot take.
const refusal = "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n" +
	"Content-Length: 46\r\nConnection: close\r\n\r\n{\"error\":\"too many connections, retry later\"}\n"

// Why the listener closed a connection, the label values of
// objtrack_inbound_closed_total.
const (
	closedIdleEvicted  = "idle_evicted"
	closedIdlePressure = "idle_pressure"
	closedRefused      = "refused"
)

var inboundCloseReasons = []string{closedIdleEvicted, closedIdlePressure, closedRefused}

func newLimitListener(inner net.Listener, maxConns int, m *metrics, fd *fdGuard) *limitListener {
	maxConns = max(maxConns, 1)
	m.inboundLimit.Set(int64(maxConns))
	return &limitListener{
		Listener: inner,
		max:      maxConns,
		pressure: maxConns * pressureNum / pressureDen,
		metrics:  m,
		fd:       fd,
	}
}

// limitedConn is an accepted connection, counted until it is closed.
type limitedConn struct {
	net.Conn
	l *limitListener

	// Guarded by l.mu.
	released bool          // no longer counted as open
	idleAt   time.Time     // when it last went idle
	elem     *list.Element // its place in l.idle while idle
}

// Accept returns the next connection there is room for. A failure to
// accept goes back to http.Server, which retries a temporary one (EMFILE
// and ENFILE are) with a backoff of up to a second.
func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		l.fd.note(err)
		if err != nil {
			return nil, err
		}
		if lc := l.admit(c); lc != nil {
			return lc, nil
		}
		l.metrics.inboundClosed.Inc(closedRefused)
		_ = c.SetWriteDeadline(time.Now().Add(refuseWriteTimeout))
		_, _ = c.Write([]byte(refusal))
		_ = c.Close()
	}
}

// admit makes room for c if it can, closing idle connections, and counts
// it in; nil means there is no room.
func (l *limitListener) admit(c net.Conn) *limitedConn {
	now := time.Now()
	var victims []*limitedConn
	l.mu.Lock()
	if l.open > l.pressure {
		for e := l.idle.Front(); e != nil && now.Sub(e.Value.(*limitedConn).idleAt) >= pressureIdleTimeout; e = l.idle.Front() {
			victims = append(victims, l.forgetLocked(e.Value.(*limitedConn)))
			l.metrics.inboundClosed.Inc(closedIdlePressure)
		}
	}
	if e := l.idle.Front(); l.open >= l.max && e != nil {
		victims = append(victims, l.forgetLocked(e.Value.(*limitedConn)))
		l.metrics.inboundClosed.Inc(closedIdleEvicted)
	}
	var lc *limitedConn
	if l.open < l.max {
		l.open++
		l.metrics.inboundConns.Add(1)
		lc = &limitedConn{Conn: c, l: l}
	}
	l.mu.Unlock()
	// Closing the socket is what frees the descriptor; the server's
	// goroutine for the connection then sees it closed and ends.
	for _, v := range victims {
		_ = v.Conn.Close()
	}
	return lc
}

// forgetLocked stops counting c as open; it returns c.
func (l *limitListener) forgetLocked(c *limitedConn) *limitedConn {
	if c.elem != nil {
		l.idle.Remove(c.elem)
		c.elem = nil
	}
	if !c.released {
		c.released = true
		l.open--
		l.metrics.inboundConns.Add(-1)
	}
	return c
}

// connState is the server's ConnState hook: it keeps the list of idle
// connections in the order they went idle.
func (l *limitListener) connState(c net.Conn, state http.ConnState) {
	lc, ok := c.(*limitedConn)
	if !ok {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if state == http.StateIdle {
		if !lc.released && lc.elem == nil {
			lc.idleAt = time.Now()
			lc.elem = l.idle.PushBack(lc)
		}
		return
	}
	if lc.elem != nil {
		l.idle.Remove(lc.elem)
		lc.elem = nil
	}
}

func (c *limitedConn) Close() error {
	c.l.mu.Lock()
	c.l.forgetLocked(c)
	c.l.mu.Unlock()
	return c.Conn.Close()
}
