"""Remote functions on an embedded cluster: arguments, results, options, retries."""

import os
import signal

import pytest

import ionet
from ionet.exceptions import WorkerCrashedError

pytestmark = pytest.mark.usefixtures("local_cluster")


@ionet.remote
def add(a, b=0):
    return a + b


@ionet.remote
def identity(value):
    return value


@ionet.remote
def describe(*args, **kwargs):
    return args, kwargs


@ionet.remote(num_returns=3)
def three_values(x):
    return x, x + 1, x + 2


@ionet.remote
def sum_of_squares(n):
    # Submits tasks from inside a task.
    return sum(ionet.get([add.remote(i * i) for i in range(n)]))


@ionet.remote
def first_of(refs):
    # A ref nested in a value travels as a ref.
    assert isinstance(refs[0], ionet.ObjectRef)
    return ionet.get(refs[0])


def test_values_come_back():
    assert ionet.get(add.remote(1, 2), timeout=60) == 3
    assert ionet.get([add.remote(i, i) for i in range(20)], timeout=60) == [2 * i for i in range(20)]


def test_keyword_arguments():
    assert ionet.get(add.remote(1, b=5), timeout=60) == 6
    assert ionet.get(add.remote(a=2, b=3), timeout=60) == 5
    args, kwargs = ionet.get(describe.remote(1, "x", key=[1], other=None), timeout=60)
    assert args == (1, "x") and kwargs == {"key": [1], "other": None}


def test_top_level_ref_arguments_pass_their_values():
    ref = ionet.put(40)
    assert ionet.get(add.remote(ref, 2), timeout=60) == 42
    assert ionet.get(add.remote(1, b=ref), timeout=60) == 41


def test_nested_refs_travel_as_refs():
    assert ionet.get(first_of.remote([ionet.put("inner")]), timeout=60) == "inner"


def test_chains_of_tasks():
    ref = ionet.put(0)
    for _ in range(10):
        ref = add.remote(ref, 1)
    assert ionet.get(ref, timeout=60) == 10


def test_tasks_submitted_from_tasks():
    assert ionet.get(sum_of_squares.remote(10), timeout=60) == sum(i * i for i in range(10))


def test_num_returns_gives_one_ref_per_value():
    refs = three_values.remote(1)
    assert isinstance(refs, list) and len(refs) == 3
    assert ionet.get(refs, timeout=60) == [1, 2, 3]
    assert ionet.get(identity.options(num_returns=2).remote((5, 6)), timeout=60) == [5, 6]


def test_options_override_the_decorator():
    assert ionet.get(add.options(num_cpus=0.5, max_retries=0).remote(1, 1), timeout=60) == 2
    assert ionet.get(add.options(max_retries=-1).remote(1, 2), timeout=60) == 3  # Ray's "for ever"


def test_custom_resources():
    assert ionet.get(identity.options(resources={"custom": 2}).remote("ok"), timeout=60) == "ok"


def test_invalid_options_are_refused():
    with pytest.raises(ValueError, match="invalid option"):
        add.options(bogus=1)
    with pytest.raises(ValueError):
        add.options(num_cpus=-1)
    with pytest.raises(ValueError):
        add.options(resources={"CPU": 1})


def test_remote_functions_cannot_be_called_directly():
    with pytest.raises(TypeError, match="remote"):
        add(1, 2)


@ionet.remote(max_retries=1)
def crash_once(marker):
    if not os.path.exists(marker):
        with open(marker, "w"):
            pass
        os._exit(1)
    return "survived"


@ionet.remote(max_retries=0)
def crash():
    os.kill(os.getpid(), signal.SIGKILL)


def test_task_whose_worker_crashes_is_retried(tmp_path):
    marker = str(tmp_path / "crashed-once")
    assert ionet.get(crash_once.remote(marker), timeout=90) == "survived"
    assert os.path.exists(marker)


def test_task_whose_worker_crashes_without_retries_fails():
    with pytest.raises(WorkerCrashedError):
        ionet.get(crash.remote(), timeout=90)


def test_cost_strategy_and_label_selectors():
    # One node here: COST runs on it; a selector no node's labels match is unschedulable,
    # and a malformed one is refused when the options are given.
    assert ionet.get(add.options(scheduling_strategy="COST").remote(1, 2), timeout=60) == 3
    assert ionet.get(add.options(scheduling_strategy="COST_PER_TFLOP").remote(1, 3), timeout=60) == 4
    assert ionet.get(add.options(label_selector={"region": "!asia"}).remote(2, 2), timeout=60) == 4
    with pytest.raises(ionet.exceptions.TaskUnschedulableError, match="region"):
        ionet.get(add.options(label_selector={"region": "in(asia, eu)"}).remote(1), timeout=60)
    with pytest.raises(ValueError, match="label_selector"):
        add.options(label_selector={"region": "in(asia"}).remote(1)
    with pytest.raises(ValueError, match="scheduling strategy"):
        add.options(scheduling_strategy="CHEAPEST").remote(1)
    with pytest.raises(ValueError, match="label_selector"):
        add.options(label_selector={"region": 7})


def test_native_options_are_typed_and_parsed_once():
    # The native options take Ray's names as typed keywords and parse with the Rust
    # parsers: a strategy's text (the same grammar Rust users write), Ray's -1 counts.
    from ionet import _ionet

    node = ionet.get_runtime_context().get_node_id()
    pinned = _ionet.Options(scheduling_strategy=f"node:{node}:soft", max_retries=-1, num_gpus=0.5)
    assert f"NodeAffinity {{ node_id: NodeId({node[:8]}), soft: true }}" in repr(pinned)
    assert "max_retries: 4294967295" in repr(pinned)
    with pytest.raises(TypeError):
        _ionet.Options(num_cpus="two")
    with pytest.raises(TypeError):
        _ionet.Options(num_cpu=2)  # a misspelt option is refused, not ignored
    with pytest.raises(ValueError, match="max_retries"):
        _ionet.Options(max_retries=-2)
    with pytest.raises(ValueError, match="node:zz"):
        _ionet.Options(scheduling_strategy="node:zz")
    with pytest.raises(ValueError, match="bundle"):
        _ionet.Options(placement_group="00" * 18, bundle_index=-3)
    # An actor's defaults differ from a task's: no CPU held.
    assert "num_cpus: 0.0" in repr(_ionet.Options(actor=True))
    assert "num_cpus: 1.0" in repr(_ionet.Options())


@ionet.remote
class Echo:
    def echo(self, value):
        return value


def test_actor_label_selector_no_node_matches_is_unschedulable():
    assert ionet.get(Echo.options(scheduling_strategy="COST").remote().echo.remote(5), timeout=60) == 5
    stranded = Echo.options(label_selector={"region": "asia"}).remote()
    with pytest.raises(ionet.exceptions.TaskUnschedulableError, match="asia"):
        ionet.get(stranded.echo.remote(1), timeout=60)
