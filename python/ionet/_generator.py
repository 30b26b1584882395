"""Generator tasks from Python: `num_returns="streaming"` gives an `ObjectRefGenerator`
that yields each item's ref while the task still runs; `num_returns="dynamic"` gives a
ref whose value is a `DynamicObjectRefGenerator` of all the items' refs.

The native side carries the items (`ionet::generator`): the caller opens a stream, the
task's call context names it (`"generator": (owner, id, dynamic)`), and the worker
runtime sends each yielded value to the caller, which owns it. The producer waits while
it is `_generator_backpressure_num_objects` items ahead of the consumer.
"""

from __future__ import annotations

import asyncio
from typing import Any, Iterable, Iterator, List, Optional, Tuple

from ionet import _ionet
from ionet._ionet import ObjectRef
from ionet._serialization import serialize
from ionet.exceptions import GetTimeoutError

STREAMING = "streaming"
DYNAMIC = "dynamic"
# Items a generator may run ahead of its consumer unless told otherwise.
DEFAULT_BACKPRESSURE = 1024


def open_stream(backpressure: Optional[int]) -> Tuple[str, str]:
    """A new stream this process consumes: (id, this process's address)."""
    if backpressure is None or backpressure <= 0:
        backpressure = DEFAULT_BACKPRESSURE if backpressure is None else 2**62
    return _ionet.generator_open(backpressure)


class ObjectRefGenerator:
    """The refs of a streaming generator task's items, as they are produced.

    `next(gen)` (or `for ref in gen`, or `async for`) waits for the next item. If the
    task fails, the ref after its last item is one whose `get` raises the error. Dropping
    the generator stops the task at its next item.
    """

    def __init__(self, stream_id: str, task: ObjectRef):
        self._id = stream_id
        self._task = task
        self._position = 0
        self._done = False

    def __iter__(self) -> "ObjectRefGenerator":
        return self

    def __next__(self) -> ObjectRef:
        return self._next(None)

    def _next(self, timeout: Optional[float]) -> ObjectRef:
        if self._done:
            raise StopIteration
        try:
            ref = _ionet.generator_next(self._id, self._task, self._position, timeout)
        except (GetTimeoutError, KeyboardInterrupt):
            raise
        except Exception:
            # The task failed after its items: its own ref raises the error on `get`.
            self._finish()
            return self._task
        if ref is None:
            self._finish()
            raise StopIteration
        self._position += 1
        return ref

    def __aiter__(self) -> "ObjectRefGenerator":
        return self

    async def __anext__(self) -> ObjectRef:
        # StopIteration cannot cross a future: the end comes back as None.
        ref = await asyncio.get_running_loop().run_in_executor(None, self._next_or_none)
        if ref is None:
            raise StopAsyncIteration
        return ref

    def _next_or_none(self) -> Optional[ObjectRef]:
        try:
            return self._next(None)
        except StopIteration:
            return None

    def next_ready(self, timeout: Optional[float] = None) -> ObjectRef:
        """The next item's ref, waiting at most `timeout` seconds (`GetTimeoutError`)."""
        return self._next(timeout)

    def completed(self) -> ObjectRef:
        """The ref of the task itself: ready once every item is produced."""
        return self._task

    def is_finished(self) -> bool:
        return self._done

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            _ionet.generator_close(self._id)

    def __del__(self) -> None:
        try:
            self._finish()
        except Exception:
            pass

    def __reduce__(self):
        raise TypeError("an ObjectRefGenerator is read by the process that submitted its task; pass its refs instead")


class DynamicObjectRefGenerator:
    """The value of a `num_returns="dynamic"` task: iterating it gives each item's ref."""

    def __init__(self, refs: List[ObjectRef]):
        self._refs = refs

    def __iter__(self) -> Iterator[ObjectRef]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)


class _DynamicResult:
    """What a dynamic generator task returns: read in its caller (which holds the
    stream), it becomes the `DynamicObjectRefGenerator` of the items."""

    def __init__(self, stream_id: str, count: int):
        self.stream_id = stream_id
        self.count = count

    def __reduce__(self):
        return (_dynamic_from_stream, (self.stream_id, self.count))


def _dynamic_from_stream(stream_id: str, count: int) -> DynamicObjectRefGenerator:
    # Every item was recorded before the task answered: no waiting here.
    done = _ionet.put_parts(serialize(None))
    refs = [_ionet.generator_next(stream_id, done, index, 0) for index in range(count)]
    _ionet.generator_close(stream_id)
    return DynamicObjectRefGenerator([ref for ref in refs if ref is not None])


async def send_items_async(items: Any, stream: Tuple[str, str, bool]) -> Any:
    """`send_items` for an async generator method, on the actor's event loop: each send
    (which waits only when the consumer is too far behind) runs off the loop, so the
    actor's other calls go on meanwhile."""
    owner, stream_id, dynamic = stream
    loop = asyncio.get_running_loop()
    count = 0
    try:
        async for item in items:
            if not await loop.run_in_executor(None, _ionet.generator_send, owner, stream_id, count, serialize(item)):
                break  # the consumer dropped the generator
            count += 1
    finally:
        await items.aclose()
        await loop.run_in_executor(None, _ionet.generator_flush, stream_id)
    return _DynamicResult(stream_id, count) if dynamic else count


def send_items(items: Any, stream: Tuple[str, str, bool]) -> Any:
    """Runs a generator task's result (an iterable) on the worker: sends each item to the
    consumer, stopping early if it is gone; returns the task's own value."""
    owner, stream_id, dynamic = stream
    if not isinstance(items, Iterable):
        raise TypeError(f"a generator task must return an iterable (use yield), got {type(items).__name__}")
    count = 0
    iterator = iter(items)
    try:
        for item in iterator:
            if not _ionet.generator_send(owner, stream_id, count, serialize(item)):
                break  # the consumer dropped the generator
            count += 1
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
        # Every item reaches the consumer before the task's own value does.
        _ionet.generator_flush(stream_id)
    return _DynamicResult(stream_id, count) if dynamic else count
