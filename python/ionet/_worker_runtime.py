"""What a worker process runs for the native worker: tasks, actor constructors, actor
method calls. The native side calls these from its worker threads, holding the GIL.

Results follow one convention: a list of parts (as `put_parts` takes) holding the
serialized return value, or, when the call raised, a tuple (readable traceback, the
exception pickled, whether it may be retried) from `ionet.exceptions.encode_task_failure`;
the caller raises the exception again.

Functions and classes are loaded from the control store's KV by key on first use and
kept for the life of the process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import inspect
import os
import sys
import threading
from types import TracebackType
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import cloudpickle

from ionet import _arguments, _context, _export, _generator, _ionet
from ionet._serialization import Part, serialize
from ionet.exceptions import IonetSystemError, describe_failure, encode_task_failure
from ionet.remote_function import NotRetryable
from ionet.remote_function import __file__ as _remote_function_file

_definitions: Dict[Tuple[str, bytes], Any] = {}


def _load(namespace: str, key: bytes) -> Any:
    definition = _definitions.get((namespace, key))
    if definition is None:
        payload = _ionet.kv_get(namespace, key)
        if payload is None:
            raise IonetSystemError(f"no definition under key {key.hex()} in KV namespace {namespace}")
        # The key is the SHA-256 of the pickle: bytes that do not hash to it are not the
        # definition the task named, and are never unpickled.
        if hashlib.sha256(payload).digest() != key:
            raise IonetSystemError(f"the definition under key {key.hex()} does not hash to its key: refused")
        definition = cloudpickle.loads(payload)
        _definitions[(namespace, key)] = definition
    return definition


def _exit_process(code: Any) -> None:
    """`sys.exit()` in a task or actor method ends this worker process, as in Ray: the
    caller sees a crashed worker (a task is retried per max_retries, an actor restarted
    per max_restarts). Never returns."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


class _ExitRequested(Exception):
    """`SystemExit` raised inside a coroutine, carried out of the event loop (which
    would otherwise stop on it)."""

    def __init__(self, code: Any):
        super().__init__(code)
        self.code = code


async def _guarded(coroutine: Any) -> Any:
    try:
        return await coroutine
    except SystemExit as exc:
        raise _ExitRequested(exc.code) from None


def _streamed(result: Any) -> Any:
    """A generator call's result sent item by item to its consumer (the call's value is
    then the count); any other call's result as it is."""
    stream = (_context.current() or {}).get("generator")
    return result if stream is None else _generator.send_items(result, stream)


def _name_output(name: str) -> None:
    """Names the task or actor whose lines follow in this worker's output (Ray's prefix)."""
    sys.stdout.flush()
    sys.stderr.flush()
    _ionet.name_output(name)


def execute_task(function_key: bytes, args: List[Any]) -> Union[List[Part], Tuple[str, bytes, bool]]:
    """Runs the function exported under `function_key` with the arguments in `args`."""
    function = None
    try:
        function = _load(_export.FUNCTIONS, function_key)
        _name_output(getattr(function, "__name__", "task"))
        positional, keywords = _arguments.unpack(args)
        with _context.task_scope(keywords):
            return serialize(_streamed(function(*positional, **keywords)))
    except SystemExit as exc:
        _exit_process(exc.code)
    except BaseException as exc:
        name = getattr(function, "__qualname__", f"task {function_key.hex()[:16]}")
        final = isinstance(exc, NotRetryable)
        if final:
            exc = exc.error
        text, payload = encode_task_failure(exc, _user_traceback(exc), name)
        # (text, pickled exception, whether the native side may retry it)
        return (text, payload, not final)


def create_actor(class_key: bytes, args: List[Any]) -> Any:
    """The instance of the class exported under `class_key`, built with `args`.

    Raises an error whose text (what the native side reports as the actor's death
    cause) holds the constructor's traceback.
    """
    cls = None
    try:
        cls = _load(_export.CLASSES, class_key)
        _name_output(getattr(cls, "__name__", "actor"))
        positional, keywords = _arguments.unpack(args)
        context = keywords.pop(_context.CONTEXT_KEY, None) or {}
        _groups.configure(cls, context.get("concurrency_groups"), context.get("max_concurrency"))
        _actor_context.update(context)
        with _context.task_scope({_context.CONTEXT_KEY: context}):
            return cls(*positional, **keywords)
    except BaseException as exc:
        name = f"{getattr(cls, '__qualname__', 'actor')}.__init__"
        raise RuntimeError(describe_failure(exc, _user_traceback(exc), name)) from exc


