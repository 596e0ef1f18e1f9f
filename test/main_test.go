package test_test

import (
	"os"
	"strings"
	"testing"

	"github.com/rcptguard/rcptguard/cmd/rcptguard/app"
	"github.com/rcptguard/rcptguard/test"
)

// TestMain lets crash_test.go run the daemon as a separate process that
// can be killed with SIGKILL: the test binary re-executes itself with
// RCPTGUARD_TEST_DAEMON=1 and the command line in RCPTGUARD_TEST_ARGS
// (split at white space), and then runs `rcptguard` instead of the tests.
// The tests themselves fail the run when they wrote into rcptguard's
// system state directories (test.GuardSystemState).
func TestMain(m *testing.M) {
	// `rcptguard doctor -rcptguard THIS_BINARY` runs it as Postfix's user
	// with "health -addr ...": then it is rcptguard.
	if len(os.Args) > 1 && os.Args[1] == "health" {
		os.Exit(app.Main(os.Args[1:], os.Stdout, os.Stderr))
	}
	if os.Getenv("RCPTGUARD_TEST_DAEMON") == "1" {
		os.Exit(app.Main(strings.Fields(os.Getenv("RCPTGUARD_TEST_ARGS")), os.Stdout, os.Stderr))
	}
	os.Exit(test.GuardSystemState(m, os.Stderr))
}
