package queue

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	ident "github.com/rcptguard/rcptguard/blocklist/identity"
)

// Config configures a [Queue].
type Config struct {
	// PostfixConfig is the Postfix configuration directory passed to the
	// commands with -c; "" uses Postfix's default (/etc/postfix).
	PostfixConfig string
	// Timeout bounds each run of a Postfix command; 0 means 30s.
	Timeout time.Duration
	// Now is the clock for ages and windows; nil means time.Now.
	Now func() time.Time
}

// Queue runs Postfix's queue commands. It needs root: postsuper and
// postcat read and change the queue directory, which only root and the
// postfix user may.
type Queue struct {
	confDir string
	timeout time.Duration
	now     func() time.Time
	progs   map[string]string
}

// programs are the Postfix commands a Queue runs.
var programs = []string{"postqueue", "postcat", "postsuper"}

// programDirs are searched for them after $PATH: they live in /usr/sbin,
// which a non-login PATH may lack.
var programDirs = []string{"/usr/sbin", "/usr/bin", "/sbin", "/bin"}

// New finds the Postfix commands and checks the configuration directory.
func New(cfg Config) (*Queue, error) {
	q := &Queue{confDir: cfg.PostfixConfig, timeout: cfg.Timeout, now: cfg.Now, progs: map[string]string{}}
	if q.timeout <= 0 {
		q.timeout = 30 * time.Second
	}
	if q.now == nil {
		q.now = time.Now
	}
	if q.confDir != "" {
		if !filepath.IsAbs(q.confDir) {
			return nil, fmt.Errorf("queue: Postfix configuration directory %q is not an absolute path", q.confDir)
		}
		if _, err := os.Stat(filepath.Join(q.confDir, "main.cf")); err != nil {
			return nil, fmt.Errorf("queue: Postfix configuration directory: %w", err)
		}
	}
	for _, p := range programs {
		path := lookPath(p)
		if path == "" {
			return nil, fmt.Errorf("queue: %s not found (is Postfix installed?)", p)
		}
		q.progs[p] = path
	}
	return q, nil
}

func lookPath(name string) string {
	for _, dir := range programDirs {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p
		}
	}
	if p, err := exec.LookPath(name); err == nil && filepath.IsAbs(p) {
		return p
	}
	return ""
}

// errOutputCap stops reading a command's output past its cap.
var errOutputCap = errors.New("output cap reached")

// cappedBuffer keeps the first max bytes written to it and then fails,
// which ends the copy from the command (it gets SIGPIPE or EPIPE); with
// swallow set it discards the rest instead.
type cappedBuffer struct {
	buf     bytes.Buffer
	max     int
	swallow bool
}

func (c *cappedBuffer) Write(p []byte) (int, error) {
	if room := c.max - c.buf.Len(); len(p) > room {
		c.buf.Write(p[:max(room, 0)])
		if c.swallow {
			return len(p), nil
		}
		return max(room, 0), errOutputCap
	}
	return c.buf.Write(p)
}

// run runs a Postfix command with the configuration directory, a clean
// environment and a deadline; stdin may be nil. It returns at most maxOut
// bytes of standard output; truncated tells whether there was more.
func (q *Queue) run(ctx context.Context, prog string, stdin io.Reader, maxOut int, args ...string) (out []byte, truncated bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, q.timeout)
	defer cancel()
	if q.confDir != "" {
		args = append([]string{"-c", q.confDir}, args...)
	}
	cmd := exec.CommandContext(ctx, q.progs[prog], args...)
	// A clean environment: no MAIL_CONFIG or other variable of the
	// caller's changes what the command does.
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C"}
	cmd.Stdin = stdin
	stdout := &cappedBuffer{max: maxOut}
	stderr := &cappedBuffer{max: 4096, swallow: true}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	err = cmd.Run()
	truncated = errors.Is(err, errOutputCap)
	if truncated {
		return stdout.buf.Bytes(), true, nil
	}
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("timed out after %s", q.timeout)
		}
		msg := strings.TrimSpace(printable(stderr.buf.String(), 300))
		return stdout.buf.Bytes(), false, fmt.Errorf("%s: %w: %s", prog, err, msg)
	}
	return stdout.buf.Bytes(), false, nil
}

// Message is one message in the queue.
type Message struct {
	Queue      string // "hold", "incoming", "active", "deferred"
	ID         string
	Arrival    time.Time
	Size       int64
	Recipients int    // recipients not delivered yet
	Sender     string // envelope sender, chosen by the client: only for display
	Identity   string // SASL login from the queue file; "" unknown
	Subject    string // raw; print through Printable
}

