#!/usr/bin/env bash
# Chat (2,000 connections in 1,000 direct conversations, closed loop; docs/benchmarks.md, "Held
# fan-outs, handed out once per flush") against two builds' servers, back to back, twice per
# delay: server pinned to CPU 0, load generator to CPU 1, both `chrt -f 50` (needs root).
#
#   DELAYS="0 10" bench/chat-vs-baseline.sh BASELINE_RELEASE_DIR NEW_RELEASE_DIR LOADGEN_BINARY
#
# Prints per run: [delay, round, build] delivered/s, server CPU µs per delivered message, server
# CPU s, violations.
set -euo pipefail
base=$1 new=$2 loadgen=$3
secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
ulimit -n 20000
for delay in ${DELAYS:-0 10}; do
  for round in 1 2; do
    for build in base new; do
      dir=$base; [ $build = new ] && dir=$new
      data=$(mktemp -d)
      chrt -f 50 taskset -c 0 "$dir/chinwag" serve --listen 127.0.0.1:7481 --backend-listen 127.0.0.1:7482 \
        --data-dir "$data" --shards 1 --jwt-secret "$secret" --messages-per-s-max 0 --fsync never \
        --log-level warn --push-flush-delay-ms "$delay" 2>/dev/null &
      pid=$!
      for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/7481) 2>/dev/null && break; sleep 0.1; done
      chrt -f 50 taskset -c 1 "$loadgen" chat --addr 127.0.0.1:7481 --secret "$secret" --conversations 1000 \
        --warmup-s 2 --duration-s 10 --server-pid $pid --quiet --json-out "$data/chat.json" >/dev/null 2>&1 || true
      python3 - "$data/chat.json" "$delay" "$round" "$build" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
print(sys.argv[2:], j["delivered_per_s"], round(j["server_cpu_us_per_delivered"], 2),
      round(j["server_cpu_s"], 2), j["violations"])
PY
      kill $pid; wait $pid || true; rm -rf "$data"
    done
  done
done
