"""What a running task knows of how it was submitted, beyond its arguments.

A call that needs it carries a dict under the hidden keyword `CONTEXT_KEY`; the worker
runtime takes it out before calling the function and keeps it in a thread-local for the
call (`task_scope`). Today it holds the placement group a task runs in, and whether the
tasks it submits are captured into that group (`capture_child_tasks`).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Dict, Iterator, Optional

CONTEXT_KEY = "__ionet_context__"

_local = threading.local()


@contextlib.contextmanager
def task_scope(keywords: Dict[str, Any]) -> Iterator[None]:
    """Sets the running call's context (taken out of `keywords`) for the call."""
    context = keywords.pop(CONTEXT_KEY, None)
    previous = getattr(_local, "context", None)
    _local.context = context
    try:
        yield
    finally:
        _local.context = previous


def current() -> Optional[Dict[str, Any]]:
    """The context of the call running on this thread, if any."""
    return getattr(_local, "context", None)
