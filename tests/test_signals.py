"""Signals and dying clients: never stuck, nothing lost, nothing leaked.

Each client is a real child process blocked in a real read() or write() on a
session; the test waits until the kernel shows it waiting inside FUSE, then
sends a real signal.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dmio import stats

TESTS = Path(__file__).resolve().parent
#: The deadlines of SPEC.md: a killed client is gone, an interrupted call returns, within a second.
DEADLINE_S = 1.0

PRELUDE = """
import errno, os, signal, sys, time
sys.path.insert(0, {tests!r})
import numpy as np
from dmio import *
from pathlib import Path
mnt = Path({mnt!r})
caught = []
signal.signal(signal.SIGUSR1, lambda *a: caught.append(1))
def say(text):
    print(text, flush=True)
# libc's read and write, as a C program calls them: Python's os.read would retry after EINTR.
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
def c_read(fd, n):
    buf = ctypes.create_string_buffer(n)
    got = libc.read(fd, buf, n)
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return buf.raw[:got]
def c_write(fd, data):
    done = libc.write(fd, data, len(data))
    if done < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return done
"""


def client(mnt: Path, body: str) -> subprocess.Popen:
    code = PRELUDE.format(tests=str(TESTS), mnt=str(mnt)) + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_line(proc: subprocess.Popen, expected: str) -> None:
    line = proc.stdout.readline().strip()
    assert line == expected, f"client said {line!r}; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"


def wait_blocked_in_fuse(pid: int, timeout: float = 10.0) -> None:
    """Until some thread of *pid* sleeps waiting for a FUSE answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                if (task / "wchan").read_text() == "request_wait_answer":
                    return
            except FileNotFoundError:
                pass
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never blocked in a FUSE request")


