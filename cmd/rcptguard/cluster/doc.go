// Package cluster lets several rcptguard servers judge as one through
// Redis ([cluster] in the configuration): it counts verdicts in Redis,
// one server-side script per verdict, so an identity is blocked at exactly
// limit+1 across the fleet and exactly one server acts on the crossing;
// it keeps the blocklist of every server in step, reading only what
// changed since the server last agreed (a change log kept beside the
// blocklist in Redis), and all of it now and then; and it shares what the
// verifiers learn (verdicts, catch-all and refusing-MX facts) and their
// probe caps.
//
// The client is github.com/redis/go-redis/v9: its universal client speaks
// to a single Redis, to Sentinel (master_name) and to Redis Cluster with
// the same code, it is the client the Redis project itself maintains,
// releases often and supports RESP3, TLS (rediss://) and unix sockets.
// rueidis is faster under heavy pipelining, which rcptguard does not need
// (a few calls per invalid verdict), at the cost of a larger API.
//
// Redis is never on the hot path of an answer that a server can give
// alone (a cached valid verdict, a known block), and never in the way of
// one: every call has a short deadline, and a server that cannot reach
// Redis counts locally (the detector's own Limiter), logs once and
// counts the failure in a metric, and leaves Redis alone for a second
// before trying again.
package cluster
