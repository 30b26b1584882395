"""`ActorPool`: work spread over a fixed set of actors, as Ray's `ray.util.ActorPool`.

Each actor runs one submitted call at a time; calls wait in order for a free actor.
Results come back in submission order (`get_next`, `map`) or as they finish
(`get_next_unordered`, `map_unordered`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import ionet
from ionet._ionet import ObjectRef
from ionet.exceptions import GetTimeoutError


class ActorPool:
    """A pool over `actors`: `submit(fn, value)` runs `fn(actor, value)` (which returns a
    ref) on the next free actor."""

    def __init__(self, actors: Iterable[Any]):
        self._idle: List[Any] = list(actors)
        self._future_to_actor: Dict[ObjectRef, Tuple[int, Any]] = {}
        self._index_to_future: Dict[int, ObjectRef] = {}
        self._next_task_index = 0
        self._next_return_index = 0
        self._pending: List[Tuple[Callable, Any]] = []

    def map(self, fn: Callable[[Any, Any], ObjectRef], values: Iterable[Any]) -> Iterator[Any]:
        """Results of `fn(actor, value)` for each value, in the order of `values`."""
        self._drain_returns()
        for value in values:
            self.submit(fn, value)
        while self.has_next():
            yield self.get_next()

    def map_unordered(self, fn: Callable[[Any, Any], ObjectRef], values: Iterable[Any]) -> Iterator[Any]:
        """Results of `fn(actor, value)` for each value, as they finish."""
        self._drain_returns()
        for value in values:
            self.submit(fn, value)
        while self.has_next():
            yield self.get_next_unordered()

    def submit(self, fn: Callable[[Any, Any], ObjectRef], value: Any) -> None:
        """Runs `fn(actor, value)` on a free actor now, or once one is free."""
        if self._idle:
            actor = self._idle.pop()
            future = fn(actor, value)
            if not isinstance(future, ObjectRef):
                raise TypeError(f"the function given to ActorPool must return an ObjectRef, got {type(future).__name__}")
            self._future_to_actor[future] = (self._next_task_index, actor)
            self._index_to_future[self._next_task_index] = future
            self._next_task_index += 1
        else:
            self._pending.append((fn, value))

    def has_next(self) -> bool:
        """Whether results are still to be returned."""
        return bool(self._future_to_actor)

    def get_next(self, timeout: Optional[float] = None, ignore_if_timedout: bool = False) -> Any:
        """The next result in submission order (waiting at most `timeout` seconds)."""
        if not self.has_next():
            raise StopIteration("no more results to get")
        if self._next_return_index >= self._next_task_index:
            raise ValueError("it is not allowed to call get_next() after get_next_unordered()")
        future = self._index_to_future[self._next_return_index]
        if timeout is not None:
            ready, _ = ionet.wait([future], timeout=timeout)
            if not ready:
                if ignore_if_timedout:
                    return None
                raise GetTimeoutError("timed out waiting for the next result")
        del self._index_to_future[self._next_return_index]
        self._next_return_index += 1
        _, actor = self._future_to_actor.pop(future)
        self._return_actor(actor)
        return ionet.get(future)

    def get_next_unordered(self, timeout: Optional[float] = None, ignore_if_timedout: bool = False) -> Any:
        """Whichever result finishes next (waiting at most `timeout` seconds)."""
        if not self.has_next():
            raise StopIteration("no more results to get")
        ready, _ = ionet.wait(list(self._future_to_actor), num_returns=1, timeout=timeout)
        if not ready:
            if ignore_if_timedout:
                return None
            raise GetTimeoutError("timed out waiting for a result")
        future = ready[0]
        index, actor = self._future_to_actor.pop(future)
        self._index_to_future.pop(index, None)
        self._next_return_index = max(self._next_return_index, index + 1)
        self._return_actor(actor)
        return ionet.get(future)

    def has_free(self) -> bool:
        """Whether an actor is idle with no call waiting for it."""
        return bool(self._idle) and not self._pending

    def pop_idle(self) -> Optional[Any]:
        """Takes an idle actor out of the pool (None if none is idle)."""
        return self._idle.pop() if self.has_free() else None

    def push(self, actor: Any) -> None:
        """Adds an actor to the pool (it takes the next waiting call, if any)."""
        busy = [busy_actor for _, busy_actor in self._future_to_actor.values()]
        if actor in self._idle or actor in busy:
            raise ValueError("the actor is in the pool already")
        self._return_actor(actor)

    def _return_actor(self, actor: Any) -> None:
        self._idle.append(actor)
        if self._pending:
            self.submit(*self._pending.pop(0))

    def _drain_returns(self) -> None:
        while self.has_next():
            self.get_next_unordered()
