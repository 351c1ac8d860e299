#!/usr/bin/env bash
# Sizing figures of a 2-shard node: memory at rest, per idle / logged-in connection, per
# conversation. usage: safety-sizing.sh CHINWAG_BIN LOADGEN_BIN PORT
set -euo pipefail
bin=$1; lg=$2; port=$3
secret=memory-at-rest-secret-memory-at-rest
dir=$(mktemp -d)
"$bin" serve --listen 127.0.0.1:$port --data-dir "$dir" --shards 2 --jwt-secret "$secret" \
  --messages-per-s-max 0 --log-level warn &
pid=$!
sleep 3
kb() { awk -v k="$1:" '$1==k {print $2}' /proc/$pid/status; }
show() { echo "$1: VmRSS $(kb VmRSS) kB, RssAnon $(kb RssAnon) kB, RssFile $(kb RssFile) kB"; }
show "at rest, empty"
a0=$(kb RssAnon); r0=$(kb VmRSS)
# 2000 idle connections: WebSocket upgrades that never log in.
python3 - "$port" <<'PY' &
import socket, sys, time
socks = []
for i in range(2000):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    s.sendall(b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    s.recv(200)
    socks.append(s)
time.sleep(6)
PY
py=$!
sleep 4
a1=$(kb RssAnon); r1=$(kb VmRSS)
show "2000 idle WebSockets"
echo "per idle connection: RSS $(( (r1 - r0) * 1024 / 2000 )) B (anon $(( (a1 - a0) * 1024 / 2000 )) B)"
wait $py; sleep 2
a0=$(kb RssAnon); r0=$(kb VmRSS)
"$lg" connect --addr 127.0.0.1:$port --secret "$secret" --connections 2000 --hold-s 6 \
  --heartbeat-s 30 --quiet >/dev/null &
lgpid=$!
sleep 4
a1=$(kb RssAnon); r1=$(kb VmRSS)
show "2000 logged-in connections"
echo "per logged-in connection: RSS $(( (r1 - r0) * 1024 / 2000 )) B (anon $(( (a1 - a0) * 1024 / 2000 )) B)"
wait $lgpid || true; sleep 2
# Warm-up: a few thousand messages fault the cmid table in (it is resident at rest anyway).
"$lg" chat --addr 127.0.0.1:$port --secret "$secret" --conversations 200 --rate-per-user-per-s 20 \
  --warmup-s 0 --duration-s 2 --drain-s 5 --quiet >/dev/null
sleep 2
show "after ~16000 warm-up messages"
a0=$(kb RssAnon)
"$lg" chat --addr 127.0.0.1:$port --secret "$secret" --conversations 2000 --rate-per-user-per-s 1 \
  --warmup-s 0 --duration-s 2 --drain-s 5 --quiet >/dev/null
sleep 2
a1=$(kb RssAnon)
show "after 2000 direct conversations (4000 users, ~8000 messages)"
echo "per conversation (with its 2 users' devices and ~4 messages' state): anon $(( (a1 - a0) * 1024 / 2000 )) B"
kill -TERM $pid; wait $pid || true
rm -rf "$dir"
