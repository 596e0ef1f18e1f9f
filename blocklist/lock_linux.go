package blocklist

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// tryLock takes an open file description (OFD) write lock on the whole of
// fd's file without waiting. It needs fd open for writing. Unlike flock(2),
// it works on NFS; unlike classic POSIX locks, it belongs to the open file,
// not to the process, so two Files in one process exclude each other.
func tryLock(fd *os.File) error {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 0, Len: 0}
	return unix.FcntlFlock(fd.Fd(), unix.F_OFD_SETLK, &lk)
}

func unlockFD(fd *os.File) error {
	lk := unix.Flock_t{Type: unix.F_UNLCK, Whence: 0, Start: 0, Len: 0}
	return unix.FcntlFlock(fd.Fd(), unix.F_OFD_SETLK, &lk)
}

// Bounds of lockHolder's search: it runs when a wait for the lock gives
// up, which for the daemon can be every second while a process sits on
// the lock, so it looks at most once per holderScanEvery and for at most
// holderScanBudget.
const (
	maxHolderScan    = 100000
	holderScanEvery  = 30 * time.Second
	holderScanBudget = 250 * time.Millisecond
)

// lastHolderScan is when lockHolder last searched, in UnixNano.
var lastHolderScan atomic.Int64

// lockHolder names the process holding the lock on fd's file, as
// "pid N (command)", or returns "". F_OFD_GETLK and /proc/locks give no pid
// for OFD locks, so it looks for a descriptor of the file whose fdinfo
// lists the lock; it can only see the processes this user may inspect.
// Within holderScanEvery of its last search it returns "" at once.
func lockHolder(fd *os.File) string {
	now := time.Now()
	last := lastHolderScan.Load()
	if now.UnixNano()-last < int64(holderScanEvery) || !lastHolderScan.CompareAndSwap(last, now.UnixNano()) {
		return ""
	}
	deadline := now.Add(holderScanBudget)
	var st unix.Stat_t
	if err := unix.Fstat(int(fd.Fd()), &st); err != nil {
		return ""
	}
	// fdinfo's lock lines show the file as MAJOR:MINOR:INODE, in hex, hex, decimal.
	id := fmt.Sprintf(" %02x:%02x:%d ", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	self := os.Getpid()
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return ""
	}
	for i, p := range procs {
		if i > maxHolderScan || time.Now().After(deadline) {
			break
		}
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		fds, err := os.ReadDir(filepath.Join("/proc", p.Name(), "fdinfo"))
		if err != nil {
			continue
		}
		for _, f := range fds {
			if pid == self && f.Name() == strconv.Itoa(int(fd.Fd())) {
				continue
			}
			b, err := os.ReadFile(filepath.Join("/proc", p.Name(), "fdinfo", f.Name()))
			if err != nil {
				continue
			}
			for line := range strings.SplitSeq(string(b), "\n") {
				if strings.HasPrefix(line, "lock:") && strings.Contains(line, "WRITE") && strings.Contains(line, id) {
					comm, _ := os.ReadFile(filepath.Join("/proc", p.Name(), "comm"))
					return fmt.Sprintf("pid %d (%s)", pid, printable(strings.TrimSpace(string(comm))))
				}
			}
		}
	}
	return ""
}

// printable replaces what is not printable ASCII in s: a command name is
// chosen by whoever started the process.
func printable(s string) string {
	return strings.Map(func(r rune) rune {
		if r < ' ' || r > '~' {
			return '?'
		}
		return r
	}, s)
}
