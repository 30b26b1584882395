"""Actors on an embedded cluster: state, order, names, handles, death."""

import os
import signal
import uuid

import pytest

import ionet
from ionet.exceptions import ActorDiedError, RayActorError

from conftest import process_state, wait_for

pytestmark = pytest.mark.usefixtures("local_cluster")


@ionet.remote
class Counter:
    def __init__(self, start=0):
        self.value = start

    def increment(self, by=1):
        self.value += by
        return self.value

    def read(self):
        return self.value

    def pair(self):
        return self.value, -self.value

    def fail(self):
        raise KeyError("no such thing")

    def actor_id(self):
        return ionet.get_runtime_context().get_actor_id()


@ionet.remote
class BrokenConstructor:
    def __init__(self):
        raise RuntimeError("constructor refused")

    def read(self):
        return None


@ionet.remote
def increment_through(counter):
    return ionet.get(counter.increment.remote())


def unique_name():
    return f"actor-{uuid.uuid4().hex[:8]}"


def test_calls_from_one_caller_run_in_order():
    counter = Counter.remote()
    refs = [counter.increment.remote() for _ in range(100)]
    assert ionet.get(refs, timeout=60) == list(range(1, 101))


def test_constructor_and_method_keyword_arguments():
    counter = Counter.remote(start=10)
    assert ionet.get(counter.increment.remote(by=5), timeout=60) == 15


def test_method_num_returns():
    counter = Counter.remote(start=3)
    assert ionet.get(counter.pair.options(num_returns=2).remote(), timeout=60) == [3, -3]


def test_handles_travel_to_tasks():
    counter = Counter.remote()
    assert ionet.get(increment_through.remote(counter), timeout=60) == 1
    assert ionet.get(counter.read.remote(), timeout=60) == 1


def test_method_errors_keep_their_class():
    counter = Counter.remote()
    with pytest.raises(KeyError, match="no such thing"):
        ionet.get(counter.fail.remote(), timeout=60)
    # The actor survives its method's exception.
    assert ionet.get(counter.increment.remote(), timeout=60) == 1


def test_named_actor_is_found_by_name():
    name = unique_name()
    counter = Counter.options(name=name).remote()
    ionet.get(counter.increment.remote(), timeout=60)
    found = ionet.get_actor(name)
    assert found == counter
    assert ionet.get(found.increment.remote(), timeout=60) == 2
    assert ionet.get(ionet.get_actor(name, namespace="tests").read.remote(), timeout=60) == 2


def test_duplicate_name_is_refused():
    name = unique_name()
    Counter.options(name=name).remote()
    with pytest.raises(ValueError):
        Counter.options(name=name).remote()


def test_get_if_exists_returns_the_live_actor():
    name = unique_name()
    first = Counter.options(name=name).remote()
    again = Counter.options(name=name, get_if_exists=True).remote()
    assert again == first


def test_unknown_name_is_refused():
    with pytest.raises(ValueError):
        ionet.get_actor(unique_name())


def test_killed_actor_raises_actor_died():
    counter = Counter.remote()
    assert ionet.get(counter.increment.remote(), timeout=60) == 1
    ionet.kill(counter)
    with pytest.raises(ActorDiedError) as info:
        ionet.get(counter.increment.remote(), timeout=60)
    assert isinstance(info.value, RayActorError)


def test_failing_constructor_reports_its_error_on_calls():
    actor = BrokenConstructor.remote()
    with pytest.raises(ActorDiedError, match="constructor refused"):
        ionet.get(actor.read.remote(), timeout=60)


def test_actor_id_in_context_is_the_handle_id():
    counter = Counter.remote()
    assert ionet.get(counter.actor_id.remote(), timeout=60) == counter._native.hex()


def test_actors_cannot_be_instantiated_directly():
    with pytest.raises(TypeError, match="remote"):
        Counter()


@ionet.remote
class Keeper:
    """Keeps refs it is given inside its arguments, and hands out refs it puts."""

    def __init__(self):
        self.kept = []

    def keep(self, refs):
        self.kept.extend(refs)
        return len(self.kept)

    def read(self):
        return ionet.get(self.kept, timeout=30)

    def forget(self):
        count = len(self.kept)
        self.kept = []
        return count

    def put_inside(self, value):
        return [ionet.put(value)]


def test_an_actor_keeps_refs_from_its_arguments_after_the_caller_drops_them():
    import gc

    keeper = Keeper.remote()
    refs = [ionet.put(f"value {index}") for index in range(3)]
    assert ionet.get(keeper.keep.remote(refs), timeout=60) == 3
    # The driver, their owner, lets go: only the actor still holds them.
    del refs
    gc.collect()
    assert ionet.get(keeper.read.remote(), timeout=60) == [f"value {index}" for index in range(3)]
    assert ionet.get(keeper.forget.remote(), timeout=60) == 3


def test_a_ref_an_actor_returns_in_a_list_outlives_the_actors_own_handle():
    keeper = Keeper.remote()
    [inner] = ionet.get(keeper.put_inside.remote("made by the actor"), timeout=60)
    # The actor kept no handle and the list is gone: the driver's handle holds it.
    import gc

    gc.collect()
    assert ionet.get(keeper.forget.remote(), timeout=60) == 0
    assert ionet.get(inner, timeout=60) == "made by the actor"


@ionet.remote
class WhereAmI:
    def process(self):
        return {
            "pid": os.getpid(),
            "parent": os.getppid(),
            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "forkserver": os.environ.get("IONET_FORKSERVER"),
        }


def test_a_jobs_actors_are_forked_from_its_forkserver_and_outlive_its_death():
    actors = [WhereAmI.options(num_gpus=1).remote() for _ in range(2)]
    first, second = ionet.get([actor.process.remote() for actor in actors], timeout=60)
    # Each a process of its own, with the GPU leased to it, forked from one server (the
    # job's worker program, not the node daemon: this driver in an embedded cluster).
    assert first["pid"] != second["pid"]
    assert first["parent"] == second["parent"] != os.getpid()
    assert sorted([first["gpus"], second["gpus"]]) == ["0", "1"]
    assert first["forkserver"] is None, "a forked worker is told it is a worker, not a server"
    server = first["parent"]
    with open(f"/proc/{server}/cmdline") as cmdline:
        assert "ionet._worker" in cmdline.read().split("\0")
    ionet.kill(actors[1])
    # The server dies: the actor it forked lives on, and the job's next actors still start
    # (from another server).
    os.kill(server, signal.SIGKILL)
    wait_for(lambda: process_state(server) in (None, "Z"), what="the forkserver died")
    assert ionet.get(actors[0].process.remote(), timeout=60)["pid"] == first["pid"]
    third = ionet.get(WhereAmI.remote().process.remote(), timeout=60)
    assert third["parent"] != server
    assert process_state(third["pid"]) not in (None, "Z")
    ionet.kill(actors[0])
