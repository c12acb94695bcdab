package main

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The saved level is a hint: only a file holding one level within the
// limiter's bounds is used; anything else starts from the default, and a
// file that is there but unusable says so in the log.
func TestStartLevelFallsBackSafely(t *testing.T) {
	tests := []struct {
		name    string
		content *string // nil: no file
		want    int64
		warn    bool
	}{
		{"no saved level", nil, initialHandling, false},
		{"a saved level", ptr("answer_limit 777\n"), 777, false},
		{"without the newline", ptr("answer_limit 300"), 300, false},
		{"at the bounds", ptr("answer_limit 64\n"), minHandling, false},
		{"empty", ptr(""), initialHandling, true},
		{"torn", ptr("answer_lim"), initialHandling, true},
		{"not a number", ptr("answer_limit many\n"), initialHandling, true},
		{"below the floor", ptr("answer_limit 3\n"), initialHandling, true},
		{"above the cap", ptr("answer_limit 99999\n"), initialHandling, true},
		{"negative", ptr("answer_limit -500\n"), initialHandling, true},
		{"another key", ptr("fetch_limit 500\n"), initialHandling, true},
		{"trailing junk", ptr("answer_limit 500 600\n"), initialHandling, true},
		{"binary garbage", ptr("\x00\xff\x13answer_limit"), initialHandling, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			if tt.content != nil {
				if err := os.WriteFile(filepath.Join(dir, levelFileName), []byte(*tt.content), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			var logs bytes.Buffer
			got := startLevel(dir, slog.New(slog.NewTextHandler(&logs, nil)))
			if got != tt.want {
				t.Errorf("start level %d, want %d", got, tt.want)
			}
			if warned := strings.Contains(logs.String(), "level=WARN"); warned != tt.warn {
				t.Errorf("warned %v, want %v; log: %s", warned, tt.warn, logs.String())
			}
		})
	}
}

func ptr(s string) *string { return &s }

// A restarted instance starts at the level the last run ended at: the
// level is saved as the service stops, in its spill directory, and the
// next app on that directory starts its answer limit there.
func TestRestartedInstanceStartsAtTheSavedLevel(t *testing.T) {
	cfg := testConfig(t)
	cfg.spillDir = t.TempDir()
	first, err := newApp(cfg, discardLogger(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if first.answerStart != initialHandling {
		t.Fatalf("first start at %d, want the default %d", first.answerStart, initialHandling)
	}
	first.start()
	// As if it had adapted under load: nothing is sent, so the limiter's
	// own ticks leave it where it is.
	first.answers.limit.Store(777)
	first.close()

	second, err := newApp(cfg, discardLogger(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(second.close)
	if second.answerStart != 777 {
		t.Fatalf("restarted at %d, want the saved 777", second.answerStart)
	}
	second.start()
	if got := second.answers.limit.Load(); got != 777 {
		t.Errorf("answer limit %d after the restart, want 777", got)
	}
	if got := second.metrics.handlingLimit.Value(); got != 777 {
		t.Errorf("gauge %d after the restart, want 777", got)
	}
}

// While warm after a start, slow answers do not cut the limit below the
// level it started at; late ones do, and so do slow ones once warm.
func TestAnswerLimiterHoldsItsStartLevelWhileWarm(t *testing.T) {
	const target = 250 * time.Millisecond
	tests := []struct {
		name       string
		after      time.Duration // since the start
		late       int64         // of 100 answers, all slow
		peak, want int64
	}{
		{"slow answers while warm: hold the start level", time.Second, 0, 900, 800},
		{"a few late answers while warm: hold", time.Second, 5, 900, 800},
		{"late answers while warm: cut", time.Second, 50, 900, 600},
		{"slow answers once warm: cut", warmUp + time.Second, 0, 900, 600},
		{"a cut above the start level is allowed while warm", time.Second, 0, 1200, 900},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := newAnswerLimiter(target, newMetrics())
			start := time.Now()
			l.startAt(800, start)
			if tt.name == "a cut above the start level is allowed while warm" {
				l.limit.Store(1200)
			}
			now := start.Add(tt.after)
			l.adjust(now, 100, 100, tt.late, tt.peak)
			l.adjust(now.Add(limitTick), 100, 100, tt.late, tt.peak)
			if got := l.limit.Load(); got != tt.want {
				t.Errorf("limit %d, want %d", got, tt.want)
			}
		})
	}
}

// Answers are counted late past lateFactor × the target.
func TestAnswerLimiterCountsLateAnswers(t *testing.T) {
	l := newAnswerLimiter(250*time.Millisecond, newMetrics())
	for _, took := range []time.Duration{100 * time.Millisecond, 300 * time.Millisecond, 600 * time.Millisecond} {
		l.enter()
		l.leave(took)
	}
	if answers, slow, late := l.answers.Load(), l.slow.Load(), l.late.Load(); answers != 3 || slow != 2 || late != 1 {
		t.Errorf("answers %d, slow %d, late %d; want 3, 2 and 1", answers, slow, late)
	}
}
