"""`Queue`: a first-in first-out queue that tasks and actors share, as Ray's
`ray.util.queue.Queue`. It lives in an async actor; the `Queue` object is a handle to it
that can be passed to tasks and actors.
"""

from __future__ import annotations

import asyncio
import queue as _queue
from typing import Any, Dict, List, Optional

import ionet


class Empty(_queue.Empty):
    """The queue had no item (within the timeout)."""


class Full(_queue.Full):
    """The queue had no room (within the timeout)."""


class Queue:
    """A queue of at most `maxsize` items (0: no limit)."""

    def __init__(self, maxsize: int = 0, actor_options: Optional[Dict[str, Any]] = None):
        if not isinstance(maxsize, int) or maxsize < 0:
            raise ValueError(f"maxsize must be a non-negative integer, got {maxsize!r}")
        self.maxsize = maxsize
        self.actor = _QueueActor.options(**(actor_options or {})).remote(maxsize)

    def __len__(self) -> int:
        return self.size()

    def size(self) -> int:
        return ionet.get(self.actor.qsize.remote())

    def qsize(self) -> int:
        return self.size()

    def empty(self) -> bool:
        return ionet.get(self.actor.empty.remote())

    def full(self) -> bool:
        return ionet.get(self.actor.full.remote())

    def put(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        """Adds `item`, waiting for room (at most `timeout` seconds) unless `block` is False."""
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be a non-negative number")
        if not block:
            if not ionet.get(self.actor.put_nowait.remote(item)):
                raise Full("the queue is full")
            return
        if not ionet.get(self.actor.put.remote(item, timeout)):
            raise Full(f"the queue stayed full for {timeout} s")

    async def put_async(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        if not block:
            if not await self.actor.put_nowait.remote(item):
                raise Full("the queue is full")
            return
        if not await self.actor.put.remote(item, timeout):
            raise Full(f"the queue stayed full for {timeout} s")

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """Takes the oldest item, waiting for one (at most `timeout` seconds) unless
        `block` is False."""
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be a non-negative number")
        found, item = ionet.get(self.actor.get.remote(timeout if block else 0))
        if not found:
            raise Empty("the queue is empty" if not block else f"the queue stayed empty for {timeout} s")
        return item

    async def get_async(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        found, item = await self.actor.get.remote(timeout if block else 0)
        if not found:
            raise Empty("the queue is empty")
        return item

    def put_nowait(self, item: Any) -> None:
        self.put(item, block=False)

    def put_nowait_batch(self, items: List[Any]) -> None:
        """Adds all of `items`, or none if they do not all fit."""
        if not ionet.get(self.actor.put_nowait_batch.remote(list(items))):
            raise Full(f"the queue has no room for {len(items)} items")

    def get_nowait(self) -> Any:
        return self.get(block=False)

    def get_nowait_batch(self, num_items: int) -> List[Any]:
        """Takes `num_items` items, or none if fewer are there."""
        found, items = ionet.get(self.actor.get_nowait_batch.remote(num_items))
        if not found:
            raise Empty(f"the queue has fewer than {num_items} items")
        return items

    def shutdown(self, force: bool = False, grace_period_s: int = 5) -> None:
        """Ends the queue's actor."""
        if self.actor is not None:
            ionet.kill(self.actor)
        self.actor = None


@ionet.remote(num_cpus=0)
class _QueueActor:
    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.queue: "asyncio.Queue[Any]" = asyncio.Queue(maxsize)

    async def qsize(self) -> int:
        return self.queue.qsize()

    async def empty(self) -> bool:
        return self.queue.empty()

    async def full(self) -> bool:
        return self.queue.full()

    async def put(self, item: Any, timeout: Optional[float]) -> bool:
        try:
            await asyncio.wait_for(self.queue.put(item), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def put_nowait(self, item: Any) -> bool:
        try:
            self.queue.put_nowait(item)
            return True
        except asyncio.QueueFull:
            return False

    async def put_nowait_batch(self, items: List[Any]) -> bool:
        if self.maxsize and self.queue.qsize() + len(items) > self.maxsize:
            return False
        for item in items:
            self.queue.put_nowait(item)
        return True

    async def get(self, timeout: Optional[float]) -> Any:
        if timeout == 0:
            try:
                return True, self.queue.get_nowait()
            except asyncio.QueueEmpty:
                return False, None
        try:
            return True, await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return False, None

    async def get_nowait_batch(self, num_items: int) -> Any:
        if self.queue.qsize() < num_items:
            return False, []
        return True, [self.queue.get_nowait() for _ in range(num_items)]
