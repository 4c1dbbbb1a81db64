#!/usr/bin/env bash
# Instructions per request of two builds of the server, measured in one run: see
# bench/README.md, "Instruction counts: two builds in one run".
#
#   OLD=/path/to/cliproxyapi [NEW=/path/to/cliproxyapi] bench/instructions.sh
#
# NEW defaults to this tree's release build (built here). ROUNDS (2) alternates the builds,
# DURATION (10s) is each measured wrk run, WARMUP (3s) the run before the counters are zeroed;
# CALLGRIND_KEEP=dir keeps the dumps there (for callgrind_annotate) instead of deleting them.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OLD:?set OLD to the server binary built before the change (and NEW, or this tree is built)}"
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-3s}
# Ports of their own, so a bench/run.sh running meanwhile does not answer in our place.
MOCK=127.0.0.1:18090; SRV_PORT=18327

command -v wrk >/dev/null && command -v valgrind >/dev/null || {
    apt-get update -qq && apt-get install -y -qq wrk valgrind >/dev/null
}
if [ -z "${NEW:-}" ]; then
    cargo build --release -q --bin cliproxyapi --example mock_upstream
    NEW=target/release/cliproxyapi
else
    cargo build --release -q --example mock_upstream
fi
OLD=$(realpath "$OLD"); NEW=$(realpath "$NEW")
for b in "$OLD" "$NEW"; do [ -x "$b" ] || { echo "not an executable: $b" >&2; exit 1; }; done

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# From bench/run.sh, which cannot be sourced (it runs the whole benchmark when read).
wait_port() { for _ in $(seq 1 "${2:-500}"); do (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0; sleep 0.01; done; echo "nothing listens on $1" >&2; return 1; }

add_credentials() { # $1: how many (the tokens bench/run.sh imports)
    python3 - "$1" "$SRV_PORT" <<'PY'
import json, sys, urllib.request
n, port = int(sys.argv[1]), sys.argv[2]
body = json.dumps([{"provider": "openai", "token": f"sk-bench-{i:06d}-abcdefghijklmnopqrstuvwxyz"} for i in range(n)]).encode()
req = urllib.request.Request(f"http://127.0.0.1:{port}/v0/management/auths/import", data=body, method="POST")
report = json.load(urllib.request.urlopen(req, timeout=120))
assert not report["errors"], report["errors"]
PY
}

target/release/examples/mock_upstream "$MOCK" & pids+=($!)
wait_port "$MOCK"

# One measurement: $1 binary, $2 name for its files; sets REQUESTS, IR and ERRORS.
# The server runs under callgrind from its start on a fresh database with bench/run.sh's 3
# credentials; after a warm-up the counters are zeroed, wrk runs, and the dump taken then holds
# exactly the instructions spent since the zero, in every thread of the server.
measure() {
    local home="$work/$2" url="http://127.0.0.1:$SRV_PORT/v1/chat/completions"
    mkdir -p "$home"
    cat > "$home/config.yaml" <<YAML
host: 127.0.0.1
port: $SRV_PORT
auth_dir: auths
logging: { level: warn, dir: logs }
providers:
  openai: { base_url: "http://$MOCK/v1" }
YAML
    valgrind --tool=callgrind --callgrind-out-file="$home/callgrind.%p" \
        "$1" --config "$home/config.yaml" >"$home/server.log" 2>&1 &
    local srv=$!
    pids+=($srv)
    # Callgrind runs the server many times slower (and the machine may be busy): up to 120 s.
    wait_port "127.0.0.1:$SRV_PORT" 12000 || { tail -20 "$home/server.log" >&2; return 1; }
    add_credentials 3
    wrk -t 2 -c 16 -d "$WARMUP" -s bench/post.lua "$url" >/dev/null
    callgrind_control -z "$srv" >/dev/null 2>&1
    local out; out=$(wrk -t 2 -c 16 -d "$DURATION" -s bench/post.lua "$url")
    sleep 0.5   # settlements of the last answers (they may land after the answer)
    callgrind_control -d "$srv" >/dev/null 2>&1
    local dumps=("$home/callgrind.$srv".*)   # listed now: the final dump at exit is not one
    [ -e "${dumps[0]}" ] || { echo "callgrind wrote no dump for $2" >&2; return 1; }
    kill "$srv"
    for _ in $(seq 1 600); do kill -0 "$srv" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$srv" 2>/dev/null || true
    wait "$srv" 2>/dev/null || true
    if [ -n "${CALLGRIND_KEEP:-}" ]; then
        mkdir -p "$CALLGRIND_KEEP"
        for d in "${dumps[@]}"; do cp "$d" "$CALLGRIND_KEEP/$2.${d##*/}"; done
    fi
    REQUESTS=$(echo "$out" | awk '/requests in/ {print $1}')
    # Answers that are not 200 and requests wrk gave up on cost instructions too, so the
    # figure is only comparable when both are 0.
    ERRORS=$(echo "$out" | awk '/Non-2xx/ {n+=$NF} /Socket errors/ {gsub(",", ""); n+=$4+$6+$8+$10} END {print n+0}')
    IR=$(awk '/^totals:/ {t+=$2} END {print t+0}' "${dumps[@]}")
}

echo
echo "OLD = $OLD"
echo "NEW = $NEW"
echo "callgrind, wrk at 16 connections for $DURATION after $WARMUP of warm-up; load average now: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
printf '| %-6s | %5s | %8s | %14s | %6s | %s\n' binary round requests "Ir / request" errors "total Ir |"
printf '| %-6s | %5s | %8s | %14s | %6s | %s\n' --- --- --- --- --- "--- |"
results="$work/results"
for round in $(seq 1 "$ROUNDS"); do
    # The order alternates too, so neither build always runs first in a round.
    if [ $((round % 2)) = 1 ]; then order="OLD NEW"; else order="NEW OLD"; fi
    for which in $order; do
        measure "${!which}" "$which-$round"
        per=$(python3 -c "print(round($IR / $REQUESTS))")
        echo "$which $per" >> "$results"
        printf '| %-6s | %5s | %8s | %14s | %6s | %s |\n' "$which" "$round" "$REQUESTS" "$per" "$ERRORS" "$IR"
    done
done

python3 - "$results" <<'PY'
import statistics, sys
per = {"OLD": [], "NEW": []}
for line in open(sys.argv[1]):
    which, value = line.split()
    per[which].append(int(value))
old, new = statistics.median(per["OLD"]), statistics.median(per["NEW"])
print()
print(f"median Ir / request: OLD {old:,.0f}, NEW {new:,.0f}; NEW / OLD = {new / old:.4f} ({(new / old - 1) * 100:+.2f} %)")
PY
