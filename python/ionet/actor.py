"""Actors: what `@ionet.remote` makes of a class, and handles to running actors."""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

from ionet import _arguments, _core, _ionet, _options
from ionet._export import CLASSES, ExportedDefinition
from ionet.remote_function import split_returns

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
        self._native_options = _options.actor_options(options)
        if "max_concurrency" not in self._native_options and _has_async_methods(cls):
            self._native_options["max_concurrency"] = ASYNC_ACTOR_DEFAULT_MAX_CONCURRENCY
        # Shared with the copies `options()` makes: the class is exported once.
        self._exported = exported or ExportedDefinition(cls, CLASSES)
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__doc__ = cls.__doc__

    def remote(self, *args: Any, **kwargs: Any) -> "ActorHandle":
        """Creates an actor, passing the arguments to the class's constructor."""
        _core.ensure_initialized()
        native = _ionet.create_actor(self._exported.key(), _arguments.pack(args, kwargs), self._native_options)
        return ActorHandle(native, self.__name__)

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


def _has_async_methods(cls: type) -> bool:
    return any(inspect.iscoroutinefunction(member) for _, member in inspect.getmembers(cls, inspect.isfunction))


class ActorHandle:
    """A reference to an actor: `handle.method.remote(*args, **kwargs)` calls a method
    and returns an `ObjectRef`. Calls from one caller run in the order they were made
    (when the actor's max_concurrency is 1).

    Methods are looked up by name when called, so a handle from `get_actor` works without
    the class. Handles can be passed to tasks and actors.
    """

    def __init__(self, native: Any, class_name: Optional[str] = None):
        self._native = native
        self._class_name = class_name

    def __getattr__(self, name: str) -> "ActorMethod":
        if name.startswith("_"):
            raise AttributeError(name)
        method = ActorMethod(self._native, name, 1)
        # Found directly on the next access, without __getattr__.
        self.__dict__[name] = method
        return method

    def __reduce__(self):
        return (ActorHandle, (self._native, self._class_name))

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
        ref = self._native_handle.call(self._name, _arguments.pack(args, kwargs), _NO_CALL_OPTIONS)
        if self._num_returns == 1:
            return ref
        return split_returns(ref, self._num_returns)

    def options(self, **options: Any) -> "ActorMethod":
        """This method with other call options (only num_returns)."""
        return ActorMethod(self._native_handle, self._name, _options.method_num_returns(options))

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
