#!/usr/bin/env bash
# The main job: ionet end to end on this machine, in about a minute once built. No GPU,
# account or blockchain is needed: GPUs are declared, money is kept in the head's
# embedded ledger, and providers are paid in real Solana transactions on a local chain
# (`ionet devnet`: the in-process Solana runtime with the real token programs, behind
# Solana's JSON-RPC, as the head would use a real node).
#   1. An operator starts a local chain and a head that pays through it; three GPU
#      providers join, each with a node key and a payout wallet of its own and its own
#      GPU model, price and region.
#   2. A tenant gets an account with $25 of credit and a quote for 4 GPUs.
#   3. The tenant's ML job runs: a hyperparameter sweep (examples/src/bin/sweep.rs) that
#      reserves the 4 cheapest GPUs free as a placement group and runs one GPU task a
#      trial in it, every lease metered.
#   4. The operator settles the epoch: the tenant's receipt, each provider's earnings and
#      the protocol fee, checked against each other; the head pays each provider on chain,
#      and each wallet's balance, read from the chain, is checked against what it earned.
#      Then everything started is stopped.
#
#   bash examples/local-cluster.sh            all of it
#   KEEP=1 bash examples/local-cluster.sh     leave the cluster running afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Building ionet and the example programs (once; later runs reuse the build)"
cargo build --quiet --features ionet-worker/devnet -p ionet-worker --bin ionet -p ionet-examples --bin sweep
target="${CARGO_TARGET_DIR:-target}/debug"
ionet="$target/ionet"
started_at=$(date +%s)
export IONET_SESSION_DIR="${IONET_SESSION_DIR:-$(mktemp -d -t ionet-session.XXXXXX)}"
if [ -z "${KEEP:-}" ]; then trap '"$ionet" stop >/dev/null' EXIT; fi

say "1. A local Solana chain starts; the operator starts a head (TLS, as between machines) that pays through it; three providers join"
# The chain's payout authority holds SOL for fees and 1000 devUSD, a 6-decimal test
# dollar (one base unit a micro-dollar, as USDC); on a real cluster these flags name a
# Solana RPC node, the operator's keypair and USDC's mint.
"$ionet" devnet start | sed -n 1,2p
devnet="$IONET_SESSION_DIR/devnet/devnet.json"
field() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$devnet" "$1"; }
# The head makes the cluster CA and prints the join command with its hash; a provider's
# node trusts the head only if its CA has that hash. The head itself runs no work: it
# holds the payout key.
started=$("$ionet" start --head --tls --port 0 --num-cpus 0 --payout-rpc-url "$(field rpc_url)" \
  --payout-keypair "$(field keypair)" --payout-asset "$(field asset)")
