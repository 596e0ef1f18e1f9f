#!/usr/bin/env bash
# cluster.sh: cached-verdict throughput of rcptguard with [cluster] on,
# against the bare policy server and a single-host rcptguard in the same
# rounds, and one table of the results.
#
#   test/bench/cluster.sh [-r ROUNDS] [-d DURATION] [-w WARMUP] [-c "8 64"] [-i INVALID]
#
#   -r  rounds: every scenario runs once per round, interleaved (default 3)
#   -d  measured time of each run (default 3s)
#   -w  unmeasured warm-up before it (default 1s)
#   -c  connection counts (default "8 64")
#   -i  fraction of invalid recipients (default 0.1); each invalid verdict
#       is one Redis round trip, valid ones are batched
#
# Starts a redis-server (persistence off) on a free loopback port, the bare
# server (`rcptguard-bench baseline`), and two `rcptguard-bench world`s, one
# of them with -redis; each rcptguard gets one unmeasured 5 s load first, so
# that its priming probes are over before the rounds. Needs redis-server.
set -euo pipefail

rounds=3 duration=3s warmup=1s conns_list="8 64" invalid=0.1
while getopts "r:d:w:c:i:h" opt; do
	case $opt in
	r) rounds=$OPTARG ;;
	d) duration=$OPTARG ;;
	w) warmup=$OPTARG ;;
	c) conns_list=$OPTARG ;;
	i) invalid=$OPTARG ;;
	*) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
	esac
done
command -v redis-server >/dev/null || { echo "cluster.sh: redis-server is not installed" >&2; exit 1; }

repo=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d /tmp/rcptguard-cluster-bench.XXXXXX)
pids=()
cleanup() {
	local p
	for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

echo "== building rcptguard-bench"
(cd "$repo" && go build -o "$tmp/rcptguard-bench" ./cmd/rcptguard-bench)
bench=$tmp/rcptguard-bench

echo "== starting the servers"
port=""
for _ in $(seq 50); do
	p=$((20000 + RANDOM % 10000))
	if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then port=$p; break; fi
done
[ -n "$port" ] || { echo "cluster.sh: no free port for redis-server" >&2; exit 1; }
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$tmp" >"$tmp/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
"$bench" baseline -listen 127.0.0.1:0 >"$tmp/baseline.out" 2>&1 &
pids+=($!)
mkdir -p "$tmp/single" "$tmp/cluster"
"$bench" world -dir "$tmp/single" -log-level warn -log "$tmp/single.log" >"$tmp/single.out" 2>&1 &
pids+=($!)
"$bench" world -dir "$tmp/cluster" -log-level warn -log "$tmp/cluster.log" -redis "redis://127.0.0.1:$port/0" >"$tmp/cluster.out" 2>&1 &
pids+=($!)
baseline=$(wait_listening "$tmp/baseline.out")
single=$(wait_listening "$tmp/single.out")
cluster=$(wait_listening "$tmp/cluster.out")
echo "baseline $baseline, single host $single, cluster $cluster (redis 127.0.0.1:$port)"
for a in "$single" "$cluster"; do
	"$bench" load -target "$a" -conns 64 -duration 5s -warmup 1s -invalid "$invalid" >/dev/null
done
sleep 2

echo "== runs: $rounds rounds of ${duration} each after ${warmup} warm-up"
results=$tmp/results.jsonl
: >"$results"
for round in $(seq "$rounds"); do
	for c in $conns_list; do
		for s in "baseline $baseline -prime=false" "single $single" "cluster $cluster"; do
			read -r name addr extra <<<"$s"
			# shellcheck disable=SC2086
			report=$("$bench" load -target "$addr" -conns "$c" -duration "$duration" -warmup "$warmup" -invalid "$invalid" -json $extra)
			printf '{"scenario":"%s","round":%s,"note":"",%s\n' "$name" "$round" "${report#\{}" >>"$results"
			printf '  round %s  %-8s %3s conns  %9.0f req/s\n' "$round" "$name" "$c" \
				"$(sed -n 's/.*"requests_per_second":\([0-9.eE+-]*\).*/\1/p' <<<"$report")"
		done
	done
done
echo
"$bench" table -base baseline -versus cluster/baseline,single/baseline,cluster/single "$results"
