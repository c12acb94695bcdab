package main

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The spill on its own: no database needed.

func openTestSpill(t testing.TB, dir string, ttl time.Duration) (*spill, spillReplay, *metrics) {
	t.Helper()
	m := newMetrics()
	s, rep, err := openSpill(dir, ttl, discardLogger(), m, &guard{log: discardLogger(), metrics: m})
	if err != nil {
		t.Fatalf("open spill %s: %v", dir, err)
	}
	t.Cleanup(func() { _ = s.close() })
	return s, rep, m
}

// spillRows makes n callbacks received one millisecond apart from base.
func spillRows(n int, base time.Time) []journalRow {
	rows := make([]journalRow, n)
	for i := range rows {
		ids := make([]int64, i%7)
		for j := range ids {
			ids[j] = int64(i*1000 + j*j - 3) // sorted, some negative
		}
		rows[i] = journalRow{journalID: int64(i+1) * 7919, receivedAt: base.Add(time.Duration(i) * time.Millisecond), objectIDs: ids}
	}
	return rows
}

func appendAll(t testing.TB, s *spill, rows []journalRow) {
	t.Helper()
	for _, r := range rows {
		if err := s.append(context.Background(), r); err != nil {
			t.Fatalf("append %d: %v", r.journalID, err)
		}
	}
}

func sameRows(t testing.TB, got, want []journalRow) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("replayed %d records, want %d", len(got), len(want))
	}
	for i := range want {
		g, w := got[i], want[i]
		if g.journalID != w.journalID || !g.receivedAt.Equal(w.receivedAt) || !slices.Equal(g.objectIDs, w.objectIDs) {
			t.Fatalf("record %d: got %+v, want %+v", i, g, w)
		}
	}
}

func segmentFiles(t testing.TB, dir string) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, spillPrefix+"*"+spillSuffix))
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(files)
	return files
}

func histCount(h *histogram) uint64 {
	var n uint64
	for i := range h.buckets {
		n += h.buckets[i].Load()
	}
	return n
}

func TestSpillRoundTrip(t *testing.T) {
	dir := t.TempDir()
	base := time.Now().Truncate(time.Microsecond)
	want := spillRows(50, base)
	s, rep, _ := openTestSpill(t, dir, time.Minute)
	if len(rep.rows) != 0 {
		t.Fatalf("a new spill replayed %d records", len(rep.rows))
	}
	appendAll(t, s, want)
	if err := s.close(); err != nil {
		t.Fatal(err)
	}
	_, rep, m := openTestSpill(t, dir, time.Minute)
	sameRows(t, rep.rows, want)
	if rep.corrupt != 0 || m.spillCorrupt.Value() != 0 {
		t.Fatalf("corrupt %d, want 0", rep.corrupt)
	}
	if got := m.spillRecords.Value(); got != 50 {
		t.Fatalf("objtrack_spill_records %d, want 50", got)
	}
}

// Many appends at once share fsyncs, and each returns only once its record
// is durable: a reopen finds every one.
func TestSpillGroupCommit(t *testing.T) {
	dir := t.TempDir()
	s, _, m := openTestSpill(t, dir, time.Minute)
	const n = 400
	rows := spillRows(n, time.Now().Truncate(time.Microsecond))
	var wg sync.WaitGroup
	for _, r := range rows {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.append(context.Background(), r); err != nil {
				t.Errorf("append: %v", err)
			}
		}()
	}
	wg.Wait()
	fsyncs := histCount(m.spillFsync)
	if fsyncs == 0 || fsyncs >= n {
		t.Fatalf("%d fsyncs for %d concurrent appends, want fewer (group commit)", fsyncs, n)
	}
	if got := m.spillAppended.Value(); got != n {
		t.Fatalf("objtrack_spill_appended_total %d, want %d", got, n)
	}
	t.Logf("%d appends, %d fsyncs", n, fsyncs)
	_ = s.close()
	_, rep, _ := openTestSpill(t, dir, time.Minute)
	if len(rep.rows) != n {
		t.Fatalf("replayed %d, want %d", len(rep.rows), n)
	}
}

func TestSpillLockRefusesASecondOpener(t *testing.T) {
	dir := t.TempDir()
	s, _, _ := openTestSpill(t, dir, time.Minute)
	m := newMetrics()
	_, _, err := openSpill(dir, time.Minute, discardLogger(), m, &guard{log: discardLogger(), metrics: m})
	if !errors.Is(err, errSpillLocked) || !strings.Contains(err.Error(), dir) || !strings.Contains(err.Error(), "-spill-dir") {
		t.Fatalf("second open: %v, want errSpillLocked naming %s and -spill-dir", err, dir)
	}
	_ = s.close()
	openTestSpill(t, dir, time.Minute) // free again once closed
}

