"""ionet: a Rust-native task and actor runtime with Ray's Python API.

    import ionet as ray

    @ray.remote
    def square(x):
        return x * x

    ray.init()
    print(ray.get([square.remote(i) for i in range(4)]))

The work is done by the native module `ionet._ionet` (a pyo3 extension: the core worker,
the object store client, the embedded cluster). This package gives it Ray's API:

- `_core`: init/shutdown, get/put/wait/cancel, the cluster's nodes and resources;
- `remote_function`, `actor`: what `@ionet.remote` makes of functions and classes;
- `_serialization`, `_arguments`: values to object bytes (pickle protocol 5, zero-copy
  numpy reads) and the layout of call arguments;
- `_export`: remote definitions stored once in the control store's KV;
- `_worker`, `_worker_runtime`: the worker process, which the native side drives;
- `exceptions`: the errors, with Ray's names as aliases;
- `util`: placement groups and scheduling strategies.
"""

from typing import Any as _Any

import cloudpickle

from ionet import exceptions, util
from ionet._core import (
    available_resources,
    cancel,
    cluster_resources,
    get,
    get_gpu_ids,
    init,
    is_initialized,
    nodes,
    put,
    shutdown,
    wait,
)
from ionet._generator import DynamicObjectRefGenerator, ObjectRefGenerator
from ionet._ionet import ObjectRef
from ionet.actor import ActorClass, ActorHandle, exit_actor, get_actor, kill, method
from ionet.remote_function import RemoteFunction
from ionet.runtime_context import get_runtime_context


def __getattr__(name: str) -> _Any:
    # `__version__` on first use: importlib.metadata costs a worker process's start 80 ms.
    if name == "__version__":
        from importlib import metadata

        try:
            return metadata.version("ionet")
        except metadata.PackageNotFoundError:  # imported from a source tree, not installed
            return "0+unknown"
    raise AttributeError(f"module 'ionet' has no attribute {name!r}")


def remote(*args: _Any, **options: _Any) -> _Any:
    """Makes a function a remote function, or a class an actor class.

    Bare, `@ionet.remote`, or with options, `@ionet.remote(num_gpus=1, max_retries=2)`;
    see `RemoteFunction` and `ActorClass` for the options each takes.
    """
    if len(args) == 1 and not options and callable(args[0]):
        return _make_remote(args[0], {})
    if args:
        raise TypeError("remote() takes a function or class, or only keyword options: @ionet.remote(num_cpus=2)")
    return lambda function_or_class: _make_remote(function_or_class, options)


def _make_remote(function_or_class: _Any, options: dict) -> _Any:
    if isinstance(function_or_class, type):
        return ActorClass(function_or_class, options)
    if callable(function_or_class):
        return RemoteFunction(function_or_class, options)
    raise TypeError(f"remote() takes a function or class, got {type(function_or_class).__name__}")


__all__ = [
    "ActorClass",
    "ActorHandle",
    "DynamicObjectRefGenerator",
    "ObjectRef",
    "ObjectRefGenerator",
    "RemoteFunction",
    "available_resources",
    "cancel",
    "cloudpickle",
    "cluster_resources",
    "exceptions",
    "exit_actor",
    "get",
    "get_actor",
    "get_gpu_ids",
    "get_runtime_context",
    "init",
    "is_initialized",
    "kill",
    "method",
    "nodes",
    "put",
    "remote",
    "shutdown",
    "util",
    "wait",
]
