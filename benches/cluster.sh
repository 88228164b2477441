#!/usr/bin/env bash
# The cluster scenario of BENCHMARKS.md: three gateway nodes, sockets spread over them on
# 10,000 channels, pushes through all three; once on one Redis and once on a Redis Cluster of
# three masters (and three replicas), in the same run. Prints the generator's figures for
# each, including Redis CPU per push in all and per master.
#
#   benches/cluster.sh [extra channelgate-bench flags]     (defaults below; needs redis-server)
set -euo pipefail
cd "$(dirname "$0")/.."
SOCKETS=${SOCKETS:-10000}
CHANNELS=${CHANNELS:-10000}
RATE=${RATE:-5000}
DURATION=${DURATION:-10}
SECRET=bench-cluster-secret-0123456789abcdef
DIR=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
cargo build --release -q --bin channelgate --bin channelgate-bench
ulimit -n 65536 2>/dev/null || true

redis() { # port [cluster]
  local extra=()
  if [ "${2:-}" = cluster ]; then
    extra=(--cluster-enabled yes --cluster-config-file "nodes-$1.conf" --cluster-node-timeout 2000)
  fi
  redis-server --port "$1" --bind 127.0.0.1 --save '' --appendonly no --dir "$DIR" \
    "${extra[@]}" >"$DIR/redis-$1.log" 2>&1 &
  PIDS+=($!)
  until redis-cli -p "$1" PING >/dev/null 2>&1; do sleep 0.05; done
}

EXTRA=("$@")
run() { # label redis-url redis-ports (comma-separated)
  local label=$1 url=$2 ports=$3
  local nodes=() node_pids=() prefix="bench$RANDOM"
  for i in 0 1 2; do
    target/release/channelgate serve --listen "127.0.0.1:$((18180 + i))" \
      --grpc-listen "127.0.0.1:$((15151 + i))" --redis "$url" --redis-prefix "$prefix" \
      --secret "$SECRET" >"$DIR/node-$label-$i.log" 2>&1 &
    node_pids+=($!)
    PIDS+=($!)
  done
  for i in 0 1 2; do
    until curl -sf "http://127.0.0.1:$((18180 + i))/readyz" >/dev/null; do sleep 0.1; done
  done
  nodes=("127.0.0.1:18181=http://127.0.0.1:15152" "127.0.0.1:18182=http://127.0.0.1:15153")
  echo "== $label ($url)"
  target/release/channelgate-bench --scenario fanout --control http://127.0.0.1:15151 \
    --ws 127.0.0.1:18180 --nodes "$(IFS=,; echo "${nodes[*]}")" --redis-ports "$ports" \
    --sockets "$SOCKETS" --channels "$CHANNELS" --rate "$RATE" --duration "$DURATION" \
    --sources 16 "${EXTRA[@]}"
  for i in 0 1 2; do
    echo "node $i: $(ps -o rss= -o times= -p "${node_pids[$i]}" | awk '{print "RSS " $1 " KiB, CPU " $2 " s"}')"
  done
  kill "${node_pids[@]}"
  wait "${node_pids[@]}" 2>/dev/null || true
}

# One Redis server.
redis 46390
run one-redis redis://127.0.0.1:46390 46390

# A Redis Cluster: three masters, three replicas.
CLUSTER=(47390 47391 47392 47393 47394 47395)
for p in "${CLUSTER[@]}"; do redis "$p" cluster; done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${CLUSTER[@]}") --cluster-replicas 1 \
  --cluster-yes >/dev/null
for p in "${CLUSTER[@]}"; do
  until redis-cli -p "$p" CLUSTER INFO | grep -q cluster_state:ok; do sleep 0.1; done
done
run three-masters redis-cluster://127.0.0.1:47390,127.0.0.1:47391,127.0.0.1:47392 \
  47390,47391,47392
