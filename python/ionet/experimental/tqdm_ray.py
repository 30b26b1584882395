"""Progress bars from many tasks and actors in one terminal, as Ray's
`ray.experimental.tqdm_ray`: `tqdm(iterable, desc=..., total=...)` inside a task counts
its work, and the driver draws every live bar together (one line each, redrawn in place
on a terminal, a line per bar when it ends otherwise).

Bars in workers send their state, at most every `flush_interval_s`, to an actor the
driver starts when it imports this module (`num_cpus=0`, named for the job), which the
driver reads a few times a second. A driver's own bars draw directly.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from typing import Any, Dict, Iterable, Iterator, List, Optional

import ionet
from ionet import _ionet

_MANAGER_NAME = "__ionet_tqdm_ray__"


def _manager_namespace() -> str:
    """The bars' actor lives in a namespace of its job's own, found from every worker."""
    return "_ionet_tqdm_ray_" + _ionet.runtime_context()["job_id"]
_POLL_SECONDS = 0.2
_BAR_WIDTH = 20


class tqdm:  # noqa: N801 (Ray's and tqdm's name)
    """A progress bar: iterate over it, or call `update(n)`; `close()` when done (a
    `with` block or a finished iteration closes it)."""

    def __init__(
        self,
        iterable: Optional[Iterable] = None,
        desc: Optional[str] = None,
        total: Optional[int] = None,
        unit: Optional[str] = None,
        position: Optional[int] = None,
        flush_interval_s: float = 1.0,
    ):
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except (TypeError, AttributeError):
                total = None
        self._iterable = iterable
        self._desc = desc or ""
        self._x = 0
        self._total = total
        self._unit = unit or "it"
        self._position = position
        self._flush_interval_s = flush_interval_s
        self._uuid = uuid.uuid4().hex
        self._started = time.time()
        self._closed = False
        self._last_flush = 0.0
        self._flush(force=True)

    def set_description(self, desc: str) -> None:
        self._desc = desc
        self._flush(force=False)

    def update(self, n: int = 1) -> None:
        self._x += n
        self._flush(force=False)

    def refresh(self) -> None:
        self._flush(force=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._flush(force=True)

    @property
    def n(self) -> int:
        return self._x

    @property
    def total(self) -> Optional[int]:
        return self._total

    def __iter__(self) -> Iterator[Any]:
        if self._iterable is None:
            raise TypeError("this tqdm has no iterable: call update() instead")
        for item in self._iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "tqdm":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _state(self) -> Dict[str, Any]:
        return {
            "uuid": self._uuid,
            "desc": self._desc,
            "x": self._x,
            "total": self._total,
            "unit": self._unit,
            "position": self._position,
            "started": self._started,
            "closed": self._closed,
            "pid": os.getpid(),
        }

    def _flush(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_flush < self._flush_interval_s:
            return
        self._last_flush = now
        if _in_worker():
            _send(self._state())
        else:
            _renderer().update(self._state())


def safe_print(*args: Any, **kwargs: Any) -> None:
    """`print` that does not tear the driver's bars (in a worker: `print`, flushed)."""
    if _in_worker():
        print(*args, **kwargs, flush=True)
        return
    _renderer().print_between(*args, **kwargs)


def _in_worker() -> bool:
    return _ionet.is_initialized() and bool(_ionet.runtime_context().get("is_worker"))


# In a worker: the manager's handle, found once (None: no driver draws bars).
_manager_handle: Any = None
_manager_missing_warned = False


def _send(state: Dict[str, Any]) -> None:
    global _manager_handle, _manager_missing_warned
    if _manager_handle is None:
        try:
            _manager_handle = ionet.get_actor(_MANAGER_NAME, namespace=_manager_namespace())
        except ValueError:
            if not _manager_missing_warned:
                _manager_missing_warned = True
                print(
                    "ionet.experimental.tqdm_ray: the driver draws no bars (it did not import "
                    "ionet.experimental.tqdm_ray); progress is not shown",
                    file=sys.stderr,
                    flush=True,
                )
            return
    _manager_handle.update.remote(state)


@ionet.remote(num_cpus=0)
class _BarManager:
    """Holds the bars' latest states until the driver takes them."""

    def __init__(self) -> None:
        self.changed: Dict[str, Dict[str, Any]] = {}

    def update(self, state: Dict[str, Any]) -> None:
        self.changed[state["uuid"]] = state

    def take(self) -> List[Dict[str, Any]]:
        changed, self.changed = list(self.changed.values()), {}
        return changed


