"""Actors: what `@ionet.remote` makes of a class, and handles to running actors."""

from __future__ import annotations

import inspect
import sys
from typing import Any, Callable, Dict, Optional, Sequence

from ionet import _arguments, _context, _core, _generator, _ionet, _options
from ionet._export import CLASSES, ExportedDefinition
from ionet.remote_function import capture_options, captured_options, split_returns

# An async actor serves this many calls at once unless told otherwise, as in Ray.
ASYNC_ACTOR_DEFAULT_MAX_CONCURRENCY = 1000

_NO_CALL_OPTIONS: Dict[str, Any] = {}


class ActorClass:
    """A class whose instances live in worker processes: `Cls.remote(*args, **kwargs)`
    starts one and returns its `ActorHandle`.

    `Cls.options(**options)` gives the same class with other options: name, namespace,
    lifetime ("detached"), get_if_exists, max_restarts, max_task_retries,
    max_concurrency, num_cpus, num_gpus, memory, resources, accelerator_type,
    scheduling_strategy. max_concurrency defaults to 1000 for a class with any `async
    def` method (its calls interleave on the actor's event loop), else 1.
    """

    def __init__(self, cls: type, options: Dict[str, Any], exported: Optional[ExportedDefinition] = None):
        self._class = cls
        self._options = options
        checked = _options.actor_options(options)
        if "max_concurrency" not in checked and _has_async_methods(cls):
            checked["max_concurrency"] = ASYNC_ACTOR_DEFAULT_MAX_CONCURRENCY
        self._method_options = _declared_method_options(cls)
        self._context = dict(capture_options(options) or {})
        groups = options.get("concurrency_groups")
        if groups:
            # The native side runs up to every group's calls at once; the worker splits them.
            default = checked.get("max_concurrency", 1)
            self._context.update(concurrency_groups=dict(groups), max_concurrency=default)
            checked["max_concurrency"] = default + sum(groups.values())
        self._native_options = _options.native(checked, actor=True)
        if "name" in options:
            self._context["name"] = options["name"]
        self._context["resources"] = _options.assigned_resources({"num_cpus": 0, **options})
        # Shared with the copies `options()` makes: the class is exported once.
        self._exported = exported or ExportedDefinition(cls, CLASSES)
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__doc__ = cls.__doc__

    def remote(self, *args: Any, **kwargs: Any) -> "ActorHandle":
        """Creates an actor, passing the arguments to the class's constructor."""
        _core.ensure_initialized()
        context = _context.current()
        if context is not None and context.get("capture") and "scheduling_strategy" not in self._options:
            return self.options(**captured_options(self._options)).remote(*args, **kwargs)
        if self._context:
            kwargs = {**kwargs, _context.CONTEXT_KEY: self._context}
        native = _ionet.create_actor(
            self._exported.key(), _arguments.pack(args, kwargs), self._native_options, self.__name__
        )
        return ActorHandle(native, self.__name__, self._method_options)

    def _remote(
        self, args: Optional[Sequence[Any]] = None, kwargs: Optional[Dict[str, Any]] = None, **options: Any
    ) -> "ActorHandle":
        """`remote` with the arguments as a list and a dict, and options for this actor
        (Ray's form, used by libraries and Ray's own benchmarks)."""
        target = self.options(**options) if options else self
        return target.remote(*(args or ()), **(kwargs or {}))

    def options(self, **options: Any) -> "ActorClass":
        """This class with `options` overriding the decorator's."""
        return ActorClass(self._class, {**self._options, **options}, self._exported)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"actors cannot be instantiated directly: instead of {self.__name__}(), use {self.__name__}.remote()"
        )

    def __reduce__(self):
        return (ActorClass, (self._class, self._options))

    def __repr__(self) -> str:
        return f"<ionet actor class {self.__qualname__}>"


def _declared_method_options(cls: type) -> Dict[str, Dict[str, Any]]:
    """The options each method declared with `@ionet.method(...)`."""
    return {
        name: dict(member.__ionet_method_options__)
        for name, member in inspect.getmembers(cls, callable)
        if hasattr(member, "__ionet_method_options__")
    }


def method(*args: Any, **options: Any) -> Callable:
    """Declares an actor method's options, as Ray's `@ray.method(num_returns=2,
    concurrency_group="io")`."""
    if args:
        raise TypeError("method() takes only keyword options: @ionet.method(num_returns=2)")
    checked = _options.method_options(options)

    def declare(function: Callable) -> Callable:
        function.__ionet_method_options__ = checked  # type: ignore[attr-defined]
        return function

    return declare


