"""The one rule for a session's reads, writes and polls (csrc/core/io.c), without a mount.

The server's transport hands every read, write, poll and FUSE_INTERRUPT of a
session to the core with the kernel's facts (request id, calling thread, the
file's O_NONBLOCK); the core answers at once, fails, or parks the call and
answers later through a sink.  Here the real core (dmoverfs._core, built by
tests/core_harness.py) is driven through cffi exactly that way: the sink is
made of cffi callbacks that record every answer and poll wake-up, from
whichever thread the core calls them (the test's own for answers made now, a
worker's for completions and pumped writes).  Every wait has a deadline.

Expected values come from SPEC.md ("Semantics") and, where it is silent,
from NetBSD's dmover_io.c, which SPEC.md defers to.  The client of every
session is this process (its pid and a pidfd); the thread ids given with the
calls are this thread's, a thread that no longer exists, or a child process
put in a chosen signal state.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from core_harness import IOV_MAX, REQ, RESP, UNMAPPED, Core, Mem, Resp, Sess, build_core_module, core_module, pack_req, whole

#: The kernel cuts transfers over this size (1 MiB, less the buffer's offset in its page).
MAX_TRANSFER = 1 << 20
EV_IN = select.POLLIN | select.POLLRDNORM
EV_OUT = select.POLLOUT | select.POLLWRNORM
EV_ALL = EV_IN | EV_OUT
#: Any answer the rule owes arrives within this.
DEADLINE_S = 10.0
#: A call that must go on waiting stays unanswered at least this long.
QUIET_S = 0.3
#: SPEC.md: a caught signal ends a blocked call within a second.
SIGNAL_S = 1.0
#: Long enough for the core to look at a waiting caller's signals again (it does every 0.2 s).
RECHECK_QUIET_S = 0.7
#: Bytes of a request small enough to run in the submitting thread (the core's default inline limit is 64 KiB).
SMALL = 8
#: Bytes of a request large enough to run on a worker thread.
LARGE = 1 << 20

IO_FIELDS = (
    "reads",
    "writes",
    "polls",
    "errors",
    "parked_reads",
    "parked_writes",
    "waiting_reads",
    "waiting_writes",
    "interrupts",
    "interrupts_eintr",
    "interrupts_ignored",
    "poll_wakeups",
)


@pytest.fixture(scope="session")
def core_so(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The core module, built once per test session."""
    return build_core_module(tmp_path_factory)


@pytest.fixture(scope="session")
def cm(core_so: Path) -> Any:
    """The loaded core module (ffi, lib)."""
    return core_module(core_so)


# --- the sink ---------------------------------------------------------------


class ReadAnswer(NamedTuple):
    """What the core answered to a read."""

    unique: int
    err: int
    data: bytes
    thread: int  # threading.get_ident() of the thread the core answered from

    @property
    def resps(self) -> list[Resp]:
        """The responses the answer carries."""
        assert len(self.data) % RESP.size == 0
        return [Resp(*RESP.unpack_from(self.data, i)) for i in range(0, len(self.data), RESP.size)]

    @property
    def ids(self) -> list[int]:
        """Their request ids, in the order given."""
        return [r.id for r in self.resps]


class WriteAnswer(NamedTuple):
    """What the core answered to a write."""

    unique: int
    err: int
    nbytes: int  # bytes accepted
    thread: int


class Wake(NamedTuple):
    """A poll handle the core woke."""

    kh: int
    thread: int


class Sink:
    """A struct dm_sink of cffi callbacks recording, in order, everything the core sends.

    A write answer can be held: the thread that delivers it (a worker pumping
    the write) then waits in the callback until released, which keeps that
    worker busy for as long as a test needs.
    """

    def __init__(self, ffi: Any, lib: Any, core_ptr: Any) -> None:
        """Make the callbacks and hand them to the core as its sink."""
        self.cv = threading.Condition()
        self.log: list[ReadAnswer | WriteAnswer | Wake] = []
        self.errors: list[str] = []
        self._holds: dict[int, threading.Event] = {}
        self._callbacks = (
            ffi.callback("void(void *, uint64_t, int, const void *, size_t)", self._answer_read, onerror=self._onerror),
            ffi.callback("void(void *, uint64_t, int, size_t)", self._answer_write, onerror=self._onerror),
            ffi.callback("void(void *, uint64_t)", self._wake_poll, onerror=self._onerror),
        )
        self._ffi = ffi
        sink = ffi.new("struct dm_sink *")
        sink.ctx = ffi.NULL
        sink.answer_read, sink.answer_write, sink.wake_poll = self._callbacks
        lib.dm_core_set_sink(core_ptr, sink)

    def _onerror(self, exc_type: type, exc: BaseException, tb: Any) -> None:
        """An exception in a callback: recorded, and the test fails at teardown."""
        with self.cv:
            self.errors.append(f"{exc_type.__name__}: {exc}")
            self.cv.notify_all()

    def _record(self, item: ReadAnswer | WriteAnswer | Wake) -> None:
        """Log an item and wake whoever waits for one."""
        with self.cv:
            self.log.append(item)
            self.cv.notify_all()

    def _answer_read(self, ctx: Any, unique: int, err: int, data: Any, length: int) -> None:
        """struct dm_sink.answer_read."""
        raw = self._ffi.unpack(self._ffi.cast("char *", data), length) if length else b""
        self._record(ReadAnswer(unique, err, raw, threading.get_ident()))

    def _answer_write(self, ctx: Any, unique: int, err: int, accepted: int) -> None:
        """struct dm_sink.answer_write; waits here when the write is held."""
        self._record(WriteAnswer(unique, err, accepted, threading.get_ident()))
        hold = self._holds.get(unique)
        if hold is not None and not hold.wait(DEADLINE_S):
            with self.cv:
                self.errors.append(f"write {unique} was held longer than {DEADLINE_S}s")

    def _wake_poll(self, ctx: Any, kh: int) -> None:
        """struct dm_sink.wake_poll."""
        self._record(Wake(kh, threading.get_ident()))

    def hold_write(self, unique: int) -> threading.Event:
        """Have the answer of write unique wait in its callback until the event is set."""
        return self._holds.setdefault(unique, threading.Event())

    def release_all(self) -> None:
        """Let every held answer go."""
        for event in self._holds.values():
            event.set()

    # -- looking at what was sent --

    def answers(self, unique: int) -> list[ReadAnswer | WriteAnswer]:
        """Every answer sent for unique so far."""
        with self.cv:
            return [a for a in self.log if not isinstance(a, Wake) and a.unique == unique]

    def answered(self, unique: int) -> bool:
        """Whether unique has been answered (no waiting)."""
        return bool(self.answers(unique))

    def wakes(self) -> list[int]:
        """Poll handles woken so far, in order."""
        with self.cv:
            return [w.kh for w in self.log if isinstance(w, Wake)]

    def wake_threads(self) -> list[int]:
        """The threads the wake-ups came from, in order."""
        with self.cv:
            return [w.thread for w in self.log if isinstance(w, Wake)]

    def order(self, uniques: Sequence[int]) -> list[int]:
        """The uniques among those given, in the order they were answered."""
        with self.cv:
            return [a.unique for a in self.log if not isinstance(a, Wake) and a.unique in uniques]

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
        """Until predicate (evaluated under the lock) holds; fail after timeout."""
        with self.cv:
            if not self.cv.wait_for(predicate, timeout):
                pytest.fail(f"{what} (after {timeout}s)")

    def _wait_answer(self, unique: int, kind: type, timeout: float) -> Any:
        """The one answer of unique, of the given kind, waiting for it."""
        self.wait_for(
            lambda: any(not isinstance(a, Wake) and a.unique == unique for a in self.log), f"call {unique} unanswered", timeout
        )
        found = self.answers(unique)
        assert len(found) == 1, f"call {unique} answered {len(found)} times: {found}"
        assert isinstance(found[0], kind), found[0]
        return found[0]

    def read_answer(self, unique: int, timeout: float = DEADLINE_S) -> ReadAnswer:
        """The answer of read unique, waiting for it."""
        return self._wait_answer(unique, ReadAnswer, timeout)

    def write_answer(self, unique: int, timeout: float = DEADLINE_S) -> WriteAnswer:
        """The answer of write unique, waiting for it."""
        return self._wait_answer(unique, WriteAnswer, timeout)

    def wait_wakes(self, n: int, timeout: float = DEADLINE_S) -> list[int]:
        """Until at least n wake-ups were sent; all of them."""
        self.wait_for(lambda: sum(isinstance(w, Wake) for w in self.log) >= n, f"fewer than {n} poll wake-ups", timeout)
        return self.wakes()

    def assert_unanswered(self, *uniques: int, quiet: float = QUIET_S) -> None:
        """None of the calls is answered, now or within quiet seconds."""
        with self.cv:
            self.cv.wait_for(lambda: any(not isinstance(a, Wake) and a.unique in uniques for a in self.log), quiet)
            early = [a for a in self.log if not isinstance(a, Wake) and a.unique in uniques]
        assert not early, f"answered although it must wait: {early}"

    def check(self) -> None:
        """Every call answered at most once, every callback ran without an exception."""
        with self.cv:
            assert not self.errors, self.errors
            seen = [a.unique for a in self.log if not isinstance(a, Wake)]
        dup = sorted({u for u in seen if seen.count(u) > 1})
        assert not dup, f"calls answered more than once: {dup}"


