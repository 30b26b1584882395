"""The floor under `benches/broadcast.py` on this machine: what the steps every reader
of a broadcast must take cost by themselves, with nothing of ionet or Ray in them.

Eight readers each pulling 1 GiB from one holder over loopback must at least (1) move
8 GiB through loopback TCP (a copy into the kernel and one out, per byte) and (2) write
8 GiB into fresh pages of their stores (/dev/shm: page allocation, zeroing, a copy). A
cluster that does not turn encryption off must also (3) seal and open every byte with
AES-GCM (TLS). Each step is timed here on its own, with `BROADCAST_NODES` (8) processes
at once, as the readers run; their sum is a lower bound on one broadcast round here,
however the runtime is built.

    python3 benches/broadcast_floor.py

Prints each step's wall time and the sum. Needs `openssl` for the AES-GCM rate.
"""

import multiprocessing
import os
import re
import socket
import subprocess
import tempfile
import time

NODES = int(os.environ.get("BROADCAST_NODES", "8"))
SIZE = int(os.environ.get("BROADCAST_BYTES", str(1 << 30)))
CHUNK = 4 << 20


def write_fresh_pages(directory, index, start):
    """One reader's store write: `SIZE` bytes into a new file in tmpfs."""
    chunk = os.urandom(CHUNK)
    path = os.path.join(directory, f"reader-{index}")
    start.wait()
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        for offset in range(0, SIZE, CHUNK):
            os.pwrite(fd, chunk, offset)
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


def timed(processes, start):
    for process in processes:
        process.start()
    start.wait()
    began = time.perf_counter()
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"a step's process failed with exit code {process.exitcode}")
    return time.perf_counter() - began


def fresh_pages():
    with tempfile.TemporaryDirectory(dir="/dev/shm") as directory:
        start = multiprocessing.Barrier(NODES + 1)
        processes = [
            multiprocessing.Process(target=write_fresh_pages, args=(directory, index, start)) for index in range(NODES)
        ]
        return timed(processes, start)


def loopback():
    start = multiprocessing.Barrier(2 * NODES + 1)
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
    """Seconds of one core to seal `NODES * SIZE` bytes and open them again, at
    OpenSSL's AES-256-GCM rate for 16 KiB records (TLS's largest)."""
    out = subprocess.run(
        ["openssl", "speed", "-evp", "aes-256-gcm", "-bytes", "16384", "-seconds", "3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(line for line in out.splitlines() if line.lower().startswith("aes-256-gcm"))
    rate_kb = float(re.findall(r"([0-9.]+)k", line)[-1])
    per_second = rate_kb * 1000
    return 2 * NODES * SIZE / per_second


def main():
    cores = os.cpu_count() or 1
    pages = fresh_pages()
    tcp = loopback()
    aes_core_seconds = aes_gcm_seconds()
    aes = aes_core_seconds / cores
    print(f"{NODES} readers x {SIZE / (1 << 30):.2f} GiB on {cores} cores:")
    print(f"  fresh tmpfs pages written: {pages:.2f} s")
    print(f"  loopback TCP moved:        {tcp:.2f} s")
    print(f"  AES-GCM seal + open:       {aes:.2f} s ({aes_core_seconds:.2f} s of one core, spread over {cores})")
    print(f"  floor of one round:        {pages + tcp + aes:.2f} s")


if __name__ == "__main__":
    main()
