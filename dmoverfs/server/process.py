"""The client process behind a session: thread id to process id, pidfd."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Client:
    """The process whose memory a session's requests address."""

    pid: int
    uid: int
    gid: int
    #: Its command name when it opened the session (``/proc/PID/comm``), for ``stats``.
    command: str = ""


def thread_group(tid: int) -> int:
    """The process id (thread group id) of thread *tid*.

    FUSE reports the id of the calling *thread*; process_vm_readv wants the
    process. The caller must still be inside the syscall (it is, during open),
    so the thread cannot have gone away.
    """
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    raise OSError(errno.ESRCH, f"thread {tid} has no process")


def command_name(pid: int) -> str:
    """The command name of process *pid* (``/proc/PID/comm``), or "" once it is gone."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().rstrip(b"\n").decode("utf-8", "replace")
    except OSError:
        return ""


def open_pidfd(pid: int) -> int:
    """A pidfd for *pid*: lets the core refuse to touch a pid after its process exits."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError as exc:
        raise OSError(errno.ESRCH, f"process {pid} is gone") from exc
