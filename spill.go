package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// spill is the instance's local journal on disk: where a callback is made
// durable when PostgreSQL is down or its journal commit misses the answer
// deadline. It is an append-only log in segments, like PostgreSQL's WAL or
// etcd's: each record is framed as
//
//	length (uint32 LE) | CRC-32C of the payload (uint32 LE) | payload
//
// and the payload is one callback (spillVersion, journal id, receipt time,
// object ids). One writer goroutine appends whatever is queued and fsyncs
// once for all of it (group commit); an appender returns once the fsync
// covering its record has returned. A record is pending until it is moved
// into PostgreSQL's journal (or applied, which needs no journal row); a
// segment is deleted once none of its records are pending, or once its
// newest record is older than the TTL, when its work is worthless anyway.
// Disk use is therefore bounded by the spill rate times the TTL.
type spill struct {
	dir        string
	ttl        time.Duration
	segmentMax int64
	log        *slog.Logger
	metrics    *metrics
	guard      *guard
	lock       *os.File // holds the flock on dir/LOCK while the spill is open

	now func() time.Time // the clock the TTL is measured on; tests set it

	reqs      chan *spillReq
	kick      chan struct{} // a sweep is worth doing now (records moved)
	quit      chan struct{} // closed by close: the writer finishes and stops
	closeOnce sync.Once
	done      chan struct{} // closed when the writer has stopped

	// mu guards the segments and the index of pending records. The files
	// themselves are touched only by the writer goroutine (and by open and
	// close, when it is not running).
	mu      sync.Mutex
	segs    []*segment         // oldest first; the last is the one appended to
	where   map[int64]*segment // pending records by journal id
	nextSeq uint64
	active  *os.File // the last segment, open for appending; nil until needed
}

// segment is one file of the spill.
type segment struct {
	seq     uint64
	path    string
	size    int64
	ids     []int64   // journal ids of its records
	pending int       // of those, not yet moved into PostgreSQL
	newest  time.Time // the latest receipt time among its records
}

// spillReq is one callback waiting for the writer.
type spillReq struct {
	row  journalRow
	done chan error // buffered: the writer never blocks on an appender that gave up
}

const (
	// spillVersion starts every payload, so a future format can be told
	// apart from this one.
	spillVersion = 1
	// spillHeader is the length and the CRC in front of each payload.
	spillHeader = 8
	// spillMinPayload is the smallest valid payload: version, journal id,
	// receipt time, and a count of zero ids.
	spillMinPayload = 1 + 8 + 8 + 1
	// spillSegmentBytes bounds a segment, so that a segment whose records
	// have all moved can be deleted while the spill is still in use, and so
	// that disk use follows the TTL in steps of this size.
	spillSegmentBytes = 16 << 20
	// spillQueue bounds the appends waiting for the writer.
	spillQueue = 4096
	// spillSweepEvery is how often the writer deletes segments past the TTL
	// when nothing else makes it look.
	spillSweepEvery = time.Second
	spillLockName   = "LOCK"
	spillPrefix     = "spill-"
	spillSuffix     = ".log"
)

var (
	errSpillClosed = errors.New("spill closed")
	// errSpillLocked is what a second process on the same directory gets.
	errSpillLocked = errors.New("spill directory in use by another process")
	castagnoli     = crc32.MakeTable(crc32.Castagnoli)
)

// spillReplay is what opening the spill found: the pending records to take
// up again, oldest first, and what was wrong with the files.
type spillReplay struct {
	rows    []journalRow
	expired int // records older than the TTL, dropped
	corrupt int // records that failed their CRC or could not be read
	cut     int // segments whose torn tail was truncated
}

// openSpill locks dir (creating it if needed), reads every segment left
// there, and starts the writer. A record that fails its CRC is counted and
// logged: at the tail of a segment (a write torn by a crash) the tail is
// cut off; in the middle, the records before it are kept and the reader
// resynchronises on the next record whose length and CRC check out (see
// readSegment).
func openSpill(dir string, ttl time.Duration, log *slog.Logger, m *metrics, g *guard) (*spill, spillReplay, error) {
	s := &spill{dir: dir, ttl: ttl, segmentMax: spillSegmentBytes, log: log, metrics: m, guard: g,
		now:  time.Now,
		reqs: make(chan *spillReq, spillQueue), kick: make(chan struct{}, 1), quit: make(chan struct{}), done: make(chan struct{}),
		where: make(map[int64]*segment)}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, spillReplay{}, fmt.Errorf("spill directory %s: %w", dir, err)
	}
	lock, err := lockDir(dir)
	if err != nil {
		return nil, spillReplay{}, err
	}
	s.lock = lock
	rep, err := s.replay(time.Now())
	if err != nil {
		_ = lock.Close()
		return nil, spillReplay{}, err
	}
	s.publish()
	segments := len(s.segs) // read before run owns s.segs
	go s.run()
	abs, _ := filepath.Abs(dir)
	log.Info("spill journal open", "dir", abs, "segments", segments, "records", len(rep.rows))
	return s, rep, nil
}

