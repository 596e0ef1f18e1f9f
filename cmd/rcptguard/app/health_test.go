package app

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"
)

// A service that closes the connection without a word (what rcptguard
// does to a user not in policy.allow_users) gets an error that names the
// likely cause, not a bare EOF.
func TestHealthRefusedNamesAllowUsers(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = askHealth(ctx, ln.Addr().String())
	if err == nil || !strings.Contains(err.Error(), "policy.allow_users") {
		t.Fatalf("askHealth: %v, want an error naming policy.allow_users", err)
	}
}
