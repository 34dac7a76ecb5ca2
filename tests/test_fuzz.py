"""The fuzzer of the C core's request path (csrc/fuzz), run briefly.

csrc/fuzz/fuzz_decode.c is built with clang (libFuzzer, AddressSanitizer,
UBSan) into a temporary directory, fuzzed for FUZZ_SECONDS from the checked-in
seeds, and made to replay every input that once found a bug.  Its model of
SPEC.md is itself checked: a sabotaged client byte or response must be
reported.  clang missing is a failure (scripts/setup installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FUZZ = REPO / "csrc" / "fuzz"
FUZZ_SECONDS = 15
MIN_RUNS = 2000  # a few thousand a second on an idle machine


def fuzz_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, TMPDIR=str(tmp), **extra)
    # scripts/test --sanitize preloads gcc's ASan runtime; clang's is linked
    # into the fuzzer, and leak checking must stay on.
    for name in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS"):
        env.pop(name, None)
    if "DMOVERFS_FUZZ_SABOTAGE" not in extra:
        env.pop("DMOVERFS_FUZZ_SABOTAGE", None)
    return env


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("clang") is None:
        pytest.fail("clang is missing: scripts/setup installs it (clang, libclang-rt-dev)")
    tmp = tmp_path_factory.mktemp("fuzz-build")
    out = tmp / "fuzz_decode"
    proc = subprocess.run([str(FUZZ / "build.sh"), str(out)], capture_output=True, text=True, env=fuzz_env(tmp), timeout=600)
    assert proc.returncode == 0, f"building the fuzzer failed:\n{proc.stdout}{proc.stderr}"
    return out


def run(fuzzer: Path, tmp: Path, *args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(fuzzer), *args], capture_output=True, text=True, env=fuzz_env(tmp, **env), cwd=tmp, timeout=timeout
    )
    assert_no_leftover(fuzzer)
    return proc


def assert_no_leftover(fuzzer: Path) -> None:
    """The fuzzer's client children die with it."""
    left = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.readlink(proc / "exe").removesuffix(" (deleted)") == str(fuzzer):
                    left.append(int(proc.name))
            except OSError:
                pass
    assert not left, f"fuzzer processes left behind: {left}"


def tail(proc: subprocess.CompletedProcess, lines: int = 60) -> str:
    return "\n".join((proc.stdout + proc.stderr).splitlines()[-lines:])


def test_fuzzer_runs_clean(fuzzer, tmp_path):
    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    corpus.mkdir()
    artifacts.mkdir()
    proc = run(
        fuzzer,
        tmp_path,
        f"-max_total_time={FUZZ_SECONDS}",
        "-max_len=8192",
        "-timeout=60",
        "-print_final_stats=1",
        f"-dict={FUZZ / 'fuzz_decode.dict'}",
        f"-artifact_prefix={artifacts}/",
        str(corpus),
        str(FUZZ / "corpus"),
        str(FUZZ / "regressions"),
        timeout=FUZZ_SECONDS * 4 + 120,
    )
    assert proc.returncode == 0, f"the fuzzer found something (input in {artifacts}):\n{tail(proc)}"
    assert not list(artifacts.iterdir())
    runs = re.search(r"stat::number_of_executed_units: (\d+)", proc.stderr)
    assert runs is not None, tail(proc)
    assert int(runs.group(1)) >= MIN_RUNS, tail(proc)
    cov = re.findall(r"\bcov: (\d+)", proc.stderr)
    assert cov and int(cov[-1]) >= 250, f"coverage too low:\n{tail(proc)}"  # the seeds alone reach ~300


@pytest.mark.parametrize("case", sorted(p.name for p in (FUZZ / "regressions").iterdir()))
def test_regression_input(fuzzer, tmp_path, case):
    proc = run(fuzzer, tmp_path, str(FUZZ / "regressions" / case), timeout=120)
    assert proc.returncode == 0, tail(proc)
    assert "Executed" in proc.stderr, tail(proc)


@pytest.mark.parametrize("seed", ["copy.bin", "xor3-worker.bin", "crc-capped.bin"])
@pytest.mark.parametrize("sabotage", ["byte", "resp"])
def test_model_catches_a_faulty_core(fuzzer, tmp_path, seed, sabotage):
    proc = run(fuzzer, tmp_path, str(FUZZ / "corpus" / seed), timeout=120, DMOVERFS_FUZZ_SABOTAGE=sabotage)
    assert proc.returncode != 0, tail(proc)
    assert "MODEL MISMATCH" in proc.stderr, tail(proc)


def test_window_address_is_the_same_everywhere():
    """The harness, the seeds and the dictionary place the client window at one address."""
    harness = re.search(r"^#define WIN\s+\(\(uint64_t\)(0x[0-9a-fA-F]+)\)", (FUZZ / "fuzz_decode.c").read_text(), re.M)
    assert harness is not None, "fuzz_decode.c: no #define WIN"
    win = int(harness.group(1), 16)
    seeds = re.search(r"^WIN = (0x[0-9a-fA-F]+)", (FUZZ / "make_seeds.py").read_text(), re.M)
    assert seeds is not None and int(seeds.group(1), 16) == win
    entries = dict(re.findall(r'^(\w+)="(.*)"$', (FUZZ / "fuzz_decode.dict").read_text(), re.M))
    stub = entries["stub"].encode().decode("unicode_escape").encode("latin-1")
    assert int.from_bytes(stub, "little") == win


def test_seed_corpus_is_what_make_seeds_writes(tmp_path):
    subprocess.run([sys.executable, str(FUZZ / "make_seeds.py"), str(tmp_path)], check=True, capture_output=True)
    fresh = {p.name: p.read_bytes() for p in tmp_path.glob("*.bin")}
    checked_in = {p.name: p.read_bytes() for p in (FUZZ / "corpus").glob("*.bin")}
    assert sorted(fresh) == sorted(checked_in)
    assert [name for name in fresh if fresh[name] != checked_in[name]] == []
