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
	// As if it had served 777 at once with fast answers under load.
	first.answers.served.Store(777)
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

// The served level is the limit at a tick that nearly used it up with no
// slow answer; other ticks leave it.
func TestAnswerLimiterRecordsTheServedLevel(t *testing.T) {
	tests := []struct {
		name                string
		answers, slow, peak int64
		want                int64
	}{
		{"nearly used up, fast answers", 100, 0, 760, 800},
		{"nearly used up, slow answers", 100, 50, 800, 0},
		{"a few slow answers", 100, 1, 800, 0},
		{"mostly unused", 100, 0, 300, 0},
		{"no answers", 0, 0, 800, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := newAnswerLimiter(250*time.Millisecond, newMetrics())
			l.limit.Store(800)
			l.adjust(time.Now(), tt.answers, tt.slow, tt.peak)
			if got := l.served.Load(); got != tt.want {
				t.Errorf("served %d, want %d", got, tt.want)
			}
		})
	}
}
