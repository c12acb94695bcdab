package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Benchmarks of the hot paths, for benchstat:
//
//	make gobench
//
// The load benchmark of the whole service is make bench (sim -mode bench).

func randomBody(n int) []byte {
	ids := make([]int64, n)
	for i := range ids {
		ids[i] = rand.Int64N(1 << 40)
	}
	return []byte(idsBody(ids...))
}

func BenchmarkDecodeCallback(b *testing.B) {
	for _, n := range []int{10, 200, 10000} {
		body := randomBody(n)
		b.Run(fmt.Sprintf("ids=%d", n), func(b *testing.B) {
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := decodeCallback(bytes.NewReader(body), 10000); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// instantObjects answers every lookup at once, in memory: even ids online.
type instantObjects struct{}

func (instantObjects) RoundTrip(r *http.Request) (*http.Response, error) {
	id := r.URL.Path[strings.LastIndexByte(r.URL.Path, '/')+1:]
	n, _ := strconv.ParseInt(id, 10, 64)
	body := `{"id":` + id + `,"online":` + strconv.FormatBool(n%2 == 0) + `}`
	return &http.Response{StatusCode: 200, Body: io.NopCloser(strings.NewReader(body)), Header: http.Header{}, Request: r}, nil
}

// BenchmarkCallbackHandler is one POST /callback of 200 ids through the
// handler, journal write included, with callbacks posted from parallel
// goroutines as senders do. The pipeline works in the background (lookups
// answered in memory, upserts to the real database), so its cost is in the
// figures too; the benchmark fails if the backlog ever fills.
func BenchmarkCallbackHandler(b *testing.B) {
	dsn := testDSN(b)
	cfg := testConfig(b, "-dsn", dsn, "-upstream", "http://objects.invalid")
	p := testApp(b, cfg, instantObjects{})
	if err := p.db.applySchema(context.Background()); err != nil {
		b.Fatal(err)
	}
	p.db.setUp(nil)
	p.start()

	bodies := make([][]byte, 64)
	for i := range bodies {
		bodies[i] = randomBody(200)
	}
	b.ReportAllocs()
	b.SetParallelism(8)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := rand.IntN(len(bodies))
		for pb.Next() {
			rec := httptest.NewRecorder()
			req := httptest.NewRequest(http.MethodPost, "/callback", bytes.NewReader(bodies[i%len(bodies)]))
			p.handler().ServeHTTP(rec, req)
			if rec.Code != http.StatusAccepted || !strings.Contains(rec.Body.String(), `"journaled":true`) {
				b.Errorf("status %d %s, want 202 journaled", rec.Code, rec.Body)
				return
			}
			i++
		}
	})
}

// BenchmarkApply is the upsert path: one statement per batch of online
// objects, rows per second by batch size and by the size of the table. Ids come from
// twice the table's range, so about half are updates that move last_seen
// forward and half are inserts.
func BenchmarkApply(b *testing.B) {
	for _, table := range []int{100000, 1000000} {
		p := dbApp(b)
		if _, err := p.db.main.Exec(`INSERT INTO objects SELECT g, now() - interval '10 seconds' FROM generate_series(0, $1 - 1) g`, table); err != nil {
			b.Fatal(err)
		}
		if _, err := p.db.main.Exec(`VACUUM ANALYZE objects`); err != nil {
			b.Fatal(err)
		}
		for _, rows := range []int{100, 1000, 10000} {
			b.Run(fmt.Sprintf("table=%d/rows=%d", table, rows), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					now := time.Now().Truncate(time.Microsecond)
					objects := make([]objectRow, rows)
					for i := range objects {
						objects[i] = objectRow{rand.Int64N(2 * int64(table)), now}
					}
					batch := []*writeReq{{objects: objects, newest: now, done: make(chan error, 1)}}
					if err := p.writer.applyBatch(context.Background(), batch); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(rows*b.N)/b.Elapsed().Seconds(), "rows/s")
			})
		}
	}
}

// lookupNewIDs looks up a callback of n ids never seen before (numbered on
// from *next) and waits for all of its lookups.
func lookupNewIDs(p *app, next *int64, n int) *callback {
	ids := make([]int64, n)
	for i := range ids {
		*next++
		ids[i] = *next
	}
	cb := newCallback(time.Now(), ids)
	var wg sync.WaitGroup
	wg.Add(1)
	p.fetcher.lookupAll(context.Background(), cb, wg.Done)
	wg.Wait()
	return cb
}

