#!/usr/bin/env bash
# Instructions the node executes per unary Push (the push and its delivery to one socket; with
# WITH=stream, per push of one PushStream), counted by callgrind, which is repeatable on a noisy
# machine: the node runs under valgrind twice, once with FEW pushes and once with MANY, one call
# at a time from channelgate-bench, and the difference divided by (MANY - FEW) is one push's
# cost, start-up and connect cancelled out.
#   [NODE=binary] [WITH=unary|stream] benches/callgrind-push.sh [FEW] [MANY] [bench args...]
# Prints both totals and the cost per push; the two callgrind files stay for
# callgrind_annotate. Needs the node (NODE, default target/release/channelgate) and
# channelgate-bench built.
set -euo pipefail
cd "$(dirname "$0")/.."
FEW=${1:-200}
MANY=${2:-1200}
shift 2 || true
EXTRA=("$@")
OUT=${CALLGRIND_OUT:-/tmp/channelgate-callgrind}
# The node binary to count (another build, to compare).
NODE=${NODE:-target/release/channelgate}
mkdir -p "$OUT"
run() { # $1: pushes, $2: output file
  valgrind --tool=callgrind --callgrind-out-file="$2" --dump-instr=no \
    "$NODE" serve --listen 127.0.0.1:18380 --grpc-listen 127.0.0.1:15351 \
    >"$OUT/node.log" 2>&1 &
  local node=$!
  trap "kill -9 $node 2>/dev/null || true" EXIT
  for _ in $(seq 1 300); do
    curl -sf http://127.0.0.1:18380/readyz >/dev/null 2>&1 && break
    sleep 0.1
  done
  target/release/channelgate-bench --control http://127.0.0.1:15351 --ws 127.0.0.1:18380 \
    --scenario fanout --sockets 1 --channels 1 --rate 0 --duration 600 \
    --push-with "${WITH:-unary}" --push-connections 1 --in-flight 1 --push-count "$1" "${EXTRA[@]}" \
    | grep -E '^(pushes|lost)' >&2
  kill -INT "$node"
  wait "$node" || true
}
total() { grep -m1 '^summary:' "$1" | awk '{ print $2 }'; }
run "$FEW" "$OUT/few.out"
run "$MANY" "$OUT/many.out"
a=$(total "$OUT/few.out")
b=$(total "$OUT/many.out")
echo "instructions: $FEW pushes $a, $MANY pushes $b"
echo "per push (${WITH:-unary}): $(( (b - a) / (MANY - FEW) ))"
echo "callgrind files: $OUT/few.out $OUT/many.out (callgrind_annotate --inclusive=yes $OUT/many.out)"
