package main

import (
	"context"
	"fmt"
	"io"
	"math/bits"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// faults are the fractions of object-service answers that go wrong.
type faults struct {
	status500, garbage, wrongID, hang, drop float64
}

func (f faults) total() float64 { return f.status500 + f.garbage + f.wrongID + f.hang + f.drop }

// objectService plays the slow object service: GET /objects/{id} answers
// {"id":N,"online":B} after a random latency, or misbehaves by fraction, and
// answers every request 500 at once during the outage window.
type objectService struct {
	latencyMin, latencyMax time.Duration
	online                 func(int64) bool
	faults                 faults
	// outageAfter and outageFor place the outage window from the start
	// (set by start; zero outageFor: no outage).
	outageAfter, outageFor time.Duration
	start                  time.Time
	requests               atomic.Int64
	faulted                atomic.Int64 // answers with an injected fault, the outage's included
	outaged                atomic.Int64 // 500s answered in the outage window
	abandoned              atomic.Int64 // requests the client gave up on before the answer

	idMu      sync.Mutex
	ids       map[int64]*idCount
	instances map[string]uint // instance label -> bit in idCount.askedBy
}

// idCount is what the object service saw of one id: requests, of them the
// ones that could not have given the caller an answer (an injected fault,
// the outage, or the caller hung up first), and which instances asked, a
// bit each. Drills give each service instance its own -upstream path,
// /i/LABEL, so that the object service can tell them apart: an id asked
// by two instances was claimed twice, whatever each did on its own.
type idCount struct {
	requests, retryable int32
	askedBy             uint64
}

// maxInstances is how many instance labels get a bit of their own; later
// ones share the last.
const maxInstances = 64

// askedByN is how many instances asked.
func (c idCount) askedByN() int { return bits.OnesCount64(c.askedBy) }

// outageWindow returns the outage window in wall-clock time, zero when none.
func (o *objectService) outageWindow() (from, to time.Time) {
	if o.outageFor <= 0 || o.start.IsZero() {
		return time.Time{}, time.Time{}
	}
	from = o.start.Add(o.outageAfter)
	return from, from.Add(o.outageFor)
}

func (o *objectService) inOutage(t time.Time) bool {
	from, to := o.outageWindow()
	return !from.IsZero() && !t.Before(from) && t.Before(to)
}

// count records one request for id from instance, retryable or not.
func (o *objectService) count(id int64, instance string, retryable bool) {
	o.idMu.Lock()
	defer o.idMu.Unlock()
	if o.ids == nil {
		o.ids = map[int64]*idCount{}
		o.instances = map[string]uint{}
	}
	bit, ok := o.instances[instance]
	if !ok {
		bit = min(uint(len(o.instances)), maxInstances-1)
		o.instances[instance] = bit
	}
	c := o.ids[id]
	if c == nil {
		c = &idCount{}
		o.ids[id] = c
	}
	c.requests++
	c.askedBy |= 1 << bit
	if retryable {
		c.retryable++
	}
}

// instanceNames returns the instance labels, indexed by their askedBy bit
// (the unnamed instance, asking under /objects/ directly, is "").
func (o *objectService) instanceNames() []string {
	o.idMu.Lock()
	defer o.idMu.Unlock()
	names := make([]string, maxInstances)
	for name, bit := range o.instances {
		if names[bit] == "" {
			names[bit] = name
		}
	}
	return names
}

// perID returns a copy of the per-id counts.
func (o *objectService) perID() map[int64]idCount {
	o.idMu.Lock()
	defer o.idMu.Unlock()
	out := make(map[int64]idCount, len(o.ids))
	for id, c := range o.ids {
		out[id] = *c
	}
	return out
}

func (o *objectService) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	o.requests.Add(1)
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err != nil {
		http.Error(w, `{"error":"id must be an integer"}`, http.StatusBadRequest)
		return
	}
	// A dead object service (behind a proxy, say) answers at once.
	if o.inOutage(time.Now()) {
		o.outaged.Add(1)
		o.faulted.Add(1)
		o.count(id, r.PathValue("inst"), true)
		http.Error(w, `{"error":"outage"}`, http.StatusInternalServerError)
		return
	}
	delay := o.latencyMin
	if span := o.latencyMax - o.latencyMin; span > 0 {
		delay += rand.N(span)
	}
	t := time.NewTimer(delay)
	defer t.Stop()
	select {
	case <-t.C:
	case <-r.Context().Done():
		o.abandoned.Add(1)
		o.count(id, r.PathValue("inst"), true)
		return
	}

	x := rand.Float64()
	f := o.faults
	if x < f.total() {
		o.faulted.Add(1)
	}
	o.count(id, r.PathValue("inst"), x < f.total())
	switch {
	case x < f.status500:
		http.Error(w, `{"error":"injected"}`, http.StatusInternalServerError)
		return
	case x < f.status500+f.garbage:
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"id":`+strconv.FormatInt(id, 10)+`,"onl`)
		return
	case x < f.status500+f.garbage+f.wrongID:
		id++
	case x < f.status500+f.garbage+f.wrongID+f.hang:
		// Never answer: hold the request until the client gives up.
		<-r.Context().Done()
		return
	case x < f.total():
		if hj, ok := w.(http.Hijacker); ok {
			if conn, _, err := hj.Hijack(); err == nil {
				conn.Close()
				return
			}
		}
		panic(http.ErrAbortHandler)
	}
	w.Header().Set("Content-Type", "application/json")
	body := make([]byte, 0, 48)
	body = append(body, `{"id":`...)
	body = strconv.AppendInt(body, id, 10)
	body = append(body, `,"online":`...)
	body = strconv.AppendBool(body, o.online(id))
	body = append(body, '}')
	w.Write(body)
}

