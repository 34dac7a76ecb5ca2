"""Where things live: the default mount point and the server's log file."""

from __future__ import annotations

import os
from pathlib import Path

MOUNTPOINT_ENV = "DMOVERFS_MOUNTPOINT"


def default_mountpoint() -> Path:
    """The mount point used when none is given.

    ``$DMOVERFS_MOUNTPOINT`` if set; ``/run/dmoverfs`` for root; otherwise
    ``$XDG_RUNTIME_DIR/dmoverfs``, or ``/tmp/dmoverfs-UID`` without one.
    """
    env = os.environ.get(MOUNTPOINT_ENV)
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/dmoverfs")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "dmoverfs"
    return Path(f"/tmp/dmoverfs-{os.geteuid()}")


def default_log_file(mountpoint: Path) -> Path:
    """The log of a background server: ``$XDG_STATE_HOME/dmoverfs/<mount>.log``."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    name = str(mountpoint.resolve()).strip("/").replace("/", "-") or "root"
    return Path(state) / "dmoverfs" / f"{name}.log"
