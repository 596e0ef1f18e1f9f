package app

import (
	"os"
	"testing"

	"github.com/rcptguard/rcptguard/test"
)

// TestMain fails the run when a test wrote into rcptguard's system state
// directories (a configuration left on a default path).
func TestMain(m *testing.M) {
	os.Exit(test.GuardSystemState(m, os.Stderr))
}
