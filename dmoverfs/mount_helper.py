"""``dmoverfs`` as a mount helper, and readiness for systemd.

``mount -t fuse.dmoverfs SOURCE DIR -o OPTS`` (and an ``/etc/fstab`` line of
type ``fuse.dmoverfs``) runs ``/sbin/mount.fuse3``, which runs, through
``/bin/sh -c``::

    dmoverfs SOURCE DIR -o OPTS

with ``dmoverfs`` looked up in the shell's default PATH (util-linux ``mount``
drops the caller's PATH), or the program named in an old-style source
``/path/to/dmoverfs#SOURCE`` of type ``fuse``. An empty SOURCE is left out
(``dmoverfs DIR -o OPTS``). mount.fuse3 removes ``user``, ``users``, ``auto``,
``noauto``, ``nofail``, ``_netdev``, ``setuid=`` and ``drop_privileges`` and
adds ``dev`` and ``suid`` unless ``nodev`` / ``nosuid`` were given; mount(8)
itself adds ``rw`` and keeps ``x-*`` options to itself.

:func:`is_helper_form` recognises that command line (first word not a
subcommand, then a single absolute mount point, nothing but ``-o``);
:func:`mount_argv` turns it into the equivalent ``dmoverfs mount`` command
line, so the mount goes through the same code and returns once the mount
answers, with the server in the background.

:func:`systemd_ready_fd` lets ``dmoverfs mount --foreground`` run as a
``Type=notify`` service: ``READY=1`` goes to ``$NOTIFY_SOCKET`` once the
mount answers.
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
from collections.abc import Iterable
from pathlib import Path

#: -o options that take a positive number, and the ``dmoverfs mount`` flag each becomes.
NUMERIC = {
    "queue_depth": "--queue-depth",
    "workers": "--workers",
    "max_sessions": "--max-sessions",
    "max_requests": "--max-requests",
    "max_meta_bytes": "--max-meta-bytes",
    "max_user_sessions": "--max-user-sessions",
    "max_user_requests": "--max-user-requests",
    "max_user_meta_bytes": "--max-user-meta-bytes",
    "slice_bytes": "--slice-bytes",
}
#: Numeric -o options for which 0 means something (whole requests, for slice_bytes).
ZERO_ALLOWED = {"slice_bytes"}
#: -o options without a value.
FLAGS = {
    "allow_other": "--allow-other",
    "dev_link": "--dev-link",
    "debug": "--debug",
    "nonempty": "--nonempty",
}
#: -o options with a free-form value.
VALUED = {
    "log_file": "--log-file",
}
#: -o options with a value that may be given more than once (each one passed on).
REPEATED = {
    "backend": "--backend",
    "no_backend": "--no-backend",
}
#: Generic options that mount(8), mount.fuse3 or fstab pass along and that mean
#: nothing here (no device nodes, set-user-ID files or programs live in a dmoverfs mount).
IGNORED = frozenset(
    """
    rw defaults auto noauto user nouser users owner group _netdev nofail
    dev nodev suid nosuid exec noexec async sync dirsync
    atime noatime diratime nodiratime relatime norelatime strictatime nostrictatime
    lazytime nolazytime silent loud
    """.split()
)
#: Prefixes of ignored generic options (x-systemd.automount, x-gvfs-show, comment=...).
IGNORED_PREFIXES = ("x-", "comment=")


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    """Every subcommand name and alias of the ``dmoverfs`` parser."""
    names: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            names.update(action.choices)
    return names


def is_helper_form(argv: list[str], subcommands: Iterable[str]) -> bool:
    """True if *argv* is ``[SOURCE] MOUNTPOINT [-o OPTS]...`` as mount.fuse3 passes it.

    The first word must not be a subcommand (so ``dmoverfs mount ...`` and the
    rest keep their meaning) nor an option, and the mount point must be
    absolute (mount(8) always passes it so): ``dmoverfs stauts`` stays a usage
    error instead of becoming a mount.
    """
    if not argv or argv[0].startswith("-") or argv[0] in set(subcommands):
        return False
    positional: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "-o":
            if i + 1 == len(argv):
                return False
            i += 2
        elif word.startswith("-o"):
            i += 1
        elif word.startswith("-"):
            return False
        else:
            positional.append(word)
            i += 1
    return len(positional) in (1, 2) and positional[-1].startswith("/")


def _options(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split *argv* into its positional words and its -o options (comma lists flattened)."""
    positional, options = [], []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "-o":
            options += argv[i + 1].split(",")
            i += 2
            continue
        if word.startswith("-o"):
            options += word[2:].split(",")
        else:
            positional.append(word)
        i += 1
    return positional, [o for o in options if o]


def known_options() -> list[str]:
    """The -o options dmoverfs understands (for messages and the man page test)."""
    return [*(f"{k}=N" for k in NUMERIC), *FLAGS, *(f"{k}=PATH" for k in VALUED), *(f"{k}=NAME" for k in REPEATED)]


def mount_argv(argv: list[str]) -> list[str]:
    """The ``dmoverfs mount`` command line equivalent to the helper form *argv*.

    Raises SystemExit with a message naming the option for anything this
    mount cannot honour.
    """
    positional, options = _options(argv)
    mountpoint = positional[-1]
    if mountpoint.startswith("/dev/fd/"):
        raise SystemExit(
            f"dmoverfs: mount point {mountpoint}: the drop_privileges mount option is not supported "
            "(mount.fuse3 has already mounted the directory: umount it); use setuid=USER instead"
        )
    out = ["mount", mountpoint]
    for option in options:
        key, has_value, value = option.partition("=")
        if option in IGNORED or option.startswith(IGNORED_PREFIXES):
            continue
        if key in NUMERIC and has_value:
            try:
                number = int(value, 0)
            except ValueError:
                number = 0
            if number < (0 if key in ZERO_ALLOWED else 1):
                kind = "a whole number, 0 or more" if key in ZERO_ALLOWED else "a positive whole number"
                raise SystemExit(f"dmoverfs: -o {option}: {key} needs {kind}")
            out += [NUMERIC[key], str(number)]
        elif option in FLAGS:
            out.append(FLAGS[key])
        elif key in VALUED and has_value and value:
            out += [VALUED[key], value]
        elif key in REPEATED and has_value and value:
            out += [REPEATED[key], value]
        elif option == "ro":
            raise SystemExit("dmoverfs: -o ro: a dmoverfs mount cannot be read-only (requests are written to it)")
        else:
            raise SystemExit(
                f"dmoverfs: unknown mount option {option!r}; dmoverfs takes {', '.join(known_options())} "
                "and ignores the generic ones (rw, nodev, nosuid, noexec, noauto, nofail, _netdev, x-*, ...)"
            )
    return out


def systemd_ready_fd(mountpoint: Path, environ: dict[str, str] | None = None) -> int | None:
    """A ready descriptor that tells systemd (``sd_notify``) once the mount answers, or None.

    Under a ``Type=notify`` unit ``$NOTIFY_SOCKET`` names systemd's datagram
    socket; the server writes ``ready`` to the returned pipe after FUSE_INIT and
    a thread passes ``READY=1`` on. Without ``$NOTIFY_SOCKET``: None.
    """
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return None
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    read_end, write_end = os.pipe()

    def forward() -> None:
        try:
            answer = os.read(read_end, 64)
        finally:
            os.close(read_end)
        if not answer.startswith(b"ready"):
            return  # the server failed; systemd sees the process exit
        message = f"READY=1\nSTATUS=serving {mountpoint}\nMAINPID={os.getpid()}".encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, address)

    threading.Thread(target=forward, name="sd_notify", daemon=True).start()
    return write_end
