package blocklist

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rcptguard/rcptguard/blocklist/atomicfile"
)

// racyWindow is how long after a file's modification time its stat data is
// not trusted to show every change: file systems with coarse time stamps
// (1 s on ext3 and HFS+, 2 s on FAT) can hide a second same-size write in
// the same tick. Within the window, Watch compares content hashes.
const racyWindow = 2 * time.Second

// maxLoggedProblems bounds the problems logged for one load; all of them
// are still returned.
const maxLoggedProblems = 20

// Config configures a [File].
type Config struct {
	// Path is the table file, e.g. /var/lib/rcptguard/blocklist. Its
	// directory must exist, and must not be writable by every user. The
	// lock file is Path + ".lock". Neither is opened through a symbolic
	// link.
	Path string
	// Create makes Open create the file, holding only the [Header]
	// comment (mode 0644, so Postfix can read it), when it is missing:
	// Postfix refuses to use a table that does not exist.
	Create bool
	// Logger receives problems in the file, reloads and write failures.
	// Nil discards them.
	Logger *slog.Logger
	// OnChange, if set, is called after the file changed on disk by
	// someone else (noticed by Reload, Watch or a write), with the
	// identities that appeared and disappeared, sorted. It is called
	// without locks held, from the goroutine that noticed the change, so
	// it may call the File's methods.
	OnChange func(added, removed []string)
	// BeforeRemove, if set, is called when a change on disk by someone
	// else is about to take identities out of the table, with those
	// identities, sorted, while Lookup still finds them: the caller drops
	// what it keeps about them (the counts that blocked them) before their
	// requests are judged again. OnChange comes later, too late for that.
	// It is called with the File's write lock held, from the goroutine
	// that noticed the change: it must be quick, must not block, and must
	// not call the File's methods other than Lookup, Entries and Len.
	BeforeRemove func(ids []string)
	// WriteWait bounds how long [File.Block] and [File.Blocked] wait for
	// an entry to reach the disk; default [DefaultWriteWait]. Past it the
	// entry holds from memory and Watch keeps writing it.
	WriteWait time.Duration
}

// DefaultWriteWait is the default [Config.WriteWait]: long enough for a
// write and its fsyncs on a healthy disk, short next to Postfix's policy
// timeout.
const DefaultWriteWait = time.Second

// File is a blocklist table file and its in-memory copy. Its methods are
// safe for concurrent use. Several File values, in one process or several,
// may share a path.
type File struct {
	path     string
	lockPath string
	log      *slog.Logger
	onChange func(added, removed []string)
	onRemove func(ids []string) // Config.BeforeRemove
	seed     maphash.Seed
	wait     time.Duration // Config.WriteWait

	// refusing is set while the disk refuses our writes (the last write
	// failed or did not end within the wait): Blocked then answers from
	// memory without waiting. A successful write clears it.
	refusing atomic.Bool

	// snap is what Lookup reads: the disk state with pending changes
	// applied. The map is never changed after it is stored.
	snap atomic.Pointer[snapshot]

	// writeMu serializes reading the disk state into memory and writing
	// it; it is held while waiting for the file lock. It guards the next
	// four fields.
	writeMu chan struct{} // one token: a semaphore, so waiting for it can end with a context
	stamp   stamp         // of the content on disk
	changes []change      // for OnChange, once writeMu is released
	failing bool          // the last write retried by Watch failed
	broken  bool          // the last check by Watch failed

	// mu guards the fields below. It is never held during I/O.
	mu      sync.Mutex
	disk    map[string]Entry // the last content read or written
	pending map[string]op    // changes not written yet, by identity
	seq     uint64           // of the last op
	durable uint64           // every op with seq <= durable is on disk
	lastErr error            // of the last failed write; nil after a good one
}

type snapshot struct {
	m map[string]Entry
}

// stamp identifies a version of the file on disk.
type stamp struct {
	exists bool
	size   int64
	mtime  int64 // ns
	dev    uint64
	ino    uint64
	hash   uint64 // of the content
	racy   bool   // mtime was too close to the time the content was read
}

// sameStat reports whether s and fi describe the same file version as far
// as stat can tell.
func (s stamp) sameStat(fi fs.FileInfo) bool {
	dev, ino := fileID(fi)
	return s.exists && s.size == fi.Size() && s.mtime == fi.ModTime().UnixNano() &&
		s.dev == dev && s.ino == ino
}

