package main

import (
	"io"
	"net"
	"net/url"
	"sync"
	"testing"
)

// tcpProxy sits between the service and PostgreSQL so a test can take the
// database away without stopping the server: down refuses new connections
// (the listener closes) and cuts every open one; up listens again on the
// same address.
type tcpProxy struct {
	t       testing.TB
	addr    string // where the service connects
	backend string // PostgreSQL host:port
	target  string // the real DSN, for the test's own checks

	mu    sync.Mutex
	ln    net.Listener
	conns map[net.Conn]struct{}
}

// newTCPProxy reserves an address; it starts down until setUp(true).
func newTCPProxy(t testing.TB, _ string) *tcpProxy {
	t.Helper()
	p := &tcpProxy{t: t, addr: freeAddr(t), conns: map[net.Conn]struct{}{}}
	t.Cleanup(func() { p.setUp(false) })
	return p
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
	_, _ = io.Copy(dst, src)
	dst.Close()
	src.Close()
	p.mu.Lock()
	delete(p.conns, dst)
	delete(p.conns, src)
	p.mu.Unlock()
}
