#!/usr/bin/env bash
# compare.sh: rcptguard against the bare policy server and postfwd, over
# loopback, at 1, 8 and 64 policy connections, and one table of the results.
#
#   test/bench/compare.sh [-d DURATION] [-w WARMUP] [-r ROUNDS] [-c "1 8 64"]
#                         [-l LEVEL] [-u DOMAINS] [-P] [-j FILE]
#
#   -d  measured time of each run (default 3s)
#   -w  unmeasured warm-up before it (default 1s)
#   -r  rounds: every scenario runs once per round, interleaved (default 3)
#   -c  connection counts (default "1 8 64")
#   -l  rcptguard's log.level (default warn: no line per decision; info: one)
#   -u  recipient domains in the uncached scenario (default 1)
#   -P  leave postfwd out
#   -j  also write every run's JSON report to FILE, one a line (the input of
#       `rcptguard-bench table`)
#
# Scenarios, each driven by `rcptguard-bench load` (one request at a time per
# connection, Postfix 3.x's 31 attributes, 10,000 SASL identities, 10 %
# unknown recipients):
#   baseline   `rcptguard-bench baseline`: reads a request, answers DUNNO
#   cached     rcptguard (`rcptguard-bench world`), every verdict cached
#   blocked    rcptguard, every identity on the blocklist (HOLD answers)
#   uncached   rcptguard, every recipient new: one SMTP probe each against
#              the world's in-process MX (a fresh world per run)
#   postfwd    Debian's postfwd2 with a per-SASL-user rate limit
# The table shows, per scenario and connection count, the round with the
# median requests/s; ratios are to the baseline at the same connection count
# in the same round (median over the rounds): absolute figures on a shared
# machine drift, ratios much less. Everything listens on 127.0.0.1 and every
# run is bounded in time; with the defaults the script takes about 4 minutes.
set -euo pipefail

duration=3s warmup=1s rounds=3 conns_list="1 8 64" level=warn udomains=1 use_postfwd=1 json_out=""
while getopts "d:w:r:c:l:u:Pj:h" opt; do
	case $opt in
	r) rounds=$OPTARG ;;
	d) duration=$OPTARG ;;
	w) warmup=$OPTARG ;;
	c) conns_list=$OPTARG ;;
	l) level=$OPTARG ;;
	u) udomains=$OPTARG ;;
	P) use_postfwd=0 ;;
	j) json_out=$OPTARG ;;
	*) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
	esac
done

repo=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d /tmp/rcptguard-compare.XXXXXX)
chmod 755 "$tmp"
# Processes this script started and has not stopped yet.
baseline_pid="" world_pid="" upid="" postfwd_master=""