// Open loads the table at cfg.Path. A missing file is an empty table; it is
// created by the first write. A missing directory is an error. Lines that
// are not valid entries are skipped, logged and returned as problems.
func Open(cfg Config) (*File, []Problem, error) {
	if cfg.Path == "" {
		return nil, nil, errors.New("blocklist: no path")
	}
	if err := checkDir(cfg.Path); err != nil {
		return nil, nil, err
	}
	f := &File{
		path:     cfg.Path,
		lockPath: cfg.Path + ".lock",
		log:      cfg.Logger,
		onChange: cfg.OnChange,
		onRemove: cfg.BeforeRemove,
		seed:     maphash.MakeSeed(),
		wait:     cfg.WriteWait,
		writeMu:  make(chan struct{}, 1),
		disk:     map[string]Entry{},
		pending:  map[string]op{},
	}
	if f.log == nil {
		f.log = slog.New(slog.DiscardHandler)
	}
	if f.wait <= 0 {
		f.wait = DefaultWriteWait
	}
	f.snap.Store(&snapshot{m: f.disk})
	if cfg.Create {
		if err := f.create(); err != nil {
			return nil, nil, err
		}
	}
	data, st, err := f.read()
	if err != nil {
		return nil, nil, err
	}
	d := parseDocument(data)
	f.writeMu <- struct{}{}
	f.install(d, st, loadOpen)
	<-f.writeMu
	f.removeStaleTemps()
	f.log.Info("blocklist loaded", slog.String("path", f.path), slog.Int("entries", len(d.entries)), slog.Int("problems", len(d.problems)))
	return f, d.problems, nil
}

// checkDir checks the directory of the table at path: it exists and not
// every user may write to it.
func checkDir(path string) error {
	dir := filepath.Dir(path)
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("blocklist %s: directory: %w", path, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("blocklist %s: %s is not a directory", path, dir)
	}
	if fi.Mode().Perm()&0o002 != 0 {
		// Even with the sticky bit: another user could create the file
		// or its lock file first, or plant a link.
		return fmt.Errorf("blocklist %s: directory %s is writable by every user (mode %04o); fix: chmod o-w %s, or set blocklist.path to a directory of rcptguard's own", path, dir, fi.Mode().Perm(), dir)
	}
	return nil
}

// CheckWritable checks, without changing the table, that this process can
// write the table at path: its directory is fit (see [Config.Path]), the
// lock file can be opened for writing (it is created when missing), and a
// file can be created in the directory, as every write does. The error
// names the path that failed and the fix.
func CheckWritable(path string) error {
	if err := checkDir(path); err != nil {
		return err
	}
	fd, err := openLockFile(path + ".lock")
	if err != nil {
		return fmt.Errorf("blocklist %s: %w", path, err)
	}
	fd.Close()
	dir, base := filepath.Split(path)
	tmp, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("blocklist %s: cannot create files in %s (%w); fix: run as root or as the owner of %s, or set blocklist.path to a directory this user owns", path, filepath.Clean(dir), err, filepath.Clean(dir))
	}
	tmp.Close()
	os.Remove(tmp.Name())
	return nil
}

// create writes the file with only the header comment if it is missing,
// under the file lock.
func (f *File) create() error {
	if _, err := os.Lstat(f.path); err == nil || !errors.Is(err, fs.ErrNotExist) {
		return nil // there, or read reports the problem
	}
	ctx, cancel := context.WithTimeout(context.Background(), createLockWait)
	defer cancel()
	unlock, err := lockFile(ctx, f.lockPath)
	if err != nil {
		return fmt.Errorf("blocklist %s: create: %w", f.path, err)
	}
	defer unlock()
	if _, err := os.Lstat(f.path); !errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if _, err := writeAtomic(f.path, Header+"\n"); err != nil {
		return fmt.Errorf("blocklist %s: create: %w", f.path, err)
	}
	return nil
}

// createLockWait bounds the wait for the lock when creating the file.
const createLockWait = 5 * time.Second

