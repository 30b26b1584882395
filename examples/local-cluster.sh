#!/usr/bin/env bash
# The main job, on a fresh machine: builds ionet, starts a local head and two node
# daemons with declared GPUs (as a GPU provider would join them), prints `ionet status`,
# and stops the cluster. Needs only the Rust toolchain.
#   bash examples/local-cluster.sh            start, show, stop
#   KEEP=1 bash examples/local-cluster.sh     leave the cluster running
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet -p ionet-worker --bin ionet
ionet="${CARGO_TARGET_DIR:-target}/debug/ionet"
export IONET_SESSION_DIR="${IONET_SESSION_DIR:-$(mktemp -d -t ionet-session.XXXXXX)}"
if [ -z "${KEEP:-}" ]; then trap '"$ionet" stop >/dev/null' EXIT; fi

# TLS, as between machines: the head makes the cluster CA and prints the join command
# with its hash; a provider's node trusts the head only if its CA has that hash.
started=$("$ionet" start --head --tls --port 0 --num-cpus 2)
echo "$started"
address=$(cat "$IONET_SESSION_DIR/head_address")
ca_hash=$(echo "$started" | sed -n 's/.*--ca-hash \([^ ]*\).*/\1/p')
# Each provider joins with a join token the operator made, and a key of its own.
join=$("$ionet" token create --role node --ttl 1h 2>/dev/null)
"$ionet" start --address "$address" --ca-hash "$ca_hash" --join-token "$join" \
  --node-key "$IONET_SESSION_DIR/provider-eu-1.key" \
  --num-cpus 16 --num-gpus 4 --gpu-type A100-80GB \
  --price-per-gpu-hour 1.20 --labels region=eu,provider=dc-frankfurt --wallet provider-eu-1
"$ionet" start --address "$address" --ca-hash "$ca_hash" --join-token "$join" \
  --node-key "$IONET_SESSION_DIR/provider-us-7.key" \
  --num-cpus 8 --num-gpus 2 --gpu-type RTX4090 \
  --price-per-gpu-hour 0.35 --labels region=us,provider=miner-ohio --wallet provider-us-7
echo
"$ionet" status
if [ -n "${KEEP:-}" ]; then
  echo
  echo "cluster left running: IONET_SESSION_DIR=$IONET_SESSION_DIR $ionet status | stop"
fi
