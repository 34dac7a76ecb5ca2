"""How a session's reads and writes are received, decided, parked and answered.

What SPEC.md promises whatever carries the requests: the file's current
O_NONBLOCK (set with fcntl, no preload shim) decides every read and write;
a blocked read or write goes on waiting through signals that run no
handler, ends with EINTR for a caught one and lets a killed client go; and
nothing one client does stalls another - client memory backed by a FUSE
file (the mount's own ``stats``, or a slow mount of the test's own), or
thousands of threads blocked on one session. The clients are the C (and
Python) programs of tests/programs, each a real process reporting what its
calls returned; every wait has a deadline, and a mount that stops answering
is aborted through fusectl (:class:`programs.Rescue`) so the run never hangs.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import Server
from dmio import RESP, collect, errno_of, open_session, raw_request, request, stats, submit, wait_for, whole
from dmoverfs import mounting
from programs import (
    FUSE_WAIT,
    Builder,
    Child,
    Rescue,
    asleep_in,
    interrupted_after,
    mount_device,
    proc_state,
    python_program,
    tree_thread_count,
    wait_blocked_in_fuse,
    wait_threads,
)

#: SPEC.md's deadlines: a killed client is gone, an interrupted call returns, within a second.
DEADLINE_S = 1.0
#: A call that must not wait ("EAGAIN at once") returns within this.
AT_ONCE_MS = 1000
#: How long a blocked call must go on waiting after a signal to count as still waiting.
QUIET_S = 0.5
#: Each step of another client (an open, an xattr, a 4 KiB or 1 MiB round trip, reading stats).
STEP_S = 0.5
#: A request whose input is a mapping of the mount's own file completes within this.
MAPPED_S = 10.0
#: `dmoverfs unmount` finishes within this, whatever a client's memory is backed by.
UNMOUNT_S = 15.0
SHALLOW_DEPTH = 2
#: The default queue depth (DMIO_NREQS_MAX).
DEFAULT_DEPTH = 64
#: The server's threads (all its processes') stay fewer than this however many clients wait.
SERVER_THREADS = 64
#: A process with thousands of threads blocked on a session is reaped within this after SIGKILL.
REAP_S = 5.0


@pytest.fixture(scope="module")
def shallow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server shared by the signal tests, whose sessions fill up after two requests."""
    srv = Server(tmp_path_factory.mktemp("shallow") / "mnt", ["--queue-depth", str(SHALLOW_DEPTH)]).start()
    yield srv
    srv.stop()
    srv.check_log()


@pytest.fixture
def shallow(shallow_server: Server, rescue: Rescue) -> Path:
    mnt = shallow_server.mountpoint
    rescue.watch(mnt, probe=mnt / "stats")
    return mnt


def watched(rescue: Rescue, srv: Server) -> Path:
    rescue.watch(srv.mountpoint, probe=srv.mountpoint / "stats")
    return srv.mountpoint


def fields(line: str) -> list[str]:
    return line.split()


# -- O_NONBLOCK without the preload shim --------------------------------------------------------


def nonblock_command(programs: Builder, language: str) -> list[str]:
    return [str(programs("nonblock"))] if language == "c" else python_program("nonblock")


@pytest.mark.parametrize("language", ["c", "python"])
@pytest.mark.parametrize(
    "mode",
    [
        "fcntl",  # a blocking open, then fcntl(F_SETFL, O_NONBLOCK) / os.set_blocking(fd, False)
        "open",  # O_NONBLOCK at open, cleared later with fcntl / os.set_blocking(fd, True)
    ],
)
def test_o_nonblock_set_and_cleared_with_fcntl_is_honoured(programs, rescue, server_factory, language, mode):
    depth = 4
    mnt = watched(rescue, server_factory("--queue-depth", str(depth)))
    child = rescue.spawn([*nonblock_command(programs, language), mnt / "dmoverio", str(depth), mode])
    child.expect("read-blocks", 30)
    steps = {fields(line)[0]: fields(line)[1:] for line in child.seen if line != "flags-cleared"}
    transcript = "\n".join(child.seen)
    # Non-blocking: nothing ready is EAGAIN, a full queue takes what fits, then EAGAIN; all at once.
    assert [steps[s][:2] for s in ("read", "write", "write-full", "read-ready")] == [
        ["-1", "EAGAIN"],
        [str(depth * 40), "0"],
        ["-1", "EAGAIN"],
        [str(depth * 16), "0"],
    ], transcript
    assert all(int(steps[s][2]) < AT_ONCE_MS for s in ("read", "write", "write-full", "read-ready")), transcript
    # Blocking again: the read waits (still blocked 300 ms after it slept in FUSE) for the request written meanwhile.
    ret, err, _ms, got, waited = steps["read-blocks"]
    assert (ret, err, got, waited) == ("16", "0", "id=999", "waited=1"), transcript
    assert child.reap(10) and child.proc.returncode == 0, child.describe()


