package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Flood mode plays a client that spends the service's file descriptors:
// it opens -flood-conns keep-alive connections to the host of -target, sends
// one GET /healthz on each and holds them idle, without ever reconnecting,
// until -duration passes (0: until interrupted). It says "holding" once
// every connection was tried, so a script can start its load then.

const (
	// floodDialers open connections in parallel: enough to open 18 500 in
	// seconds, few enough not to overflow the service's accept queue.
	floodDialers = 100
	// floodTimeout bounds one connection's dial and answer.
	floodTimeout = 5 * time.Second
	// floodReadBuffer holds an answer to /healthz; small, since there are
	// thousands of connections.
	floodReadBuffer = 512
)

// flood counts what happened to the connections.
type flood struct {
	opened atomic.Int64 // answered 200 and held
	failed atomic.Int64 // no connection, or no 200
	closed atomic.Int64 // of the held ones, closed by the service since
	first  atomic.Value // string: the first failure
}

func runFlood(ctx context.Context, c config, stdout, stderr io.Writer) int {
	u, err := url.Parse(strings.Split(c.target, ",")[0])
	if err != nil || u.Host == "" {
		fmt.Fprintf(stderr, "sim: flood: -target %q: want a URL with a host\n", c.target)
		return 2
	}
	if c.duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.duration)
		defer cancel()
	}
	fmt.Fprintf(stderr, "sim: flood: opening %d idle connections to %s\n", c.floodConns, u.Host)
	f := &flood{}
	var held sync.WaitGroup
	next := make(chan struct{})
	var dialers sync.WaitGroup
	for range floodDialers {
		dialers.Add(1)
		go func() {
			defer dialers.Done()
			for range next {
				f.open(ctx, u.Host, &held)
			}
		}()
	}
	for i := 0; i < c.floodConns && ctx.Err() == nil; i++ {
		next <- struct{}{}
	}
	close(next)
	dialers.Wait()
	first, _ := f.first.Load().(string)
	failed := fmt.Sprint(f.failed.Load())
	if first != "" {
		failed += " (first: " + first + ")"
	}
	fmt.Fprintf(stderr, "sim: flood: holding: %d opened, %s failed, %d already closed by the service\n",
		f.opened.Load(), failed, f.closed.Load())

	<-ctx.Done()
	held.Wait()
	fmt.Fprintf(stderr, "sim: flood: done: %d opened, %d failed, %d closed by the service before the end\n",
		f.opened.Load(), f.failed.Load(), f.closed.Load())
	if c.json {
		printSummary(stdout, map[string]any{"opened": f.opened.Load(), "failed": f.failed.Load(),
			"closed_by_service": f.closed.Load(), "first_failure": first, "pass": true})
	}
	return 0
}

// open opens one connection, asks for /healthz and holds it until the
// service closes it or ctx ends.
func (f *flood) open(ctx context.Context, host string, held *sync.WaitGroup) {
	fail := func(err error) {
		f.failed.Add(1)
		f.first.CompareAndSwap(nil, err.Error())
	}
	d := net.Dialer{Timeout: floodTimeout}
	conn, err := d.DialContext(ctx, "tcp", host)
	if err != nil {
		fail(err)
		return
	}
	_ = conn.SetDeadline(time.Now().Add(floodTimeout))
	r := bufio.NewReaderSize(conn, floodReadBuffer)
	resp, err := func() (*http.Response, error) {
		if _, err := io.WriteString(conn, "GET /healthz HTTP/1.1\r\nHost: "+host+"\r\n\r\n"); err != nil {
			return nil, err
		}
		return http.ReadResponse(r, nil)
	}()
	if err == nil {
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err == nil && resp.StatusCode != http.StatusOK {
			err = fmt.Errorf("GET /healthz: %s", resp.Status)
		}
	}
	if err != nil {
		conn.Close()
		fail(err)
		return
	}
	_ = conn.SetDeadline(time.Time{})
	f.opened.Add(1)
	held.Add(1)
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	go func() {
		defer held.Done()
		_, _ = r.ReadByte()
		if stop() { // the read ended before ctx did: the service closed it
			f.closed.Add(1)
		}
		conn.Close()
	}()
}