def settled(mnt: Path, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        now = stats(mnt)
        idle = now["sessions"]["open"] == 0 and now["requests"]["outstanding"] == 0 and now["requests"]["in_flight"] == 0
        if idle or time.monotonic() > deadline:
            return now
        time.sleep(0.02)


@pytest.fixture
def shallow(server_factory):
    """A mount whose sessions fill up after two requests."""
    return server_factory("--queue-depth", "2").mountpoint


def test_sigkill_frees_a_client_blocked_in_read(shallow):
    proc = client(
        shallow,
        """
        fd = open_session(mnt, "zero")
        say("blocking")
        os.read(fd, 16)
        say("returned")
    """,
    )
    wait_line(proc, "blocking")
    wait_blocked_in_fuse(proc.pid)
    start = time.monotonic()
    proc.kill()
    proc.wait(timeout=10)
    assert time.monotonic() - start < DEADLINE_S
    assert proc.returncode == -signal.SIGKILL
    assert settled(shallow)["sessions"]["open"] == 0


def test_sigkill_frees_a_client_blocked_in_write(shallow):
    proc = client(
        shallow,
        """
        fd = open_session(mnt, "zero")
        bufs = [np.ones(8, np.uint8) for _ in range(3)]
        reqs = [request(i, out=whole(b)) for i, b in enumerate(bufs)]
        say("blocking")
        submit(fd, *reqs)   # the third request waits for room that never comes
        say("returned")
    """,
    )
    wait_line(proc, "blocking")
    wait_blocked_in_fuse(proc.pid)
    start = time.monotonic()
    proc.kill()
    proc.wait(timeout=10)
    assert time.monotonic() - start < DEADLINE_S
    after = settled(shallow)
    assert after["sessions"]["open"] == 0 and after["requests"]["outstanding"] == 0


def test_caught_signal_interrupts_a_blocked_read_and_loses_nothing(shallow):
    proc = client(
        shallow,
        """
        fd = open_session(mnt, "zero")
        buf = np.ones(8, np.uint8)
        submit(fd, request(7, out=whole(buf)))       # completes at once: one response ready
        say("blocking")
        try:
            c_read(fd, 32)                           # asks for two: blocks
            say("no error")
        except OSError as exc:
            say(f"{errno.errorcode[exc.errno]} caught={len(caught)}")
        say(f"then {[r.req_id for r in parse(os.read(fd, 16))]}")
    """,
    )
    wait_line(proc, "blocking")
    wait_blocked_in_fuse(proc.pid)
    start = time.monotonic()
    proc.send_signal(signal.SIGUSR1)
    wait_line(proc, "EINTR caught=1")
    assert time.monotonic() - start < DEADLINE_S
    wait_line(proc, "then [7]")  # the ready response was not taken by the interrupted read
    assert proc.wait(timeout=10) == 0


def test_caught_signal_interrupts_a_blocked_write_with_a_short_count(shallow):
    proc = client(
        shallow,
        """
        fd = open_session(mnt, "zero")
        bufs = [np.ones(8, np.uint8) for _ in range(3)]
        reqs = [request(i, out=whole(b)) for i, b in enumerate(bufs)]
        say("blocking")
        say(f"wrote {c_write(fd, b''.join(r.packed for r in reqs))} caught={len(caught)}")
        say(f"then {sorted(r.req_id for r in collect(fd, 2))}")
        try:
            submit(fd, reqs[0], reqs[1], reqs[2])
        except OSError as exc:
            say("unexpected " + errno.errorcode[exc.errno])
    """,
    )
    wait_line(proc, "blocking")
    wait_blocked_in_fuse(proc.pid)
    start = time.monotonic()
    proc.send_signal(signal.SIGUSR1)
    # Two requests were accepted before the write blocked: the interrupted write reports them.
    wait_line(proc, "wrote 80 caught=1")
    assert time.monotonic() - start < DEADLINE_S
    wait_line(proc, "then [0, 1]")
    wait_blocked_in_fuse(proc.pid)
    proc.kill()
    proc.wait(timeout=10)


def test_caught_signal_with_nothing_accepted_is_eintr(shallow):
    proc = client(
        shallow,
        """
        fd = open_session(mnt, "zero")
        bufs = [np.ones(8, np.uint8) for _ in range(3)]
        submit(fd, request(0, out=whole(bufs[0])), request(1, out=whole(bufs[1])))
        say("blocking")
        try:
            c_write(fd, request(2, out=whole(bufs[2])).packed)
            say("no error")
        except OSError as exc:
            say(f"{errno.errorcode[exc.errno]} caught={len(caught)}")
    """,
    )
    wait_line(proc, "blocking")
    wait_blocked_in_fuse(proc.pid)
    before = stats(shallow)["calls"]
    proc.send_signal(signal.SIGUSR1)
    wait_line(proc, "EINTR caught=1")
    assert proc.wait(timeout=10) == 0
    # The data plane judged the kernel's FUSE_INTERRUPT: a handled signal ends the call.
    after = stats(shallow)["calls"]
    assert after["interrupts"] == before["interrupts"] + 1
    assert after["interrupts_eintr"] == before["interrupts_eintr"] + 1


@pytest.mark.parametrize("how", ["exit", "sigkill", "exec"])
def test_client_leaving_with_requests_in_flight_frees_its_session(mnt, how):
    baseline = settled(mnt)
    assert baseline["sessions"]["open"] == 0
    ending = {
        "exit": "os._exit(0)",
        "sigkill": "os.kill(os.getpid(), signal.SIGKILL)",
        "exec": "os.execv('/bin/true', ['true'])",
    }[how]
    proc = client(
        mnt,
        f"""
        src = np.ones(64 << 20, np.uint8)
        dst = np.zeros(64 << 20, np.uint8)
        fd = os.open(os.path.join(mnt, "func", "copy"), os.O_RDWR | os.O_CLOEXEC)
        submit(fd, *[request(i, out=whole(dst), inputs=[whole(src)]) for i in range(16)])
        say("submitted")
        {ending}
    """,
    )
    wait_line(proc, "submitted")
    proc.wait(timeout=30)
    after = settled(mnt)
    assert after["sessions"]["open"] == 0
    assert after["requests"]["outstanding"] == 0 and after["requests"]["in_flight"] == 0
    assert after["requests"]["metadata_bytes"] == 0
