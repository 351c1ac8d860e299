#!/usr/bin/env bash
# Memory per idle WebSocket: opens CONNECTIONS (default 15,000) WebSockets on /echo, lets them
# sit, and reports the server's RSS growth per connection, for chinwag and for the
# tokio-tungstenite baseline. Each process holds one descriptor per connection, so the
# script raises its soft limit to 20,000 files (the machines' hard limit).
#   bench/idle-memory.sh [CONNECTIONS]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
connections=${1:-15000}
ulimit -n 20000
(cd "$repo" && cargo build --quiet --release -p chinwag-engine -p chinwag-loadgen -p chinwag-bench)
bin=${CARGO_TARGET_DIR:-$repo/target}/release
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT

measure() { # name port cmd...
  local name=$1 port=$2; shift 2
  "$@" 2>"$work/$name.log" &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 50); do grep -q listening "$work/$name.log" && break; sleep 0.1; done
  echo "== $name"
  "$bin/chinwag-loadgen" idle --addr "127.0.0.1:$port" --connections "$connections" --sources 4 --server-pid "$pid"
  kill -TERM "$pid"; wait "$pid" || true
}

measure chinwag 7481 "$bin/chinwag" serve --listen 127.0.0.1:7481 --data-dir "$work/data" --shards 2 \
  --enable-echo --log-level warn
measure baseline 7482 "$bin/echo-baseline" 127.0.0.1:7482 2