# --- a transport core and its calls -------------------------------------------


class Rig:
    """A core serving sessions through dm_sess_call_* (transport = 1), its sink, and the test's calls."""

    def __init__(self, cm: Any, **core_kw: Any) -> None:
        """A transport core with core_kw as tunables, its sink, and an execution context for this thread."""
        self.ffi, self.lib = cm.ffi, cm.lib
        self.core = Core(cm, transport=1, **core_kw)
        self.sink = Sink(self.ffi, self.lib, self.core.ptr)
        self.x = self.lib.dm_core_exec_new(self.core.ptr)
        assert self.x != self.ffi.NULL
        self.tid = threading.get_native_id()
        self.mem = Mem()
        self.bufs: dict[int, np.ndarray] = {}  # request id -> its output buffer
        self._unique = itertools.count(1 << 40)
        self._keep: list[Any] = []

    def close(self) -> None:
        """Release held answers, close the sessions, free the context and the core."""
        self.sink.release_all()
        for s in self.core.sessions:
            s.close()
        if self.x is not None:
            self.lib.dm_core_exec_free(self.x)
            self.x = None
        self.core.free()

    # -- sessions and requests --

    def session(self, func: str | None = "zero", depth: int = 8) -> Sess:
        """A session of this process with func selected (None: none yet)."""
        return self.core.session(func, depth)

    def external(self, depth: int = 8) -> Sess:
        """A session whose zero requests wait for the test to take and complete them."""
        s = self.core.session(None, depth)
        assert self.lib.dm_sess_set_external(s.ptr, self.lib.dm_func_lookup(b"zero"), 0, 1) == 0
        return s

    def zero(self, ids: Sequence[int] | int, size: int = SMALL) -> bytes:
        """Packed zero requests with these ids, each over a buffer of its own filled with 0xff."""
        ids = [ids] if isinstance(ids, int) else list(ids)
        out = []
        for i in ids:
            buf = self.mem.buf(size)
            buf[:] = 0xFF
            self.bufs[i] = buf
            out.append(self.mem.request(out=whole(buf), req_id=i))
        return b"".join(out)

    def zeroed(self, i: int) -> bool:
        """Whether request i has run (its buffer is all zeros)."""
        return not self.bufs[i].any()

    def untouched(self, i: int) -> bool:
        """Whether request i never ran (its buffer is all 0xff)."""
        return bool((self.bufs[i] == 0xFF).all())

    def take_external(self, n: int = 64) -> list[Any]:
        """The external requests submitted and not taken yet, oldest first."""
        out = self.ffi.new("dm_req *[]", n)
        got = self.lib.dm_core_take_external(self.core.ptr, out, n)
        return [out[i] for i in range(got)]

    # -- the transport's calls --

    def _in(self, nonblock: bool, tid: int | None) -> tuple[int, Any]:
        """A fresh unique and the struct dm_call_in of a call."""
        unique = next(self._unique)
        call = self.ffi.new(
            "struct dm_call_in *", {"unique": unique, "tid": self.tid if tid is None else tid, "nonblock": int(nonblock)}
        )
        return unique, call

    def read(self, s: Sess, count: int = 1, *, nbytes: int | None = None, nonblock: bool = False, tid: int | None = None) -> int:
        """A read of count responses (or of nbytes bytes); its unique."""
        length = count * RESP.size if nbytes is None else nbytes
        unique, call = self._in(nonblock, tid)
        scratch = self.ffi.new("char[]", max(length, 1))
        self.lib.dm_sess_call_read(s.ptr, call, length, scratch)
        return unique

    def write(
        self, s: Sess, data: Any, *, nonblock: bool = False, worker: bool = False, tid: int | None = None, hold: bool = False
    ) -> int:
        """A write of data (bytes or a cdata buffer), submitted by this thread or, with worker, by a
        worker; its unique.  With hold, its answer waits in the sink (see Sink.hold_write)."""
        unique, call = self._in(nonblock, tid)
        if hold:
            self.sink.hold_write(unique)
        length = len(data) if isinstance(data, bytes) else self.ffi.sizeof(data)
        self.lib.dm_sess_call_write(s.ptr, self.ffi.NULL if worker else self.x, call, data, length)
        return unique

    def poll(self, s: Sess, kh: int, notify: bool = False) -> int:
        """dm_sess_call_poll: the events ready now."""
        return self.lib.dm_sess_call_poll(s.ptr, kh, int(notify))

    def interrupt(self, unique: int) -> None:
        """The kernel's FUSE_INTERRUPT for request unique."""
        self.lib.dm_core_call_interrupt(self.core.ptr, unique)

    def shutdown(self) -> None:
        """dm_core_shutdown."""
        self.lib.dm_core_shutdown(self.core.ptr)

    # -- what the core says --

    def io_stats(self) -> dict[str, int]:
        """The core's struct dm_io_stats."""
        out = self.ffi.new("struct dm_io_stats *")
        self.lib.dm_core_io_stats(self.core.ptr, out)
        return {k: getattr(out, k) for k in IO_FIELDS}

    def waiting(self, s: Sess) -> tuple[int, int, int]:
        """(reads, writes, poll handles) waiting on s now."""
        counts = self.ffi.new("unsigned[3]")
        self.lib.dm_sess_waiting(s.ptr, counts)
        return counts[0], counts[1], counts[2]

    def times(self, s: Sess) -> tuple[int, int, int]:
        """(atime, mtime, ctime) of s in ns."""
        t = self.ffi.new("int64_t[3]")
        self.lib.dm_sess_times(s.ptr, t)
        return t[0], t[1], t[2]

    def until(self, predicate: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
        """Poll predicate until it holds; fail after timeout."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"{what} (after {timeout}s)")
            time.sleep(0.002)

    def wait_idle(self) -> None:
        """Until the core holds nothing: no request outstanding, executing or decoded, no call waiting."""

        def idle() -> bool:
            core = self.core.stats()[0]
            io = self.io_stats()
            return (core["outstanding"], core["executing"], core["meta_bytes"], io["waiting_reads"], io["waiting_writes"]) == (
                0,
            ) * 5

        self.until(idle, f"the core never became idle: {self.core.stats()[0]}, {self.io_stats()}")


@pytest.fixture
def make_rig(cm: Any) -> Iterator[Callable[..., Rig]]:
    """Factory of rigs; each is checked (answers once each, no callback error) and freed at the end."""
    rigs: list[Rig] = []

    def make(**core_kw: Any) -> Rig:
        """A rig with these tunables."""
        rig = Rig(cm, **core_kw)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()
    for rig in rigs:
        rig.sink.check()


@pytest.fixture
def rig(make_rig: Callable[..., Rig]) -> Rig:
    """A transport core with the default tunables (two workers, 64 KiB inline)."""
    return make_rig()


# --- processes in a chosen signal state --------------------------------------

CHILD = """
import signal, sys, time
signal.signal(signal.SIGUSR1, lambda *a: None)
signal.signal(signal.SIGUSR2, lambda *a: None)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def sigbit(sig: int) -> int:
    """The bit of signal sig in a /proc signal mask."""
    return 1 << (sig - 1)


class Child:
    """A process with handlers for SIGUSR1 and SIGUSR2 (SIGUSR2 blocked): its pid is the tid of a call."""

    def __init__(self) -> None:
        """Start the child and wait until its handlers are in place."""
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], DEADLINE_S)
        assert ready and self.proc.stdout.readline() == b"ready\n", "the child never started"
        self.pid = self.proc.pid

    def status(self) -> dict[str, str]:
        """The fields of /proc/PID/status."""
        text = Path(f"/proc/{self.pid}/status").read_text()
        return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)

    def pending(self) -> int:
        """The signals pending for the child (its thread's and its group's)."""
        st = self.status()
        return int(st["SigPnd"], 16) | int(st["ShdPnd"], 16)

    def state(self) -> str:
        """The child's state letter in /proc/PID/stat."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        return stat[stat.rindex(")") + 2]

    def stop(self) -> None:
        """SIGSTOP the child and wait until it is stopped."""
        os.kill(self.pid, signal.SIGSTOP)
        deadline = time.monotonic() + DEADLINE_S
        while self.state() != "T":
            assert time.monotonic() < deadline, "the child never stopped"
            time.sleep(0.005)

    def send_pending(self, sig: int) -> None:
        """Send sig and make sure it stays pending (the child is stopped, or blocks it)."""
        os.kill(self.pid, sig)
        deadline = time.monotonic() + DEADLINE_S
        while not self.pending() & sigbit(sig):
            assert time.monotonic() < deadline, f"signal {sig} never showed as pending"
            time.sleep(0.005)

    def kill(self) -> None:
        """SIGKILL and reap the child (a no-op once done)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(DEADLINE_S)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def child() -> Iterator[Child]:
    """A child process in the signal state of a test's choice; killed at the end."""
    c = Child()
    try:
        yield c
    finally:
        c.kill()


