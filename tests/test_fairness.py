"""The fairness benchmark cannot rot: a quick run against real mounts completes,
with another user as the attacker, and reports every figure; it leaves no
mount, process, file or user behind, even when interrupted mid-attack.

No test here asserts a time.
"""

from __future__ import annotations

import json
import math
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_bench

from dmoverfs import mounting
from dmoverfs.tools import fairness
from users import kill_and_wait, pids_of_uid

PHASES = ["idle", "a", "b1", "b2", "c", "idle-after"]  # --quick: flood with 1 and 2 threads
FAIRNESS = [sys.executable, "-m", "dmoverfs.tools.fairness"]
ATTACKS = {"a": ("monopoly", 2), "b1": ("flood", 1), "b2": ("flood", 2), "c": ("sessions", 20)}


def fairness_users() -> set[str]:
    return {entry.pw_name for entry in pwd.getpwall() if entry.pw_name.startswith("dmvfair")}


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory whose ``tmp`` is the run's TMPDIR, searchable by the attacker's uid
    (pytest's own temporary root is private). Afterwards, whatever a failed run left
    is taken down: mounts, the attacker user's processes, the user, the files."""
    users_before = fairness_users()
    path = Path(tempfile.mkdtemp(prefix="dmoverfs-fairness-test-", dir="/tmp"))
    os.chmod(path, 0o711)
    (path / "tmp").mkdir(mode=0o711)
    try:
        yield path
    finally:
        for mnt in mounting.mounts():
            if str(mnt).startswith(str(path)):
                mounting.lazy_unmount(mnt)
        for name in fairness_users() - users_before:
            kill_and_wait(pids_of_uid(pwd.getpwnam(name).pw_uid))
            subprocess.run(["userdel", name], capture_output=True)
            subprocess.run(["groupdel", name], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


def run_env(base: Path) -> dict[str, str]:
    return {**os.environ, "TMPDIR": str(base / "tmp")}


def assert_nothing_left(base: Path, users_before: set[str]) -> None:
    """No mount, process or file under the run's TMPDIR, and no user of its own left."""
    test_bench.assert_nothing_left(base)
    assert fairness_users() <= users_before, f"users left behind: {fairness_users() - users_before}"


def quick_run(base: Path, out: Path, reference: str) -> dict:
    """A --quick --json run against the reference server options *reference*; its JSON."""
    result = subprocess.run(
        [*FAIRNESS, "--quick", "--json", "--out", str(out), "--reference-options", reference],
        capture_output=True,
        text=True,
        env=run_env(base),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return json.loads(result.stdout)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_reports_every_figure(base, tmp_path):
    out = tmp_path / "out"
    users_before = fairness_users()
    data = quick_run(base, out, "--queue-depth 64")
    assert data == json.loads((out / "fairness.json").read_text())
    assert data["settings"]["quick"] is True

    # The attacker was another user, made for the run (the tests run as root).
    attacker = data["attacker"]
    assert attacker["other_user"] and attacker["created"] and attacker["uid"] != os.geteuid()

    phases = {p["key"]: p for p in data["phases"]}
    assert [p["key"] for p in data["phases"]] == PHASES
    for key, phase in phases.items():
        assert [v["func"] for v in phase["victims"]] == (["zero", "copy"] if key == "a" else ["zero"]), key
        for v in phase["victims"]:
            assert v["error"] is None, (key, v["error"])
            assert v["round_trips"] > 0, key
            assert all(positive(v[k]) for k in ("p50_s", "p99_s", "max_s", "mean_s")), (key, v)
            assert v["p50_s"] <= v["p99_s"] <= v["max_s"], (key, v)
        if key not in ATTACKS:
            assert phase["attack"] is None
            continue
        attack = phase["attack"]
        mode, sessions = ATTACKS[key]
        assert attack["mode"] == mode and attack["error"] is None, attack
        assert attack["stopped"] == "SIGTERM" and attack["settled"], attack
        assert attack["recovery_s"] >= 0
        counters = attack["counters"]
        assert counters["sessions"] == sessions and positive(counters["written"]), counters
        assert 0 <= counters["completed"] <= counters["written"]
        assert counters["failed"] == 0, counters

    # Every target is reported with its verdict.
    checks = {c["what"]: c for c in data["checks"]}
    for label in ("(a) monopoly", "(b) flood x1", "(b) flood x2", "(c) sessions"):
        p99 = checks[f"{label}: 4 KiB zero p99"]
        assert p99["target"] == fairness.P99_TARGET_S and p99["op"] == "<="
        ratio = checks[f"{label}: 4 KiB zero p50 / idle p50"]
        assert ratio["target"] == fairness.P50_RATIO_TARGET
        key = next(k for k, p in phases.items() if p["label"] == label)
        assert ratio["value"] == pytest.approx(phases[key]["victims"][0]["p50_s"] / phases["idle"]["victims"][0]["p50_s"])
        for check in (p99, ratio):
            assert check["met"] == (check["value"] <= check["target"])
    copy = checks["(a) monopoly: 1 MiB copy, longest round trip"]
    assert copy["value"] == phases["a"]["victims"][1]["max_s"] and copy["target"] == fairness.COPY_MAX_TARGET_S

    # Slicing, against a reference mount any server accepts.
    slicing = data["slicing"]
    slice_checks = [c for c in data["checks"] if c["what"].startswith("slicing:")]
    assert slicing["measured"] and len(slice_checks) == 2
    assert [r["size"] for r in slicing["rows"]] == [1 << 20, 4 << 20]
    for row, check in zip(slicing["rows"], slice_checks):
        assert len(row["default_mbps"]) == len(row["unsliced_mbps"]) == 1
        assert all(positive(x) for x in row["default_mbps"] + row["unsliced_mbps"])
        assert check["value"] == pytest.approx(row["default_median"] / row["unsliced_median"])
        assert check["met"] == (check["value"] >= fairness.SLICING_TARGET)

    # The table: every check on a line of its own, with its verdict.
    text = (out / "fairness.txt").read_text()
    for what, check in checks.items():
        line = next(line for line in text.splitlines() if line.startswith(what))
        assert {True: "PASS", False: "MISS", None: "n/a"}[check["met"]] in line, line

    assert_nothing_left(base, users_before)


def test_interrupted_mid_attack_cleans_up(base, tmp_path):
    users_before = fairness_users()
    log = tmp_path / "stderr"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [*FAIRNESS, "--quick", "--seconds", "3"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=run_env(base),
        )
    try:
        # Interrupt while the monopoly attacker runs and a victim waits on it.
        deadline = time.monotonic() + 120
        while "(a) monopoly: 4 KiB zero victim" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        time.sleep(0.5)
        running = test_bench.processes_mentioning(str(base / "tmp"))
        assert any(" monopoly " in p for p in running) and any(" victim " in p for p in running), running
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, log.read_text()
    assert "interrupted" in log.read_text()
    assert_nothing_left(base, users_before)


def test_a_refused_reference_mount_is_reported_not_measured(base, tmp_path):
    users_before = fairness_users()
    data = quick_run(base, tmp_path, "--no-such-tunable 0")
    assert not data["slicing"]["measured"] and data["slicing"]["rows"] == []
    assert "the server refused --no-such-tunable 0" in data["slicing"]["reason"]
    assert "--no-such-tunable" in data["slicing"]["reason"].split(":", 1)[1]  # the server's own words
    slice_checks = [c for c in data["checks"] if c["what"].startswith("slicing:")]
    assert len(slice_checks) == 2 and all(c["value"] is None and c["met"] is None for c in slice_checks)
    assert all(v["round_trips"] > 0 for p in data["phases"] for v in p["victims"])  # the rest was measured
    assert f"NOT MEASURED: {data['slicing']['reason']}" in (tmp_path / "fairness.txt").read_text()
    assert_nothing_left(base, users_before)


def test_sources_compile_without_warnings(tmp_path):
    cc = os.environ.get("CC") or shutil.which("cc") or "gcc"
    src = fairness.BENCH_SRC / "fairness.c"
    cmd = [
        cc,
        *fairness.CFLAGS,
        "-Werror",
        "-pedantic",
        "-pthread",
        f"-I{fairness.INCLUDE_DIR}",
        "-o",
        str(tmp_path / "f"),
        str(src),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr
