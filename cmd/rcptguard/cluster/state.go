package cluster

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// stateSuffix names the file, beside the blocklist, where a server keeps
// its last agreement with the fleet across restarts.
const stateSuffix = ".cluster"

// stateEvery is how often the agreement is saved while nothing changes.
const stateEvery = time.Minute

// syncState is a server's last agreement with the fleet: the data set
// (epoch) and when (unix ms), and the blocklist file as it was then.
type syncState struct {
	Epoch  string
	Synced int64 // unix ms
	Size   int64 // the file's size and modification time then
	ModNS  int64
}

// matches reports whether fi is the file as it was at the agreement.
func (st syncState) matches(fi os.FileInfo) bool {
	return st.Synced > 0 && fi.Size() == st.Size && fi.ModTime().UnixNano() == st.ModNS
}

// loadSyncState reads the state file at path; a missing or unreadable one
// is no agreement at all.
func loadSyncState(path string) syncState {
	b, err := os.ReadFile(path)
	if err != nil || len(b) > 4096 {
		return syncState{}
	}
	var st syncState
	for line := range strings.Lines(string(b)) {
		k, v, _ := strings.Cut(strings.TrimSpace(line), " ")
		switch k {
		case "epoch":
			st.Epoch = v
		case "synced":
			st.Synced, _ = strconv.ParseInt(v, 10, 64)
		case "file":
			size, mod, _ := strings.Cut(v, " ")
			st.Size, _ = strconv.ParseInt(size, 10, 64)
			st.ModNS, _ = strconv.ParseInt(mod, 10, 64)
		}
	}
	if st.Epoch == "" || st.Synced <= 0 {
		return syncState{}
	}
	return st
}

// write saves st at path, atomically.
func (st syncState) write(path string) error {
	text := fmt.Sprintf("# rcptguard: this server's last agreement with the fleet's blocklist in Redis\nepoch %s\nsynced %d\nfile %d %d\n",
		st.Epoch, st.Synced, st.Size, st.ModNS)
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	_, err = f.WriteString(text)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		_ = os.Remove(f.Name())
	}
	return err
}

// saveState records that the file agrees with the fleet's version v now,
// and saves it when the epoch or the file changed, or stateEvery passed.
func (s *Sync) saveState(v version, changed bool) {
	now := s.c.now()
	prev := s.state
	st := syncState{Epoch: v.epoch, Synced: now.UnixMilli()}
	var fi os.FileInfo
	if s.path != "" {
		fi, _ = os.Stat(s.path)
	}
	if fi != nil {
		st.Size, st.ModNS = fi.Size(), fi.ModTime().UnixNano()
	}
	s.state = st
	if fi == nil {
		return // kept in memory only
	}
	if !changed && prev.Epoch == st.Epoch && prev.Size == st.Size && prev.ModNS == st.ModNS &&
		now.Sub(time.UnixMilli(prev.Synced)) < stateEvery {
		s.state.Synced = prev.Synced // as on disk, so that a restart sees the same
		return
	}
	if err := st.write(s.path + stateSuffix); err != nil {
		s.log.Warn("cluster state not saved", slog.String("path", s.path+stateSuffix), slog.Any("error", err))
	}
}
