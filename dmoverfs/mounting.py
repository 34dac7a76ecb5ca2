"""Mounting and unmounting from the command line.

``mount`` starts the server in the background and returns only when the
mount answers (the server writes ``ready`` to a pipe once FUSE_INIT is done).
``unmount`` is dmoverfs.unmount's (it stops a server within a deadline,
whatever its state); a lazy unmount (below) just detaches a mount.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

FSTYPE = "fuse.dmoverfs"
READY_TIMEOUT_S = 30.0


class MountError(Exception):
    """A mount or unmount that could not be done; the message says why."""


def unescape(field: str) -> str:
    """A field of /proc/self/mountinfo as it is: the kernel writes space, tab, newline and backslash as \\ooo."""
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
                found.append(Path(unescape(left.split(" ")[4])))
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


def read_pipe(read_end: int, timeout: float, size: int = 4096) -> bytes | None:
    """What the pipe *read_end* gives within *timeout* seconds (b"" at EOF), or None if nothing came; closes it."""
    try:
        readable, _, _ = select.select([read_end], [], [], timeout)
        return os.read(read_end, size) if readable else None
    finally:
        os.close(read_end)


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
    answer = read_pipe(read_end, READY_TIMEOUT_S) or b""  # b"" too if the server died (EOF)
    if answer.startswith(b"ready"):
        return proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if is_mounted(mountpoint):
        lazy_unmount(mountpoint)
    tail = log_file.read_text(errors="replace").strip().splitlines()[-8:]
    raise MountError("the server did not start:\n  " + "\n  ".join(tail) + f"\n(full log: {log_file})")


def lazy_unmount(mountpoint: Path) -> None:
    """Detach the mount even if it is busy or its server is dead."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise MountError("fusermount3 is not installed (Debian package fuse3)")
    result = subprocess.run([tool, "-u", "-z", str(mountpoint)], capture_output=True, text=True)
    if result.returncode != 0 and is_mounted(mountpoint):
        raise MountError(result.stderr.strip() or f"cannot unmount {mountpoint}")


def unmount(mountpoint: Path) -> None:
    """Stop the server at *mountpoint* and remove the mount, stale, silent or not: see dmoverfs.unmount."""
    from dmoverfs import unmount as unmounting  # it builds on this module

    unmounting.unmount(mountpoint)


# -- /dev/dmoverio -------------------------------------------------------------------

DEV_LINK = Path("/dev/dmoverio")


def dev_link_target(mountpoint: Path) -> Path:
    """What ``/dev/dmoverio`` points to for the mount at *mountpoint*: its clone file."""
    return Path(os.path.abspath(mountpoint)) / "dmoverio"


def check_dev_link(mountpoint: Path) -> None:
    """Raise MountError unless ``mount --dev-link`` may (re)place ``/dev/dmoverio`` for *mountpoint*.

    Needs root. ``/dev/dmoverio`` may be absent, already point here, or be a
    link left by a dmoverfs mount that is gone (its directory is not mounted);
    anything else (a real device, another live mount's link) is left alone.
    """
    if os.geteuid() != 0:
        raise MountError(f"--dev-link needs root: it creates {DEV_LINK} (without it, programs find the mount through the shim)")
    try:
        target = os.readlink(DEV_LINK)
    except FileNotFoundError:
        return
    except OSError:
        raise MountError(f"{DEV_LINK} exists and is not a symbolic link: not replacing it") from None
    target_path = Path(os.path.abspath(DEV_LINK.parent / target))  # a relative link is relative to /dev
    if target_path == dev_link_target(mountpoint):
        return
    if target_path.name == "dmoverio" and target_path.parent not in mounts():
        return  # a link of a dmoverfs mount that is gone
    raise MountError(f"{DEV_LINK} already points to {target}: remove it or mount without --dev-link")


def make_dev_link(mountpoint: Path) -> None:
    """Point ``/dev/dmoverio`` at the clone file of *mountpoint* (atomically replacing a stale link)."""
    check_dev_link(mountpoint)
    tmp = DEV_LINK.with_name(f".{DEV_LINK.name}.{os.getpid()}")
    try:
        os.symlink(dev_link_target(mountpoint), tmp)
        os.replace(tmp, DEV_LINK)
    except OSError as exc:
        raise MountError(f"cannot create {DEV_LINK}: {exc.strerror}") from None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def remove_dev_link(mountpoint: Path) -> bool:
    """Remove ``/dev/dmoverio`` if it still points to *mountpoint*'s clone file; True if removed."""
    try:
        if Path(os.readlink(DEV_LINK)) != dev_link_target(mountpoint):
            return False
        os.unlink(DEV_LINK)
    except OSError:
        return False
    return True