// maxQueueListing bounds the output of postqueue -j read (about 100,000
// messages of a few recipients each).
const maxQueueListing = 256 << 20

// List returns the messages in the queue as "postqueue -j" shows them,
// without Identity and Subject. Lines that are not a well-formed entry
// with a valid queue ID are skipped and counted in bad.
func (q *Queue) List(ctx context.Context) (msgs []Message, bad int, err error) {
	out, truncated, err := q.run(ctx, "postqueue", nil, maxQueueListing, "-j")
	if err != nil {
		return nil, 0, err
	}
	if truncated {
		return nil, 0, fmt.Errorf("postqueue -j: more than %d bytes of output", maxQueueListing)
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 64<<10), 64<<20)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		var e struct {
			QueueName   string            `json:"queue_name"`
			QueueID     string            `json:"queue_id"`
			ArrivalTime int64             `json:"arrival_time"`
			MessageSize int64             `json:"message_size"`
			Sender      string            `json:"sender"`
			Recipients  []json.RawMessage `json:"recipients"`
		}
		if json.Unmarshal(line, &e) != nil || !ValidID(e.QueueID) || !knownQueue(e.QueueName) {
			bad++
			continue
		}
		msgs = append(msgs, Message{
			Queue: e.QueueName, ID: e.QueueID, Arrival: time.Unix(e.ArrivalTime, 0),
			Size: e.MessageSize, Recipients: len(e.Recipients), Sender: e.Sender,
		})
	}
	if err := sc.Err(); err != nil {
		return nil, 0, fmt.Errorf("postqueue -j: %w", err)
	}
	return msgs, bad, nil
}

// maxEnvelope bounds the postcat -e output read: the sender record comes
// within the first few hundred bytes.
const maxEnvelope = 64 << 10

// Envelope reads queue file id's envelope with "postcat -e -q ID".
func (q *Queue) Envelope(ctx context.Context, id string) (Envelope, error) {
	if !ValidID(id) {
		return Envelope{}, describe(id, errors.New("not a Postfix queue ID"))
	}
	out, _, err := q.run(ctx, "postcat", nil, maxEnvelope, "-e", "-q", id)
	if err != nil {
		return Envelope{}, describe(id, err)
	}
	env, err := ParseEnvelope(out, id)
	if err != nil {
		return env, describe(id, err)
	}
	return env, nil
}

// maxHeader bounds the postcat -h output read for the Subject.
const maxHeader = 256 << 10

// Subject reads queue file id's Subject with "postcat -h -q ID".
func (q *Queue) Subject(ctx context.Context, id string) (string, error) {
	if !ValidID(id) {
		return "", describe(id, errors.New("not a Postfix queue ID"))
	}
	out, _, err := q.run(ctx, "postcat", nil, maxHeader, "-h", "-q", id)
	if err != nil {
		return "", describe(id, err)
	}
	return ParseSubject(out), nil
}

// Filter selects messages for Find.
type Filter struct {
	Identity string    // "" for every message with a SASL login
	Queues   []string  // nil for every queue
	Since    time.Time // zero for any arrival time
	Subject  bool      // also read each message's Subject
}

// postcatWorkers bounds the postcat commands run at once.
const postcatWorkers = 4

