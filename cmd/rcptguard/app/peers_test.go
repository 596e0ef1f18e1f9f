package app

import (
	"context"
	"errors"
	"net/netip"
	"os/exec"
	"reflect"
	"strings"
	"testing"
)

// fakeUsers is a user database for resolvePolicyPeers.
func fakeUsers(users map[string]uint32) userLookup {
	return func(name string) (uint32, error) {
		if uid, ok := users[name]; ok {
			return uid, nil
		}
		return 0, errors.New("unknown user")
	}
}

func TestResolvePolicyPeers(t *testing.T) {
	withPostfix := fakeUsers(map[string]uint32{"root": 0, "postfix": 107, "monitor": 1000, "mailer": 110})
	noPostfix := fakeUsers(map[string]uint32{"root": 0})
	for _, tc := range []struct {
		name      string
		policy    PolicyConfig
		lookup    userLookup
		mailOwner string
		uids      []uint32
		uncapped  []uint32
		networks  []netip.Prefix
		note, err string
	}{
		{name: "default", lookup: withPostfix, mailOwner: "postfix", uids: []uint32{0, 107}, uncapped: []uint32{107}},
		{name: "default, another mail_owner", lookup: withPostfix, mailOwner: "mailer", uids: []uint32{0, 110}, uncapped: []uint32{110}},
		{name: "default without postfix", lookup: noPostfix, mailOwner: "postfix", uids: []uint32{0}, note: `mail_owner "postfix" does not exist`},
		{name: "names and uids", policy: PolicyConfig{AllowUsers: []string{"postfix", "monitor", "4242"}}, lookup: withPostfix, mailOwner: "postfix",
			uids: []uint32{107, 1000, 4242}, uncapped: []uint32{107}},
		{name: "unknown user", policy: PolicyConfig{AllowUsers: []string{"postfix", "ghost", "nobody2"}}, lookup: withPostfix, mailOwner: "postfix",
			err: "policy.allow_users[1]: no user \"ghost\" on this system (unknown user)\npolicy.allow_users[2]: no user \"nobody2\""},
		{name: "networks", policy: PolicyConfig{AllowNetworks: []string{"192.0.2.0/24", "2001:db8::1"}}, lookup: withPostfix, mailOwner: "postfix",
			uids: []uint32{0, 107}, uncapped: []uint32{107},
			networks: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("2001:db8::1/128")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := resolvePolicyPeers(&tc.policy, tc.lookup, tc.mailOwner)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(p.uids, tc.uids) || !reflect.DeepEqual(p.uncapped, tc.uncapped) || !reflect.DeepEqual(p.networks, tc.networks) {
				t.Errorf("got uids %v uncapped %v networks %v; want %v %v %v", p.uids, p.uncapped, p.networks, tc.uids, tc.uncapped, tc.networks)
			}
			if (tc.note == "") != (p.note == "") || !strings.Contains(p.note, tc.note) {
				t.Errorf("note %q, want one with %q", p.note, tc.note)
			}
		})
	}
}

func TestPostfixMailOwner(t *testing.T) {
	got := postfixMailOwner(context.Background())
	if _, err := exec.LookPath("postconf"); err != nil {
		if got != "postfix" {
			t.Fatalf("without postconf: %q, want postfix", got)
		}
		return
	}
	out, err := exec.Command("postconf", "-h", "mail_owner").Output()
	if err != nil {
		t.Skipf("postconf fails here: %v", err)
	}
	if want := strings.TrimSpace(string(out)); got != want {
		t.Fatalf("postfixMailOwner() = %q, postconf says %q", got, want)
	}
}

func TestSystemUser(t *testing.T) {
	if uid, err := systemUser("root"); err != nil || uid != 0 {
		t.Fatalf("root: %d, %v", uid, err)
	}
	if _, err := systemUser("no-such-user-rcptguard"); err == nil {
		t.Fatal("a missing user was found")
	}
}
