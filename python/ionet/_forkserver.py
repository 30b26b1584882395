"""A job's forkserver on a node: `python -m ionet._worker` started by the node daemon
with `IONET_FORKSERVER=1` and a socket (sequenced packets) for its standard input.

It imports what every worker imports, says it is ready, and then forks a worker per
request of the daemon: each child takes its credential pipe as its standard input, its
output file as its standard output and error, its protocol variables into its
environment, and goes on as a worker (`ionet._worker`). A child starts in milliseconds
instead of an interpreter's start and imports. The daemon's side, and what it checks of
the answers, is `worker/src/lease/forkserver.rs`.

The server holds no credential and starts no thread (a fork copies only the thread that
calls it). It exits when the daemon closes the socket, and dies with the daemon.
"""

import gc
import json
import os
import signal
import socket
import sys
from typing import List, Set

# The longest request the daemon sends (a worker's variables: addresses, the cluster's
# CA certificate, the head's key).
_MAX_REQUEST_BYTES = 1 << 20


def serve() -> None:
    """Serves fork requests; returns in each forked child, its environment set."""
    from ionet import _ionet

    _ionet.settle_forkserver()
    channel = socket.socket(fileno=os.dup(0))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    # What every worker imports, imported once here.
    import ionet  # noqa: F401
    import ionet._worker_runtime  # noqa: F401

    # What is imported stays out of the children's collections: their collector never
    # writes to those objects, so the pages holding them stay shared.
    gc.freeze()
    signal.signal(signal.SIGCHLD, _reap)
    # Ctrl-C in a terminal the driver shares reaches the whole process group: the server
    # is the daemon's to stop (its workers get Python's own handler back).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel.send(json.dumps({"ready": True}).encode())
    while True:
        message, fds, _flags, _address = socket.recv_fds(channel, _MAX_REQUEST_BYTES, 2)
        if not message:
            # The daemon is done with this server.
            os._exit(0)
        try:
            request = json.loads(message)
            if len(fds) != 1 + bool(request.get("output")):
                raise ValueError(f"{len(fds)} descriptors for the request {sorted(request)}")
            pid = _fork(channel, request, fds)
        except Exception as err:  # noqa: BLE001 - the daemon hears every failure
            for fd in fds:
                os.close(fd)
            channel.send(json.dumps({"error": f"{type(err).__name__}: {err}"}).encode())
            continue
        if pid == 0:
            return
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as err:
            _children.add(pid)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            channel.send(json.dumps({"error": f"pidfd_open: {err}"}).encode())
            continue
        try:
            socket.send_fds(channel, [b"{}"], [pidfd])
        finally:
            os.close(pidfd)
            # Reaped only from now on: a child that died at once is reaped after its
            # pidfd is open (a pid reaped before could be another process's by then).
            _children.add(pid)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})


def _fork(channel: socket.socket, request: dict, fds: List[int]) -> int:
    """Forks one worker; 0 in the child (set up as one), the child's pid in the server
    (SIGCHLD blocked until its pidfd is sent)."""
    variables = {str(name): str(value) for name, value in request["vars"]}
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        raise
    if pid != 0:
        for fd in fds:
            os.close(fd)
        return pid
    # The child: a worker now, with nothing of the server's.
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _children.clear()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        channel.close()
        os.dup2(fds[0], 0)
        if len(fds) == 2:
            os.dup2(fds[1], 1)
            os.dup2(fds[1], 2)
        for fd in fds:
            os.close(fd)
        os.environ.update(variables)
    except BaseException as err:
        print(f"ionet forkserver: cannot set up a forked worker: {err}", file=sys.stderr, flush=True)
        os._exit(1)
    return 0


# The children whose pidfd the daemon holds: the only ones reaped (a Python handler may
# run between a fork and its pidfd's opening, when the new child must not be reaped yet).
_children: Set[int] = set()


def _reap(_signum: int, _frame: object) -> None:
    """Collects the exit of every child that ended (the daemon watches them by pidfd)."""
    for pid in list(_children):
        try:
            done, _status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done == pid:
            _children.discard(pid)
