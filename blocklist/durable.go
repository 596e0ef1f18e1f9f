package blocklist

import (
	"context"
	"fmt"
	"time"
)

// Answer is the entry's Postfix answer: the action, then the text if any.
func (e Entry) Answer() string {
	if e.Text == "" {
		return e.Action
	}
	return e.Action + " " + e.Text
}

// Block blocks identity with a Postfix action word and its text, as [File.Add]
// does, and waits for the entry to be on disk: at most the write wait
// ([Config.WriteWait]) and never past ctx. The wait is the only one a
// caller has to bound; a disk that hangs in an fsync holds a background
// write, never the caller past the wait.
//
// An entry that is not on disk in time is not lost: [File.Lookup] and
// [File.Blocked] see it at once, [File.Watch] retries the write on every
// tick until it is on disk, and [File.Health] reports it meanwhile. The
// error is then a *[WriteError]. Once written, the entry survives a
// restart.
func (f *File) Block(ctx context.Context, identity, action, text string) error {
	id, err := canonicalIdentity(identity)
	if err != nil {
		return err
	}
	word, err := canonicalAction(action)
	if err != nil {
		return err
	}
	seq := f.record(op{entry: Entry{Identity: id, Action: word, Text: sanitizeText(text)}})
	return f.await(ctx, seq)
}

// Blocked returns the Postfix answer for a blocked identity (see
// [Entry.Answer]), compared as [File.Lookup] does. For an entry not on
// disk yet it first waits for the write, as [File.Block] does, so that an
// identity answered blocked is still blocked after a crash; while the disk
// refuses writes it answers from memory at once, and nobody waits until a
// write succeeds again.
func (f *File) Blocked(identity string) (string, bool) {
	e, ok := f.Lookup(identity)
	if !ok {
		return "", false
	}
	if e.Line == 0 && !f.refusing.Load() {
		f.mu.Lock()
		seq := f.seq
		f.mu.Unlock()
		_ = f.await(context.Background(), seq)
	}
	return e.Answer(), true
}

// await waits until the op with sequence number seq is on disk, at most
// the write wait and until ctx ends. The write runs in a goroutine of its
// own, which ends with the write: file system calls cannot be
// interrupted, and a hung one must hold only that goroutine.
func (f *File) await(ctx context.Context, seq uint64) error {
	ctx, cancel := context.WithTimeout(ctx, f.wait)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- f.sync(ctx, seq) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		f.mu.Lock()
		durable := seq <= f.durable
		f.mu.Unlock()
		if durable {
			return nil
		}
		return f.failed(&WriteError{Path: f.path, Pending: f.Pending(),
			Err: fmt.Errorf("not on disk within %s: %w", f.wait, ctx.Err())})
	}
}

// Health says whether every change is on disk. Unwritten is the number of
// changes that waited longer than the write wait and are still only in
// memory (Watch keeps retrying them), Since when the oldest of them was
// made, and Err the error of the last failed write. Zero Unwritten: all
// is well, whatever Err says.
type Health struct {
	Unwritten int
	Since     time.Time
	Err       error
}

// Health returns the state of the writes; see [Health].
func (f *File) Health() Health {
	f.mu.Lock()
	defer f.mu.Unlock()
	var h Health
	cut := time.Now().Add(-f.wait)
	for _, o := range f.pending {
		if o.at.Before(cut) {
			h.Unwritten++
			if h.Since.IsZero() || o.at.Before(h.Since) {
				h.Since = o.at
			}
		}
	}
	if h.Unwritten > 0 {
		h.Err = f.lastErr
	}
	return h
}