def gone_tid() -> int:
    """The id of a thread that no longer exists (a child already reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait(DEADLINE_S)
    assert not os.path.exists(f"/proc/{proc.pid}")
    return proc.pid


# --- lengths ------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 39])
@pytest.mark.parametrize("nonblock", [False, True])
def test_a_write_shorter_than_one_request_is_einval(rig: Rig, length: int, nonblock: bool) -> None:
    """A write that holds no whole request (shorter than 40 bytes) is EINVAL."""
    s = rig.session("zero", depth=1 << 16)
    buf = rig.mem.buf(8)
    buf[:] = 0xFF
    iov = rig.mem.iovecs(whole(buf))
    data = b"".join(pack_req(iov, 1, b"", 0, i) for i in range(length // REQ.size + 1))[:length]
    u = rig.write(s, data, nonblock=nonblock)
    assert rig.sink.write_answer(u)[1:3] == (errno.EINVAL, 0)
    assert s.counts() == (0, 0)
    assert (buf == 0xFF).all(), "a request of a refused write ran"
    assert rig.io_stats()["errors"] == 1


@pytest.mark.parametrize("length", [41, 81, 9984, 40 * 100 - 1, MAX_TRANSFER - 4095])
@pytest.mark.parametrize("nonblock", [False, True])
def test_a_write_that_is_not_whole_requests_serves_its_whole_ones(rig: Rig, length: int, nonblock: bool) -> None:
    """Any piece the kernel cuts (9,984 bytes: a writev of 39-byte segments, one a page, cut after
    256 pages) is served by its whole requests; the rest comes back short, as a pipe does."""
    s = rig.session("zero", depth=1 << 16)
    buf = rig.mem.buf(8)
    buf[:] = 0xFF
    iov = rig.mem.iovecs(whole(buf))
    whole_ones = length // REQ.size
    data = b"".join(pack_req(iov, 1, b"", 0, i) for i in range(whole_ones + 1))[:length]
    u = rig.write(s, data, nonblock=nonblock)
    assert rig.sink.write_answer(u)[1:3] == (0, whole_ones * REQ.size)
    rig.until(lambda: s.counts() == (whole_ones, whole_ones), "the accepted requests never completed")
    assert (buf == 0).all(), "the accepted requests did not run"
    assert rig.io_stats()["errors"] == 0


@pytest.mark.parametrize("length", [1, 15])
@pytest.mark.parametrize("nonblock", [False, True])
def test_a_read_shorter_than_one_response_is_einval(rig: Rig, length: int, nonblock: bool) -> None:
    """A read with no room for a whole response (shorter than 16 bytes) is EINVAL."""
    s = rig.session("zero")
    assert rig.sink.write_answer(rig.write(s, rig.zero(range(4)))).nbytes == 4 * REQ.size
    u = rig.read(s, nbytes=length, nonblock=nonblock)
    assert rig.sink.read_answer(u)[1:3] == (errno.EINVAL, b"")
    assert s.counts() == (4, 4), "a refused read took responses"


@pytest.mark.parametrize("length", [17, 40, 9999])
def test_a_read_that_is_not_whole_responses_takes_its_whole_ones(rig: Rig, length: int) -> None:
    """A read cut anywhere takes as many whole responses as fit, and no more."""
    s = rig.session("zero", depth=1 << 16)
    n = 1000
    assert rig.sink.write_answer(rig.write(s, rig.zero(range(n)))).nbytes == n * REQ.size
    fit = min(length // RESP.size, n)
    answer = rig.sink.read_answer(rig.read(s, nbytes=length, nonblock=True))
    assert (answer.err, len(answer.data)) == (0, fit * RESP.size)
    assert s.counts() == (n - fit, n - fit)


def test_a_write_of_long_lists_is_decoded_a_bounded_step_at_a_time(rig: Rig) -> None:
    """A write of xor16 requests with 17 x 1024 empty iovecs each (17 MiB of lists in all): the
    calling thread decodes one step (about 1 MiB of lists) and the workers the rest, a step per
    turn of the session; every request is accepted and runs."""
    n = 64
    s = rig.session("xor16", depth=n)
    empty = rig.mem.iovecs([(0, 0)] * IOV_MAX)
    inputs = rig.mem.dmbufs([(empty, IOV_MAX)] * 16)
    data = b"".join(pack_req(empty, IOV_MAX, b"", inputs, i) for i in range(n))
    before = rig.core.stats()[0]["slices"]
    u = rig.write(s, data)
    assert rig.sink.write_answer(u)[1:3] == (0, n * REQ.size)
    steps = rig.core.stats()[0]["slices"] - before
    each = 17 * IOV_MAX * 16
    # A step decodes about 1 MiB of lists: it may pass that by one request's.
    assert steps >= n * each // ((1 << 20) + each) - 1, f"{n * each} bytes of lists decoded in {steps} worker steps"
    rig.until(lambda: s.counts() == (n, n), "the requests never completed")


def test_zero_length_calls_answer_zero(rig: Rig) -> None:
    """A zero-length read or write answers 0 at once, even when a non-empty one would wait."""
    s = rig.session("zero", depth=1)
    assert rig.sink.write_answer(rig.write(s, rig.zero(0))).nbytes == REQ.size  # full: a write of requests would wait
    u = rig.write(s, b"")
    assert rig.sink.write_answer(u, timeout=0)[1:3] == (0, 0)
    u = rig.read(s, 0)
    assert rig.sink.read_answer(u, timeout=0)[1:3] == (0, b"")
    assert s.counts() == (1, 1), "a zero-length read takes nothing"
    io = rig.io_stats()
    assert (io["errors"], io["parked_reads"], io["parked_writes"]) == (0, 0, 0)


def test_calls_before_a_function_is_set_are_enxio(rig: Rig) -> None:
    """Before a function is set, reads and writes are ENXIO (a bad length is still EINVAL, as NetBSD checks it first)."""
    s = rig.session(None)
    data = rig.zero(0)
    for nonblock in (False, True):
        assert rig.sink.write_answer(rig.write(s, data, nonblock=nonblock))[1:3] == (errno.ENXIO, 0)
        assert rig.sink.write_answer(rig.write(s, data, nonblock=nonblock, worker=True))[1:3] == (errno.ENXIO, 0)
        assert rig.sink.read_answer(rig.read(s, 1, nonblock=nonblock))[1:3] == (errno.ENXIO, b"")
    # NetBSD's dmio_read and dmio_write look at the length first, then at the function.
    assert rig.sink.write_answer(rig.write(s, b"\0" * 39))[1] == errno.EINVAL
    assert rig.sink.read_answer(rig.read(s, nbytes=15))[1] == errno.EINVAL
    assert rig.sink.write_answer(rig.write(s, b""))[1] == errno.ENXIO
    assert rig.sink.read_answer(rig.read(s, 0))[1] == errno.ENXIO
    assert not rig.zeroed(0)
    assert rig.io_stats()["parked_reads"] == rig.io_stats()["parked_writes"] == 0


def test_a_long_piece_of_a_split_transfer_serves_its_whole_structs(rig: Rig) -> None:
    """The kernel cuts transfers over 1 MiB at 1 MiB less the buffer's offset in its page."""
    write_piece = (1 << 20) - 100  # 26211 requests and 36 bytes of the next
    read_piece = (1 << 20) - 104  # 65529 responses and 8 bytes of the next
    nwrite, nread = write_piece // REQ.size, read_piece // RESP.size
    assert write_piece % REQ.size and read_piece % RESP.size and max(write_piece, read_piece) < MAX_TRANSFER
    s = rig.session("zero", depth=1 << 16)
    buf = rig.mem.buf(1)
    iov = rig.mem.iovecs(whole(buf))
    reqs = b"".join(pack_req(iov, 1, b"", 0, i) for i in range(nread + 1))
    u = rig.write(s, reqs[:write_piece])
    assert rig.sink.write_answer(u)[1:3] == (0, nwrite * REQ.size)
    assert s.counts() == (nwrite, nwrite)
    u = rig.write(s, reqs[nwrite * REQ.size : (nread + 1) * REQ.size])
    assert rig.sink.write_answer(u)[1:3] == (0, (nread + 1 - nwrite) * REQ.size)
    u = rig.read(s, nbytes=read_piece)
    answer = rig.sink.read_answer(u)
    assert (answer.err, len(answer.data)) == (0, nread * RESP.size)
    assert answer.ids == list(range(nread))
    assert all(r.error == 0 for r in answer.resps)
    assert s.counts() == (1, 1)


