"""The harness cleans up after failing tests: no mount, process or temporary file is left."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dmoverfs import mounting

HERE = Path(__file__).resolve().parent


def server_pids(under: Path) -> set[int]:
    """Servers whose mount point lies under *under* (other runs may have their own)."""
    out = subprocess.run(["pgrep", "-f", f"dmoverfs mount --foreground.*{under}"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def test_failing_tests_leave_nothing_behind(tmp_path):
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "harness_cases" / "failing_cases.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=HERE.parent,
        env={**os.environ, "TMPDIR": str(private_tmp)},
    )
    assert "3 failed" in result.stdout, result.stdout + result.stderr
    # The child run kept everything under its TMPDIR: nothing of it may be left.
    assert [m for m in mounting.mounts() if str(m).startswith(str(private_tmp))] == []
    assert server_pids(private_tmp) == set()
    assert list(private_tmp.iterdir()) == []