// lockDir takes an exclusive flock on dir/LOCK, without waiting: two
// processes on one directory would each delete the other's segments.
func lockDir(dir string) (*os.File, error) {
	path := filepath.Join(dir, spillLockName)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("spill lock %s: %w", path, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		_ = f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			if abs, err := filepath.Abs(path); err == nil {
				path = abs
			}
			return nil, fmt.Errorf("%w: %s is locked (%s); another objtrack is using it: give each instance its own -spill-dir (OBJTRACK_SPILL_DIR), or stop the other one", errSpillLocked, dir, path)
		}
		return nil, fmt.Errorf("spill lock %s: %w", path, err)
	}
	return f, nil
}

// replay reads every segment in order, keeping the pending records younger
// than the TTL; segments left with nothing pending are deleted.
func (s *spill) replay(now time.Time) (spillReplay, error) {
	var rep spillReplay
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return rep, fmt.Errorf("read spill directory %s: %w", s.dir, err)
	}
	var seqs []uint64
	for _, e := range entries {
		name := e.Name()
		if !strings.HasPrefix(name, spillPrefix) || !strings.HasSuffix(name, spillSuffix) {
			continue
		}
		seq, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(name, spillPrefix), spillSuffix), 16, 64)
		if err != nil {
			s.log.Warn("ignoring a file in the spill directory that is not a segment", "file", name)
			continue
		}
		seqs = append(seqs, seq)
	}
	slices.Sort(seqs)
	seen := make(map[int64]bool)
	for _, seq := range seqs {
		seg := &segment{seq: seq, path: s.segmentPath(seq)}
		s.nextSeq = seq + 1
		rows, corrupt, cut, err := readSegment(seg.path, s.log)
		if err != nil {
			return rep, err
		}
		rep.corrupt += corrupt
		if cut {
			rep.cut++
		}
		if st, err := os.Stat(seg.path); err == nil {
			seg.size = st.Size()
		}
		for _, r := range rows {
			if now.Sub(r.receivedAt) > s.ttl {
				rep.expired++
				continue
			}
			if seen[r.journalID] {
				continue // spilled twice (an append retried after a failed fsync)
			}
			seen[r.journalID] = true
			seg.ids = append(seg.ids, r.journalID)
			seg.pending++
			if r.receivedAt.After(seg.newest) {
				seg.newest = r.receivedAt
			}
			s.where[r.journalID] = seg
			rep.rows = append(rep.rows, r)
		}
		if seg.pending == 0 {
			if err := os.Remove(seg.path); err != nil {
				return rep, fmt.Errorf("remove spent spill segment: %w", err)
			}
			continue
		}
		s.segs = append(s.segs, seg)
	}
	slices.SortStableFunc(rep.rows, func(a, b journalRow) int { return a.receivedAt.Compare(b.receivedAt) })
	s.metrics.spillCorrupt.Add(uint64(rep.corrupt))
	if err := syncDir(s.dir); err != nil {
		return rep, err
	}
	return rep, nil
}

// readSegment reads the records of one segment. A torn or corrupt record
// at the end of the file (what a crash mid-write leaves) is cut off with a
// truncate. A record in the middle that fails its CRC is counted and
// logged, and the reader resynchronises: it tries each following byte
// offset until a frame's length fits the file and its CRC and payload
// check out, and goes on from there. A false match needs a random CRC-32C
// to match (one in four billion) and the payload to decode exactly, which
// we accept for keeping the records after a damaged one.
func readSegment(path string, log *slog.Logger) (rows []journalRow, corrupt int, cut bool, err error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, 0, false, fmt.Errorf("read spill segment: %w", err)
	}
	off := 0
	for off < len(data) {
		r, n, ok := parseRecord(data[off:])
		if ok {
			rows = append(rows, r)
			off += n
			continue
		}
		next := resync(data, off+1)
		if next < 0 {
			// Nothing valid follows: a torn tail. Cut it, so that appends
			// after a restart never follow garbage.
			corrupt++
			log.Warn("spill segment ends in a torn or corrupt record; cutting it off", "segment", path, "offset", off, "bytes", len(data)-off)
			if err := truncateSync(path, int64(off)); err != nil {
				return rows, corrupt, false, err
			}
			return rows, corrupt, true, nil
		}
		corrupt++
		log.Error("spill segment has a corrupt record in the middle; skipping it, keeping the records around it", "segment", path, "offset", off, "skipped_bytes", next-off)
		off = next
	}
	return rows, corrupt, false, nil
}

