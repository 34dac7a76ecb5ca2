"""Mounting and unmounting from the command line.

``mount`` starts the server in the background and returns only when the
mount answers (the server writes ``ready`` to a pipe once FUSE_INIT is done).
``unmount`` is dmoverfs.unmount's (it stops a server within a deadline,
whatever its state); a lazy unmount (below) just detaches a mount.
"""

from __future__ import annotations

import errno
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


def is_stale(mountpoint: Path) -> bool:
    """True if the mount at *mountpoint* has lost its server ("Transport endpoint is not connected")."""
    try:
        os.listdir(mountpoint)  # opendir reaches the server; stat may be answered from the kernel's cache
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def check_mountpoint(mountpoint: Path, nonempty: bool) -> None:
    """Raise MountError unless *mountpoint* is a directory that may be mounted on (made if missing).

    A mount hides what the directory holds: a non-empty one is refused unless
    *nonempty* (``--nonempty``, ``-o nonempty``) says so.
    """
    if is_mounted(mountpoint):
        if is_stale(mountpoint):
            raise MountError(f"{mountpoint} holds a mount whose server is gone; clear it with: dmoverfs unmount {mountpoint}")
        raise MountError(f"{mountpoint} is already mounted; unmount it first: dmoverfs unmount {mountpoint}")
    if os.path.lexists(mountpoint) and not mountpoint.is_dir():
        raise MountError(f"{mountpoint} is not a directory: give a directory (or a new path, which is created)")
    try:
        mountpoint.mkdir(parents=True, exist_ok=True)
        entries = os.listdir(mountpoint)
    except OSError as exc:
        raise MountError(f"cannot use {mountpoint} as the mount point: {exc.strerror}{_hint(exc)}") from None
    if entries and not nonempty:
        raise MountError(
            f"{mountpoint} is not empty and the mount would hide what it holds; "
            "choose an empty directory, or pass --nonempty (-o nonempty) to mount over them"
        )


def check_fuse_device(path: str = "/dev/fuse") -> None:
    """Raise MountError, saying how to fix it, when this process cannot open the FUSE device."""
    if not os.path.exists(path):
        raise MountError(f"{path} is missing: load the fuse module as root (modprobe fuse)")
    if os.geteuid() != 0 and not os.access(path, os.R_OK | os.W_OK):
        raise MountError(
            f"{path} is not accessible to this user: as root, run chmod 0666 {path} "
            "(what udev does on Debian), or mount as root with --allow-other"
        )


def _hint(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return " (give a directory you may write, e.g. under $XDG_RUNTIME_DIR, or run as root)"
    return ""


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
    silent for READY_TIMEOUT_S instead, it is killed and MountError carries
    what it said about why (its ``dmoverfs:`` line, else its last line).
    An unwritable log file is a MountError too.
    """
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_file, "ab")  # closed below, once the server has it
    except OSError as exc:
        raise MountError(
            f"cannot write the server's log {log_file}: {exc.strerror}; "
            "give one with --log-file PATH (-o log_file=PATH) or set XDG_STATE_HOME"
        ) from None
    start = log.tell()
    read_end, write_end = os.pipe()
    cmd = [sys.executable, "-m", "dmoverfs", "mount", "--foreground", "--ready-fd", str(write_end)]
    with log:
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
    raise MountError(f"the server did not start: {_failure(log_file, start)}\n(full log: {log_file})")


def _failure(log_file: Path, start: int) -> str:
    """Why the server that logged to *log_file* from offset *start* failed, in one or two lines.

    Its last ``dmoverfs:`` message, after the last line another program
    wrote before it (fusermount3's or libfuse's reason, which that message
    refers to); without one, the log's last line.
    """
    with open(log_file, "rb") as f:
        f.seek(start)
        lines = f.read().decode(errors="replace").strip().splitlines()
    said = [i for i, line in enumerate(lines) if line.startswith("dmoverfs: ")]
    if not said:
        return lines[-1] if lines else "it exited without a word"
    last = said[-1]
    # Lines of the server's own log start with a date; others come from the programs it ran.
    foreign = [line for line in lines[:last] if line.strip() and not line[:4].isdigit() and not line.startswith("dmoverfs: ")]
    reason = lines[last].removeprefix("dmoverfs: ")
    return f"{foreign[-1].strip()}\n  {reason}" if foreign else reason


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
