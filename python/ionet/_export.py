"""Remote functions and actor classes, exported once to the control store's KV.

A definition is pickled (as values are, by `_serialization.dumps`) and stored under the
SHA-256 of its pickle, in the KV namespace `FUNCTIONS` or `CLASSES` (the job's own: the
control store keeps each job's exports apart, written once, and refuses a key that is not
the hash of its bytes; a worker checks the hash again before unpickling); tasks and actors
name it by that key, and a worker loads it from the KV on first use
(`ionet._worker_runtime`). The pickle and key are made once per definition, on its first
call (as Ray does, so that globals defined after the decorator are captured). Each
process then puts it once per cluster it joins: the set of keys already put is
forgotten when the process joins or leaves a cluster.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any, Optional, Set, Tuple

from ionet import _ionet
from ionet._serialization import dumps
from ionet.exceptions import SerializationError

FUNCTIONS = "ionet_functions"
CLASSES = "ionet_classes"

# (KV namespace, key) of the definitions put into the current cluster's KV by this process.
_exported: Set[Tuple[str, bytes]] = set()
_lock = threading.Lock()


def forget_exports() -> None:
    """Called on joining or leaving a cluster: its KV holds none of our definitions yet."""
    with _lock:
        _exported.clear()


class ExportedDefinition:
    """A function or class that tasks or actors run, and its key in the KV."""

    def __init__(self, definition: Any, namespace: str):
        self.definition = definition
        self._namespace = namespace
        self._key: Optional[bytes] = None
        self._payload: Optional[bytes] = None

    def key(self) -> bytes:
        """The definition's key, exporting it to the current cluster first if needed."""
        key = self._key
        if key is not None and (self._namespace, key) in _exported:
            return key
        with _lock:
            if self._key is None:
                self._payload = self._pickle()
                self._key = hashlib.sha256(self._payload).digest()
            entry = (self._namespace, self._key)
            if entry not in _exported:
                _ionet.kv_put(self._namespace, self._key, self._payload, False)
                _exported.add(entry)
            return self._key

    def _pickle(self) -> bytes:
        try:
            return dumps(self.definition)
        except Exception as exc:
            name = getattr(self.definition, "__qualname__", repr(self.definition))
            raise SerializationError(f"cannot serialize remote definition {name!r}: {exc}") from exc