// WriteError is a failed write of pending changes. They stay in memory
// (Lookup sees them) and are written by the next successful write.
type WriteError struct {
	Path    string
	Pending int   // changes not on disk
	Err     error // what failed, without the path
}

func (e *WriteError) Error() string {
	return fmt.Sprintf("blocklist %s: %v (kept in memory, %d pending)", e.Path, e.Err, e.Pending)
}

func (e *WriteError) Unwrap() error { return e.Err }

// Lookup returns the entry for identity, compared case-insensitively,
// including changes not written to disk yet. It takes no lock and does not
// allocate when identity is in lower case.
func (f *File) Lookup(identity string) (Entry, bool) {
	m := f.snap.Load().m
	if e, ok := m[identity]; ok {
		return e, true
	}
	if low := foldIdentity(identity); low != identity {
		e, ok := m[low]
		return e, ok
	}
	return Entry{}, false
}

// Entries returns all entries, sorted by identity.
func (f *File) Entries() []Entry {
	m := f.snap.Load().m
	es := make([]Entry, 0, len(m))
	for _, e := range m {
		es = append(es, e)
	}
	slices.SortFunc(es, func(a, b Entry) int { return cmp.Compare(a.Identity, b.Identity) })
	return es
}

// Len returns the number of entries.
func (f *File) Len() int {
	return len(f.snap.Load().m)
}

// Pending returns the number of changes made in memory but not written to
// disk yet, because writing failed.
func (f *File) Pending() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.pending)
}

// Add adds e, replacing the entry for the same identity (in place, if it is
// in the file; otherwise e is appended). The identity is lower-cased, the
// action upper-cased, and the text has control characters replaced by
// spaces and is cut to [MaxText] bytes; e.Line is ignored.
//
// An invalid identity or action is an error wrapping [ErrInvalidIdentity]
// or [ErrInvalidAction], and nothing changes. Otherwise [File.Lookup] sees
// e at once, even if writing fails: the error then names the file, the
// entry stays pending and is written by the next successful write. ctx
// bounds the wait for the file lock.
func (f *File) Add(ctx context.Context, e Entry) error {
	id, err := canonicalIdentity(e.Identity)
	if err != nil {
		return err
	}
	action, err := canonicalAction(strings.TrimSpace(e.Action))
	if err != nil {
		return err
	}
	e = Entry{Identity: id, Action: action, Text: sanitizeText(e.Text)}
	seq := f.record(op{entry: e})
	return f.sync(ctx, seq)
}

// Remove removes the entry for identity, compared case-insensitively, and
// reports whether there was one (in memory or on disk). Like [File.Add], it
// takes effect in memory at once, and a failed write leaves it pending.
func (f *File) Remove(ctx context.Context, identity string) (bool, error) {
	id, err := canonicalIdentity(identity)
	if err != nil {
		return false, err
	}
	_, known := f.snap.Load().m[id]
	found := new(bool)
	seq := f.record(op{entry: Entry{Identity: id}, remove: true, found: found})
	err = f.sync(ctx, seq)
	// sync returned after the write that included our op (if any), under
	// writeMu, so reading found is ordered after it was set.
	return known || *found, err
}

// record makes o pending and visible to Lookup, and returns its sequence
// number.
func (f *File) record(o op) uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.seq++
	o.seq = f.seq
	o.at = time.Now()
	f.pending[o.entry.Identity] = o
	f.publishLocked()
	return o.seq
}

// sync makes sure the op with sequence number seq is on disk, writing it
// unless a concurrent write already did.
func (f *File) sync(ctx context.Context, seq uint64) error {
	if err := f.lockWrite(ctx); err != nil {
		return err
	}
	defer f.unlockWrite()
	f.mu.Lock()
	done := seq <= f.durable
	f.mu.Unlock()
	if done {
		return nil
	}
	return f.flushLocked(ctx)
}

// Flush writes the pending changes, if any. ctx bounds the wait for a
// write in progress and for the file lock.
func (f *File) Flush(ctx context.Context) error {
	if err := f.lockWrite(ctx); err != nil {
		return err
	}
	defer f.unlockWrite()
	return f.flushLocked(ctx)
}

