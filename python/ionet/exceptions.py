"""Errors raised by ionet, with Ray's names as aliases (`RayError`, `RayTaskError`, ...).

The native module raises every error through `_native_error(kind, message, payload)`,
which maps its error kinds to these classes.

A task (or actor method) that raises is reported as the exception it raised: the worker
sends a readable summary with the remote traceback as the failure's text, and the
exception pickled as its payload, a bytes field of its own that no text can pass for.
The caller rebuilds the exception and raises an instance of a class derived from both `IonetTaskError` and
the exception's own class, so `except ValueError:` catches a remote `ValueError`, and
`str()` shows the remote traceback.
"""

from __future__ import annotations

import os
import socket
import traceback
import weakref
from types import TracebackType
from typing import Optional, Tuple

import cloudpickle

class IonetError(Exception):
    """Base class of every error ionet raises."""


class IonetTaskError(IonetError):
    """A task or actor method raised an exception.

    Raised as an instance of a class derived from both this class and the class of the
    remote exception (`cause`). `traceback_str` (also `str()`) is the remote traceback.
    `cause` is None when the remote exception could not be rebuilt in this process; the
    error is then a plain `IonetTaskError`.
    """

    def __init__(self, traceback_str: str, cause: Optional[BaseException] = None):
        super().__init__(traceback_str)
        self.traceback_str = traceback_str
        self.cause = cause

    def __str__(self) -> str:
        return self.traceback_str

    def __reduce__(self):
        # The derived classes are made at run time and cannot be found by name, so an
        # error travelling to another process is rebuilt from its parts.
        return (_task_error, (self.traceback_str, self.cause))


class IonetActorError(IonetError):
    """An actor could not run a method call."""


class ActorDiedError(IonetActorError):
    """The actor died (killed, crashed past its restarts, or its constructor failed)."""


class GetTimeoutError(IonetError, TimeoutError):
    """`get` (or another wait) ran out of time before the objects were ready."""


class ObjectLostError(IonetError):
    """Every copy of an object was lost (its node died) and it cannot be rebuilt."""


class WorkerCrashedError(IonetError):
    """The worker process running a task died, and the task had no retries left."""


class TaskCancelledError(IonetError):
    """The task was cancelled with `ionet.cancel`."""


class TaskUnschedulableError(IonetError):
    """No node of the cluster can ever provide the resources the task asks for."""


class ObjectStoreFullError(IonetError):
    """The object store has no room for the object, even after spilling."""


class SerializationError(IonetError, TypeError):
    """A value could not be pickled to be stored or sent."""


class InvalidArgumentError(IonetError, ValueError):
    """The cluster refused an argument (an option or a value out of range)."""


class NotFoundError(IonetError, ValueError):
    """No such actor, placement group or object (e.g. `get_actor` of an unknown name)."""


class AlreadyExistsError(IonetError, ValueError):
    """The name is taken (e.g. a second live actor with the same name and namespace)."""


class AuthenticationError(IonetError):
    """The cluster refused this process's credential: missing, malformed, expired, or not
    signed by its head."""


class PermissionDeniedError(IonetError):
    """The cluster knows the caller, and the caller may not do this (another job's
    object or actor, another node's record, the operator's calls)."""


class IonetSystemError(IonetError):
    """An error inside ionet itself, or one that fits no other class."""


class UnavailableError(IonetSystemError, ConnectionError):
    """The cluster, or the node holding what was asked for, could not be reached."""


class OwnerDiedError(ObjectLostError):
    """The process that owned the object (created it) died, so it cannot be read."""


class ObjectFetchTimedOutError(ObjectLostError):
    """The object's copies could not be fetched in time."""


class NodeDiedError(IonetError):
    """The node running the task or actor died."""


class ActorUnavailableError(IonetActorError):
    """The actor cannot be reached now (restarting, or its node unreachable); a later
    call may succeed."""


class OutOfMemoryError(IonetError):
    """The task's worker was killed because its node ran out of memory."""


