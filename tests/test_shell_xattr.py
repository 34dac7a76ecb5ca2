"""A shell configures a session with setfattr/getfattr on /proc/$$/fd/N.

bash opens a session with ``exec N<>``; the attributes set through the
shell's descriptor are the session's: a program that inherits the descriptor
finds the function selected (an xor3 request gives the XOR of its inputs),
and the nonblock attribute makes its reads fail with EAGAIN. The README's
example runs as printed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEFAULT_MOUNT = "/run/dmoverfs"
RUN_TIMEOUT_S = 60  # guards against hangs, not a performance bound

#: Run with the session on descriptor 3: one xor3 request of 1, 2 and 4 bytes.
XOR3_CHILD = """
import numpy as np
import dmio
inputs = [np.full(4096, bit, dtype=np.uint8) for bit in (1, 2, 4)]
out = np.zeros(4096, dtype=np.uint8)
resp = dmio.run(3, dmio.request(9, out=dmio.whole(out), inputs=[dmio.whole(a) for a in inputs]))[9]
print("child", resp.error, sorted(set(out.tolist())))
"""


def bash(script: str, mnt: Path, **variables: str) -> subprocess.CompletedProcess:
    """Run script under bash with MNT, PYTHON, the tests' modules on PYTHONPATH, and variables."""
    for tool in ("bash", "setfattr", "getfattr"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: install bash and attr (scripts/setup does)")
    env = {**os.environ, "MNT": str(mnt), "PYTHON": sys.executable, "PYTHONPATH": str(ROOT / "tests"), **variables}
    try:
        return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the script did not finish within {RUN_TIMEOUT_S} s:\n{exc.stdout!r}\n{exc.stderr!r}")


def test_function_set_through_the_shells_descriptor_is_the_sessions(mnt):
    script = """
    exec 3<> "$MNT/dmoverio"
    getfattr --absolute-names -n user.dmover.function /proc/$$/fd/3 2>&1 | sed "s/$$/PID/"; echo "before ${PIPESTATUS[0]}"
    setfattr -n user.dmover.function -v xor3 /proc/$$/fd/3; echo "set $?"
    echo "function $(getfattr --absolute-names --only-values -n user.dmover.function /proc/$$/fd/3)"
    setfattr -n user.dmover.function -v copy /proc/$$/fd/3 2>&1 | sed "s/$$/PID/"; echo "again ${PIPESTATUS[0]}"
    "$PYTHON" -c "$CHILD"
    exec 4<> "$MNT/dmoverio"
    setfattr -n user.dmover.function -v no-such /dev/fd/4 2>&1; echo "unknown ${PIPESTATUS[0]}"
    setfattr -n user.dmover.function -v zero "$MNT/dmoverio" 2>&1; echo "clone ${PIPESTATUS[0]}"
    exec 3<&- 4<&-
    """
    proc = bash(script, mnt, CHILD=XOR3_CHILD)
    assert proc.stderr == ""
    assert proc.stdout.splitlines() == [
        "/proc/PID/fd/3: user.dmover.function: No such attribute",
        "before 1",
        "set 0",
        "function xor3",
        "setfattr: /proc/PID/fd/3: Device or resource busy",
        "again 1",
        "child 0 [7]",
        "setfattr: /dev/fd/4: No such process",
        "unknown 1",
        f"setfattr: {mnt}/dmoverio: Operation not supported",
        "clone 1",
    ]


def test_nonblock_set_through_the_shells_descriptor(mnt):
    """A read with nothing outstanding would wait; with the attribute it fails with EAGAIN at once."""
    script = """
    exec 3<> "$MNT/func/zero"
    setfattr -n user.dmover.nonblock -v 1 /proc/$$/fd/3
    echo "nonblock $(getfattr --absolute-names --only-values -n user.dmover.nonblock /proc/$$/fd/3)"
    timeout -s KILL 20 dd bs=16 count=1 status=none <&3 2>&1; echo "dd $?"
    exec 3<&-
    """
    proc = bash(script, mnt)
    assert proc.stderr == ""
    assert proc.stdout.splitlines() == [
        "nonblock 1",
        "dd: error reading 'standard input': Resource temporarily unavailable",
        "dd 1",
    ]


def test_readme_example_runs(server):
    [block] = [b for b in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S) if "setfattr" in b]
    proc = bash(block.replace(DEFAULT_MOUNT, str(server.mountpoint)), server.mountpoint)
    assert (proc.returncode, proc.stderr) == (0, "")
    lines = proc.stdout.splitlines()
    assert lines[0] == "xor3"
    assert re.fullmatch(r"# file: /proc/\d+/fd/5", lines[1])
    assert lines[2:] == [
        'user.dmover.function="xor3"',
        'user.dmover.nonblock="1"',
        f'user.dmover.server="{server.pid}"',
        "",
    ]
