"""Test harness: real dmoverfs mounts served by real server processes.

Every server is a subprocess (``python -m dmoverfs mount --foreground``) on a
private mount point; a fixture waits until it answers, fails at once if it
dies, and on teardown stops it (SIGTERM, then a lazy unmount, then SIGKILL).
A test whose server logged a traceback fails. FUSE missing is a failure, not
a skip. Temporary files live under one directory removed at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmoverfs import mounting
from programs import Rescue

_TEMP_ROOT: Path | None = None
_SERVERS: list[Server] = []


def pytest_configure(config: pytest.Config) -> None:
    global _TEMP_ROOT
    _TEMP_ROOT = Path(tempfile.mkdtemp(prefix="dmoverfs-tests-"))
    # tmp_path and friends live under our own root, removed at the end.
    config.option.basetemp = str(_TEMP_ROOT / "pytest")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leftovers = [s for s in _SERVERS if s.running() or mounting.is_mounted(s.mountpoint)]
    for server in leftovers:
        server.stop()
    if _TEMP_ROOT is not None:
        for mnt in mounting.mounts():
            if str(mnt).startswith(str(_TEMP_ROOT)):
                mounting.lazy_unmount(mnt)
        shutil.rmtree(_TEMP_ROOT, ignore_errors=True)
    if leftovers and exitstatus == 0:
        session.exitstatus = 1
        print(f"\nERROR: {len(leftovers)} dmoverfs server(s) were still running at the end", file=sys.stderr)


def temp_root() -> Path:
    assert _TEMP_ROOT is not None
    return _TEMP_ROOT


#: What a process needs to load the C core built by ``scripts/test --sanitize``:
#: Python processes then re-execute themselves with the ASan runtime preloaded
#: (scripts/sanitize/sitecustomize.py).  Servers started with this process's
#: environment inherit them; a test that starts one with a clean environment
#: adds :func:`sanitizer_env`.
SANITIZER_VARS = ("DMOVERFS_SANITIZE", "DMOVERFS_SANITIZER_PRELOAD", "PYTHONPATH", "ASAN_OPTIONS", "UBSAN_OPTIONS")


def sanitizer_env() -> dict[str, str]:
    """The sanitizer variables of this run (empty unless scripts/test --sanitize)."""
    return {k: os.environ[k] for k in SANITIZER_VARS if k in os.environ}


def require_fuse() -> None:
    """Fail (never skip) when this machine cannot mount FUSE."""
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing: these tests need FUSE (modprobe fuse)")
    if shutil.which("fusermount3") is None:
        pytest.fail("fusermount3 is missing: install the fuse3 package (scripts/setup does)")


class Server:
    """One dmoverfs server process and its mount point."""

    def __init__(self, mountpoint: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.mountpoint = mountpoint
        self.args = args
        self.env = env
        self.log_path = mountpoint.parent / (mountpoint.name + ".log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        require_fuse()
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        try:
            self.proc = mounting.spawn_server(self.mountpoint, self.args, self.log_path, self.env)
        except mounting.MountError as exc:
            pytest.fail(f"dmoverfs server did not come up at {self.mountpoint}: {exc}")
        _SERVERS.append(self)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the server and remove its mount, whatever state it is in; returns its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if mounting.is_mounted(self.mountpoint):
            mounting.lazy_unmount(self.mountpoint)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout)
        try:
            self.mountpoint.rmdir()
        except OSError:
            pass
        return self.proc.returncode

    def check_log(self) -> None:
        """Fail if the server logged something it should not have."""
        text = self.log()
        bad = [line for line in text.splitlines() if "Traceback" in line or " CRITICAL " in line]
        if bad:
            pytest.fail(f"the dmoverfs server at {self.mountpoint} logged errors:\n{text}")


@pytest.fixture
def server_factory(tmp_path: Path):
    """Start servers with given mount options; all are stopped and checked at teardown."""
    started: list[Server] = []
    counter = iter(range(1000))

    def start(*args: str, env: dict[str, str] | None = None) -> Server:
        server = Server(tmp_path / f"mnt{next(counter)}", list(args), env).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
    for server in started:
        server.check_log()


@pytest.fixture
def background(tmp_path: Path):
    """A mount point for background mounts (``dmoverfs mount`` without --foreground), cleaned up whatever happens."""
    require_fuse()
    mnt = tmp_path / "bg"
    yield mnt
    if mounting.is_mounted(mnt):
        pid = mounting.server_pid(mnt)
        mounting.lazy_unmount(mnt)
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def rescue(server_factory) -> Iterator[Rescue]:  # noqa: ANN001 - pytest fixture
    """The test's programs, mounts and session descriptors; taken down before the servers are stopped."""
    guard = Rescue()
    yield guard
    problems = guard.close()
    if problems:
        pytest.fail("cleanup had to force its way: " + "; ".join(problems))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A server shared by the tests of one module (default tunables)."""
    srv = Server(tmp_path_factory.mktemp("shared") / "mnt", []).start()
    yield srv
    srv.stop()
    srv.check_log()


@pytest.fixture(scope="module")
def mnt(server: Server) -> Path:
    """The mount point of the module's shared server."""
    return server.mountpoint


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - a programs.Builder
    """tests/programs compiled once for the module (test_privilege has its own, where other users can run them)."""
    from programs import Builder

    return Builder(tmp_path_factory.mktemp("programs"))