# -- signals ----------------------------------------------------------------------------------

#: Signals that run no handler, as the blocked client gets them: extra blocker options, signals sent.
NO_HANDLER: dict[str, tuple[list[str], list[int]]] = {
    "SIGSTOP-SIGCONT": ([], [signal.SIGSTOP, signal.SIGCONT]),
    "SIGCHLD-ignored": (["-I", str(int(signal.SIGCHLD))], [signal.SIGCHLD]),
    "SIGCHLD-default": ([], [signal.SIGCHLD]),
    "SIGWINCH-default": ([], [signal.SIGWINCH]),
}


def blocked_reader(programs: Builder, rescue: Rescue, mnt: Path, extra: list[str]) -> tuple[Child, int]:
    """A child blocked in read() of one response on a session the test opened (and can write to)."""
    fd = rescue.own(open_session(mnt, "zero"))
    child = rescue.spawn([programs("blocker"), "-f", str(fd), *extra, "read", "1"], pass_fds=[fd])
    child.expect("ready", 10)
    wait_blocked_in_fuse(child)
    return child, fd


def blocked_writer(programs: Builder, rescue: Rescue, mnt: Path, extra: list[str], prefill: int, count: int) -> tuple[Child, int]:
    """A child blocked in write() on a full queue of a session it opened; the test attaches to the
    same session through /proc/PID/fd/N (to read responses and so make room)."""
    child = rescue.spawn([programs("blocker"), "-o", str(mnt / "func" / "zero"), "-p", str(prefill), *extra, "write", str(count)])
    child_fd = int(fields(child.expect("fd ", 10))[1])
    attached = rescue.own(os.open(f"/proc/{child.pid}/fd/{child_fd}", os.O_RDWR | os.O_CLOEXEC))
    if prefill:
        assert fields(child.expect("prefilled", 10))[1:] == [str(40 * prefill), "0"], child.describe()
    child.expect("ready", 10)
    wait_blocked_in_fuse(child)
    return child, attached


def deliver(child: Child, signals: list[int]) -> None:
    """Send *signals* in order. After SIGSTOP, wait a while for the child to stop: it can stop only if
    its call returned to user space (which the caller then sees), else it stays in the kernel."""
    for signum in signals:
        child.signal(signum)
        if signum == signal.SIGSTOP:
            deadline = time.monotonic() + QUIET_S
            while not proc_state(child.pid).startswith("T") and time.monotonic() < deadline:
                time.sleep(0.01)


def assert_still_waiting(child: Child, what: str) -> None:
    line = child.line(QUIET_S)
    assert line is None, f"the blocked call returned after {what}: {line!r}\n{child.describe()}"
    wait_blocked_in_fuse(child, timeout=1.0)


@pytest.mark.parametrize("kind", list(NO_HANDLER))
def test_a_signal_running_no_handler_does_not_end_a_blocked_read(programs, rescue, shallow, kind):
    extra, signals = NO_HANDLER[kind]
    child, fd = blocked_reader(programs, rescue, shallow, extra)
    deliver(child, signals)
    assert_still_waiting(child, kind)
    out = np.ones(64, np.uint8)
    assert submit(fd, request(5, out=whole(out))) == 40
    result = fields(child.expect("result", 10))
    assert result[1:3] == ["16", "0"], child.describe()
    assert child.expect("resp", 10) == "resp 5 0"
    assert not out.any()


@pytest.mark.parametrize("kind", list(NO_HANDLER))
def test_a_signal_running_no_handler_does_not_end_a_blocked_write(programs, rescue, shallow, kind):
    extra, signals = NO_HANDLER[kind]
    child, attached = blocked_writer(programs, rescue, shallow, extra, prefill=SHALLOW_DEPTH, count=1)
    deliver(child, signals)
    assert_still_waiting(child, kind)
    # Reading one response makes room: the write goes through.
    assert len(collect(attached, 1)) == 1
    result = fields(child.expect("result", 10))
    assert result[1:3] == ["40", "0"], child.describe()
    assert child.reap(10)
    assert sorted(r.req_id for r in collect(attached, SHALLOW_DEPTH)) in ([1, 100], [2, 100])


