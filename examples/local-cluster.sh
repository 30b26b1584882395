#!/usr/bin/env bash
# The main job: ionet end to end on this machine, in about a minute once built. No GPU,
# account or blockchain is needed: GPUs are declared, money is kept in the head's
# embedded ledger.
#   1. An operator starts a head; three GPU providers join it, each with a key of its own
#      and its own GPU model, price and region.
#   2. A tenant gets an account with $25 of credit and a quote for 4 GPUs.
#   3. The tenant's ML job runs: a hyperparameter sweep (examples/src/bin/sweep.rs) that
#      reserves the 4 cheapest GPUs free as a placement group and runs one GPU task a
#      trial in it, every lease metered.
#   4. The operator settles the epoch: the tenant's receipt, each provider's earnings and
#      the protocol fee, checked against each other; then everything started is stopped.
#
#   bash examples/local-cluster.sh            all of it
#   KEEP=1 bash examples/local-cluster.sh     leave the cluster running afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Building ionet and the example programs (once; later runs reuse the build)"
cargo build --quiet -p ionet-worker --bin ionet -p ionet-examples --bin sweep
target="${CARGO_TARGET_DIR:-target}/debug"
ionet="$target/ionet"
started_at=$(date +%s)
export IONET_SESSION_DIR="${IONET_SESSION_DIR:-$(mktemp -d -t ionet-session.XXXXXX)}"
if [ -z "${KEEP:-}" ]; then trap '"$ionet" stop >/dev/null' EXIT; fi

say "1. The operator starts a head (TLS, as between machines); three providers join it"
# The head makes the cluster CA and prints the join command with its hash; a provider's
# node trusts the head only if its CA has that hash. The head itself runs no work here.
started=$("$ionet" start --head --tls --port 0 --num-cpus 0)
address=$(cat "$IONET_SESSION_DIR/head_address")
ca_hash=$(echo "$started" | sed -n 's/.*--ca-hash \([^ ]*\).*/\1/p')
echo "head at $address, CA $ca_hash"
# Each provider joins with a join token the operator made, and a key of its own.
join=$("$ionet" token create --role node --ttl 1h 2>/dev/null)
provider() { # wallet cpus gpus model price labels
  "$ionet" start --address "$address" --ca-hash "$ca_hash" --join-token "$join" \
    --node-key "$IONET_SESSION_DIR/$1.key" --num-cpus "$2" --num-gpus "$3" --gpu-type "$4" \
    --price-per-gpu-hour "$5" --labels "$6" --wallet "$1" >/dev/null
  echo "provider $1 joined: $3 x $4 at \$$5 per GPU-hour ($6)"
}
provider dc-frankfurt 16 4 A100-80GB 1.20 region=eu,provider=dc-frankfurt
provider miner-ohio 8 2 RTX4090 0.35 region=us,provider=miner-ohio
provider dc-singapore 32 8 H100 2.10 region=ap,provider=dc-singapore
echo
"$ionet" status

say "2. A tenant, acme, gets an account and \$25 of credit, and asks what 4 GPUs cost"
api_key=$("$ionet" account create acme 2>/dev/null)
"$ionet" credits add --account acme --amount 25
"$ionet" quote --gpus 4 --hours 1

say "3. acme's job: a hyperparameter sweep on the 4 cheapest GPUs, one GPU task a trial"
IONET_API_KEY="$api_key" "$target/sweep" --address auto | tee "$IONET_SESSION_DIR/sweep.out"
job=$(sed -n 's/^job \([0-9a-f]*\)$/\1/p' "$IONET_SESSION_DIR/sweep.out")

say "4. The operator settles the epoch: acme's receipt, what each provider earned, the fee"
# The job's leases close as its workers go: the receipt is final once none is open.
for _ in $(seq 100); do
  "$ionet" usage --job "$job" --json | python3 -c 'import json, sys; sys.exit(any(r["open"] for r in json.load(sys.stdin)))' && break
  sleep 0.1
