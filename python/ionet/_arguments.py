"""How the arguments of a task, actor constructor or actor method travel.

The native side moves a flat list of arguments, each a serialized value (`bytes`) or an
`ObjectRef` whose object the worker receives in its place. Keyword arguments are packed
into the same list:

    [positional values..., keyword values..., KeywordNames(names)]

The trailing `KeywordNames` (a tuple of the keyword names, present only when there are
keyword arguments) tells the worker how many of the values before it are keywords. So a
call without keyword arguments costs nothing extra, and `ObjectRef`s given by keyword are
resolved to their values as positional ones are (Ray's semantics: a top-level ref
argument passes its value; refs nested inside a value travel as refs).

Values too large to travel inline, or holding out-of-band buffers, are `put` first and
passed as refs, so their bytes are copied once, into the store.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Sequence, Tuple

from ionet import _ionet
from ionet._ionet import ObjectRef
from ionet._serialization import deserialize, serialize


class KeywordNames(tuple):
    """The names of the keyword arguments that end an argument list."""


def pack(args: Sequence[Any], kwargs: Dict[str, Any]) -> list:
    """The native argument list for a call with `args` and `kwargs`."""
    packed = [_pack_value(value) for value in args]
    if kwargs:
        packed.extend(_pack_value(value) for value in kwargs.values())
        packed.append(_keyword_names(tuple(kwargs)))
    return packed


def unpack(buffers: List[Any]) -> Tuple[list, Dict[str, Any]]:
    """The positional and keyword arguments of a call, from the native `Buffer`s."""
    values = [deserialize(buffer) for buffer in buffers]
    if not values or type(values[-1]) is not KeywordNames:
        return values, {}
    names = values.pop()
    split = len(values) - len(names)
    return values[:split], dict(zip(names, values[split:]))


def _pack_value(value: Any) -> Any:
    if isinstance(value, ObjectRef):
        return value
    # Refs inside the value are held by the call (or the object) while it needs them.
    parts, held = _ionet._serialize_holding(serialize, value)
    if len(parts) == 1:
        return parts[0] if held is None else (parts[0], held)
    return _ionet.put_parts(parts, held)


@functools.lru_cache(maxsize=256)
def _keyword_names(names: Tuple[str, ...]) -> bytes:
    # Calls reuse a handful of keyword sets: serialize each once.
    (packed,) = serialize(KeywordNames(names))
    return packed
