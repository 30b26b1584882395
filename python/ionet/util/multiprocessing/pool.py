"""The pool's actors and results (see the package's docstring)."""

from __future__ import annotations

import itertools
import os
from multiprocessing import TimeoutError
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence

import ionet
from ionet._ionet import ObjectRef
from ionet.exceptions import GetTimeoutError


@ionet.remote(num_cpus=1)
class _PoolWorker:
    """One process of the pool: runs chunks of calls."""

    def __init__(self, initializer: Optional[Callable], initargs: Sequence[Any]):
        if initializer is not None:
            initializer(*initargs)

    def run_chunk(self, function: Callable, chunk: List[Any], star: bool) -> List[Any]:
        return [function(*args) if star else function(args) for args in chunk]


class AsyncResult:
    """The result of `apply_async`, `map_async` or `starmap_async`."""

    def __init__(
        self,
        refs: List[ObjectRef],
        single: bool,
        callback: Optional[Callable] = None,
        error_callback: Optional[Callable] = None,
    ):
        self._refs = refs
        self._single = single
        self._callback = callback
        self._error_callback = error_callback
        self._value: Any = None
        self._error: Optional[BaseException] = None
        self._done = False

    def _settle(self, timeout: Optional[float]) -> None:
        if self._done:
            return
        try:
            chunks = ionet.get(self._refs, timeout=timeout)
        except GetTimeoutError:
            raise TimeoutError("the result was not ready in time") from None
        except Exception as exc:
            self._error, self._done = exc, True
            if self._error_callback is not None:
                self._error_callback(exc)
            return
        values = list(itertools.chain.from_iterable(chunks))
        self._value = values[0] if self._single else values
        self._done = True
        if self._callback is not None:
            self._callback(self._value)

    def get(self, timeout: Optional[float] = None) -> Any:
        """The value, waiting at most `timeout` seconds; raises the call's error."""
        self._settle(timeout)
        if self._error is not None:
            raise self._error
        return self._value

    def wait(self, timeout: Optional[float] = None) -> None:
        try:
            self._settle(timeout)
        except TimeoutError:
            pass

    def ready(self) -> bool:
        ready, _ = ionet.wait(self._refs, num_returns=len(self._refs), timeout=0)
        return len(ready) == len(self._refs)

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError("the result is not ready")
        self._settle(None)
        return self._error is None


class Pool:
    """`processes` actors (default: the cluster's CPUs) running the calls given."""

    def __init__(
        self,
        processes: Optional[int] = None,
        initializer: Optional[Callable] = None,
        initargs: Optional[Sequence[Any]] = None,
        maxtasksperchild: Optional[int] = None,
        ray_remote_args: Optional[dict] = None,
        **ignored: Any,
    ):
        ionet._core.ensure_initialized()
        if processes is None:
            processes = max(1, int(ionet.cluster_resources().get("CPU", os.cpu_count() or 1)))
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        options = ray_remote_args or {}
        self._actors = [
            _PoolWorker.options(**options).remote(initializer, tuple(initargs or ())) for _ in range(processes)
        ]
        self._next = itertools.cycle(range(processes))
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the pool is closed")

    def _submit(self, function: Callable, items: Iterable[Any], chunksize: Optional[int], star: bool) -> List[ObjectRef]:
        self._check_open()
        items = list(items)
        if chunksize is None:
            chunksize = max(1, len(items) // (len(self._actors) * 4))
        refs = []
        for start in range(0, len(items), chunksize):
            actor = self._actors[next(self._next)]
            refs.append(actor.run_chunk.remote(function, items[start : start + chunksize], star))
        return refs

    def apply(self, func: Callable, args: Sequence[Any] = (), kwds: Optional[dict] = None) -> Any:
        return self.apply_async(func, args, kwds).get()

    def apply_async(
        self,
        func: Callable,
        args: Sequence[Any] = (),
        kwds: Optional[dict] = None,
        callback: Optional[Callable] = None,
        error_callback: Optional[Callable] = None,
    ) -> AsyncResult:
        keywords = kwds or {}
        call = (lambda packed: func(*packed[0], **packed[1])) if keywords else None
        if call is not None:
            refs = self._submit(call, [(tuple(args), keywords)], 1, star=False)
        else:
            refs = self._submit(func, [tuple(args)], 1, star=True)
        return AsyncResult(refs, True, callback, error_callback)

    def map(self, func: Callable, iterable: Iterable[Any], chunksize: Optional[int] = None) -> List[Any]:
        return self.map_async(func, iterable, chunksize).get()

    def map_async(
        self,
        func: Callable,
        iterable: Iterable[Any],
        chunksize: Optional[int] = None,
        callback: Optional[Callable] = None,
        error_callback: Optional[Callable] = None,
    ) -> AsyncResult:
        return AsyncResult(self._submit(func, iterable, chunksize, star=False), False, callback, error_callback)

    def starmap(self, func: Callable, iterable: Iterable[Sequence[Any]], chunksize: Optional[int] = None) -> List[Any]:
        return self.starmap_async(func, iterable, chunksize).get()

    def starmap_async(
        self,
        func: Callable,
        iterable: Iterable[Sequence[Any]],
        chunksize: Optional[int] = None,
        callback: Optional[Callable] = None,
        error_callback: Optional[Callable] = None,
    ) -> AsyncResult:
        return AsyncResult(self._submit(func, iterable, chunksize, star=True), False, callback, error_callback)

    def imap(self, func: Callable, iterable: Iterable[Any], chunksize: int = 1) -> Iterator[Any]:
        """Results in order, each as soon as it and those before it are done."""
        for ref in self._submit(func, iterable, chunksize, star=False):
            yield from ionet.get(ref)

    def imap_unordered(self, func: Callable, iterable: Iterable[Any], chunksize: int = 1) -> Iterator[Any]:
        """Results as they finish."""
        pending = self._submit(func, iterable, chunksize, star=False)
        while pending:
            ready, pending = ionet.wait(pending, num_returns=1)
            yield from ionet.get(ready[0])

    def close(self) -> None:
        """No more work may be given; running work finishes."""
        self._closed = True

    def terminate(self) -> None:
        """Ends the pool's actors now."""
        self._closed = True
        for actor in self._actors:
            ionet.kill(actor)
        self._actors = []

    def join(self) -> None:
        if not self._closed:
            raise ValueError("join() needs close() or terminate() first")

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.terminate()