done
"$ionet" job cost "$job"
"$ionet" job cost "$job" --json > "$IONET_SESSION_DIR/receipt.json"
"$ionet" settle --json > "$IONET_SESSION_DIR/settled.json"
"$ionet" usage --job "$job" --json > "$IONET_SESSION_DIR/usage.json"
echo
python3 - "$IONET_SESSION_DIR" <<'PY'
# The receipt, the settlement and the lease records must tell one story, to the
# micro-dollar: a lease costs its milliseconds at its node's prices; the receipt floors
# each line, settlement floors once per payer and provider, and the fee is that
# payout's fee_bps.
import json, sys
from collections import defaultdict
session = sys.argv[1]
receipt = json.load(open(f"{session}/receipt.json"))
settled = json.load(open(f"{session}/settled.json"))
usage = json.load(open(f"{session}/usage.json"))
usd = lambda micros: f"${micros / 1e6:.6f}"
DENOMINATOR = 10_000 * 3_600_000  # resource units (1/10000) x milliseconds per hour
lines, bps = receipt["lines"], receipt["fee_bps"]
assert lines, "the job leased nothing"
wallets = {record["node_id"]: record["provider_wallet"] for record in usage}
exact = defaultdict(int)  # per provider's wallet: the exact cost x DENOMINATOR
for line in lines:
    assert not line["open"], line
    ms = line["end_ms"] - line["start_ms"]
    units = lambda name: round(float(line["resources"].get(name, 0)) * 10_000)
    numerator = ms * (units("GPU") * line["price_per_gpu_hour_micros"] + units("CPU") * line["price_per_cpu_hour_micros"])
    assert line["cost_micros"] == numerator // DENOMINATOR, (line, numerator)
    assert line["fee_micros"] == line["cost_micros"] * bps // 10_000, line
    exact[wallets[line["node_id"]]] += numerator
assert receipt["total_cost_micros"] == sum(line["cost_micros"] for line in lines), "the receipt's total is not its lines' sum"
assert receipt["total_fee_micros"] == sum(line["fee_micros"] for line in lines)
payer = next(p for p in settled["payers"] if p["payer"] == "acme")
print(f"acme's receipt: {len(lines)} leases, usage {usd(receipt['total_cost_micros'])} + protocol fee "
      f"{usd(receipt['total_fee_micros'])} ({bps} bps) = {usd(receipt['total_micros'])}")
earned = {p["wallet"]: p["revenue_micros"] for p in settled["providers"]}
payouts = {wallet: numerator // DENOMINATOR for wallet, numerator in exact.items()}
print(f"settled: acme paid {usd(payer['usage_micros'])} + fee {usd(payer['fee_micros'])}, "
      f"credit left {usd(payer['balance_after_micros'])} of $25")
paid = {wallet for wallet, revenue in earned.items() if revenue > 0}
assert paid == set(payouts), ("paid providers", sorted(paid), sorted(payouts))
for wallet, payout in sorted(payouts.items()):
    assert earned.get(wallet) == payout, (wallet, earned.get(wallet), payout)
    print(f"  {wallet:<14} earned {usd(payout)}")
assert payer["usage_micros"] == sum(payouts.values()), (payer, payouts)
assert payer["fee_micros"] == sum(payout * bps // 10_000 for payout in payouts.values()), payer
assert settled["total_fee_micros"] == payer["fee_micros"]
print(f"  protocol fee   {usd(settled['total_fee_micros'])} ({bps} bps of the usage, to the treasury)")
print("checked: each lease costs its time at its node's price, the receipt's lines add up to its total, "
      "each provider earned its leases' cost, the fee is its share")
PY
"$ionet" ledger balances
"$ionet" payouts
echo
echo "main job done in $(( $(date +%s) - started_at )) s after the build"
if [ -n "${KEEP:-}" ]; then
  echo
  echo "cluster left running: IONET_SESSION_DIR=$IONET_SESSION_DIR $ionet status | stop"
fi
