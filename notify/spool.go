package notify

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rcptguard/rcptguard/blocklist/atomicfile"
)

// Spool layout. A message waiting for the relay is one file NAME.msg in the
// spool directory; files being written are .tmp-*; files that could not be
// read back are moved to corrupt/, messages given up after MaxAge to
// failed/.
const (
	spoolSuffix = ".msg"
	// spoolSending marks a message whose end of DATA is being sent: a
	// file NAME.msg.sending that a crash leaves behind means the relay
	// may have the message; the next start sends it again and says so.
	spoolSending = ".sending"
	spoolTemp    = ".tmp-"
	spoolCorrupt = "corrupt"
	spoolFailed  = "failed"
	spoolVersion = 1
)

// errCorrupt marks a spool file that cannot be understood.
var errCorrupt = errors.New("notify: corrupt spool file")

// spoolHeader is the first line of a spool file, as JSON. The message
// follows the newline that ends it, byte for byte as it goes to the relay.
type spoolHeader struct {
	Version     int       `json:"version"`
	From        string    `json:"from"` // envelope sender
	To          []string  `json:"to"`   // envelope recipients still to deliver to
	Created     time.Time `json:"created"`
	Attempts    int       `json:"attempts"`
	NextAttempt time.Time `json:"next_attempt"`
	LastError   string    `json:"last_error,omitempty"`
	Kind        string    `json:"kind"`
	Identity    string    `json:"identity"`
	MessageID   string    `json:"message_id"`
	Size        int       `json:"size"`   // of the message
	SHA256      string    `json:"sha256"` // of the message, hex
}

// spoolEntry is one spool file read back.
type spoolEntry struct {
	name string
	hdr  spoolHeader
	msg  []byte
}

// spool is the spool directory.
type spool struct {
	dir string
	// mu keeps the sweep of leftover temporary files from taking a file
	// that is being written right now.
	mu sync.Mutex
	// fault, when set (by tests), is asked before each file is written
	// and its error, if any, is the write's: a full or read-only disk
	// without a mount.
	fault atomic.Pointer[func(op, name string) error]
}

// injected returns the error a test injected for op ("write", "remove",
// "sync") on the spool file name, if any.
func (s *spool) injected(op, name string) error {
	if f := s.fault.Load(); f != nil {
		if err := (*f)(op, name); err != nil {
			return fmt.Errorf("notify: spool: %w", err)
		}
	}
	return nil
}

// openSpool creates dir (0700) when it is missing, and checks it: a real
// directory (not a link), not open to other users (an existing one of ours
// is narrowed to 0700; reports name customers), in which this process can
// create files. The error names the directory and the fix.
func openSpool(dir string) (*spool, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("notify: spool %s: %w; fix: create it, owned by the user rcptguard runs as, mode 0700", dir, err)
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return nil, fmt.Errorf("notify: spool %s: %w", dir, err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("notify: spool %s: not a directory (a symbolic link is refused); fix: make it a directory of rcptguard's own, mode 0700", dir)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		if !ownedByMe(fi) {
			return nil, fmt.Errorf("notify: spool %s: other users can use it (mode %04o) and it is not ours to change; fix: chmod 0700 %s", dir, fi.Mode().Perm(), dir)
		}
		if err := os.Chmod(dir, 0o700); err != nil {
			return nil, fmt.Errorf("notify: spool %s: chmod 0700: %w", dir, err)
		}
	}
	probe, err := os.CreateTemp(dir, spoolTemp+"*")
	if err != nil {
		return nil, fmt.Errorf("notify: spool %s: cannot create files in it (%w); fix: run as root or as its owner, or set notify.spool to a directory this user owns", dir, err)
	}
	probe.Close()
	os.Remove(probe.Name())
	return &spool{dir: dir}, nil
}

// newName returns a new spool file name for a message made at now.
func newName(now time.Time) string {
	var rnd [8]byte
	_, _ = rand.Read(rnd[:]) // crypto/rand.Read does not fail
	return fmt.Sprintf("%019d-%s%s", now.UnixNano(), hex.EncodeToString(rnd[:]), spoolSuffix)
}

// write replaces (or creates) the spool file name atomically: a temporary
// file in the spool directory, fsync, rename, fsync of the directory.
func (s *spool) write(name string, hdr spoolHeader, msg []byte) error {
	if err := s.place(name, hdr, msg); err != nil {
		return err
	}
	return s.syncDir()
}

