"""Map-reduce over numpy arrays: the data is put in the object store in chunks; map tasks
each read one chunk (a read-only view of shared memory, not a copy) and return a partial
histogram and partial sums; reduce tasks merge them in a tree; the driver checks the
result against numpy over the whole array at once.

    python examples/python/map_reduce.py            # 32 chunks of 250,000 values
    python examples/python/map_reduce.py --large    # 256 chunks of 1,000,000 values
    IONET_API_KEY=<key> python examples/python/map_reduce.py --address HEAD:6380
"""

import time

import numpy as np

import ionet
from _example import fail, size, start

BINS = np.linspace(-5, 5, 41)


def chunk(index: int, values: int) -> np.ndarray:
    return np.random.default_rng(index).standard_normal(values)


@ionet.remote
def summarise(values: np.ndarray):
    """The map step: a chunk's histogram, count, sum and sum of squares."""
    histogram, _ = np.histogram(values, bins=BINS)
    return histogram, len(values), float(values.sum()), float((values * values).sum())


@ionet.remote
def merge(*parts):
    """The reduce step: summaries added up (a reduce task takes at most 8 at a time)."""
    return (sum(part[0] for part in parts), sum(part[1] for part in parts),
            sum(part[2] for part in parts), sum(part[3] for part in parts))  # fmt: skip


def main() -> None:
    args = start("map-reduce over numpy arrays")
    chunks, values = size(args, (32, 250_000), (256, 1_000_000))
    started = time.time()
    data = [ionet.put(chunk(index, values)) for index in range(chunks)]
    level = [summarise.remote(ref) for ref in data]
    while len(level) > 1:
        level = [merge.remote(*level[at:at + 8]) for at in range(0, len(level), 8)]
    histogram, count, total, squares = ionet.get(level[0])
    mean = total / count
    std = (squares / count - mean * mean) ** 0.5
    print(f"{count} values in {chunks} chunks: mean {mean:+.5f}, std {std:.5f} ({time.time() - started:.1f} s)")
    whole = np.concatenate([chunk(index, values) for index in range(chunks)])
    expected, _ = np.histogram(whole, bins=BINS)
    if not np.array_equal(histogram, expected) or count != len(whole):
        fail("the merged histogram is not numpy's over the whole array")
    if abs(mean - whole.mean()) > 1e-9 or abs(std - whole.std()) > 1e-9:
        fail(f"mean {mean} and std {std} are not numpy's {whole.mean()} and {whole.std()}")
    print("checked: the histogram, mean and std are numpy's over the whole array")
    ionet.shutdown()


if __name__ == "__main__":
    main()