def _describe(state: Dict[str, Any]) -> str:
    x, total, unit = state["x"], state["total"], state["unit"]
    elapsed = max(time.time() - state["started"], 1e-9)
    rate = f"{x / elapsed:.1f}{unit}/s"
    clock = time.strftime("%M:%S", time.gmtime(elapsed))
    desc = f"{state['desc']}: " if state["desc"] else ""
    if total:
        done = min(x / total, 1.0)
        filled = int(done * _BAR_WIDTH)
        bar = "█" * filled + " " * (_BAR_WIDTH - filled)
        line = f"{desc}{done * 100:3.0f}%|{bar}| {x}/{total} [{clock}, {rate}]"
    else:
        line = f"{desc}{x}{unit} [{clock}, {rate}]"
    return f"{line} (pid={state['pid']})"


class _Renderer:
    """The driver's drawing of every bar: on a terminal the live bars redraw in place
    under the program's output; otherwise a line per bar as it ends."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.bars: Dict[str, Dict[str, Any]] = {}
        self.drawn_lines = 0
        self.manager: Any = None
        self.thread: Optional[threading.Thread] = None

    def start(self) -> None:
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="ionet-tqdm-ray", daemon=True)
                self.thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(_POLL_SECONDS)
            try:
                self._poll()
            except Exception:  # noqa: BLE001 (a cluster shutting down; try again later)
                self.manager = None

    def ensure_manager(self) -> None:
        """Starts the actor the workers' bars report to (at most one per job)."""
        with self.lock:
            if self.manager is None:
                self.manager = _BarManager.options(
                    name=_MANAGER_NAME, namespace=_manager_namespace(), get_if_exists=True
                ).remote()

    def _poll(self) -> None:
        if not _ionet.is_initialized():
            self.manager = None
            return
        if self.manager is None:
            return  # made by `init` (or at import, after it)
        for state in ionet.get(self.manager.take.remote(), timeout=30):
            self.update(state)

    def update(self, state: Dict[str, Any]) -> None:
        with self.lock:
            self.bars[state["uuid"]] = state
            self._draw()

    def print_between(self, *args: Any, **kwargs: Any) -> None:
        with self.lock:
            self._clear()
            print(*args, **kwargs)
            self._draw()

    def _stream(self):
        return sys.stderr

    def _clear(self) -> None:
        stream = self._stream()
        if self.drawn_lines and _is_terminal(stream):
            stream.write(f"\x1b[{self.drawn_lines}F\x1b[J")
            self.drawn_lines = 0

    def _draw(self) -> None:
        stream = self._stream()
        ordered = sorted(self.bars.values(), key=lambda s: (s["position"] is None, s["position"] or 0, s["started"]))
        if _is_terminal(stream):
            # Ended bars go above the live ones, drawn once more in their final state, and
            # scroll away with the program's output; the live ones redraw in place.
            self._clear()
            ended = [state for state in ordered if state["closed"]]
            live = [state for state in ordered if not state["closed"]]
            stream.write("".join(_describe(state) + "\n" for state in ended + live))
            self.drawn_lines = len(live)
            for state in ended:
                del self.bars[state["uuid"]]
        else:
            for state in ordered:
                if state["closed"]:
                    stream.write(_describe(state) + "\n")
                    del self.bars[state["uuid"]]
        stream.flush()


def _is_terminal(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


_the_renderer: Optional[_Renderer] = None
_renderer_lock = threading.Lock()


def _renderer() -> _Renderer:
    global _the_renderer
    with _renderer_lock:
        if _the_renderer is None:
            _the_renderer = _Renderer()
        return _the_renderer


def instance() -> _Renderer:
    """The driver's bar renderer (Ray's name), started on first use."""
    renderer = _renderer()
    renderer.start()
    return renderer


def _after_init() -> None:
    # Before `init` returns, so that no task's bar reports before the actor exists.
    instance().ensure_manager()


# A driver that imports this module draws its tasks' bars (a worker imports it to run
# them, and draws nothing).
if not _in_worker():
    from ionet import _core

    if _after_init not in _core._after_init:
        _core._after_init.append(_after_init)
    if _ionet.is_initialized():
        _after_init()
    else:
        instance()
