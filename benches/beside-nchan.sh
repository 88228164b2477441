#!/usr/bin/env bash
# channelgate and Nchan measured in the same runs, one after the other, each server pinned to
# core 0 and channelgate-bench to core 1, a fresh server for every run (BENCHMARKS.md,
# "Beside Nchan"). Needs nginx and libnginx-mod-nchan (Debian's packages), and
# target/release/channelgate and channelgate-bench built (cargo build --release).
#   benches/beside-nchan.sh [ROUNDS] [SCENARIO...]    (scenarios: s3u s3s s2 s1l s4 s5)
# Prints each run's summary lines; the JSON line of every run goes to $OUT/runs.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
shift || true
SCENARIOS=${*:-s3u s3s s2 s1l s4 s5}
OUT=${OUT:-/tmp/beside-nchan}
mkdir -p "$OUT" /tmp/nchan
ulimit -n 20000
BENCH=target/release/channelgate-bench

stop() {
  pkill -f 'serve --listen 127.0.0.1:18080' 2>/dev/null
  [ -f /tmp/nchan/nginx.pid ] && kill "$(cat /tmp/nchan/nginx.pid)" 2>/dev/null
  for _ in $(seq 1 50); do
    pgrep -f 'serve --listen 127.0.0.1:18080' >/dev/null || pgrep -f 'nginx: worker' >/dev/null || break
    sleep 0.1
  done
}
trap stop EXIT

start_channelgate() {
  taskset -c 0 target/release/channelgate serve --listen 127.0.0.1:18080 \
    --grpc-listen 127.0.0.1:15051 >"$OUT/node.log" 2>&1 &
  for _ in $(seq 1 100); do
    curl -sf http://127.0.0.1:18080/readyz >/dev/null 2>&1 && break
    sleep 0.1
  done
  PID=$(pgrep -f 'serve --listen 127.0.0.1:18080')
}

start_nchan() {
  taskset -c 0 nginx -p /tmp/nchan -c "$PWD/benches/nchan.conf" >"$OUT/nginx.log" 2>&1 &
  for _ in $(seq 1 100); do
    PID=$(pgrep -f 'nginx: worker') && break
    sleep 0.1
  done
  sleep 0.3
}

# run NAME SERVER ARGS...: one run against a fresh SERVER (channelgate or nchan).
run() {
  local name=$1 server=$2
  shift 2
  stop
  if [ "$server" = nchan ]; then
    start_nchan
    set -- --target nchan --ws 127.0.0.1:18081 "$@"
  else
    start_channelgate
    set -- --control http://127.0.0.1:15051 --ws 127.0.0.1:18080 "$@"
  fi
  echo "== $name $server"
  timeout 300 taskset -c 1 "$BENCH" --pid "$PID" "$@" 2>&1 |
    tee >(grep '^{' | sed "s/^{/{\"run\":\"$name\",\"server\":\"$server\",/" >>"$OUT/runs.jsonl") |
    grep -E '^(pushes|deliveries|lost|latency|node CPU|generator|RSS per|connected|failed)'
}

for round in $(seq 1 "$ROUNDS"); do
  echo "#### round $round"
  for s in $SCENARIOS; do
    case $s in
      s3u)
        run s3u channelgate --scenario fanout --sockets 10000 --channels 10000 --rate 0 --duration 10 --push-with unary --push-connections 4 --in-flight 4
        run s3u nchan --scenario fanout --sockets 10000 --channels 10000 --rate 0 --duration 10 --in-flight 4
        ;;
      s3s)
        run s3s channelgate --scenario fanout --sockets 10000 --channels 10000 --rate 0 --duration 10
        ;;
      s2)
        run s2 channelgate --scenario fanout --sockets 5000 --channels 1 --rate 0 --duration 10
        run s2 nchan --scenario fanout --sockets 5000 --channels 1 --rate 0 --duration 10 --in-flight 16
        ;;
      s1l)
        run s1l channelgate --scenario fanout --sockets 1000 --channels 1 --rate 10 --duration 20 --push-with unary --in-flight 1
        run s1l nchan --scenario fanout --sockets 1000 --channels 1 --rate 10 --duration 20 --in-flight 1
        ;;
      s4)
        run s4 channelgate --scenario idle --sockets 19000 --sources 16 --concurrency 250
        run s4 nchan --scenario idle --sockets 19000 --sources 16 --concurrency 250
        ;;
      s5)
        run s5 channelgate --scenario idle --sockets 10000 --sources 16 --concurrency 250
        run s5 nchan --scenario idle --sockets 10000 --sources 16 --concurrency 250
        ;;
    esac
  done
done
