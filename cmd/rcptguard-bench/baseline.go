package main

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"sync"

	"github.com/rcptguard/rcptguard/detector"
)

// serveBaseline is the bare policy server: it reads each request with
// detector.ReadRequest and answers DUNNO with detector.WriteAction, with a
// buffered reader and writer per connection and nothing else: no
// deadlines, no logging, no decision. It is the most a policy server
// written with rcptguard's own protocol code can do on the machine, and
// the yardstick of the comparison. It serves until ctx ends, then closes
// the listener and every connection and returns.
func serveBaseline(ctx context.Context, ln net.Listener) error {
	var (
		mu    sync.Mutex
		conns = make(map[net.Conn]struct{})
		wg    sync.WaitGroup
	)
	stop := context.AfterFunc(ctx, func() {
		_ = ln.Close()
		mu.Lock()
		for c := range conns {
			_ = c.Close()
		}
		mu.Unlock()
	})
	defer stop()
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return err
		}
		mu.Lock()
		if ctx.Err() != nil {
			mu.Unlock()
			_ = c.Close()
			return nil
		}
		conns[c] = struct{}{}
		mu.Unlock()
		wg.Go(func() {
			defer func() {
				mu.Lock()
				delete(conns, c)
				mu.Unlock()
				_ = c.Close()
			}()
			baselineConn(c)
		})
	}
}

// baselineConn answers the requests of one connection until it closes or
// sends something that is not a policy request.
func baselineConn(c io.ReadWriter) {
	br := bufio.NewReaderSize(c, detector.DefaultMaxLine+2)
	bw := bufio.NewWriter(c)
	for {
		if _, err := detector.ReadRequest(br, detector.Limits{}); err != nil {
			return
		}
		if err := detector.WriteAction(bw, detector.ActionDunno); err != nil {
			return
		}
	}
}
