"""Every request acts on the memory of the process whose thread wrote it.

SPEC.md, "Wire format": the pointers in a request are addresses in the
address space of the process that wrote it, held for the life of the
request; if the writer exits or execs before or while its request runs, the
request fails with EFAULT and no byte of any other process or image is read
or written. So a session passed on (fork, daemon(3), SCM_RIGHTS) lets its
new holder move its own memory, never the opener's; a process whose main
thread has exited keeps working; and an exec'd image is never touched by
its previous image's requests.

The clients are the C programs of tests/programs (writer.c, execer.c and
image.c): each builds its requests over buffers whose addresses are the same
in every process involved (built before fork, or mapped at a fixed address)
with different bytes in each, so the bytes found afterwards show whose
memory a request acted on. Small requests (4 KiB) run in the write call,
large ones (1 MiB and more) on a worker thread; both are tested. Every wait
has a deadline, and :class:`programs.Rescue` kills the programs (and any
daemon they leave behind) and aborts a mount that stops answering.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Server
from dmio import stats, wait_for
from programs import Builder, Child, Rescue

#: What the programs report a buffer holds (writer.h): its byte in hex when every byte is the same.
FILLED = {"fill8": "5a", "zero": "00"}
#: The opener's buffers before any request.
OPENER = "50"
#: Another process's bytes at the same address (a forked child's, a receiver's, a surviving thread's).
OTHER = "c3"
#: The holder's copy of the region an exec'd process's requests name.
HOLDER = "33"
#: The new image's region at those addresses: mapped and never written, so all zeros.
IMAGE = "00"
SMALL = 4 << 10
LARGE = 1 << 20
#: A line a program prints after a round trip or two comes within this.
STEP_S = 30.0
#: A program exits within this once it has said everything.
EXIT_S = 10.0
#: The server has nothing left in flight within this after an exec (requests of hundreds of MiB).
SETTLE_S = 60.0


@pytest.fixture
def rescue(server: Server, server_factory) -> Iterator[Rescue]:  # noqa: ANN001 - pytest fixture
    """The test's programs and daemons, taken down (aborting mounts if need be) before any server stops."""
    guard = Rescue()
    guard.watch(server.mountpoint, probe=server.mountpoint / "stats")
    yield guard
    problems = guard.close()
    if problems:
        pytest.fail("cleanup had to force its way: " + "; ".join(problems))


def words(child: Child, key: str, timeout: float = STEP_S) -> list[str]:
    """The words after *key* on the program's next line starting with ``key``; fails at the deadline."""
    return child.expect(key + " ", timeout).split()[1:]


def finished(child: Child) -> None:
    """The program exits with status 0 within EXIT_S."""
    assert child.reap(EXIT_S), f"the program did not exit\n{child.describe()}"
    assert child.proc.returncode == 0, child.describe()


def no_session_left(mnt: Path) -> None:
    """Every session the test opened is gone once its programs are."""
    assert wait_for(lambda: stats(mnt)["sessions"]["open"] == 0, EXIT_S), stats(mnt)["sessions"]


# -- a session passed to another process --------------------------------------------------------


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["4KiB", "1MiB"])
@pytest.mark.parametrize("function", ["fill8", "zero"])
def test_a_forked_childs_request_fills_its_own_buffer_not_its_parents(programs, rescue, mnt, function, size):
    """Open, then fork: the child's request acts on the child's buffer, the parent's stays as it was.

    The buffer, its iovec and the request are built before fork, so they have
    the same addresses in both processes; the child then puts its own bytes
    there. Afterwards the parent's own request (the same bytes) still acts on
    the parent.
    """
    child = rescue.spawn([programs("writer"), "fork", mnt, function, size])
    assert words(child, "child") == ["0", FILLED[function]], child.describe()
    assert words(child, "parent") == [OPENER], child.describe()
    assert words(child, "parent-own") == ["0", FILLED[function]], child.describe()
    finished(child)
    no_session_left(mnt)


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["4KiB", "1MiB"])
def test_a_daemon_moves_its_own_memory_after_its_parent_has_exited(programs, rescue, mnt, size):
    """Open, then daemon(3): once the opener has exited, the daemon's requests succeed on the daemon's memory."""
    child = rescue.spawn([programs("writer"), "daemon", mnt, "fill8", size])
    (opener,) = words(child, "opener")
    (daemon,) = words(child, "daemon")
    rescue.adopt(int(daemon))
    assert int(opener) == child.pid and int(daemon) != child.pid
    assert words(child, "opener-exited") == ["1"], child.describe()
    assert child.proc.poll() == 0, child.describe()
    assert words(child, "result") == ["0", FILLED["fill8"]], child.describe()
    # The daemon exits after its report, closing the last descriptor on its session.
    no_session_left(mnt)


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["4KiB", "1MiB"])
def test_a_session_passed_over_scm_rights_moves_the_receivers_memory(programs, rescue, mnt, size):
    """The receiver of a session descriptor moves its own memory; the sender's at the same address is untouched.

    The receiver is forked before the session exists, so it holds the
    session only through the SCM_RIGHTS message.
    """
    child = rescue.spawn([programs("writer"), "scm", mnt, "fill8", size])
    receiver = words(child, "receiver")
    assert int(receiver[0]) != child.pid
    assert receiver[1:] == ["0", FILLED["fill8"]], child.describe()
    assert words(child, "sender") == [OPENER], child.describe()
    assert words(child, "sender-own") == ["0", FILLED["fill8"]], child.describe()
    finished(child)
    no_session_left(mnt)