// flushLocked writes all pending changes with a read-modify-write under the
// file lock. f.writeMu must be held.
func (f *File) flushLocked(ctx context.Context) error {
	f.mu.Lock()
	ops := make([]op, 0, len(f.pending))
	for _, o := range f.pending {
		ops = append(ops, o)
	}
	upto := f.seq
	f.mu.Unlock()
	if len(ops) == 0 {
		return nil
	}
	slices.SortFunc(ops, func(a, b op) int { return cmp.Compare(a.seq, b.seq) })

	unlock, err := lockFile(ctx, f.lockPath)
	if err != nil {
		return f.failed(&WriteError{Path: f.path, Pending: len(ops), Err: err})
	}
	defer unlock()
	data, st, err := f.read()
	if err != nil {
		return f.failed(&WriteError{Path: f.path, Pending: len(ops), Err: err})
	}
	d := parseDocument(data)
	if st.hash != f.stamp.hash || st.exists != f.stamp.exists {
		// Someone else changed the file since we last looked: take their
		// version in (and log its problems) before applying ours.
		f.install(d, st, loadOutside)
	}
	onlyRemovals := true
	for _, o := range ops {
		onlyRemovals = onlyRemovals && o.remove
	}
	out := d.render(ops, trimBlank(data) == "")
	if out != data && (st.exists || !onlyRemovals) {
		st, err = writeAtomic(f.path, out)
		if err != nil {
			return f.failed(&WriteError{Path: f.path, Pending: len(ops), Err: fmt.Errorf("write: %w", err)})
		}
		st.hash = maphash.String(f.seed, out)
		d = parseDocument(out)
	}
	f.mu.Lock()
	f.durable = upto
	for id, o := range f.pending {
		if o.seq <= upto {
			delete(f.pending, id)
		}
	}
	f.lastErr = nil
	f.mu.Unlock()
	f.refusing.Store(false)
	f.install(d, st, loadOwn)
	return nil
}

// failed notes a failed write of pending changes and returns err.
func (f *File) failed(err error) error {
	f.mu.Lock()
	f.lastErr = err
	f.mu.Unlock()
	f.refusing.Store(true)
	return err
}

// Reload reads the file again, as after an outside change, and returns the
// problems in it. Pending changes stay applied. On error the in-memory
// table is unchanged.
func (f *File) Reload() ([]Problem, error) {
	f.writeMu <- struct{}{}
	defer f.unlockWrite()
	data, st, err := f.read()
	if err != nil {
		return nil, err
	}
	d := parseDocument(data)
	f.install(d, st, loadOutside)
	return d.problems, nil
}

// Watch polls the file every interval (1 s if interval <= 0) and reloads it
// when it changed: its size, modification time or inode differ, or, while
// the modification time is too recent to trust, its content hash. On each
// tick it also retries writing pending changes, waiting at most about an
// interval for the file lock. An edit is seen within an interval (plus the
// reload), so an interval of 1 s keeps the daemon's promise to see outside
// edits within 2 s. Watch returns ctx.Err() when ctx is done; the caller
// owns the goroutine.
func (f *File) Watch(ctx context.Context, interval time.Duration) error {
	if interval <= 0 {
		interval = time.Second
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		f.poll(ctx, interval)
	}
}

// poll is one tick of Watch.
func (f *File) poll(ctx context.Context, interval time.Duration) {
	f.refresh()
	if f.Pending() == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, max(interval, 100*time.Millisecond))
	defer cancel()
	f.writeMu <- struct{}{}
	defer f.unlockWrite()
	n := f.Pending()
	err := f.flushLocked(ctx)
	switch {
	case err != nil && !f.failing:
		f.log.Warn("blocklist write failed, will retry", slog.String("path", f.path), slog.Int("pending", n), slog.Any("error", err))
	case err != nil:
		f.log.Debug("blocklist write failed again", slog.String("path", f.path), slog.Int("pending", n), slog.Any("error", err))
	case f.failing:
		f.log.Info("blocklist written after failures", slog.String("path", f.path), slog.Int("changes", n))
	}
	f.failing = err != nil
}

