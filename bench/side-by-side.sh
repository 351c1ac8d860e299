#!/usr/bin/env bash
# The side-by-side benchmark, one command on one machine: the server pinned to CPU 0 with one
# shard (or one thread), chinwag-loadgen pinned to CPU 1.
#   1. echo, closed loop, 1,000 connections, 32-byte messages: chinwag's /echo, then the
#      tokio-tungstenite baseline (bench/src/bin/echo_baseline.rs);
#   2. idle handshake-only connections against both, for RSS per connection;
#   3. against the same chinwag process: chat (2,000 connections in 1,000 direct
#      conversations, closed loop) and fanout (one shop conversation with 100 agents);
# then a table with ratios. Usage:
#   bench/side-by-side.sh [DURATION_S] [OUT_DIR]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
duration=${1:-10}
out=${2:-$(mktemp -d)}
mkdir -p "$out"
(cd "$repo" && cargo build --quiet --release -p chinwag-engine -p chinwag-loadgen -p chinwag-bench)
bin=${CARGO_TARGET_DIR:-$repo/target}/release
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT
secret=side-by-side-benchmark-secret-0123456789
lg() { taskset -c 1 "$bin/chinwag-loadgen" "$@"; }

start() { # name port cmd... ; sets $pid
  local name=$1 port=$2; shift 2
  taskset -c 0 "$@" 2>"$work/$name.log" &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return; sleep 0.1; done
  echo "$name did not start" >&2; exit 1
}

echo "# machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; load before: $(cut -d' ' -f1-3 /proc/loadavg)"

start chinwag 7461 "$bin/chinwag" serve --listen 127.0.0.1:7461 --data-dir "$work/data" --shards 1 \
  --enable-echo --messages-per-s-max 0 --fsync never --jwt-secret "$secret" --log-level warn
chinwag=$pid
lg echo --addr 127.0.0.1:7461 --connections 1000 --message-bytes 32 --warmup-s 2 \
  --duration-s "$duration" --server-pid "$chinwag" | tee "$out/echo-chinwag.txt"
lg idle --addr 127.0.0.1:7461 --connections 10000 --sources 4 --server-pid "$chinwag" \
  | tee "$out/idle-chinwag.txt"
lg chat --addr 127.0.0.1:7461 --secret "$secret" --conversations 1000 --warmup-s 2 \
  --duration-s "$duration" --server-pid "$chinwag" --quiet --json-out "$out/chat.json" \
  --hgrm-out "$out/chat.hgrm" | tee "$out/chat.txt"
lg fanout --addr 127.0.0.1:7461 --secret "$secret" --members 100 --warmup-s 1 \
  --duration-s "$duration" --server-pid "$chinwag" --quiet --json-out "$out/fanout.json" \
  | tee "$out/fanout.txt"
kill -TERM "$chinwag"; wait "$chinwag" || true

start baseline 7462 "$bin/echo-baseline" 127.0.0.1:7462 1
baseline=$pid
lg echo --addr 127.0.0.1:7462 --connections 1000 --message-bytes 32 --warmup-s 2 \
  --duration-s "$duration" --server-pid "$baseline" | tee "$out/echo-baseline.txt"
lg idle --addr 127.0.0.1:7462 --connections 10000 --sources 4 --server-pid "$baseline" \
  | tee "$out/idle-baseline.txt"
kill -TERM "$baseline"; wait "$baseline" || true

python3 - "$out" "$duration" <<'PY'
import json, re, sys
out, duration = sys.argv[1], float(sys.argv[2])
def text(name): return open(f"{out}/{name}").read()
def echo(name):
    t = text(name)
    messages = int(re.search(r"messages: (\d+)", t).group(1))
    cpu = float(re.search(r"server_cpu_s: ([\d.]+)", t).group(1))
    p99 = int(re.search(r"p99 (\d+)", t).group(1))
    return {"msg_per_s": messages / duration, "cpu_us_per_msg": cpu * 1e6 / messages, "p99_us": p99}
def rss(name):
    return float(re.search(r"rss_growth_bytes_per_connection: ([\d.]+)", text(name)).group(1))
c, b = echo("echo-chinwag.txt"), echo("echo-baseline.txt")
c["rss_bytes_per_conn"], b["rss_bytes_per_conn"] = rss("idle-chinwag.txt"), rss("idle-baseline.txt")
chat, fan = json.load(open(f"{out}/chat.json")), json.load(open(f"{out}/fanout.json"))
rows = [
    ("echo chinwag /echo", c["msg_per_s"], c["cpu_us_per_msg"], c["p99_us"], c["rss_bytes_per_conn"]),
    ("echo tokio-tungstenite", b["msg_per_s"], b["cpu_us_per_msg"], b["p99_us"], b["rss_bytes_per_conn"]),
    ("ratio chinwag/baseline", c["msg_per_s"] / b["msg_per_s"], c["cpu_us_per_msg"] / b["cpu_us_per_msg"],
     c["p99_us"] / max(b["p99_us"], 1), c["rss_bytes_per_conn"] / max(b["rss_bytes_per_conn"], 1)),
    ("chat (delivered)", chat["delivered_per_s"], chat["server_cpu_us_per_delivered"],
     chat["latency"]["send_to_push_us"]["p99"], None),
    ("ratio chat/echo (chinwag)", chat["delivered_per_s"] / c["msg_per_s"],
     chat["server_cpu_us_per_delivered"] / c["cpu_us_per_msg"], None, None),
    ("fanout 100 (deliveries)", fan["deliveries_per_s"], fan["server_cpu_us_per_delivered"],
     fan["latency"]["send_to_push_us"]["p99"], None),
]
fmt = lambda v, f: "-" if v is None else f.format(v)
print(f"\n| run | messages/s | server CPU µs/message | p99 µs | RSS bytes/connection |")
print("|---|---:|---:|---:|---:|")
for name, rate, cpu, p99, rss_ in rows:
    ratio = name.startswith("ratio")
    f = "{:.2f}" if ratio else "{:,.0f}"
    print(f"| {name} | {fmt(rate, f)} | {fmt(cpu, '{:.2f}')} | {fmt(p99, f)} | {fmt(rss_, f)} |")
print(f"\nviolations: chat {chat['violations']}, fanout {fan['violations']}; "
      f"loadgen CPU share of one core: chat {chat['loadgen_cpu_share_of_one_core']:.2f}, "
      f"fanout {fan['loadgen_cpu_share_of_one_core']:.2f}")
PY
echo "raw outputs in $out"
