package main

import (
	"context"
	"net"
	"net/http"
	"time"
)

// Tuning of the connections to the object service.
const (
	// maxDials bounds the connections being opened at once.
	maxDials = 64
	// dialTimeout: the object service is expected close by; a dial that
	// takes longer is a failed attempt, retried.
	dialTimeout = 2 * time.Second
	// tcpKeepAlive probes idle connections, so a dead peer is noticed.
	tcpKeepAlive = 30 * time.Second
	// idleConnTimeout closes connections a quiet spell left unused.
	idleConnTimeout = 90 * time.Second
	// Answers are a few dozen bytes: small buffers keep ten thousand
	// connections cheap.
	readBufferSize  = 2048
	writeBufferSize = 1024
)

// newTransport is the one transport to the object service, tuned for many
// concurrent requests to a single host; dial opens a connection.
func newTransport(cfg config, dial func(ctx context.Context, network, addr string) (net.Conn, error)) *http.Transport {
	// A burst of new ids (a start, a takeover of many journal rows) would
	// open thousands of connections at once and take the CPU the handler
	// needs to answer in time. Bounding the dials in progress spreads them
	// out, and a request waiting for a dial often gets a connection another
	// request freed instead.
	dials := make(chan struct{}, maxDials)
	return &http.Transport{
		Proxy: http.ProxyFromEnvironment,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			select {
			case dials <- struct{}{}:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			defer func() { <-dials }()
			return dial(ctx, network, addr)
		},
		// Every fetch slot may hold a connection; with the default of 2
		// idle connections per host almost every request would dial.
		MaxIdleConns:        cfg.maxInflight,
		MaxIdleConnsPerHost: cfg.maxInflight,
		// Idle and dialing connections count too: without this cap, a
		// request that took a freed connection while its own dial was under
		// way leaves one more idle socket, and the total can grow past the
		// open-file limit that -max-inflight was sized to.
		MaxConnsPerHost:     cfg.maxInflight,
		IdleConnTimeout:     idleConnTimeout,
		TLSHandshakeTimeout: dialTimeout,
		// No ResponseHeaderTimeout: the client's -fetch-timeout, counted
		// from the same start, already ends the attempt, and the header
		// timeout cost a second timer per attempt.
		DisableCompression: true,
		ReadBufferSize:     readBufferSize,
		WriteBufferSize:    writeBufferSize,
	}
}