@pytest.mark.parametrize("kind", list(NO_HANDLER))
@pytest.mark.parametrize("op", ["read", "write"])
def test_sigkill_after_a_signal_running_no_handler_still_ends_a_blocked_client(programs, rescue, shallow, op, kind):
    extra, signals = NO_HANDLER[kind]
    if op == "read":
        child, _ = blocked_reader(programs, rescue, shallow, extra)
    else:
        child, _ = blocked_writer(programs, rescue, shallow, extra, prefill=SHALLOW_DEPTH, count=1)
    deliver(child, signals)
    assert_still_waiting(child, kind)
    # The kernel sends one FUSE_INTERRUPT per call (for SIGSTOP here); the server must still notice SIGKILL.
    took = child.kill(timeout=10.0)
    assert took is not None, f"the client is not gone 10 s after SIGKILL ({proc_state(child.pid)})"
    assert took < DEADLINE_S, f"the client took {took:.2f} s to go after SIGKILL"
    assert child.proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("handler", ["restart", "norestart"])  # SA_RESTART or not: FUSE cannot restart a call
@pytest.mark.parametrize(
    "case, prefill, count, expected",
    [
        ("read", 0, 1, ["-1", "EINTR"]),
        ("write-nothing-accepted", SHALLOW_DEPTH, 1, ["-1", "EINTR"]),
        ("write-some-accepted", 0, SHALLOW_DEPTH + 1, [str(40 * SHALLOW_DEPTH), "0"]),
    ],
    ids=["read", "write-nothing-accepted", "write-some-accepted"],
)
def test_a_caught_signal_ends_a_blocked_call_within_a_second(programs, rescue, shallow, handler, case, prefill, count, expected):
    extra = ["-H", handler]
    if case == "read":
        child, _ = blocked_reader(programs, rescue, shallow, extra)
    else:
        child, _ = blocked_writer(programs, rescue, shallow, extra, prefill=prefill, count=count)
    start = time.monotonic()
    child.signal(signal.SIGUSR1)
    line = child.wait_for("result", 10)
    took = time.monotonic() - start
    assert line is not None, f"SIGUSR1 did not end the blocked call\n{child.describe()}"
    result = fields(line)
    # A write that had accepted requests returns their bytes instead of EINTR.
    assert result[1:3] == expected, child.describe()
    assert result[4] == "caught=1"
    assert took < DEADLINE_S, f"the interrupted call returned after {took:.2f} s"


# -- client memory backed by FUSE files ---------------------------------------------------------


def check_prober(prober: Child, rounds: int) -> None:
    """Every step of every round done, each within STEP_S."""
    steps = [fields(line) for line in prober.seen if line != "done"]
    names = ["open", "setxattr", "copy4k", "copy1m", "stats"]
    assert [s[:2] for s in steps] == [[n, str(r)] for r in range(rounds) for n in names], prober.describe()
    slow = [" ".join(s) for s in steps if int(s[2]) > STEP_S * 1e6]
    assert not slow, f"steps of another client slower than {STEP_S} s (microseconds): {slow}"


def run_prober(programs: Builder, rescue: Rescue, mnt: Path, rounds: int, timeout: float) -> Child | None:
    """Another client's rounds on *mnt*; the prober once done, or None if it was not within *timeout*."""
    prober = rescue.spawn([programs("prober"), mnt, str(rounds)])
    return prober if prober.wait_for("done", timeout) is not None else None


def cli_unmount(rescue: Rescue, mnt: Path, timeout: float = UNMOUNT_S) -> float:
    """`dmoverfs unmount MNT`; fails unless it succeeds within *timeout* with the mount gone."""
    start = time.monotonic()
    cli = rescue.spawn([sys.executable, "-m", "dmoverfs", "unmount", str(mnt)])
    finished = cli.reap(timeout)
    took = time.monotonic() - start
    if not finished:
        evidence = cli.describe()
        rescue.abort(mnt)
        pytest.fail(f"dmoverfs unmount did not finish within {timeout} s (mount aborted)\n{evidence}")
    assert cli.proc.returncode == 0, cli.describe()
    assert not mounting.is_mounted(mnt)
    return took