// Find lists the queue and returns the messages that f selects, with their
// Identity read from each queue file, oldest first. A message whose queue
// file cannot be read or attributed (gone meanwhile, ambiguous) is left
// out; problems counts those that were not simply gone.
func (q *Queue) Find(ctx context.Context, f Filter) (found []Message, problems []error, err error) {
	all, bad, err := q.List(ctx)
	if err != nil {
		return nil, nil, err
	}
	if bad > 0 {
		problems = append(problems, fmt.Errorf("postqueue -j: %d malformed entries skipped", bad))
	}
	var cand []Message
	for _, m := range all {
		if f.Queues != nil && !slices.Contains(f.Queues, m.Queue) {
			continue
		}
		if !f.Since.IsZero() && m.Arrival.Before(f.Since.Truncate(time.Second)) {
			continue
		}
		cand = append(cand, m)
	}
	var (
		mu   sync.Mutex
		wg   sync.WaitGroup
		next = make(chan int)
	)
	for range min(postcatWorkers, len(cand)) {
		wg.Go(func() {
			for i := range next {
				m := &cand[i]
				env, err := q.Envelope(ctx, m.ID)
				if err == nil && f.Subject && env.Identity != "" {
					m.Subject, err = q.Subject(ctx, m.ID)
				}
				mu.Lock()
				if err != nil {
					if !strings.Contains(err.Error(), "No such file") && !strings.Contains(err.Error(), "not found") {
						problems = append(problems, err)
					}
				} else {
					m.Identity = env.Identity
					m.Queue = env.Queue
				}
				mu.Unlock()
			}
		})
	}
feed:
	for i := range cand {
		select {
		case next <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	if ctx.Err() != nil {
		return nil, problems, ctx.Err()
	}
	for _, m := range cand {
		if m.Identity == "" || (f.Identity != "" && !SameIdentity(m.Identity, f.Identity)) {
			continue
		}
		found = append(found, m)
	}
	slices.SortFunc(found, func(a, b Message) int {
		if c := a.Arrival.Compare(b.Arrival); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return found, problems, nil
}

// SameIdentity compares identities as the blocklist does: ASCII letters
// without regard to case, every other byte as it is (the one identity
// rule; Unicode folding would match a login the blocklist keeps apart,
// such as the Kelvin sign's "\u212Aelly@x" and "kelly@x").
func SameIdentity(a, b string) bool {
	return ident.Fold(a) == ident.Fold(b)
}

// Op is a postsuper operation on queue IDs.
type Op string

// The operations.
const (
	OpHold    Op = "-h" // move to the hold queue
	OpRelease Op = "-H" // release from the hold queue
	OpDelete  Op = "-d" // delete
)

// Apply runs "postsuper OP - QUEUE..." with ids on standard input, one a
// line, so that no ID is ever an argument; queues limit the operation to
// those queues (none: every queue). Every ID and queue name is checked
// first. postsuper skips IDs that are not (or no longer) in those queues.
func (q *Queue) Apply(ctx context.Context, op Op, ids []string, queues ...string) error {
	switch op {
	case OpHold, OpRelease, OpDelete:
	default:
		return fmt.Errorf("queue: unknown operation %q", op)
	}
	if len(ids) == 0 {
		return nil
	}
	if err := checkIDs(ids); err != nil {
		return err
	}
	for _, name := range queues {
		if !knownQueue(name) {
			return fmt.Errorf("queue: unknown queue %q", printable(name, 40))
		}
	}
	in := strings.Join(ids, "\n") + "\n"
	args := append([]string{string(op), "-"}, queues...)
	if _, _, err := q.run(ctx, "postsuper", strings.NewReader(in), 64<<10, args...); err != nil {
		return err
	}
	return nil
}

// ActiveQueues are the queues of messages not delivered and not held:
// the retroactive hold looks there.
var ActiveQueues = []string{"incoming", "active", "deferred"}

// HoldIdentity puts on hold identity's messages in ActiveQueues that
// arrived at or after since, matched by each queue file's sasl_username.
// It returns the messages that are in the hold queue afterwards.
func (q *Queue) HoldIdentity(ctx context.Context, identity string, since time.Time) (held []Message, problems []error, err error) {
	found, problems, err := q.Find(ctx, Filter{Identity: identity, Queues: ActiveQueues, Since: since, Subject: true})
	if err != nil || len(found) == 0 {
		return nil, problems, err
	}
	moved, err := q.applyAndCheck(ctx, OpHold, found, "hold", ActiveQueues...)
	return moved, problems, err
}

// Release releases msgs from the hold queue and returns those that left
// it.
func (q *Queue) Release(ctx context.Context, msgs []Message) ([]Message, error) {
	return q.applyAndCheck(ctx, OpRelease, msgs, "", "hold")
}

// Delete deletes msgs from the hold queue and returns those that are
// gone.
func (q *Queue) Delete(ctx context.Context, msgs []Message) ([]Message, error) {
	return q.applyAndCheck(ctx, OpDelete, msgs, "", "hold")
}

// applyAndCheck applies op to msgs in queues, then lists the queue and
// returns the messages now in the queue want ("": in no queue, or out of
// queues).
func (q *Queue) applyAndCheck(ctx context.Context, op Op, msgs []Message, want string, queues ...string) ([]Message, error) {
	ids := make([]string, len(msgs))
	for i, m := range msgs {
		ids[i] = m.ID
	}
	if err := q.Apply(ctx, op, ids, queues...); err != nil {
		return nil, err
	}
	after, _, err := q.List(ctx)
	if err != nil {
		return nil, err
	}
	where := map[string]string{}
	for _, m := range after {
		where[m.ID] = m.Queue
	}
	var done []Message
	for _, m := range msgs {
		in, ok := where[m.ID]
		switch {
		case want != "" && in == want:
			m.Queue = in
			done = append(done, m)
		case want == "" && (!ok || !slices.Contains(queues, in)):
			m.Queue = in
			done = append(done, m)
		}
	}
	return done, nil
}
