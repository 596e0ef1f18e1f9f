package notify

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/rcptguard/rcptguard/blocklist/atomicfile"
)

// ledgerName is the spool's record of the blocks whose report is made: one
// line "+IDENTITY" when the block's report is in the spool for good (it is
// written before the report is first sent), "-IDENTITY" when the identity
// was unblocked since. At start-up a blocklist entry the ledger does not
// name, and for which no report waits in the spool, is a block whose
// report a crash lost before it reached the spool: it is reported then
// (see [Mailer.Unreported]). The ledger is compacted at that moment, so it
// holds no more lines than the blocklist has entries.
const ledgerName = "reported"

// ledger is the record of reported blocks; its methods are called with
// Mailer.ledgerMu held.
type ledger struct {
	path    string
	existed bool            // the file was there when the spool was opened
	ids     map[string]bool // identities whose block report is on record, as on disk
}

// openLedger reads the ledger in dir. A missing one is empty; a line cut
// short by a crash is ignored.
func openLedger(dir string) (*ledger, error) {
	l := &ledger{path: filepath.Join(dir, ledgerName), ids: map[string]bool{}}
	data, err := readNoFollow(l.path)
	if errors.Is(err, fs.ErrNotExist) {
		return l, nil
	}
	if err != nil {
		return nil, fmt.Errorf("notify: spool ledger: %w", err)
	}
	l.existed = true
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, 64<<10)
	whole := bytes.HasSuffix(data, []byte("\n"))
	var lines []string
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	if !whole && len(lines) > 0 {
		lines = lines[:len(lines)-1]
	}
	for _, line := range lines {
		switch {
		case strings.HasPrefix(line, "+"):
			l.ids[line[1:]] = true
		case strings.HasPrefix(line, "-"):
			delete(l.ids, line[1:])
		}
	}
	return l, nil
}

// ledgerKey is the ledger's form of an identity: ASCII lower case (as
// Postfix folds names). ok is false for one that cannot be a line.
func ledgerKey(id string) (string, bool) {
	if id == "" || strings.ContainsAny(id, "\r\n") {
		return "", false
	}
	return foldASCII(id), true
}

// append adds lines and syncs the file (and, when it is new, the
// directory).
func (l *ledger) append(s *spool, add bool, ids ...string) error {
	var b strings.Builder
	for _, id := range ids {
		if add {
			b.WriteByte('+')
		} else {
			b.WriteByte('-')
		}
		b.WriteString(id)
		b.WriteByte('\n')
	}
	_, statErr := os.Lstat(l.path)
	fd, err := os.OpenFile(l.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE|oNoFollow, 0o600)
	if err != nil {
		return fmt.Errorf("notify: spool ledger: %w", err)
	}
	if _, err := fd.WriteString(b.String()); err != nil {
		fd.Close()
		return fmt.Errorf("notify: spool ledger: write: %w", err)
	}
	if err := fd.Sync(); err != nil {
		fd.Close()
		return fmt.Errorf("notify: spool ledger: sync: %w", err)
	}
	if err := fd.Close(); err != nil {
		return fmt.Errorf("notify: spool ledger: %w", err)
	}
	if statErr != nil {
		if err := s.syncDir(); err != nil {
			return err
		}
	}
	l.existed = true
	for _, id := range ids {
		if add {
			l.ids[id] = true
		} else {
			delete(l.ids, id)
		}
	}
	return nil
}

// rewrite replaces the ledger by one that names exactly ids, atomically.
func (l *ledger) rewrite(s *spool, ids []string) error {
	var b strings.Builder
	for _, id := range ids {
		b.WriteString("+" + id + "\n")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := atomicfile.Write(l.path, spoolTemp+"*", 0o600, []byte(b.String())); err != nil {
		return fmt.Errorf("notify: spool ledger: %w", err)
	}
	if err := s.syncDir(); err != nil {
		return err
	}
	l.existed = true
	l.ids = make(map[string]bool, len(ids))
	for _, id := range ids {
		l.ids[id] = true
	}
	return nil
}