@pytest.mark.parametrize("size", [4096, 1 << 20], ids=["4KiB", "1MiB"])
def test_input_mapped_from_the_mounts_own_stats_file(programs, rescue, server_factory, size):
    srv = server_factory()
    mnt = watched(rescue, srv)
    # The input is the first page of a private mapping of `stats` (one iovec, or 256 of the same page).
    client = rescue.spawn([programs("mapped"), mnt / "func" / "copy", mnt / "stats", str(size), "4096"])
    client.expect("ready", 10)
    prober = rescue.spawn([programs("prober"), mnt, "2"])
    deadline = time.monotonic() + MAPPED_S
    responded = client.wait_for("resp", MAPPED_S)
    probed = prober.wait_for("done", max(1.0, deadline - time.monotonic()) if responded is None else MAPPED_S)
    if responded is None or probed is None:
        evidence = f"copying client:\n{client.describe()}\nother client:\n{prober.describe()}"
        rescue.abort(mnt)
        pytest.fail(
            f"with a copy from a mapping of the mount's own stats file outstanding, within {MAPPED_S} s "
            f"the copy {'completed' if responded else 'did not complete'} and another client "
            f"{'finished' if probed else 'did not finish'} (mount aborted)\n{evidence}"
        )
    assert [fields(line)[:3] for line in client.seen if line.startswith("write")] == [["write", "40", "0"]], client.describe()
    assert fields(responded)[1:3] == ["7", "0"], client.describe()
    # The output is what the client itself reads from the mapping: the beginning of stats.
    assert client.expect("equal", 10)
    assert fields(client.expect("head", 10))[1].startswith("7b"), client.describe()  # "{"
    check_prober(prober, 2)
    assert srv.running()
    assert run_prober(programs, rescue, mnt, 1, MAPPED_S) is not None, "the mount stopped answering"
    cli_unmount(rescue, mnt)
    assert srv.proc.wait(10) == 0


class SlowFS:
    """A FUSE file system of the test's own (tests/programs/slowfs.py) whose reads wait until released."""

    SIZE = 1 << 20
    MAX_WAIT_S = 30

    def __init__(self, rescue: Rescue, mountpoint: Path) -> None:
        mountpoint.mkdir()
        self.mountpoint = mountpoint
        self.child = rescue.spawn([*python_program("slowfs"), mountpoint, str(self.SIZE), str(self.MAX_WAIT_S)])
        self.child.expect("ready", 30)
        rescue.watch(mountpoint)
        self.file = mountpoint / "slow"

    def release(self) -> None:
        if self.child.proc.poll() is None:
            self.child.signal(signal.SIGUSR1)

    def stop(self) -> None:
        self.release()
        if self.child.proc.poll() is None:
            self.child.signal(signal.SIGTERM)
        if not self.child.reap(10):
            self.child.kill(10)
        if mount_device(self.mountpoint) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True, timeout=30)


@pytest.fixture
def slowfs(rescue: Rescue, tmp_path: Path) -> Iterator[SlowFS]:
    fs = SlowFS(rescue, tmp_path / "slowfs")
    try:
        yield fs
    finally:
        fs.stop()


@pytest.mark.parametrize(
    "size, workers",
    [(4096, None), (1 << 20, None), (1 << 20, 1)],
    ids=["4KiB", "1MiB", "1MiB-on-the-only-worker"],
)
def test_input_on_a_slow_fuse_mount_delays_only_its_own_request(programs, rescue, server_factory, slowfs, size, workers):
    """With one worker, the stuck request holds it: the server must start another for the other client."""
    srv = server_factory(*(["--workers", str(workers)] if workers else []))
    mnt = watched(rescue, srv)
    client = rescue.spawn([programs("mapped"), mnt / "func" / "copy", slowfs.file, str(size), str(size)])
    client.expect("ready", 10)
    # The server touched the mapping: the slow file system got the READ, and will not answer it.
    slowfs.child.expect("read ", 10)

    prober = run_prober(programs, rescue, mnt, 2, 10.0)
    if prober is None:
        evidence = rescue.children[-1].describe()
        slowfs.release()
        pytest.fail(f"another client was not served in 10 s while a request waited on a slow FUSE file:\n{evidence}")
    check_prober(prober, 2)
    # The copy itself is still waiting (in its write or its read: where it runs is the server's choice).
    while client.line(0.1) is not None:
        pass
    assert [fields(line)[:3] for line in client.seen[1:]] in ([], [["write", "40", "0"]]), client.describe()

    took = client.kill(timeout=10.0)
    assert took is not None, f"the client is not gone 10 s after SIGKILL ({proc_state(client.pid)})"
    assert took < DEADLINE_S, f"the client took {took:.2f} s to go after SIGKILL"

    cli_unmount(rescue, mnt)
    # Released, the slow file system answers; then everything goes: the server, the slow mount, its server.
    slowfs.release()
    assert srv.proc.wait(SlowFS.MAX_WAIT_S) == 0
    slowfs.stop()
    assert mount_device(slowfs.mountpoint) is None
    assert slowfs.child.proc.returncode == 0, slowfs.child.describe()


