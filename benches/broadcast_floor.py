"""The floor under `benches/broadcast.py` on this machine: what the steps every reader
of a broadcast must take cost by themselves, with nothing of ionet or Ray in it.

Eight readers each pulling 1 GiB from one holder over loopback must at least (1) fill
8 GiB of fresh pages in their stores (/dev/shm: page allocation and zeroing, timed here
by `posix_fallocate`, with no copy), (2) move 8 GiB through loopback TCP (a copy into
the kernel and one out of it, which a store receiving straight into its pages makes its
only copy in), and (3), on a cluster that does not turn encryption off, open every byte
they read with AES-GCM, while the holder seals the object at least once: 9 GiB of
AES-256-GCM at OpenSSL's rate for 16 KiB records (TLS's largest), over the cores. Each
step is timed on its own, with `BROADCAST_NODES` (8) processes at once, as the readers
run, `BROADCAST_ROUNDS` (3) times; the fastest of each summed is a lower bound on one
broadcast round here, however the runtime is built.

    python3 benches/broadcast_floor.py

Prints each step's times, and the floor. Needs `openssl` for the AES-GCM rate.
"""

import multiprocessing
import os
import re
import socket
import subprocess
import tempfile
import threading
import time

NODES = int(os.environ.get("BROADCAST_NODES", "8"))
SIZE = int(os.environ.get("BROADCAST_BYTES", str(1 << 30)))
ROUNDS = int(os.environ.get("BROADCAST_ROUNDS", "3"))
CHUNK = 4 << 20
# A step whose process died before the start would leave the others waiting.
BARRIER_TIMEOUT_S = 120


def fill_fresh_pages(directory, index, start):
    """One reader's store: `SIZE` bytes of new pages in a new tmpfs file."""
    path = os.path.join(directory, f"reader-{index}")
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        start.wait()
        os.posix_fallocate(fd, 0, SIZE)
        start.wait()
    finally:
        os.close(fd)
        os.unlink(path)


def send_over_loopback(port, start):
    """One holder's side of one reader's pull: `SIZE` bytes sent."""
    chunk = os.urandom(CHUNK)
    with socket.create_connection(("127.0.0.1", port)) as connection:
        start.wait()
        for _ in range(SIZE // CHUNK):
            connection.sendall(chunk)


def receive_over_loopback(listener, start):
    """One reader's side: `SIZE` bytes received into one buffer, reused."""
    connection, _ = listener.accept()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    left = SIZE
    start.wait()
    with connection:
        while left:
            got = connection.recv_into(view, min(CHUNK, left))
            if not got:
                raise RuntimeError("the sender closed early")
            left -= got


def timed(processes, start, end=None):
    """Wall time from when every process is ready until all are done (or, with `end`,
    until all have passed it: what they do after is not timed)."""
    for process in processes:
        process.start()
    try:
        start.wait()
        began = time.perf_counter()
        if end is not None:
            end.wait()
        took = time.perf_counter() - began
    except threading.BrokenBarrierError:
        raise RuntimeError("a step's process did not start, or did not finish in time") from None
    finally:
        for process in processes:
            process.join()
    failed = [process.exitcode for process in processes if process.exitcode != 0]
    if failed:
        raise RuntimeError(f"a step's process failed with exit code {failed[0]}")
    return took if end is not None else time.perf_counter() - began


def fresh_pages():
    with tempfile.TemporaryDirectory(dir="/dev/shm") as directory:
        # Each process waits twice on the one barrier: at the start, and once its pages
        # are filled (freeing them after is not timed).
        start = multiprocessing.Barrier(NODES + 1, timeout=BARRIER_TIMEOUT_S)
        processes = [
            multiprocessing.Process(target=fill_fresh_pages, args=(directory, index, start)) for index in range(NODES)
        ]
        return timed(processes, start, end=start)


def loopback():
    start = multiprocessing.Barrier(2 * NODES + 1, timeout=BARRIER_TIMEOUT_S)
    processes = []
    listeners = []
    for _ in range(NODES):
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)
        port = listener.getsockname()[1]
        processes.append(multiprocessing.Process(target=receive_over_loopback, args=(listener, start)))
        processes.append(multiprocessing.Process(target=send_over_loopback, args=(port, start)))
    try:
        return timed(processes, start)
    finally:
        for listener in listeners:
            listener.close()


def aes_gcm_seconds():
    """Seconds of one core for the least encryption a secure broadcast takes: the object
    sealed once (1 x `SIZE`) and opened by every reader (`NODES` x `SIZE`), at
    OpenSSL's AES-256-GCM rate for 16 KiB records."""
    out = subprocess.run(
        ["openssl", "speed", "-evp", "aes-256-gcm", "-bytes", "16384", "-seconds", "3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(line for line in out.splitlines() if line.lower().startswith("aes-256-gcm"))
    rate_kb = float(re.findall(r"([0-9.]+)k", line)[-1])
    per_second = rate_kb * 1000
    return (1 + NODES) * SIZE / per_second


def main():
    if SIZE % CHUNK:
        raise SystemExit(f"BROADCAST_BYTES must be a multiple of {CHUNK} bytes")
    cores = os.cpu_count() or 1
    pages = [fresh_pages() for _ in range(ROUNDS)]
    tcp = [loopback() for _ in range(ROUNDS)]
    aes_core_seconds = aes_gcm_seconds()
    aes = aes_core_seconds / cores
    shown = lambda times: ", ".join(f"{took:.2f}" for took in times)
    print(f"{NODES} readers x {SIZE / (1 << 30):.2f} GiB on {cores} cores, {ROUNDS} rounds:")
    print(f"  fresh tmpfs pages filled: {shown(pages)} s")
    print(f"  loopback TCP moved:       {shown(tcp)} s")
    print(f"  AES-GCM sealed once, opened by each: {aes:.2f} s ({aes_core_seconds:.2f} s of one core over {cores})")
    print(f"  floor of one round (the fastest of each): {min(pages) + min(tcp) + aes:.2f} s")


if __name__ == "__main__":
    main()
