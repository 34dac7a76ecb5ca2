"""The README's examples run as printed (with the mount point substituted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
DEFAULT_MOUNT = "/run/dmoverfs"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def test_python_examples_are_there():
    # "From Python": the client's example, then the same request by hand; then shared buffers.
    client, raw, shared = blocks("python")
    assert "from dmoverfs import client" in client
    assert "struct.pack" in raw
    assert "shared_buffer" in shared


@pytest.mark.parametrize("index", range(3), ids=["client", "raw", "shared"])
def test_python_example_runs(mnt, index):
    code = blocks("python")[index]
    result = subprocess.run(
        [sys.executable, "-c", code.replace(DEFAULT_MOUNT, str(mnt))], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_shell_example_runs(mnt):
    shell = [b for b in blocks("sh") if "exec 3<>" in b]
    assert len(shell) == 1
    result = subprocess.run(["bash", "-c", shell[0].replace(DEFAULT_MOUNT, str(mnt))], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("nothing ready\n")
    assert '"sessions"' in result.stdout
