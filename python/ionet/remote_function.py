"""Remote functions: what `@ionet.remote` makes of a function."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

from ionet import _arguments, _core, _ionet, _options
from ionet._export import FUNCTIONS, ExportedDefinition
from ionet._ionet import ObjectRef


class RemoteFunction:
    """A function that runs as a task: `f.remote(*args, **kwargs)` returns an `ObjectRef`
    (a list of `num_returns` refs when that option is above 1).

    `f.options(**options)` gives the same function with other options: num_cpus,
    num_gpus, memory, resources, accelerator_type, max_retries, retry_exceptions,
    num_returns, scheduling_strategy.
    """

    def __init__(
        self,
        function: Callable,
        options: Dict[str, Any],
        exported: Optional[ExportedDefinition] = None,
    ):
        self._function = function
        self._options = options
        self._native_options, self._num_returns = _options.task_options(options)
        # Shared with the copies `options()` makes: the function is exported once.
        self._exported = exported or ExportedDefinition(function, FUNCTIONS)
        self.__name__ = getattr(function, "__name__", type(function).__name__)
        self.__qualname__ = getattr(function, "__qualname__", self.__name__)
        self.__doc__ = function.__doc__

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Submits the function as a task; returns its ref (or refs)."""
        _core.ensure_initialized()
        ref = _ionet.submit_task(self._exported.key(), _arguments.pack(args, kwargs), self._native_options)
        if self._num_returns == 1:
            return ref
        return split_returns(ref, self._num_returns)

    def options(self, **options: Any) -> "RemoteFunction":
        """This function with `options` overriding the decorator's."""
        return RemoteFunction(self._function, {**self._options, **options}, self._exported)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"remote functions cannot be called directly: instead of {self.__name__}(), "
            f"use {self.__name__}.remote()"
        )

    def __reduce__(self):
        return (RemoteFunction, (self._function, self._options))

    def __repr__(self) -> str:
        return f"<ionet remote function {self.__qualname__}>"


def _select_return(values: Sequence[Any], index: int, count: int) -> Any:
    if len(values) != count:
        raise ValueError(f"the task was declared with num_returns={count} but returned {len(values)} values")
    return values[index]


_select = RemoteFunction(_select_return, {"num_cpus": 0})


def split_returns(ref: ObjectRef, count: int) -> List[ObjectRef]:
    """One ref per item of the sequence that `ref` will hold (`num_returns` > 1).

    The native side gives a task one result object; each item is then picked out by a
    small task of no resources that reads the whole result.
    """
    return [_select.remote(ref, index, count) for index in range(count)]
