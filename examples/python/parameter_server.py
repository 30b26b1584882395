"""A parameter server with worker actors (Ray's classic pattern): logistic regression
trained by synchronous data parallelism. Each `DataWorker` actor holds a shard of the data
and computes the gradient for the weights it is handed; the `ParameterServer` actor holds
the weights and applies the workers' gradients, which reach it as object refs (resolved
before the call runs: they never pass through the driver). The driver checks held-out
accuracy and that the weights are those the same steps give here.

    python examples/python/parameter_server.py            # 4 workers, 100 steps
    python examples/python/parameter_server.py --large    # 8 workers, 400 steps, 10x data
    IONET_API_KEY=<key> python examples/python/parameter_server.py --address HEAD:6380
"""

import time

import numpy as np

import ionet
from _example import fail, size, start

FEATURES = 10


def shard(rows: int, seed: int):
    rng = np.random.default_rng(seed)
    truth = np.where(np.arange(FEATURES) % 2 == 0, 1.5, -1.0)
    x = rng.standard_normal((rows, FEATURES))
    return x, (x @ truth + 0.3 * rng.standard_normal(rows) > 0).astype(np.float64)


def gradient(x, y, weights):
    return x.T @ (1 / (1 + np.exp(-(x @ weights))) - y) / len(y)


@ionet.remote
class ParameterServer:
    def __init__(self, learning_rate: float):
        self.weights = np.zeros(FEATURES)
        self.learning_rate = learning_rate

    def apply_gradients(self, *gradients):
        self.weights = self.weights - self.learning_rate * np.mean(gradients, axis=0)
        return self.weights

    def get_weights(self):
        return self.weights


@ionet.remote
class DataWorker:
    def __init__(self, rows: int, seed: int):
        self.x, self.y = shard(rows, seed)

    def compute_gradient(self, weights):
        return gradient(self.x, self.y, weights)


def main() -> None:
    args = start("synchronous data-parallel training with a parameter server actor")
    workers, rows, steps = size(args, (4, 1_000, 100), (8, 10_000, 400))
    learning_rate = 0.5
    started = time.time()
    server = ParameterServer.remote(learning_rate)
    shards = [DataWorker.remote(rows, index + 1) for index in range(workers)]
    weights = server.get_weights.remote()
    for step in range(steps):
        weights = server.apply_gradients.remote(*[worker.compute_gradient.remote(weights) for worker in shards])
        if (step + 1) % (steps // 5) == 0:
            print(f"step {step + 1:>4}/{steps}: weights {np.round(ionet.get(weights)[:3], 3)}…")
    trained = ionet.get(server.get_weights.remote())
    print(f"{workers} workers x {rows} rows, {steps} steps in {time.time() - started:.1f} s")

    data = [shard(rows, index + 1) for index in range(workers)]
    here = np.zeros(FEATURES)
    for _ in range(steps):
        here = here - learning_rate * np.mean([gradient(x, y, here) for x, y in data], axis=0)
    if not np.allclose(here, trained, rtol=0, atol=1e-12):
        fail(f"the cluster trained {trained}, here {here}")
    test_x, test_y = shard(2_000, 999)
    accuracy = float(np.mean(((test_x @ trained) > 0) == (test_y > 0.5)))
    print(f"held-out accuracy {accuracy:.1%}")
    if accuracy < 0.9:
        fail(f"held-out accuracy {accuracy} is below 0.9")
    print("checked: the weights are those the same steps give here")
    ionet.shutdown()


if __name__ == "__main__":
    main()
