package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// The answer limit an instance last ran at is kept in a small file in its
// spill directory, so that a restart starts where this machine served
// rather than from a guess: the directory is already the instance's own
// (locked while in use, one per instance, on a persistent disk), and a
// level is a property of the machine and its load, not of the database
// several instances share. The file is a hint: missing, unreadable or out
// of bounds, the limit starts at initialHandling, as it did before there
// was one. It is written every levelSaveEvery when the limit changed, and
// once more as the service stops.
const (
	levelFileName  = "answer-limit"
	levelSaveEvery = 10 * time.Second
	levelKey       = "answer_limit"
)

// readLevel returns the answer limit saved in dir: an error wrapping
// fs.ErrNotExist when there is none, another error when the file does not
// hold one level within the limiter's bounds.
func readLevel(dir string) (int64, error) {
	path := filepath.Join(dir, levelFileName)
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("read the saved answer limit: %w", err)
	}
	f := strings.Fields(string(b))
	if len(f) != 2 || f[0] != levelKey {
		return 0, fmt.Errorf("saved answer limit %s: want %q followed by a number, got %.40q", path, levelKey, b)
	}
	n, err := strconv.ParseInt(f[1], 10, 64)
	if err != nil || n < minHandling || n > maxHandling {
		return 0, fmt.Errorf("saved answer limit %s: %q is not a number between %d and %d", path, f[1], minHandling, maxHandling)
	}
	return n, nil
}

// saveLevel writes level to dir; through a temporary file renamed over the
// old one, so that a crash leaves the old level or the new one, never half
// of one. There is no fsync: a level lost to a power cut costs only a start
// from initialHandling.
func saveLevel(dir string, level int64) error {
	path := filepath.Join(dir, levelFileName)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(levelKey+" "+strconv.FormatInt(level, 10)+"\n"), 0o644); err != nil {
		return fmt.Errorf("save the answer limit: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("save the answer limit: %w", err)
	}
	return nil
}

// startLevel is the level the answer limit starts at: the saved one, or
// initialHandling (logged when the file is there but unusable).
func startLevel(dir string, log *slog.Logger) int64 {
	n, err := readLevel(dir)
	switch {
	case err == nil:
		log.Info("answer limit starts at the last run's level", "level", n, "dir", dir)
		return n
	case errors.Is(err, fs.ErrNotExist):
		return initialHandling
	default:
		log.Warn("ignoring the saved answer limit; starting from the default", "level", initialHandling, "err", err)
		return initialHandling
	}
}

// levelKeeper saves the answer limit when it differs from the level last
// saved (or started from): every levelSaveEvery while the service runs
// (run), and once more as it stops (save, from app.close).
type levelKeeper struct {
	dir   string
	limit *answerLimiter
	saved int64
	log   *slog.Logger
}

func (k *levelKeeper) run(ctx context.Context) { everyTick(ctx, levelSaveEvery, k.save) }

// save is called by one goroutine at a time: the loop, then close after
// the loops have ended.
func (k *levelKeeper) save() {
	n := k.limit.limit.Load()
	if n == k.saved {
		return
	}
	if err := saveLevel(k.dir, n); err != nil {
		k.log.Warn("could not save the answer limit; the next start begins from the default", "err", err)
		return
	}
	k.saved = n
}
