"""poll, select and epoll; blocking and non-blocking reads and writes; the queue depth."""

from __future__ import annotations

import errno
import os
import select
import threading

import numpy as np
import pytest

from dmio import collect, errno_of, open_session, parse, request, submit, whole

BIG = 256 << 20  # large enough to run on a worker, not inline
WAIT_S = 10.0


@pytest.fixture(scope="module")
def big_buffers():
    return np.ones(BIG, np.uint8), np.zeros(BIG, np.uint8)


def big_copy(req_id: int, bufs) -> object:
    src, dst = bufs
    return request(req_id, out=whole(dst), inputs=[whole(src)])


def revents(fd: int, events: int, timeout_ms: int = 0) -> int:
    poller = select.poll()
    poller.register(fd, events)
    result = poller.poll(timeout_ms)
    return result[0][1] if result else 0


def test_idle_session_is_writable_not_readable(mnt):
    fd = open_session(mnt, "zero")
    try:
        assert revents(fd, select.POLLIN) == 0
        assert revents(fd, select.POLLOUT) & select.POLLOUT
    finally:
        os.close(fd)


def test_poll_wakes_when_a_worker_completes(mnt, big_buffers):
    fd = open_session(mnt, "copy")
    try:
        submit(fd, big_copy(1, big_buffers))
        # Blocks in the kernel until the server's poll notification arrives.
        assert revents(fd, select.POLLIN, int(WAIT_S * 1000)) & select.POLLIN
        assert [r.req_id for r in collect(fd, 1)] == [1]
        assert revents(fd, select.POLLIN) == 0
    finally:
        os.close(fd)


def test_select_wakes_when_a_worker_completes(mnt, big_buffers):
    fd = open_session(mnt, "copy")
    try:
        assert select.select([fd], [], [], 0)[0] == []
        submit(fd, big_copy(2, big_buffers))
        readable, writable, _ = select.select([fd], [fd], [], WAIT_S)
        assert writable == [fd]
        readable, _, _ = select.select([fd], [], [], WAIT_S)
        assert readable == [fd]
        assert [r.req_id for r in collect(fd, 1)] == [2]
    finally:
        os.close(fd)


@pytest.mark.parametrize("edge", [False, True], ids=["level", "edge"])
def test_epoll_wakes_when_a_worker_completes(mnt, big_buffers, edge):
    fd = open_session(mnt, "copy")
    ep = select.epoll()
    try:
        ep.register(fd, select.EPOLLIN | (select.EPOLLET if edge else 0))
        assert ep.poll(0) == []
        submit(fd, big_copy(3, big_buffers))
        events = ep.poll(WAIT_S)
        assert events and events[0][0] == fd and events[0][1] & select.EPOLLIN
        assert [r.req_id for r in collect(fd, 1)] == [3]
        assert ep.poll(0) == []
    finally:
        ep.close()
        os.close(fd)


def test_poll_in_another_thread_is_woken(mnt, big_buffers):
    fd = open_session(mnt, "copy")
    seen: list[int] = []
    try:
        waiter = threading.Thread(target=lambda: seen.append(revents(fd, select.POLLIN, int(WAIT_S * 1000))))
        waiter.start()
        submit(fd, big_copy(4, big_buffers))
        waiter.join()
        assert seen and seen[0] & select.POLLIN
        collect(fd, 1)
    finally:
        os.close(fd)


def test_blocking_read_waits_until_its_buffer_is_full(mnt):
    fd = open_session(mnt, "zero")
    got: list[bytes] = []
    bufs = [np.ones(8, np.uint8) for _ in range(3)]
    try:
        submit(fd, request(1, out=whole(bufs[0])))
        reader = threading.Thread(target=lambda: got.append(os.read(fd, 16 * 3)))
        reader.start()
        reader.join(0.3)
        assert reader.is_alive(), "a blocking read returned before its buffer was full"
        submit(fd, request(2, out=whole(bufs[1])), request(3, out=whole(bufs[2])))
        reader.join(WAIT_S)
        assert not reader.is_alive()
        assert sorted(r.req_id for r in parse(got[0])) == [1, 2, 3]
    finally:
        os.close(fd)


def test_queue_depth_limits_outstanding_requests(server_factory):
    server = server_factory("--queue-depth", "4")
    fd = open_session(server.mountpoint, "zero", os.O_RDWR | os.O_NONBLOCK)
    bufs = [np.ones(8, np.uint8) for _ in range(6)]
    reqs = [request(i, out=whole(b)) for i, b in enumerate(bufs)]
    try:
        # Non-blocking: the write stops at the depth (short), then EAGAIN.
        assert os.write(fd, b"".join(r.packed for r in reqs)) == 4 * 40
        assert errno_of(os.write, fd, reqs[4].packed) == errno.EAGAIN
        assert revents(fd, select.POLLOUT) == 0
        assert revents(fd, select.POLLIN) & select.POLLIN
        assert [r.req_id for r in parse(os.read(fd, 16))] == [0]
        assert revents(fd, select.POLLOUT) & select.POLLOUT
        assert submit(fd, reqs[4]) == 40
        assert sorted(r.req_id for r in parse(os.read(fd, 16 * 8))) == [1, 2, 3, 4]
    finally:
        os.close(fd)


def test_blocking_write_waits_for_room(server_factory):
    server = server_factory("--queue-depth", "4")
    fd = open_session(server.mountpoint, "zero")
    bufs = [np.ones(8, np.uint8) for _ in range(6)]
    reqs = [request(i, out=whole(b)) for i, b in enumerate(bufs)]
    written: list[int] = []
    try:
        writer = threading.Thread(target=lambda: written.append(os.write(fd, b"".join(r.packed for r in reqs))))
        writer.start()
        writer.join(0.3)
        assert writer.is_alive(), "a blocking write on a full session returned early"
        first = parse(os.read(fd, 16 * 4))
        writer.join(WAIT_S)
        assert written == [6 * 40]
        rest = collect(fd, 2)
        assert sorted(r.req_id for r in first + rest) == list(range(6))
    finally:
        os.close(fd)
    with open(server.mountpoint / "stats") as f:
        assert '"queue_waits": 0' not in f.read()


def test_poll_pollout_returns_when_room_is_freed(server_factory):
    server = server_factory("--queue-depth", "2")
    fd = open_session(server.mountpoint, "zero", os.O_RDWR | os.O_NONBLOCK)
    bufs = [np.ones(8, np.uint8) for _ in range(2)]
    seen: list[int] = []
    try:
        submit(fd, *[request(i, out=whole(b)) for i, b in enumerate(bufs)])
        assert revents(fd, select.POLLOUT) == 0
        waiter = threading.Thread(target=lambda: seen.append(revents(fd, select.POLLOUT, int(WAIT_S * 1000))))
        waiter.start()
        waiter.join(0.2)
        os.read(fd, 16)
        waiter.join(WAIT_S)
        assert seen and seen[0] & select.POLLOUT
    finally:
        os.close(fd)
