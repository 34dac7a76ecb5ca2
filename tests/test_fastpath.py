"""The C fast path: reads and writes that need no wait are answered by the
server's C thread, everything else by Python, with the same answers.

The counters in ``stats`` (``fast_path``) prove which side answered; the
waits cross sides on purpose (a reader parked in Python woken by writes the
C thread accepted, and so on). Every wait has a deadline; a server that
fails to wake someone is stopped by the fixture, which unblocks the thread.
"""

from __future__ import annotations

import errno
import json
import os
import select
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dmio import (
    RESP,
    XATTR_FUNCTION,
    XATTR_NONBLOCK,
    collect,
    errno_of,
    open_session,
    parse,
    raw_request,
    request,
    submit,
    wait_for,
    whole,
)
from dmoverfs.stats import format_table

DEADLINE_S = 10.0
UNMAPPED = 0x1000


def stats(mnt: Path) -> dict:
    return json.loads((mnt / "stats").read_bytes())


def fast(mnt: Path) -> dict:
    return stats(mnt)["fast_path"]


def zero_requests(first_id: int, bufs: list[np.ndarray]) -> list:
    return [request(first_id + i, out=whole(b)) for i, b in enumerate(bufs)]


class Blocked(threading.Thread):
    """Run *call* in a thread; ``result()`` waits for it up to the deadline."""

    def __init__(self, call) -> None:  # noqa: ANN001
        super().__init__(daemon=True)
        self._call = call
        self.value = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self._call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def result(self):  # noqa: ANN201
        self.join(DEADLINE_S)
        assert not self.is_alive(), "the blocked call was never woken"
        if self.error is not None:
            raise self.error
        return self.value


def test_small_requests_are_answered_in_c(mnt):
    before = fast(mnt)
    assert before["running"] is True
    fd = open_session(mnt, "zero")
    try:
        bufs = [np.full(4096, 0xA5, np.uint8) for _ in range(8)]
        for req in zero_requests(0, bufs):
            assert submit(fd, req) == 40
        responses = collect(fd, 8)
        after = fast(mnt)
    finally:
        os.close(fd)
    assert sorted(r.req_id for r in responses) == list(range(8))
    assert all(r.error == 0 for r in responses)
    assert not any(b.any() for b in bufs)
    assert after["writes"] - before["writes"] >= 8
    assert after["reads"] - before["reads"] >= 1


def test_without_the_fast_path_python_answers_everything(server_factory):
    srv = server_factory("--no-fast-path")
    fd = open_session(srv.mountpoint, "zero")
    try:
        buf = np.ones(4096, np.uint8)
        assert submit(fd, request(1, out=whole(buf))) == 40
        assert collect(fd, 1)[0].error == 0
        data = stats(srv.mountpoint)
    finally:
        os.close(fd)
    assert not buf.any()
    assert data["fast_path"] == {"running": False}
    assert "fast path: off" in format_table(data)
    assert data["limits"]["fast_path"] is False


