// Package detector is the policy service side of rcptguard: it speaks the
// Postfix policy delegation protocol and decides, request by request,
// whether an authenticated sender is mailing addresses that do not exist.
//
// The package owns:
//
//   - the Postfix policy protocol (policy.go): reading one request of
//     "name=value" lines ended by an empty line, within limits on line
//     length, attribute count and request size (ReadRequest), and writing
//     the "action=..." answer so that nothing in it can split the answer
//     (WriteAction);
//   - the server loop (server.go): listeners on TCP or a Unix socket, one
//     goroutine per Postfix connection answering its requests in order,
//     idle and per-request timeouts, a cap on connections (the one idle
//     longest makes room; per peer too), graceful shutdown, and a Handler
//     that is never allowed to crash the daemon;
//   - who may connect (peer.go): the local user behind every connection,
//     by SO_PEERCRED on unix sockets and by the owner of the client's
//     socket on TCP (sock_diag, /proc/net/tcp), checked against the
//     allowed users; remote clients by network. Others are closed unread;
//   - the sender identity: the SASL user name, or the client address for
//     unauthenticated clients inside the relay networks;
//   - the sliding-window limiter counting distinct invalid recipients per
//     identity;
//   - the decision that ties them together, ending in "DUNNO" or in the
//     configured block action such as "HOLD".
//
// The package must not know how recipients are verified (DNS, SMTP
// callouts, the verdict cache) nor how the blocklist file or the abuse
// reports are written. It defines the small interfaces it consumes, and
// cmd/rcptguard plugs the callout, blocklist and notify packages into them.
//
// # Protocol
//
// Postfix smtpd, configured with check_policy_service, keeps a connection
// to the service open and sends one request per SMTP command it checks
// (for rcptguard: one per RCPT TO), waiting for the answer before it sends
// the next:
//
//	request=smtpd_access_policy
//	protocol_state=RCPT
//	sasl_username=alice
//	recipient=bob@example.net
//	...
//	<empty line>
//
// and the service answers with one action line and an empty line:
//
//	action=DUNNO
//	<empty line>
//
// Postfix escapes nothing: values are taken as untrusted bytes. Input that
// breaks the protocol or its limits closes the connection without an
// answer; Postfix then applies the default_action of the
// check_policy_service, which for rcptguard is DUNNO.
package detector