# --- blocking reads -------------------------------------------------------------


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["inline", "worker"])
def test_a_blocking_read_waits_until_all_it_asks_for_are_ready(rig: Rig, size: int) -> None:
    """A blocking read parks until all it asks for are ready; the completion of the last answers it with exactly those."""
    s = rig.session("zero", depth=8)
    u = rig.read(s, 3)
    rig.sink.assert_unanswered(u)
    assert rig.waiting(s) == (1, 0, 0)
    assert rig.io_stats()["waiting_reads"] == 1
    assert rig.sink.write_answer(rig.write(s, rig.zero([0, 1], size))).nbytes == 2 * REQ.size
    rig.until(lambda: s.counts() == (2, 2), "the first two requests never completed")
    rig.sink.assert_unanswered(u)
    w = rig.write(s, rig.zero(2, size))
    if size == SMALL:
        # Run in the write: the read is answered before the write returns, by this thread.
        assert rig.sink.answered(u)
    answer = rig.sink.read_answer(u)
    assert answer.err == 0
    assert sorted(answer.ids) == [0, 1, 2]
    if size == SMALL:
        assert answer.ids == [0, 1, 2]
        assert answer.thread == threading.get_ident()
    else:
        assert answer.thread != threading.get_ident(), "a worker's completion answers the read"
    assert all(r.error == 0 for r in answer.resps)
    assert all(rig.zeroed(i) for i in range(3))
    assert rig.sink.write_answer(w).nbytes == REQ.size
    assert s.counts() == (0, 0)
    assert rig.waiting(s) == (0, 0, 0)
    io = rig.io_stats()
    assert (io["parked_reads"], io["waiting_reads"], io["reads"]) == (1, 0, 1)


def test_a_read_ready_at_once_is_answered_at_once(rig: Rig) -> None:
    """A blocking read whose responses are all ready is answered in the call, with no more than it asks for."""
    s = rig.session("zero", depth=8)
    rig.sink.write_answer(rig.write(s, rig.zero(range(4))))
    u = rig.read(s, 3)
    assert rig.sink.answered(u)
    assert rig.sink.read_answer(u).ids == [0, 1, 2]
    assert s.counts() == (1, 1)
    assert rig.io_stats()["parked_reads"] == 0


def test_a_completion_on_a_worker_answers_a_parked_read(rig: Rig) -> None:
    """External requests complete when the test says: here through dm_req_run, on a worker."""
    s = rig.external(depth=4)
    u = rig.read(s, 2)
    rig.sink.write_answer(rig.write(s, rig.zero([7, 8])))
    reqs = rig.take_external()
    assert len(reqs) == 2
    rig.lib.dm_req_complete(reqs[0], 0, rig.ffi.NULL)
    rig.sink.assert_unanswered(u)
    rig.lib.dm_req_run(reqs[1])
    answer = rig.sink.read_answer(u)
    assert answer.ids == [7, 8]
    assert answer.thread != threading.get_ident()
    assert rig.zeroed(8) and not rig.zeroed(7)


def test_a_blocking_read_leaves_responses_in_the_queue_until_it_can_take_all(rig: Rig) -> None:
    """The core's rule: a blocking read takes nothing while fewer than it needs are ready, so the
    ready ones stay readable for poll and for non-blocking readers (and an interrupted read has
    nothing it could lose)."""
    s = rig.session("zero", depth=8)
    rig.sink.write_answer(rig.write(s, rig.zero([0, 1])))
    u = rig.read(s, 3)
    assert s.counts() == (2, 2)
    assert rig.poll(s, 1) == EV_IN | EV_OUT
    assert rig.sink.read_answer(rig.read(s, 1, nonblock=True)).ids == [0]
    rig.sink.assert_unanswered(u)
    rig.sink.write_answer(rig.write(s, rig.zero([2, 3])))
    assert rig.sink.read_answer(u).ids == [1, 2, 3]


def test_a_read_longer_than_the_queue_takes_a_queue_at_a_time(rig: Rig) -> None:
    """A blocking read asking for more than the queue depth takes a queue's worth at a time, freeing room."""
    s = rig.session("zero", depth=2)
    u = rig.read(s, 5)
    rig.sink.write_answer(rig.write(s, rig.zero(0)))
    assert s.counts() == (1, 1), "fewer than a queue's worth: left in the queue"
    rig.sink.write_answer(rig.write(s, rig.zero(1)))
    assert s.counts() == (0, 0), "a queue's worth is taken, making room"
    rig.sink.write_answer(rig.write(s, rig.zero([2, 3])))
    assert s.counts() == (0, 0)
    rig.sink.assert_unanswered(u)
    assert rig.waiting(s) == (1, 0, 0)
    rig.sink.write_answer(rig.write(s, rig.zero(4)))
    answer = rig.sink.read_answer(u)
    assert (answer.err, answer.ids) == (0, [0, 1, 2, 3, 4])
    assert rig.io_stats()["reads"] == 1


def test_a_read_longer_than_the_queue_starts_with_what_is_ready(rig: Rig) -> None:
    """A read longer than the queue takes a full queue ready when it arrives, then waits for the rest."""
    s = rig.session("zero", depth=2)
    rig.sink.write_answer(rig.write(s, rig.zero([0, 1])))
    u = rig.read(s, 3)
    assert s.counts() == (0, 0)
    rig.sink.assert_unanswered(u)
    rig.sink.write_answer(rig.write(s, rig.zero(2)))
    assert rig.sink.read_answer(u).ids == [0, 1, 2]


