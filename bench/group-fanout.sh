#!/usr/bin/env bash
# Group fan-out and notify benchmark (docs/benchmarks.md, "Groups and notify"): chinwag with one
# shard pinned to CPU 0, the load generator (two worker processes) pinned to CPU 1.
#
#   bench/group-fanout.sh [RATE] [DURATION_S] [NOTIFY_RATE]
#
# One chinwag process for all runs (fresh users and groups each run):
#   1. group of 10,000 logged-in members, one sender, RATE messages per second in all;
#   2. baseline in the same run: the same with 1,000 members;
#   3. notify: the service sends notify_users naming 1,000 logged-in users, NOTIFY_RATE per second.
# Prints each report and a summary: deliveries per second of server CPU time (utime+stime of the
# server, read from /proc/PID/stat by the load generator's parent over the measured window),
# delivery spread p50/p99, and the ratios 10,000 : 1,000.
#
# Sweep mode, for push_flush_delay_ms (docs/benchmarks.md, "Bounded push coalescing"):
#
#   DELAYS="0 2 5 10" RATES="50 200 1000" bench/group-fanout.sh - [DURATION_S]
#
# runs only the group of MEMBERS (default 10,000) members, at every rate in RATES against one
# server per delay in DELAYS (`--push-flush-delay-ms`), all with the same binary, and prints one
# table row per run.
#
# With BASELINE=<dir> (the release directory of another build, e.g. main's), every delay runs
# first against that build's server, then against this one's, at the same rates, back to back;
# the table gains the baseline's figure and the ratio this : baseline, so a comparison comes
# from one run on a shared, noisy machine. The load generator is this build's for both.
#
# Environment: NO_BUILD=1 skips the release build; CARGO_TARGET_DIR picks the binaries;
# SERVER_ARGS adds flags to the server; RT=1 runs the server and the load generator with
# real-time priority (`chrt -f 50`, needs root) so that builds sharing the machine cannot take
# their cores (the kernel still keeps 5 % of each core for others, sched_rt_runtime_us).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
rate=${1:-50}
duration=${2:-10}
notify_rate=${3:-200}
[ -n "${NO_BUILD:-}" ] || (cd "$repo" && cargo build --quiet --release -p chinwag-engine -p chinwag-loadgen)
bin=${CARGO_TARGET_DIR:-$repo/target}/release
work=$(mktemp -d)
secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
port=7471
service=7472
prio=()
[ -z "${RT:-}" ] || prio=(chrt -f 50)
# 10,000 connections on each side; every process stays under 20,000 files.
ulimit -n 20000
server=""
trap '[ -z "$server" ] || kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT

start_server() { # server-binary-dir extra flags...
  local dir=$1; shift
  rm -rf "$work/data"
  : >"$work/server.log"
  # shellcheck disable=SC2086 # SERVER_ARGS is a list of flags
  "${prio[@]}" taskset -c 0 "$dir/chinwag" serve --listen 127.0.0.1:$port \
    --backend-listen 127.0.0.1:$service --data-dir "$work/data" --shards 1 \
    --jwt-secret "$secret" --messages-per-s-max 0 --fsync never --members-max 10000 \
    --log-level warn ${SERVER_ARGS:-} "$@" 2>"$work/server.log" &
  server=$!
  # At --log-level warn the server says nothing when it is up: wait until the port answers.
  for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && return
    kill -0 "$server" 2>/dev/null || break
    sleep 0.1
  done
  echo "server did not start:" >&2; cat "$work/server.log" >&2; exit 1
}

stop_server() {
  kill "$server"
  wait "$server" || true
  server=""
}

load() { # name args...
  local name=$1; shift
  echo "== $name"
  "${prio[@]}" taskset -c 1 "$bin/chinwag-loadgen" group --addr 127.0.0.1:$port \
    --service-addr 127.0.0.1:$service --secret "$secret" --sources 8 --procs 2 \
    --warmup-s 2 --duration-s "$duration" --drain-s 20 --login-timeout-s 120 \
    --server-pid "$server" --quiet --json-out "$work/$name.json" "$@" | grep -v '^settings' || true
}