# -- many threads blocked on one session -------------------------------------------------------


def asleep_but_paused(wchan: str) -> bool:
    """Asleep in the kernel anywhere but pause() (a write waits in FUSE, or for the file's lock)."""
    return wchan not in ("", "0") and not wchan.startswith("__do_sys_pause")


def spare_tasks() -> int:
    """How many more threads this machine can run (pid_max, threads-max)."""
    limit = min(int(Path(f"/proc/sys/kernel/{name}").read_text()) for name in ("pid_max", "threads-max"))
    in_use = int(Path("/proc/loadavg").read_text().split()[3].split("/")[1])
    return limit - in_use


def asleep_polling(wchan: str) -> bool:
    """Asleep in poll() itself (poll_schedule_timeout), past the FUSE_POLL request."""
    return "poll" in wchan


@pytest.mark.parametrize(
    "op, threads, asleep",
    [
        ("read", 10_000, asleep_in(FUSE_WAIT)),
        ("write", 3_000, asleep_but_paused),
        ("poll", 3_000, asleep_polling),
    ],
    ids=["read", "write", "poll"],
)
def test_threads_blocked_on_one_session_cost_the_server_nothing(programs, rescue, server_factory, op, threads, asleep):
    spare = spare_tasks()
    assert spare > threads + 1000, f"this machine has room for {spare} more threads; the test needs {threads}"
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    assert os.geteuid() == 0 or nproc == resource.RLIM_INFINITY or nproc > threads + 1000, (
        f"RLIMIT_NPROC's hard limit ({nproc}) leaves no room for {threads} threads (ulimit -Hu)"
    )
    srv = server_factory()
    mnt = watched(rescue, srv)
    baseline = tree_thread_count(srv.pid)
    # Writers wait for room: the default queue depth (64 = DMIO_NREQS_MAX) is written first.
    swarm = rescue.spawn([programs("swarm"), mnt / "func" / "zero", op, str(threads), str(DEFAULT_DEPTH if op == "write" else 0)])
    swarm.expect("fd ", 10)
    if op == "write":
        assert fields(swarm.expect("prefilled", 10))[1:] == [str(40 * DEFAULT_DEPTH), "0"], swarm.describe()
    assert swarm.expect("started", 120) == f"started {threads}", swarm.describe()
    blocked = wait_threads(swarm.pid, asleep, threads, 60)
    assert blocked >= threads, f"only {blocked} of {threads} threads are blocked\n{swarm.describe()}"

    prober = run_prober(programs, rescue, mnt, 3, 10.0)
    if prober is None:
        evidence = rescue.children[-1].describe()
        rescue.abort(mnt)
        pytest.fail(f"{threads} threads blocked in {op}() on one session: another client was not served in 10 s\n{evidence}")
    check_prober(prober, 3)
    running = tree_thread_count(srv.pid)
    assert running < SERVER_THREADS, f"the server runs {running} threads (it ran {baseline} before)"
    assert swarm.line(0) is None, f"a blocked call returned: {swarm.describe()}"

    took = swarm.kill(timeout=20.0)
    if took is None:
        state = proc_state(swarm.pid)
        rescue.abort(mnt)
        pytest.fail(f"the process with {threads} blocked threads was not gone 20 s after SIGKILL ({state}; mount aborted)")
    assert took < REAP_S, f"the process with {threads} blocked threads took {took:.1f} s to go after SIGKILL"
    prober = run_prober(programs, rescue, mnt, 1, 10.0)
    assert prober is not None, "the mount no longer answers"
    check_prober(prober, 1)
    assert wait_for(lambda: stats(mnt)["sessions"]["open"] == 0), stats(mnt)["sessions"]


