"""Ray's `ray microbenchmark`, measured on ionet from Python.

    python -m ionet.microbenchmark [FILTER] [--seconds S]

Each benchmark is one of Ray's (`ray/_private/ray_perf.py`), built and timed the same
way: a warm-up, then four trials of S seconds (default 1; Ray uses 2) calling the
timed body in steps; the rate is calls per second times the body's multiplier. Only
benchmarks whose name contains FILTER run (Ray's `TESTS_TO_RUN`). Each prints Ray's
line, `<name> per second <mean> +- <stddev>`, so that `compare_with_ray.sh` can set the
two side by side. "multi client" lines use several tasks or actors, as Ray's do.

Runs on an embedded cluster with this machine's CPUs; needs numpy.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import statistics
import time
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

import ionet
from ionet import _patterns

TRIALS = 4


@ionet.remote(num_cpus=0)
class Actor:
    def small_value(self):
        return b"ok"

    def small_value_arg(self, x):
        return b"ok"

    def small_value_batch(self, n):
        ionet.get([small_value.remote() for _ in range(n)])


@ionet.remote
class AsyncActor:
    async def small_value(self):
        return b"ok"

    async def small_value_with_arg(self, x):
        return b"ok"


@ionet.remote(num_cpus=0)
class Client:
    def __init__(self, servers):
        self.servers = servers if isinstance(servers, list) else [servers]

    def small_value_batch(self, n):
        results = []
        for server in self.servers:
            results.extend(server.small_value.remote() for _ in range(n))
        ionet.get(results)

    def small_value_batch_arg(self, n):
        x = ionet.put(0)
        results = []
        for server in self.servers:
            results.extend(server.small_value_arg.remote(x) for _ in range(n))
        ionet.get(results)


@ionet.remote
def small_value():
    return b"ok"


@ionet.remote
def do_put_small():
    for _ in range(100):
        ionet.put(0)


@ionet.remote
def do_put():
    for _ in range(10):
        ionet.put(np.zeros(10 * 1024 * 1024, dtype=np.int64))


@ionet.remote
def create_object_containing_ref():
    return [ionet.put(1) for _ in range(10000)]


@ionet.remote
def call_actors(actors, n):
    ionet.get([actors[i % len(actors)].small_value.remote() for i in range(n)])


def _half_the_cpus() -> int:
    return max(1, multiprocessing.cpu_count() // 2)


# (name, multiplier, setup): `setup` is a context manager giving the timed body, and
# releasing what it made (actors) on exit.
_BENCHMARKS: List[Tuple[str, float, Callable[[], contextlib.AbstractContextManager]]] = []


def benchmark(name: str, multiplier: float = 1) -> Callable:
    """Registers a generator function that sets up, yields the body, then cleans up."""

    def register(setup: Callable[[], Iterator[Callable[[], object]]]) -> Callable:
        _BENCHMARKS.append((name, multiplier, contextlib.contextmanager(setup)))
        return setup

    return register


@contextlib.contextmanager
def _actors(actor_class, count: int, **options) -> Iterator[list]:
    actors = [actor_class.options(**options).remote() for _ in range(count)]
    yield actors
    for actor in actors:
        ionet.kill(actor)


@benchmark("single client get calls (Plasma Store)")
def _get_small():
    value = ionet.put(0)
    yield lambda: ionet.get(value)


@benchmark("single client put calls (Plasma Store)")
def _put_small():
    yield lambda: ionet.put(0)


@benchmark("multi client put calls (Plasma Store)", 1000)
def _put_multi_small():
    yield lambda: ionet.get([do_put_small.remote() for _ in range(10)])


@benchmark("single client put gigabytes", 8 * 0.1)
def _put_large():
    array = np.zeros(100 * 1024 * 1024, dtype=np.int64)
    yield lambda: ionet.put(array)


@benchmark("single client tasks and get batch")
def _tasks_and_get_batch():
    yield lambda: ionet.get([small_value.remote() for _ in range(1000)])


@benchmark("multi client put gigabytes", 10 * 8 * 0.1)
def _put_multi():
    yield lambda: ionet.get([do_put.remote() for _ in range(10)])


@benchmark("single client get object containing 10k refs")
def _get_containing_object_ref():
    container = create_object_containing_ref.remote()
    yield lambda: ionet.get(container)


@benchmark("single client wait 1k refs")
def _wait_multiple_refs():
    def body():
        not_ready = [small_value.remote() for _ in range(1000)]
        for _ in range(1000):
            _, not_ready = ionet.wait(not_ready)

    yield body


@benchmark("single client tasks sync")
def _tasks_sync():
    yield lambda: ionet.get(small_value.remote())


@benchmark("single client tasks async", 1000)
def _tasks_async():
    yield lambda: ionet.get([small_value.remote() for _ in range(1000)])


@benchmark("multi client tasks async", 10000 * 4)
def _multi_tasks():
    with _actors(Actor, 4) as actors:
        yield lambda: ionet.get([actor.small_value_batch.remote(10000) for actor in actors])


@benchmark("1:1 actor calls sync")
def _actor_sync():
    with _actors(Actor, 1) as (actor,):
        yield lambda: ionet.get(actor.small_value.remote())


@benchmark("1:1 actor calls async", 1000)
def _actor_async():
    with _actors(Actor, 1) as (actor,):
        yield lambda: ionet.get([actor.small_value.remote() for _ in range(1000)])


@benchmark("1:1 actor calls concurrent", 1000)
def _actor_concurrent():
    with _actors(Actor, 1, max_concurrency=16) as (actor,):
        yield lambda: ionet.get([actor.small_value.remote() for _ in range(1000)])


@benchmark("1:n actor calls async", 5000 * _half_the_cpus())
def _actor_async_direct():
    with _actors(Actor, _half_the_cpus()) as servers:
        client = Client.remote(servers)
        yield lambda: ionet.get(client.small_value_batch.remote(5000))
        ionet.kill(client)


@benchmark("n:n actor calls async", 4 * 5000)
def _actor_multi():
    with _actors(Actor, _half_the_cpus()) as servers:
        yield lambda: ionet.get([call_actors.remote(servers, 5000) for _ in range(4)])


@benchmark("n:n actor calls with arg async", 1000 * _half_the_cpus())
def _actor_multi_direct_arg():
    with _actors(Actor, _half_the_cpus()) as servers:
        clients = [Client.remote(server) for server in servers]
        yield lambda: ionet.get([client.small_value_batch_arg.remote(1000) for client in clients])
        for client in clients:
            ionet.kill(client)


@benchmark("1:1 async-actor calls sync")
def _async_actor_sync():
    with _actors(AsyncActor, 1) as (actor,):
        yield lambda: ionet.get(actor.small_value.remote())


@benchmark("1:1 async-actor calls async", 1000)
def _async_actor_async():
    with _actors(AsyncActor, 1) as (actor,):
        yield lambda: ionet.get([actor.small_value.remote() for _ in range(1000)])


@benchmark("1:1 async-actor calls with args async", 1000)
def _async_actor_with_args():
    with _actors(AsyncActor, 1) as (actor,):
        yield lambda: ionet.get([actor.small_value_with_arg.remote(i) for i in range(1000)])


@benchmark("1:n async-actor calls async", 5000 * _half_the_cpus())
def _async_actor_direct():
    with _actors(AsyncActor, _half_the_cpus()) as servers:
        client = Client.remote(servers)
        yield lambda: ionet.get(client.small_value_batch.remote(5000))
        ionet.kill(client)


@benchmark("n:n async-actor calls async", 4 * 5000)
def _async_actor_multi():
    with _actors(AsyncActor, _half_the_cpus()) as servers:
        yield lambda: ionet.get([call_actors.remote(servers, 5000) for _ in range(4)])


@benchmark("actor creations", 10)
def _actor_creations():
    def body():
        actors = [Actor.remote() for _ in range(10)]
        ionet.get([actor.small_value.remote() for actor in actors])
        for actor in actors:
            ionet.kill(actor)

    yield body


@benchmark("placement group create/removal", 100)
def _placement_groups():
    from ionet.util.placement_group import placement_group, remove_placement_group

    def body():
        # As Ray's: 100 groups of one small bundle made, waited for, and removed.
        groups = [placement_group([{"CPU": 0.001}]) for _ in range(100)]
        for group in groups:
            assert group.wait(timeout_seconds=30), "placed"
        for group in groups:
            remove_placement_group(group)

    yield body


def timeit(name: str, body: Callable[[], object], multiplier: float, seconds: float) -> None:
    """Ray's timing: calls `body` for a warm-up, then in steps for TRIALS × `seconds`;
    prints the mean and standard deviation of the rates."""
    start = time.perf_counter()
    count = 0
    while time.perf_counter() - start < min(1.0, seconds):
        body()
        count += 1
    step = count // 10 + 1
    rates = []
    for _ in range(TRIALS):
        start = time.perf_counter()
        count = 0
        while time.perf_counter() - start < seconds:
            for _ in range(step):
                body()
            count += step
        rates.append(multiplier * count / (time.perf_counter() - start))
    mean, deviation = statistics.mean(rates), statistics.pstdev(rates)
    print(name, "per second", round(mean, 2), "+-", round(deviation, 2), flush=True)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ionet.microbenchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("filter", nargs="?", default="", help="run only benchmarks whose name contains this")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each of the trials (default 1)")
    args = parser.parse_args(argv)
    ionet.init()
    try:
        for name, multiplier, setup in _BENCHMARKS:
            if args.filter in name:
                with setup() as body:
                    timeit(name, body, multiplier, args.seconds)
        # Ray patterns its microbenchmark leaves out (Ray's lines: run _patterns.py with Ray).
        for name, multiplier, body in _patterns.make_benchmarks(ionet):
            if args.filter in name:
                _patterns.time_body(name, multiplier, body)
    finally:
        ionet.shutdown()


if __name__ == "__main__":
    main()
