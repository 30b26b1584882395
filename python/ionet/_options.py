"""Options of tasks and actors, as Ray names them: checked here (Python types), then
converted once into the native `ionet._ionet.Options` that `submit_task` / `create_actor`
take; the native side parses strategies, selectors and counts with the same parsers Rust
callers use.

Translation happens when a remote function or class is decorated or given `.options()`,
not on each call. Options left unset are left out, so the native defaults apply (a task
takes 1 CPU and is retried 3 times; an actor takes no CPU).
"""

from __future__ import annotations

import json
from numbers import Real
from typing import Any, Callable, Dict, Optional, Tuple

from ionet import _ionet
from ionet.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or value < 0:
        raise ValueError(f"option {name} must be a non-negative number, got {value!r}")
    return float(value)


def _integer(minimum: int) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"option {name} must be an integer >= {minimum}, got {value!r}")
        return value

    return check


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"option {name} must be True or False, got {value!r}")
    return value


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"option {name} must be a string, got {value!r}")
    return value


def _optional_string(name: str, value: Any) -> Any:
    return None if value is None else _string(name, value)


def _custom_resources(name: str, value: Any) -> Dict[str, float]:
    if not isinstance(value, dict):
        raise ValueError(f"option {name} must be a dict of resource name to quantity, got {value!r}")
    for reserved in ("CPU", "GPU"):
        if reserved in value:
            raise ValueError(f"option {name} cannot hold {reserved!r}: use num_{reserved.lower()}s")
    return {str(resource): _number(f"{name}[{resource!r}]", amount) for resource, amount in value.items()}


def _lifetime(name: str, value: Any) -> Any:
    if value not in (None, "detached", "non_detached"):
        raise ValueError(f"option {name} must be None, 'detached' or 'non_detached', got {value!r}")
    return "detached" if value == "detached" else None


def _retry_exceptions(name: str, value: Any) -> bool:
    """True, False, or a list of exception classes (only those are retried: the remote
    function filters on the worker, the native side retries what it is told may be)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(cls, type) and issubclass(cls, BaseException) for cls in value
    ):
        return True
    raise ValueError(f"option {name} must be True, False or a non-empty list of exception classes, got {value!r}")


def _concurrency_groups(name: str, value: Any) -> Any:
    """Checked here; handled by `ionet.actor` (it never reaches the native side)."""
    if not isinstance(value, dict) or not all(
        isinstance(group, str) and isinstance(size, int) and not isinstance(size, bool) and size >= 1
        for group, size in value.items()
    ):
        raise ValueError(f"option {name} must be a dict of group name to a concurrency >= 1, got {value!r}")
    return None


def _scheduling_strategy(name: str, value: Any) -> Any:
    """The native form: None, a strategy's text ("DEFAULT", "SPREAD", "COST", "COST_PER_TFLOP",
    "node:<id>[:soft]": the native side parses it, and refuses an unknown one), or
    ("placement_group", id, index); index -1 is any bundle of the group."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, NodeAffinitySchedulingStrategy):
        return f"node:{value.node_id}" + (":soft" if value.soft else "")
    if isinstance(value, PlacementGroupSchedulingStrategy):
        index = value.placement_group_bundle_index
        if not isinstance(index, int) or index < -1:
            raise ValueError(f"placement_group_bundle_index must be -1 (any bundle) or an index, got {index!r}")
        if index >= value.placement_group.bundle_count:
            raise ValueError(
                f"placement_group_bundle_index {index} is out of range: the group has "
                f"{value.placement_group.bundle_count} bundles"
            )
        return ("placement_group", str(value.placement_group.id), index)
    raise ValueError(
        f"option {name} must be 'DEFAULT', 'SPREAD', 'COST', 'COST_PER_TFLOP', a NodeAffinitySchedulingStrategy or a "
        f"PlacementGroupSchedulingStrategy, got {value!r}"
    )


def _label_selector(name: str, value: Any) -> Dict[str, str]:
    """Ray's form, label to "value", "!value", "in(a,b)" or "!in(a,b)"; the native side
    parses each entry (and refuses, naming it, one that does not)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"option {name} must be a dict of label to a string such as 'eu' or 'in(eu,us)', got {value!r}")
    return dict(value)


def _runtime_env(name: str, value: Any) -> Optional[str]:
    """Ray's runtime_env (a job's in `init`; a task's or actor's: its env_vars and pip /
    uv requirements), as JSON for the native side, which checks it."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"option {name} must be a dict, got {value!r}")
    try:
        return json.dumps(value)
    except TypeError as err:
        raise TypeError(f"option {name} must hold only JSON values (strings, lists, dicts): {err}") from None


