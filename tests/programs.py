"""The test programs of tests/programs: building them, running them, and
taking down whatever they leave stuck.

Programs are compiled warning-free with the project's header (a missing
compiler fails the test, it never skips). A :class:`Child` is a running
program whose stdout is read line by line, each read with a deadline, so a
test never blocks on a program that hangs. A :class:`Rescue` owns a test's
children and the FUSE connections they use: at the end it kills the
children and, if one cannot be reaped or a mount no longer answers, aborts
the connection through the fusectl file system (``/sys/fs/fuse/connections/N/abort``),
which fails every request waiting on it, so a wedged mount never hangs the run.
"""

from __future__ import annotations

import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from dmoverfs import mounting

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
INCLUDE = ROOT / "csrc" / "include"
SOURCES = TESTS / "programs"
CFLAGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", f"-I{INCLUDE}"]
BUILD_TIMEOUT_S = 120
FUSECTL = Path("/sys/fs/fuse/connections")
#: The kernel function a thread sleeps in while it waits for a FUSE server's answer.
FUSE_WAIT = "request_wait_answer"


# -- building -----------------------------------------------------------------------------


def compiler() -> str:
    name = os.environ.get("CC", "cc")
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"no C compiler ({name!r}) on PATH: these tests need one (scripts/setup installs gcc)")
    return path


