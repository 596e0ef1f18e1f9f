package app

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"time"
)

// cmdHealth asks the running service a harmless policy question (a request
// at the CONNECT stage, which is always answered DUNNO) on the first
// policy.listen address, and succeeds when an answer comes back in time.
// It needs no shell or HTTP client, so it works as a container HEALTHCHECK.
func cmdHealth(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, config := newFlags("health", "health [-config FILE] [-addr ADDR] [-timeout D]", stderr)
	timeout := fs.Duration("timeout", 3*time.Second, "how long to wait for the answer")
	addrFlag := fs.String("addr", "", "ask this address, \"host:port\" or \"unix:/path\" (default: the first policy.listen)")
	cfg, err := parseNoArgs(fs, config, args)
	if err != nil {
		return err
	}
	addr := cfg.Policy.Listen[0]
	if *addrFlag != "" {
		addr = *addrFlag
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	line, err := askHealth(ctx, addr)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "ok %s %s", strings.TrimPrefix(addr, "unix:"), line)
	return nil
}

// askHealth sends the harmless request to addr and returns the answer
// line; ctx bounds the whole exchange.
func askHealth(ctx context.Context, addr string) (string, error) {
	network := "tcp"
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		network, addr = "unix", p
	} else if host, port, err := net.SplitHostPort(addr); err == nil && (host == "0.0.0.0" || host == "::") {
		addr = net.JoinHostPort("127.0.0.1", port) // a wildcard listener answers on loopback
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return "", fmt.Errorf("health: %w", err)
	}
	defer conn.Close()
	if deadline, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(deadline)
	}
	if _, err := io.WriteString(conn, "request=smtpd_access_policy\nprotocol_state=CONNECT\nclient_address=127.0.0.1\n\n"); err != nil {
		return "", fmt.Errorf("health: %w", err)
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
			// rcptguard closes connections of users it does not allow
			// without a word: say so, that is the usual cause.
			return "", fmt.Errorf("health: %s closed the connection without an answer: is uid %d in policy.allow_users (root, Postfix's mail_owner and rcptguard's own user are allowed)? %w", addr, os.Getuid(), err)
		}
		return "", fmt.Errorf("health: no answer from %s: %w", addr, err)
	}
	if !strings.HasPrefix(line, "action=") {
		return "", fmt.Errorf("health: unexpected answer %q from %s", strings.TrimSpace(line), addr)
	}
	return line, nil
}
