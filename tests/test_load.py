"""Load and bounds: many sessions, many blocked clients, global caps, hostile requests."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dmio import collect, errno_of, open_session, parse, request, run, stats, submit, whole

SERVED_WITHIN_S = 1.0


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def many_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_thousand_sessions_with_300_blocked_readers_still_serve_others(server_factory, many_files):
    server = server_factory()
    mnt = server.mountpoint
    fds = [open_session(mnt, "zero") for _ in range(1000)]
    readers: list[threading.Thread] = []
    results: list[bytes] = []
    try:
        for fd in fds[:300]:
            reader = threading.Thread(target=lambda fd=fd: results.append(os.read(fd, 16)))
            reader.start()
            readers.append(reader)
        deadline = time.monotonic() + 30
        while stats(mnt)["requests"]["queue_waits"] + stats(mnt)["requests"]["read_waits"] < 300:
            assert time.monotonic() < deadline, "the readers never blocked"
            time.sleep(0.05)
        other = fds[-1]
        buf = np.ones(4096, np.uint8)
        start = time.monotonic()
        assert run(other, request(1, out=whole(buf)))[1].error == 0
        assert time.monotonic() - start < SERVED_WITHIN_S
        assert not buf.any()
        assert stats(mnt)["sessions"]["open"] == 1000
        # Release the readers: one request each.
        keep = [np.ones(8, np.uint8) for _ in range(300)]
        for i, fd in enumerate(fds[:300]):
            submit(fd, request(i, out=whole(keep[i])))
        for reader in readers:
            reader.join(30)
        assert len(results) == 300
    finally:
        for fd in fds:
            os.close(fd)


def test_session_cap_is_enfile(server_factory):
    server = server_factory("--max-sessions", "5")
    fds = [open_session(server.mountpoint) for _ in range(5)]
    try:
        assert errno_of(open_session, server.mountpoint) == errno.ENFILE
        os.close(fds.pop())
        fds.append(open_session(server.mountpoint))  # room again
    finally:
        for fd in fds:
            os.close(fd)


def test_outstanding_request_cap_is_eagain_over_all_sessions(server_factory):
    server = server_factory("--max-requests", "3")
    a, b = open_session(server.mountpoint, "zero"), open_session(server.mountpoint, "zero")
    bufs = [np.ones(8, np.uint8) for _ in range(5)]
    try:
        assert submit(a, request(0, out=whole(bufs[0])), request(1, out=whole(bufs[1]))) == 80
        # One more fits in the whole server, not two: a short write, then EAGAIN.
        assert submit(b, request(2, out=whole(bufs[2])), request(3, out=whole(bufs[3]))) == 40
        assert errno_of(os.write, b, request(4, out=whole(bufs[4])).packed) == errno.EAGAIN
        assert stats(server.mountpoint)["requests"]["refused_by_limits"] >= 2
        collect(a, 2)
        assert submit(b, request(4, out=whole(bufs[4]))) == 40  # reading back freed room
    finally:
        os.close(a)
        os.close(b)


def test_metadata_cap_bounds_memory_under_hostile_requests(server_factory):
    """Sessions flood the server with IOV_MAX-segment xor16 requests; memory stays bounded."""
    cap = 4 << 20
    server = server_factory("--max-meta-bytes", str(cap), "--workers", "1")
    mnt = server.mountpoint
    seg = 16 << 10
    src = np.ones(1024 * seg, np.uint8)  # every input reads the same source: only the output must not overlap
    out = np.zeros(1024 * seg, np.uint8)
    in_segs = [(src.ctypes.data + i * seg, seg) for i in range(1024)]
    out_segs = [(out.ctypes.data + i * seg, seg) for i in range(1024)]
    baseline = rss_bytes(server.pid)
    fds = [open_session(mnt, "xor16", os.O_RDWR | os.O_NONBLOCK) for _ in range(16)]
    accepted = dict.fromkeys(fds, 0)
    refused = peak_meta = 0
    try:
        reqs = [request(i, out=out_segs, inputs=[in_segs] * 16) for i in range(64)]
        for fd in fds:
            for r in reqs:
                try:
                    accepted[fd] += submit(fd, r) // 40
                except BlockingIOError:
                    refused += 1
            peak_meta = max(peak_meta, stats(mnt)["requests"]["metadata_bytes"])
        assert refused > 0 and sum(accepted.values()) > 0
        assert peak_meta <= cap
        assert rss_bytes(server.pid) - baseline < 64 << 20
        for fd, n in accepted.items():
            os.set_blocking(fd, True)  # the kernel passes the file's flags with every read
            responses = collect(fd, n)
            assert all(r.error == 0 for r in responses)
    finally:
        for fd in fds:
            os.close(fd)
    after = stats(mnt)
    assert after["requests"]["metadata_bytes"] == 0 and after["requests"]["outstanding"] == 0
    assert after["requests"]["refused_by_limits"] == refused


def test_buffer_unmapped_while_queued_fails_only_that_request(mnt):
    """A worker finds the client's buffer gone: EFAULT for that request, the others succeed."""
    size = 256 << 20
    src, dst = np.ones(size, np.uint8), np.zeros(size, np.uint8)
    busy = open_session(mnt, "copy")
    victim = open_session(mnt, "copy")
    region = mmap.mmap(-1, 64 << 20)
    region_addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    small_src = np.ones(64 << 20, np.uint8)
    try:
        # Keep both workers busy, then queue the victim's request behind them.
        submit(busy, *[request(i, out=whole(dst), inputs=[whole(src)]) for i in range(4)])
        submit(victim, request(99, out=[(region_addr, 64 << 20)], inputs=[whole(small_src)]))
        region.close()  # unmapped while the request waits for a worker
        assert parse(os.read(victim, 16))[0].error == errno.EFAULT
        assert all(r.error == 0 for r in collect(busy, 4))
    finally:
        os.close(busy)
        os.close(victim)