# -- times, as NetBSD updates them --------------------------------------------------------------

#: Tolerance for a server stamping times with a coarse clock (NetBSD's getnanotime is one).
CLOCK_SLACK_NS = 10_000_000
UNMAPPED = 0x1000


def _before_call(fd: int) -> tuple[os.stat_result, int]:
    """The session's times, then a moment clearly later than them to compare new stamps with."""
    before = os.fstat(fd)
    time.sleep(5 * CLOCK_SLACK_NS / 1e9)
    return before, time.time_ns() - CLOCK_SLACK_NS


def test_a_nonblocking_read_answered_eagain_updates_atime(shallow):
    fd = open_session(shallow, "zero", os.O_RDWR | os.O_NONBLOCK)
    try:
        before, start = _before_call(fd)
        with interrupted_after(AT_ONCE_MS / 1000, "a non-blocking read"):
            assert errno_of(os.read, fd, RESP.size) == errno.EAGAIN
        after = os.fstat(fd)
    finally:
        os.close(fd)
    assert after.st_atime_ns >= start, "st_atime was not updated by a read answered EAGAIN"
    assert after.st_mtime_ns == before.st_mtime_ns


def test_a_nonblocking_write_answered_eagain_updates_mtime(shallow):
    fd = open_session(shallow, "zero", os.O_RDWR | os.O_NONBLOCK)
    bufs = [np.ones(64, np.uint8) for _ in range(SHALLOW_DEPTH + 1)]
    try:
        assert submit(fd, *[request(i, out=whole(b)) for i, b in enumerate(bufs[:-1])]) == 40 * SHALLOW_DEPTH
        before, start = _before_call(fd)
        with interrupted_after(AT_ONCE_MS / 1000, "a non-blocking write"):
            assert errno_of(submit, fd, request(9, out=whole(bufs[-1]))) == errno.EAGAIN
        after = os.fstat(fd)
        collect(fd, SHALLOW_DEPTH)
    finally:
        os.close(fd)
    assert after.st_mtime_ns >= start, "st_mtime was not updated by a write answered EAGAIN"
    assert after.st_atime_ns == before.st_atime_ns


@pytest.mark.parametrize(
    "data, expected",
    [
        (raw_request(UNMAPPED, 1025, req_id=1), errno.EINVAL),  # iovcnt over IOV_MAX
        (raw_request(UNMAPPED, 1, req_id=1), errno.EFAULT),  # an iovec array that cannot be read
    ],
    ids=["EINVAL-iovcnt", "EFAULT-iovec-array"],
)
def test_a_write_failing_on_a_request_updates_mtime(shallow, data, expected):
    fd = open_session(shallow, "zero")
    try:
        before, start = _before_call(fd)
        assert errno_of(os.write, fd, data) == expected
        after = os.fstat(fd)
    finally:
        os.close(fd)
    assert after.st_mtime_ns >= start, f"st_mtime was not updated by a write failing with {errno.errorcode[expected]}"
    assert after.st_atime_ns == before.st_atime_ns


@pytest.mark.parametrize(
    "function, call, expected",
    [
        # NetBSD checks the length and the function before it stamps the time.
        ("zero", lambda fd: os.write(fd, b"\0" * 39), errno.EINVAL),
        ("zero", lambda fd: os.read(fd, 15), errno.EINVAL),
        (None, lambda fd: os.write(fd, raw_request(UNMAPPED, 1)), errno.ENXIO),
        (None, lambda fd: os.read(fd, 16), errno.ENXIO),
    ],
    ids=["write-partial-request", "read-partial-response", "write-no-function", "read-no-function"],
)
def test_calls_refused_before_the_queue_is_looked_at_leave_the_times(shallow, function, call, expected):
    fd = open_session(shallow, function, os.O_RDWR | os.O_NONBLOCK)
    try:
        before, _ = _before_call(fd)
        with interrupted_after(AT_ONCE_MS / 1000, "a refused call"):
            assert errno_of(call, fd) == expected
        after = os.fstat(fd)
    finally:
        os.close(fd)
    assert (after.st_atime_ns, after.st_mtime_ns) == (before.st_atime_ns, before.st_mtime_ns)
