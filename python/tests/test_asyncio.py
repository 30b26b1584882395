"""Awaiting refs, and async actors whose calls interleave on an event loop."""

import asyncio
import time

import pytest

import ionet

pytestmark = pytest.mark.usefixtures("local_cluster")


@ionet.remote
def square(x):
    return x * x


@ionet.remote
def fail():
    raise ValueError("awaited failure")


@ionet.remote
class Sleeper:
    async def nap(self, seconds):
        await asyncio.sleep(seconds)
        return seconds

    async def square_of(self, x):
        # Awaits a ref on the actor's own event loop.
        return await square.remote(x)


def test_hundred_refs_awaited_together():
    refs = [square.remote(i) for i in range(100)]

    async def gather():
        return await asyncio.wait_for(asyncio.gather(*refs), timeout=60)

    assert asyncio.run(gather()) == [i * i for i in range(100)]


def test_awaiting_a_failed_ref_raises():
    async def await_failure():
        return await asyncio.wait_for(fail.remote(), timeout=60)

    with pytest.raises(ValueError, match="awaited failure"):
        asyncio.run(await_failure())


def test_future_of_a_ref():
    assert square.remote(7).future().result(timeout=60) == 49


def test_async_actor_calls_run_concurrently():
    sleeper = Sleeper.remote()
    ionet.get(sleeper.nap.remote(0), timeout=60)  # the actor is up
    started = time.monotonic()
    refs = [sleeper.nap.remote(0.5) for _ in range(100)]
    assert ionet.get(refs, timeout=60) == [0.5] * 100
    # One after the other they would take 50 s.
    assert time.monotonic() - started < 20


def test_async_actor_awaits_refs():
    sleeper = Sleeper.remote()
    assert ionet.get(sleeper.square_of.remote(9), timeout=60) == 81
