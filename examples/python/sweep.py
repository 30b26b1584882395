"""A hyperparameter sweep on the cheapest GPUs: ridge regression trained by minibatch SGD
(numpy) for each learning rate and L2 penalty of a grid, one GPU task a trial. The sweep
first reserves 4 GPUs as a placement group, the cheapest the cluster has free
(`cheapest_first=True`, ionet's own), and runs its trials in that group's bundles. The
dataset is put in the object store once; progress is printed as trials finish, with
where each ran. The driver trains every trial here too and checks the cluster gave the
same answers.

    python examples/python/sweep.py            # 18 trials on an embedded cluster (4 declared GPUs)
    python examples/python/sweep.py --large    # 48 trials on 10 times the data
    IONET_API_KEY=<key> python examples/python/sweep.py --address HEAD:6380
"""

import itertools
import math
import time

import numpy as np

import ionet
from ionet.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ionet.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from _example import fail, size, start

NOISE = 0.1


def dataset(rows: int, features: int = 16, seed: int = 7):
    rng = np.random.default_rng(seed)
    weights = np.sin(np.arange(1, features + 1))
    x = rng.standard_normal((rows, features))
    return x, x @ weights + NOISE * rng.standard_normal(rows)


def train(data, learning_rate: float, l2: float, epochs: int) -> float:
    """Trains on the first four fifths (minibatches of 32, in order); the mean squared
    error on the last fifth (inf: it diverged)."""
    x, y = data
    split = len(y) * 4 // 5
    w = np.zeros(x.shape[1])
    with np.errstate(all="ignore"):
        for _ in range(epochs):
            for start_row in range(0, split, 32):
                xb, yb = x[start_row:min(start_row + 32, split)], y[start_row:min(start_row + 32, split)]
                gradient = 2 * xb.T @ (xb @ w - yb) / len(yb)
                w = w - learning_rate * (gradient + 2 * l2 * w)
            if not np.all(np.isfinite(w)):
                return float("inf")
        mse = float(np.mean((x[split:] @ w - y[split:]) ** 2))
    return mse if np.isfinite(mse) else float("inf")


@ionet.remote(num_gpus=1)
def run_trial(data, learning_rate: float, l2: float, epochs: int):
    started = time.time()
    mse = train(data, learning_rate, l2, epochs)
    return {
        "learning_rate": learning_rate,
        "l2": l2,
        "mse": mse,
        "node_id": ionet.get_runtime_context().get_node_id(),
        "gpu_ids": ionet.get_gpu_ids(),
        "seconds": time.time() - started,
    }


def main() -> None:
    args = start("a hyperparameter sweep, one GPU task a trial, on the cheapest GPUs",
                 num_cpus=4, num_gpus=4, _gpu_type="A100-80GB")
    rows, epochs = size(args, (2_000, 20), (20_000, 30))
    rates = size(args, [0.3, 0.1, 0.03, 0.01, 0.003, 0.001], [0.3, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005])
    penalties = size(args, [0.0, 0.001, 0.01], [0.0, 0.0001, 0.0003, 0.001, 0.003, 0.01])
    trials = list(itertools.product(rates, penalties))
    nodes = {node["NodeID"]: node for node in ionet.nodes()}
    group = placement_group([{"GPU": 1, "CPU": 1}] * 4, strategy="PACK", cheapest_first=True)
    if not group.wait(120):
        fail("4 GPUs could not be reserved within 2 minutes")
    held = sorted(placement_group_table(group)["bundles_to_node_id"].values())
    print(f"reserved 4 GPUs, the cheapest free, on nodes {', '.join(node[:8] for node in held)}")
    in_the_group = PlacementGroupSchedulingStrategy(group)
    data = dataset(rows)
    data_ref = ionet.put(data)
    print(f"{len(trials)} trials of ridge regression ({rows} rows, {epochs} epochs), one GPU each, cheapest GPUs first")
    started = time.time()
    pending = [run_trial.options(scheduling_strategy=in_the_group).remote(data_ref, rate, l2, epochs) for rate, l2 in trials]
    outcomes = []
    while pending:
        done, pending = ionet.wait(pending, num_returns=1, timeout=600)
        if not done:
            fail("no trial finished within 10 minutes")
        outcome = ionet.get(done[0])
        outcomes.append(outcome)
        labels = nodes.get(outcome["node_id"], {}).get("Labels", {})
        print(f"  trial {len(outcomes):>2}/{len(trials)}  lr {outcome['learning_rate']:<6} l2 {outcome['l2']:<6} "
              f"validation MSE {outcome['mse']:>10.6f}  {outcome['seconds']:.2f} s on node {outcome['node_id'][:8]} "
              f"GPU {outcome['gpu_ids']} {labels.get('region', '')}")
    remove_placement_group(group)
    best = min(outcomes, key=lambda outcome: outcome["mse"])
    print(f"best: lr {best['learning_rate']} l2 {best['l2']}: validation MSE {best['mse']:.6f} "
          f"(the noise alone gives {NOISE ** 2:.6f}); {len(outcomes)} trials in {time.time() - started:.1f} s")
    for outcome in outcomes:
        here = train(data, outcome["learning_rate"], outcome["l2"], epochs)
        # Another machine's BLAS may round differently in the last bits.
        if not math.isclose(here, outcome["mse"], rel_tol=1e-9):
            fail(f"trial {outcome['learning_rate']}, {outcome['l2']}: the cluster said {outcome['mse']}, here {here}")
    if not best["mse"] < 2 * NOISE ** 2:
        fail(f"the best trial's error {best['mse']} is far above the noise's")
    print("checked: every trial's answer matches training it here")
    ionet.shutdown()


if __name__ == "__main__":
    main()
