# lib.sh: shell functions the benchmark scripts share; sourced, not run.

# wait_listening FILE: the address of the first "listening ADDR" line a
# server writes to FILE, within 30 s; on failure FILE is shown and the
# caller's name ($0) says who waited.
wait_listening() {
	for _ in $(seq 300); do
		if grep -q '^listening ' "$1" 2>/dev/null; then
			awk '/^listening /{print $2; exit}' "$1"
			return 0
		fi
		sleep 0.1
	done
	echo "$(basename "$0"): no \"listening\" line in $1:" >&2
	cat "$1" >&2
	return 1
}
