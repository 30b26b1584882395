"""Batch inference over Arrow tables through a pool of GPU actors: the driver puts the
input as pyarrow tables in the object store; each `Model` actor (one GPU each) loads its
weights once and scores the tables it is handed, which it reads from shared memory without
copying; `ActorPool` keeps every actor busy. The driver checks every score against the
same model run here.

    python examples/python/batch_inference.py            # 40 tables of 2,000 rows, 2 actors
    python examples/python/batch_inference.py --large    # 200 tables of 20,000 rows, 4 actors
    IONET_API_KEY=<key> python examples/python/batch_inference.py --address HEAD:6380
"""

import time

import numpy as np
import pyarrow as pa

import ionet
from ionet.util import ActorPool
from _example import fail, size, start

FEATURES, HIDDEN, SEED = 8, 32, 42


def load(seed: int):
    """A small two-layer network's weights, drawn from `seed` as a stand-in for loading a
    checkpoint."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((FEATURES, HIDDEN)) / np.sqrt(FEATURES), 0.1 * rng.standard_normal(HIDDEN),
            rng.standard_normal(HIDDEN) / np.sqrt(HIDDEN))  # fmt: skip


def score(network, table: pa.Table) -> np.ndarray:
    hidden, bias, output = network
    x = np.column_stack([table.column(f"x{j}").to_numpy() for j in range(FEATURES)])
    return 1 / (1 + np.exp(-(np.tanh(x @ hidden + bias) @ output)))


def batch(index: int, rows: int) -> pa.Table:
    rng = np.random.default_rng(1_000 + index)
    return pa.table({f"x{j}": rng.standard_normal(rows) for j in range(FEATURES)})


@ionet.remote(num_gpus=1)
class Model:
    def __init__(self, seed: int):
        self.network = load(seed)

    def predict(self, table: pa.Table) -> np.ndarray:
        return score(self.network, table)


def main() -> None:
    args = start("Arrow tables scored by a pool of GPU actors", num_cpus=4, num_gpus=4, _gpu_type="L40S")
    batches, rows, actors = size(args, (40, 2_000, 2), (200, 20_000, 4))
    started = time.time()
    inputs = [ionet.put(batch(index, rows)) for index in range(batches)]
    pool = ActorPool([Model.remote(SEED) for _ in range(actors)])
    scores = list(pool.map(lambda model, table: model.predict.remote(table), inputs))
    total = sum(len(s) for s in scores)
    positive = sum(int(np.count_nonzero(s > 0.5)) for s in scores)
    print(f"{total} rows in {batches} Arrow tables scored by {actors} GPU actors in {time.time() - started:.1f} s: "
          f"{positive / total:.1%} scored positive")
    network = load(SEED)
    for index, got in enumerate(scores):
        # Another machine's vector math may round differently in the last bits.
        if not np.allclose(got, score(network, batch(index, rows)), rtol=1e-12, atol=0):
            fail(f"table {index}: the actors' scores differ from the model's here")
    print("checked: every score matches the model run here")
    ionet.shutdown()


if __name__ == "__main__":
    main()
