"""Session semantics under trio without a mount, against a fake core.

The fake core models only the counting (depth, outstanding, ready) so these
tests pin the event-loop logic: blocking, waking, EAGAIN, short counts,
splits, poll notifications, shutdown.
"""

from __future__ import annotations

import errno
import struct

import pytest
import trio
import trio.testing

from dmoverfs.core import Function
from dmoverfs.process import Client
from dmoverfs.session import POLL_IN, POLL_OUT, SPLIT_MIN, Counters, Handle, Session

REQ = struct.Struct("<QI4x8sQI4x")
RESP = struct.Struct("<Ii8s")
ZERO = Function(index=0, name="zero", ninputs=0, has_output=True)


class FakeCore:
    """Counts like the C core; requests complete only when the test says so."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.pending: list[int] = []
        self.ready: list[int] = []
        self.reject_id: int | None = None
        self.func: int | None = None
        self.watched = False

    def setfunc(self, index: int) -> int:
        if self.func is not None:
            return errno.EBUSY
        self.func = index
        return 0

    def submit(self, data: bytes, first: int, count: int) -> tuple[int, int]:
        accepted = 0
        for i in range(first, first + count):
            if len(self.pending) + len(self.ready) == self.depth:
                break
            req_id = REQ.unpack_from(data, i * REQ.size)[4]
            if req_id == self.reject_id:
                return accepted, errno.EFAULT
            self.pending.append(req_id)
            accepted += 1
        return accepted, 0

    def complete(self, n: int) -> None:
        self.ready += self.pending[:n]
        del self.pending[:n]

    def take(self, max_resps: int) -> bytes:
        out, self.ready = self.ready[:max_resps], self.ready[max_resps:]
        return b"".join(RESP.pack(i, 0, bytes(8)) for i in out)

    def counts(self) -> tuple[int, int]:
        return len(self.pending) + len(self.ready), len(self.ready)

    def watch(self, on: bool) -> None:
        self.watched = on

    def close(self) -> None:
        self.pending.clear()
        self.ready.clear()


class FakePollHandle:
    def __init__(self) -> None:
        self.notified = 0

    def notify(self) -> None:
        self.notified += 1


def make_session(depth: int = 4, nonblock: bool = False) -> tuple[Session, FakeCore, Handle]:
    core = FakeCore(depth)
    session = Session(1, core, Client(1, 0, 0), depth, {"zero": ZERO}, Counters())  # type: ignore[arg-type]
    session.set_function(b"zero")
    handle = Handle(session, nonblock)
    session.handles.add(handle)
    return session, core, handle


def reqs(*ids: int) -> bytes:
    return b"".join(REQ.pack(0, 0, bytes(8), 0, i) for i in ids)


def ids_of(data: bytes) -> list[int]:
    return [RESP.unpack_from(data, i)[0] for i in range(0, len(data), RESP.size)]


def test_lengths_must_be_whole_structs_unless_a_kernel_split():
    session, core, handle = make_session(depth=100000)

    async def main() -> None:
        with pytest.raises(OSError) as info:
            await session.write(handle, b"\0" * 41)
        assert info.value.errno == errno.EINVAL
        # A piece of a larger write split by the kernel: the whole structs in it are served.
        big = reqs(*range(SPLIT_MIN // 40 + 1))[: SPLIT_MIN + 7]
        assert await session.write(handle, big) == (SPLIT_MIN + 7) // 40 * 40

    trio.run(main)


def test_blocking_read_sleeps_until_full_and_completion_wakes_it():
    session, core, handle = make_session()

    async def main() -> None:
        await session.write(handle, reqs(1, 2))
        result: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _append(result, session.read(handle, 32)))
            await trio.testing.wait_all_tasks_blocked()
            core.complete(1)
            session.changed()
            await trio.testing.wait_all_tasks_blocked()
            assert result == []  # one of two: still waiting
            core.complete(1)
            session.changed()
        assert ids_of(result[0]) == [1, 2]

    trio.run(main)


async def _append(out: list, coro) -> None:
    out.append(await coro)


def test_blocking_write_waits_for_room_then_finishes():
    session, core, handle = make_session(depth=2)

    async def main() -> None:
        result: list[int] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _append(result, session.write(handle, reqs(1, 2, 3))))
            await trio.testing.wait_all_tasks_blocked()
            assert result == [] and core.counts() == (2, 0)
            core.complete(2)
            assert ids_of(await session.read(handle, 16)) == [1]
        assert result == [120]

    trio.run(main)


def test_nonblocking_write_short_then_eagain():
    session, core, handle = make_session(depth=2, nonblock=True)

    async def main() -> None:
        assert await session.write(handle, reqs(1, 2, 3)) == 80
        with pytest.raises(OSError) as info:
            await session.write(handle, reqs(4))
        assert info.value.errno == errno.EAGAIN

    trio.run(main)


def test_invalid_request_after_accepted_ones_is_a_short_write():
    session, core, handle = make_session(depth=10)
    core.reject_id = 3

    async def main() -> None:
        assert await session.write(handle, reqs(1, 2, 3, 4)) == 80
        with pytest.raises(OSError) as info:
            await session.write(handle, reqs(3))
        assert info.value.errno == errno.EFAULT

    trio.run(main)


def test_shutdown_wakes_blocked_reader_with_enxio_and_keeps_taken_responses():
    session, core, handle = make_session()

    async def main() -> None:
        await session.write(handle, reqs(1, 2))
        outcomes: list[object] = []

        async def reader(size: int) -> None:
            try:
                outcomes.append(await session.read(handle, size))
            except OSError as exc:
                outcomes.append(exc.errno)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, 48)
            await trio.testing.wait_all_tasks_blocked()
            core.complete(1)
            session.changed()
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(reader, 16)
            await trio.testing.wait_all_tasks_blocked()
            session.shut_down()
        # The first reader had taken one response: it gets it (a short read), not an error.
        assert sorted(outcomes, key=str) == sorted([RESP.pack(1, 0, bytes(8)), errno.ENXIO], key=str)
        assert session.poll(handle, None) == POLL_IN | POLL_OUT

    trio.run(main)


def test_poll_reports_state_and_notifies_once_per_handle():
    session, core, handle = make_session(depth=1)

    async def main() -> None:
        ph = FakePollHandle()
        assert session.poll(handle, ph) == POLL_OUT
        await session.write(handle, reqs(1))
        assert session.poll(handle, ph) == 0  # full, nothing ready
        core.complete(1)
        session.changed()
        assert ph.notified == 1
        session.changed()
        assert ph.notified == 1  # the handle was used up
        assert session.poll(handle, None) == POLL_IN
        await session.read(handle, 16)
        assert session.poll(handle, None) == POLL_OUT

    trio.run(main)


def test_setfunc_errors():
    session, core, handle = make_session()
    for name in (b"zero", b"no-such-function"):
        with pytest.raises(OSError) as info:
            session.set_function(name)
        assert info.value.errno == errno.EBUSY  # checked before the name, as NetBSD does
    fresh = Session(2, FakeCore(4), Client(1, 0, 0), 4, {"zero": ZERO}, Counters())  # type: ignore[arg-type]
    with pytest.raises(OSError) as info:
        fresh.set_function(b"nope")
    assert info.value.errno == errno.ESRCH
    fresh.set_function(b"zero\0junk")
    assert fresh.function == ZERO
