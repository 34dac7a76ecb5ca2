"""The Go and Rust client examples (csrc/examples/go, csrc/examples/rust).

Each is built with the machine's toolchain (a missing one is a failure, never
a skip) into a temporary directory, offline, with warnings as errors, and run
against a real mount. Their wire layout is compared with what a C program
compiled against the header prints; their CRC32C and XOR results with
google_crc32c and numpy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
from test_examples import CRC_CHECK, EXAMPLES, FUNCTIONS, header_layout

from dmoverfs import wire

GO_DIR = EXAMPLES / "go"
RUST_DIR = EXAMPLES / "rust"
BUILD_TIMEOUT_S = 900  # a first Go build compiles the standard library on a shared 2-core machine
RUN_TIMEOUT_S = 120  # guards against hangs, not a performance bound
LANGUAGES = ["go", "rust"]
CHECKS = [*FUNCTIONS, "order", "nonblock", "errors"]


@dataclass
class Built:
    program: Path
    source: Path
    tree_before: dict[str, tuple[int, int]]


def toolchain(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: the examples' tests need it (scripts/setup installs {package})")
    return path


def tree(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under directory, with its size and modification time."""
    return {
        str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def build(source: Path, env: dict[str, str], commands: list[list[str]], program: Path) -> Built:
    """Run the build commands in source with env added to this environment."""
    before = tree(source)
    for cmd in commands:
        try:
            proc = subprocess.run(
                cmd, cwd=source, env={**os.environ, **env}, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(cmd)} did not finish within {BUILD_TIMEOUT_S} s")
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return Built(program, source, before)


@pytest.fixture(scope="module")
def go_demo(tmp_path_factory: pytest.TempPathFactory) -> Built:
    go = toolchain("go", "golang-go")
    work = tmp_path_factory.mktemp("go")
    env = {
        "GOCACHE": str(work / "cache"),
        "GOPATH": str(work / "gopath"),
        "GOENV": "off",
        "GOFLAGS": "",
        "GOPROXY": "off",  # no dependencies: nothing to fetch
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
    }
    program = work / "dmoverdemo"
    return build(GO_DIR, env, [[go, "vet", "./..."], [go, "build", "-o", str(program), "./cmd/dmoverdemo"]], program)


@pytest.fixture(scope="module")
def rust_demo(tmp_path_factory: pytest.TempPathFactory) -> Built:
    cargo = toolchain("cargo", "cargo")
    toolchain("rustc", "rustc")
    work = tmp_path_factory.mktemp("rust")
    env = {"CARGO_HOME": str(work / "cargo-home"), "CARGO_TARGET_DIR": str(work / "target"), "RUSTFLAGS": "-D warnings"}
    program = work / "target" / "release" / "dmoverdemo"
    return build(RUST_DIR, env, [[cargo, "build", "--offline", "--locked", "--release"]], program)


@pytest.fixture(params=LANGUAGES)
def demo(request: pytest.FixtureRequest) -> Built:
    return request.getfixturevalue(f"{request.param}_demo")


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return header_layout(tmp_path_factory.mktemp("layout"))


def run(built: Built, *args: object) -> subprocess.CompletedProcess:
    cmd = [str(built.program), *map(str, args)]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} did not finish within {RUN_TIMEOUT_S} s:\n{exc.stdout!r}\n{exc.stderr!r}")


def ok_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert (proc.returncode, proc.stderr) == (0, ""), f"{proc.args}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout.splitlines()


def test_builds_leave_the_source_tree_alone(demo):
    assert tree(demo.source) == demo.tree_before


def test_layout_is_the_c_headers(demo, c_layout):
    lines = ok_lines(run(demo, "layout"))
    facts = dict(line.rpartition(" ")[::2] for line in lines)
    assert len(facts) == len(lines)
    assert facts == {key: c_layout[key] for key in facts}
    expected = {key for key in c_layout if "dmio_setfunc" not in key and key != "const DMIO_SETFUNC"}
    assert set(facts) == expected


def test_every_function(demo, mnt):
    lines = ok_lines(run(demo, "run", mnt))
    assert [line.split(":")[0] for line in lines] == [*CHECKS, "dmoverdemo"]
    assert all(": ok (" in line for line in lines[:-1]), lines
    assert lines[-1] == "dmoverdemo: all checks passed"
    crc = next(line for line in lines if line.startswith("iscsi-crc32c:"))
    assert f"check value 0x{CRC_CHECK:08x}, chained 0x{CRC_CHECK:08x}" in crc
    depth = wire.NREQS_MAX
    assert f"nonblock: ok (queue full after {depth} requests, {depth} results read after poll)" in lines


def test_nonblocking_use_meets_the_mounts_queue_depth(demo, server_factory):
    srv = server_factory("--queue-depth", "5")
    lines = ok_lines(run(demo, "run", srv.mountpoint, "nonblock"))
    assert lines == ["nonblock: ok (queue full after 5 requests, 5 results read after poll)", "dmoverdemo: all checks passed"]


@pytest.mark.parametrize("size", [0, 1, 300_001])
def test_crc32c_of_a_file(demo, mnt, tmp_path, size):
    data = np.random.default_rng(size).bytes(size)
    (tmp_path / "data").write_bytes(data)
    assert ok_lines(run(demo, "crc32c", mnt, tmp_path / "data")) == [f"0x{google_crc32c.value(data):08x}"]


@pytest.mark.parametrize("n", [2, 7, 16])
def test_xor_of_files(demo, mnt, tmp_path, n):
    rng = np.random.default_rng(n)
    inputs = [rng.integers(0, 256, 65_537, dtype=np.uint8) for _ in range(n)]
    for i, data in enumerate(inputs):
        (tmp_path / f"in{i}").write_bytes(data.tobytes())
    assert ok_lines(run(demo, "xor", mnt, tmp_path / "out", *(tmp_path / f"in{i}" for i in range(n)))) == []
    assert (tmp_path / "out").read_bytes() == np.bitwise_xor.reduce(inputs).tobytes()


def test_a_missing_mount_is_named_with_a_hint(demo, tmp_path):
    proc = run(demo, "run", tmp_path / "absent")
    assert (proc.returncode, proc.stdout) == (1, "zero: FAILED\n")
    assert proc.stderr.startswith(f"dmoverdemo: zero: open on {tmp_path / 'absent' / 'dmoverio'}: ")
    assert "no such file or directory" in proc.stderr.lower()
    assert proc.stderr.endswith("(is dmoverfs mounted there? dmoverfs mount DIR)\n")


def test_a_file_that_is_no_session_is_named(demo, tmp_path):
    """dmoverio is /dev/null: it opens, fsetxattr fails, and the message says which step and why."""
    (tmp_path / "dmoverio").symlink_to("/dev/null")
    proc = run(demo, "run", tmp_path, "copy")
    assert (proc.returncode, proc.stdout) == (1, "copy: FAILED\n")
    step = f'dmoverdemo: copy: select function "copy" (fsetxattr user.dmover.function) on {tmp_path / "dmoverio"}: '
    assert proc.stderr.startswith(step)
    assert "operation not permitted" in proc.stderr.lower()
    assert proc.stderr.endswith("(not a dmoverfs session)\n")


def test_usage(demo):
    proc = run(demo, "frobnicate")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.startswith("usage: dmoverdemo run MOUNTPOINT [CHECK...]")
