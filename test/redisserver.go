package test

import (
	"bufio"
	"cmp"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// RedisServer is a real redis-server the test started on a loopback port,
// with persistence off, in a temporary directory. Cleanup kills it.
type RedisServer struct {
	t    testing.TB
	dir  string
	Port int
	cmd  *exec.Cmd

	mode     string       // "", "cluster" or "sentinel"
	busPort  int          // cluster: the cluster bus port
	Master   *RedisServer // sentinel: the master it watches
	readyFor func() bool  // true once the server is ready for clients
}

// StartRedis starts a redis-server for t. Without the program the test
// is skipped, or fails when RCPTGUARD_E2E=1 is set.
func StartRedis(t testing.TB) *RedisServer {
	t.Helper()
	r := newRedis(t, "")
	r.Start()
	t.Cleanup(r.Stop)
	return r
}

// StartRedisCluster starts a one-node Redis Cluster (cluster-enabled, all
// 16384 slots on the node) for t.
func StartRedisCluster(t testing.TB) *RedisServer {
	t.Helper()
	r := newRedis(t, "cluster")
	r.busPort = freePort(t)
	r.readyFor = func() bool {
		info, err := r.Do("CLUSTER", "INFO")
		if err == nil && strings.Contains(info, "cluster_state:ok") {
			return true
		}
		if out, _ := r.Do("CLUSTER", "ADDSLOTSRANGE", "0", "16383"); out != "+OK" && !strings.Contains(out, "busy") {
			r.t.Logf("CLUSTER ADDSLOTSRANGE: %s", out)
		}
		return false
	}
	r.Start()
	t.Cleanup(r.Stop)
	return r
}

// StartRedisSentinel starts a master and a Sentinel (redis-server
// --sentinel, its configuration file in the test's directory) watching
// it as "rcptguard", for t. The returned server is the Sentinel; Master
// is the master.
func StartRedisSentinel(t testing.TB) *RedisServer {
	t.Helper()
	r := newRedis(t, "sentinel")
	r.Master = StartRedis(t)
	r.readyFor = func() bool {
		out, err := r.Do("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "rcptguard")
		return err == nil && out == "*2"
	}
	r.Start()
	t.Cleanup(r.Stop)
	return r
}

func newRedis(t testing.TB, mode string) *RedisServer {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("RCPTGUARD_E2E") == "1" {
			t.Fatal("redis-server is missing (apt-get install redis-server); RCPTGUARD_E2E=1 is set, so this is a failure")
		}
		t.Skip("redis-server is not installed")
	}
	return &RedisServer{t: t, dir: t.TempDir(), Port: freePort(t), mode: mode}
}

// freePort returns a loopback TCP port free a moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// URL is the server's address for [cluster] redis: redis://…/0, with
// the node again as an addr parameter for a Cluster (go-redis takes
// several addresses for a Cluster), and master_name for a Sentinel.
func (r *RedisServer) URL() string {
	u := "redis://127.0.0.1:" + strconv.Itoa(r.Port) + "/0"
	switch r.mode {
	case "cluster":
		u += "?addr=127.0.0.1:" + strconv.Itoa(r.Port)
	case "sentinel":
		u += "?master_name=rcptguard"
	}
	return u
}

// Start (re)starts the server on its port, empty, and waits until it
// answers PING (and is ready: its slots served, its master known).
func (r *RedisServer) Start() {
	r.t.Helper()
	args := []string{"--port", strconv.Itoa(r.Port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", r.dir, "--protected-mode", "yes"}
	switch r.mode {
	case "cluster":
		args = append(args, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
			"--cluster-port", strconv.Itoa(r.busPort))
	case "sentinel":
		// Sentinel rewrites its file: written anew at each start.
		conf := filepath.Join(r.dir, "sentinel.conf")
		text := "port " + strconv.Itoa(r.Port) + "\nbind 127.0.0.1\ndir " + r.dir + "\n" +
			"sentinel monitor rcptguard 127.0.0.1 " + strconv.Itoa(r.Master.Port) + " 1\n" +
			"sentinel down-after-milliseconds rcptguard 5000\n"
		if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
			r.t.Fatal(err)
		}
		args = []string{conf, "--sentinel"}
	}
	cmd := exec.Command("redis-server", args...)
	cmd.Dir = r.dir
	if err := cmd.Start(); err != nil {
		r.t.Fatalf("redis-server: %v", err)
	}
	r.cmd = cmd
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if out, err := r.Do("PING"); err == nil && out == "+PONG" && (r.readyFor == nil || r.readyFor()) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	r.t.Fatalf("redis-server (%s) on port %d is not ready", cmp.Or(r.mode, "single"), r.Port)
}

// Stop kills the server (its data is gone: persistence is off).
func (r *RedisServer) Stop() {
	if r.cmd == nil {
		return
	}
	_ = r.cmd.Process.Kill()
	_ = r.cmd.Wait()
	r.cmd = nil
}

// Do sends one inline command and returns the first line of the reply
// ("+PONG", ":3", "$5" …); for a bulk string, the string.
func (r *RedisServer) Do(args ...string) (string, error) {
	c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(r.Port), time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	var b strings.Builder
	b.WriteString("*" + strconv.Itoa(len(args)) + "\r\n")
	for _, a := range args {
		b.WriteString("$" + strconv.Itoa(len(a)) + "\r\n" + a + "\r\n")
	}
	if _, err := c.Write([]byte(b.String())); err != nil {
		return "", err
	}
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		return "", err
	}
	line = strings.TrimRight(line, "\r\n")
	if strings.HasPrefix(line, "$") && line != "$-1" {
		n, _ := strconv.Atoi(line[1:])
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(br, buf); err != nil {
			return "", err
		}
		return string(buf[:n]), nil
	}
	return line, nil
}

// Dir is the server's working directory.
func (r *RedisServer) Dir() string { return filepath.Clean(r.dir) }

// Info returns the integer fields of INFO section.
func (r *RedisServer) Info(section string) (map[string]int64, error) {
	c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(r.Port), time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("*2\r\n$4\r\nINFO\r\n$" + strconv.Itoa(len(section)) + "\r\n" + section + "\r\n")); err != nil {
		return nil, err
	}
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		return nil, err
	}
	n, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(line, "$")))
	if err != nil {
		return nil, err
	}
	buf := make([]byte, n+2)
	if _, err := io.ReadFull(br, buf); err != nil {
		return nil, err
	}
	out := map[string]int64{}
	for _, l := range strings.Split(string(buf[:n]), "\r\n") {
		k, v, ok := strings.Cut(l, ":")
		if x, err := strconv.ParseInt(v, 10, 64); ok && err == nil {
			out[k] = x
		}
	}
	return out, nil
}
