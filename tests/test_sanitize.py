"""Which build of the server's C (core and transport) this run uses, and (under scripts/test --sanitize)
that the sanitizer runtime reaches every process that loads it and no other.

A plain run must use the normal core, whatever an earlier sanitized run
installed: scripts/setup's build stamp records the flavour and rebuilds.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SANITIZE = bool(os.environ.get("DMOVERFS_SANITIZE"))


def asan_in_maps(pid: int | str = "self") -> bool:
    return "libasan" in Path(f"/proc/{pid}/maps").read_text()


def test_installed_core_is_the_flavour_of_this_run():
    import dmoverfs._server as core

    sanitized = b"__asan_report" in Path(core.__file__).read_bytes()
    assert sanitized == SANITIZE, f"{core.__file__} sanitized={sanitized}, DMOVERFS_SANITIZE={SANITIZE}"


def test_sanitizer_runtime_is_in_python_processes_only(server):
    assert asan_in_maps() == SANITIZE, "pytest itself"
    assert asan_in_maps(server.pid) == SANITIZE, "the server"
    # Programs that are not Python run without it (preloaded, it can deadlock them).
    env = subprocess.run(["env"], capture_output=True, text=True, check=True).stdout
    assert not [line for line in env.splitlines() if line.startswith("LD_PRELOAD=") and "libasan" in line]
