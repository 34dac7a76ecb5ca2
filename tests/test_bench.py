"""The benchmark cannot rot: a quick run completes and writes a
well-formed table, JSON and PNG; it cleans up after itself even when
interrupted; and the floor server it compares against does the real work.

No test here asserts a time.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dmio import collect, cut, errno_of, open_session, parse, raw_request, request, run, submit, whole
from dmoverfs import mounting
from dmoverfs.tools import bench

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TARGETED = {"1": 0.8, "2": 0.6, "3": 0.8, "4": 0.8, "5": 0.6, "7": 1.5}
#: Figure 11, shared buffers: each function with one worker, and a copy split across two.
SHARED_FUNCTIONS = ("copy", "fill8", "xor2", "xor16", "iscsi-crc32c")
SHARED = {f"11-{f}": 0.9 for f in SHARED_FUNCTIONS} | {"11-split": 1.3}
#: Figure 11's rows in table order: each function with requests in flight (targeted), then one
#: at a time (context, no target); last the split copy.
SHARED_ROWS = [key for f in SHARED_FUNCTIONS for key in (f"11-{f}", f"11-{f}-1")] + ["11-split"]
EXPECTED_KEYS = set(
    "1 1p 2 2p 3 4 5 5b 6-xor2 6-xor8 6-xor16 6-fill8 7 7k 9-idle 9-idle-after 9-sessions 9-sessions-closed".split()
) | {"8-ctypes.memset", "8-ctypes.memmove", "8-numpy xor2", "8-numpy xor16", "8-google-crc32c"}
#: Ratios reported with no target: figure 10, one per copy size.
REPORTED = {"10-256KiB": 256 << 10, "10-1MiB": 1 << 20}


def bench_env(tmp_path: Path) -> dict[str, str]:
    """Run the benchmark with a private TMPDIR, so that its leftovers can be seen."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp)}


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def assert_nothing_left(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    for fstype in (mounting.FSTYPE, bench.FLOOR_FSTYPE, bench.PYFLOOR_FSTYPE):
        left = [m for m in mounting.mounts(fstype) if str(m).startswith(str(tmp))]
        assert not left, f"mounts left behind: {left}"
    deadline = time.monotonic() + 10
    while processes_mentioning(str(tmp)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes_mentioning(str(tmp)), "processes left behind"
    assert list(tmp.iterdir()) == [], f"temporary files left behind: {list(tmp.iterdir())}"


def test_quick_run_writes_table_json_and_png(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "dmoverfs", "bench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=bench_env(tmp_path),
        timeout=240,
    )
    assert result.returncode == 0, result.stderr + result.stdout

    data = json.loads((out / "bench.json").read_text())
    assert data["settings"]["quick"] is True
    assert data["machine"]["cpus"] >= 1
    figures = {f["key"]: f for f in data["figures"]}
    wanted = EXPECTED_KEYS | set(REPORTED) | set(SHARED_ROWS)
    assert wanted <= set(figures), sorted(wanted - set(figures))
    assert [f["group"] for f in data["figures"]] == sorted(f["group"] for f in data["figures"])
    assert any(k.startswith("9-inflight-") for k in figures)
    for key, fig in figures.items():
        value = fig["value"]
        assert value["runs"] and all(math.isfinite(v) and v > 0 for v in value["runs"]), key
        assert value["median"] > 0, key
        if key in ("1p", "2p", "7k") or key in REPORTED:
            assert fig["ratio"] == pytest.approx(value["median"] / fig["reference"]["median"])
        if key in REPORTED:
            assert fig["op_bytes"] == REPORTED[key]
            assert fig["ops_per_s"]["value"] == pytest.approx(value["median"] * 1e6 / REPORTED[key])
            assert fig["ops_per_s"]["reference"] == pytest.approx(fig["reference"]["median"] * 1e6 / REPORTED[key])
        if key in TARGETED or key in SHARED:
            assert fig["target"] == TARGETED.get(key, SHARED.get(key))
            assert fig["reference"]["median"] > 0
            assert fig["ratio"] == pytest.approx(value["median"] / fig["reference"]["median"])
            assert fig["met"] == (fig["ratio"] >= fig["target"])
        else:
            assert fig["target"] is None and fig["met"] is None, key

    # The table: printed, saved, one row per figure with its ratio and verdict.
    text = (out / "bench.txt").read_text()
    assert text.strip() in result.stdout
    rows = text.splitlines()
    for key in TARGETED:
        row = next(r for r in rows if r.split("  ")[0].strip() == key)
        assert f"{figures[key]['ratio']:.2f}" in row
        assert row.rstrip().endswith("ok" if figures[key]["met"] else "MISS")
    rows_10 = [r for r in rows if r.split("  ")[0].strip() == "10"]
    assert len(rows_10) == len(REPORTED)
    for row, key in zip(rows_10, REPORTED):
        assert f"{figures[key]['ratio']:.2f}" in row and "req/s" in row and "copies/s" in row
    rows_11 = [r for r in rows if r.split("  ")[0].strip() == "11"]
    assert len(rows_11) == len(SHARED_ROWS)
    for row, key in zip(rows_11, SHARED_ROWS):
        assert f"{figures[key]['ratio']:.2f}" in row
        if key in SHARED:
            assert row.rstrip().endswith("ok" if figures[key]["met"] else "MISS")

    png = (out / "bench.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    import matplotlib.image

    image = matplotlib.image.imread(out / "bench.png")
    assert image.shape[0] > 200 and image.shape[1] > 200

    assert_nothing_left(tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_cleans_up(tmp_path, sig):
    env = bench_env(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmoverfs", "bench", "--quick", "--rounds", "50", "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        # Wait until both servers are mounted and measuring, then interrupt.
        deadline = time.monotonic() + 60
        tmp = str(tmp_path / "tmp")
        while time.monotonic() < deadline and proc.poll() is None:
            if any(str(m).startswith(tmp) for m in mounting.mounts(mounting.FSTYPE)) and any(
                str(m).startswith(tmp) for m in mounting.mounts(bench.FLOOR_FSTYPE)
            ):
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.3)
        proc.send_signal(sig)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert_nothing_left(tmp_path)


def test_sources_compile_without_warnings(tmp_path):
    # Strict for the project's code; libfuse's headers are the system's (-isystem
    # overrides pkg-config's -I for the same directory), as libfuse 3.17's own
    # fail -pedantic.
    fuse_dirs = subprocess.run(["pkg-config", "--cflags-only-I", "fuse3"], capture_output=True, text=True, check=True).stdout
    system = [arg for flag in fuse_dirs.split() for arg in ("-isystem", flag.removeprefix("-I"))]
    floor, client, warnings = bench.build(tmp_path, extra_cflags=("-Werror", "-pedantic", *system))
    assert warnings == ""
    assert os.access(floor, os.X_OK) and os.access(client, os.X_OK)


# -- the floor server does the real work (so the comparison is honest) ----------------------


@pytest.fixture(scope="module")
def floor(tmp_path_factory):
    work = tmp_path_factory.mktemp("floor")
    floor_bin, _, _ = bench.build(work)
    mount = bench.Mount("floor", work / "mnt", bench.FLOOR_FSTYPE, work / "floor.log")
    try:
        bench.start_floor(floor_bin, mount, mt=False)
        yield mount.mountpoint
    finally:
        mount.stop()
    assert not mount.mounted()


def test_floor_zeroes_scatter_gather_batches(floor):
    rng = np.random.default_rng(1)
    fd = open_session(floor, "zero")
    try:
        bufs = [np.full(int(rng.integers(1, 70000)), 0xAB, np.uint8) for _ in range(64)]
        reqs = [request(i, out=cut(b, rng), immediate=i * 3) for i, b in enumerate(bufs)]
        responses = run(fd, *reqs)
        assert all(r.error == 0 for r in responses.values())
        assert all(r.immediate == (i * 3).to_bytes(8, "little") for i, r in responses.items())
        assert all(not b.any() for b in bufs)
    finally:
        os.close(fd)


def test_floor_errors(floor):
    fd = os.open(floor / "dmoverio", os.O_RDWR)
    try:
        buf = np.ones(4096, np.uint8)
        assert errno_of(os.write, fd, request(1, out=whole(buf)).packed) == errno.ENXIO
        assert errno_of(os.setxattr, fd, "user.dmover.function", b"copy") == errno.ESRCH
        os.setxattr(fd, "user.dmover.function", b"zero")
        assert errno_of(os.setxattr, fd, "user.dmover.function", b"zero") == errno.EBUSY
        assert errno_of(os.write, fd, b"x" * 39) == errno.EINVAL
        assert errno_of(os.read, fd, 15) == errno.EINVAL
        # An unreadable iovec array: refused if first, else a short write.
        bad = raw_request(8, 1, req_id=9)
        assert errno_of(os.write, fd, bad) == errno.EFAULT
        good = request(2, out=whole(buf))
        assert os.write(fd, good.packed + bad) == 40
        # A request whose output cannot be written fails alone.
        unwritable = request(3, out=[(4096, 4096)])
        assert submit(fd, unwritable, request(4, out=whole(buf))) == 80
        by_id = {r.req_id: r for r in collect(fd, 3)}
        assert by_id[2].error == 0 and by_id[3].error == errno.EFAULT and by_id[4].error == 0
        assert not buf.any()
        os.setxattr(fd, "user.dmover.nonblock", b"1")
        assert errno_of(os.read, fd, 16) == errno.EAGAIN
    finally:
        os.close(fd)


def test_floor_blocking_read_waits_for_a_full_buffer(floor):
    fd = open_session(floor, "zero")
    try:
        bufs = [np.ones(4096, np.uint8) for _ in range(3)]
        got: list = []
        reader = threading.Thread(target=lambda: got.append(parse(os.read(fd, 3 * 16))))
        reader.start()
        for i, b in enumerate(bufs):
            time.sleep(0.05)
            submit(fd, request(i, out=whole(b)))
        reader.join(10)
        assert not reader.is_alive()
        assert sorted(r.req_id for r in got[0]) == [0, 1, 2]
    finally:
        os.close(fd)


def test_floor_blocking_write_waits_for_room(floor):
    fd = open_session(floor, "zero")
    try:
        bufs = [np.ones(512, np.uint8) for _ in range(100)]
        reqs = [request(i, out=whole(b)) for i, b in enumerate(bufs)]
        done: list[int] = []
        writer = threading.Thread(target=lambda: done.append(submit(fd, *reqs)))
        writer.start()
        responses = collect(fd, 100)
        writer.join(10)
        assert done == [100 * 40]
        assert sorted(r.req_id for r in responses) == list(range(100))
    finally:
        os.close(fd)


def test_floor_lets_a_killed_client_go(floor):
    code = (
        "import os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
        "os.setxattr(fd, 'user.dmover.function', b'zero'); print('ready', flush=True); os.read(fd, 16)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(floor / "dmoverio")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
