"""Hooks the native `ObjectRef` calls to be awaited and to give futures.

`ObjectRef._on_ready(callback)` calls `callback()` once, from a native thread, when the
object is ready or failed. The callbacks here only hand the event over (to the event
loop, or to the resolver thread): reading the object from inside a native callback could
block the native thread that would deliver it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from typing import Any, Generator, Optional

from ionet import _core
from ionet._ionet import ObjectRef


def object_ref_await(ref: ObjectRef) -> Generator[Any, None, Any]:
    """What `ObjectRef.__await__` returns: waits without blocking the running event
    loop, then gives the value (or raises the task's error)."""
    return _ready_then_get(ref).__await__()


async def _ready_then_get(ref: ObjectRef) -> Any:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def on_ready() -> None:
        try:
            loop.call_soon_threadsafe(_mark_ready, ready)
        except RuntimeError:
            pass  # the loop is closed: nobody awaits the ref any more

    ref._on_ready(on_ready)
    await ready
    return _core.get(ref)


def _mark_ready(ready: "asyncio.Future[None]") -> None:
    if not ready.done():  # the awaiting task may have been cancelled
        ready.set_result(None)


def object_ref_future(ref: ObjectRef) -> "concurrent.futures.Future[Any]":
    """What `ObjectRef.future()` returns: a future that completes with the value (or
    the task's error); `asyncio.wrap_future` makes it awaitable on any loop."""
    future: "concurrent.futures.Future[Any]" = concurrent.futures.Future()
    ref._on_ready(lambda: _resolver_queue().put((ref, future)))
    return future


_resolver: Optional["queue.SimpleQueue[Any]"] = None
_resolver_lock = threading.Lock()


def _resolver_queue() -> "queue.SimpleQueue[Any]":
    """The queue of (ready ref, future) that one daemon thread completes, started on first use."""
    global _resolver
    with _resolver_lock:
        if _resolver is None:
            _resolver = queue.SimpleQueue()
            threading.Thread(target=_resolve_forever, args=(_resolver,), name="ionet-futures", daemon=True).start()
        return _resolver


def _resolve_forever(ready: "queue.SimpleQueue[Any]") -> None:
    while True:
        ref, future = ready.get()
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(_core.get(ref))
        except BaseException as exc:
            future.set_exception(exc)
