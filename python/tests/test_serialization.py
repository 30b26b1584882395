"""The object framing, argument layout and error transport, without a cluster."""

import ctypes
import gc
import pickle
import struct
import weakref

import pytest

from ionet import _arguments
from ionet._serialization import ALIGNMENT, deserialize, serialize
from ionet.exceptions import (
    ActorDiedError,
    GetTimeoutError,
    IonetSystemError,
    IonetTaskError,
    NotFoundError,
    RayTaskError,
    SerializationError,
    _native_error,
    encode_task_failure,
)


class MemoryBuffer:
    """Stands in for the native Buffer: `size` bytes at `address`, alive with this object."""

    def __init__(self, data: bytes):
        self._memory = ctypes.create_string_buffer(data, max(len(data), 1))
        self.address = ctypes.addressof(self._memory)
        self.size = len(data)


def joined(parts) -> bytes:
    """The object bytes `put_parts` would store."""
    return b"".join(part if isinstance(part, bytes) else ctypes.string_at(part[0], part[1]) for part in parts)


def round_trip(value):
    return deserialize(MemoryBuffer(joined(serialize(value))))


def test_none_is_the_documented_constant():
    assert joined(serialize(None)) == b"ION1" + struct.pack("<IQ", 0, 4) + b"\x80\x05N."


def test_empty_object_reads_as_none():
    assert deserialize(MemoryBuffer(b"")) is None


@pytest.mark.parametrize("value", [0, "text", b"bytes", [1, 2.5, {"a": (None, True)}], {"nested": {"x": [b"y"]}}])
def test_values_round_trip(value):
    assert round_trip(value) == value


def test_small_value_is_one_bytes_part_and_large_pickle_is_not_joined():
    assert len(serialize(list(range(10)))) == 1
    parts = serialize(b"x" * (200 * 1024))
    assert len(parts) == 2 and all(isinstance(part, bytes) for part in parts)


def test_closures_round_trip():
    offset = 5
    assert round_trip(lambda x: x + offset)(1) == 6


def test_unpicklable_value_names_its_type():
    with pytest.raises(TypeError, match="generator") as info:
        serialize(i for i in range(3))
    assert isinstance(info.value, SerializationError)


def test_numpy_buffers_travel_out_of_band_aligned_and_read_back_as_views():
    np = pytest.importorskip("numpy")
    array = np.arange(1000, dtype=np.float64)
    parts = serialize({"a": array, "b": array[::-1].copy()})
    memory_parts = [part for part in parts if isinstance(part, tuple)]
    assert len(memory_parts) == 2 and memory_parts[0][0] == array.ctypes.data
    data = joined(parts)
    magic, count, pickle_length = struct.unpack_from("<4sIQ", data)
    lengths = struct.unpack_from(f"<{count}Q", data, 16)
    offset = 16 + 8 * count + pickle_length
    for length in lengths:
        offset += -offset % ALIGNMENT
        assert data[offset : offset + length] in (array.tobytes(), array[::-1].tobytes())
        offset += length

    buffer = MemoryBuffer(data)
    value = deserialize(buffer)
    assert np.array_equal(value["a"], array) and np.array_equal(value["b"], array[::-1])
    assert not value["a"].flags.writeable
    assert buffer.address <= value["a"].ctypes.data < buffer.address + buffer.size
    # The views keep the buffer alive, and only they do.
    alive = weakref.ref(buffer)
    del buffer
    gc.collect()
    assert alive() is not None and value["a"][999] == 999.0
    del value
    gc.collect()
    assert alive() is None


def test_readonly_numpy_array_is_written_from_its_memory():
    np = pytest.importorskip("numpy")
    array = np.arange(100, dtype=np.int32)
    array.flags.writeable = False
    (part,) = [part for part in serialize(array) if isinstance(part, tuple)]
    assert part[0] == array.ctypes.data and part[1] == array.nbytes


def test_arrow_table_round_trips():
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"x": list(range(1000)), "y": [str(i) for i in range(1000)]})
    assert round_trip(table).equals(table)


def test_arguments_carry_keywords_after_positionals():
    packed = _arguments.pack((1, "two"), {"three": 3.0, "four": [4]})
    assert all(isinstance(argument, bytes) for argument in packed)
    assert _arguments.unpack([MemoryBuffer(argument) for argument in packed]) == ([1, "two"], {"three": 3.0, "four": [4]})
    assert _arguments.unpack([MemoryBuffer(argument) for argument in _arguments.pack((1,), {})]) == ([1], {})


class CodedError(Exception):
    def __init__(self, code):
        super().__init__(f"failure {code}")
        self.code = code


def _failure(exc: BaseException):
    try:
        raise exc
    except BaseException as raised:
        return encode_task_failure(raised, raised.__traceback__, "remote_function")


def test_task_failure_is_raised_as_the_remote_exception_class():
    error = _native_error("task_failed", *_failure(CodedError(7)))
    assert isinstance(error, CodedError) and isinstance(error, IonetTaskError) and isinstance(error, RayTaskError)
    assert error.code == 7 and isinstance(error.cause, CodedError)
    assert "remote_function failed" in str(error) and "raise exc" in str(error) and "failure 7" in str(error)
    rebuilt = pickle.loads(pickle.dumps(error))
    assert isinstance(rebuilt, CodedError) and str(rebuilt) == str(error)


def test_os_errors_keep_their_fields():
    error = _native_error("task_failed", *_failure(FileNotFoundError(2, "missing")))
    assert isinstance(error, FileNotFoundError) and error.errno == 2


def test_failure_without_pickle_is_a_plain_task_error():
    error = _native_error("task_failed", "f failed\nTraceback ...\nValueError: x")
    assert type(error) is IonetTaskError and error.cause is None and "ValueError: x" in str(error)


def test_error_kinds_map_to_classes():
    assert isinstance(_native_error("not_found", "no actor named 'x'"), ValueError)
    assert isinstance(_native_error("already_exists", "name taken"), ValueError)
    assert isinstance(_native_error("not_found", "no actor named 'x'"), NotFoundError)
    timeout = _native_error("timeout", "objects not ready")
    assert isinstance(timeout, GetTimeoutError) and isinstance(timeout, TimeoutError)
    assert isinstance(_native_error("actor_died", "killed"), ActorDiedError)
    assert isinstance(_native_error("no_such_kind", "?"), IonetSystemError)