// BenchmarkLookup is the fetch path with the network taken out: a callback
// of 200 new ids through the semaphore, the flights and the answer check.
func BenchmarkLookup(b *testing.B) {
	p := fetchApp(b, testConfig(b, "-upstream", "http://objects.invalid"), instantObjects{})
	next := int64(0)
	b.ReportAllocs()
	for b.Loop() {
		lookupNewIDs(p, &next, 200)
	}
	b.ReportMetric(float64(200*b.N)/b.Elapsed().Seconds(), "fetches/s")
}

// rawObjects is an object service cheap enough that the client side
// dominates a loopback benchmark: one goroutine per connection answers each
// GET /objects/{id} with {"id":id,"online":even}, without net/http.
func rawObjects(b *testing.B) string {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go serveRaw(c)
		}
	}()
	return "http://" + ln.Addr().String()
}

func serveRaw(c net.Conn) {
	defer c.Close()
	r := bufio.NewReaderSize(c, 4096)
	out := make([]byte, 0, 256)
	for {
		line, err := r.ReadSlice('\n')
		if err != nil {
			return
		}
		// "GET /objects/123 HTTP/1.1\r\n"
		path := line[:bytes.LastIndexByte(line, ' ')]
		id := path[bytes.LastIndexByte(path, '/')+1:]
		n, _ := strconv.ParseInt(string(id), 10, 64)
		body := make([]byte, 0, 48)
		body = append(body, `{"id":`...)
		body = append(body, id...)
		body = append(body, `,"online":`...)
		body = strconv.AppendBool(body, n%2 == 0)
		body = append(body, '}')
		for {
			h, err := r.ReadSlice('\n')
			if err != nil {
				return
			}
			if len(h) <= 2 {
				break
			}
		}
		out = append(out[:0], "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "...)
		out = strconv.AppendInt(out, int64(len(body)), 10)
		out = append(out, "\r\n\r\n"...)
		out = append(out, body...)
		if _, err := c.Write(out); err != nil {
			return
		}
	}
}

// cpuTime is the process's CPU time so far, user and system: on a shared
// machine it varies less than the wall time.
func cpuTime(b *testing.B) time.Duration {
	b.Helper()
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportPerFetch reports wall and CPU time per fetch since cpu0.
func reportPerFetch(b *testing.B, cpu0 time.Duration, fetches int) {
	b.Helper()
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(fetches), "ns/fetch")
	b.ReportMetric(float64((cpuTime(b)-cpu0).Nanoseconds())/float64(fetches), "cpu-ns/fetch")
}

// BenchmarkFetchLoopback compares, over loopback HTTP to the same cheap
// object service and the service's tuned transport, the fetch path
// (lookupAll of 1000 new ids, 256 slots) with a bare client doing the same
// GETs from 256 goroutines: the ns/fetch of service over bare is the
// fetch path's overhead over the ceiling's client, measured in one run.
func BenchmarkFetchLoopback(b *testing.B) {
	const conc, batch = 256, 1000
	target := rawObjects(b)
	cfg := testConfig(b, "-upstream", target, "-max-inflight", strconv.Itoa(conc))
	b.Run("bare", func(b *testing.B) {
		tr := newTransport(cfg, (&net.Dialer{}).DialContext)
		b.Cleanup(tr.CloseIdleConnections)
		client := &http.Client{Transport: tr, Timeout: cfg.fetchTimeout}
		var next atomic.Int64
		b.ReportAllocs()
		cpu0 := cpuTime(b)
		for b.Loop() {
			var wg sync.WaitGroup
			for range conc {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						id := next.Add(1)
						if id > batch {
							return
						}
						req, _ := http.NewRequest(http.MethodGet, target+"/objects/"+strconv.FormatInt(id, 10), nil)
						resp, err := client.Do(req)
						if err != nil {
							b.Error(err)
							return
						}
						_, _ = io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
					}
				}()
			}
			wg.Wait()
			next.Store(0)
		}
		reportPerFetch(b, cpu0, batch*b.N)
	})
	b.Run("service", func(b *testing.B) {
		p := fetchApp(b, cfg, nil)
		next := int64(0)
		b.ReportAllocs()
		cpu0 := cpuTime(b)
		for b.Loop() {
			cb := lookupNewIDs(p, &next, batch)
			for i := range cb.results {
				if r := result(cb.results[i].Load()); r != resultOnline && r != resultOffline {
					b.Fatalf("id %d: result %d", cb.objectIDs[i], r)
				}
			}
		}
		reportPerFetch(b, cpu0, batch*b.N)
	})
}
