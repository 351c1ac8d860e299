#!/usr/bin/env bash
# WebSocket conformance: runs the Autobahn|Testsuite fuzzingclient (cases 1.* to 10.*; 12.* and
# 13.* are permessage-deflate, which chinwag does not offer) against the release binary's
# /echo, and exits non-zero if any case FAILED or the server did not drain cleanly.
#   bench/autobahn.sh [REPORT_DIR] [CASES]      (CASES: a JSON list such as '["7.*"]')
# Expects shared/autobahn/run.sh beside the repository (override with AUTOBAHN_RUN).
#
# The suite's 9.* cases send messages of up to 16 MiB and 1,000-message bursts, so the size,
# queue and rate limits are raised for this run; every other setting is the default.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
runner=${AUTOBAHN_RUN:-$repo/../shared/autobahn/run.sh}
report=${1:-$repo/target/autobahn}
# The suite's runner changes into the report directory: give it an absolute path.
mkdir -p "$report" && report=$(cd "$report" && pwd)
[ -x "$runner" ] || [ -f "$runner" ] || { echo "autobahn: $runner not found"; exit 2; }

(cd "$repo" && cargo build --quiet --release -p chinwag-engine --bin chinwag)
bin=${CARGO_TARGET_DIR:-$repo/target}/release/chinwag
work=$(mktemp -d)
"$bin" serve --listen 127.0.0.1:0 --backend-listen 127.0.0.1:0 --data-dir "$work/data" --enable-echo --shards 2 \
  --frame-bytes-max 16777216 --message-bytes-max 16777216 --send-queue-bytes-max 50331648 \
  --messages-per-s-max 0 2>"$work/server.log" &
pid=$!
trap 'kill -9 $pid 2>/dev/null || true; rm -rf "$work"' EXIT

addr=
for _ in $(seq 100); do
  addr=$(sed -n 's/.*listening addr=\([0-9.:]*\).*/\1/p' "$work/server.log" | head -n 1)
  [ -n "$addr" ] && break
  kill -0 $pid 2>/dev/null || { cat "$work/server.log"; echo "autobahn: server did not start"; exit 2; }
  sleep 0.1
done
[ -n "$addr" ] || { echo "autobahn: server did not report its address"; exit 2; }
echo "autobahn: chinwag $addr (pid $pid), report in $report"

rc=0
bash "$runner" "ws://$addr/echo" "$report" ${2:+"$2"} || rc=$?

kill -TERM $pid
server_rc=0
wait $pid || server_rc=$?
if [ $server_rc -ne 0 ]; then
  echo "autobahn: server exited with $server_rc after SIGTERM"; tail -n 20 "$work/server.log"
  [ $rc -ne 0 ] || rc=1
fi
exit $rc
