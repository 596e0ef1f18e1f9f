package test_test

import (
	"os/exec"
	"testing"

	"github.com/rcptguard/rcptguard/test"
)

func TestScratchPostcat(t *testing.T) {
	requireRealPostfix(t)
	s := test.StartDeferringSubmission(t, "dest.test", map[string]string{"spammer@customer.test": "pw"}, nil)
	id := s.Send(t, "spammer@customer.test", "honest@customer.test", "Hello\x01 world", "a@dest.test", "b@dest.test")
	s.WaitDeferred(t, id)
	out, err := exec.Command("postcat", "-c", s.ConfigDir, "-e", "-q", id).CombinedOutput()
	t.Logf("postcat -e: %v\n%q", err, out)
	out, err = exec.Command("postcat", "-c", s.ConfigDir, "-hq", id).CombinedOutput()
	t.Logf("postcat -hq: %v\n%q", err, out)
	out, err = exec.Command("postqueue", "-c", s.ConfigDir, "-j").CombinedOutput()
	t.Logf("postqueue: %v\n%s", err, out)
}
