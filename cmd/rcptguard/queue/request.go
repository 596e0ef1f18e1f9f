package queue

// The privilege split of the retroactive hold.
//
// The daemon runs as an unprivileged user and cannot run postsuper. When
// it blocks an identity it writes a request file naming the identity into
// a directory it owns ([Requester]). A systemd path unit
// (DirectoryNotEmpty=) starts "rcptguard queue-hold" as root, which takes
// the requests ([TakeRequests]) and, for each identity that the
// blocklist file lists, holds that identity's messages that arrived
// within the window before the request ([Queue.HoldIdentity]).
//
// What a writer of the directory can do is thereby limited to what the
// daemon can already do by blocking: hold the mail of an identity that is
// in the blocklist — visible, logged and reported. It cannot name queue
// IDs, queues or operations; release and delete are never done on
// request; a request older than the window is refused.

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	ident "github.com/rcptguard/rcptguard/blocklist/identity"
)

const (
	requestPrefix = "hold-"
	requestSuffix = ".req"
	tempPrefix    = ".rcptguard-hold-request-"
	// maxRequestSize bounds a request file read.
	maxRequestSize = 1024
	// MaxRequestsPerRun bounds the requests TakeRequests reads in one
	// run; the rest stay for the next (the path unit starts it again
	// while the directory is not empty).
	MaxRequestsPerRun = 1000
)

// Requester writes hold requests. Its methods are safe for concurrent use.
type Requester struct {
	// Dir is the request directory; it must exist. Its parent directory
	// must be writable too, and on the same file system: the request is
	// written there first.
	Dir string
}

// Request asks for identity's queued mail to be held: it writes a request
// file in Dir's parent directory and renames it into Dir, so that Dir only
// ever holds complete requests (a systemd path unit with
// DirectoryNotEmpty= starts the reader as soon as Dir has an entry).
func (r Requester) Request(identity string) error {
	if !validIdentity(identity) {
		return fmt.Errorf("queue: hold request: %q is not an identity", printable(identity, 80))
	}
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	name := fmt.Sprintf("%d-%s", time.Now().UnixNano(), hex.EncodeToString(rnd[:]))
	tmp := filepath.Join(filepath.Dir(filepath.Clean(r.Dir)), tempPrefix+name)
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("queue: hold request: %w", err)
	}
	_, err = f.WriteString(identity + "\n")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(r.Dir, requestPrefix+name+requestSuffix))
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("queue: hold request: %w", err)
	}
	return nil
}

// StaleTempAge is how old a temporary request file must be before
// RemoveStaleTemps takes it for a dead writer's: a live one renames or
// removes it within milliseconds.
const StaleTempAge = time.Minute

// RemoveStaleTemps removes the temporary files that writers of requests
// into dir killed mid-write left in dir's parent directory: regular files
// named with Request's exact prefix, owned by this process's user, last
// modified before now-StaleTempAge. Symbolic links and everything else
// are left alone (never followed). It returns the names removed.
func RemoveStaleTemps(dir string, now time.Time) (removed []string, err error) {
	parent := filepath.Dir(filepath.Clean(dir))
	d, err := os.Open(parent)
	if err != nil {
		return nil, fmt.Errorf("queue: stale hold request files: %w", err)
	}
	names, err := d.Readdirnames(-1)
	d.Close()
	if err != nil {
		return nil, fmt.Errorf("queue: stale hold request files in %s: %w", parent, err)
	}
	uid := os.Getuid()
	for _, name := range names {
		if !strings.HasPrefix(name, tempPrefix) {
			continue
		}
		p := filepath.Join(parent, name)
		fi, err := os.Lstat(p)
		if err != nil || !fi.Mode().IsRegular() || !fi.ModTime().Before(now.Add(-StaleTempAge)) {
			continue
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); !ok || int(st.Uid) != uid {
			continue
		}
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return removed, fmt.Errorf("queue: stale hold request file: %w", err)
		}
		removed = append(removed, name)
	}
	return removed, nil
}

