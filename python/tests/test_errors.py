"""Exceptions raised in tasks reach the caller with their class and remote traceback."""

import pytest

import ionet
from ionet.exceptions import IonetTaskError, RayError, RayTaskError

pytestmark = pytest.mark.usefixtures("local_cluster")


class CodedError(Exception):
    def __init__(self, code):
        super().__init__(f"failed with code {code}")
        self.code = code


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("this exception refuses to be pickled")


@ionet.remote
def fail_with_value_error(message):
    raise ValueError(message)


@ionet.remote
def fail_with_coded_error(code):
    raise CodedError(code)


@ionet.remote
def fail_unpicklably():
    raise Unpicklable("cannot travel")


@ionet.remote
def call_failing_task():
    return ionet.get(fail_with_value_error.remote("inner failure"))


def test_remote_value_error_is_caught_as_value_error():
    with pytest.raises(ValueError) as info:
        ionet.get(fail_with_value_error.remote("boom"), timeout=60)
    error = info.value
    assert isinstance(error, IonetTaskError) and isinstance(error, RayTaskError) and isinstance(error, RayError)
    assert isinstance(error.cause, ValueError)
    text = str(error)
    assert "raise ValueError(message)" in text and "boom" in text and "fail_with_value_error" in text


def test_custom_exception_keeps_its_class_and_fields():
    with pytest.raises(CodedError) as info:
        ionet.get(fail_with_coded_error.remote(7), timeout=60)
    assert info.value.code == 7 and "raise CodedError(code)" in str(info.value)


def test_error_of_a_nested_task_keeps_the_inner_class():
    with pytest.raises(ValueError) as info:
        ionet.get(call_failing_task.remote(), timeout=60)
    assert "inner failure" in str(info.value)


@ionet.remote(max_retries=0)
def fail_with_tricky_text():
    raise ValueError("before\n--ionet-exception--\nnot a pickle at all")


def test_exception_text_never_passes_for_its_payload():
    # The pickled exception travels in a bytes field of its own: no text the exception
    # holds can be mistaken for it.
    with pytest.raises(ValueError) as info:
        ionet.get(fail_with_tricky_text.remote(), timeout=60)
    assert "not a pickle at all" in str(info.value) and isinstance(info.value.cause, ValueError)


def test_unpicklable_exception_still_reports_its_traceback():
    with pytest.raises(IonetTaskError) as info:
        ionet.get(fail_unpicklably.remote(), timeout=60)
    assert "cannot travel" in str(info.value) and "Unpicklable" in str(info.value)


def test_failed_ref_as_argument_fails_the_dependent_task():
    @ionet.remote
    def add_one(x):
        return x + 1

    with pytest.raises(ValueError, match="upstream"):
        ionet.get(add_one.remote(fail_with_value_error.remote("upstream")), timeout=60)


def test_the_control_store_refuses_an_export_not_keyed_by_its_hash():
    # A job's exports are written once, under the SHA-256 of their bytes.
    with pytest.raises(Exception, match="SHA-256"):
        ionet._ionet.kv_put("ionet_functions", b"\0" * 32, b"not what the key names", False)


def test_a_definition_that_does_not_hash_to_its_key_is_never_unpickled(monkeypatch):
    # The control store refuses such an entry, so a store that lies is the fault stood in
    # for here: the worker checks the hash again before it unpickles anything.
    import hashlib

    from ionet import _worker_runtime
    from ionet.exceptions import IonetSystemError

    key = hashlib.sha256(b"the pickle the task named").digest()
    monkeypatch.setattr(_worker_runtime, "_definitions", {})
    monkeypatch.setattr(_worker_runtime._ionet, "kv_get", lambda namespace, key: b"some other pickle")
    with pytest.raises(IonetSystemError, match="does not hash to its key"):
        _worker_runtime._load("ionet_functions", key)