// place writes the spool file name as write does, but leaves the sync of
// the directory to the caller, who may place several files first.
func (s *spool) place(name string, hdr spoolHeader, msg []byte) error {
	hdr.Version = spoolVersion
	hdr.Size = len(msg)
	sum := sha256.Sum256(msg)
	hdr.SHA256 = hex.EncodeToString(sum[:])
	head, err := json.Marshal(hdr)
	if err != nil {
		return fmt.Errorf("notify: spool: %w", err)
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.injected("write", name); err != nil {
		return err
	}
	if _, err := atomicfile.Write(filepath.Join(s.dir, name), spoolTemp+"*", 0o600, append(append(head, '\n'), msg...)); err != nil {
		return fmt.Errorf("notify: spool: %w", err)
	}
	return nil
}

// syncDir makes renames and removals in the spool directory durable.
func (s *spool) syncDir() error {
	if err := atomicfile.SyncDir(s.dir); err != nil {
		return fmt.Errorf("notify: spool: %w", err)
	}
	return nil
}

// mark records that the end of DATA of the message name is about to be
// sent, so that the next start after a crash can say that the message it
// sends again may be a duplicate. The directory is not synced: the mark
// only informs, the message is sent again with or without it.
func (s *spool) mark(name string) error {
	if err := s.injected("write", name+spoolSending); err != nil {
		return err
	}
	fd, err := os.OpenFile(filepath.Join(s.dir, name+spoolSending), os.O_WRONLY|os.O_CREATE|oNoFollow, 0o600)
	if err != nil {
		return fmt.Errorf("notify: spool: %w", err)
	}
	return fd.Close()
}

// unmark removes the mark of name; the caller syncs the directory.
func (s *spool) unmark(name string) error {
	err := os.Remove(filepath.Join(s.dir, name+spoolSending))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("notify: spool: %w", err)
	}
	return nil
}

// marked returns the names of the messages a crash left marked as being
// sent, and removes marks whose message is gone.
func (s *spool) marked() (map[string]bool, error) {
	des, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("notify: spool: %w", err)
	}
	have := map[string]bool{}
	for _, de := range des {
		have[de.Name()] = true
	}
	out := map[string]bool{}
	for name := range have {
		msg, ok := strings.CutSuffix(name, spoolSending)
		switch {
		case !ok:
		case have[msg]:
			out[msg] = true
		default:
			_ = os.Remove(filepath.Join(s.dir, name))
		}
	}
	return out, nil
}

// list returns the names of the spooled messages, oldest first.
func (s *spool) list() ([]string, error) {
	des, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("notify: spool: %w", err)
	}
	var names []string
	for _, de := range des {
		if de.Type().IsRegular() && strings.HasSuffix(de.Name(), spoolSuffix) && !strings.HasPrefix(de.Name(), ".") {
			names = append(names, de.Name())
		}
	}
	slices.Sort(names)
	return names, nil
}

// load reads one spool file. A file that cannot be understood yields an
// error wrapping errCorrupt.
func (s *spool) load(name string) (spoolEntry, error) {
	data, err := readNoFollow(filepath.Join(s.dir, name))
	if err != nil {
		return spoolEntry{}, fmt.Errorf("notify: spool: %w", err)
	}
	head, msg, ok := bytes.Cut(data, []byte("\n"))
	if !ok {
		return spoolEntry{}, fmt.Errorf("%w %s: no header line", errCorrupt, name)
	}
	var hdr spoolHeader
	dec := json.NewDecoder(bytes.NewReader(head))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&hdr); err != nil {
		return spoolEntry{}, fmt.Errorf("%w %s: header: %v", errCorrupt, name, err)
	}
	sum := sha256.Sum256(msg)
	switch {
	case hdr.Version != spoolVersion:
		return spoolEntry{}, fmt.Errorf("%w %s: version %d", errCorrupt, name, hdr.Version)
	case hdr.From == "" || len(hdr.To) == 0 || slices.Contains(hdr.To, ""):
		return spoolEntry{}, fmt.Errorf("%w %s: no envelope", errCorrupt, name)
	case hdr.Created.IsZero():
		return spoolEntry{}, fmt.Errorf("%w %s: no creation time", errCorrupt, name)
	case hdr.Size != len(msg) || hdr.SHA256 != hex.EncodeToString(sum[:]):
		return spoolEntry{}, fmt.Errorf("%w %s: message is %d bytes or altered, header says %d", errCorrupt, name, len(msg), hdr.Size)
	}
	return spoolEntry{name: name, hdr: hdr, msg: msg}, nil
}

// remove deletes a delivered message.
func (s *spool) remove(name string) error {
	if err := s.injected("remove", name); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(s.dir, name)); err != nil {
		return fmt.Errorf("notify: spool: %w", err)
	}
	return s.syncDir()
}

// moveAside moves a spool file into the sub directory (corrupt or failed)
// and returns its new path.
func (s *spool) moveAside(name, sub string) (string, error) {
	dir := filepath.Join(s.dir, sub)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("notify: spool: %w", err)
	}
	dst := filepath.Join(dir, name)
	if err := os.Rename(filepath.Join(s.dir, name), dst); err != nil {
		return "", fmt.Errorf("notify: spool: %w", err)
	}
	return dst, s.syncDir()
}

// sweepTemp moves temporary files left by a crash into corrupt/ and
// returns their new paths. Files being written by this process are safe:
// writes hold s.mu.
func (s *spool) sweepTemp() ([]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	des, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("notify: spool: %w", err)
	}
	var moved []string
	for _, de := range des {
		if !de.Type().IsRegular() || !strings.HasPrefix(de.Name(), spoolTemp) {
			continue
		}
		dst, err := s.moveAside(de.Name(), spoolCorrupt)
		if err != nil {
			return moved, err
		}
		moved = append(moved, dst)
	}
	return moved, nil
}

// count is the number of spooled messages.
func (s *spool) count() int {
	names, err := s.list()
	if err != nil {
		return 0
	}
	return len(names)
}