class PendingCallsLimitExceeded(IonetError):
    """The actor has too many calls queued (its `max_pending_calls`)."""


class RuntimeEnvSetupError(IonetError):
    """The task's or actor's runtime environment could not be set up."""


# Ray's names.
RayError = IonetError
RayTaskError = IonetTaskError
RayActorError = IonetActorError
RaySystemError = IonetSystemError

_ERRORS_BY_KIND = {
    "worker_crashed": WorkerCrashedError,
    "actor_died": ActorDiedError,
    "timeout": GetTimeoutError,
    "object_lost": ObjectLostError,
    "owner_died": OwnerDiedError,
    "infeasible": TaskUnschedulableError,
    "cancelled": TaskCancelledError,
    "object_store_full": ObjectStoreFullError,
    "invalid_argument": InvalidArgumentError,
    "not_found": NotFoundError,
    "already_exists": AlreadyExistsError,
    "unauthenticated": AuthenticationError,
    "permission_denied": PermissionDeniedError,
    "unavailable": UnavailableError,
    "other": IonetSystemError,
}


def _native_error(kind: str, message: str, payload: bytes = b"") -> BaseException:
    """The exception the native module raises for an error of `kind` (its contract);
    a task failure's `payload` is its pickled exception (empty: a Rust task's)."""
    if kind == "task_failed":
        return _decode_task_failure(message, payload)
    error_class = _ERRORS_BY_KIND.get(kind)
    if error_class is None:
        return IonetSystemError(f"{kind}: {message}")
    return error_class(message)


# --- task failures: written by the worker, read by the caller ---------------------------


def describe_failure(exc: BaseException, tb: Optional[TracebackType], what: str) -> str:
    """A readable account of `exc` raised by `what` in this process, with traceback `tb`."""
    lines = traceback.format_exception(type(exc), exc, tb)
    return f"{what} failed (pid={os.getpid()}, host={socket.gethostname()})\n{''.join(lines).rstrip()}"


def encode_task_failure(exc: BaseException, tb: Optional[TracebackType], what: str) -> Tuple[str, bytes]:
    """What a worker returns for `exc`: its description, and `exc` pickled."""
    try:
        payload = cloudpickle.dumps(exc)
    except Exception:
        payload = cloudpickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
    return describe_failure(exc, tb, what), payload


def _decode_task_failure(summary: str, payload: bytes) -> IonetTaskError:
    cause = None
    if payload:
        try:
            cause = cloudpickle.loads(payload)
        except Exception as exc:
            # E.g. the exception's class lives in a module this process cannot import.
            summary += f"\n(the remote exception could not be rebuilt here: {exc!r})"
    return _task_error(summary, cause)


# Derived error class for each remote exception class seen, made once.
_task_error_classes: "weakref.WeakKeyDictionary[type, type]" = weakref.WeakKeyDictionary()


def _task_error(traceback_str: str, cause: Optional[BaseException]) -> IonetTaskError:
    """An error that is both an `IonetTaskError` and an instance of `cause`'s class."""
    if isinstance(cause, IonetTaskError):
        # A task that let a failed task's error escape: `traceback_str` already shows the
        # inner traceback, and the inner cause is what the user may catch.
        cause = cause.cause
    if cause is None:
        return IonetTaskError(traceback_str)
    cause_class = type(cause)
    try:
        error_class = _task_error_classes.get(cause_class)
        if error_class is None:
            # Built as the cause was unpickled: its class's __init__ with its args.
            error_class = type(
                f"IonetTaskError({cause_class.__name__})",
                (IonetTaskError, cause_class),
                {"__module__": __name__, "__init__": cause_class.__init__},
            )
            _task_error_classes[cause_class] = error_class
        error = error_class(*cause.args)
        error.__dict__.update(cause.__dict__)
    except Exception:
        # A class that cannot be derived from or built this way: keep the cause beside.
        return IonetTaskError(traceback_str, cause)
    error.args = cause.args
    error.traceback_str = traceback_str
    error.cause = cause
    return error
