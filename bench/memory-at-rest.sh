#!/usr/bin/env bash
# Memory at rest of an idle 2-shard node: right after start, and after a few thousand messages.
# usage: bench/memory-at-rest.sh CHINWAG_BIN LOADGEN_BIN PORT [extra serve flags]
set -euo pipefail
bin=$1; lg=$2; port=$3; shift 3
secret=memory-at-rest-secret-memory-at-rest
dir=$(mktemp -d)
"$bin" serve --listen 127.0.0.1:$port --data-dir "$dir" --shards 2 --jwt-secret "$secret" \
  --messages-per-s-max 0 --log-level warn "$@" &
pid=$!
sleep 3
rss() { grep -E 'VmRSS|RssAnon|RssFile|RssShmem' /proc/$pid/status | tr -s ' \t' ' ' | tr '\n' ';'; echo; }
echo "idle after start: $(rss)"
"$lg" chat --addr 127.0.0.1:$port --secret "$secret" --conversations 50 --rate-per-user-per-s 20 \
  --warmup-s 0 --duration-s 3 --drain-s 5 --quiet --json-out "$dir/report.json" >/dev/null
python3 -c "import json,sys; r=json.load(open('$dir/report.json')); print('messages sent:', r.get('sent', r.get('messages_sent', '?')))" 2>/dev/null || true
sleep 3
echo "idle after ~6000 messages: $(rss)"
du -sh "$dir" | sed 's/^/data dir: /'
# Partitions with a log (data format 3 on; older builds have no such metric).
curl -s "http://127.0.0.1:$port/metrics" \
  | awk '/^chinwag_log_partitions_open/ {n += $2; seen = 1} END {if (seen) print "partitions open: " n}'
kill -TERM $pid; wait $pid || true
rm -rf "$dir"