// refresh reloads the file if it changed since it was last read or
// written. It logs a failure once, and the recovery.
func (f *File) refresh() {
	f.writeMu <- struct{}{}
	defer f.unlockWrite()
	err := f.refreshLocked()
	switch {
	case err != nil && !f.broken:
		f.log.Warn("blocklist check failed", slog.String("path", f.path), slog.Any("error", err))
	case err != nil:
		f.log.Debug("blocklist check failed again", slog.String("path", f.path), slog.Any("error", err))
	case f.broken:
		f.log.Info("blocklist check works again", slog.String("path", f.path))
	}
	f.broken = err != nil
}

func (f *File) refreshLocked() error {
	fi, err := os.Stat(f.path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if f.stamp.exists {
			f.install(document{}, stamp{}, loadOutside)
		}
		return nil
	case err != nil:
		return fmt.Errorf("blocklist %s: %w", f.path, err)
	case f.stamp.sameStat(fi) && !f.stamp.racy:
		return nil
	}
	data, st, err := f.read()
	if err != nil {
		return err
	}
	if st.exists == f.stamp.exists && st.hash == f.stamp.hash {
		f.stamp = st // same content, newer stat data
		return nil
	}
	f.install(parseDocument(data), st, loadOutside)
	return nil
}

// read returns the file's content and stamp; a missing file is empty.
func (f *File) read() (string, stamp, error) {
	start := time.Now()
	fd, err := os.OpenFile(f.path, os.O_RDONLY|oNoFollow, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return "", stamp{}, nil
	}
	if isLinkError(err) {
		return "", stamp{}, fmt.Errorf("blocklist %s: is a symbolic link, which rcptguard does not follow; fix: replace it with the file itself", f.path)
	}
	if err != nil {
		return "", stamp{}, fmt.Errorf("blocklist %s: %w", f.path, err)
	}
	defer fd.Close()
	var b strings.Builder
	if fi, err := fd.Stat(); err == nil && fi.Size() > 0 && fi.Size() < 1<<30 {
		b.Grow(int(fi.Size()) + 1)
	}
	if _, err := io.Copy(&b, fd); err != nil {
		return "", stamp{}, fmt.Errorf("blocklist %s: read: %w", f.path, err)
	}
	// Stat after reading: a change during the read then shows as a
	// modification time inside racyWindow, and is caught by the hash
	// check on the next tick.
	fi, err := fd.Stat()
	if err != nil {
		return "", stamp{}, fmt.Errorf("blocklist %s: %w", f.path, err)
	}
	data := b.String()
	dev, ino := fileID(fi)
	return data, stamp{
		exists: true,
		size:   fi.Size(),
		mtime:  fi.ModTime().UnixNano(),
		dev:    dev,
		ino:    ino,
		hash:   maphash.String(f.seed, data),
		racy:   fi.ModTime().After(start.Add(-racyWindow)),
	}, nil
}

// loadKind says where content given to install comes from.
type loadKind int

const (
	loadOpen    loadKind = iota // the first load: log problems only
	loadOutside                 // read from disk: report changes by others
	loadOwn                     // just written by us: nothing to report
)

// install makes d the disk state, with pending changes applied on top, and
// records st as its stamp. For content changed by someone else, it logs the
// problems and the reload and calls OnChange. f.writeMu must be held.
func (f *File) install(d document, st stamp, how loadKind) {
	disk := make(map[string]Entry, len(d.entries))
	for _, e := range d.entries {
		disk[e.Identity] = e
	}
	f.mu.Lock()
	if how == loadOutside && f.onRemove != nil {
		if gone := f.goneLocked(disk); len(gone) > 0 {
			f.mu.Unlock()
			f.onRemove(gone) // Lookup still finds them
			f.mu.Lock()
		}
	}
	old := f.snap.Load().m
	f.disk = disk
	cur := f.publishLocked()
	f.mu.Unlock()
	changed := st.hash != f.stamp.hash || st.exists != f.stamp.exists
	f.stamp = st
	switch {
	case how == loadOpen:
		f.logProblems(d.problems)
		return
	case how == loadOwn || !changed:
		return
	}
	var added, removed []string
	for id := range cur {
		if _, ok := old[id]; !ok {
			added = append(added, id)
		}
	}
	for id := range old {
		if _, ok := cur[id]; !ok {
			removed = append(removed, id)
		}
	}
	slices.Sort(added)
	slices.Sort(removed)
	f.logProblems(d.problems)
	f.log.Info("blocklist reloaded", slog.String("path", f.path), slog.Int("entries", len(cur)),
		slog.Int("added", len(added)), slog.Int("removed", len(removed)), slog.Int("problems", len(d.problems)))
	if f.onChange != nil && (len(added) > 0 || len(removed) > 0) {
		f.changes = append(f.changes, change{added, removed})
	}
}