def test_blocking_reads_are_served_in_arrival_order(rig: Rig) -> None:
    """Parked blocking reads are served oldest first; a newcomer waits behind them."""
    s = rig.session("zero", depth=8)
    r1 = rig.read(s, 2)
    r2 = rig.read(s, 1)
    rig.sink.write_answer(rig.write(s, rig.zero(0)))
    rig.sink.assert_unanswered(r1, r2)  # the second asks for one, but waits behind the first
    assert s.counts() == (1, 1)
    rig.sink.write_answer(rig.write(s, rig.zero(1)))
    assert rig.sink.read_answer(r1).ids == [0, 1]
    rig.sink.assert_unanswered(r2)
    # A newcomer waits behind a parked read even when what it asks for is ready.
    r3 = rig.read(s, 2)
    rig.sink.write_answer(rig.write(s, rig.zero(2)))
    assert rig.sink.read_answer(r2).ids == [2]
    rig.sink.write_answer(rig.write(s, rig.zero(3)))
    r4 = rig.read(s, 1)
    rig.sink.assert_unanswered(r3, r4)
    assert s.counts() == (1, 1)
    rig.sink.write_answer(rig.write(s, rig.zero([4, 5])))
    assert rig.sink.read_answer(r3).ids == [3, 4]
    assert rig.sink.read_answer(r4).ids == [5]


# --- non-blocking reads ------------------------------------------------------


@pytest.mark.parametrize("how", ["O_NONBLOCK", "attribute"])
def test_a_nonblocking_read_answers_what_is_ready_or_eagain(rig: Rig, how: str) -> None:
    """A non-blocking read (O_NONBLOCK of the call, or the session's attribute) answers what is ready, or EAGAIN."""
    s = rig.session("zero", depth=8)
    if how == "attribute":
        rig.lib.dm_sess_set_nonblock(s.ptr, 1)
        assert rig.lib.dm_sess_nonblock(s.ptr) == 1
    nonblock = how == "O_NONBLOCK"
    u = rig.read(s, 2, nonblock=nonblock)
    assert rig.sink.answered(u), "answered before the call returns"
    assert rig.sink.read_answer(u)[1:3] == (errno.EAGAIN, b"")
    rig.sink.write_answer(rig.write(s, rig.zero([0, 1])))
    u = rig.read(s, 5, nonblock=nonblock)
    assert rig.sink.answered(u)
    assert rig.sink.read_answer(u)[1:2] == (0,)
    assert rig.sink.read_answer(u).ids == [0, 1]
    io = rig.io_stats()
    assert (io["parked_reads"], io["reads"], io["errors"]) == (0, 2, 1)
    if how == "attribute":
        rig.lib.dm_sess_set_nonblock(s.ptr, 0)
        assert rig.lib.dm_sess_nonblock(s.ptr) == 0
        u = rig.read(s, 1)
        rig.sink.assert_unanswered(u)
        rig.sink.write_answer(rig.write(s, rig.zero(2)))
        assert rig.sink.read_answer(u).ids == [2]


def test_a_nonblocking_read_takes_what_a_parked_read_still_lacks(rig: Rig) -> None:
    """Non-blocking readers do not queue behind blocking ones: they answer at once."""
    s = rig.session("zero", depth=8)
    parked = rig.read(s, 3)
    assert rig.sink.read_answer(rig.read(s, 1, nonblock=True), timeout=0)[1:3] == (errno.EAGAIN, b"")
    rig.sink.write_answer(rig.write(s, rig.zero([0, 1])))
    u = rig.read(s, 1, nonblock=True)
    assert rig.sink.read_answer(u).ids == [0]
    rig.sink.write_answer(rig.write(s, rig.zero([2, 3])))
    assert rig.sink.read_answer(parked).ids == [1, 2, 3]


# --- writes -----------------------------------------------------------------------


@pytest.mark.parametrize("worker", [False, True], ids=["context", "worker"])
def test_a_blocking_write_waits_for_room_and_goes_on_as_reads_free_it(rig: Rig, worker: bool) -> None:
    """A blocking write accepts what fits, parks, goes on as reads free room, and is answered with all its bytes."""
    s = rig.session("zero", depth=2)
    data = bytearray(rig.zero(range(5)))
    u = rig.write(s, rig.ffi.from_buffer(data), worker=worker)
    # What waits was copied: the caller's buffer may go.
    data[:] = b"\xff" * len(data)
    rig.until(lambda: rig.io_stats()["waiting_writes"] == 1, "the write never waited for room")
    assert s.counts() == (2, 2)
    rig.sink.assert_unanswered(u)
    assert rig.waiting(s) == (0, 1, 0)
    assert rig.sink.read_answer(rig.read(s, 2)).ids == [0, 1]
    rig.until(lambda: s.counts() == (2, 2), "the write did not go on when a read made room")
    rig.sink.assert_unanswered(u)
    assert rig.sink.read_answer(rig.read(s, 2)).ids == [2, 3]
    answer = rig.sink.write_answer(u)
    assert answer[1:3] == (0, 5 * REQ.size)
    assert answer.thread != threading.get_ident(), "a worker goes on with the write"
    assert rig.sink.read_answer(rig.read(s, 1)).ids == [4]
    assert all(rig.zeroed(i) for i in range(5))
    io = rig.io_stats()
    assert (io["parked_writes"], io["waiting_writes"], io["writes"]) == (1, 0, 1)
    assert rig.waiting(s) == (0, 0, 0)


def test_a_write_and_a_read_longer_than_the_queue_pass_each_other(rig: Rig) -> None:
    """A write and a read both longer than the queue complete each other."""
    s = rig.session("zero", depth=2)
    r = rig.read(s, 7)
    w = rig.write(s, rig.zero(range(7)))
    assert rig.sink.write_answer(w)[1:3] == (0, 7 * REQ.size)
    assert rig.sink.read_answer(r).ids == list(range(7))
    assert s.counts() == (0, 0)


def test_writes_wait_in_arrival_order(rig: Rig) -> None:
    """Blocking writes of a session are accepted oldest first."""
    s = rig.session("zero", depth=1)
    w1 = rig.write(s, rig.zero([0, 1]))
    w2 = rig.write(s, rig.zero([2]))
    rig.sink.assert_unanswered(w1, w2)
    ids = []
    for _ in range(3):
        ids += rig.sink.read_answer(rig.read(s, 1)).ids
    assert ids == [0, 1, 2]
    assert rig.sink.write_answer(w1).nbytes == 2 * REQ.size
    assert rig.sink.write_answer(w2).nbytes == REQ.size
    assert rig.sink.order([w1, w2]) == [w1, w2]


@pytest.mark.parametrize("how", ["O_NONBLOCK", "attribute"])
@pytest.mark.parametrize("worker", [False, True], ids=["context", "worker"])
def test_a_nonblocking_write_is_short_or_eagain(rig: Rig, how: str, worker: bool) -> None:
    """A non-blocking write returns the bytes of what fits, or EAGAIN when nothing does."""
    s = rig.session("zero", depth=2)
    rig.sink.write_answer(rig.write(s, rig.zero(0)))
    if how == "attribute":
        rig.lib.dm_sess_set_nonblock(s.ptr, 1)
    nonblock = how == "O_NONBLOCK"
    u = rig.write(s, rig.zero([1, 2, 3]), nonblock=nonblock, worker=worker)
    assert rig.sink.write_answer(u)[1:3] == (0, REQ.size)
    u = rig.write(s, rig.zero(4), nonblock=nonblock, worker=worker)
    assert rig.sink.write_answer(u)[1:3] == (errno.EAGAIN, 0)
    assert not rig.zeroed(2) and not rig.zeroed(4)
    assert rig.sink.read_answer(rig.read(s, 2, nonblock=True)).ids == [0, 1]
    io = rig.io_stats()
    assert (io["parked_writes"], io["waiting_writes"]) == (0, 0)


def test_a_nonblocking_write_does_not_wait_behind_a_blocked_one(rig: Rig) -> None:
    """SPEC.md: a non-blocking write returns the short count, or EAGAIN - also while another
    caller's blocking write waits on the same session (a second open of the session's inode,
    as /dev/fd/N, has O_NONBLOCK of its own)."""
    s = rig.session("zero", depth=1)
    rig.sink.write_answer(rig.write(s, rig.zero(0)))
    blocked = rig.write(s, rig.zero(1))
    rig.until(lambda: rig.io_stats()["waiting_writes"] == 1, "the blocking write never waited")
    u = rig.write(s, rig.zero(2), nonblock=True)
    answer = rig.sink.write_answer(u, timeout=2.0)
    assert answer[1:3] == (errno.EAGAIN, 0)
    rig.sink.assert_unanswered(blocked, quiet=0)
    assert rig.sink.read_answer(rig.read(s, 1)).ids == [0]
    assert rig.sink.write_answer(blocked).nbytes == REQ.size


