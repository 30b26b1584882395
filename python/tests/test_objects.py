"""Objects on an embedded cluster: put, get, wait, cancel, zero-copy reads."""

import os
import threading
import time

import pytest

import ionet
from ionet.exceptions import GetTimeoutError, SerializationError, TaskCancelledError

pytestmark = pytest.mark.usefixtures("local_cluster")


@ionet.remote
def sleep_then_return(seconds, value=None):
    time.sleep(seconds)
    return value


@ionet.remote
def identity(value):
    return value


@ionet.remote
def inspect_array(array):
    return bool(array.flags.writeable), int(array[-1])


@ionet.remote
def make_generator():
    return (i for i in range(3))


def test_put_and_get():
    value = {"list": [1, 2, 3], "bytes": b"\x00" * 1000, "text": "ünïcode"}
    ref = ionet.put(value)
    assert isinstance(ref, ionet.ObjectRef) and len(ref.hex()) > 0
    assert ionet.get(ref, timeout=30) == value
    assert ionet.get([ref, ionet.put(None)], timeout=30) == [value, None]


def test_large_pickled_value_round_trips():
    value = list(range(200_000))
    assert ionet.get(ionet.put(value), timeout=30) == value


def test_put_of_a_ref_is_refused():
    with pytest.raises(TypeError):
        ionet.put(ionet.put(1))


def test_get_needs_a_ref_or_a_list():
    with pytest.raises(ValueError):
        ionet.get("not a ref")


def test_unserializable_values_name_their_type():
    with pytest.raises(TypeError, match="generator") as info:
        ionet.put(i for i in range(3))
    assert isinstance(info.value, SerializationError)
    with pytest.raises(TypeError, match="lock"):
        identity.remote(threading.Lock())


def test_unserializable_result_fails_the_task():
    with pytest.raises(TypeError, match="generator"):
        ionet.get(make_generator.remote(), timeout=60)


def _store_buffer(array):
    """The native Buffer whose memory a deserialized numpy array views."""
    base = array
    while not isinstance(base, memoryview):
        base = base.base
    return base.obj._ionet_owner


def test_large_numpy_array_reads_back_as_a_zero_copy_read_only_view():
    np = pytest.importorskip("numpy")
    array = np.arange(100 * 1024 * 1024 // 8, dtype=np.int64)
    ref = ionet.put(array)
    result = ionet.get(ref, timeout=60)
    assert not result.flags.writeable
    assert np.array_equal(result, array)
    buffer = _store_buffer(result)
    start = result.ctypes.data
    assert buffer.address <= start and start + result.nbytes <= buffer.address + buffer.size
    assert ionet.get(inspect_array.remote(ref), timeout=60) == (False, array[-1])
    assert ionet.get(inspect_array.remote(array), timeout=60) == (False, array[-1])


def test_arrow_table_round_trips():
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"id": list(range(100_000)), "name": [f"row {i}" for i in range(100_000)]})
    assert ionet.get(ionet.put(table), timeout=60).equals(table)
    assert ionet.get(identity.remote(table), timeout=60).equals(table)
    batch = table.to_batches()[0]
    assert ionet.get(ionet.put(batch), timeout=60).equals(batch)


@ionet.remote
def total_of(refs):
    return sum(ionet.get(list(refs)))


@ionet.remote
def first_of(items):
    return ionet.get(items[0])


def test_refs_inside_arguments_and_values_outlive_the_callers_handles():
    # The inner refs are temporaries: only the call, or the outer object, holds them.
    assert ionet.get(total_of.remote([ionet.put(40), ionet.put(2)])) == 42
    # Large enough to travel as an object of its own, which then holds the ref.
    assert ionet.get(first_of.remote([ionet.put(1), b"x" * 300_000])) == 1
    outer = ionet.put({"inner": ionet.put("kept")})
    import gc

    gc.collect()
    assert ionet.get(ionet.get(outer)["inner"]) == "kept"


def test_wait_splits_ready_from_pending():
    fast = identity.remote("fast")
    slow = sleep_then_return.remote(60)
    ready, not_ready = ionet.wait([slow, fast], num_returns=1, timeout=30)
    assert ready == [fast] and not_ready == [slow]
    ready, not_ready = ionet.wait([slow], timeout=0.1)
    assert ready == [] and not_ready == [slow]
    ionet.cancel(slow, force=True)


def test_wait_for_all():
    refs = [identity.remote(i) for i in range(10)]
    ready, not_ready = ionet.wait(refs, num_returns=10, timeout=60)
    assert sorted(ionet.get(ready)) == list(range(10)) and not_ready == []
    with pytest.raises(ValueError):
        ionet.wait(refs, num_returns=11)


def test_get_times_out():
    slow = sleep_then_return.remote(60)
    with pytest.raises(GetTimeoutError) as info:
        ionet.get(slow, timeout=0.1)
    assert isinstance(info.value, TimeoutError)
    ionet.cancel(slow, force=True)


def test_cancel_a_task_waiting_for_its_argument():
    slow = sleep_then_return.remote(60)
    waiting = identity.remote(slow)
    ionet.cancel(waiting)
    with pytest.raises(TaskCancelledError):
        ionet.get(waiting, timeout=30)
    ionet.cancel(slow, force=True)


@ionet.remote
def record_pid_then_sleep(path, seconds):
    with open(path, "w") as marker:
        marker.write(str(os.getpid()))
    time.sleep(seconds)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_force_cancel_a_running_task(tmp_path):
    marker = tmp_path / "pid"
    running = record_pid_then_sleep.remote(str(marker), 60)
    deadline = time.monotonic() + 60
    while not (marker.exists() and marker.read_text()):
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.02)
    pid = int(marker.read_text())
    ionet.cancel(running, force=True)
    with pytest.raises(TaskCancelledError):
        ionet.get(running, timeout=30)
    # The worker running it is killed (its CPU comes back).
    while _alive(pid):
        assert time.monotonic() < deadline, f"worker {pid} still runs the cancelled task"
        time.sleep(0.02)


@ionet.remote
def put_nested(value):
    return ionet.put([ionet.put(value)])


def test_a_ref_read_inside_a_value_outlives_the_value():
    import gc

    outer = ionet.get(put_nested.remote("inside"), timeout=60)
    [inner] = ionet.get(outer, timeout=60)
    # The worker owns both; only the outer value held the inner one until the read.
    del outer
    gc.collect()
    assert ionet.get(inner, timeout=60) == "inside"
