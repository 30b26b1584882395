"""Ray programs as Ray's documentation writes them, on a 2-CPU embedded cluster: nested
tasks that wait for their children, `sys.exit` and `exit_actor`, `retry_exceptions`,
`ActorPool`, `Queue`, `multiprocessing.Pool`, captured child tasks, `_remote`, method
options and concurrency groups, and the names Ray programs import."""

import os
import sys
import threading
import time

import numpy as np
import pytest

import ionet
from ionet.exceptions import ActorDiedError, WorkerCrashedError
from ionet.util import ActorPool, placement_group, remove_placement_group
from ionet.util.multiprocessing import Pool
from ionet.util.queue import Empty, Queue
from ionet.util.scheduling_strategies import PlacementGroupSchedulingStrategy


@pytest.fixture(scope="module", autouse=True)
def two_cpu_cluster():
    ionet.init(num_cpus=2, namespace="ray-programs")
    yield
    ionet.shutdown()


@ionet.remote
def tree(depth):
    if depth == 0:
        return 1
    return sum(ionet.get([tree.remote(depth - 1), tree.remote(depth - 1)]))


@ionet.remote
def tree_by_wait(depth):
    if depth == 0:
        return 1
    pending = [tree_by_wait.remote(depth - 1), tree_by_wait.remote(depth - 1)]
    total = 0
    while pending:
        ready, pending = ionet.wait(pending, num_returns=1)
        total += ionet.get(ready[0])
    return total


def test_recursion_deeper_than_the_cpus_finishes():
    # Ray releases a blocked worker's CPU; without that this deadlocks on 2 CPUs.
    assert ionet.get(tree.remote(4), timeout=120) == 16
    assert ionet.get(tree.remote(6), timeout=180) == 64
    assert ionet.get(tree_by_wait.remote(4), timeout=120) == 16