def transcript(mnt: Path) -> list:
    """What a client sees in the cases where fast path and Python could differ."""
    seen: list = []

    def outcome(call, *args):  # noqa: ANN001, ANN202
        try:
            value = call(*args)
        except OSError as exc:
            return ("errno", errno.errorcode[exc.errno])
        return ("ok", value if isinstance(value, int) else len(value))

    fd = open_session(mnt)
    nb = os.open(mnt / "dmoverio", os.O_RDWR)
    try:
        buf = np.ones(4096, np.uint8)
        seen.append(outcome(submit, fd, request(1, out=whole(buf))))  # no function: ENXIO
        os.setxattr(fd, XATTR_FUNCTION, b"zero")
        seen.append(outcome(os.write, fd, b"\0" * 41))  # not whole requests: EINVAL
        seen.append(outcome(os.read, fd, 17))  # not whole responses: EINVAL
        seen.append(outcome(os.write, fd, raw_request(UNMAPPED, 1, req_id=7)))  # unreadable iovecs: EFAULT
        seen.append(outcome(submit, fd, request(2, out=[(UNMAPPED, 64)])))  # accepted; fails when run
        seen.append(("responses", [(r.req_id, r.error) for r in collect(fd, 1)]))
        seen.append(outcome(submit, fd, request(3, out=None)))  # no output: EINVAL in the response
        seen.append(("responses", [(r.req_id, r.error) for r in collect(fd, 1)]))
        # Non-blocking: EAGAIN when empty, a short count when full, then EAGAIN.
        os.setxattr(nb, XATTR_FUNCTION, b"zero")
        os.setxattr(nb, XATTR_NONBLOCK, b"1")
        seen.append(outcome(os.read, nb, 16))
        bufs = [np.ones(64, np.uint8) for _ in range(70)]
        reqs = zero_requests(100, bufs)
        seen.append(outcome(os.write, nb, b"".join(r.packed for r in reqs)))
        seen.append(outcome(submit, nb, request(999, out=whole(buf))))
        seen.append(outcome(os.read, nb, 16 * 100))
        seen.append(("zeroed", sum(not b.any() for b in bufs)))
    finally:
        os.close(fd)
        os.close(nb)
    return seen


def test_fast_path_and_python_give_the_same_answers(mnt, server_factory):
    slow = server_factory("--no-fast-path").mountpoint
    before = fast(mnt)
    with_fast = transcript(mnt)
    after = fast(mnt)
    assert with_fast == transcript(slow)
    assert with_fast == [
        ("errno", "ENXIO"),
        ("errno", "EINVAL"),
        ("errno", "EINVAL"),
        ("errno", "EFAULT"),
        ("ok", 40),
        ("responses", [(2, errno.EFAULT)]),
        ("ok", 40),
        ("responses", [(3, errno.EINVAL)]),
        ("errno", "EAGAIN"),
        ("ok", 64 * 40),
        ("errno", "EAGAIN"),
        ("ok", 64 * 16),
        ("zeroed", 64),
    ]
    # The C thread answered some of them itself (EAGAIN included).
    assert after["writes"] > before["writes"] and after["errors"] > before["errors"]


def test_reader_waiting_in_python_is_woken_by_writes_answered_in_c(server_factory):
    mnt = server_factory().mountpoint
    fd = open_session(mnt, "zero")
    try:
        reader = Blocked(lambda: parse(os.read(fd, 4 * RESP.size)))
        reader.start()
        assert wait_for(lambda: stats(mnt)["requests"]["read_waits"] >= 1), "the read never waited"
        bufs = [np.ones(256, np.uint8) for _ in range(4)]
        before = fast(mnt)["writes"]
        for req in zero_requests(10, bufs):
            submit(fd, req)
        responses = reader.result()
        assert fast(mnt)["writes"] - before == 4
    finally:
        os.close(fd)
    assert sorted(r.req_id for r in responses) == [10, 11, 12, 13]
    assert not any(b.any() for b in bufs)


def test_writer_waiting_in_python_is_woken_by_reads_answered_in_c(server_factory):
    mnt = server_factory("--queue-depth", "4").mountpoint
    fd = open_session(mnt, "zero")
    try:
        bufs = [np.ones(256, np.uint8) for _ in range(8)]
        reqs = zero_requests(0, bufs)
        assert submit(fd, *reqs[:4]) == 4 * 40
        writer = Blocked(lambda: submit(fd, *reqs[4:]))
        writer.start()
        assert wait_for(lambda: stats(mnt)["requests"]["queue_waits"] >= 1), "the write never waited"
        before = fast(mnt)["reads"]
        first = collect(fd, 4)
        assert writer.result() == 4 * 40
        assert fast(mnt)["reads"] > before
        rest = collect(fd, 4)
    finally:
        os.close(fd)
    assert sorted(r.req_id for r in first + rest) == list(range(8))
    assert not any(b.any() for b in bufs)


