package queue

// The way back of the retroactive hold: what root held reaches the abuse
// desk through the daemon.
//
// The root-run queue-hold knows what it held; the daemon has the mailer,
// its spool and the relay's credentials. Neither gets the other's powers:
// queue-hold does not compose or send mail (it would need the daemon's
// spool, configuration secrets and network, and root would be writing
// into files the daemon's user controls), and the daemon never touches the
// queue. Instead queue-hold writes one small result file per identity it
// held mail of ([WriteResult]) into a directory the daemon owns
// ([ResultsDir], next to the request directory), and the daemon takes the
// files ([TakeResults]) and sends a "held" report for each.
//
// Root writing into a directory another user owns is done so that the
// owner cannot redirect it: the directory must not be a symbolic link, it
// is opened as an [os.Root] and checked to be the directory just looked
// at, and the file is created inside it exclusively (never following or
// reusing an existing name) under a temporary name, then renamed. The
// content is data only (an identity, times, queue IDs and numbers).
//
// The daemon reads the files as hostile: only regular files, bounded
// size, strict JSON, every queue ID and identity checked; every file is
// removed as it is read, before any report is made of it, so that one
// result is reported at most once (a crash between the two loses the
// report; queue-hold's log still has every held message).

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"
)

const (
	resultPrefix = "held-"
	resultSuffix = ".json"
	resultTemp   = ".tmp-"
	// maxResultSize bounds a result file read; MaxResultHeld messages
	// of about 120 bytes each fit with room.
	maxResultSize = 256 << 10
	// MaxResultHeld bounds the messages listed in one result; the
	// count says how many were held in all.
	MaxResultHeld = 1000
	// MaxResultsPerRun bounds the files TakeResults reads in one call.
	MaxResultsPerRun = 100
	// staleTemp is the age after which a temporary file is a crash's
	// leftover, not a write under way.
	staleTemp = time.Hour
)

// ResultsDir is the directory hold results go to: "hold-results" next to
// the request directory (queue.requests), in the daemon's state
// directory. The daemon creates it; queue-hold only writes into it.
func ResultsDir(requests string) string {
	return filepath.Join(filepath.Dir(filepath.Clean(requests)), "hold-results")
}

// HoldResult is what one queue-hold run held of one identity.
type HoldResult struct {
	Identity  string
	Requested time.Time // when the daemon asked (the block)
	Done      time.Time // when the mail was held
	Held      []HeldMessage
	Count     int // held in all; more than len(Held) when the list was cut
}

// HeldMessage is one message held retroactively.
type HeldMessage struct {
	ID         string
	Arrival    time.Time
	Size       int64
	Recipients int
}

type resultFile struct {
	Version   int          `json:"version"`
	Identity  string       `json:"identity"`
	Requested time.Time    `json:"requested"`
	Done      time.Time    `json:"done"`
	Count     int          `json:"count"`
	Held      []resultHeld `json:"held"`
}

type resultHeld struct {
	ID         string    `json:"id"`
	Arrival    time.Time `json:"arrival"`
	Size       int64     `json:"size"`
	Recipients int       `json:"recipients"`
}

// NewHoldResult makes the result of holding msgs of identity.
func NewHoldResult(identity string, requested, done time.Time, msgs []Message) HoldResult {
	r := HoldResult{Identity: identity, Requested: requested, Done: done, Count: len(msgs)}
	for _, m := range msgs[:min(len(msgs), MaxResultHeld)] {
		r.Held = append(r.Held, HeldMessage{ID: m.ID, Arrival: m.Arrival, Size: m.Size, Recipients: m.Recipients})
	}
	return r
}

// WriteResult writes r as a new file in dir, which must exist and not be
// a symbolic link. It is run by root in a directory the daemon's user
// owns; see the comment at the top of this file.
func WriteResult(dir string, r HoldResult) error {
	b, err := encodeResult(r)
	if err != nil {
		return err
	}
	before, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("queue: hold result: %w", err)
	}
	if !before.IsDir() {
		return fmt.Errorf("queue: hold result: %s is not a directory", dir)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return fmt.Errorf("queue: hold result: %w", err)
	}
	defer root.Close()
	opened, err := root.Stat(".")
	if err != nil {
		return fmt.Errorf("queue: hold result: %w", err)
	}
	if !os.SameFile(before, opened) {
		return fmt.Errorf("queue: hold result: %s was replaced while it was opened", dir)
	}
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	name := fmt.Sprintf("%s%d-%s%s", resultPrefix, time.Now().UnixNano(), hex.EncodeToString(rnd[:]), resultSuffix)
	tmp := resultTemp + name
	f, err := root.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("queue: hold result: %w", err)
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = root.Rename(tmp, name)
	}
	if err != nil {
		_ = root.Remove(tmp)
		return fmt.Errorf("queue: hold result: %w", err)
	}
	return nil
}