def exit_actor() -> None:
    """Ends the actor whose method calls this, for good (no restart), as Ray's
    `ray.actor.exit_actor()`: the call and those queued fail with `ActorDiedError`, and
    the worker process exits. Raises outside an actor."""
    if _ionet.runtime_context()["actor_id"] is None:
        raise TypeError("exit_actor() is called from inside an actor's method")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    _ionet.exit_actor()


def _has_async_methods(cls: type) -> bool:
    return any(inspect.iscoroutinefunction(member) for _, member in inspect.getmembers(cls, inspect.isfunction))


class ActorHandle:
    """A reference to an actor: `handle.method.remote(*args, **kwargs)` calls a method
    and returns an `ObjectRef`. Calls from one caller run in the order they were made
    (when the actor's max_concurrency is 1).

    Methods are looked up by name when called, so a handle from `get_actor` works without
    the class. Handles can be passed to tasks and actors.
    """

    def __init__(
        self, native: Any, class_name: Optional[str] = None, method_options: Optional[Dict[str, Dict[str, Any]]] = None
    ):
        self._native = native
        self._class_name = class_name
        self._method_options = method_options or {}

    def __getattr__(self, name: str) -> "ActorMethod":
        if name.startswith("_"):
            raise AttributeError(name)
        method = ActorMethod(self._native, name, self._method_options.get(name, {}).get("num_returns", 1))
        # Found directly on the next access, without __getattr__.
        self.__dict__[name] = method
        return method

    def __reduce__(self):
        return (ActorHandle, (self._native, self._class_name, self._method_options))

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, ActorHandle) and other._native.hex() == self._native.hex()

    def __hash__(self) -> int:
        return hash(self._native.hex())

    def __repr__(self) -> str:
        return f"ActorHandle({self._class_name or 'actor'}, {self._native.hex()})"


class ActorMethod:
    """A method of an actor: `.remote(*args, **kwargs)` calls it; `.options(num_returns=n)`
    makes a call return n refs."""

    def __init__(self, native_handle: Any, name: str, num_returns: int):
        self._native_handle = native_handle
        self._name = name
        self._num_returns = num_returns

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the method on the actor; returns the ref of its result (or refs)."""
        stream = None
        if self._num_returns in (_generator.STREAMING, _generator.DYNAMIC):
            stream = _generator.open_stream(None)
            dynamic = self._num_returns == _generator.DYNAMIC
            kwargs = {**kwargs, _context.CONTEXT_KEY: {"generator": (stream[1], stream[0], dynamic)}}
        ref = self._native_handle.call(self._name, _arguments.pack(args, kwargs), _NO_CALL_OPTIONS)
        if self._num_returns == 1 or self._num_returns == _generator.DYNAMIC:
            return ref
        if stream is not None:
            return _generator.ObjectRefGenerator(stream[0], ref)
        return split_returns(ref, self._num_returns)

    def _remote(
        self, args: Optional[Sequence[Any]] = None, kwargs: Optional[Dict[str, Any]] = None, **options: Any
    ) -> Any:
        """`remote` with the arguments as a list and a dict (Ray's form)."""
        target = self.options(**options) if options else self
        return target.remote(*(args or ()), **(kwargs or {}))

    def options(self, **options: Any) -> "ActorMethod":
        """This method with other call options (num_returns; concurrency_group is the
        method's own, declared with `@ionet.method`)."""
        checked = _options.method_options(options)
        return ActorMethod(self._native_handle, self._name, checked.get("num_returns", self._num_returns))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"actor methods cannot be called directly: instead of handle.{self._name}(), "
            f"use handle.{self._name}.remote()"
        )


def get_actor(name: str, namespace: Optional[str] = None) -> ActorHandle:
    """The handle of the live actor named `name` in `namespace` (default: this job's).

    Raises `ValueError` (`ionet.exceptions.NotFoundError`) when there is none.
    """
    return ActorHandle(_ionet.get_actor(name, namespace))


def kill(actor: ActorHandle, *, no_restart: bool = True) -> None:
    """Kills the actor at once; its pending and later calls raise `ActorDiedError`.

    With `no_restart=False` it is restarted if it has restarts left.
    """
    if not isinstance(actor, ActorHandle):
        raise ValueError(f"kill() expects an ActorHandle, got {type(actor).__name__}")
    _ionet.kill(actor._native, no_restart)
