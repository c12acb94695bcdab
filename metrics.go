package main

import (
	"fmt"
	"io"
	"math"
	"strconv"
	"sync/atomic"
)

// metrics are the service's counters, gauges and histograms, written by hand
// in the Prometheus text exposition format (version 0.0.4). All updates are
// atomic so the hot path never takes a lock for them.
type metrics struct {
	callbacksAccepted  counter
	callbacksRejected  *labeled
	idsReceived        counter
	fetches            *labeled
	retries            counter
	coalesced          counter
	idsDropped         counter
	callbacksApplied   counter
	callbacksExpired   counter
	rowsUpserted       counter
	rowsReaped         counter
	journalWrites      counter
	journalFailures    counter
	journalLate        counter
	journalRejournaled counter
	journalReplayed    counter
	journalExpired     counter
	dbErrors           *labeled
	panics             counter
	spillAppended      counter
	spillMoved         counter
	spillCorrupt       counter
	spillExpired       counter
	spillErrors        counter

	fetchesInFlight     gauge
	fetchQueue          gauge
	fetchLimit          gauge
	handlingLimit       gauge
	queueWait           floatGauge
	upstreamUp          floatGauge
	callbacksShed       *labeled
	callbacksInMemory   gauge
	idsInMemory         gauge
	journalDepth        gauge
	databaseUp          gauge
	callbacksMemoryOnly gauge
	spillRecords        gauge
	spillBytes          gauge
	spillSegments       gauge

	// Inbound connections and descriptors (listener.go, budget.go).
	inboundConns     gauge
	inboundLimit     gauge
	inboundClosed    *labeled
	fdExhaustedTotal *labeled
	fdExhausted      fdExhaustion

	fetchLatency  *histogram
	completion    *histogram
	answer        *histogram
	journalCommit *histogram
	spillFsync    *histogram

	all []exported
}

type exported struct {
	name, help, kind string
	m                interface {
		write(b []byte, name string) []byte
	}
}

// Label values are fixed up front, so a bad value is a bug, not a new series.
var (
	rejectReasons = []string{"bad_method", "bad_json", "bad_id", "too_many_ids", "body_too_large"}
	shedReasons   = []string{"backlog_full", "queue_wait", "busy", "not_durable"}
	fetchOutcomes = []string{outcomeOnline, outcomeOffline, outcomeStatus, outcomeBody, outcomeWrongID, outcomeTransport, outcomeTimeout, outcomePanic}
	dbOps         = []string{"schema", "ping", "journal", "apply", "reap", "renew", "claim", "expire", "park", "depth"}
)

