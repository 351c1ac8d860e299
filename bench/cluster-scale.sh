#!/usr/bin/env bash
# The cluster at scale (issue 13, docs/benchmarks.md "Cluster scale"): Redis and NODES chinwag
# nodes on this machine (one shard each), and `chinwag-loadgen chat --procs` logging in USERS
# connections spread over every node's address, then chatting in direct conversations at
# RATE messages per second per user, every push checked. Each process stays under 20,000 open
# files: USERS / NODES sockets per node, USERS / PROCS per load generator worker.
#
# Prints the load generator's report and a summary: login rate (connections logged in per
# second, from the first connect to the last login_ok), RSS of all nodes per logged-in
# connection (the nodes' summed RSS at the peak of the run, less their summed RSS before any
# client connected), node-link bytes and link messages per delivered message (the nodes'
# chinwag_link_*_out_total over the whole run, logins included), and the violations and failures.
#   bench/cluster-scale.sh [USERS] [NODES] [RATE] [DURATION_S] [PROCS]
# Release build (NO_BUILD=1 skips it; BIN_DIR=DIR runs the binaries in DIR instead); the nodes
# use 127.0.0.1:7711.. (clients), :7731.. (service), :7751.. (links), Redis :7799; connections
# come from 127.0.0.1..127.0.0.32.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
users=${1:-100000}
nodes=${2:-6}
rate=${3:-0.05}
duration=${4:-20}
procs=${5:-7}
(( users % 2 == 0 )) || { echo "USERS must be even (two per conversation)" >&2; exit 2; }
(( users / nodes < 19000 )) || { echo "USERS / NODES must stay under 19,000 (file limit)" >&2; exit 2; }
(( users / procs < 19000 )) || { echo "USERS / PROCS must stay under 19,000 (file limit)" >&2; exit 2; }
[ -n "${NO_BUILD:-}" ] || (cd "$repo" && cargo build --quiet --release -p chinwag-engine -p chinwag-loadgen)
bin=${BIN_DIR:-${CARGO_TARGET_DIR:-$repo/target}/release}
work=$(mktemp -d)
secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
redis_port=7799
partitions=256
ulimit -n 20000

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

grep -m1 'model name' /proc/cpuinfo
echo "users $users, nodes $nodes, rate $rate msg/s per user, duration ${duration}s, loadgen procs $procs"

redis-server --port $redis_port --bind 127.0.0.1 --save '' --appendonly no --dir "$work" \
  >"$work/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do redis-cli -p $redis_port ping >/dev/null 2>&1 && break; sleep 0.1; done
"$bin/chinwag" cluster --cluster redis://127.0.0.1:$redis_port init \
  --nodes "$(seq -s, 1 "$nodes")" --partitions $partitions

node_pids=()
addrs=()
for n in $(seq 1 "$nodes"); do
  client=$((7710 + n)) service=$((7730 + n)) link=$((7750 + n))
  "$bin/chinwag" serve --data-dir "$work/node$n" --shards 1 --jwt-secret "$secret" \
    --listen 127.0.0.1:$client --backend-listen 127.0.0.1:$service \
    --cluster redis://127.0.0.1:$redis_port --node "$n" --node-listen 127.0.0.1:$link \
    --partitions $partitions --messages-per-s-max 0 --fsync never --log-level warn \
    2>"$work/node$n.log" &
  pids+=($!)
  node_pids+=($!)
  addrs+=("127.0.0.1:$client")
done

# Ready: every node's /healthz answers 200 and shows every node alive.
metrics() { # port path
  python3 -c 'import sys, urllib.request
try:
    print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}{sys.argv[2]}", timeout=5).read().decode())
except Exception as e:
    print(f"unreachable: {e}")' "$1" "$2"
}
ready() { # node: its /healthz says 200-ok and every node alive
  local health
  health=$(metrics $((7710 + $1)) /healthz)
  [[ $health == ok* && $health == *"peers: $nodes alive"* ]]
}
for n in $(seq 1 "$nodes"); do
  for _ in $(seq 600); do ready "$n" && break; sleep 0.2; done
  ready "$n" || { echo "node $n is not ready:"; metrics $((7710 + n)) /healthz; tail "$work/node$n.log"; exit 1; }
done

rss_sum() { # summed VmRSS of the nodes, bytes
  local kb=0 v
  for pid in "${node_pids[@]}"; do
    v=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
    kb=$((kb + v))
  done
  echo $((kb * 1024))
}
link_sum() { # metric name: summed over every node and peer
  local total=0 v
  for n in $(seq 1 "$nodes"); do
    v=$(metrics $((7710 + n)) /metrics | awk -v m="$1" '$1 ~ "^"m"[{ ]" || $1 == m {s += $2} END {printf "%d", s}')
    total=$((total + v))
  done
  echo $total
}

rss_before=$(rss_sum)
bytes_before=$(link_sum chinwag_link_bytes_out_total)
messages_before=$(link_sum chinwag_link_messages_out_total)
# The nodes' peak summed RSS while the load runs.
(
  peak=0
  while true; do
    r=$(rss_sum 2>/dev/null || echo 0)
    (( r > peak )) && peak=$r && echo "$peak" >"$work/rss_peak"
    sleep 0.5
  done
) &
sampler=$!
pids+=($sampler)

addr_list=$(IFS=,; echo "${addrs[*]}")
set +e
"$bin/chinwag-loadgen" chat --addr "$addr_list" --secret "$secret" \
  --conversations $((users / 2)) --procs "$procs" --sources 32 \
  --connect-rate-per-s 5000 --login-timeout-s 600 \
  --rate-per-user-per-s "$rate" --warmup-s 2 --duration-s "$duration" --drain-s 60 \
  --quiet --json-out "$work/chat.json" | grep -v '^settings'
code=${PIPESTATUS[0]}
set -e
kill "$sampler" 2>/dev/null || true

bytes_after=$(link_sum chinwag_link_bytes_out_total)
messages_after=$(link_sum chinwag_link_messages_out_total)
python3 - "$work/chat.json" "$users" "$rss_before" "$(cat "$work/rss_peak" 2>/dev/null || echo 0)" \
  $((bytes_after - bytes_before)) $((messages_after - messages_before)) "$code" <<'EOF'
import json, sys
path, users, rss_before, rss_peak, link_bytes, link_messages, code = sys.argv[1:]
r = json.load(open(path))
users, rss_before, rss_peak = int(users), int(rss_before), int(rss_peak)
link_bytes, link_messages = int(link_bytes), int(link_messages)
logged = r.get("connections", 0) if r.get("logged_in") is None else r["logged_in"]
login_s = r.get("connect_login_s", 0) or float("nan")
delivered = max(r.get("delivered", 0), 1)
print(f"logged in      {logged:,} of {users:,} in {login_s:.1f} s: {logged / login_s:,.0f} logins/s")
print(f"RSS            nodes {rss_before / 2**20:,.0f} MiB before, {rss_peak / 2**20:,.0f} MiB at peak: "
      f"{(rss_peak - rss_before) / max(logged, 1):,.0f} bytes per connection")
print(f"node links     {link_bytes:,} bytes, {link_messages:,} messages over the run (logins included) for {delivered:,} deliveries: "
      f"{link_bytes / delivered:,.1f} bytes and {link_messages / delivered:.3f} link messages per delivered message")
print(f"chat           sent {r.get('sent', 0):,}, send_ok {r.get('send_ok', 0):,}, delivered {r.get('delivered', 0):,}, "
      f"violations {r['violations']}, failures {r['failures_total']} {r.get('failures', {})}, exit {code}")
EOF
