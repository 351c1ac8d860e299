#!/usr/bin/env bash
# A log per partition (issue 13) against a log per shard: two builds in one run, alternating.
#   bench/partitions.sh BEFORE_CHINWAG AFTER_CHINWAG LOADGEN [ROUNDS]
# For each build and round:
#   - an empty 2-shard node: the data directory's disk use (du) and RSS 3 s after start;
#   - a lightly used 2-shard node: bench/memory-at-rest.sh (50 conversations, ~6,000
#     messages): RSS and the data directory's disk use at rest;
#   - chat CPU: one shard pinned to CPU 0, the load generator to CPU 1, 1,000 direct
#     conversations for 10 s (the commands of docs/benchmarks.md, "Engine layout"): server CPU
#     per delivered message. With 256 partitions a loop turn commits many logs.
set -euo pipefail
before=$1; after=$2; lg=$3; rounds=${4:-2}
here=$(cd "$(dirname "$0")" && pwd)
secret=partitions-bench-secret-partitions-bench
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

empty() { # bin port
  local dir; dir=$(mktemp -d -p "$work")
  "$1" serve --listen 127.0.0.1:$2 --backend-listen 127.0.0.1:0 --data-dir "$dir" --shards 2 \
    --jwt-secret "$secret" --log-level warn &
  local pid=$!
  sleep 3
  echo "empty node: disk $(du -sk "$dir" | cut -f1) KiB; $(grep -E 'VmRSS' /proc/$pid/status | tr -s ' \t' ' ')"
  kill -TERM $pid; wait $pid || true
}

chat() { # bin port
  local dir; dir=$(mktemp -d -p "$work")
  taskset -c 0 "$1" serve --listen 127.0.0.1:$2 --backend-listen 127.0.0.1:0 --data-dir "$dir" \
    --jwt-secret "$secret" --shards 1 --messages-per-s-max 0 --fsync never --log-level warn &
  local pid=$!
  sleep 2
  taskset -c 1 "$lg" chat --addr 127.0.0.1:$2 --secret "$secret" --conversations 1000 \
    --warmup-s 2 --duration-s 10 --server-pid $pid --quiet --json-out "$dir/report.json" >/dev/null
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('chat: delivered', r.get('delivered'), '; server CPU s', r.get('server_cpu_s'), '; server CPU us per delivered', r.get('server_cpu_us_per_delivered'), '; violations', r.get('violations'))" "$dir/report.json"
  kill -TERM $pid; wait $pid || true
}

grep -m1 'model name' /proc/cpuinfo
for round in $(seq "$rounds"); do
  for build in before after; do
    bin=$before; [ $build = after ] && bin=$after
    echo "# round $round: $build"
    empty "$bin" 7481
    "$here/memory-at-rest.sh" "$bin" "$lg" 7482 --backend-listen 127.0.0.1:0
    chat "$bin" 7483
  done
done
