"""The dmoverfs command: background mount, status, unmount, stale mounts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import require_fuse
from dmio import open_session, request, run, whole
from dmoverfs import mounting


def dmoverfs(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "dmoverfs", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        pytest.fail(f"dmoverfs {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def server_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_mount_returns_when_ready_and_unmount_stops_the_server(background, tmp_path):
    out = dmoverfs("mount", str(background), "--log-file", str(tmp_path / "server.log")).stdout
    assert str(background) in out and "unmount" in out
    # Ready means usable right now, no retry loop.
    fd = open_session(background, "zero")
    try:
        assert run(fd, request(1, out=whole(np.ones(16, np.uint8))))[1].error == 0
    finally:
        os.close(fd)
    pid = mounting.server_pid(background)
    assert pid and pid != os.getpid()
    dmoverfs("unmount", str(background))
    assert not mounting.is_mounted(background)
    assert server_gone(pid)
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_mount_options_reach_the_server(background, tmp_path):
    dmoverfs(
        "mount",
        str(background),
        "--queue-depth",
        "8",
        "--workers",
        "3",
        "--max-sessions",
        "77",
        "--log-file",
        str(tmp_path / "log"),
    )
    try:
        limits = json.loads((background / "stats").read_text())["limits"]
        assert (limits["queue_depth"], limits["workers"], limits["max_sessions"]) == (8, 3, 77)
    finally:
        dmoverfs("unmount", str(background))


def test_default_mountpoint_is_created_and_printed(tmp_path):
    require_fuse()
    mnt = tmp_path / "default" / "here"
    env = {"DMOVERFS_MOUNTPOINT": str(mnt)}
    try:
        out = dmoverfs("mount", "--log-file", str(tmp_path / "log"), env=env).stdout
        assert str(mnt) in out
        assert mounting.is_mounted(mnt)
        status = dmoverfs("status", env=env).stdout
        assert "sessions:" in status and "zero" in status
        assert json.loads(dmoverfs("status", "--json", env=env).stdout)["server"]["mountpoint"] == str(mnt)
    finally:
        dmoverfs("unmount", env=env, check=False)
        if mounting.is_mounted(mnt):
            mounting.lazy_unmount(mnt)
    assert not mounting.is_mounted(mnt)


def test_mounting_twice_is_refused(background, tmp_path):
    dmoverfs("mount", str(background), "--log-file", str(tmp_path / "log"))
    try:
        again = dmoverfs("mount", str(background), check=False)
        assert again.returncode != 0 and "already mounted" in again.stderr
    finally:
        dmoverfs("unmount", str(background))


def test_unmount_of_something_else_is_an_error(tmp_path):
    result = dmoverfs("unmount", str(tmp_path), check=False)
    assert result.returncode != 0 and "not a dmoverfs mount" in result.stderr


def test_bad_tunable_is_refused_before_mounting(tmp_path):
    result = dmoverfs("mount", str(tmp_path / "m"), "--queue-depth", "0", check=False)
    assert result.returncode != 0 and "at least 1" in result.stderr
    assert not mounting.is_mounted(tmp_path / "m")


def test_stale_mount_after_sigkill_is_cleared_and_remountable(background, tmp_path):
    dmoverfs("mount", str(background), "--log-file", str(tmp_path / "log"))
    pid = mounting.server_pid(background)
    os.kill(pid, signal.SIGKILL)
    assert server_gone(pid)
    assert mounting.is_mounted(background)  # stale: still in the mount table
    dmoverfs("unmount", str(background))
    assert not mounting.is_mounted(background)
    dmoverfs("mount", str(background), "--log-file", str(tmp_path / "log2"))
    try:
        fd = open_session(background, "zero")
        os.close(fd)
    finally:
        dmoverfs("unmount", str(background))


def test_python_dash_m_and_help():
    out = dmoverfs("--help").stdout
    for command in ("mount", "unmount", "status"):
        assert command in out
    assert "--queue-depth" in dmoverfs("mount", "--help").stdout


def test_mount_refuses_when_the_transport_cannot_work(background, tmp_path):
    """A kernel speaking an older FUSE protocol than the transport needs: a clear refusal, nothing left mounted.

    The requirement is raised past any kernel's (DMOVERFS_MIN_FUSE_MINOR) to take the path a too old kernel takes.
    """
    env = {**os.environ, "DMOVERFS_MIN_FUSE_MINOR": "99"}
    result = subprocess.run(
        [sys.executable, "-m", "dmoverfs", "mount", str(background), "--log-file", str(tmp_path / "server.log")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "dmoverfs needs 7.99 or later" in result.stderr and "use a newer kernel" in result.stderr
    assert "Traceback" not in result.stderr
    assert not mounting.is_mounted(background)


@pytest.mark.parametrize(
    "code",
    [
        "from dmoverfs import cli; cli.main(['cflags'])",
        "from dmoverfs import cli; cli.main(['preload'])",
        "from dmoverfs import cli, status",
        "from dmoverfs import client",
    ],
    ids=["cflags", "preload", "status", "client"],
)
def test_commands_and_client_never_import_the_server(code):
    """The CLI's small commands, `dmoverfs status` and the client load neither pyfuse3, trio nor the server's C.

    (That the client needs nothing beyond the standard library is tested by installing it alone: test_client_dist.)
    """
    server = {"pyfuse3", "trio", "dmoverfs._server", "dmoverfs.server.main"}
    check = f"import sys; assert not {server!r} & set(sys.modules), sys.modules.keys()"
    result = subprocess.run([sys.executable, "-c", f"{code}\n{check}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