func encodeResult(r HoldResult) ([]byte, error) {
	if !validIdentity(r.Identity) {
		return nil, fmt.Errorf("queue: hold result: %q is not an identity", printable(r.Identity, 80))
	}
	if len(r.Held) > MaxResultHeld {
		return nil, fmt.Errorf("queue: hold result: %d messages listed, at most %d", len(r.Held), MaxResultHeld)
	}
	f := resultFile{Version: 1, Identity: r.Identity, Requested: r.Requested.UTC(), Done: r.Done.UTC(), Count: max(r.Count, len(r.Held)), Held: []resultHeld{}}
	for _, m := range r.Held {
		if !ValidID(m.ID) {
			return nil, fmt.Errorf("queue: hold result: %q is not a queue ID", printable(m.ID, 40))
		}
		f.Held = append(f.Held, resultHeld{ID: m.ID, Arrival: m.Arrival.UTC(), Size: m.Size, Recipients: m.Recipients})
	}
	b, err := json.Marshal(f)
	if err != nil {
		return nil, fmt.Errorf("queue: hold result: %w", err)
	}
	return append(b, '\n'), nil
}

// ParseResult parses a result file's content strictly: version 1, known
// fields only, an identity, valid queue IDs, no negative number, times
// set, at most MaxResultHeld messages, nothing after the object.
func ParseResult(b []byte) (HoldResult, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var f resultFile
	if err := dec.Decode(&f); err != nil {
		return HoldResult{}, fmt.Errorf("not a hold result: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return HoldResult{}, errors.New("not a hold result: data after the object")
	}
	switch {
	case f.Version != 1:
		return HoldResult{}, fmt.Errorf("version %d, want 1", f.Version)
	case !validIdentity(f.Identity):
		return HoldResult{}, fmt.Errorf("%q is not an identity", printable(f.Identity, 80))
	case f.Requested.IsZero() || f.Done.IsZero():
		return HoldResult{}, errors.New("no time")
	case len(f.Held) > MaxResultHeld:
		return HoldResult{}, fmt.Errorf("%d messages listed, at most %d", len(f.Held), MaxResultHeld)
	case f.Count < len(f.Held):
		return HoldResult{}, fmt.Errorf("count %d, fewer than the %d listed", f.Count, len(f.Held))
	}
	r := HoldResult{Identity: f.Identity, Requested: f.Requested, Done: f.Done, Count: f.Count}
	for _, m := range f.Held {
		if !ValidID(m.ID) {
			return HoldResult{}, fmt.Errorf("%q is not a queue ID", printable(m.ID, 40))
		}
		if m.Size < 0 || m.Recipients < 0 {
			return HoldResult{}, fmt.Errorf("queue ID %s: negative size or recipients", m.ID)
		}
		r.Held = append(r.Held, HeldMessage(m))
	}
	return r, nil
}

// TakeResults reads and removes the result files in dir (at most
// MaxResultsPerRun) and returns the valid ones. A file is removed before
// it is returned: one that cannot be removed is not returned, so no
// result is returned twice. Other entries are removed and described in
// problems, except temporary files younger than an hour (a write under
// way). Symbolic links and other non-regular files are never opened.
func TakeResults(dir string, now time.Time) (results []HoldResult, problems []error, err error) {
	names, err := readNames(dir, MaxResultsPerRun)
	if err != nil {
		return nil, nil, fmt.Errorf("queue: hold results: %w", err)
	}
	for _, name := range names {
		path := filepath.Join(dir, name)
		if strings.HasPrefix(name, resultTemp) {
			if fi, err := os.Lstat(path); err == nil && now.Sub(fi.ModTime()) < staleTemp {
				continue
			}
		}
		r, err := readResult(path, name)
		if rerr := os.Remove(path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			problems = append(problems, fmt.Errorf("hold result %s: cannot remove it, so it is not reported: %w", printable(name, 80), rerr))
			continue
		}
		if err != nil {
			problems = append(problems, fmt.Errorf("hold result %s refused: %w", printable(name, 80), err))
			continue
		}
		results = append(results, r)
	}
	return results, problems, nil
}

func readResult(path, name string) (HoldResult, error) {
	if !strings.HasPrefix(name, resultPrefix) || !strings.HasSuffix(name, resultSuffix) {
		return HoldResult{}, errors.New("not a result file name")
	}
	b, _, err := readSpoolFile(path, maxResultSize)
	if err != nil {
		return HoldResult{}, err
	}
	return ParseResult(b)
}