# stop_tree PID: SIGTERM to PID and all its descendants (found by parent
# PID, never by name), then SIGKILL to what is left after 10 s.
descendants() {
	local p
	for p in $(pgrep -P "$1" 2>/dev/null || true); do
		descendants "$p"
		echo "$p"
	done
}
stop_tree() {
	local all
	all="$(descendants "$1") $1"
	# shellcheck disable=SC2086
	kill -TERM $all 2>/dev/null || true
	for _ in $(seq 100); do
		# shellcheck disable=SC2086
		kill -0 $all 2>/dev/null || return 0
		sleep 0.1
	done
	# shellcheck disable=SC2086
	kill -KILL $all 2>/dev/null || true
}
cleanup() {
	local p
	for p in "$upid" "$world_pid" "$baseline_pid" "$postfwd_master"; do
		if [ -n "$p" ]; then stop_tree "$p"; fi
	done
	wait 2>/dev/null || true
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

# jget KEY JSON: a numeric field of a load report (keys are unique in it).
jget() { sed -n "s/.*\"$1\":\([0-9.eE+-]*\).*/\1/p" <<<"$2"; }

echo "== building rcptguard-bench"
(cd "$repo" && go build -o "$tmp/rcptguard-bench" ./cmd/rcptguard-bench)
bench=$tmp/rcptguard-bench

# postfwd: Debian's package ships postfwd1 and postfwd2 (the "postfwd"
# alternative points at postfwd2, which keeps rate counters in its cache
# daemon, shared by its preforked policy processes).
postfwd=""
if [ "$use_postfwd" = 1 ]; then
	if ! command -v postfwd2 >/dev/null 2>&1 && [ ! -x /usr/sbin/postfwd2 ]; then
		echo "== installing postfwd from Debian"
		if [ "$(id -u)" = 0 ]; then
			export DEBIAN_FRONTEND=noninteractive
			# The package lists may be missing or stale: update once if the
			# first try fails.
			if ! timeout 600 apt-get install -y -q postfwd >"$tmp/apt.log" 2>&1; then
				if ! { timeout 300 apt-get update -q && timeout 600 apt-get install -y -q postfwd; } >>"$tmp/apt.log" 2>&1; then
					echo "postfwd could not be installed; going on without it:"
					tail -3 "$tmp/apt.log"
				fi
			fi
		else
			echo "postfwd is not installed and this is not root: going on without it"
		fi
	fi
	for p in postfwd2 /usr/sbin/postfwd2; do
		if command -v "$p" >/dev/null 2>&1; then postfwd=$(command -v "$p"); break; fi
	done
fi

echo "== machine"
echo "cpus:   $(nproc) × $(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)"
echo "kernel: $(uname -sr); $(go version | cut -d' ' -f3-)"
if [ -n "$postfwd" ]; then echo "postfwd: $("$postfwd" --version 2>/dev/null | head -1)"; fi

echo "== starting the servers"
# The bare server.
"$bench" baseline -listen 127.0.0.1:0 >"$tmp/baseline.out" 2>&1 &
baseline_pid=$!
baseline_addr=$(wait_listening "$tmp/baseline.out")
echo "baseline  $baseline_addr"

# rcptguard for the cached and blocked scenarios: one world, its blocklist
# holding the 10,000 blocked<N> identities; the cached scenario's user<N>
# identities are not on it.
mkdir -p "$tmp/world"
"$bench" world -dir "$tmp/world" -blocked 10000 -mailboxes 1000 -log-level "$level" -log "$tmp/world/rcptguard.log" \
	>"$tmp/world.out" 2>&1 &
world_pid=$!
world_addr=$(wait_listening "$tmp/world.out")
echo "rcptguard $world_addr (log.level $level)"

# postfwd with one rule: a per-SASL-user rate limit, 100 recipients an hour,
# counted per sasl_username (the request cache is off, so that every request
# goes through the rule and is counted; with it on, a repeated request would
# be answered from the cache without counting).
postfwd_addr=""
if [ -n "$postfwd" ]; then
	pf=$tmp/postfwd
	mkdir -p "$pf"
	cat >"$pf/postfwd.cf" <<'EOF'
id=RATE_SASL; protocol_state==RCPT; sasl_username=~.+
	action=rate(sasl_username/100/3600/421 4.7.1 too many recipients for $$sasl_username)
EOF
	user=$(id -un) group=$(id -gn)
	if [ "$(id -u)" = 0 ]; then
		user=nobody group=$(id -gn nobody 2>/dev/null || echo nogroup)
		chown "$user:$group" "$pf"
	fi
	# A free port below the ephemeral range: a port in it may be held by
	# one end of a connection, and postfwd then cannot bind it.
	port="" low=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
	for _ in $(seq 50); do
		p=$((10000 + RANDOM % (low - 10000)))
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && ! grep -qi ":$(printf '%04X' "$p") " /proc/net/tcp 2>/dev/null; then
			port=$p
			break
		fi
	done
	if [ -n "$port" ] && "$postfwd" --daemon --file "$pf/postfwd.cf" --interface 127.0.0.1 --port "$port" \
		--cache=0 --perfmon --pidfile "$pf/postfwd.pid" --cache_proto unix --cache_port "$pf/cache.sock" \
		--user "$user" --group "$group" --min_servers 10 --max_servers 100 >"$pf/out" 2>&1; then
		for _ in $(seq 300); do
			[ -s "$pf/postfwd.pid" ] && [ -S "$pf/cache.sock" ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
			sleep 0.1
		done
		postfwd_master=$(cat "$pf/postfwd.pid" 2>/dev/null || true)
		if [ -n "$postfwd_master" ] && [ -S "$pf/cache.sock" ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
			postfwd_addr=127.0.0.1:$port
			# The rule counts: one identity gets 421 after its 100th recipient.
			if check=$("$bench" load -target "$postfwd_addr" -conns 1 -duration 1s -warmup 0s -identities 1 -prime=false -json); then
				echo "postfwd   $postfwd_addr (rate check with one identity: $(jget DUNNO "$check") DUNNO, then $(jget '421' "$check") × 421)"
			else
				postfwd_addr=""
			fi
		fi
	fi
	if [ -z "$postfwd_addr" ]; then
		echo "postfwd did not start; going on without it"
		grep -v 'Redundant argument' "$pf/out" 2>/dev/null || true
		if [ -n "$postfwd_master" ]; then stop_tree "$postfwd_master"; postfwd_master=""; fi
	fi
fi

# Every run's report, tagged with its scenario and round, one JSON object a
# line; `rcptguard-bench table` makes the table from it.
results=$tmp/results.jsonl
: >"$results"

# run_load SCENARIO ROUND CONNS TARGET [load flags...]: one run; its report
# is left in $report (empty when the run failed).
report=""
run_load() {
	local name=$1 round=$2 conns=$3 target=$4
	shift 4
	if ! report=$("$bench" load -target "$target" -conns "$conns" -duration "$duration" -warmup "$warmup" -json "$@"); then
		echo "compare.sh: $name at $conns connections failed" >&2
		report=""
		return 0
	fi
	printf '  round %s  %-9s %3s conns  %9.0f req/s  p50 %7.0f µs  p99 %7.0f µs  errors %s\n' "$round" "$name" "$conns" \
		"$(jget requests_per_second "$report")" "$(jget p50 "$report")" "$(jget p99 "$report")" "$(jget error_total "$report")"
}
# record SCENARIO ROUND [NOTE]: add $report to the results.
record() {
	[ -n "$report" ] || return 0
	printf '{"scenario":"%s","round":%s,"note":"%s",%s\n' "$1" "$2" "${3:-}" "${report#\{}" >>"$results"
}

echo "== runs: $rounds rounds of ${duration} each after ${warmup} warm-up"
for round in $(seq "$rounds"); do
	for c in $conns_list; do
		run_load baseline "$round" "$c" "$baseline_addr" -prime=false && record baseline "$round"
		run_load cached "$round" "$c" "$world_addr" && record cached "$round"
		run_load blocked "$round" "$c" "$world_addr" -blocked-identities 10000 && record blocked "$round"
		# Uncached: a fresh world per run, so that the MX counts are this
		# run's and rcptguard's per-domain connection cap starts afresh.
		u=$tmp/uworld-$round-$c
		"$bench" world -dir "$u" -domains "$udomains" -log-level "$level" -log "$u.log" >"$u.out" 2>&1 &
		upid=$!
		uaddr=$(wait_listening "$u.out")
		run_load uncached "$round" "$c" "$uaddr" -unique-rcpts -domains "$udomains"
		stop_tree "$upid"
		wait "$upid" 2>/dev/null || true
		upid=""
		# What the MX saw for all the run's decisions, warm-up included:
		# RCPTs below decisions are verdicts that were not probed.
		mx=$(grep '^mx connections=' "$u.out" || true)
		note=""
		if [ -n "$mx" ] && [ -n "$report" ]; then
			mxconns=$(sed 's/.*connections=\([0-9]*\).*/\1/' <<<"$mx") txns=$(sed 's/.*transactions=\([0-9]*\).*/\1/' <<<"$mx")
			rcpts=$(sed 's/.*rcpts=\([0-9]*\).*/\1/' <<<"$mx") total=$(jget requests_total "$report")
			note="MX: $mxconns connections, $txns transactions, $rcpts RCPTs for $total decisions ($(awk -v r="$rcpts" -v d="$total" 'BEGIN{printf "%.0f", d ? 100*r/d : 0}') %)"
		fi
		record uncached "$round" "$note"
		if [ -n "$postfwd_addr" ]; then
			run_load postfwd "$round" "$c" "$postfwd_addr" -prime=false && record postfwd "$round"
		fi
	done
done
[ -z "$json_out" ] || cp "$results" "$json_out"

stop_tree "$world_pid"
wait "$world_pid" 2>/dev/null || true
world_pid=""

echo
echo "== results: $(nproc) CPUs ($(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)), load generator on the same machine;"
echo "   each run ${duration} after ${warmup} warm-up; rcptguard log.level $level"
echo
"$bench" table -versus cached/postfwd "$results"
echo
echo "cached and blocked scenarios' MX (priming included): $(grep '^mx connections=' "$tmp/world.out" || echo "no counts")"
