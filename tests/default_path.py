"""This checkout's ``dmoverfs`` as /usr/local/bin/dmoverfs, for as long as a test needs it.

mount(8) runs mount.fuse3 without the caller's PATH, so the helper is found
only in the shell's default PATH; the shipped systemd unit names
/usr/local/bin/dmoverfs. Tests link it there under a lock on the directory
(concurrent runs share the link instead of tripping over each other) and
remove the link after. An existing dmoverfs there that is not this checkout's
fails the test rather than being used or replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

VENV_DMOVERFS = Path(sys.executable).with_name("dmoverfs")
LINK = Path("/usr/local/bin/dmoverfs")


@contextlib.contextmanager
def dmoverfs_in_default_path() -> Iterator[Path]:
    if not VENV_DMOVERFS.exists():
        pytest.fail(f"{VENV_DMOVERFS} is missing: run scripts/setup (the package installs the dmoverfs command)")
    if os.geteuid() != 0:
        pytest.fail(f"linking {LINK} needs root")
    LINK.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(LINK.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        made = False
        if LINK.is_symlink() or LINK.exists():
            if LINK.resolve() != VENV_DMOVERFS.resolve():
                pytest.fail(f"{LINK} exists and is not this checkout's dmoverfs: the test would run that one")
        else:
            LINK.symlink_to(VENV_DMOVERFS)
            made = True
        try:
            yield LINK
        finally:
            if made:
                LINK.unlink()
    finally:
        os.close(lock)
