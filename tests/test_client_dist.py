"""The client-only distribution (client/pyproject.toml): built and installed without the server.

The wheel is built from the checkout with the build back-end only (no
network, no build isolation, CC pointing at a program that fails), installed
with ``pip --no-index`` into a fresh virtualenv, and used there against a
mount served by the full install. Oracles: the wheel's file list and tag,
what the fresh environment can import, the bytes moved (compared here), and
google-crc32c for the CRC.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import google_crc32c
import pytest

REPO = Path(__file__).resolve().parent.parent

#: Runs in the fresh environment (-I: no PYTHONPATH, no current directory on sys.path).
USE_CLIENT = """
import importlib.util, json, os, sys
from dmoverfs import client
mnt = sys.argv[1]
src = bytes(range(256)) * 64
dst = bytearray(len(src))
client.copy(mnt, dst, src)
try:
    client.Session(mnt, "no-such-function")
    unknown = None
except client.UnknownFunction as exc:
    unknown = exc.functions
print(json.dumps({
    "client_file": client.__file__,
    "copied": dst == src,
    "crc": client.crc32c(mnt, src),
    "functions": client.functions(mnt),
    "unknown_lists": unknown,
    "importable": {m: importlib.util.find_spec(m) is not None for m in ("pyfuse3", "trio", "cffi", "dmoverfs.server")},
    "exporter": client._EXPORTER.name,
}))
"""


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, **kwargs)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("client-wheel")
    env = {**os.environ, "CC": "/bin/false", "CXX": "/bin/false"}  # any attempt to compile fails the build
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation", "-w", str(out)]
    run([*argv, str(REPO / "client")], env=env)
    (built,) = out.glob("*.whl")
    return built


def test_the_wheel_is_pure_python_with_only_the_client(wheel):
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name  # no compiled code: any platform
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [line for line in zf.read(metadata).decode().splitlines() if line.startswith("Requires-Dist:")]
    modules = sorted(n for n in names if not n.split("/")[0].endswith(".dist-info"))
    assert modules == ["dmoverfs/__init__.py", "dmoverfs/client.py", "dmoverfs/paths.py", "dmoverfs/wire.py"]
    assert requires == []
    # The same modules as the server's distribution: the files are links to them.
    with zipfile.ZipFile(wheel) as zf:
        for name in modules:
            assert zf.read(name) == (REPO / name).read_bytes(), name


def test_client_only_install_works_against_a_full_install_mount(wheel, tmp_path, mnt):
    venv = tmp_path / "venv"
    run([sys._base_executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", "--no-index", "--no-cache-dir", str(wheel)])
    installed = json.loads(run([str(python), "-m", "pip", "list", "--format=json"]).stdout)
    assert {p["name"] for p in installed} - {"pip", "setuptools"} == {"dmoverfs-client"}
    site = Path(run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    assert not [p for p in site.rglob("*") if p.suffix in (".so", ".c", ".h")]  # no C built or shipped

    got = json.loads(run([str(python), "-I", "-c", USE_CLIENT, str(mnt)], cwd=tmp_path).stdout)
    assert Path(got["client_file"]).is_relative_to(venv)  # the installed copy, not the checkout
    assert got["importable"] == {"pyfuse3": False, "trio": False, "cffi": False, "dmoverfs.server": False}
    assert got["exporter"] == "ctypes"
    src = bytes(range(256)) * 64
    assert got["copied"] is True
    assert got["crc"] == int.from_bytes(google_crc32c.Checksum(src).digest(), "big")
    assert got["functions"] == sorted(os.listdir(mnt / "func"))
    assert got["unknown_lists"] == got["functions"]