// resync finds the first offset from start at which a valid record begins,
// or -1.
func resync(data []byte, start int) int {
	for off := start; off+spillHeader+spillMinPayload <= len(data); off++ {
		if _, _, ok := parseRecord(data[off:]); ok {
			return off
		}
	}
	return -1
}

// parseRecord reads one framed record from the start of b: its callback,
// its size on disk, and whether it was whole and valid.
func parseRecord(b []byte) (journalRow, int, bool) {
	if len(b) < spillHeader {
		return journalRow{}, 0, false
	}
	n := int(binary.LittleEndian.Uint32(b))
	if n < spillMinPayload || n > len(b)-spillHeader {
		return journalRow{}, 0, false
	}
	payload := b[spillHeader : spillHeader+n]
	if crc32.Checksum(payload, castagnoli) != binary.LittleEndian.Uint32(b[4:]) {
		return journalRow{}, 0, false
	}
	r, ok := decodeSpillPayload(payload)
	return r, spillHeader + n, ok
}

// appendRecord frames r onto b.
func appendRecord(b []byte, r journalRow) []byte {
	start := len(b)
	b = append(b, make([]byte, spillHeader)...)
	b = append(b, spillVersion)
	b = binary.LittleEndian.AppendUint64(b, uint64(r.journalID))
	b = binary.LittleEndian.AppendUint64(b, uint64(r.receivedAt.UnixMicro()))
	b = binary.AppendUvarint(b, uint64(len(r.objectIDs)))
	// Ids are sorted, so deltas are small: a varint each.
	var prev int64
	for _, id := range r.objectIDs {
		b = binary.AppendVarint(b, id-prev)
		prev = id
	}
	payload := b[start+spillHeader:]
	binary.LittleEndian.PutUint32(b[start:], uint32(len(payload)))
	binary.LittleEndian.PutUint32(b[start+4:], crc32.Checksum(payload, castagnoli))
	return b
}

func decodeSpillPayload(p []byte) (journalRow, bool) {
	if len(p) < spillMinPayload || p[0] != spillVersion {
		return journalRow{}, false
	}
	r := journalRow{
		journalID:  int64(binary.LittleEndian.Uint64(p[1:])),
		receivedAt: time.UnixMicro(int64(binary.LittleEndian.Uint64(p[9:]))),
	}
	p = p[17:]
	count, n := binary.Uvarint(p)
	if n <= 0 || count > uint64(len(p)) { // each id takes at least a byte
		return journalRow{}, false
	}
	p = p[n:]
	r.objectIDs = make([]int64, 0, count)
	var prev int64
	for range count {
		d, n := binary.Varint(p)
		if n <= 0 {
			return journalRow{}, false
		}
		p = p[n:]
		prev += d
		r.objectIDs = append(r.objectIDs, prev)
	}
	return r, len(p) == 0
}

// append makes r durable: it returns nil once the fsync that covers r's
// record has returned, or an error if the disk refused it or ctx ended
// first (the record may then still be written, which is harmless).
func (s *spill) append(ctx context.Context, r journalRow) error {
	req := &spillReq{row: r, done: make(chan error, 1)}
	select {
	case s.reqs <- req:
	case <-s.quit:
		return errSpillClosed
	case <-ctx.Done():
		return fmt.Errorf("spill append: %w", ctx.Err())
	}
	select {
	case err := <-req.done:
		return err
	case <-s.done:
		select {
		case err := <-req.done: // answered just before the writer stopped
			return err
		default:
			return errSpillClosed
		}
	case <-ctx.Done():
		return fmt.Errorf("spill append: %w", ctx.Err())
	}
}

// moved records that the callbacks with these journal ids no longer need
// their spill records: their journal rows are committed in PostgreSQL, or
// they were applied. Unknown ids are ignored.
func (s *spill) moved(ids ...int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, id := range ids {
		if seg, ok := s.where[id]; ok {
			delete(s.where, id)
			seg.pending--
			n++
		}
	}
	if n > 0 {
		s.metrics.spillMoved.Add(uint64(n))
		s.metrics.spillRecords.Set(int64(len(s.where)))
		select {
		case s.kick <- struct{}{}:
		default:
		}
	}
}