// goneLocked returns the identities Lookup finds now and would not with
// disk as the disk state, sorted. f.mu must be held.
func (f *File) goneLocked(disk map[string]Entry) []string {
	var gone []string
	for id := range f.snap.Load().m {
		if _, ok := disk[id]; ok {
			continue
		}
		if o, ok := f.pending[id]; ok && !o.remove {
			continue
		}
		gone = append(gone, id)
	}
	slices.Sort(gone)
	return gone
}

// change is a call of OnChange waiting for the locks to be released.
type change struct{ added, removed []string }

// lockWrite takes f.writeMu, or gives up when ctx ends.
func (f *File) lockWrite(ctx context.Context) error {
	select {
	case f.writeMu <- struct{}{}:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("blocklist %s: waiting for a write in progress: %w", f.path, ctx.Err())
	}
}

// unlockWrite releases f.writeMu and then calls OnChange for the changes
// noticed while it was held.
func (f *File) unlockWrite() {
	changes := f.changes
	f.changes = nil
	<-f.writeMu
	for _, c := range changes {
		f.onChange(c.added, c.removed)
	}
}

func (f *File) logProblems(ps []Problem) {
	for i, p := range ps {
		if i == maxLoggedProblems {
			f.log.Warn("blocklist has more bad lines", slog.String("path", f.path), slog.Int("more", len(ps)-i))
			return
		}
		f.log.Warn("blocklist line skipped", slog.String("path", f.path), slog.Int("line", p.Line), slog.String("error", p.Err), slog.String("text", p.Text))
	}
}

// publishLocked stores the disk state with pending changes applied as the
// snapshot Lookup reads, and returns its map. f.mu must be held.
func (f *File) publishLocked() map[string]Entry {
	m := f.disk
	if len(f.pending) > 0 {
		m = make(map[string]Entry, len(f.disk)+len(f.pending))
		for id, e := range f.disk {
			m[id] = e
		}
		for id, o := range f.pending {
			if o.remove {
				delete(m, id)
			} else {
				m[id] = o.entry
			}
		}
	}
	f.snap.Store(&snapshot{m: m})
	return m
}

// staleTempAge is how old a temporary file of ours must be before Open
// removes it: a write in progress in another process is never that slow.
const staleTempAge = time.Minute

// removeStaleTemps deletes temporary files that a process killed in the
// middle of a write left behind (the file itself is never damaged: the
// temporary file is renamed over it only when complete).
func (f *File) removeStaleTemps() {
	pattern := filepath.Join(filepath.Dir(f.path), "."+filepath.Base(f.path)+".tmp-*")
	names, err := filepath.Glob(pattern)
	if err != nil {
		return
	}
	for _, n := range names {
		fi, err := os.Lstat(n)
		if err != nil || !fi.Mode().IsRegular() || time.Since(fi.ModTime()) < staleTempAge {
			continue
		}
		if err := os.Remove(n); err == nil {
			f.log.Info("blocklist temporary file removed, left by an interrupted write", slog.String("path", n))
		}
	}
}

// writeAtomic replaces the file at path with data (package atomicfile)
// and syncs the directory. It returns the stamp of the new file (without
// hash).
func writeAtomic(path, data string) (st stamp, err error) {
	// Postfix (and `rcptguard list` run by anyone) must be able to read it.
	fi, err := atomicfile.Write(path, "."+filepath.Base(path)+".tmp-*", 0o644, []byte(data))
	if err != nil {
		return st, err
	}
	dev, ino := fileID(fi)
	st = stamp{exists: true, size: fi.Size(), mtime: fi.ModTime().UnixNano(), dev: dev, ino: ino, racy: true}
	if err = atomicfile.SyncDir(filepath.Dir(path)); err != nil {
		// The file is in place but may not survive a crash. Say so; the
		// changes stay pending, and the next write finds them on disk.
		return st, fmt.Errorf("sync directory: %w", err)
	}
	return st, nil
}
