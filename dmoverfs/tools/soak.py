"""Soak: open and close many sessions, serve many requests, check the server returns to its baseline.

``python -m dmoverfs.tools.soak --sessions 100000 --requests 1000000`` (or
``scripts/soak``) mounts a private server, measures its resident memory, open
files and threads after a warm-up, runs the load, lets it settle and measures
again. Exits 1 if open files or threads differ from the baseline or memory
grew by more than the tolerance.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dmoverfs import mounting

REQ = struct.Struct("<QI4x8sQI4x")
BATCH = 64


@dataclass(frozen=True)
class Sample:
    """What a server process holds at one moment."""

    rss: int
    fds: int
    threads: int
    sessions: int
    inodes: int


def sample(pid: int, mnt: Path) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
    data = json.loads((mnt / "stats").read_text())
    return Sample(
        rss=rss,
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=len(os.listdir(f"/proc/{pid}/task")),
        sessions=data["sessions"]["open"],
        inodes=data["inodes"],
    )


def settle(mnt: Path, timeout: float = 60.0) -> None:
    """Until no session is open and nothing is outstanding."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = json.loads((mnt / "stats").read_text())
        if data["sessions"]["open"] == 0 and data["requests"]["outstanding"] == 0:
            return
        time.sleep(0.05)
    raise RuntimeError("the server did not settle")


def open_close(mnt: Path, count: int, threads: int = 4) -> None:
    """Open and close *count* sessions from several threads."""
    clone = mnt / "dmoverio"

    def worker(n: int) -> None:
        for _ in range(n):
            os.close(os.open(clone, os.O_RDWR))

    pool = [threading.Thread(target=worker, args=(count // threads + (i < count % threads),)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def serve_requests(mnt: Path, count: int, sessions: int = 8) -> None:
    """*count* 4 KiB zero requests, BATCH per write and per read, over a few sessions."""
    buf = ctypes.create_string_buffer(4096)
    iov = ctypes.create_string_buffer(struct.pack("<QQ", ctypes.addressof(buf), 4096), 16)
    batch = b"".join(REQ.pack(ctypes.addressof(iov), 1, bytes(8), 0, i) for i in range(BATCH))

    def worker(n: int) -> None:
        fd = os.open(mnt / "func" / "zero", os.O_RDWR)
        try:
            for _ in range(n // BATCH):
                if os.write(fd, batch) != len(batch) or len(os.read(fd, 16 * BATCH)) != 16 * BATCH:
                    raise RuntimeError("short transfer")
        finally:
            os.close(fd)

    pool = [threading.Thread(target=worker, args=(count // sessions,)) for _ in range(sessions)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def run(sessions: int, requests: int, tolerance: int = 16 << 20, out=sys.stdout) -> bool:
    """Soak a private server; True if it returned to its baseline."""
    work = Path(tempfile.mkdtemp(prefix="dmoverfs-soak-"))
    mnt = work / "mnt"
    mnt.mkdir()
    proc = mounting.spawn_server(mnt, [], work / "server.log")
    try:
        open_close(mnt, 2000)  # warm-up: allocator pools, task pools
        serve_requests(mnt, 20 * BATCH * 8)
        settle(mnt)
        before = sample(proc.pid, mnt)
        start = time.monotonic()
        open_close(mnt, sessions)
        opened_s = time.monotonic() - start
        start = time.monotonic()
        serve_requests(mnt, requests)
        served_s = time.monotonic() - start
        settle(mnt)
        after = sample(proc.pid, mnt)
    finally:
        proc.terminate()
        proc.wait(30)
        if mounting.is_mounted(mnt):
            mounting.lazy_unmount(mnt)
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{sessions} sessions opened and closed in {opened_s:.1f} s ({sessions / opened_s:.0f}/s); "
        f"{requests} requests served in {served_s:.1f} s ({requests / served_s:.0f}/s)",
        file=out,
    )
    print(f"{'':<12}{'baseline':>14}{'after':>14}", file=out)
    for name in ("rss", "fds", "threads", "sessions", "inodes"):
        print(f"{name:<12}{getattr(before, name):>14}{getattr(after, name):>14}", file=out)
    ok = (
        after.fds == before.fds
        and after.threads == before.threads
        and after.sessions == 0
        and after.inodes <= before.inodes + 4
        and after.rss - before.rss <= tolerance
    )
    print("back to baseline" if ok else "NOT back to baseline", file=out)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dmoverfs-soak", description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--tolerance-mib", type=int, default=16, help="memory growth allowed")
    args = parser.parse_args(argv)
    return 0 if run(args.sessions, args.requests, args.tolerance_mib << 20) else 1


if __name__ == "__main__":
    sys.exit(main())