// mux routes the object service's paths: /objects/{id}, and the same under
// /i/{inst}/ for a service instance that names itself.
func (o *objectService) mux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("GET /objects/{id}", o)
	mux.Handle("GET /i/{inst}/objects/{id}", o)
	return mux
}

// serveObjects starts the object service on addr and returns its address.
// It stops when ctx ends.
func serveObjects(ctx context.Context, addr string, o *objectService) (string, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return "", fmt.Errorf("object service: listen on %s: %w", addr, err)
	}
	if o.start.IsZero() {
		o.start = time.Now()
	}
	srv := &http.Server{
		Handler:           o.mux(),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          quietLog(),
	}
	go srv.Serve(ln)
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	return ln.Addr().String(), nil
}

// ceiling measures what a bare client gets from the object service at
// target: concurrency workers GET ids in a closed loop for d, over one
// transport sized like the service's. Only answers in the last three
// quarters count, so connection set-up and the workers' synchronised start
// do not drag the rate down.
func ceiling(ctx context.Context, target string, concurrency int, d time.Duration) (ok, failed int64, window time.Duration, firstErr string) {
	tr := &http.Transport{
		MaxIdleConns:        concurrency,
		MaxIdleConnsPerHost: concurrency,
		MaxConnsPerHost:     concurrency, // idle ones too, so sockets stay within the file limit
		IdleConnTimeout:     90 * time.Second,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var okN, failN atomic.Int64
	var errOnce sync.Once
	fail := func(err error) {
		if ctx.Err() != nil {
			return
		}
		failN.Add(1)
		errOnce.Do(func() { firstErr = err.Error() })
		// A failing worker must not spin and take the CPU from the others.
		time.Sleep(10 * time.Millisecond)
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	warm := d / 4
	for range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				id := next.Add(1)
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, target+"/objects/"+strconv.FormatInt(id, 10), nil)
				resp, err := client.Do(req)
				if err != nil {
					fail(err)
					continue
				}
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err == nil && resp.StatusCode != http.StatusOK {
					err = fmt.Errorf("status %d", resp.StatusCode)
				}
				if err != nil {
					fail(err)
					continue
				}
				if time.Since(start) >= warm {
					okN.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	return okN.Load(), failN.Load(), time.Since(start) - warm, firstErr
}
