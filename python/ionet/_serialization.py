"""How a Python value becomes the bytes of an object, and back.

A value is pickled by cloudpickle with protocol 5. Buffers that pickled objects hand over
out of band (numpy arrays, Arrow buffers) are not copied into the pickle: they follow it,
each aligned, so that a reader can use them in place. The bytes of one value are:

    offset 0           b"ION1"
    offset 4           u32 little-endian: n, the number of out-of-band buffers
    offset 8           u64 little-endian: the length of the pickle
    offset 16          n × u64 little-endian: the length of each buffer
    16 + 8n            the pickle
    then, n times      zero padding up to the next multiple of 64, then one buffer

So `None` is `b"ION1" + u32(0) + u64(4) + b"\\x80\\x05N."`, and an empty object also reads
as `None`. Offsets are relative to the object's start, which the store aligns to 64.

Pickling is cloudpickle's, except that code objects keep their file names (cloudpickle
3.1 and later replace them with "<dynamic-code>"), so that the tracebacks of remote
functions show their source lines. Code travels as `marshal` data, tied to the Python
version as cloudpickle's own form of code is.

Writing hands the native `put_parts` a list of parts: `bytes`, or `(address, length,
keepalive)` for a buffer whose memory the native side may read directly, so a large
array is copied once, into shared memory. Reading gives read-only views of the object's
memory (a numpy array read back is a read-only view of the store, as in Ray); each view
keeps the native `Buffer` alive.
"""

from __future__ import annotations

import ctypes
import io
import marshal
import pickle
import struct
import types
from collections import ChainMap
from typing import Any, Callable, List, Optional, Tuple, Union

import cloudpickle

from ionet.exceptions import IonetSystemError, SerializationError

MAGIC = b"ION1"
ALIGNMENT = 64
# Values whose pickle is at most this long, with no out-of-band buffer, are one `bytes`
# part: they travel inline (the native side keeps objects up to 100 KiB in memory).
INLINE_LIMIT = 100 * 1024

_FIXED_HEADER = struct.Struct("<4sIQ")

# Values of these types hold neither code nor buffers, so the plain C pickler serves
# them, several times faster than setting up a cloudpickle pickler (small values like
# these dominate task arguments and results).
_PLAIN_TYPES = frozenset({type(None), bool, int, float, str, bytes})

# A part of an object: bytes, or memory (address, length, an object keeping it alive).
Part = Union[bytes, tuple]


def _reduce_code(code: types.CodeType) -> tuple:
    return marshal.loads, (marshal.dumps(code),)


class _Pickler(cloudpickle.Pickler):
    dispatch_table = ChainMap({types.CodeType: _reduce_code}, cloudpickle.Pickler.dispatch_table)


def dumps(value: Any, buffer_callback: Optional[Callable[[pickle.PickleBuffer], Any]] = None) -> bytes:
    """`value` pickled with protocol 5 (see the module's note on code objects)."""
    stream = io.BytesIO()
    _Pickler(stream, protocol=5, buffer_callback=buffer_callback).dump(value)
    return stream.getvalue()


def serialize(value: Any) -> List[Part]:
    """The parts of `value`'s object bytes; one `bytes` part when it is small.

    Raises `SerializationError` (a `TypeError`) naming the value's type when it cannot
    be pickled.
    """
    if type(value) in _PLAIN_TYPES:
        data, raws = pickle.dumps(value, protocol=5), []
    else:
        data, raws = _pickle_with_buffers(value)
    if not raws:
        header = _FIXED_HEADER.pack(MAGIC, 0, len(data))
        return [header + data] if len(data) <= INLINE_LIMIT else [header, data]
    lengths = [raw.nbytes for raw in raws]
    header = struct.pack(f"<4sIQ{len(lengths)}Q", MAGIC, len(lengths), len(data), *lengths)
    parts: List[Part] = [header, data]
    offset = len(header) + len(data)
    for raw in raws:
        padding = -offset % ALIGNMENT
        if padding:
            parts.append(bytes(padding))
        parts.append(_memory_part(raw))
        offset += padding + raw.nbytes
    return parts


def _pickle_with_buffers(value: Any) -> Tuple[bytes, List[memoryview]]:
    buffers: List[pickle.PickleBuffer] = []
    try:
        data = dumps(value, buffer_callback=buffers.append)
        return data, [buffer.raw() for buffer in buffers]
    except Exception as exc:
        raise SerializationError(f"cannot serialize value of type {type(value).__name__!r}: {exc}") from exc


def deserialize(buffer: Any) -> Any:
    """The value held by a native `Buffer`, with out-of-band buffers as views into it."""
    if buffer.size == 0:
        return None
    view = memory_view(buffer)
    magic, count, pickle_length = _FIXED_HEADER.unpack_from(view)
    if magic != MAGIC:
        raise IonetSystemError(f"object of {buffer.size} bytes was not written by ionet's Python serializer")
    start = _FIXED_HEADER.size + 8 * count
    end = start + pickle_length
    if count == 0:
        return pickle.loads(view[start:end])
    buffers = []
    offset = end
    for length in struct.unpack_from(f"<{count}Q", view, _FIXED_HEADER.size):
        offset += -offset % ALIGNMENT
        buffers.append(view[offset : offset + length])
        offset += length
    return pickle.loads(view[start:end], buffers=buffers)


def memory_view(buffer: Any) -> memoryview:
    """A read-only byte view of a native `Buffer`'s memory, without a copy.

    The view (and every slice of it, and every array made from it) keeps `buffer` alive:
    the memory may be a mapping of the store that `buffer` holds open.
    """
    size = buffer.size
    if size == 0:
        return memoryview(b"")
    array = (ctypes.c_char * size).from_address(buffer.address)
    array._ionet_owner = buffer
    return memoryview(array).cast("B").toreadonly()


def _memory_part(raw: memoryview) -> Part:
    """A part for one out-of-band buffer: its address when it can be found, else a copy."""
    if raw.nbytes == 0:
        return b""
    if not raw.readonly:
        array = (ctypes.c_char * raw.nbytes).from_buffer(raw)
        return (ctypes.addressof(array), raw.nbytes, array)
    # ctypes cannot take the address of read-only memory (an array read back from the
    # store, an Arrow buffer); numpy can, and is there whenever such buffers are.
    try:
        import numpy
    except ImportError:
        return raw.tobytes()
    array = numpy.frombuffer(raw, dtype=numpy.uint8)
    return (array.ctypes.data, raw.nbytes, array)
