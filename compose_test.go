package main

import (
	"os"
	"os/exec"
	"testing"
)

// docker-compose.yaml cannot run here (its postgres and nginx images cannot
// be pulled); scripts/check-compose reads it: it parses, builds what the
// Dockerfile has, passes the build info, stops within grace + park, and
// its nginx passes 503s and oversize bodies through.
func TestComposeFile(t *testing.T) {
	if err := exec.Command("python3", "-c", "import yaml").Run(); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("python3 with yaml not found; CI installs it (apt-get install python3-yaml)")
		}
		t.Skip("python3 with yaml not found (apt-get install python3-yaml)")
	}
	out, err := exec.Command("scripts/check-compose", "docker-compose.yaml", "Dockerfile").CombinedOutput()
	if err != nil {
		t.Errorf("scripts/check-compose: %v\n%s", err, out)
	}
}