class Builder:
    """Compiles programs of tests/programs into one directory, each once."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.built: dict[str, Path] = {}

    def __call__(self, name: str) -> Path:
        if name not in self.built:
            source = SOURCES / f"{name}.c"
            output = self.directory / name
            cmd = [compiler(), *CFLAGS, "-o", str(output), str(source)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if proc.returncode != 0 or proc.stderr.strip():
                pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
            self.built[name] = output
        return self.built[name]


def python_program(name: str) -> list[str]:
    """The command that runs tests/programs/NAME.py with this interpreter."""
    return [sys.executable, str(SOURCES / f"{name}.py")]


# -- running ------------------------------------------------------------------------------


class Child:
    """A running program; its stdout is read line by line with deadlines."""

    def __init__(self, argv: Sequence[str], pass_fds: Sequence[int] = (), env: dict[str, str] | None = None) -> None:
        self.argv = [str(a) for a in argv]
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=tuple(pass_fds),
            env=env,
            text=True,
        )
        self.seen: list[str] = []
        self.eof = False
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self._stderr_reader = threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True)
        self._stderr_reader.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def line(self, timeout: float) -> str | None:
        """The next line, or None if none came within *timeout* seconds or the output ended."""
        if self.eof:
            return None
        try:
            line = self._lines.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if line is None:
            self.eof = True
            return None
        self.seen.append(line)
        return line

    def expect(self, prefix: str, timeout: float) -> str:
        """The next line starting with *prefix* (earlier lines are skipped); fails the test at the deadline."""
        found = self.wait_for(prefix, timeout)
        if found is None:
            pytest.fail(f"no line starting with {prefix!r} within {timeout} s\n{self.describe()}")
        return found

    def wait_for(self, prefix: str, timeout: float) -> str | None:
        """Like :meth:`expect`, but None at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.line(deadline - time.monotonic())
            if line is None:
                return None
            if line.startswith(prefix):
                return line

    def describe(self) -> str:
        """The command, its state, every line it printed so far (read or not) and its stderr."""
        while not self.eof and self.line(0) is not None:
            pass
        code = self.proc.poll()
        state = f"exit status {code}" if code is not None else f"running, {proc_state(self.pid)}"
        stderr = "".join(self._stderr)
        return f"$ {' '.join(self.argv)}\n({state})\nstdout so far: {self.seen!r}\nstderr: {stderr!r}"

    def stderr(self, timeout: float = 5.0) -> str:
        """What it wrote on standard error, to the end of the stream once it has exited (up to *timeout*)."""
        if self.proc.poll() is not None:
            self._stderr_reader.join(timeout)
        return "".join(self._stderr)

    def reap(self, timeout: float) -> bool:
        """True if the process has exited (and is reaped) within *timeout* seconds."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self, timeout: float) -> float | None:
        """SIGKILL; the seconds until it was reaped, or None if it was not within *timeout*."""
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return time.monotonic() - start if self.reap(timeout) else None

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)


class StillWaiting(AssertionError):
    """A call that should have returned at once was still waiting (see :func:`interrupted_after`)."""


@contextmanager
def interrupted_after(seconds: float, what: str) -> Iterator[None]:
    """Fail with StillWaiting instead of hanging if the block takes longer than *seconds*.

    For calls the test process itself makes on a mount that should not wait
    (non-blocking reads and writes): a timer thread sends SIGUSR1 to the main
    thread, whose handler raises; the kernel turns the signal into a
    FUSE_INTERRUPT, which the server answers (SPEC.md: EINTR within a second).
    Only in the main thread; independent of pytest-timeout's SIGALRM.
    """
    assert threading.current_thread() is threading.main_thread()

    def on_signal(signum: int, frame: object) -> None:
        raise StillWaiting(f"{what}: still waiting after {seconds} s")

    previous = signal.signal(signal.SIGUSR1, on_signal)
    done = threading.Event()
    main = threading.main_thread().ident
    assert main is not None

    def timer() -> None:
        if not done.wait(seconds):
            signal.pthread_kill(main, signal.SIGUSR1)

    thread = threading.Thread(target=timer, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        signal.signal(signal.SIGUSR1, previous)


# -- /proc --------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def proc_state(pid: int) -> str:
    """The State: line of /proc/PID/status ("S (sleeping)", "D (disk sleep)", "T (stopped)", ...)."""
    return proc_status(pid).get("State", "gone").strip()


def thread_count(pid: int) -> int:
    return int(proc_status(pid).get("Threads", "0"))


def tree_thread_count(pid: int) -> int:
    """Threads of *pid* and of all its descendants (a server may run helper processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += thread_count(current)
        todo.extend(children.get(current, []))
    return total


def wchans(pid: int) -> list[str]:
    """What each thread of *pid* sleeps in (empty strings for running ones)."""
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                found.append(f.read())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def asleep_in(prefix: str) -> Callable[[str], bool]:
    """A wchan predicate: asleep in a kernel function whose name starts with *prefix*."""
    return lambda wchan: wchan.startswith(prefix)


def wait_threads(pid: int, asleep: Callable[[str], bool], count: int, timeout: float) -> int:
    """Wait until at least *count* threads of *pid* sleep where *asleep* (given the wchan) says;
    return how many did at the end (at the deadline, fewer)."""
    deadline = time.monotonic() + timeout
    while True:
        n = sum(1 for w in wchans(pid) if asleep(w))
        if n >= count or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def wait_blocked_in_fuse(child: Child, timeout: float = 10.0) -> None:
    """Until some thread of *child* sleeps waiting for a FUSE answer; fails the test otherwise."""
    if wait_threads(child.pid, asleep_in(FUSE_WAIT), 1, timeout) < 1:
        pytest.fail(f"the program never blocked in a FUSE request\n{child.describe()}")


# -- FUSE connections -----------------------------------------------------------------------


def mount_device(mountpoint: Path) -> tuple[int, int] | None:
    """(major, minor) of the mount at *mountpoint*, from /proc/self/mountinfo (no request to the
    file system, which may not answer), or None if nothing is mounted there."""
    target = os.path.abspath(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            if mounting.unescape(fields[4]) == target:
                major, minor = fields[2].split(":")
                found = (int(major), int(minor))  # the last one is on top
    return found


def ensure_fusectl() -> None:
    """The fusectl file system must be mounted for a connection to be aborted; mount it if root."""
    if os.path.ismount(FUSECTL):
        return
    if os.geteuid() != 0:
        pytest.fail(f"{FUSECTL} is not mounted (mount -t fusectl fusectl {FUSECTL}): these tests need it to recover hung mounts")
    proc = subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        pytest.fail(f"cannot mount fusectl on {FUSECTL}: {proc.stderr.strip()}")


def abort_connection(connection: int) -> bool:
    """Abort FUSE connection *connection*: every request waiting on it fails. False if it is gone."""
    try:
        (FUSECTL / str(connection) / "abort").write_text("1")
    except FileNotFoundError:
        return False
    return True


def answers(path: Path, timeout: float) -> bool:
    """True if reading *path* (in another process) finishes within *timeout* seconds."""
    proc = subprocess.Popen(["cat", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        return False
    finally:
        if proc.poll() is None:
            threading.Thread(target=proc.wait, daemon=True).start()


class Rescue:
    """A test's children and the FUSE mounts they use, taken down whatever happens."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self.connections: dict[Path, int] = {}
        self.probes: dict[Path, Path] = {}
        self.aborted: list[Path] = []
        self.fds: list[int] = []
        self.adopted: list[tuple[int, int]] = []

    def own(self, fd: int) -> int:
        """Close *fd* (a descriptor of this process on a watched mount) at the end, after the children."""
        self.fds.append(fd)
        return fd

    def watch(self, mountpoint: Path, probe: Path | None = None) -> int:
        """Remember the FUSE connection of *mountpoint* (now, while it answers); *probe* is a file
        whose reading shows the mount still answers."""
        ensure_fusectl()
        device = mount_device(mountpoint)
        assert device is not None and device[0] == 0, f"{mountpoint} is not a FUSE mount ({device})"
        self.connections[Path(mountpoint)] = device[1]
        if probe is not None:
            self.probes[Path(mountpoint)] = probe
        return device[1]

    def adopt(self, pid: int) -> None:
        """Kill *pid* too at the end: a process a child started and left behind (a daemon).

        Held through a pidfd from now on, so that a reused pid is never signalled."""
        try:
            self.adopted.append((pid, os.pidfd_open(pid)))
        except ProcessLookupError:
            pass

    def spawn(self, argv: Sequence[str | Path], pass_fds: Sequence[int] = (), env: dict[str, str] | None = None) -> Child:
        child = Child([str(a) for a in argv], pass_fds=pass_fds, env=env)
        self.children.append(child)
        return child

    def abort(self, mountpoint: Path | None = None) -> None:
        """Abort the connection of *mountpoint* (of every watched mount if None)."""
        for mnt, connection in self.connections.items():
            if (mountpoint is None or mnt == Path(mountpoint)) and abort_connection(connection):
                self.aborted.append(mnt)

    def close(self) -> list[str]:
        """Kill every child; abort the mounts if a child stays unreaped or a mount does not answer;
        close the descriptors. Returns what had to be forced (empty when nothing was stuck)."""
        problems = []
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGKILL)
        for _, pidfd in self.adopted:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stuck = [c for c in self.children if not c.reap(3.0)]
        if stuck:
            problems.append(f"{len(stuck)} program(s) could not be reaped after SIGKILL")
        # An adopted process is not our child: it is gone once its pidfd is readable (it exited).
        lingering = [(pid, fd) for pid, fd in self.adopted if not select.select([fd], [], [], 3.0)[0]]
        if lingering:
            problems.append(f"adopted process(es) {[pid for pid, _ in lingering]} still alive after SIGKILL")
        silent = [m for m, p in self.probes.items() if mount_device(m) is not None and not answers(p, 3.0)]
        if silent:
            problems.append(f"mount(s) not answering: {', '.join(map(str, silent))}")
        if stuck or silent or lingering:
            self.abort()
            for child in stuck:
                if not child.reap(10.0):
                    problems.append(f"still unreaped after aborting the mounts: {child.describe()}")
            for pid, fd in lingering:
                if not select.select([fd], [], [], 10.0)[0]:
                    problems.append(f"adopted process {pid} still alive after aborting the mounts")
        for _, fd in self.adopted:
            os.close(fd)
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        return problems
