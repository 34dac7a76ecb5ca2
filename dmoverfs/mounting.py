"""Mounting and unmounting from the command line.

``mount`` starts the server in the background and returns only when the
mount answers (the server writes ``ready`` to a pipe once FUSE_INIT is done).
``unmount`` asks the server to stop (SIGTERM, so blocked clients are woken
with ENXIO) and falls back to a lazy unmount, which also clears the mount
left by a server that was killed.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

FSTYPE = "fuse.dmoverfs"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class MountError(Exception):
    """A mount or unmount that could not be done; the message says why."""


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts(fstype: str = FSTYPE) -> list[Path]:
    """Mount points of this file system type, from /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == fstype:
                found.append(Path(_unescape(left.split(" ")[4])))
    return found


def is_mounted(mountpoint: Path) -> bool:
    """True if a dmoverfs mount sits at *mountpoint*."""
    return Path(os.path.abspath(mountpoint)) in mounts()


def server_pid(mountpoint: Path) -> int | None:
    """The pid of the server answering at *mountpoint*, or None if it does not answer."""
    try:
        with open(mountpoint / "stats", "rb") as f:
            return int(json.loads(f.read())["server"]["pid"])
    except (OSError, ValueError, KeyError):
        return None


def spawn_server(mountpoint: Path, server_args: list[str], log_file: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``dmoverfs mount --foreground`` detached; return it once the mount answers.

    The server writes ``ready`` to a pipe after FUSE_INIT; if it exits or stays
    silent for READY_TIMEOUT_S instead, it is killed and MountError carries the
    end of its log.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    cmd = [sys.executable, "-m", "dmoverfs", "mount", "--foreground", "--ready-fd", str(write_end)]
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            [*cmd, *server_args, str(mountpoint)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(write_end,),
            env=None if env is None else {**os.environ, **env},
            start_new_session=True,
        )
    os.close(write_end)
    try:
        # EOF (the server died) also makes the pipe readable.
        readable, _, _ = select.select([read_end], [], [], READY_TIMEOUT_S)
        answer = os.read(read_end, 64) if readable else b""
    finally:
        os.close(read_end)
    if answer.startswith(b"ready"):
        return proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if is_mounted(mountpoint):
        lazy_unmount(mountpoint)
    tail = log_file.read_text(errors="replace").strip().splitlines()[-8:]
    raise MountError("the server did not start:\n  " + "\n  ".join(tail) + f"\n(full log: {log_file})")


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lazy_unmount(mountpoint: Path) -> None:
    """Detach the mount even if it is busy or its server is dead."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise MountError("fusermount3 is not installed (Debian package fuse3)")
    result = subprocess.run([tool, "-u", "-z", str(mountpoint)], capture_output=True, text=True)
    if result.returncode != 0 and is_mounted(mountpoint):
        raise MountError(result.stderr.strip() or f"cannot unmount {mountpoint}")


def unmount(mountpoint: Path) -> None:
    """Stop the server at *mountpoint* and remove the mount, stale or not."""
    mountpoint = Path(os.path.abspath(mountpoint))
    if not is_mounted(mountpoint):
        raise MountError(f"{mountpoint} is not a dmoverfs mount")
    pid = server_pid(mountpoint)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pid = None
    if pid is not None and _wait(lambda: not is_mounted(mountpoint), STOP_TIMEOUT_S):
        _wait(lambda: not _pid_alive(pid), STOP_TIMEOUT_S)
        return
    lazy_unmount(mountpoint)
