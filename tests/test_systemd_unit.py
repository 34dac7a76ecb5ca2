"""The shipped systemd unit (dmoverfs/data/dmoverfs.service).

`systemd-analyze verify` works here without a running systemd: it loads the
unit offline, warns about unknown keys, checks that ExecStart/ExecStop name
executables and that `man:dmoverfs(8)` resolves. It is run on the shipped
file as it is, with /usr/local/bin/dmoverfs linked to this checkout
(tests/default_path.py) and the virtualenv's bin in PATH, so man-db finds the
installed page under .venv/share/man. Any output fails the test, warnings
included. The unit's commands are then run as systemd would run them
(Type=notify: READY=1 expected on $NOTIFY_SOCKET) against a private mount point.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import require_fuse, sanitizer_env
from default_path import LINK, dmoverfs_in_default_path
from dmio import open_session, request, run, whole
from dmoverfs import cli, mounting

UNIT = Path(__file__).resolve().parent.parent / "dmoverfs" / "data" / "dmoverfs.service"
VENV_BIN = Path(sys.executable).parent
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
KEYS = {
    "Unit": {"Description", "Documentation", "Wants", "After", "Before", "Requires", "Conflicts"},
    "Service": {"Type", "ExecStart", "ExecStop", "Restart", "Environment"},
    "Install": {"WantedBy", "RequiredBy"},
}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A strict reading of systemd's unit syntax: sections, Key=Value, # and ; comments, \\ continuations."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    lines = iter(text.splitlines())
    for raw in lines:
        line = raw.strip()
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{raw!r} before any section"
        key, sep, value = line.partition("=")
        assert sep and key.strip() and key.strip().isidentifier(), f"not Key=Value: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def command(line: str) -> tuple[bool, list[str]]:
    """An Exec line as (failure ignored, argv)."""
    ignore = line.startswith("-")
    return ignore, shlex.split(line.lstrip("-"))


def test_unit_is_well_formed_and_runs_dmoverfs():
    unit = parse_unit(UNIT.read_text())
    assert set(unit) == set(KEYS)
    for section, keys in unit.items():
        assert set(keys) <= KEYS[section], f"[{section}]: unexpected {set(keys) - KEYS[section]}"
        for key, values in keys.items():
            assert len(values) == 1 or key in {"Wants", "After"}, f"{key} given twice"
    service = {k: v[0] for k, v in unit["Service"].items()}
    assert service["Type"] == "notify"  # `mount --foreground` sends READY=1 once the mount answers
    assert unit["Unit"]["Documentation"] == ["man:dmoverfs(8)"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]

    parser = cli.build_parser()
    ignore, start = command(service["ExecStart"])
    assert not ignore and start[0] == str(LINK)
    args = parser.parse_args(start[1:])
    assert args.func is cli.cmd_mount and args.foreground and args.mountpoint == "/run/dmoverfs"
    ignore, stop = command(service["ExecStop"])
    assert ignore and stop[0] == str(LINK)  # "-": nothing left to unmount is not a failure
    args = parser.parse_args(stop[1:])
    assert args.func is cli.cmd_unmount and args.mountpoint == "/run/dmoverfs"
    # The page Documentation= names ships with the package.
    page = UNIT.with_name("dmoverfs.8").read_text()
    assert page.splitlines()[2].startswith(".TH DMOVERFS 8 ")


def test_systemd_analyze_verify():
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: install the systemd package (scripts/setup does)")
    with dmoverfs_in_default_path():
        result = subprocess.run(
            [analyze, "verify", str(UNIT)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PATH": f"{VENV_BIN}:{SYSTEMD_PATH}", "SYSTEMD_LOG_COLOR": "0"},
            cwd=UNIT.parent,
        )
    assert (result.returncode, result.stdout + result.stderr) == (0, ""), result.stdout + result.stderr


def test_systemd_analyze_verify_catches_mistakes(tmp_path):
    """The check above can fail: a misspelt key and a missing program are reported."""
    bad = tmp_path / "dmoverfs.service"
    bad.write_text(
        UNIT.read_text().replace("Restart=on-failure", "Restrat=on-failure").replace(str(LINK), str(tmp_path / "missing"))
    )
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(bad)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Unknown key" in out and "Restrat" in out and "is not executable" in out


def test_unit_commands_as_systemd_runs_them(tmp_path):
    """ExecStart under Type=notify: READY=1 once the mount works; ExecStop removes it."""
    require_fuse()
    service = {k: v[0] for k, v in parse_unit(UNIT.read_text())["Service"].items()}
    point = tmp_path / "mnt"  # instead of /run/dmoverfs, which a real installation may be using

    def argv(line: str) -> list[str]:
        return [str(point) if word == "/run/dmoverfs" else word for word in command(line)[1]]

    sock_path = tmp_path / "notify"
    log_path = tmp_path / "journal"
    with dmoverfs_in_default_path(), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, open(log_path, "wb") as log:
        sock.bind(str(sock_path))
        sock.settimeout(60)
        env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", "NOTIFY_SOCKET": str(sock_path)}  # as systemd sets for root
        env.update(sanitizer_env())  # scripts/test --sanitize
        main = subprocess.Popen(argv(service["ExecStart"]), env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/")
        try:
            fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())
            assert fields["READY"] == "1" and int(fields["MAINPID"]) == main.pid
            fd = open_session(point, "copy")
            try:
                src, dst = np.arange(1000, dtype=np.uint32), np.zeros(1000, np.uint32)
                assert run(fd, request(1, out=whole(dst), inputs=[whole(src)]))[1].error == 0
                assert (dst == src).all()
            finally:
                os.close(fd)
            assert json.loads((point / "stats").read_text())["server"]["pid"] == main.pid
            stop = subprocess.run(argv(service["ExecStop"]), env=env, capture_output=True, text=True, timeout=60, cwd="/")
            assert stop.returncode == 0, stop.stderr
            assert main.wait(30) == 0
        finally:
            if main.poll() is None:
                main.kill()
                main.wait()
            if mounting.is_mounted(point):
                mounting.lazy_unmount(point)
    assert not mounting.is_mounted(point)
    assert "Traceback" not in log_path.read_text()