// A crash mid-write leaves a torn record at the tail: replay cuts it off,
// counts it, and keeps every record before it; the next open is clean.
func TestSpillTruncatedMidRecord(t *testing.T) {
	dir := t.TempDir()
	want := spillRows(10, time.Now().Truncate(time.Microsecond))
	s, _, _ := openTestSpill(t, dir, time.Minute)
	appendAll(t, s, want)
	_ = s.close()
	files := segmentFiles(t, dir)
	if len(files) != 1 {
		t.Fatalf("segments %v, want 1", files)
	}
	lastLen := len(appendRecord(nil, want[9]))
	st, _ := os.Stat(files[0])
	full := st.Size()
	if err := os.Truncate(files[0], full-int64(lastLen/2)); err != nil {
		t.Fatal(err)
	}
	s, rep, m := openTestSpill(t, dir, time.Minute)
	sameRows(t, rep.rows, want[:9])
	if rep.corrupt != 1 || rep.cut != 1 || m.spillCorrupt.Value() != 1 {
		t.Fatalf("corrupt %d cut %d metric %d, want 1, 1, 1", rep.corrupt, rep.cut, m.spillCorrupt.Value())
	}
	if st, _ := os.Stat(files[0]); st.Size() != full-int64(lastLen) {
		t.Fatalf("segment is %d bytes after the cut, want %d", st.Size(), full-int64(lastLen))
	}
	_ = s.close()
	_, rep, _ = openTestSpill(t, dir, time.Minute)
	sameRows(t, rep.rows, want[:9])
	if rep.corrupt != 0 {
		t.Fatalf("second replay found %d corrupt records, want 0", rep.corrupt)
	}
}

// A flipped byte fails one record's CRC (or breaks its frame): that record
// is counted and skipped, every other one is kept; in the last record it is
// a torn tail and is cut.
func TestSpillFlippedByte(t *testing.T) {
	want := spillRows(10, time.Now().Truncate(time.Microsecond))
	offsets := make([]int, len(want)+1) // where each record starts
	for i, r := range want {
		offsets[i+1] = offsets[i] + len(appendRecord(nil, r))
	}
	for _, tc := range []struct {
		name   string
		record int
		at     int // byte within the record
		cut    int
	}{
		{"payload of a middle record", 4, spillHeader + 3, 0},
		{"length of a middle record", 4, 1, 0},
		{"CRC of a middle record", 4, 5, 0},
		{"first record", 0, spillHeader + 9, 0},
		{"last record", 9, spillHeader + 2, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s, _, _ := openTestSpill(t, dir, time.Minute)
			appendAll(t, s, want)
			_ = s.close()
			f := segmentFiles(t, dir)[0]
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			b[offsets[tc.record]+tc.at] ^= 0x5a
			if err := os.WriteFile(f, b, 0o600); err != nil {
				t.Fatal(err)
			}
			_, rep, m := openTestSpill(t, dir, time.Minute)
			kept := slices.Delete(slices.Clone(want), tc.record, tc.record+1)
			sameRows(t, rep.rows, kept)
			if rep.corrupt != 1 || rep.cut != tc.cut || m.spillCorrupt.Value() != 1 {
				t.Fatalf("corrupt %d cut %d metric %d, want 1, %d, 1", rep.corrupt, tc.cut, m.spillCorrupt.Value(), tc.cut)
			}
		})
	}
}

