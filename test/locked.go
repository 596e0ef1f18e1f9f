package test

import "sync"

// locked returns f's result computed under mu: the fake servers' getters
// read their counters and lists with it.
func locked[T any](mu *sync.Mutex, f func() T) T {
	mu.Lock()
	defer mu.Unlock()
	return f()
}
