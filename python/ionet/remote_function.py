"""Remote functions: what `@ionet.remote` makes of a function."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

from ionet import _arguments, _context, _core, _generator, _ionet, _options
from ionet._export import FUNCTIONS, ExportedDefinition
from ionet._ionet import ObjectRef


class NotRetryable(Exception):
    """Carries an exception that `retry_exceptions=[...]` does not name, so the worker
    reports it as final (never retried)."""

    def __init__(self, error: BaseException):
        super().__init__(error)
        self.error = error


class _RetryFilter:
    """The function a task runs when `retry_exceptions` names exception classes: an
    exception of another class is wrapped in `NotRetryable`."""

    def __init__(self, function: Callable, retryable: Sequence[type]):
        self.function = function
        self.retryable = tuple(retryable)
        self.__qualname__ = getattr(function, "__qualname__", repr(function))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.function(*args, **kwargs)
        except self.retryable:
            raise
        except Exception as exc:
            raise NotRetryable(exc) from None


def capture_options(options: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The call context of a task or actor submitted with `options`: the placement group
    its own children are captured into, if it asks for that."""
    strategy = options.get("scheduling_strategy")
    from ionet.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if isinstance(strategy, PlacementGroupSchedulingStrategy):
        return {
            "placement_group": strategy.placement_group,
            "capture": bool(strategy.placement_group_capture_child_tasks),
        }
    return None


def captured_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """`options` for a call made from inside a task whose group captures its children:
    with no strategy of its own, it runs in any bundle of that group."""
    context = _context.current()
    if context is None or not context.get("capture") or options.get("scheduling_strategy") is not None:
        return options
    from ionet.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = PlacementGroupSchedulingStrategy(context["placement_group"], -1, True)
    return {**options, "scheduling_strategy": strategy}


class RemoteFunction:
    """A function that runs as a task: `f.remote(*args, **kwargs)` returns an `ObjectRef`
    (a list of `num_returns` refs when that option is above 1).

    `f.options(**options)` gives the same function with other options: num_cpus,
    num_gpus, memory, resources, accelerator_type, max_retries, retry_exceptions,
    max_calls (a worker runs at most this many calls, then a fresh one takes over),
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
        checked, self._num_returns = _options.task_options(options)
        streams = self._num_returns in (_generator.STREAMING, _generator.DYNAMIC)
        # What the state API and the timeline call its tasks (Ray: the function's name).
        named = {"name": getattr(function, "__qualname__", getattr(function, "__name__", "task")), **checked}
        self._native_options = _options.native(named, generator=streams)
        self._context = capture_options(options)
        assigned = _options.assigned_resources(options)
        if assigned is not None:
            self._context = {**(self._context or {}), "resources": assigned}
        retryable = options.get("retry_exceptions")
        if isinstance(retryable, (list, tuple)):
            # A different definition: the function behind a filter of its exceptions.
            exported = ExportedDefinition(_RetryFilter(function, retryable), FUNCTIONS)
        # Shared with the copies `options()` makes: the function is exported once.
        self._exported = exported or ExportedDefinition(function, FUNCTIONS)
        self.__name__ = getattr(function, "__name__", type(function).__name__)
        self.__qualname__ = getattr(function, "__qualname__", self.__name__)
        self.__doc__ = function.__doc__

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Submits the function as a task; returns its ref (or refs)."""
        _core.ensure_initialized()
        context = _context.current()
        if context is not None and context.get("capture") and "scheduling_strategy" not in self._options:
            return self.options(**captured_options(self._options)).remote(*args, **kwargs)
        stream = None
        if self._num_returns in (_generator.STREAMING, _generator.DYNAMIC):
            stream = _generator.open_stream(self._options.get("_generator_backpressure_num_objects"))
            dynamic = self._num_returns == _generator.DYNAMIC
            kwargs = {**kwargs, _context.CONTEXT_KEY: {**(self._context or {}), "generator": (stream[1], stream[0], dynamic)}}
        elif self._context is not None:
            kwargs = {**kwargs, _context.CONTEXT_KEY: self._context}
        ref = _ionet.submit_task(self._exported.key(), _arguments.pack(args, kwargs), self._native_options)
        if self._num_returns == 1 or self._num_returns == _generator.DYNAMIC:
            return ref
        if stream is not None:
            return _generator.ObjectRefGenerator(stream[0], ref)
        return split_returns(ref, self._num_returns)

    def _remote(self, args: Optional[Sequence[Any]] = None, kwargs: Optional[Dict[str, Any]] = None, **options: Any) -> Any:
        """`remote` with the arguments as a list and a dict, and options for this call
        (Ray's form, used by libraries and Ray's own benchmarks)."""
        target = self.options(**options) if options else self
        return target.remote(*(args or ()), **(kwargs or {}))

    def options(self, **options: Any) -> "RemoteFunction":
        """This function with `options` overriding the decorator's."""
        merged = {**self._options, **options}
        same_filter = merged.get("retry_exceptions") == self._options.get("retry_exceptions")
        return RemoteFunction(self._function, merged, self._exported if same_filter else None)

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
