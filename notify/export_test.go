package notify

// SetSpoolFault makes every spool write or removal (op "write" or
// "remove") of m fail with what f returns for it, as a full or read-only
// disk would; nil f ends it. The spool writer also asks f (op "sync")
// before it syncs the directory for the files it has just placed.
func SetSpoolFault(m *Mailer, f func(op, name string) error) {
	if f == nil {
		m.spool.fault.Store(nil)
		return
	}
	m.spool.fault.Store(&f)
}
