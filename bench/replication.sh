#!/usr/bin/env bash
# The cost of replication (issue 14, docs/benchmarks.md "Replication: its cost"): the same chat
# load against the same cluster twice in one run, once with one replica per partition and once
# with two (`chinwag cluster init --replicas R`, `--ack replicated`), side by side: chat
# delivered/s, server CPU per delivered message (the nodes' processes summed, from /proc, over
# the measured window: `chinwag-loadgen --server-pid A,B,C`) and send → send_ok p50/p99.
# Target: the replicated run's CPU per delivered message at most 1.5× the unreplicated one's.
#   bench/replication.sh [CONVERSATIONS=1000] [DURATION_S=10] [NODES=3] [WINDOW=1]
# Release build (NO_BUILD=1 skips it; BIN_DIR=DIR runs the binaries in DIR instead); FSYNC
# (default never) is the nodes' --fsync. The nodes use 127.0.0.1:7811.. (clients), :7831..
# (service), :7851.. (links), Redis :7898; connections come from 127.0.0.1..127.0.0.4.
# A chinwag without replication (no `cluster init --replicas`, or nodes that take no lease on
# their partitions within 30 s) runs the one-replica half and says that the other is not
# available, and why.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
conversations=${1:-1000}
duration=${2:-10}
nodes=${3:-3}
window=${4:-1}
fsync=${FSYNC:-never}
(( nodes >= 2 )) || { echo "NODES must be at least 2 (two replicas need two nodes)" >&2; exit 2; }
(( conversations * 2 / nodes < 19000 )) || { echo "too many connections per node (file limit)" >&2; exit 2; }
[ -n "${NO_BUILD:-}" ] || (cd "$repo" && cargo build --quiet --release -p chinwag-engine -p chinwag-loadgen)
bin=${BIN_DIR:-${CARGO_TARGET_DIR:-$repo/target}/release}
work=$(mktemp -d)
secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
redis_port=7898
partitions=64
ulimit -n 20000

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

http() { # port path: the body, or "unreachable: ..."
  python3 -c 'import sys, urllib.request
try:
    print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}{sys.argv[2]}", timeout=5).read().decode())
except Exception as e:
    print(f"unreachable: {e}")' "$1" "$2"
}

replication=yes
"$bin/chinwag" cluster init --help 2>/dev/null | grep -q -- '--replicas' || replication=no
ack_flag=()
"$bin/chinwag" serve --help 2>/dev/null | grep -q -- '--ack ' && ack_flag=(--ack replicated)

grep -m1 'model name' /proc/cpuinfo
echo "nodes $nodes (one shard each), $partitions partitions, $conversations direct conversations" \
     "($((conversations * 2)) connections), closed loop window $window, ${duration} s measured," \
     "--fsync $fsync; chinwag $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')"

