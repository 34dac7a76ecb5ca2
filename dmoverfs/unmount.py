"""``dmoverfs unmount``: stop a server and remove its mount, within a deadline.

A FUSE mount whose server does not answer (stopped, wedged) blocks every
process that touches it, so nothing here touches the mount path itself:
the mount and its FUSE connection are found in ``/proc/self/mountinfo``,
and the one request made to the server (reading ``stats`` for its pid)
is made by a child process that is killed at its deadline.

- The server answers: it is sent SIGTERM (clients blocked in it are woken
  with ENXIO) and removes its mount; this waits for that, with a deadline.
- It does not answer (or does not stop in time): the FUSE connection is
  aborted through fusectl (``/sys/fs/fuse/connections/N/abort``, writable
  by the mount's owner), which fails every call waiting on the mount with
  ECONNABORTED and every later one with ENOTCONN, and the mount is detached
  (``umount2(MNT_DETACH)`` as root, ``fusermount3 -u -z`` otherwise). No
  signal is sent to it: a server that cannot answer cannot be asked, and
  the command only ever kills what it started itself.
- Its server is gone (killed: the mount is stale, ENOTCONN): the mount is
  detached.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dmoverfs import mounting

#: A server that answers does so in milliseconds; beyond this it is taken as not answering.
ANSWER_TIMEOUT_S = 3.0
#: After SIGTERM, how long the server has to wake its clients and remove its mount.
STOP_TIMEOUT_S = 5.0
#: The whole command ends within this (well under what anyone would wait for an unmount).
TOTAL_TIMEOUT_S = 10.0
#: Any single step (a helper program, reaping a child) gets at least this, even past the total.
MIN_STEP_S = 1.0
FUSECTL = Path("/sys/fs/fuse/connections")
#: <sys/mount.h>: detach now, clean up when no longer busy; never follow a symbolic link.
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
#: The errors a mount whose server is gone answers with.
GONE = (errno.ENOTCONN, errno.ECONNABORTED)

Say = Callable[[str], None]


class Deadline:
    """What is left of a time budget."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, cap: float | None = None) -> float:
        """Seconds left (at least MIN_STEP_S), at most *cap*."""
        left = max(MIN_STEP_S, self.end - time.monotonic())
        return left if cap is None else min(cap, left)


@dataclass(frozen=True)
class MountEntry:
    """A dmoverfs mount as ``/proc/self/mountinfo`` shows it."""

    mountpoint: Path
    #: The FUSE connection's number: its directory under /sys/fs/fuse/connections.
    connection: int


def find_mount(mountpoint: Path) -> MountEntry | None:
    """The dmoverfs mount at *mountpoint* (the top one if several), read from mountinfo only."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split(" ")
            if right.split(" ", 1)[0] != mounting.FSTYPE or Path(mounting.unescape(fields[4])) != mountpoint:
                continue
            major, minor = (int(x) for x in fields[2].split(":"))
            # fusectl names a connection by the kernel's dev_t of the mount: MKDEV(major, minor).
            found = MountEntry(mountpoint, (major << 20) | minor)
    return found


# -- asking the server ----------------------------------------------------------------------


#: Run by a child process: print the server's pid from ``stats`` (argv[1]), or the errno reading it gave.
_READ_PID = """
import errno, json, sys
try:
    with open(sys.argv[1], "rb") as f:
        print(json.dumps({"pid": int(json.loads(f.read())["server"]["pid"])}))
except OSError as exc:
    print(json.dumps({"errno": exc.errno or errno.EIO}))
except (ValueError, KeyError, TypeError):
    print(json.dumps({"errno": errno.EPROTO}))
"""


@dataclass(frozen=True)
class Answer:
    """What reading the mount's ``stats`` gave: the server's pid, an errno, or nothing in time."""

    pid: int | None = None
    error: int | None = None
    #: The child that was still reading at the deadline (killed, maybe not yet gone).
    reader: subprocess.Popen | None = None

    @property
    def silent(self) -> bool:
        return self.pid is None and self.error is None


def ask_server(mountpoint: Path, timeout: float) -> Answer:
    """Read *mountpoint*/stats in a child process; give up on it after *timeout* seconds.

    A read of a mount whose server does not answer never returns; the child
    is then killed. It dies at once, unless the server had already taken its
    request or it waits for another process's lookup of the same name (an
    uninterruptible wait): then it goes when the connection is aborted.
    """
    read_end, write_end = os.pipe()
    try:
        # -I -S: nothing but the standard library, started fast.
        reader = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _READ_PID, str(mountpoint / "stats")],
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.DEVNULL,
        )
    finally:
        os.close(write_end)
    data = mounting.read_pipe(read_end, timeout)
    if data is None:
        reader.kill()
        return Answer(reader=reader)
    reader.wait()  # it exits right after writing
    try:
        result = json.loads(data)
        return Answer(pid=result.get("pid"), error=result.get("errno"))
    except (ValueError, AttributeError):
        return Answer(error=errno.EPROTO)


# -- stopping an answering server -------------------------------------------------------------


def _wait_unmounted(mountpoint: Path, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while find_mount(mountpoint) is not None:
        if time.monotonic() >= end:
            return False
        time.sleep(0.05)
    return True


def stop_server(pid: int, mountpoint: Path, deadline: Deadline) -> str | None:
    """SIGTERM the server *pid* (it answered for the mount) and wait for it to unmount and exit.

    None once it has removed its mount; otherwise why not. Raises MountError
    if the server is another user's, which only they or root may stop.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return f"the server (pid {pid}) is gone"
    try:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        except ProcessLookupError:
            return f"the server (pid {pid}) is gone"
        except PermissionError:
            raise mounting.MountError(f"the server of {mountpoint} (pid {pid}) is another user's: not ours to stop") from None
        if not _wait_unmounted(mountpoint, deadline.left(STOP_TIMEOUT_S)):
            return f"the server (pid {pid}) did not remove {mountpoint} within {STOP_TIMEOUT_S:.0f} s of SIGTERM"
        # Readable once it has exited (a zombie counts: it is not ours to reap).
        select.select([pidfd], [], [], deadline.left())
        return None
    finally:
        os.close(pidfd)