def bad_request(rig: Rig, kind: str) -> tuple[bytes, int]:
    """A request that fails validation, and its errno."""
    if kind == "iovec-array":
        return pack_req(UNMAPPED, 1, req_id=99), errno.EFAULT
    buf = rig.mem.buf(8)
    return pack_req(rig.mem.iovecs(whole(buf)), IOV_MAX + 1, req_id=99), errno.EINVAL


@pytest.mark.parametrize("kind", ["iovec-array", "iovcnt"])
@pytest.mark.parametrize("nonblock", [False, True])
@pytest.mark.parametrize("worker", [False, True], ids=["context", "worker"])
def test_an_invalid_request_after_valid_ones_is_a_short_write(rig: Rig, kind: str, nonblock: bool, worker: bool) -> None:
    """A request failing validation after valid ones ends the write with the bytes of those accepted."""
    s = rig.session("zero", depth=8)
    bad, _ = bad_request(rig, kind)
    u = rig.write(s, rig.zero([0, 1]) + bad + rig.zero(3), nonblock=nonblock, worker=worker)
    assert rig.sink.write_answer(u)[1:3] == (0, 2 * REQ.size)
    assert s.counts() == (2, 2)
    assert not rig.zeroed(3), "a request after the invalid one ran"
    assert rig.sink.read_answer(rig.read(s, 2)).ids == [0, 1]


@pytest.mark.parametrize("kind", ["iovec-array", "iovcnt"])
@pytest.mark.parametrize("nonblock", [False, True])
@pytest.mark.parametrize("worker", [False, True], ids=["context", "worker"])
def test_an_invalid_first_request_fails_the_write(rig: Rig, kind: str, nonblock: bool, worker: bool) -> None:
    """A request failing validation first fails the write with its errno (EFAULT, EINVAL)."""
    s = rig.session("zero", depth=8)
    bad, err = bad_request(rig, kind)
    u = rig.write(s, bad + rig.zero(1), nonblock=nonblock, worker=worker)
    assert rig.sink.write_answer(u)[1:3] == (err, 0)
    assert s.counts() == (0, 0)
    assert not rig.zeroed(1)
    assert rig.io_stats()["errors"] == 1


def test_an_invalid_request_met_after_waiting_for_room_is_a_short_write(rig: Rig) -> None:
    """A write that waited for room and then meets an invalid request returns what it accepted."""
    s = rig.session("zero", depth=1)
    bad, _ = bad_request(rig, "iovec-array")
    u = rig.write(s, rig.zero([0, 1]) + bad + rig.zero(3))
    rig.sink.assert_unanswered(u)
    assert rig.sink.read_answer(rig.read(s, 1)).ids == [0]
    rig.until(lambda: s.counts() == (1, 1), "the write did not go on")
    assert rig.sink.read_answer(rig.read(s, 1)).ids == [1]
    assert rig.sink.write_answer(u)[1:3] == (0, 2 * REQ.size)
    assert not rig.zeroed(3)
    assert s.counts() == (0, 0)


# --- poll ---------------------------------------------------------------------


def test_poll_events_follow_the_queue(rig: Rig) -> None:
    """POLLIN|POLLRDNORM when a response is ready, POLLOUT|POLLWRNORM when fewer than depth are outstanding."""
    s = rig.external(depth=2)
    assert rig.poll(s, 1) == EV_OUT
    rig.sink.write_answer(rig.write(s, rig.zero(0)))
    assert rig.poll(s, 1) == EV_OUT, "one outstanding, not ready, room for one more"
    rig.sink.write_answer(rig.write(s, rig.zero(1)))
    assert rig.poll(s, 1) == 0, "full and nothing ready"
    first, second = rig.take_external()
    rig.lib.dm_req_complete(first, 0, rig.ffi.NULL)
    assert rig.poll(s, 1) == EV_IN
    assert rig.sink.read_answer(rig.read(s, 1)).ids == [0]
    assert rig.poll(s, 1) == EV_OUT
    rig.lib.dm_req_complete(second, 0, rig.ffi.NULL)
    assert rig.poll(s, 1) == EV_IN | EV_OUT
    assert rig.waiting(s)[2] == 0, "a poll without notify keeps no handle"
    assert rig.sink.wakes() == []
    assert rig.io_stats()["polls"] == 6


def test_poll_notify_wakes_each_handle_once_when_the_events_may_change(rig: Rig) -> None:
    """A handle polled with notify is woken once on the next change (accept, completion, read), then forgotten."""
    s = rig.external(depth=2)
    assert rig.poll(s, 11, notify=True) == EV_OUT
    assert rig.poll(s, 11, notify=True) == EV_OUT
    assert rig.poll(s, 12, notify=True) == EV_OUT
    assert rig.waiting(s)[2] == 2, "a handle is kept once"
    # Accepting a request changes what a poll may see.
    rig.sink.write_answer(rig.write(s, rig.zero(0)))
    assert rig.sink.wait_wakes(2) == [11, 12]
    assert rig.waiting(s)[2] == 0
    rig.sink.write_answer(rig.write(s, rig.zero(1)))
    assert rig.poll(s, 13, notify=True) == 0
    # A completion.
    first, second = rig.take_external()
    rig.lib.dm_req_complete(first, 0, rig.ffi.NULL)
    assert rig.sink.wait_wakes(3) == [11, 12, 13]
    rig.lib.dm_req_complete(second, 0, rig.ffi.NULL)
    time.sleep(QUIET_S)
    assert rig.sink.wakes() == [11, 12, 13], "a handle is woken once, then forgotten"
    # A read that frees room.
    assert rig.poll(s, 14, notify=True) == EV_IN
    assert rig.sink.read_answer(rig.read(s, 1, nonblock=True)).ids == [0]
    assert rig.sink.wait_wakes(4) == [11, 12, 13, 14]
    # A completion on a worker.
    rig.sink.write_answer(rig.write(s, rig.zero(2)))
    assert rig.poll(s, 15, notify=True) == EV_IN
    (third,) = rig.take_external()
    rig.lib.dm_req_run(third)
    assert rig.sink.wait_wakes(5)[-1] == 15
    assert rig.sink.wake_threads()[-1] != threading.get_ident()
    assert len(rig.sink.wakes()) == 5
    rig.until(lambda: rig.io_stats()["poll_wakeups"] == 5, "poll wake-ups miscounted")
    assert rig.waiting(s)[2] == 0


def test_a_parked_read_and_a_poller_learn_of_the_same_completion(rig: Rig) -> None:
    """One completion on a worker answers a parked read and wakes every poller."""
    s = rig.external(depth=4)
    u = rig.read(s, 1)
    rig.sink.write_answer(rig.write(s, rig.zero(0)))
    assert rig.poll(s, 5, notify=True) == EV_OUT
    assert rig.poll(s, 6, notify=True) == EV_OUT
    (req,) = rig.take_external()
    rig.lib.dm_req_run(req)
    assert rig.sink.read_answer(u).ids == [0]
    assert rig.sink.wait_wakes(2) == [5, 6]
    assert rig.waiting(s) == (0, 0, 0)


# --- times ----------------------------------------------------------------------


def test_every_read_call_stamps_the_atime(rig: Rig) -> None:
    """Every read call moves the atime (EAGAIN, parked, answered, zero-length), and only the atime."""
    s = rig.session("zero", depth=2)
    stamps = []
    calls: list[Callable[[], int]] = [
        lambda: rig.read(s, 1, nonblock=True),  # EAGAIN
        lambda: rig.read(s, 1),  # parks
        lambda: rig.write(s, rig.zero([0, 1])),
        lambda: rig.read(s, 1),  # answered at once
        lambda: rig.read(s, 0),
    ]
    for call in calls:
        before = rig.times(s)
        time.sleep(0.002)
        start = time.time_ns()
        call()
        after = rig.times(s)
        stamps.append((before, start, after))
    for i in (0, 1, 3, 4):
        before, start, after = stamps[i]
        assert after[0] >= start, f"read call {i} left the atime"
        assert after[1:] == before[1:]
    before, start, after = stamps[2]
    assert after[0] == before[0], "a write moved the atime"


