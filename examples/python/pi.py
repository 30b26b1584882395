"""Monte Carlo π over tasks: each task throws darts at the unit square with numpy and
counts those inside the quarter circle; the driver adds the counts. Checks π to within
0.01.

    python examples/python/pi.py             # 100 tasks x 100,000 darts on an embedded cluster
    python examples/python/pi.py --large     # 1,000 tasks x 1,000,000 darts
    IONET_API_KEY=<key> python examples/python/pi.py --address HEAD:6380
"""

import math
import time

import numpy as np

import ionet
from _example import fail, size, start


@ionet.remote
def inside(seed: int, darts: int) -> int:
    rng = np.random.default_rng(seed)
    x, y = rng.random(darts), rng.random(darts)
    return int(np.count_nonzero(x * x + y * y <= 1.0))


def main() -> None:
    args = start("Monte Carlo π over tasks")
    tasks, darts = size(args, (100, 100_000), (1_000, 1_000_000))
    started = time.time()
    hits = sum(ionet.get([inside.remote(seed, darts) for seed in range(tasks)]))
    pi = 4 * hits / (tasks * darts)
    print(f"π ≈ {pi:.5f} from {tasks * darts} darts in {tasks} tasks ({time.time() - started:.1f} s)")
    if abs(pi - math.pi) > 0.01:
        fail(f"π came out {pi}")
    ionet.shutdown()


if __name__ == "__main__":
    main()