# -- forcing the mount off ---------------------------------------------------------------------


class AbortError(Exception):
    """The connection could not be aborted; the message says why."""


def _ensure_fusectl() -> None:
    if os.path.ismount(FUSECTL):
        return
    if os.geteuid() != 0:
        raise AbortError(f"fusectl is not mounted on {FUSECTL} (as root: mount -t fusectl fusectl {FUSECTL})")
    result = subprocess.run(
        ["mount", "-t", "fusectl", "fusectl", str(FUSECTL)], capture_output=True, text=True, timeout=MIN_STEP_S * 5
    )
    if result.returncode != 0:
        raise AbortError(f"cannot mount fusectl on {FUSECTL}: {result.stderr.strip()}")


def abort_connection(entry: MountEntry) -> None:
    """Abort *entry*'s FUSE connection: every call waiting on it fails, the server gets ENODEV."""
    _ensure_fusectl()
    if find_mount(entry.mountpoint) != entry:
        return  # gone or replaced meanwhile: that connection is not ours to abort any more
    path = FUSECTL / str(entry.connection) / "abort"
    try:
        with open(path, "w") as f:
            f.write("1")
    except FileNotFoundError:
        return  # the connection ended meanwhile
    except PermissionError:
        raise AbortError(f"{path} belongs to the mount's owner: only they or root can abort it") from None
    except OSError as exc:
        raise AbortError(f"cannot write {path}: {exc.strerror}") from None


def detach(mountpoint: Path, timeout: float) -> None:
    """Lazily unmount *mountpoint* without looking into it (it may not answer)."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(mountpoint), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
            code = ctypes.get_errno()
            if find_mount(mountpoint) is not None:
                raise mounting.MountError(f"cannot unmount {mountpoint}: {os.strerror(code)}")
        return
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise mounting.MountError("fusermount3 is not installed (Debian package fuse3)")
    try:
        result = subprocess.run([tool, "-u", "-z", str(mountpoint)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise mounting.MountError(f"{tool} -u -z {mountpoint} did not finish within {timeout:.0f} s") from None
    if result.returncode != 0 and find_mount(mountpoint) is not None:
        raise mounting.MountError(result.stderr.strip() or f"cannot unmount {mountpoint}")


def force(entry: MountEntry, deadline: Deadline) -> str | None:
    """Abort the connection and detach the mount; a warning if the abort could not be done."""
    warning = None
    try:
        abort_connection(entry)
    except AbortError as exc:
        warning = (
            f"the FUSE connection could not be aborted ({exc}): "
            "clients blocked on the mount stay blocked until its server answers or exits"
        )
    detach(entry.mountpoint, deadline.left())
    return warning


# -- the command -------------------------------------------------------------------------------


def _reaped(child: subprocess.Popen, timeout: float) -> bool:
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def unmount(mountpoint: Path, say: Say = _stderr) -> None:
    """Stop the server at *mountpoint* and remove the mount, stale, silent or not.

    Returns within about TOTAL_TIMEOUT_S; *say* gets a line for anything
    beyond a normal stop. Raises MountError if *mountpoint* is not a dmoverfs
    mount, the mount stays, or clients may still be blocked on it.
    """
    mountpoint = Path(os.path.abspath(mountpoint))
    deadline = Deadline(TOTAL_TIMEOUT_S)
    entry = find_mount(mountpoint)
    if entry is None:
        raise mounting.MountError(f"{mountpoint} is not a dmoverfs mount")
    answer = ask_server(mountpoint, ANSWER_TIMEOUT_S)
    warning = None
    if answer.pid is not None:
        failed = stop_server(answer.pid, mountpoint, deadline)
        if failed is not None and find_mount(mountpoint) == entry:
            say(f"dmoverfs: {failed}: aborting its FUSE connection {entry.connection} and detaching the mount")
            warning = force(entry, deadline)
    elif answer.silent:
        say(
            f"dmoverfs: the server of {mountpoint} does not answer ({mountpoint / 'stats'} gave nothing in "
            f"{ANSWER_TIMEOUT_S:.0f} s): aborting its FUSE connection {entry.connection} and detaching the mount; "
            "calls blocked on it fail with ECONNABORTED"
        )
        warning = force(entry, deadline)
    elif answer.error in GONE:
        say(f"dmoverfs: the server of {mountpoint} is gone (stale mount: {os.strerror(answer.error)}); removing the mount")
        detach(mountpoint, deadline.left())
    else:
        # It answers, but not to us (a mount of another user's): the kernel ends the
        # connection, and the server exits, once the detached mount is no longer busy.
        say(f"dmoverfs: cannot ask the server of {mountpoint} to stop ({os.strerror(answer.error)}); detaching the mount")
        detach(mountpoint, deadline.left())
    if answer.reader is not None and not _reaped(answer.reader, deadline.left(MIN_STEP_S)):
        say(f"dmoverfs: process {answer.reader.pid} (reading {mountpoint / 'stats'}) is still waiting on the mount")
    # The server removes its /dev/dmoverio on the way out; a killed or silent one could not.
    mounting.remove_dev_link(mountpoint)
    if find_mount(mountpoint) is not None:
        raise mounting.MountError(f"{mountpoint} is still mounted")
    if warning is not None:
        raise mounting.MountError(f"{mountpoint} is detached, but {warning}")