// has says whether a callback's spill record is pending.
func (s *spill) has(id int64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.where[id]
	return ok
}

// pending lists the journal ids whose records are pending.
func (s *spill) pending() []int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]int64, 0, len(s.where))
	for id := range s.where {
		out = append(out, id)
	}
	return out
}

// run is the writer: it takes every queued append, writes them, fsyncs
// once, and answers each (group commit). Between batches it deletes spent
// segments.
func (s *spill) run() {
	defer close(s.done)
	sweep := time.NewTicker(spillSweepEvery)
	defer sweep.Stop()
	var batch []*spillReq
	var buf []byte
	for {
		batch = batch[:0]
		select {
		case r := <-s.reqs:
			batch = append(batch, r)
		case <-sweep.C:
			s.safely("spill sweep", func() { s.sweep(s.now(), false) })
			continue
		case <-s.kick:
			s.safely("spill sweep", func() { s.sweep(s.now(), false) })
			continue
		case <-s.quit:
			// close comes after the last append has returned; anything
			// still queued was given up by its appender, but is written
			// anyway: a durable record more is harmless.
			for len(s.reqs) > 0 {
				batch = append(batch, <-s.reqs)
			}
			if len(batch) > 0 {
				s.safely("spill write", func() { s.writeBatch(batch, buf) })
			}
			return
		}
	gather:
		for len(batch) < spillQueue {
			select {
			case r := <-s.reqs:
				batch = append(batch, r)
			default:
				break gather
			}
		}
		s.safely("spill write", func() { buf = s.writeBatch(batch, buf) })
	}
}

// safely runs fn under the panic guard, so that a bug in one batch cannot
// stop the writer for good.
func (s *spill) safely(where string, fn func()) {
	defer s.guard.catch(where)
	fn()
}

// writeBatch writes and fsyncs one batch, rotating segments at the size
// bound, and answers every request; it returns the buffer for reuse.
func (s *spill) writeBatch(batch []*spillReq, buf []byte) []byte {
	buf, err := s.writeRecords(batch, buf)
	if err != nil {
		s.metrics.spillErrors.Inc()
		s.guard.warn("spill write failed", "callbacks", len(batch), "dir", s.dir, "err", err)
	} else {
		s.metrics.spillAppended.Add(uint64(len(batch)))
	}
	for _, r := range batch {
		r.done <- err
	}
	s.publish()
	return buf[:0]
}

// writeRecords appends the batch's records with one write and one fsync
// per segment written to; a record that would take the active segment past
// its bound starts the next one.
func (s *spill) writeRecords(batch []*spillReq, buf []byte) ([]byte, error) {
	buf = buf[:0]
	var rows []journalRow
	for _, r := range batch {
		rec := len(buf)
		buf = appendRecord(buf, r.row)
		if used := s.activeSize(); used+int64(len(buf)) > s.segmentMax && used+int64(rec) > 0 {
			if err := s.writeSynced(buf[:rec], rows); err != nil {
				return buf, err
			}
			if err := s.rotate(); err != nil {
				return buf, err
			}
			buf = buf[:copy(buf, buf[rec:])]
			rows = rows[:0]
		}
		rows = append(rows, r.row)
	}
	return buf, s.writeSynced(buf, rows)
}

