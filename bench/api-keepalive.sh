#!/usr/bin/env bash
# POST /api/<op> with HTTP/1.1 keep-alive against a connection per request, in one run.
#   bench/api-keepalive.sh CHINWAG [REQUESTS] [ROUNDS]
# A 1-shard node pinned to CPU 0; curl pinned to CPU 1 makes REQUESTS `presence` requests
# (two users, one shard) in one process: once reusing its connection (keep-alive, curl's
# default), once with `Connection: close` (a new connection per request, as before
# keep-alive). For each: requests per second (wall) and the server's CPU per request, from
# /proc/PID/stat (utime + stime).
set -euo pipefail
bin=$1; requests=${2:-5000}; rounds=${3:-3}
secret=api-keepalive-bench-secret-api-keepalive
port=7491
work=$(mktemp -d)
trap 'kill -TERM $pid 2>/dev/null || true; rm -rf "$work"' EXIT

taskset -c 0 "$bin" serve --listen 127.0.0.1:$port --backend-listen 127.0.0.1:0 \
  --data-dir "$work/data" --shards 1 --jwt-secret "$secret" --log-level warn \
  --api-requests-per-connection-max 1000000 &
pid=$!
sleep 2
token=$("$bin" token --secret "$secret" --uid service:1)
url="http://127.0.0.1:$port/api/presence"
for _ in $(seq "$requests"); do echo "url = \"$url\""; done >"$work/urls"

cpu_ticks() { awk '{print $14 + $15}' /proc/$pid/stat; }

run() { # label, extra curl arguments...
  local label=$1; shift
  local before after start end
  before=$(cpu_ticks); start=$(date +%s.%N)
  taskset -c 1 curl -sS -X POST -H "Authorization: Bearer $token" \
    -d '{"users":["buyer:1","buyer:2"]}' "$@" -K "$work/urls" >/dev/null
  end=$(date +%s.%N); after=$(cpu_ticks)
  python3 -c "
import os, sys
label, n, t0, t1, c0, c1 = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
hz = os.sysconf('SC_CLK_TCK')
print(f'{label}: {n} requests in {t1 - t0:.2f} s = {n / (t1 - t0):,.0f} requests/s; server CPU {(c1 - c0) / hz:.2f} s = {(c1 - c0) / hz / n * 1e6:.0f} us per request')
" "$label" "$requests" "$start" "$end" "$before" "$after"
}

grep -m1 'model name' /proc/cpuinfo
for round in $(seq "$rounds"); do
  echo "# round $round"
  run "keep-alive        "
  run "connection: close " -H "Connection: close"
done