// HoldRequest is a request read by TakeRequests.
type HoldRequest struct {
	Identity string
	// Time is when the request was written (the file's modification
	// time, never later than the time of reading).
	Time time.Time
}

// TakeRequests reads and removes the request files in dir (at most
// MaxRequestsPerRun), and returns the valid ones not older than maxAge,
// one per identity (the latest). Every entry is removed, valid or not;
// problems describe the ones refused. Symbolic links, FIFOs and other
// non-regular files are never opened, only removed (a directory that is
// not empty stays, and is reported).
func TakeRequests(dir string, now time.Time, maxAge time.Duration) (reqs []HoldRequest, problems []error, err error) {
	st, err := os.Lstat(dir)
	if err != nil {
		return nil, nil, fmt.Errorf("queue: hold requests: %w", err)
	}
	if !st.IsDir() {
		return nil, nil, fmt.Errorf("queue: hold requests: %s is not a directory", dir)
	}
	names, err := readNames(dir, MaxRequestsPerRun)
	if err != nil {
		return nil, nil, fmt.Errorf("queue: hold requests: %w", err)
	}
	byID := map[string]int{}
	for _, name := range names {
		path := filepath.Join(dir, name)
		req, err := readRequest(path, name, now, maxAge)
		if rerr := os.Remove(path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) && err == nil {
			err = fmt.Errorf("cannot remove it: %w", rerr)
		}
		if err != nil {
			problems = append(problems, fmt.Errorf("hold request %s refused: %w", printable(name, 80), err))
			continue
		}
		key := ident.Fold(req.Identity)
		if i, ok := byID[key]; ok {
			if req.Time.After(reqs[i].Time) {
				reqs[i].Time = req.Time
			}
			continue
		}
		byID[key] = len(reqs)
		reqs = append(reqs, req)
	}
	return reqs, problems, nil
}

// readNames returns at most max names of the entries of dir.
func readNames(dir string, max int) ([]string, error) {
	d, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	names, err := d.Readdirnames(max)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return names, nil
}

// readSpoolFile reads the request or result file at path, of at most max
// bytes. O_NOFOLLOW: a symbolic link is not followed; O_NONBLOCK: a FIFO
// does not block the open; only a regular file is read.
func readSpoolFile(path string, max int64) ([]byte, os.FileInfo, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, nil, errors.New("not a regular file")
	}
	if fi.Size() > max {
		return nil, nil, fmt.Errorf("larger than %d bytes", max)
	}
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, nil, err
	}
	if int64(len(b)) > max {
		return nil, nil, fmt.Errorf("larger than %d bytes", max)
	}
	return b, fi, nil
}

func readRequest(path, name string, now time.Time, maxAge time.Duration) (HoldRequest, error) {
	if !strings.HasPrefix(name, requestPrefix) || !strings.HasSuffix(name, requestSuffix) {
		return HoldRequest{}, errors.New("not a request file name")
	}
	b, fi, err := readSpoolFile(path, maxRequestSize)
	if err != nil {
		return HoldRequest{}, err
	}
	req, err := ParseRequest(b)
	if err != nil {
		return req, err
	}
	req.Time = fi.ModTime()
	if req.Time.After(now) {
		req.Time = now
	}
	if age := now.Sub(req.Time); age > maxAge {
		return req, fmt.Errorf("written %s ago, longer than the window %s", age.Round(time.Second), maxAge)
	}
	return req, nil
}

// ParseRequest parses a request file's content: one identity and a line
// end, nothing else.
func ParseRequest(b []byte) (HoldRequest, error) {
	line, ok := bytes.CutSuffix(b, []byte("\n"))
	if !ok || bytes.ContainsAny(line, "\n\r") {
		return HoldRequest{}, errors.New("not one line")
	}
	id := string(line)
	if !validIdentity(id) {
		return HoldRequest{}, fmt.Errorf("%s is not an identity", strconv.Quote(printable(id, 80)))
	}
	return HoldRequest{Identity: id}, nil
}
