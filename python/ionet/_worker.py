"""Entry of a worker process: `python -m ionet._worker`, started by a node daemon.

The driver passes its `sys.path` in `IONET_PYTHONPATH`, so the worker imports what the
driver can (the modules of its scripts and tests, which functions pickled by reference
name). Then the native worker serves tasks until the daemon stops it. Started as its
job's forkserver (`ionet._forkserver`), it forks the workers instead, each of which
goes on here.
"""

import os
import sys

from ionet import _ionet


def main() -> None:
    # What the worker creates (compiled modules included) is its user's alone; the
    # native side sets it again, with dying with the node daemon.
    os.umask(0o077)
    driver_path = os.environ.get("IONET_PYTHONPATH")
    if driver_path:
        entries = driver_path.split(os.pathsep)
        sys.path[:] = entries + [entry for entry in sys.path if entry not in entries]
    if os.environ.pop("IONET_FORKSERVER", None) == "1":
        # The job's forkserver on this node: returns in each worker it forks.
        from ionet import _forkserver

        _forkserver.serve()
    # What tasks print reaches the output file (followed for the driver) line by line,
    # in order with the native side's lines naming the task.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    _ionet.run_worker()


if __name__ == "__main__":
    main()