address=$(cat "$IONET_SESSION_DIR/head_address")
ca_hash=$(echo "$started" | sed -n 's/.*--ca-hash \([^ ]*\).*/\1/p')
echo "head at $address, CA $ca_hash"
# Each provider joins with a join token the operator made, and a key of its own.
join=$("$ionet" token create --role node --ttl 1h 2>/dev/null)
echo '{}' > "$IONET_SESSION_DIR/wallets.json"
provider() { # name cpus gpus model price labels
  # A payout wallet of its own: a Solana keypair whose address the head pays.
  wallet=$("$ionet" wallet new "$IONET_SESSION_DIR/$1.wallet.json")
  python3 -c 'import json, sys; w = json.load(open(sys.argv[1])); w[sys.argv[2]] = sys.argv[3]; json.dump(w, open(sys.argv[1], "w"))' \
    "$IONET_SESSION_DIR/wallets.json" "$1" "$wallet"
  "$ionet" start --address "$address" --ca-hash "$ca_hash" --join-token "$join" \
    --node-key "$IONET_SESSION_DIR/$1.key" --num-cpus "$2" --num-gpus "$3" --gpu-type "$4" \
    --price-per-gpu-hour "$5" --labels "$6" --wallet "$wallet" >/dev/null
  echo "provider $1 joined: $3 x $4 at \$$5 per GPU-hour ($6), paid to wallet $wallet"
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
name_of = {wallet: name for name, wallet in json.load(open(f"{session}/wallets.json")).items()}
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
if (payer["usage_micros"], payer["fee_micros"]) != (receipt["total_cost_micros"], receipt["total_fee_micros"]):
    print("  (the receipt rounds each lease down to the micro-dollar; settlement sums a provider's "
          "exact costs first and rounds once, so they can differ by a few micro-dollars)")
paid = {wallet for wallet, revenue in earned.items() if revenue > 0}
assert paid == set(payouts), ("paid providers", sorted(paid), sorted(payouts))
for wallet, payout in sorted(payouts.items(), key=lambda item: name_of[item[0]]):
    assert earned.get(wallet) == payout, (wallet, earned.get(wallet), payout)
    print(f"  {name_of[wallet]:<14} earned {usd(payout)}")
assert payer["usage_micros"] == sum(payouts.values()), (payer, payouts)
assert payer["fee_micros"] == sum(payout * bps // 10_000 for payout in payouts.values()), payer
assert settled["total_fee_micros"] == payer["fee_micros"]
print(f"  protocol fee   {usd(settled['total_fee_micros'])} ({bps} bps of the usage, to the treasury)")
print("checked: each lease costs its time at its node's price, the receipt's lines add up to its total, "
      "each provider earned its leases' cost, the fee is its share")
PY

say "5. The head pays each provider on chain, and each wallet's balance is read back from the chain"
# Settling woke the head's payer: it signs one transaction per batch of providers (a
# devUSD transfer each, and a memo naming the epoch), stores it before sending, and
# posts what landed to the ledger.
for _ in $(seq 300); do
  "$ionet" payouts --json | python3 -c 'import json, sys; e = json.load(sys.stdin)["epochs"]; sys.exit(not (e and all(x["complete"] for x in e)))' && break
  sleep 0.1
done
"$ionet" payouts
"$ionet" payouts --json > "$IONET_SESSION_DIR/payouts.json"
python3 - "$IONET_SESSION_DIR" "$ionet" <<'PY'
# What each wallet holds on the chain, asked of the chain's RPC (not of the head), must
# be what the settlement says it earned, to the micro-dollar (devUSD has 6 decimals).
import json, subprocess, sys
session, ionet = sys.argv[1], sys.argv[2]
settled = json.load(open(f"{session}/settled.json"))
payouts = json.load(open(f"{session}/payouts.json"))
earned = {p["wallet"]: p["revenue_micros"] + p.get("reward_micros", 0) for p in settled["providers"]}
assert payouts["enabled"] and payouts["epochs"], payouts
assert all(epoch["complete"] for epoch in payouts["epochs"]), "the payouts did not land in 30 s"
signatures = [batch["signature"] for epoch in payouts["epochs"] for batch in epoch["batches"]]
assert all(signatures), payouts
paid = sum(batch["micro_usd"] for epoch in payouts["epochs"] for batch in epoch["batches"])
assert paid == sum(earned.values()), (paid, earned)
for name, wallet in sorted(json.load(open(f"{session}/wallets.json")).items()):
    balance = json.loads(subprocess.run([ionet, "wallet", "balance", wallet, "--json"], check=True, capture_output=True, text=True).stdout)
    assert balance["usd_micros"] == earned.get(wallet, 0), (name, balance, earned.get(wallet))
    print(f"  {name:<14} wallet {wallet} holds {balance['amount'] / 1e6:.6f} devUSD on chain")
print(f"checked: {len(signatures)} payout transaction(s) landed; each wallet holds what its provider earned")
PY
echo
echo "the ledger after the payouts: what acme paid went to the treasury's fee and, on chain, to the providers"
"$ionet" ledger balances
echo
echo "main job done in $(( $(date +%s) - started_at )) s after the build"
if [ -n "${KEEP:-}" ]; then
  echo
  echo "cluster left running: IONET_SESSION_DIR=$IONET_SESSION_DIR $ionet status | stop"
fi