@ionet.remote
def quicksort(values):
    if len(values) <= 100_000:
        return np.sort(values)
    pivot = values[len(values) // 2]
    less, equal, more = values[values < pivot], values[values == pivot], values[values > pivot]
    left, right = quicksort.remote(less), quicksort.remote(more)
    return np.concatenate([ionet.get(left), equal, ionet.get(right)])


def test_tree_of_tasks_quicksorts_two_million_numbers():
    values = np.random.default_rng(7).integers(0, 1_000_000_000, 2_000_000)
    result = ionet.get(quicksort.remote(values), timeout=180)
    assert len(result) == len(values)
    assert np.array_equal(result, np.sort(values))


@ionet.remote
class Exiter:
    def __init__(self):
        self.calls = 0

    def pid(self):
        return os.getpid()

    def leave(self):
        sys.exit(0)

    def leave_for_good(self):
        ionet.exit_actor()
        return "still here"

    def restarted(self):
        return ionet.get_runtime_context().was_current_actor_reconstructed


def test_sys_exit_in_an_actor_ends_its_process_not_the_driver():
    actor = Exiter.remote()
    ionet.get(actor.pid.remote(), timeout=60)
    with pytest.raises(ionet.exceptions.RayActorError):
        ionet.get(actor.leave.remote(), timeout=60)
    with pytest.raises(ActorDiedError):
        ionet.get(actor.pid.remote(), timeout=60)


def test_sys_exit_in_an_actor_with_restarts_restarts_it():
    actor = Exiter.options(max_restarts=1).remote()
    first = ionet.get(actor.pid.remote(), timeout=60)
    assert ionet.get(actor.restarted.remote(), timeout=60) is False
    with pytest.raises(ionet.exceptions.RayActorError):
        ionet.get(actor.leave.remote(), timeout=60)
    assert ionet.get(actor.pid.remote(), timeout=60) != first
    assert ionet.get(actor.restarted.remote(), timeout=60) is True


def test_exit_actor_ends_it_without_restart():
    actor = Exiter.options(max_restarts=3).remote()
    ionet.get(actor.pid.remote(), timeout=60)
    with pytest.raises(ActorDiedError):
        ionet.get(actor.leave_for_good.remote(), timeout=60)
    with pytest.raises(ActorDiedError):
        ionet.get(actor.pid.remote(), timeout=60)
    with pytest.raises(TypeError):
        ionet.exit_actor()  # not in an actor


@ionet.remote
def exit_once(marker):
    if not os.path.exists(marker):
        open(marker, "w").close()
        sys.exit(3)
    return "second attempt"


def test_sys_exit_in_a_task_is_a_crash_retried_per_max_retries(tmp_path):
    marker = str(tmp_path / "exited")
    assert ionet.get(exit_once.options(max_retries=1).remote(marker), timeout=60) == "second attempt"
    os.remove(marker)
    with pytest.raises(WorkerCrashedError):
        ionet.get(exit_once.options(max_retries=0).remote(marker), timeout=60)


@ionet.remote
def fail_times(counter, times, error):
    attempts = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
    with open(counter, "w") as file:
        file.write(str(attempts))
    if attempts <= times:
        raise error(f"attempt {attempts}")
    return attempts


def test_retry_exceptions_retries_only_the_classes_named(tmp_path):
    retried = fail_times.options(max_retries=3, retry_exceptions=[ValueError])
    assert ionet.get(retried.remote(str(tmp_path / "a"), 2, ValueError), timeout=60) == 3
    with pytest.raises(TypeError):
        ionet.get(retried.remote(str(tmp_path / "b"), 2, TypeError), timeout=60)
    assert open(tmp_path / "b").read() == "1", "an exception of another class was retried"
    with pytest.raises(ValueError):
        ionet.get(fail_times.options(max_retries=3, retry_exceptions=[KeyError]).remote(str(tmp_path / "c"), 1, ValueError), timeout=60)
    with pytest.raises(ValueError):
        fail_times.options(retry_exceptions=["ValueError"])


@ionet.remote(num_cpus=0)
class Doubler:
    def double(self, value):
        return 2 * value


def test_actor_pool_map_over_four_actors():
    pool = ActorPool([Doubler.remote() for _ in range(4)])
    assert list(pool.map(lambda actor, value: actor.double.remote(value), range(20))) == [2 * v for v in range(20)]
    assert sorted(pool.map_unordered(lambda actor, value: actor.double.remote(value), range(8))) == [
        2 * v for v in range(8)
    ]
    pool.submit(lambda actor, value: actor.double.remote(value), 21)
    assert pool.get_next(timeout=60) == 42
    assert not pool.has_next()


@ionet.remote
def produce(queue, count):
    for item in range(count):
        queue.put(item)
    queue.put(None)


@ionet.remote(num_cpus=0)
class Consumer:
    def drain(self, queue):
        items = []
        while True:
            item = queue.get(timeout=60)
            if item is None:
                return items
            items.append(item)


def test_queue_between_a_producer_task_and_a_consumer_actor():
    queue = Queue(maxsize=5)
    consumer = Consumer.remote()
    consumed = consumer.drain.remote(queue)
    produce.remote(queue, 50)
    assert ionet.get(consumed, timeout=120) == list(range(50))
    assert queue.empty()
    with pytest.raises(Empty):
        queue.get(block=False)
    with pytest.raises(Empty):
        queue.get(timeout=0.2)
    queue.put_nowait_batch([1, 2])
    assert queue.get_nowait_batch(2) == [1, 2]
    queue.shutdown()


def square(value):
    return value * value


def test_multiprocessing_pool_map():
    with Pool(processes=2) as pool:
        assert pool.map(square, range(100)) == [v * v for v in range(100)]
        assert pool.starmap(pow, [(2, 3), (3, 2)]) == [8, 9]
        assert pool.apply(square, (7,)) == 49
        assert sorted(pool.imap_unordered(square, range(5))) == [0, 1, 4, 9, 16]
        result = pool.map_async(square, [3])
        assert result.get(timeout=60) == [9] and result.successful()


@ionet.remote
def group_of_child():
    current = ionet.util.get_current_placement_group()
    return None if current is None else str(current.id)


@ionet.remote
def parent_in_group():
    # Not a strategy of its own: with capture, the child runs in the parent's group,
    # whose bundle holds every CPU of the cluster (it could run nowhere else).
    return ionet.get(group_of_child.remote(), timeout=60)


def test_capture_child_tasks_keeps_a_child_in_its_parents_group():
    group = placement_group([{"CPU": 2}])
    assert group.wait(60)
    captured = PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
    assert ionet.get(parent_in_group.options(scheduling_strategy=captured).remote(), timeout=90) == str(group.id)
    not_captured = PlacementGroupSchedulingStrategy(group, 0)
    assert ionet.get(group_of_child.options(scheduling_strategy=not_captured).remote(), timeout=60) is None
    remove_placement_group(group)


@ionet.remote(num_cpus=0)
def which_bundle_node():
    return ionet.get_runtime_context().get_assigned_resources()


def test_bundle_index_minus_one_uses_any_bundle(tmp_path):
    group = placement_group([{"CPU": 1}, {"CPU": 1}])
    assert group.wait(60)
    anywhere = PlacementGroupSchedulingStrategy(group, -1)
    # Two tasks holding a CPU each at once: only possible if both bundles are used.
    refs = [hold_cpu_until_both.options(scheduling_strategy=anywhere).remote(str(tmp_path)) for _ in range(2)]
    assert sorted(ionet.get(refs, timeout=90)) == [2, 2]
    with pytest.raises(ValueError):
        group_of_child.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, 5))
    remove_placement_group(group)


