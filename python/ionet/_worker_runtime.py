"""What a worker process runs for the native worker: tasks, actor constructors, actor
method calls. The native side calls these from its worker threads, holding the GIL.

Results follow one convention: a list of parts (as `put_parts` takes) holding the
serialized return value, or, when the call raised, a `str` made by
`ionet.exceptions.encode_task_failure` (readable traceback plus the pickled exception,
which the caller raises again).

Functions and classes are loaded from the control store's KV by key on first use and
kept for the life of the process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
from types import TracebackType
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import cloudpickle

from ionet import _arguments, _export, _ionet
from ionet._serialization import Part, serialize
from ionet.exceptions import IonetSystemError, describe_failure, encode_task_failure

_definitions: Dict[Tuple[str, bytes], Any] = {}


def _load(namespace: str, key: bytes) -> Any:
    definition = _definitions.get((namespace, key))
    if definition is None:
        payload = _ionet.kv_get(namespace, key)
        if payload is None:
            raise IonetSystemError(f"no definition under key {key.hex()} in KV namespace {namespace}")
        definition = cloudpickle.loads(payload)
        _definitions[(namespace, key)] = definition
    return definition


def execute_task(function_key: bytes, args: List[Any]) -> Union[List[Part], str]:
    """Runs the function exported under `function_key` with the arguments in `args`."""
    function = None
    try:
        function = _load(_export.FUNCTIONS, function_key)
        positional, keywords = _arguments.unpack(args)
        return serialize(function(*positional, **keywords))
    except BaseException as exc:
        name = getattr(function, "__qualname__", f"task {function_key.hex()[:16]}")
        return encode_task_failure(exc, _user_traceback(exc), name)


def create_actor(class_key: bytes, args: List[Any]) -> Any:
    """The instance of the class exported under `class_key`, built with `args`.

    Raises an error whose text (what the native side reports as the actor's death
    cause) holds the constructor's traceback.
    """
    cls = None
    try:
        cls = _load(_export.CLASSES, class_key)
        positional, keywords = _arguments.unpack(args)
        return cls(*positional, **keywords)
    except BaseException as exc:
        name = f"{getattr(cls, '__qualname__', 'actor')}.__init__"
        raise RuntimeError(describe_failure(exc, _user_traceback(exc), name)) from exc


def call_actor(instance: Any, method: str, args: List[Any]) -> Union[List[Part], str]:
    """Calls `instance.method` with the arguments in `args`.

    A coroutine method runs on the actor's event loop, so that calls on several worker
    threads interleave there while each thread waits for its own.
    """
    try:
        bound = getattr(instance, method)
        positional, keywords = _arguments.unpack(args)
        if _is_coroutine_method(type(instance), method, bound):
            coroutine = bound(*positional, **keywords)
            result = asyncio.run_coroutine_threadsafe(coroutine, _event_loop()).result()
        else:
            result = bound(*positional, **keywords)
        return serialize(result)
    except BaseException as exc:
        return encode_task_failure(exc, _user_traceback(exc), f"{type(instance).__qualname__}.{method}")


_coroutine_methods: Dict[Tuple[type, str], bool] = {}


def _is_coroutine_method(cls: type, name: str, bound: Callable) -> bool:
    known = _coroutine_methods.get((cls, name))
    if known is None:
        known = _coroutine_methods[(cls, name)] = inspect.iscoroutinefunction(bound)
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
_MACHINERY_FILES = frozenset({__file__, concurrent.futures._base.__file__})


def _user_traceback(exc: BaseException) -> Optional[TracebackType]:
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in _MACHINERY_FILES:
        tb = tb.tb_next
    return tb