@pytest.mark.parametrize("event", ["EPOLLIN", "EPOLLOUT"])
def test_pollers_see_changes_made_in_c(server_factory, event):
    # epoll, not poll: poll(2) asks the server once more when it times out,
    # which would hide a missing notification.
    mnt = server_factory("--queue-depth", "4").mountpoint
    fd = open_session(mnt, "zero")
    ep = select.epoll()
    try:
        bufs = [np.ones(256, np.uint8) for _ in range(4)]
        reqs = zero_requests(0, bufs)
        if event == "EPOLLOUT":
            assert submit(fd, *reqs) == 4 * 40  # full: not writable
        wanted = getattr(select, event)
        ep.register(fd, wanted)
        assert ep.poll(0) == []
        waiting = Blocked(lambda: ep.poll(DEADLINE_S))
        waiting.start()
        if event == "EPOLLIN":
            submit(fd, reqs[0])
        else:
            collect(fd, 4)
        events = waiting.result()
    finally:
        ep.close()
        os.close(fd)
    assert events and events[0][1] & wanted, f"epoll returned {events!r}"


def test_functions_and_nonblock_set_after_open_reach_the_fast_path(mnt):
    fd = open_session(mnt)
    try:
        buf = np.ones(64, np.uint8)
        assert errno_of(submit, fd, request(1, out=whole(buf))) == errno.ENXIO
        before = fast(mnt)
        os.setxattr(fd, XATTR_FUNCTION, b"fill8")
        assert submit(fd, request(1, out=whole(buf), immediate=7)) == 40
        assert collect(fd, 1)[0].error == 0
        os.setxattr(fd, XATTR_NONBLOCK, b"1")
        assert errno_of(os.read, fd, 16) == errno.EAGAIN
        after = fast(mnt)
    finally:
        os.close(fd)
    assert (buf == 7).all()
    assert after["writes"] > before["writes"]
    assert after["errors"] > before["errors"]  # the EAGAIN came from C


def test_functions_a_plugin_offers_stay_in_python(server_factory):
    # tests/backend_pkg/good offers copy: its requests go through the Python scheduler.
    path = [str(Path(__file__).resolve().parent / "backend_pkg" / "good"), os.environ.get("PYTHONPATH", "")]
    mnt = server_factory(env={"PYTHONPATH": os.pathsep.join(p for p in path if p)}).mountpoint
    fd = open_session(mnt, "copy")
    try:
        src = np.arange(4096, dtype=np.uint8)
        dst = np.zeros(4096, np.uint8)
        before = fast(mnt)
        submit(fd, request(1, out=whole(dst), inputs=[whole(src)]))
        response = collect(fd, 1)[0]
        after = fast(mnt)
    finally:
        os.close(fd)
    assert response.error == 0 and (dst == src).all()
    assert after["files"] == 0
    assert (after["writes"], after["reads"]) == (before["writes"], before["reads"])


def test_open_files_leave_the_registry_when_closed(mnt):
    fds = [open_session(mnt, "zero") for _ in range(40)]
    dups = [os.dup(fd) for fd in fds[:10]]
    assert wait_for(lambda: fast(mnt)["files"] >= 40)
    for fd in fds + dups:
        os.close(fd)
    assert wait_for(lambda: fast(mnt)["files"] == 0), fast(mnt)


def test_times_count_reads_and_writes_answered_in_c(mnt):
    fd = open_session(mnt, "zero")
    try:
        opened = os.fstat(fd)
        time.sleep(0.01)
        start = time.time_ns()
        buf = np.ones(64, np.uint8)
        submit(fd, request(1, out=whole(buf)))
        written = os.fstat(fd)
        time.sleep(0.01)
        middle = time.time_ns()
        collect(fd, 1)
        read = os.fstat(fd)
    finally:
        os.close(fd)
    assert written.st_mtime_ns >= start > opened.st_mtime_ns
    assert read.st_atime_ns >= middle > written.st_atime_ns