def call_actor(instance: Any, method: str, args: List[Any]) -> Union[List[Part], Tuple[str, bytes, bool]]:
    """Calls `instance.method` with the arguments in `args`.

    A coroutine method runs on the actor's event loop, so that calls on several worker
    threads interleave there while each thread waits for its own.
    """
    try:
        bound = getattr(instance, method)
        _name_output(type(instance).__name__)
        positional, keywords = _arguments.unpack(args)
        keywords.setdefault(_context.CONTEXT_KEY, _actor_context or None)
        with _context.task_scope(keywords):
            if _is_coroutine_method(type(instance), method, bound):
                called = bound(*positional, **keywords)
                if inspect.isasyncgen(called):
                    stream = (_context.current() or {}).get("generator")
                    if stream is None:
                        raise TypeError(f"{method} is an async generator: call it with num_returns='streaming'")
                    called = _generator.send_items_async(called, stream)
                coroutine = _guarded(_groups.run_async(method, called))
                future = asyncio.run_coroutine_threadsafe(coroutine, _event_loop())
                task_id = _ionet.current_task_id()
                _running_coroutines[task_id] = future
                try:
                    result = future.result()
                finally:
                    _running_coroutines.pop(task_id, None)
            else:
                with _groups.slot(method):
                    result = _streamed(bound(*positional, **keywords))
        return serialize(result)
    except SystemExit as exc:
        _exit_process(exc.code)
    except _ExitRequested as exc:
        _exit_process(exc.code)
    except BaseException as exc:
        text, payload = encode_task_failure(exc, _user_traceback(exc), f"{type(instance).__qualname__}.{method}")
        return (text, payload, True)


# The futures of the coroutine calls running now, by task id (hex): a cancel cancels them.
_running_coroutines: Dict[Optional[str], "concurrent.futures.Future[Any]"] = {}


def cancel_task(task_id: str) -> None:
    """The caller cancelled call `task_id`: a coroutine running it gets
    `asyncio.CancelledError` at its next await (a sync call may poll
    `get_runtime_context().is_canceled()`)."""
    future = _running_coroutines.get(task_id)
    if future is not None:
        future.cancel()


# What the actor hosted here was created with (its placement group, for captured tasks).
_actor_context: Dict[str, Any] = {}


class _ConcurrencyGroups:
    """Ray's concurrency groups for the actor this process hosts: each group runs at most
    its size of calls at once; methods name their group with `@ionet.method(
    concurrency_group=...)`, others share the default group of `max_concurrency`. The
    native side lets the sum of all groups run at once; these limits split it."""

    def __init__(self) -> None:
        self._methods: Dict[str, str] = {}
        self._sizes: Dict[str, int] = {}
        self._threads: Dict[str, threading.Semaphore] = {}
        self._tasks: Dict[str, asyncio.Semaphore] = {}

    def configure(self, cls: type, groups: Optional[Dict[str, int]], default_size: Optional[int]) -> None:
        if not groups:
            return
        self._sizes = {**groups, "_ray_system_default": default_size or 1}
        self._threads = {group: threading.Semaphore(size) for group, size in self._sizes.items()}
        for name, member in inspect.getmembers(cls, callable):
            group = getattr(member, "__ionet_method_options__", {}).get("concurrency_group")
            if group is not None:
                if group not in groups:
                    raise ValueError(f"method {name} names concurrency group {group!r}, which the actor does not have")
                self._methods[name] = group

    def _group(self, method: str) -> Optional[str]:
        if not self._sizes:
            return None
        return self._methods.get(method, "_ray_system_default")

    def slot(self, method: str) -> Any:
        group = self._group(method)
        return self._threads[group] if group is not None else _NO_LIMIT

    async def run_async(self, method: str, coroutine: Any) -> Any:
        group = self._group(method)
        if group is None:
            return await coroutine
        semaphore = self._tasks.get(group)
        if semaphore is None:  # made on the event loop's thread, where it is used
            semaphore = self._tasks[group] = asyncio.Semaphore(self._sizes[group])
        async with semaphore:
            return await coroutine


class _NoLimit:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


_NO_LIMIT = _NoLimit()
_groups = _ConcurrencyGroups()

_coroutine_methods: Dict[Tuple[type, str], bool] = {}


def _is_coroutine_method(cls: type, name: str, bound: Callable) -> bool:
    known = _coroutine_methods.get((cls, name))
    if known is None:
        known = inspect.iscoroutinefunction(bound) or inspect.isasyncgenfunction(bound)
        _coroutine_methods[(cls, name)] = known
    return known


_loop: Optional[asyncio.AbstractEventLoop] = None
_loop_lock = threading.Lock()


def _event_loop() -> asyncio.AbstractEventLoop:
    """The actor's event loop, running in a daemon thread started on first use (a
    worker process hosts at most one actor)."""
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="ionet-actor-event-loop", daemon=True).start()
        return _loop


# Frames of these files lead to the user's code; tracebacks shown to users start after them.
_MACHINERY_FILES = frozenset({__file__, concurrent.futures._base.__file__, _remote_function_file})


def _user_traceback(exc: BaseException) -> Optional[TracebackType]:
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in _MACHINERY_FILES:
        tb = tb.tb_next
    return tb