def test_every_write_call_stamps_the_mtime(rig: Rig) -> None:
    """Every write call moves the mtime (failing, accepted, EAGAIN, parked, zero-length), and only the mtime."""
    s = rig.session("zero", depth=1)
    calls: list[Callable[[], int]] = [
        lambda: rig.write(s, bad_request(rig, "iovec-array")[0]),  # EFAULT
        lambda: rig.write(s, bad_request(rig, "iovcnt")[0]),  # EINVAL
        lambda: rig.write(s, rig.zero(0)),  # accepted
        lambda: rig.write(s, rig.zero(1), nonblock=True),  # EAGAIN
        lambda: rig.write(s, rig.zero(2)),  # parks
        lambda: rig.write(s, b""),
    ]
    expected = [(errno.EFAULT, 0), (errno.EINVAL, 0), (0, REQ.size), (errno.EAGAIN, 0), None, (0, 0)]
    uniques = []
    for i, call in enumerate(calls):
        before = rig.times(s)
        time.sleep(0.002)
        start = time.time_ns()
        uniques.append(call())
        after = rig.times(s)
        assert after[1] >= start, f"write call {i} left the mtime"
        assert (after[0], after[2]) == (before[0], before[2])
    rig.sink.assert_unanswered(uniques[4], quiet=0)
    assert [rig.sink.write_answer(u)[1:3] for i, u in enumerate(uniques) if i != 4] == [e for e in expected if e is not None]


@pytest.mark.parametrize(
    "function, call, expected",
    [
        ("zero", "write-39", errno.EINVAL),
        ("zero", "read-15", errno.EINVAL),
        (None, "write", errno.ENXIO),
        (None, "read", errno.ENXIO),
    ],
)
def test_calls_refused_before_the_queue_is_looked_at_leave_the_times(
    rig: Rig, function: str | None, call: str, expected: int
) -> None:
    """NetBSD's dmio_read / dmio_write check the length, then the function, and only then stamp
    the time (SPEC.md defers to NetBSD where it is silent)."""
    s = rig.session(function, depth=2)
    before = rig.times(s)
    time.sleep(0.005)
    if call.startswith("write"):
        u = rig.write(s, b"\0" * 39 if call == "write-39" else rig.zero(0))
        assert rig.sink.write_answer(u)[1] == expected
    else:
        u = rig.read(s, nbytes=15 if call == "read-15" else RESP.size)
        assert rig.sink.read_answer(u)[1] == expected
    assert rig.times(s) == before


# --- shutdown -------------------------------------------------------------------


def test_shutdown_answers_every_parked_call_and_wakes_pollers(rig: Rig) -> None:
    """dm_core_shutdown answers every parked call (ENXIO, or what it has) and wakes pollers; from then on
    every call is ENXIO and every poll reports all events."""
    empty = rig.session("zero", depth=2)
    r_empty = rig.read(empty, 1)
    assert rig.poll(empty, 21, notify=True) == EV_OUT
    holding = rig.session("zero", depth=2)
    rig.sink.write_answer(rig.write(holding, rig.zero([0, 1])))
    r_holding = rig.read(holding, 3)
    assert holding.counts() == (0, 0), "the read holds two responses"
    some = rig.session("zero", depth=1)
    w_some = rig.write(some, rig.zero([10, 11, 12]))
    assert rig.poll(some, 22, notify=True) == EV_IN
    none = rig.session("zero", depth=1)
    rig.sink.write_answer(rig.write(none, rig.zero(20)))
    w_none = rig.write(none, rig.zero(21))
    rig.until(lambda: rig.io_stats()["waiting_writes"] == 2, "the writes never waited")
    rig.sink.assert_unanswered(r_empty, r_holding, w_some, w_none, quiet=0)

    rig.shutdown()
    assert rig.sink.read_answer(r_empty)[1:3] == (errno.ENXIO, b"")
    answer = rig.sink.read_answer(r_holding)
    assert (answer.err, answer.ids) == (0, [0, 1])
    assert rig.sink.write_answer(w_some)[1:3] == (0, REQ.size)
    assert rig.sink.write_answer(w_none)[1:3] == (errno.ENXIO, 0)
    assert sorted(rig.sink.wait_wakes(2)) == [21, 22]
    assert not rig.zeroed(11) and not rig.zeroed(21)
    for s in (empty, holding, some, none):
        assert rig.waiting(s) == (0, 0, 0)
    io = rig.io_stats()
    assert (io["waiting_reads"], io["waiting_writes"]) == (0, 0)

    # From now on: ENXIO for every call, every event for every poll, no handle kept.
    for nonblock in (False, True):
        assert rig.sink.read_answer(rig.read(some, 1, nonblock=nonblock))[1:3] == (errno.ENXIO, b"")
        assert rig.sink.write_answer(rig.write(empty, rig.zero(30), nonblock=nonblock))[1:3] == (errno.ENXIO, 0)
        assert rig.sink.write_answer(rig.write(empty, rig.zero(31), nonblock=nonblock, worker=True))[1:3] == (errno.ENXIO, 0)
    assert not rig.zeroed(30) and not rig.zeroed(31)
    for s in (empty, holding, some, none):
        assert rig.poll(s, 40, notify=True) == EV_ALL
        assert rig.waiting(s)[2] == 0
    assert some.counts() == (1, 1), "responses left in the queue are not handed out"


# --- interrupts -------------------------------------------------------------------


class Parked(NamedTuple):
    """Calls parked by parked_calls, and their sessions."""

    calls: dict[str, int]  # kind -> unique
    sessions: dict[str, Sess]  # kind -> the session it waits on


def parked_calls(rig: Rig, tid: int, writes: bool = True) -> Parked:
    """A read and a write of each kind, parked, all made by thread tid.

    read-empty holds nothing; read-holding holds responses 0 and 1 (it asks for 3 of a queue of
    2); write-some had request 10 accepted and waits to submit 11; write-none waits to submit 21
    (request 20 fills its queue).  A write acts on its writer's memory, where these requests
    point only for a thread of this process: for another process's thread, reads only."""
    sessions = {
        "read-empty": rig.session("zero", depth=2),
        "read-holding": rig.session("zero", depth=2),
        "write-some": rig.session("zero", depth=1),
        "write-none": rig.session("zero", depth=1),
    }
    calls = {}
    calls["read-empty"] = rig.read(sessions["read-empty"], 1, tid=tid)
    rig.sink.write_answer(rig.write(sessions["read-holding"], rig.zero([0, 1])))
    calls["read-holding"] = rig.read(sessions["read-holding"], 3, tid=tid)
    assert sessions["read-holding"].counts() == (0, 0)
    if writes:
        calls["write-some"] = rig.write(sessions["write-some"], rig.zero([10, 11]), tid=tid)
        rig.sink.write_answer(rig.write(sessions["write-none"], rig.zero(20)))
        calls["write-none"] = rig.write(sessions["write-none"], rig.zero(21), tid=tid)
        rig.until(lambda: rig.io_stats()["waiting_writes"] == 2, "the writes never waited")
    rig.sink.assert_unanswered(*calls.values(), quiet=0)
    return Parked(calls, sessions)


def assert_ended(rig: Rig, calls: dict[str, int], timeout: float = DEADLINE_S) -> None:
    """Each call ended with EINTR, or with what it already had."""
    assert rig.sink.read_answer(calls["read-empty"], timeout)[1:3] == (errno.EINTR, b"")
    answer = rig.sink.read_answer(calls["read-holding"], timeout)
    assert (answer.err, answer.ids) == (0, [0, 1])
    if "write-some" in calls:
        assert rig.sink.write_answer(calls["write-some"], timeout)[1:3] == (0, REQ.size)
        assert rig.sink.write_answer(calls["write-none"], timeout)[1:3] == (errno.EINTR, 0)
        assert rig.untouched(11) and rig.untouched(21)
    io = rig.io_stats()
    assert (io["waiting_reads"], io["waiting_writes"]) == (0, 0)