func newMetrics() *metrics {
	m := &metrics{
		callbacksRejected: newLabeled("reason", rejectReasons),
		callbacksShed:     newLabeled("reason", shedReasons),
		fetches:           newLabeled("outcome", fetchOutcomes),
		dbErrors:          newLabeled("op", dbOps),
		inboundClosed:     newLabeled("reason", inboundCloseReasons),
		fdExhaustedTotal:  newLabeled("where", fdPlaces),
		fetchLatency:      newHistogram(0.005, 0.025, 0.1, 0.25, 0.5, 1, 2, 3, 4, 5, 10),
		completion:        newHistogram(0.1, 0.5, 1, 2, 3, 4, 5, 7.5, 10, 15, 20, 30),
		answer:            newHistogram(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1),
		journalCommit:     newHistogram(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2, 5),
		spillFsync:        newHistogram(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
	}
	m.all = []exported{
		{"objtrack_callbacks_accepted_total", "Callbacks answered 202.", "counter", &m.callbacksAccepted},
		{"objtrack_callbacks_rejected_total", "Callbacks refused, by reason.", "counter", m.callbacksRejected},
		{"objtrack_ids_received_total", "Object ids in accepted callbacks, after removing duplicates.", "counter", &m.idsReceived},
		{"objtrack_fetches_total", "Requests to the object service, by outcome.", "counter", m.fetches},
		{"objtrack_fetch_retries_total", "Failed requests to the object service that were tried again.", "counter", &m.retries},
		{"objtrack_fetches_coalesced_total", "Lookups that joined a request already in flight for the same id.", "counter", &m.coalesced},
		{"objtrack_ids_dropped_total", "Lookups given up because their callback passed received time + TTL.", "counter", &m.idsDropped},
		{"objtrack_callbacks_applied_total", "Callbacks whose online objects were committed to the table.", "counter", &m.callbacksApplied},
		{"objtrack_callbacks_expired_total", "Callbacks dropped because they could not be applied before received time + TTL.", "counter", &m.callbacksExpired},
		{"objtrack_rows_upserted_total", "Rows inserted or moved forward in time in the objects table.", "counter", &m.rowsUpserted},
		{"objtrack_rows_reaped_total", "Rows deleted from the objects table for being older than the TTL.", "counter", &m.rowsReaped},
		{"objtrack_journal_writes_total", "Callbacks whose journal row the handler path committed (before or after the answer).", "counter", &m.journalWrites},
		{"objtrack_journal_failures_total", "Callbacks answered 2xx with neither a committed journal row nor a spill record.", "counter", &m.journalFailures},
		{"objtrack_journal_late_total", "Callbacks whose journal row was committed after their answer (spilled before it, or counted as failures).", "counter", &m.journalLate},
		{"objtrack_journal_rejournaled_total", "Callbacks accepted into memory only whose row was written once PostgreSQL was back.", "counter", &m.journalRejournaled},
		{"objtrack_journal_replayed_total", "Journal rows taken over from a stopped or crashed instance.", "counter", &m.journalReplayed},
		{"objtrack_journal_expired_total", "Journal rows deleted unprocessed because they were older than the TTL.", "counter", &m.journalExpired},
		{"objtrack_db_errors_total", "Failed PostgreSQL operations, by operation.", "counter", m.dbErrors},
		{"objtrack_panics_recovered_total", "Panics recovered in any goroutine.", "counter", &m.panics},
		{"objtrack_fetches_in_flight", "Requests to the object service in flight.", "gauge", &m.fetchesInFlight},
		{"objtrack_fetch_limit", "Requests to the object service allowed in flight now (adapts to the journal's commit latency and the backlog).", "gauge", &m.fetchLimit},
		{"objtrack_callbacks_handling_limit", "Callbacks allowed to be handled at once now (adapts to the answer time); past it a callback is shed as busy.", "gauge", &m.handlingLimit},
		{"objtrack_fetch_queue_wait_seconds", "Estimated wait for a fetch slot of a new callback's ids, at the fetch rate measured now (admission sheds past -max-queue-wait).", "gauge", &m.queueWait},
		{"objtrack_fetch_queue", "Lookups promised and waiting: for a fetch slot or for a retry's backoff (new, retried, taken over).", "gauge", &m.fetchQueue},
		{"objtrack_upstream_up", "1 while the object service answers; 0 once a second passed with failed attempts and no valid answer; NaN until the first attempt.", "gauge", &m.upstreamUp},
		{"objtrack_callbacks_shed_total", "Callbacks answered 503 with Retry-After because they could not be honoured now, by reason.", "counter", m.callbacksShed},
		{"objtrack_callbacks_in_memory", "Callbacks accepted and not yet applied.", "gauge", &m.callbacksInMemory},
		{"objtrack_ids_in_memory", "Object ids of the callbacks in memory.", "gauge", &m.idsInMemory},
		{"objtrack_journal_depth", "Rows in the journal table, all instances.", "gauge", &m.journalDepth},
		{"objtrack_database_up", "1 when PostgreSQL is reachable and the schema applied.", "gauge", &m.databaseUp},
		{"objtrack_callbacks_memory_only", "Callbacks in memory with neither a committed journal row nor a spill record (a crash would lose them).", "gauge", &m.callbacksMemoryOnly},
		{"objtrack_inbound_connections", "Inbound connections open now.", "gauge", &m.inboundConns},
		{"objtrack_inbound_limit", "Most inbound connections open at once (-max-conns, fitted to the descriptor budget).", "gauge", &m.inboundLimit},
		{"objtrack_inbound_closed_total", "Inbound connections closed by the service to stay within the limit, by reason.", "counter", m.inboundClosed},
		{"objtrack_fd_exhausted_total", "Operations that failed for lack of file descriptors (EMFILE or ENFILE), by where.", "counter", m.fdExhaustedTotal},
		{"objtrack_fd_exhausted", "1 while a place is out of file descriptors: from a failure until an operation there succeeds 5s after the last one.", "gauge", &m.fdExhausted},
		{"objtrack_fetch_duration_seconds", "Time for one request to the object service.", "histogram", m.fetchLatency},
		{"objtrack_callback_completion_seconds", "Time from receiving a callback to committing its objects.", "histogram", m.completion},
		{"objtrack_callback_answer_seconds", "Time from receiving a callback to writing its 202 (senders give up after 1s).", "histogram", m.answer},
		{"objtrack_journal_commit_seconds", "Time from receiving a callback to committing its journal row.", "histogram", m.journalCommit},
		{"objtrack_spill_records", "Callbacks in the local spill journal not yet moved into PostgreSQL (nor past the TTL).", "gauge", &m.spillRecords},
		{"objtrack_spill_bytes", "Bytes in the spill journal's segments.", "gauge", &m.spillBytes},
		{"objtrack_spill_segments", "Segment files in the spill journal.", "gauge", &m.spillSegments},
		{"objtrack_spill_fsync_seconds", "Time for one fsync of the spill journal (one fsync covers every callback of a batch).", "histogram", m.spillFsync},
		{"objtrack_spill_appended_total", "Callbacks written and fsynced to the spill journal.", "counter", &m.spillAppended},
		{"objtrack_spill_moved_total", "Spilled callbacks whose journal row then committed in PostgreSQL (or that were applied), so their spill record is no longer needed.", "counter", &m.spillMoved},
		{"objtrack_spill_corrupt_total", "Spill records found torn or failing their CRC when the spill was replayed at start (cut at a segment's tail, skipped in the middle).", "counter", &m.spillCorrupt},
		{"objtrack_spill_expired_total", "Spilled callbacks dropped unmoved because their receipt time was past the TTL.", "counter", &m.spillExpired},
		{"objtrack_spill_errors_total", "Spill batches the disk refused (write or fsync failed); their callbacks were answered from memory only.", "counter", &m.spillErrors},
	}
	m.all = append(m.all, processMetrics(readBuildInfo())...)
	return m
}

// WriteTo writes every metric in the text exposition format: the service's
// own, then the standard process and Go ones (process.go).
func (m *metrics) WriteTo(w io.Writer) (int64, error) {
	b := make([]byte, 0, 8<<10)
	for _, e := range m.all {
		family := len(b)
		b = fmt.Appendf(b, "# HELP %s %s\n# TYPE %s %s\n", e.name, e.help, e.name, e.kind)
		samples := len(b)
		if b = e.m.write(b, e.name); len(b) == samples {
			b = b[:family] // nothing to report on this platform: leave the family out
		}
	}
	n, err := w.Write(b)
	return int64(n), err
}

type counter struct{ v atomic.Uint64 }

func (c *counter) Inc()         { c.v.Add(1) }
func (c *counter) Add(n uint64) { c.v.Add(n) }
func (c *counter) Value() uint64 {
	return c.v.Load()
}
func (c *counter) write(b []byte, name string) []byte {
	return fmt.Appendf(b, "%s %d\n", name, c.v.Load())
}

type gauge struct{ v atomic.Int64 }

func (g *gauge) Set(n int64)  { g.v.Store(n) }
func (g *gauge) Add(n int64)  { g.v.Add(n) }
func (g *gauge) Value() int64 { return g.v.Load() }
func (g *gauge) write(b []byte, name string) []byte {
	return fmt.Appendf(b, "%s %d\n", name, g.v.Load())
}

// floatGauge is a gauge of a float64 value (seconds, or NaN while unknown).
type floatGauge struct{ bits atomic.Uint64 }

func (g *floatGauge) Set(v float64)  { g.bits.Store(math.Float64bits(v)) }
func (g *floatGauge) Value() float64 { return math.Float64frombits(g.bits.Load()) }
func (g *floatGauge) write(b []byte, name string) []byte {
	return fmt.Appendf(b, "%s %s\n", name, strconv.FormatFloat(g.Value(), 'g', -1, 64))
}

// labeled is a counter with one label whose values are known in advance.
type labeled struct {
	label  string
	values []string
	counts []counter
}

func newLabeled(label string, values []string) *labeled {
	return &labeled{label: label, values: values, counts: make([]counter, len(values))}
}

// Inc counts one for value; an unknown value is a programming error and
// panics, which the guards turn into a logged, counted event.
func (l *labeled) Inc(value string) {
	for i, v := range l.values {
		if v == value {
			l.counts[i].Inc()
			return
		}
	}
	panic("metrics: unknown label value " + strconv.Quote(value))
}

func (l *labeled) Value(value string) uint64 {
	for i, v := range l.values {
		if v == value {
			return l.counts[i].Value()
		}
	}
	return 0
}

func (l *labeled) write(b []byte, name string) []byte {
	for i, v := range l.values {
		b = fmt.Appendf(b, "%s{%s=%q} %d\n", name, l.label, v, l.counts[i].Value())
	}
	return b
}

// histogram has fixed upper bounds in seconds; buckets are stored
// non-cumulative and summed when written.
type histogram struct {
	bounds  []float64
	buckets []atomic.Uint64 // one per bound, plus +Inf
	sumBits atomic.Uint64   // float64 bits, updated by compare-and-swap
}

func newHistogram(bounds ...float64) *histogram {
	return &histogram{bounds: bounds, buckets: make([]atomic.Uint64, len(bounds)+1)}
}

func (h *histogram) Observe(v float64) {
	i := 0
	for i < len(h.bounds) && v > h.bounds[i] {
		i++
	}
	h.buckets[i].Add(1)
	for {
		old := h.sumBits.Load()
		if h.sumBits.CompareAndSwap(old, math.Float64bits(math.Float64frombits(old)+v)) {
			return
		}
	}
}

func (h *histogram) write(b []byte, name string) []byte {
	var cum uint64
	for i, bound := range h.bounds {
		cum += h.buckets[i].Load()
		b = fmt.Appendf(b, "%s_bucket{le=%q} %d\n", name, strconv.FormatFloat(bound, 'g', -1, 64), cum)
	}
	cum += h.buckets[len(h.bounds)].Load()
	b = fmt.Appendf(b, "%s_bucket{le=\"+Inf\"} %d\n", name, cum)
	b = fmt.Appendf(b, "%s_sum %s\n", name, strconv.FormatFloat(math.Float64frombits(h.sumBits.Load()), 'g', -1, 64))
	return fmt.Appendf(b, "%s_count %d\n", name, cum)
}