_RESOURCE_OPTIONS = {
    "num_cpus": _number,
    "num_gpus": _number,
    "memory": _integer(0),
    "resources": _custom_resources,
    "accelerator_type": _string,
    "scheduling_strategy": _scheduling_strategy,
    "label_selector": _label_selector,
    "runtime_env": _runtime_env,
}

_TASK_OPTIONS = {
    **_RESOURCE_OPTIONS,
    "name": _string,
    "max_retries": _integer(-1),
    "retry_exceptions": _retry_exceptions,
    "max_calls": _integer(0),
}

_ACTOR_OPTIONS = {
    **_RESOURCE_OPTIONS,
    "name": _string,
    "namespace": _optional_string,
    "lifetime": _lifetime,
    "get_if_exists": _flag,
    "max_restarts": _integer(-1),
    "max_task_retries": _integer(-1),
    "max_concurrency": _integer(1),
    "concurrency_groups": _concurrency_groups,
}


def _translate(options: Dict[str, Any], checks: Dict[str, Callable], what: str) -> Dict[str, Any]:
    native = {}
    for name, value in options.items():
        check = checks.get(name)
        if check is None:
            raise ValueError(f"invalid option {name!r} for {what}; valid options: {', '.join(sorted(checks))}")
        translated = check(name, value)
        if translated is not None:
            native[name] = translated
    return native


def native(checked: Dict[str, Any], *, actor: bool = False, generator: bool = False) -> Any:
    """The native options (`ionet._ionet.Options`) of translated options."""
    options = dict(checked)
    strategy = options.pop("scheduling_strategy", None)
    if isinstance(strategy, tuple):
        _, options["placement_group"], options["bundle_index"] = strategy
    elif strategy is not None:
        options["scheduling_strategy"] = strategy
    return _ionet.Options(actor=actor, generator=generator, **options)


_RESOURCE_NAMES = ("num_cpus", "num_gpus", "memory", "resources")


def assigned_resources(options: Dict[str, Any]) -> Optional[Dict[str, float]]:
    """What a task or actor with `options` is given, by resource name, when any resource
    option is set (else None: the defaults apply)."""
    if not any(name in options for name in _RESOURCE_NAMES):
        return None
    assigned = {"CPU": float(options.get("num_cpus", 1)), "GPU": float(options.get("num_gpus", 0))}
    if options.get("memory"):
        assigned["memory"] = float(options["memory"])
    assigned.update({name: float(amount) for name, amount in (options.get("resources") or {}).items()})
    return {name: amount for name, amount in assigned.items() if amount}


def num_returns(value: Any) -> Any:
    """A count >= 1, or "streaming" / "dynamic" (a generator task)."""
    if value in ("streaming", "dynamic"):
        return value
    return _integer(1)("num_returns", value)


def task_options(options: Dict[str, Any]) -> Tuple[Dict[str, Any], Any]:
    """The native options of a task, and its `num_returns` (handled on this side)."""
    options = dict(options)
    returns = num_returns(options.pop("num_returns", 1))
    options.pop("_generator_backpressure_num_objects", None)
    return _translate(options, _TASK_OPTIONS, "remote functions"), returns


def actor_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """The native options of an actor."""
    native = _translate(options, _ACTOR_OPTIONS, "actors")
    if native.get("get_if_exists") and "name" not in native:
        raise ValueError("option get_if_exists needs a name")
    return native


_METHOD_OPTIONS = ("num_returns", "concurrency_group")


def method_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """The options of an actor method (`@ionet.method(...)` or `.options(...)`), checked."""
    unknown = set(options) - set(_METHOD_OPTIONS)
    if unknown:
        raise ValueError(
            f"invalid option(s) {', '.join(sorted(unknown))} for actor methods; valid: {', '.join(_METHOD_OPTIONS)}"
        )
    checked = dict(options)
    if "num_returns" in checked:
        checked["num_returns"] = num_returns(checked["num_returns"])
    if "concurrency_group" in checked:
        checked["concurrency_group"] = _string("concurrency_group", checked["concurrency_group"])
    return checked
