package main

import (
	"net"
	"net/url"
	"sync"
	"testing"
	"time"
)

// tcpProxy sits between the service and PostgreSQL so a test can take the
// database away without stopping the server: down refuses new connections
// (the listener closes) and cuts every open one; up listens again on the
// same address. It can also make the database slow (every chunk forwarded
// waits delay) or hang (connections are accepted and nothing is forwarded,
// as when a server or the network in between stops answering).
type tcpProxy struct {
	t       testing.TB
	addr    string // where the service connects
	backend string // PostgreSQL host:port
	target  string // the real DSN, for the test's own checks

	mu      sync.Mutex
	ln      net.Listener
	conns   map[net.Conn]struct{}
	delay   time.Duration
	hanging chan struct{} // non-nil while hung; closed when it ends
}

// newTCPProxy reserves an address; it starts down until setUp(true).
func newTCPProxy(t testing.TB, _ string) *tcpProxy {
	t.Helper()
	p := &tcpProxy{t: t, addr: freeAddr(t), conns: map[net.Conn]struct{}{}}
	t.Cleanup(func() {
		p.setHang(false)
		p.setUp(false)
	})
	return p
}

// setDelay makes every chunk forwarded, either way, wait d: a round trip
// to PostgreSQL takes at least 2d.
func (p *tcpProxy) setDelay(d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.delay = d
}

// setHang stops forwarding anything, on open connections and on new ones,
// which are still accepted; unhung, what was held goes through.
func (p *tcpProxy) setHang(hang bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case hang && p.hanging == nil:
		p.hanging = make(chan struct{})
	case !hang && p.hanging != nil:
		close(p.hanging)
		p.hanging = nil
	}
}

// hold waits out the delay and a hang before a chunk is forwarded.
func (p *tcpProxy) hold() {
	p.mu.Lock()
	d, hung := p.delay, p.hanging
	p.mu.Unlock()
	if hung != nil {
		<-hung
	}
	if d > 0 {
		time.Sleep(d)
	}
}

// dsn points the real DSN at the proxy.
func (p *tcpProxy) dsn(t testing.TB, real string) string {
	t.Helper()
	u, err := url.Parse(real)
	if err != nil || u.Host == "" {
		t.Fatalf("the proxy tests need DATABASE_URL as a postgres:// URL, got %q", real)
	}
	p.target, p.backend = real, u.Host
	u.Host = p.addr
	return u.String()
}

func (p *tcpProxy) setUp(up bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !up {
		if p.ln != nil {
			p.ln.Close()
			p.ln = nil
		}
		for c := range p.conns {
			c.Close()
		}
		clear(p.conns)
		return
	}
	if p.ln != nil {
		return
	}
	ln, err := net.Listen("tcp", p.addr)
	if err != nil {
		p.t.Errorf("proxy listen again on %s: %v", p.addr, err)
		return
	}
	p.ln = ln
	go p.accept(ln)
}

func (p *tcpProxy) accept(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		b, err := net.Dial("tcp", p.backend)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		if p.ln != ln { // went down meanwhile
			p.mu.Unlock()
			c.Close()
			b.Close()
			return
		}
		p.conns[c], p.conns[b] = struct{}{}, struct{}{}
		p.mu.Unlock()
		go p.pipe(c, b)
		go p.pipe(b, c)
	}
}

func (p *tcpProxy) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.hold()
			if _, werr := dst.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	dst.Close()
	src.Close()
	p.mu.Lock()
	delete(p.conns, dst)
	delete(p.conns, src)
	p.mu.Unlock()
}