# One run with R replicas: a fresh Redis, cluster and data; writes $work/rR.json.
run() { # R
  local r=$1 node_pids=() addrs=() run_pids=()
  local dir="$work/r$r"
  mkdir -p "$dir"
  redis-server --port $redis_port --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
    >"$dir/redis.log" 2>&1 &
  run_pids+=($!)
  for _ in $(seq 100); do redis-cli -p $redis_port ping >/dev/null 2>&1 && break; sleep 0.1; done
  local replicas_flag=()
  [ "$replication" = yes ] && replicas_flag=(--replicas "$r")
  "$bin/chinwag" cluster --cluster redis://127.0.0.1:$redis_port init \
    --nodes "$(seq -s, 1 "$nodes")" --partitions $partitions "${replicas_flag[@]}" >/dev/null
  for n in $(seq 1 "$nodes"); do
    local client=$((7810 + n)) service=$((7830 + n)) link=$((7850 + n))
    "$bin/chinwag" serve --data-dir "$dir/node$n" --shards 1 --jwt-secret "$secret" \
      --listen 127.0.0.1:$client --backend-listen 127.0.0.1:$service \
      --cluster redis://127.0.0.1:$redis_port --node "$n" --node-listen 127.0.0.1:$link \
      --partitions $partitions --messages-per-s-max 0 --fsync "$fsync" --log-level warn \
      "${ack_flag[@]}" 2>"$dir/node$n.log" &
    run_pids+=($!)
    node_pids+=($!)
    addrs+=("127.0.0.1:$client")
  done
  pids+=("${run_pids[@]}")
  # Ready: every node's /healthz answers 200 and shows every node alive and its link to each
  # up; with replicas, every partition's lease is held.
  local health
  for n in $(seq 1 "$nodes"); do
    for _ in $(seq 600); do
      health=$(http $((7810 + n)) /healthz)
      [[ $health == ok* && $health == *"peers: $nodes alive"* ]] &&
        (( $(grep -cE '^link [0-9]+: up' <<<"$health") == nodes - 1 )) && break
      sleep 0.2
    done
    [[ $health == ok* ]] || { echo "node $n is not ready: $health"; tail "$dir/node$n.log"; exit 1; }
  done
  if (( r > 1 )); then
    local held=0
    for _ in $(seq 150); do
      held=$(redis-cli -p $redis_port --scan --pattern 'chinwag:lease:*' | wc -l)
      (( held >= partitions )) && break
      sleep 0.2
    done
    if (( held < partitions )); then
      echo "no lease held on $((partitions - held)) of $partitions partitions after 30 s: the" \
           "nodes do not run the leadership thread (replication not wired into chinwag serve)" \
           >"$work/r$r.unavailable"
      for pid in "${run_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
      for pid in "${run_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
      return
    fi
  fi
  local addr_list pid_list
  addr_list=$(IFS=,; echo "${addrs[*]}")
  pid_list=$(IFS=,; echo "${node_pids[*]}")
  set +e
  "$bin/chinwag-loadgen" chat --addr "$addr_list" --secret "$secret" \
    --conversations "$conversations" --window "$window" --warmup-s 2 --duration-s "$duration" \
    --drain-s 30 --server-pid "$pid_list" --quiet --json-out "$work/r$r.json" >"$dir/chat.txt"
  echo $? >"$work/r$r.code"
  set -e
  # The nodes first (they deregister from Redis as they stop), then Redis.
  for pid in "${node_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${node_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  kill "${run_pids[0]}" 2>/dev/null || true
  wait "${run_pids[0]}" 2>/dev/null || true
}

run 1
if [ "$replication" = yes ]; then
  run 2
fi

python3 - "$work" "$replication" <<'EOF'
import json, os, sys
work, replication = sys.argv[1:]
def load(r):
    path = f"{work}/r{r}.json"
    if not os.path.exists(path):
        return None
    report = json.load(open(path))
    report["exit"] = open(f"{work}/r{r}.code").read().strip()
    return report
runs = {1: load(1), 2: load(2)}
rows = [
    ("delivered/s", lambda r: f"{r['delivered_per_s']:,.0f}"),
    ("server CPU µs per delivered", lambda r: f"{r['server_cpu_us_per_delivered']:.1f}"),
    ("send → send_ok p50 µs", lambda r: f"{r['latency']['send_to_send_ok_us']['p50']:,.0f}"),
    ("send → send_ok p99 µs", lambda r: f"{r['latency']['send_to_send_ok_us']['p99']:,.0f}"),
    ("send → push p99 µs", lambda r: f"{r['latency']['send_to_push_us']['p99']:,.0f}"),
    ("server CPU s (measured)", lambda r: f"{r['server_cpu_s']:.2f}"),
    ("violations, failures", lambda r: f"{r['violations']}, {r['failures_total']}"),
    ("exit", lambda r: r["exit"]),
]
print(f"{'':32} {'--replicas 1':>16} {'--replicas 2':>16}")
for name, cell in rows:
    cells = []
    for r in (1, 2):
        report = runs[r]
        try:
            cells.append(cell(report) if report else "not available")
        except (KeyError, TypeError):
            cells.append("-")
    print(f"{name:32} {cells[0]:>16} {cells[1]:>16}")
for r, report in runs.items():
    if report and report["exit"] != "0":
        print(f"--replicas {r}: the load generator exited {report['exit']}: failures "
              f"{report.get('failures')}, violations {report.get('violations_first')}")
if runs[1] and runs[2] and runs[1].get("server_cpu_us_per_delivered") and runs[2].get("server_cpu_us_per_delivered"):
    ratio = runs[2]["server_cpu_us_per_delivered"] / max(runs[1]["server_cpu_us_per_delivered"], 1e-9)
    verdict = "meets" if ratio <= 1.5 else "misses"
    print(f"replicated / unreplicated CPU per delivered message: {ratio:.2f}× ({verdict} the 1.5× target)")
elif replication == "no":
    print("--replicas 2: not available: this chinwag has no replication "
          "(chinwag cluster init has no --replicas)")
elif os.path.exists(f"{work}/r2.unavailable"):
    print("--replicas 2: not available: " + open(f"{work}/r2.unavailable").read().strip())
EOF