def test_an_interrupt_for_a_thread_that_is_gone_ends_the_call(rig: Rig) -> None:
    """An interrupt for a caller that no longer exists ends its call: EINTR, or what it has.

    The calls are made in the name of a thread of this process (writes act on the writer's
    memory, so their writer must be alive while they are submitted), which then exits."""
    done = threading.Event()
    writer = threading.Thread(target=done.wait, daemon=True)
    writer.start()
    calls, _ = parked_calls(rig, writer.native_id)
    done.set()
    writer.join(DEADLINE_S)
    assert not writer.is_alive()
    # The kernel's thread goes a moment after Python's join returns.
    rig.until(lambda: not os.path.exists(f"/proc/{writer.native_id}"), "the writer thread never went away")
    for u in calls.values():
        rig.interrupt(u)
    assert_ended(rig, calls, timeout=0)  # decided in the interrupt's own call
    io = rig.io_stats()
    assert (io["interrupts"], io["interrupts_eintr"], io["interrupts_ignored"]) == (4, 4, 0)


def test_an_interrupt_for_a_live_thread_with_no_signal_pending_keeps_waiting(rig: Rig) -> None:
    """An interrupt for a live caller with no handled or fatal signal pending leaves the call waiting, answered normally later."""
    calls, sessions = parked_calls(rig, threading.get_native_id())
    for u in calls.values():
        rig.interrupt(u)
    rig.sink.assert_unanswered(*calls.values(), quiet=RECHECK_QUIET_S)
    io = rig.io_stats()
    assert (io["interrupts"], io["interrupts_eintr"], io["interrupts_ignored"]) == (4, 0, 4)
    # Answered normally later.
    rig.sink.write_answer(rig.write(sessions["read-empty"], rig.zero(5)))
    assert rig.sink.read_answer(calls["read-empty"]).ids == [5]
    rig.sink.write_answer(rig.write(sessions["read-holding"], rig.zero(2)))
    assert rig.sink.read_answer(calls["read-holding"]).ids == [0, 1, 2]
    assert rig.sink.read_answer(rig.read(sessions["write-some"], 1)).ids == [10]
    assert rig.sink.write_answer(calls["write-some"])[1:3] == (0, 2 * REQ.size)
    assert rig.sink.read_answer(rig.read(sessions["write-none"], 1)).ids == [20]
    assert rig.sink.write_answer(calls["write-none"])[1:3] == (0, REQ.size)
    assert rig.zeroed(11) and rig.zeroed(21)


def test_an_interrupt_for_a_caught_signal_pending_on_a_stopped_process_is_eintr(rig: Rig, child: Child) -> None:
    """A stopped caller with a caught, unblocked signal pending: the call ends with EINTR (or what it has)."""
    child.stop()
    child.send_pending(signal.SIGUSR1)
    calls, _ = parked_calls(rig, child.pid, writes=False)
    for u in calls.values():
        rig.interrupt(u)
    assert_ended(rig, calls, timeout=0)
    io = rig.io_stats()
    assert (io["interrupts"], io["interrupts_eintr"], io["interrupts_ignored"]) == (len(calls),) * 2 + (0,)


def test_an_interrupt_for_a_stop_keeps_waiting_until_a_caught_signal_comes(rig: Rig, child: Child) -> None:
    """SIGSTOP runs no handler: the call goes on waiting.  A caught signal later (no second
    FUSE_INTERRUPT comes for it) still ends the call within a second."""
    child.stop()
    calls, _ = parked_calls(rig, child.pid, writes=False)
    for u in calls.values():
        rig.interrupt(u)
    rig.sink.assert_unanswered(*calls.values(), quiet=RECHECK_QUIET_S)
    assert rig.io_stats()["interrupts_ignored"] == len(calls)
    child.send_pending(signal.SIGUSR1)
    assert_ended(rig, calls, timeout=SIGNAL_S)


def test_an_interrupt_for_a_blocked_caught_signal_keeps_waiting(rig: Rig, child: Child) -> None:
    """A caught signal the caller blocks runs no handler: the call goes on waiting."""
    child.send_pending(signal.SIGUSR2)  # the child blocks it: pending, no handler runs
    calls, _ = parked_calls(rig, child.pid, writes=False)
    for u in calls.values():
        rig.interrupt(u)
    rig.sink.assert_unanswered(*calls.values(), quiet=RECHECK_QUIET_S)
    assert rig.io_stats()["interrupts_ignored"] == len(calls)


def test_a_waiting_call_of_a_process_that_dies_later_ends(rig: Rig, child: Child) -> None:
    """A call left waiting after an interrupt ends within a second once its caller is gone."""
    calls, _ = parked_calls(rig, child.pid, writes=False)
    for u in calls.values():
        rig.interrupt(u)
    rig.sink.assert_unanswered(*calls.values(), quiet=RECHECK_QUIET_S)
    child.kill()
    assert_ended(rig, calls, timeout=SIGNAL_S)


def test_an_interrupt_for_an_unknown_request_does_nothing(rig: Rig) -> None:
    """An interrupt for a request that is not a live call (unknown, or answered) changes nothing."""
    s = rig.session("zero", depth=1)
    tid = gone_tid()
    r = rig.read(s, 1, tid=tid)
    answered = rig.read(rig.session("zero"), 0, tid=tid)
    rig.sink.read_answer(answered)
    for unique in (r + 1000, answered, 0):
        rig.interrupt(unique)
    rig.sink.assert_unanswered(r)
    io = rig.io_stats()
    assert (io["interrupts"], io["interrupts_eintr"], io["interrupts_ignored"]) == (0, 0, 0)
    assert len(rig.sink.answers(answered)) == 1
    rig.sink.write_answer(rig.write(s, rig.zero(0)))
    assert rig.sink.read_answer(r).ids == [0]
    rig.interrupt(r)  # answered already
    assert rig.io_stats()["interrupts"] == 0


# --- close --------------------------------------------------------------------------


def test_close_answers_parked_calls_and_frees_everything(rig: Rig) -> None:
    """Closing sessions answers their parked calls (ENXIO, or what they have) and leaves nothing held."""
    calls, _ = parked_calls(rig, threading.get_native_id())
    busy = rig.session("zero", depth=4)
    r_busy = rig.read(busy, 4)
    rig.sink.write_answer(rig.write(busy, rig.zero(range(30, 33), 4 << 20)))  # on workers
    assert rig.poll(busy, 9, notify=True) & EV_OUT
    for s in list(rig.core.sessions):
        s.close()
    assert rig.sink.read_answer(calls["read-empty"])[1:3] == (errno.ENXIO, b"")
    answer = rig.sink.read_answer(calls["read-holding"])
    assert (answer.err, answer.ids) == (0, [0, 1])
    assert rig.sink.write_answer(calls["write-some"])[1:3] == (0, REQ.size)
    assert rig.sink.write_answer(calls["write-none"])[1:3] == (errno.ENXIO, 0)
    assert rig.sink.read_answer(r_busy)[1:3] == (errno.ENXIO, b""), "three of the four it asks for: it holds none"
    assert rig.untouched(11) and rig.untouched(21)
    rig.wait_idle()
    _, funcs = rig.core.stats()
    assert funcs["zero"]["submitted"] == funcs["zero"]["completed"] + funcs["zero"]["failed"]


@pytest.mark.parametrize("how", ["shutdown", "close"])
def test_a_write_waiting_for_a_busy_worker_ends_with_enxio(make_rig: Callable[..., Rig], how: str) -> None:
    """A write queued for a worker (the only one is busy) when the server shuts down or its
    session closes: answered ENXIO, none of its requests run, nothing left held."""
    rig = make_rig(workers=1)
    busy, s = rig.session("zero"), rig.session("zero")
    w_busy = rig.write(busy, rig.zero(0), worker=True, hold=True)
    release = rig.sink.hold_write(w_busy)
    rig.sink.write_answer(w_busy)  # the worker is now in the answer's callback
    u = rig.write(s, rig.zero(1), worker=True)
    assert rig.waiting(s) == (0, 1, 0)
    if how == "shutdown":
        rig.shutdown()
    else:
        s.close()
    release.set()
    assert rig.sink.write_answer(u)[1:3] == (errno.ENXIO, 0)
    time.sleep(QUIET_S)
    assert rig.untouched(1), f"a request of the write ran after the {how}"
    if how == "shutdown":
        rig.until(lambda: rig.waiting(s) == (0, 0, 0), "the write stayed queued")
    else:
        assert rig.sink.read_answer(rig.read(busy, 1)).ids == [0]
        rig.wait_idle()
