#!/usr/bin/env bash
# Side-by-side echo benchmark: chinwag's /echo against a tokio-tungstenite echo server
# (bench/src/bin/echo_baseline.rs), each pinned to CPU 0 with one thread, the load generator
# pinned to CPU 1: 1,000 connections, closed loop, 32-byte binary messages, from 4 source
# addresses. The figure that counts is messages per second of server CPU time (utime+stime).
#   bench/echo-vs-baseline.sh [ROUNDS] [DURATION_S]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
rounds=${1:-3}
duration=${2:-10}
(cd "$repo" && cargo build --quiet --release -p chinwag-engine -p chinwag-loadgen -p chinwag-bench)
bin=${CARGO_TARGET_DIR:-$repo/target}/release
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT

run() { # name port cmd...
  local name=$1 port=$2; shift 2
  taskset -c 0 "$@" 2>"$work/$name.log" &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 50); do grep -q listening "$work/$name.log" && break; sleep 0.1; done
  echo "== $name"
  taskset -c 1 "$bin/chinwag-loadgen" echo --addr "127.0.0.1:$port" --connections 1000 --sources 4 \
    --message-bytes 32 --warmup-s 2 --duration-s "$duration" --server-pid "$pid" | tee "$work/$name.out"
  kill -TERM "$pid"; wait "$pid" || true
}

for round in $(seq "$rounds"); do
  echo "# round $round"
  run chinwag 7461 "$bin/chinwag" serve --listen 127.0.0.1:7461 --data-dir "$work/data" --shards 1 \
    --enable-echo --messages-per-s-max 0 --log-level warn
  run baseline 7462 "$bin/echo-baseline" 127.0.0.1:7462 1
  c=$(sed -n 's/msg_per_server_cpu_s: //p' "$work/chinwag.out")
  b=$(sed -n 's/msg_per_server_cpu_s: //p' "$work/baseline.out")
  echo "ratio chinwag/baseline (msg per server CPU s): $(python3 -c "print(f'{$c/$b:.2f}')")"
done