@ionet.remote(num_cpus=1)
def hold_cpu_until_both(directory):
    os.makedirs(directory, exist_ok=True)
    open(os.path.join(directory, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(directory)) < 2:
        assert time.monotonic() < deadline, "the two tasks never ran at once"
        time.sleep(0.01)
    return len(os.listdir(directory))


@ionet.remote
def add(a, b=0):
    return a + b


@ionet.remote(num_cpus=0, concurrency_groups={"io": 2, "compute": 1})
class Grouped:
    def __init__(self):
        self.running = {"io": 0, "compute": 0}
        self.most = {"io": 0, "compute": 0}
        self.lock = threading.Lock()

    def _enter(self, group):
        with self.lock:
            self.running[group] += 1
            self.most[group] = max(self.most[group], self.running[group])
        time.sleep(0.2)
        with self.lock:
            self.running[group] -= 1

    @ionet.method(concurrency_group="io")
    def io(self):
        self._enter("io")

    @ionet.method(concurrency_group="compute")
    def compute(self):
        self._enter("compute")

    @ionet.method(num_returns=2)
    def pair(self):
        return 1, 2

    def most_at_once(self):
        return self.most


def test_method_options_and_concurrency_groups():
    actor = Grouped.remote()
    first, second = actor.pair.remote()
    assert ionet.get([first, second], timeout=60) == [1, 2]
    ionet.get([actor.io.remote() for _ in range(6)] + [actor.compute.remote() for _ in range(3)], timeout=60)
    assert ionet.get(actor.most_at_once.remote(), timeout=60) == {"io": 2, "compute": 1}


def test_underscore_remote_and_names_ray_programs_use():
    assert ionet.get(add._remote(args=[1], kwargs={"b": 2}, num_cpus=0), timeout=60) == 3
    actor = Doubler._remote(args=[], kwargs={}, name="doubler-by-remote")
    assert ionet.get(actor.double._remote(args=[4]), timeout=60) == 8
    assert ionet.cloudpickle.loads(ionet.cloudpickle.dumps(lambda: 5))() == 5
    assert ionet.util.get_node_ip_address() == "127.0.0.1"
    assert ionet.util.accelerators.NVIDIA_A100 == "A100"
    for name in (
        "OwnerDiedError",
        "NodeDiedError",
        "ActorUnavailableError",
        "OutOfMemoryError",
        "ObjectFetchTimedOutError",
        "PendingCallsLimitExceeded",
        "RuntimeEnvSetupError",
    ):
        assert issubclass(getattr(ionet.exceptions, name), ionet.exceptions.RayError)
    context = ionet.get_runtime_context()
    assert context.get_worker_id() is None and context.get_actor_name() is None
    assert ionet.get(which_bundle_node.options(num_cpus=0, resources={}).remote(), timeout=60) == {}


@ionet.remote(num_cpus=0)
class Named:
    def describe(self):
        context = ionet.get_runtime_context()
        return context.get_actor_name(), context.get_worker_id(), context.get_assigned_resources()


def test_runtime_context_in_an_actor():
    actor = Named.options(name="described", num_cpus=1).remote()
    name, worker_id, assigned = ionet.get(actor.describe.remote(), timeout=60)
    assert name == "described" and len(worker_id) > 0 and assigned == {"CPU": 1.0}
    ionet.kill(actor)


@ionet.remote(num_returns="streaming")
def count_up(n, pause):
    for i in range(n):
        time.sleep(pause)
        yield i


@ionet.remote(num_returns="streaming")
def two_then_fail():
    yield "first"
    yield np.zeros(200_000)  # a large item: through the store
    raise ValueError("the generator broke")


def test_streaming_generator_items_arrive_while_it_runs():
    generator = count_up.remote(1000, 0.001)
    assert isinstance(generator, ionet.ObjectRefGenerator)
    first = next(generator)
    assert ionet.get(first, timeout=60) == 0
    ready, _ = ionet.wait([generator.completed()], timeout=0)
    assert not ready, "the first item came only after the generator finished"
    assert [ionet.get(ref, timeout=60) for ref in generator] == list(range(1, 1000))

    failing = two_then_fail.remote()
    assert ionet.get(next(failing), timeout=60) == "first"
    assert ionet.get(next(failing), timeout=60).shape == (200_000,)
    with pytest.raises(ValueError, match="the generator broke"):
        ionet.get(next(failing), timeout=60)
    with pytest.raises(StopIteration):
        next(failing)


def test_async_iteration_and_a_dropped_consumer():
    import asyncio

    async def consume():
        return [await ref async for ref in count_up.remote(5, 0)]

    assert asyncio.run(consume()) == [0, 1, 2, 3, 4]
    generator = count_up.options(_generator_backpressure_num_objects=1).remote(10_000, 0)
    next(generator)
    task = generator.completed()
    del generator  # the producer stops at its next item
    assert ionet.get(task, timeout=60) < 10_000


@ionet.remote(num_returns="dynamic")
def split(n):
    for i in range(n):
        yield i * 10


@ionet.remote(num_cpus=0)
class Streamer:
    @ionet.method(num_returns="streaming")
    def letters(self, word):
        yield from word


@ionet.remote(num_cpus=0)
class AsyncStreamer:
    @ionet.method(num_returns="streaming")
    async def tick(self, n):
        import asyncio

        for i in range(n):
            await asyncio.sleep(0)
            yield i

    async def ping(self):
        return "pong"


def test_dynamic_generators_and_streaming_actor_methods():
    items = ionet.get(split.remote(4), timeout=60)
    assert isinstance(items, ionet.DynamicObjectRefGenerator)
    assert [ionet.get(ref, timeout=60) for ref in items] == [0, 10, 20, 30]
    streamer = Streamer.remote()
    assert [ionet.get(ref, timeout=60) for ref in streamer.letters.remote("ionet")] == list("ionet")
    # An async generator method of an async actor streams too; the actor serves other
    # calls while a stream is open.
    ticker = AsyncStreamer.remote()
    ticks = ticker.tick.remote(300)
    assert ionet.get(next(ticks), timeout=60) == 0
    assert ionet.get(ticker.ping.remote(), timeout=60) == "pong"
    assert [ionet.get(ref, timeout=60) for ref in ticks] == list(range(1, 300))
    assert [ionet.get(ref, timeout=60) for ref in ticker.tick.options(num_returns="streaming").remote(3)] == [0, 1, 2]


@ionet.remote(num_cpus=0)
class Cancellable:
    def __init__(self):
        self.cleaned_up = False
        self.noticed = False

    async def wait_long(self, marker):
        import asyncio

        open(marker, "w").close()
        try:
            await asyncio.sleep(120)
        except asyncio.CancelledError:
            print("wait_long was cancelled: cleaning up", flush=True)
            self.cleaned_up = True
            raise
        return "not cancelled"

    async def was_cleaned_up(self):
        return self.cleaned_up


@ionet.remote(num_cpus=0)
class Poller:
    def __init__(self):
        self.noticed = False

    def poll(self, marker):
        open(marker, "w").close()
        deadline = time.monotonic() + 120
        while not ionet.get_runtime_context().is_canceled():
            assert time.monotonic() < deadline, "the cancel never arrived"
            time.sleep(0.01)
        self.noticed = True
        return "stopped early"

    def started(self):
        return True

    def noticed_cancel(self):
        return self.noticed


def test_cancel_interrupts_a_running_async_call_and_is_seen_by_a_sync_one(tmp_path):
    actor = Cancellable.remote()
    assert ionet.get(actor.was_cleaned_up.remote(), timeout=60) is False
    ref = actor.wait_long.remote(str(tmp_path / "waiting"))
    # Cancelled once running (cancelling a queued call is the other case).
    wait_for_true(lambda: (tmp_path / "waiting").exists())
    ionet.cancel(ref)
    with pytest.raises(ionet.exceptions.TaskCancelledError):
        ionet.get(ref, timeout=60)
    wait_for_true(lambda: ionet.get(actor.was_cleaned_up.remote(), timeout=60))

    poller = Poller.remote()
    assert ionet.get(poller.started.remote(), timeout=60)
    polling = poller.poll.remote(str(tmp_path / "polling"))
    wait_for_true(lambda: (tmp_path / "polling").exists())
    ionet.cancel(polling)
    with pytest.raises(ionet.exceptions.TaskCancelledError):
        ionet.get(polling, timeout=60)
    assert ionet.get(poller.noticed_cancel.remote(), timeout=120) is True


@ionet.remote
def wait_to_be_cancelled(marker):
    with open(marker, "w") as file:
        file.write("started")
    deadline = time.monotonic() + 120
    while not ionet.get_runtime_context().is_canceled():
        assert time.monotonic() < deadline, "the cancel never arrived"
        time.sleep(0.01)
    with open(marker, "w") as file:
        file.write("cancelled")
    return 1


@ionet.remote
def parent_of_waiter(marker):
    try:
        return ionet.get(wait_to_be_cancelled.remote(marker))
    except ionet.exceptions.TaskCancelledError:
        return 0


def test_a_recursive_cancel_reaches_the_tasks_the_task_submitted(tmp_path):
    marker = tmp_path / "grandchild"
    read = lambda: marker.read_text() if marker.exists() else ""
    parent = parent_of_waiter.remote(str(marker))
    wait_for_true(lambda: read() == "started")
    ionet.cancel(parent)  # recursive by default, as in Ray
    with pytest.raises(ionet.exceptions.TaskCancelledError):
        ionet.get(parent, timeout=60)
    wait_for_true(lambda: read() == "cancelled")


@ionet.remote(max_calls=1)
def pid_once():
    return os.getpid()


def test_max_calls_gives_each_call_a_fresh_worker():
    pids = [ionet.get(pid_once.remote(), timeout=60) for _ in range(3)]
    assert len(set(pids)) == 3
    pids = ionet.get([pid_once.remote() for _ in range(4)], timeout=60)
    assert len(set(pids)) == 4
    with pytest.raises(ValueError, match="max_calls"):
        pid_once.options(max_calls=-1)


@ionet.remote(num_cpus=0)
class Tally:
    def __init__(self):
        self.count = 0

    def add(self):
        self.count += 1
        return self.count


@ionet.remote
def add_to_named(name):
    return ionet.get(ionet.get_actor(name).add.remote())


def test_version_is_the_installed_packages():
    from importlib import metadata

    assert ionet.__version__ == metadata.version("ionet")
    with pytest.raises(AttributeError):
        ionet.no_such_name


def test_tasks_find_the_drivers_named_actors_in_its_namespace():
    tally = Tally.options(name="tally").remote()
    assert ionet.get(add_to_named.remote("tally"), timeout=60) == 1
    assert ionet.get(tally.add.remote(), timeout=60) == 2


def test_tqdm_ray_bars_of_tasks_are_drawn_by_the_driver(capfd):
    from ionet.experimental import tqdm_ray

    @ionet.remote
    def count(n, name):
        bar = tqdm_ray.tqdm(total=n, desc=name)
        for _ in range(n):
            bar.update(1)
        bar.close()
        return sum(1 for _ in tqdm_ray.tqdm(range(n), desc=name + "-iterated"))

    assert ionet.get([count.remote(50, "first"), count.remote(30, "second")], timeout=60) == [50, 30]
    seen = ""

    def drawn():
        nonlocal seen
        seen += capfd.readouterr().err
        return all(line in seen for line in ("first: 100%", "50/50", "second: 100%", "30/30", "second-iterated: 100%"))

    wait_for_true(drawn)
    # A driver's own bar draws directly.
    with tqdm_ray.tqdm(total=3, desc="driver") as bar:
        bar.update(3)
    assert "driver: 100%" in capfd.readouterr().err
    # Later test modules' clusters need no bar actor.
    ionet._core._after_init.remove(tqdm_ray._after_init)


def wait_for_true(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.05)