// activeSize is the size of the segment appended to, 0 when a new one is
// yet to be opened.
func (s *spill) activeSize() int64 {
	if s.active == nil {
		return 0
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.segs[len(s.segs)-1].size
}

// writeSynced writes b, the records of rows, to the active segment
// (opening one if there is none) and fsyncs it; only then are the rows
// indexed as pending.
func (s *spill) writeSynced(b []byte, rows []journalRow) error {
	if len(b) == 0 {
		return nil
	}
	if s.active == nil {
		if err := s.rotate(); err != nil {
			return err
		}
	}
	s.mu.Lock()
	seg := s.segs[len(s.segs)-1]
	s.mu.Unlock()
	if _, err := s.active.Write(b); err != nil {
		s.abandonActive()
		return fmt.Errorf("write spill segment %s: %w", seg.path, err)
	}
	start := time.Now()
	err := s.active.Sync()
	s.metrics.spillFsync.Observe(time.Since(start).Seconds())
	// The size counts even a failed fsync's bytes: they may be on disk.
	s.mu.Lock()
	seg.size += int64(len(b))
	s.mu.Unlock()
	if err != nil {
		// After a failed fsync the kernel may have dropped the dirty pages
		// and cleared the error: never trust that file again.
		s.abandonActive()
		return fmt.Errorf("fsync spill segment %s: %w", seg.path, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range rows {
		if _, dup := s.where[r.journalID]; dup {
			continue
		}
		s.where[r.journalID] = seg
		seg.ids = append(seg.ids, r.journalID)
		seg.pending++
		if r.receivedAt.After(seg.newest) {
			seg.newest = r.receivedAt
		}
	}
	return nil
}

// abandonActive stops appending to the active segment after an error; the
// next batch opens a new one. Its records already indexed stay pending.
func (s *spill) abandonActive() {
	_ = s.active.Close()
	s.active = nil
}

// rotate closes the active segment and starts a new one, making its name
// durable in the directory before any record relies on it.
func (s *spill) rotate() error {
	if s.active != nil {
		if err := s.active.Close(); err != nil {
			s.log.Warn("closing a spill segment failed", "err", err)
		}
		s.active = nil
	}
	s.mu.Lock()
	seq := s.nextSeq
	s.nextSeq++
	s.mu.Unlock()
	path := s.segmentPath(seq)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("create spill segment: %w", err)
	}
	if err := syncDir(s.dir); err != nil {
		_ = f.Close()
		_ = os.Remove(path)
		return err
	}
	s.active = f
	s.mu.Lock()
	s.segs = append(s.segs, &segment{seq: seq, path: path})
	s.mu.Unlock()
	return nil
}

// sweep deletes the segments with nothing pending and those whose newest
// record is older than the TTL. The active segment goes too once spent
// (the next batch starts a new one), unless it is still empty and the
// spill is not closing. Only the writer calls it, or close once the writer
// has stopped.
func (s *spill) sweep(now time.Time, closing bool) {
	s.mu.Lock()
	var gone []*segment
	kept := s.segs[:0]
	expired := 0
	closeActive := false
	for i, seg := range s.segs {
		isActive := s.active != nil && i == len(s.segs)-1
		spent := seg.pending == 0 || now.Sub(seg.newest) > s.ttl
		if !spent || (isActive && seg.size == 0 && !closing) {
			kept = append(kept, seg)
			continue
		}
		for _, id := range seg.ids {
			if s.where[id] == seg {
				delete(s.where, id)
				expired++
			}
		}
		closeActive = closeActive || isActive
		gone = append(gone, seg)
	}
	clear(s.segs[len(kept):])
	s.segs = kept
	s.mu.Unlock()
	if closeActive {
		_ = s.active.Close()
		s.active = nil
	}
	if expired > 0 {
		s.metrics.spillExpired.Add(uint64(expired))
		s.log.Warn("dropped spill records older than the TTL that never reached PostgreSQL", "records", expired)
	}
	for _, seg := range gone {
		if err := os.Remove(seg.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			s.guard.warn("removing a spent spill segment failed", "segment", seg.path, "err", err)
		}
	}
	if len(gone) > 0 {
		s.publish()
	}
}

// publish sets the spill's gauges.
func (s *spill) publish() {
	s.mu.Lock()
	defer s.mu.Unlock()
	var bytes int64
	for _, seg := range s.segs {
		bytes += seg.size
	}
	s.metrics.spillRecords.Set(int64(len(s.where)))
	s.metrics.spillBytes.Set(bytes)
	s.metrics.spillSegments.Set(int64(len(s.segs)))
}

// close stops the writer once it has written what is queued, deletes the
// segments whose records have all moved, and releases the lock; what is
// still pending stays for the next start.
func (s *spill) close() error {
	var err error
	s.closeOnce.Do(func() {
		close(s.quit)
		<-s.done
		s.sweep(s.now(), true)
		if s.active != nil {
			err = s.active.Close()
			s.active = nil
		}
		err = errors.Join(err, s.lock.Close())
	})
	return err
}

func (s *spill) segmentPath(seq uint64) string {
	return filepath.Join(s.dir, fmt.Sprintf("%s%016x%s", spillPrefix, seq, spillSuffix))
}

// syncDir fsyncs a directory, so that a file created or removed in it
// survives a crash.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open spill directory: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync spill directory %s: %w", dir, err)
	}
	return nil
}

// truncateSync cuts a segment at size and makes the cut durable.
func truncateSync(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("open spill segment to cut its tail: %w", err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return fmt.Errorf("cut spill segment %s at %d: %w", path, size, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync cut spill segment %s: %w", path, err)
	}
	return nil
}
