// Package blocklist owns rcptguard's blocklist file: it parses it, keeps an
// in-memory copy for fast lookups, writes changes atomically under a lock,
// and reloads the file when someone else changes it.
//
// The file is a Postfix access(5) table with one entry a line:
//
//	# comment
//	user@example.com<TAB>HOLD compromised account, ticket 4711
//
// so it can be used as is with
//
//	smtpd_recipient_restrictions = check_sasl_access texthash:/var/lib/rcptguard/blocklist, ...
//
// and `cut -f1` lists the blocked identities. Identities are compared case
// insensitively and stored in lower case, as Postfix does for texthash keys.
//
// Every change is a read-modify-write under an exclusive write lock on the
// file PATH.lock (an open file description fcntl lock on Linux, flock(2)
// elsewhere; the lock file is mode 0660, and the lock needs it open for
// writing, so no other user can take it): the file on disk is read again, the change is applied, and
// the result is written to a temporary file in the same directory, synced,
// renamed over the table and the directory is synced. So the daemon and a
// concurrent `rcptguard block` or `rcptguard unblock` never lose each
// other's entries, and Postfix never sees a half-written table. Comments,
// lines this package does not understand and entries nobody asked to change
// are kept verbatim and in place; a removed entry's line goes, a new entry
// is appended. Like Postfix, the parser also accepts spaces between
// identity and action, but lines written here always use a TAB. Bad lines
// are reported with their line numbers and skipped, never fatal.
//
// When a write fails (read-only file system, disk full), the change is still
// applied in memory, so [File.Lookup] reflects it at once, and it is written
// by the next successful write or [File.Flush]. [File.Watch] notices outside
// edits and retries pending writes.
//
// The package must not know why an entry was added: the caller supplies the
// action and the text, and nothing else about identities, limits or reports
// lives here.
package blocklist
