package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestFloodHoldsIdleConnections: each connection the flood opens is idle
// after one GET and stays open, and every one the service closes is
// counted.
func TestFloodHoldsIdleConnections(t *testing.T) {
	const conns = 20
	var idle atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, `{"status":"ok"}`)
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateIdle {
			idle.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	f := &flood{}
	var held sync.WaitGroup
	for range conns {
		f.open(ctx, strings.TrimPrefix(srv.URL, "http://"), &held)
	}
	if f.opened.Load() != conns || f.failed.Load() != 0 {
		t.Fatalf("opened %d, failed %d (%v); want %d and 0", f.opened.Load(), f.failed.Load(), f.first.Load(), conns)
	}
	eventuallyFlood(t, "every connection idle", func() bool { return idle.Load() == conns })
	if got := f.closed.Load(); got != 0 {
		t.Errorf("%d connections counted closed while the service holds them all", got)
	}
	srv.CloseClientConnections()
	eventuallyFlood(t, "every close counted", func() bool { return f.closed.Load() == conns })
	cancel()
	held.Wait()
}

// eventuallyFlood waits for cond; nothing in the test takes more than a
// moment, so 10 s means it will not happen.
func eventuallyFlood(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within 10s: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