# -- changing ids after open ---------------------------------------------------------------------

#: The uid (and gid) a root process takes after opening: nobody's.
NOBODY = 65534


@pytest.mark.parametrize(
    "dumpable, expected",
    [("1", ["40", "0", "0", "5a"]), ("0", ["-1", "EPERM", "-1", "50"])],
    ids=["dumpable", "not-dumpable"],
)
def test_setuid_after_open_moves_the_writers_memory_with_its_new_rights(programs, rescue, mnt, dumpable, expected):
    """A root process opens, then becomes nobody and writes: the request acts on its memory, as nobody.

    Changing ids makes a process non-dumpable, which even its own user may not
    ptrace: then the kernel refuses the server too (EPERM, nothing written),
    since a root server reaches a writer only with the writer's rights; once
    the process makes itself dumpable again, its request fills its buffer.
    """
    child = rescue.spawn([programs("setuid_writer"), mnt / "func" / "fill8", str(NOBODY), dumpable])
    assert words(child, "result") == expected, child.describe()
    finished(child)
    no_session_left(mnt)


# -- threads ------------------------------------------------------------------------------------


def test_requests_written_after_the_main_thread_exited_succeed(programs, rescue, mnt):
    """The main thread opens the session and calls pthread_exit(); another thread's requests still work.

    The process is alive though its first thread (whose id is the process
    id) is gone: small and large requests alike act on the process's memory.
    """
    child = rescue.spawn([programs("writer"), "leader", mnt, "fill8", SMALL, LARGE])
    assert words(child, "leader-exited") == ["1"], child.describe()
    assert words(child, "result") == [str(SMALL), "0", FILLED["fill8"]], child.describe()
    assert words(child, "result") == [str(LARGE), "0", FILLED["fill8"]], child.describe()
    finished(child)
    no_session_left(mnt)


def test_many_threads_of_one_process_each_move_their_own_buffers(programs, rescue, mnt):
    """16 threads write requests concurrently on one session (4 KiB and 256 KiB, each with a byte of its own).

    Every request succeeds and leaves exactly its own byte in exactly its
    own thread's buffer, whichever thread read its response.
    """
    threads, rounds = 16, 40
    child = rescue.spawn([programs("writer"), "threads", mnt, threads, rounds])
    assert words(child, "done", 120) == [str(threads * rounds), "0"], child.describe()
    finished(child)
    no_session_left(mnt)


# -- exec ---------------------------------------------------------------------------------------


def run_execer(programs: Builder, rescue: Rescue, mnt: Path, size: int, count: int, busy: int) -> dict[str, int]:
    """Run execer.c (COUNT fill8 requests of SIZE bytes, then an exec of image.c) and check every memory.

    The new image's region at the requests' addresses must read all zeros
    (never written) and the holder's copy all 0x33; every response the new
    image reads is OK (a request that finished before the exec) or EFAULT.
    Returns the counts of the image's "responses" line.
    """
    child = rescue.spawn([programs("execer"), mnt, programs("image"), size, count, busy])
    assert words(child, "queued") == [str(40 * count), "0"], child.describe()
    image, euid = words(child, "mapped")
    assert int(image) == child.pid and euid == "0"  # the same process, a new image
    settled = wait_for(lambda: stats(mnt)["requests"]["in_flight"] == 0, SETTLE_S)
    # Whatever the server still holds, the image reads what came and looks at its memory now.
    child.signal(signal.SIGUSR1)
    assert settled, f"requests still in flight after {SETTLE_S} s: {stats(mnt)['requests']}"
    got = words(child, "responses")
    assert words(child, "memory") == [IMAGE], f"the new image's memory was written\n{child.describe()}"
    counts = dict(zip(("got", "ok", "efault", "other"), (int(got[i]) for i in (0, 2, 4, 6))))
    assert counts["other"] == 0, f"a request failed with {got[7:]}, not EFAULT\n{child.describe()}"
    assert counts["got"] == counts["ok"] + counts["efault"] <= count, child.describe()
    if busy:
        assert words(child, "busy") == ["0", FILLED["fill8"]], child.describe()
    assert words(child, "holder-memory") == [HOLDER], f"the holder's memory was written\n{child.describe()}"
    finished(child)
    no_session_left(mnt)
    return counts


def test_requests_queued_when_their_writer_execs_never_touch_the_new_image(programs, rescue, server_factory):
    """A process queues 16 fill8 requests of 16 MiB behind a busy worker, then execs at once.

    With one worker, kept busy by another process's 512 MiB request, none of
    them can have started before the exec: none succeeds, and the new
    image, which maps a region at the same addresses right away, finds it
    untouched however long it waits.
    """
    srv = server_factory("--workers", "1")
    rescue.watch(srv.mountpoint, probe=srv.mountpoint / "stats")
    count = 16
    counts = run_execer(programs, rescue, srv.mountpoint, 16 << 20, count, 512 << 20)
    assert counts["ok"] == 0, counts


def test_a_request_running_when_its_writer_execs_never_touches_the_new_image(programs, rescue, mnt):
    """A process writes one fill8 request of 512 MiB and execs at once, while a worker runs it.

    The new image maps a region at the request's addresses right away: no
    byte of it changes, whether the request fails with EFAULT or had
    finished in the old image.
    """
    run_execer(programs, rescue, mnt, 512 << 20, 1, 0)
