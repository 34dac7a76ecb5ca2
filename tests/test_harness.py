"""The harness cleans up after failing tests: no mount, process or temporary file is left."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dmoverfs import mounting

HERE = Path(__file__).resolve().parent


def server_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "dmoverfs mount --foreground"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def test_failing_tests_leave_nothing_behind(tmp_path):
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    mounts_before, pids_before = set(mounting.mounts()), server_pids()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "harness_cases" / "failing_cases.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=HERE.parent,
        env={**os.environ, "TMPDIR": str(private_tmp)},
    )
    assert "3 failed" in result.stdout, result.stdout + result.stderr
    assert set(mounting.mounts()) == mounts_before
    assert server_pids() == pids_before
    assert list(private_tmp.iterdir()) == []
