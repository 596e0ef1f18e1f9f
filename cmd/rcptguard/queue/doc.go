// Package queue operates on Postfix's mail queue for rcptguard's held-mail
// commands: it lists the queue (postqueue -j), tells whose message a queue
// file is by the SASL login Postfix recorded in it (postcat -e, the
// sasl_username named attribute), and holds, releases or deletes messages
// (postsuper -h/-H/-d, queue IDs fed on standard input).
//
// A message is attributed to an identity by the queue file's own
// sasl_username, never by its envelope sender, which the sender chooses.
// Everything the Postfix commands print is treated as hostile: reads are
// bounded, nothing goes through a shell, every queue ID is checked against
// Postfix's two ID formats before it is used, and a queue file whose
// envelope does not show exactly one sasl_username before its sender
// record is nobody's.
//
// The package also holds the privilege split of the retroactive hold: the
// unprivileged daemon drops a request naming a blocked identity in a
// directory ([Requester]); a root-run one-shot command, started by a
// systemd path unit, takes the requests ([TakeRequests]) and holds that
// identity's recent messages ([Queue.HoldIdentity]) after checking that
// the identity is blocked. Release and delete are never done on request.
// What it held goes back as a result file ([WriteResult]) into a
// directory the daemon owns ([ResultsDir]); the daemon takes it
// ([TakeResults]) and reports it to the abuse desk.
//
// Only cmd/rcptguard imports this package.
package queue