// A segment goes once every record in it has moved, or once its newest
// record is past the TTL; one with a record still pending stays.
func TestSpillSegmentDeletion(t *testing.T) {
	dir := t.TempDir()
	s, _, m := openTestSpill(t, dir, time.Minute)
	s.segmentMax = 200 // a few records a segment
	rows := spillRows(40, time.Now().Truncate(time.Microsecond))
	appendAll(t, s, rows)
	segs := len(segmentFiles(t, dir))
	if segs < 4 {
		t.Fatalf("%d segments, want several at a 200-byte bound", segs)
	}
	var ids []int64
	for _, r := range rows[:39] {
		ids = append(ids, r.journalID)
	}
	s.moved(ids...)
	// Only the segment holding the last record, still pending, remains.
	eventually(t, 5*time.Second, "spent segments deleted", func() bool {
		return len(segmentFiles(t, dir)) == 1 && m.spillSegments.Value() == 1
	})
	if m.spillRecords.Value() != 1 || m.spillMoved.Value() != 39 {
		t.Fatalf("records %d moved %d, want 1 and 39", m.spillRecords.Value(), m.spillMoved.Value())
	}
	_ = s.close()
	// Which records moved is not written down: a restart replays the
	// whole segment that was kept (moving a record twice is harmless), and
	// nothing from the deleted ones.
	_, rep, _ := openTestSpill(t, dir, time.Minute)
	sameRows(t, rep.rows, rows[40-len(rep.rows):])
	if len(rep.rows) > 10 {
		t.Fatalf("replayed %d records, want only the last segment's", len(rep.rows))
	}

	t.Run("past the TTL", func(t *testing.T) {
		dir := t.TempDir()
		s, _, m := openTestSpill(t, dir, time.Minute)
		old := time.Now().Add(-2 * time.Minute).Truncate(time.Microsecond)
		appendAll(t, s, spillRows(5, old))
		s.kick <- struct{}{}
		eventually(t, 5*time.Second, "expired segment deleted", func() bool {
			return len(segmentFiles(t, dir)) == 0 && m.spillExpired.Value() == 5 && m.spillRecords.Value() == 0
		})
	})
}

// Nothing moves (PostgreSQL never returns): the spill still holds no more
// than the TTL's worth of records plus one segment.
func TestSpillDiskUseBounded(t *testing.T) {
	dir := t.TempDir()
	const ttl = 10 * time.Second
	s, _, m := openTestSpill(t, dir, ttl)
	s.segmentMax = 1 << 10
	var clock atomic.Int64
	base := time.Now().Add(-time.Hour).Truncate(time.Microsecond)
	clock.Store(base.UnixNano())
	s.now = func() time.Time { return time.Unix(0, clock.Load()) }
	// 20 callbacks a second of simulated time for 60 s: 6 TTLs.
	const every = 50 * time.Millisecond
	rows := spillRows(1200, base)
	var maxBytes int64
	var recBytes int64
	for i := range rows {
		rows[i].receivedAt = base.Add(time.Duration(i) * every)
		recBytes = max(recBytes, int64(len(appendRecord(nil, rows[i]))))
		clock.Store(rows[i].receivedAt.UnixNano())
		appendAll(t, s, rows[i:i+1])
		if i%20 == 0 {
			s.kick <- struct{}{}
			// The sweep runs in the writer; the next append queues behind it.
		}
		maxBytes = max(maxBytes, m.spillBytes.Value())
	}
	// The TTL's worth of records, plus the segment being filled and the one
	// holding the oldest live record, plus the 20 records between sweeps.
	bound := int64(ttl/every)*recBytes + 2*s.segmentMax + 20*recBytes
	if maxBytes > bound {
		t.Fatalf("spill grew to %d bytes, want at most %d (rate × TTL + segments)", maxBytes, bound)
	}
	if m.spillExpired.Value() == 0 {
		t.Fatal("nothing expired in 6 TTLs")
	}
	t.Logf("spill peaked at %d bytes (bound %d), %d records expired", maxBytes, bound, m.spillExpired.Value())
}

func TestSpillAppendAfterClose(t *testing.T) {
	s, _, _ := openTestSpill(t, t.TempDir(), time.Minute)
	_ = s.close()
	err := s.append(context.Background(), spillRows(1, time.Now())[0])
	if !errors.Is(err, errSpillClosed) {
		t.Fatalf("append after close: %v, want errSpillClosed", err)
	}
}

// BenchmarkSpillAppend measures the rate the spill sustains on its own:
// many handlers appending at once, each waiting for its fsync.
//
//	go test -run '^$' -bench BenchmarkSpillAppend -benchtime 5s .
func BenchmarkSpillAppend(b *testing.B) {
	s, _, m := openTestSpill(b, b.TempDir(), time.Hour)
	rows := spillRows(1, time.Now())
	ids := make([]int64, 100) // a typical callback
	for i := range ids {
		ids[i] = int64(i * 37)
	}
	b.SetParallelism(64)
	var next atomic.Int64
	start := time.Now()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			r := rows[0]
			r.journalID = next.Add(1)
			r.objectIDs = ids
			if err := s.append(context.Background(), r); err != nil {
				b.Error(err)
				return
			}
		}
	})
	elapsed := time.Since(start)
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "callbacks/s")
	if f := histCount(m.spillFsync); f > 0 {
		b.ReportMetric(float64(b.N)/float64(f), "callbacks/fsync")
	}
}