grep -m1 'model name' /proc/cpuinfo
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"

if [ -n "${DELAYS:-}" ]; then
  names=()
  builds=(new)
  [ -z "${BASELINE:-}" ] || builds=(base new)
  for delay in $DELAYS; do
    for build in "${builds[@]}"; do
      if [ "$build" = base ]; then start_server "$BASELINE" --push-flush-delay-ms "$delay"
      else start_server "$bin" --push-flush-delay-ms "$delay"; fi
      for r in ${RATES:-$rate}; do
        name="$build-delay-$delay-rate-$r"
        load "$name" --members "${MEMBERS:-10000}" --rate-per-s "$r" >/dev/null
        [ "$build" = base ] || names+=("$name")
        echo "$name done; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
      done
      stop_server
    done
  done
  python3 - "$work" "${MEMBERS:-10000}" "${BASELINE:+base}" "${names[@]}" <<'EOF'
import json, sys
work, members, base, names = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
head = "| delay (ms) | RATE (msg/s) | deliveries/s (of offered) | server CPU s | deliveries per server CPU s |"
rule = "|---:|---:|---:|---:|---:|"
if base:
    head += " baseline: deliveries/s | baseline: deliveries per server CPU s | ratio |"
    rule += "---:|---:|---:|"
print(head + " spread p50 / p99 (ms) | send to push p50 / p99 (ms) | violations, failures |")
print(rule + "---|---|---|")
for n in names:
    j = json.load(open(f"{work}/{n}.json"))
    _, _, delay, _, rate = n.split("-")
    s = j["latency"]["delivery_spread_us"]
    p = j["latency"]["send_to_push_us"]
    row = (f"| {delay} | {int(rate):,} | {j['deliveries_per_s']:,.0f} ({int(rate) * members:,}) | "
           f"{j['server_cpu_s']:.2f} | {j['deliveries_per_server_cpu_s']:,.0f} |")
    if base:
        b = json.load(open(f"{work}/base-{n[4:]}.json"))
        ok = "" if b["violations"] == 0 and b["failures_total"] == 0 else " (!)"
        row += (f" {b['deliveries_per_s']:,.0f} | {b['deliveries_per_server_cpu_s']:,.0f}{ok} | "
                f"{j['deliveries_per_server_cpu_s'] / b['deliveries_per_server_cpu_s']:.2f} |")
    print(row + f" {s['p50'] / 1000:.1f} / {s['p99'] / 1000:.1f} | {p['p50'] / 1000:.1f} / {p['p99'] / 1000:.1f} | "
          f"{j['violations']}, {j['failures_total']} |")
EOF
  exit 0
fi

start_server "$bin"
load group-10000 --members 10000 --rate-per-s "$rate"
load group-1000 --members 1000 --rate-per-s "$rate"
load notify-1000 --notify --members 1000 --rate-per-s "$notify_rate"

python3 - "$work" <<'EOF'
import json, sys
work = sys.argv[1]
r = {n: json.load(open(f"{work}/{n}.json")) for n in ("group-10000", "group-1000", "notify-1000")}
def row(n):
    j = r[n]
    s = j["latency"]["delivery_spread_us"]
    return (f"{n:12} deliveries/s {j['deliveries_per_s']:>11,.0f}  server CPU s {j['server_cpu_s']:.2f}  "
            f"deliveries per server CPU s {j['deliveries_per_server_cpu_s']:>11,.0f}  "
            f"spread p50 {s['p50']} us p99 {s['p99']} us  violations {j['violations']}  "
            f"failures {j['failures_total']}")
for n in r:
    print(row(n))
a, b = r["group-10000"], r["group-1000"]
print(f"ratio 10,000 : 1,000 members, deliveries per server CPU s: "
      f"{a['deliveries_per_server_cpu_s'] / b['deliveries_per_server_cpu_s']:.2f}")
EOF
