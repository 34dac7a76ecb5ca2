"""``dmoverfs bench``: dmoverfs against a C floor server and the kernel's own copy limits.

In one run, on this machine: build the floor server (``csrc/bench/floor.c``, a
minimal libfuse low-level server of the ``zero`` function on the same wire
format) and the measuring client (``csrc/bench/client.c``); mount the floor
and dmoverfs on temporary mount points; measure every figure (1 to 11) as
medians over alternating runs (A B A B ...); print a table of ratios against
their targets; write ``bench.json`` (every run of every figure) and
``bench.png`` (a chart) into the output directory.

Ratios are what count: these machines are shared and noisy, so a figure is
only ever compared with its reference measured in the same run, interleaved
with it. Mounts, servers and clients are removed on every way out (Ctrl-C
and SIGTERM included).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dmoverfs import __version__, mounting
from dmoverfs.tools import bench_shared

REPO = Path(__file__).resolve().parents[2]  # dmoverfs/tools/bench.py -> the checkout
BENCH_SRC = REPO / "csrc" / "bench"
INCLUDE_DIR = REPO / "csrc" / "include"
FLOOR_FSTYPE = "fuse.dmoverfs-floor"
PYFLOOR_FSTYPE = "fuse.dmoverfs-pyfloor"
CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra"]
MiB = 1 << 20
FIGURES = range(1, 12)  # the figure numbers


class BenchError(Exception):
    """The benchmark could not run; the message says why."""


class _Interrupts:
    """SIGINT, SIGTERM and SIGHUP unwind as KeyboardInterrupt, so the cleanup runs;
    inside :meth:`critical` (starting a process and recording it) they wait until
    its end, so that nothing is started that the cleanup does not know of."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None

    def _handler(self, signum, frame) -> None:
        if self.depth:
            self.pending = signum
            return
        raise KeyboardInterrupt(signal.Signals(signum).name)

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals are the main thread's business
            return
        sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        old = {sig: signal.signal(sig, self._handler) for sig in sigs}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    @contextmanager
    def critical(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending is not None:
            signum, self.pending = self.pending, None
            raise KeyboardInterrupt(signal.Signals(signum).name)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Defer signals for the whole block and drop them (for the cleanup itself)."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            self.pending = None


INTERRUPTS = _Interrupts()


@dataclass(frozen=True)
class Settings:
    """What one run measures, and how long."""

    rounds: int = 5  # alternating runs per series
    seconds: float = 0.5  # timed part of one run
    size: int = 16 * MiB  # the large-request figures
    chunk: int = 256 << 10  # the bounce buffer of the kernel copy baseline
    sessions: int = 1000  # figure 9
    inflight: int = 64  # figure 9: requests in flight ...
    inflight_size: int = 64 * MiB  # ... of this size
    inflight_small: int = 1 * MiB  # ... and the same with small ones, for contrast
    copy_sizes: tuple[int, ...] = (256 << 10, 1 * MiB)  # figure 10: one copy request per write, against memcpy
    floor_mt: bool = False  # serve the floor with fuse_session_loop_mt
    only: frozenset[int] = frozenset(FIGURES)
    quick: bool = False


QUICK = dict(rounds=1, seconds=0.02, size=1 * MiB, sessions=50, inflight=8, inflight_size=4 * MiB, inflight_small=256 << 10)

TARGETS = {1: 0.8, 2: 0.6, 3: 0.8, 4: 0.8, 5: 0.6, 7: 1.5}
#: Figures whose ratio is reported (table and chart) with no target yet.
REPORTED = {10}


@dataclass
class Series:
    """Repeated measurements of one thing."""

    name: str
    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else float("nan")

    def as_dict(self) -> dict:
        return {"name": self.name, "median": self.median, "runs": self.runs}


@dataclass
class Figure:
    """One row of the table: a value, optionally its reference and target ratio."""

    key: str
    group: int
    title: str
    unit: str
    value: Series
    reference: Series | None = None
    target: float | None = None
    note: str = ""
    #: False for side-by-side values whose quotient means nothing (memory).
    compare: bool = True
    #: Bytes per request (and per reference copy) of a MB/s figure: the table
    #: and the JSON then also give requests (copies) per second.
    op_bytes: int | None = None

    @property
    def label(self) -> str:
        """The figure's number as the table shows it (1 ... 10, 5b)."""
        return self.key if self.key[0].isdigit() and "-" not in self.key else self.key.split("-")[0]

    @property
    def ratio(self) -> float | None:
        if self.reference is None or not self.reference.median or not self.compare:
            return None
        return self.value.median / self.reference.median

    @property
    def met(self) -> bool | None:
        ratio = self.ratio
        if self.target is None or ratio is None:
            return None
        return ratio >= self.target

    def as_dict(self) -> dict:
        return {
            "key": self.key,
            "group": self.group,
            "title": self.title,
            "unit": self.unit,
            "value": self.value.as_dict(),
            "reference": None if self.reference is None else self.reference.as_dict(),
            "ratio": self.ratio,
            "target": self.target,
            "met": self.met,
            "note": self.note,
            "op_bytes": self.op_bytes,
            "ops_per_s": None if self.op_bytes is None else self.ops_per_s(),
        }

    def ops_per_s(self) -> dict[str, float | None]:
        """Medians in requests (copies) per second, for a figure with :attr:`op_bytes`."""
        assert self.op_bytes is not None

        def per_s(ser: Series | None) -> float | None:
            return None if ser is None else ser.median * 1e6 / self.op_bytes  # MB/s -> per second

        return {"value": per_s(self.value), "reference": per_s(self.reference)}


# -- progress ----------------------------------------------------------------------------


class Progress:
    """A live line on stderr: step n of total, what runs, the last result."""

    def __init__(self, total: int, stream=None) -> None:
        self.total = max(1, total)
        self.done = 0
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.started = time.monotonic()
        self._last_title = ""

    def show(self, title: str, detail: str) -> None:
        elapsed = time.monotonic() - self.started
        line = f"[{self.done:3d}/{self.total}] {elapsed:5.1f}s  {title} · {detail}"
        if self.live:
            width = shutil.get_terminal_size((100, 20)).columns
            self.stream.write("\r\x1b[K" + line[: width - 1])
            self.stream.flush()
        elif title != self._last_title:
            self.stream.write(f"bench: {title}\n")
            self.stream.flush()
        self._last_title = title

    def step(self) -> None:
        self.done += 1

    def finish(self) -> None:
        if self.live:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


# -- building ----------------------------------------------------------------------------


def _pkg_config(*args: str) -> list[str]:
    if shutil.which("pkg-config") is None:
        raise BenchError("pkg-config is missing (Debian: apt-get install pkg-config libfuse3-dev)")
    result = subprocess.run(["pkg-config", *args, "fuse3"], capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"pkg-config cannot find fuse3 (Debian: apt-get install libfuse3-dev): {result.stderr.strip()}")
    return result.stdout.split()


def build(
    workdir: Path, extra_cflags: tuple[str, ...] = (), while_waiting: Callable[[], None] | None = None
) -> tuple[Path, Path, str]:
    """Compile the floor server and the client into *workdir*; returns (floor, client, warnings).

    *while_waiting* runs while the compilers do.
    """
    if not (BENCH_SRC / "floor.c").exists():
        raise BenchError(f"{BENCH_SRC} is missing: run the benchmark from a dmoverfs source checkout")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BenchError("no C compiler (Debian: apt-get install gcc)")
    floor, client = workdir / "floor", workdir / "client"
    jobs = [
        [
            cc,
            *CFLAGS,
            *extra_cflags,
            f"-I{INCLUDE_DIR}",
            *_pkg_config("--cflags"),
            "-o",
            str(floor),
            str(BENCH_SRC / "floor.c"),
            *_pkg_config("--libs"),
            "-lpthread",
        ],
        [cc, *CFLAGS, *extra_cflags, f"-I{INCLUDE_DIR}", "-o", str(client), str(BENCH_SRC / "client.c")],
    ]
    procs: list[subprocess.Popen] = []
    outputs: list[str] = []
    try:
        with INTERRUPTS.critical():
            procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd in jobs]
        if while_waiting is not None:
            while_waiting()
        outputs = [proc.communicate()[0] for proc in procs]
    except BaseException:
        for proc in procs:
            proc.kill()
            proc.wait()
        raise
    warnings = []
    for cmd, proc, out in zip(jobs, procs, outputs):
        if proc.returncode != 0:
            raise BenchError(f"cannot compile {cmd[-1] if 'client' in cmd[-1] else 'floor.c'}:\n{out}")
        if out.strip():
            warnings.append(out.strip())
    return floor, client, "\n".join(warnings)


# -- servers -----------------------------------------------------------------------------


class Mount:
    """A server process and its mount point; :meth:`stop` works in any state."""

    def __init__(self, name: str, mountpoint: Path, fstype: str, log: Path) -> None:
        self.name = name
        self.mountpoint = mountpoint
        self.fstype = fstype
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def clone(self) -> str:
        return str(self.mountpoint / "dmoverio")

    def func_file(self, name: str) -> str:
        """The clone file that opens a session with function *name* selected (dmoverfs only)."""
        return str(self.mountpoint / "func" / name)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def mounted(self) -> bool:
        return Path(os.path.abspath(self.mountpoint)) in mounting.mounts(self.fstype)

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self.mounted():
            mounting.lazy_unmount(self.mountpoint)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        try:
            self.mountpoint.rmdir()
        except OSError:
            pass

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _start_with_ready_fd(cmd: list[str], mount: Mount) -> None:
    """Start a server that writes ``ready`` to the descriptor after ``-r``/``--ready-fd``."""
    mount.mountpoint.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    cmd = [c.replace("{fd}", str(write_end)) for c in cmd]
    with open(mount.log, "ab") as log, INTERRUPTS.critical():
        mount.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(write_end,), start_new_session=True
        )
    os.close(write_end)
    try:
        readable, _, _ = select.select([read_end], [], [], mounting.READY_TIMEOUT_S)
        answer = os.read(read_end, 64) if readable else b""
    finally:
        os.close(read_end)
    if not answer.startswith(b"ready"):
        raise BenchError(f"the {mount.name} server did not start:\n{mount.log_text()[-2000:]}")


def start_floor(binary: Path, mount: Mount, mt: bool) -> None:
    """The C floor server (csrc/bench/floor.c)."""
    _start_with_ready_fd([str(binary), *(["-m"] if mt else []), "-r", "{fd}", str(mount.mountpoint)], mount)


def start_pyfloor(mount: Mount) -> None:
    """The pyfuse3 floor (dmoverfs.tools.bench_pyfloor): the C core behind the thinnest pyfuse3 handlers."""
    _start_with_ready_fd(
        [sys.executable, "-m", "dmoverfs.tools.bench_pyfloor", "--ready-fd", "{fd}", str(mount.mountpoint)], mount
    )


def start_dmoverfs(mount: Mount, args: tuple[str, ...] = ()) -> None:
    mount.mountpoint.mkdir(parents=True, exist_ok=True)
    try:
        with INTERRUPTS.critical():  # a server started must be known to the cleanup
            mount.proc = mounting.spawn_server(mount.mountpoint, list(args), mount.log)
    except mounting.MountError as exc:
        raise BenchError(f"dmoverfs did not start: {exc}") from None


def rss_mib(pid: int) -> float:
    """Resident set size of *pid*, MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


# -- the benchmark -----------------------------------------------------------------------


class Bench:
    """One benchmark run; use as a context manager so everything is cleaned up."""

    def __init__(self, settings: Settings, progress_stream=None) -> None:
        self.s = settings
        self.progress_stream = progress_stream
        self.figures: list[Figure] = []
        self.info: dict = {}
        self.workdir: Path | None = None
        self.mounts: list[Mount] = []
        self._clients: list[subprocess.Popen] = []
        self.floor: Mount | None = None
        self.pyfloor: Mount | None = None
        self.dmoverfs: Mount | None = None
        self.warnings = ""
        self.progress = Progress(1, progress_stream)

    # -- lifecycle

    def __enter__(self) -> Bench:
        self.workdir = Path(tempfile.mkdtemp(prefix="dmoverfs-bench-"))
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        with INTERRUPTS.held():
            self._cleanup()

    def _cleanup(self) -> None:
        self.progress.finish()
        for proc in self._clients:
            if proc.poll() is None:
                proc.kill()
        problems = []
        for mount in self.mounts:
            try:
                mount.stop()
            except (OSError, subprocess.SubprocessError, mounting.MountError) as exc:
                problems.append(f"{mount.name} at {mount.mountpoint}: {exc}")
        # Clients blocked in a server are free once it is gone.
        for proc in self._clients:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self._clients.clear()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        if problems:
            print("dmoverfs bench: could not clean up " + "; ".join(problems), file=sys.stderr)

    def setup(self) -> None:
        assert self.workdir is not None
        self.floor_bin, self.client_bin, self.warnings = build(self.workdir, while_waiting=_preload)
        self.floor = Mount("floor", self.workdir / "floor-mnt", FLOOR_FSTYPE, self.workdir / "floor.log")
        self.dmoverfs = Mount("dmoverfs", self.workdir / "dmoverfs-mnt", mounting.FSTYPE, self.workdir / "dmoverfs.log")
        self.pyfloor = Mount("pyfuse3 floor", self.workdir / "pyfloor-mnt", PYFLOOR_FSTYPE, self.workdir / "pyfloor.log")
        self.mounts = [self.floor, self.pyfloor, self.dmoverfs]
        start_floor(self.floor_bin, self.floor, self.s.floor_mt)
        if self.s.only & {1, 2}:
            start_pyfloor(self.pyfloor)
        start_dmoverfs(self.dmoverfs)
        self.info = machine_info(self.dmoverfs)

    # -- clients

    def _start_client(self, args: tuple, stdin: int) -> subprocess.Popen:
        """Start the C client, registered for cleanup before a signal can get in between."""
        with INTERRUPTS.critical():
            proc = subprocess.Popen(
                [str(self.client_bin), *map(str, args)],
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            self._clients.append(proc)
        return proc

    def client(self, *args: object) -> dict:
        """Run the C client; its JSON answer."""
        timeout = 120 + 40 * self.s.seconds
        proc = self._start_client(args, subprocess.DEVNULL)
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            proc.kill()
            raise
        self._clients.remove(proc)
        if proc.returncode != 0:
            raise BenchError(f"client {' '.join(map(str, args))} failed ({proc.returncode}): {err.strip()}")
        return json.loads(out.strip().splitlines()[-1])

    def small(self, mount: Mount, batch: int) -> float:
        r = self.client("small", mount.clone, batch, self.s.seconds)
        return r["ops"] / r["ns"] * 1e9

    def big(self, mount: Mount, func: str, clients: int = 1) -> float:
        r = self.client("big", mount.clone, func, self.s.size, self.s.seconds, clients)
        return r["bytes"] / r["ns"] * 1e3  # MB/s

    def bounce(self, clients: int = 1) -> float:
        r = self.client("bounce", self.s.size, self.s.seconds, self.s.chunk, clients)
        return r["bytes"] / r["ns"] * 1e3

    def pvmread(self, chunk: int) -> float:
        r = self.client("pvmread", self.s.size, self.s.seconds, chunk)
        return r["bytes"] / r["ns"] * 1e3

    def copyref(self, mount: Mount, size: int) -> tuple[float, float]:
        """One ``copy`` request of *size* per write and read on *mount*'s ``func/copy``, then the
        same copy in the client through a bounce buffer of the chunk size; (MB/s, reference MB/s)."""
        r = self.client("copyref", mount.func_file("copy"), size, self.s.seconds, self.s.chunk)
        ref = r["ref"]
        return r["bytes"] / r["ns"] * 1e3, ref["bytes"] / ref["ns"] * 1e3

    # -- measuring

    def alternate(self, title: str, series: list[tuple[Series, Callable[[], float]]], unit: str) -> None:
        """Round after round, one run of every series in turn (A B A B ...)."""
        for rnd in range(self.s.rounds):
            for ser, fn in series:
                self.progress.show(title, f"{ser.name} run {rnd + 1}/{self.s.rounds}")
                value = fn()
                ser.runs.append(value)
                self.progress.step()
                self.progress.show(title, f"{ser.name} {fmt(value, unit)}")

    def alternate_pairs(
        self, title: str, pairs: list[tuple[str, Series, Series, Callable[[], tuple[float, float]]]], unit: str
    ) -> None:
        """Like :meth:`alternate`, for runs that measure a value and its reference together:
        (what, value, reference, run) for each, *what* naming the pair in the progress line."""
        for rnd in range(self.s.rounds):
            for what, value, reference, fn in pairs:
                self.progress.show(title, f"{what} run {rnd + 1}/{self.s.rounds}")
                v, ref = fn()
                value.runs.append(v)
                reference.runs.append(ref)
                self.progress.step()
                self.progress.show(title, f"{what}: {value.name} {fmt(v, unit)}, {reference.name} {fmt(ref, unit)}")

    def plan(self) -> list[tuple[int, int]]:
        """(group, runs) of what will be measured, for the progress display."""
        r = self.s.rounds
        runs = {1: 3 * r, 2: 3 * r, 3: 2 * r, 4: 2 * r, 5: 3 * r, 6: 4 * r, 7: 4 * r, 8: 5 * r, 9: 6}
        runs[10] = len(self.s.copy_sizes) * r  # one client run gives both series
        runs[11] = 2 * (2 * len(bench_shared.FUNCTIONS) + 1) * r
        return [(g, runs[g]) for g in sorted(self.s.only)]

    def run(self) -> list[Figure]:
        self.progress = Progress(sum(n for _, n in self.plan()) + 1, self.progress_stream)
        self.progress.show("setup", "building and mounting")
        self.setup()
        self.progress.step()
        assert self.floor is not None and self.dmoverfs is not None
        fl, dm = self.floor, self.dmoverfs
        size_name = human_size(self.s.size)
        only = self.s.only
        idle_rss = rss_mib(dm.pid)
        floor_idle_rss = rss_mib(fl.pid)

        def pair(
            group: int,
            title: str,
            unit: str,
            a: Series,
            fa: Callable[[], float],
            b: Series,
            fb: Callable[[], float],
            note: str = "",
        ) -> None:
            """Figure *group*: b against its reference a, alternating."""
            self.alternate(f"fig {group}: {title}", [(a, fa), (b, fb)], unit)
            self.figures.append(Figure(str(group), group, title, unit, b, a, TARGETS[group], note=note))

        for group, batch in ((1, 1), (2, 64)):
            if group not in only:
                continue
            title = f"4 KiB zero, {batch} per write / {batch} per read"
            a, p, b = Series("floor"), Series("pyfuse3 floor"), Series("dmoverfs")
            assert self.pyfloor is not None
            runs = [
                (a, functools.partial(self.small, fl, batch)),
                (p, functools.partial(self.small, self.pyfloor, batch)),
                (b, functools.partial(self.small, dm, batch)),
            ]
            self.alternate(f"fig {group}: {title}", runs, "req/s")
            self.figures.append(Figure(str(group), group, title, "req/s", b, a, TARGETS[group]))
            self.figures.append(
                Figure(
                    f"{group}p",
                    group,
                    f"{title}: pyfuse3 floor (context)",
                    "req/s",
                    p,
                    a,
                    note="the same C core behind the thinnest pyfuse3 handlers (dmoverfs.tools.bench_pyfloor): "
                    "floor to here is pyfuse3 and trio, here to dmoverfs is dmoverfs's Python layers",
                )
            )
        if 3 in only:
            pair(
                3,
                f"{size_name} zero",
                "MB/s",
                Series("floor"),
                functools.partial(self.big, fl, "zero"),
                Series("dmoverfs"),
                functools.partial(self.big, dm, "zero"),
            )
        if 4 in only:
            pair(
                4,
                f"{size_name} copy",
                "MB/s",
                Series(f"bounce copy ({human_size(self.s.chunk)})"),
                self.bounce,
                Series("dmoverfs"),
                functools.partial(self.big, dm, "copy"),
                note="reference: process_vm_readv then process_vm_writev through a bounce buffer, one thread",
            )
        if 5 in only:
            a, b = Series("process_vm_readv"), Series("dmoverfs")
            c = Series(f"process_vm_readv, {human_size(self.s.chunk)} calls")
            self.alternate(
                f"fig 5: {size_name} iscsi-crc32c",
                [
                    (a, functools.partial(self.pvmread, self.s.size)),
                    (b, functools.partial(self.big, dm, "iscsi-crc32c")),
                    (c, functools.partial(self.pvmread, self.s.chunk)),
                ],
                "MB/s",
            )
            self.figures.append(
                Figure(
                    "5",
                    5,
                    f"{size_name} iscsi-crc32c",
                    "MB/s",
                    b,
                    a,
                    TARGETS[5],
                    note=f"reference: one process_vm_readv of {size_name}",
                )
            )
            self.figures.append(
                Figure("5b", 5, f"process_vm_readv of {size_name} in {human_size(self.s.chunk)} calls (context)", "MB/s", c)
            )
        if 6 in only:
            funcs = ["xor2", "xor8", "xor16", "fill8"]
            series = {f: Series(f) for f in funcs}
            self.alternate(
                f"fig 6: {size_name} xor2/xor8/xor16/fill8",
                [(series[f], functools.partial(self.big, dm, f)) for f in funcs],
                "MB/s",
            )
            for f in funcs:
                self.figures.append(Figure(f"6-{f}", 6, f"{size_name} {f}", "MB/s", series[f], note="MB/s of output"))
        if 7 in only:
            one, two = Series("one client"), Series("two clients")
            kone, ktwo = Series("one bounce copy"), Series("two bounce copies")
            self.alternate(
                f"fig 7: two clients copying {size_name}",
                [
                    (one, functools.partial(self.big, dm, "copy", 1)),
                    (two, functools.partial(self.big, dm, "copy", 2)),
                    (kone, functools.partial(self.bounce, 1)),
                    (ktwo, functools.partial(self.bounce, 2)),
                ],
                "MB/s",
            )
            self.figures.append(Figure("7", 7, f"two clients copying {size_name} (sum)", "MB/s", two, one, TARGETS[7]))
            self.figures.append(
                Figure(
                    "7k",
                    7,
                    f"two kernel bounce copies of {size_name} at once (sum): the machine's own scaling (context)",
                    "MB/s",
                    ktwo,
                    kone,
                    note="two process pairs copying with process_vm_readv/writev at once, against one pair",
                )
            )
        if 8 in only:
            self.python_peers()
        if 11 in only:
            self.shared_buffers()
        if 10 in only:  # before 9, whose "idle after the figures above" covers it
            self.copy_requests()
        if 9 in only:
            self.memory(idle_rss, floor_idle_rss)
        self.progress.finish()
        self.figures.sort(key=lambda f: f.group)  # stable: the table in figure order
        return self.figures

    # -- figure 10: a copy request per write, waiting for a worker, against the client's own copy

    def copy_requests(self) -> None:
        """Each size: dmoverfs against the same copy done in the client through a bounce buffer."""
        assert self.dmoverfs is not None
        dm = self.dmoverfs
        chunk = human_size(self.s.chunk)
        pairs = []
        for size in self.s.copy_sizes:
            value, reference = Series("dmoverfs"), Series(f"client memcpy, {chunk} bounce")
            pairs.append((human_size(size), value, reference, functools.partial(self.copyref, dm, size)))
        sizes = " and ".join(human_size(size) for size in self.s.copy_sizes)
        self.alternate_pairs(f"fig 10: {sizes} copy requests", pairs, "MB/s")
        for size, (_, value, reference, _) in zip(self.s.copy_sizes, pairs):
            self.figures.append(
                Figure(
                    f"10-{human_size(size).replace(' ', '')}",
                    10,
                    f"{human_size(size)} copy (1 per write / 1 per read, on a worker thread)",
                    "MB/s",
                    value,
                    reference,
                    note=f"func/copy, one request per write() and its response per read(), done by a worker thread; "
                    f"reference: the same buffers copied in the client with memcpy through a {chunk} bounce buffer, "
                    "measured in the same process after the requests",
                    op_bytes=size,
                )
            )

    # -- figure 11: requests on shared buffers, against the client's own kernels

    def shared_mount(self, workers: int) -> Mount:
        """A dmoverfs mount with *workers* worker threads, stopped by the cleanup."""
        assert self.workdir is not None
        name = f"dmoverfs-{workers}w"
        mount = Mount(name, self.workdir / f"{name}-mnt", mounting.FSTYPE, self.workdir / f"{name}.log")
        self.mounts.append(mount)
        start_dmoverfs(mount, ("--workers", str(workers)))
        return mount

    def shared_buffers(self) -> None:
        """Each function between shared buffers with one worker, and a copy split across two,
        against the same work in this process (bench_shared says with what)."""
        one, two = self.shared_mount(1), self.shared_mount(2)
        size = self.s.size
        split = size * bench_shared.SPLIT_FACTOR
        benches = [bench_shared.SharedBench(str(one.mountpoint), size), bench_shared.SharedBench(str(two.mountpoint), split)]
        try:
            # (key, title, target, request, its bytes per run, peer, its bytes per run) of each figure
            runs = []
            queued = bench_shared.IN_FLIGHT
            for func in bench_shared.FUNCTIONS:
                peer = benches[0].peer(func)
                title = f"{human_size(size)} {func}, shared buffers, 1 worker, {queued} in flight"
                request = benches[0].request(func, queued)
                runs.append((f"11-{func}", title, bench_shared.ONE_WORKER_TARGET, request, size, peer, size))
                title = f"{human_size(size)} {func}, shared buffers, 1 worker, one at a time (context)"
                runs.append((f"11-{func}-1", title, None, benches[0].request(func), size, peer, size))
            title = f"{human_size(split)} copy, shared buffers, 2 workers, 2 in flight"
            request, peer = benches[1].request("copy", 2), benches[1].peer("copy")
            runs.append(("11-split", title, bench_shared.SPLIT_TARGET, request, split, peer, split))
            series = [(Series(f"dmoverfs shared, {run[1].split(', ', 2)[2]}"), Series(run[5].name)) for run in runs]
            pairs = []
            for (value, reference), (key, _, _, request, n, peer, peer_n) in zip(series, runs):
                drain = benches[1 if key == "11-split" else 0].drain
                pairs.append((value, functools.partial(bench_shared.timed, request, n, self.s.seconds, drain)))
                pairs.append((reference, functools.partial(bench_shared.timed, peer.run, peer_n, self.s.seconds)))
            self.alternate(f"fig 11: shared buffers, {human_size(size)} and {human_size(split)}", pairs, "MB/s")
        finally:
            for bench in benches:
                bench.close()
        for (value, reference), (key, title, target, _, _, peer, _) in zip(series, runs):
            note = f"requests from a Python client; reference: {peer.name} in the client, same size"
            self.figures.append(Figure(key, 11, title, "MB/s", value, reference, target, note=note))

    # -- figure 8: what a Python user would otherwise reach for

    def python_peers(self) -> None:
        import google_crc32c
        import numpy as np

        n = self.s.size
        rng = np.random.default_rng(5)
        src = rng.integers(0, 256, n, dtype=np.uint8)
        dst = np.empty(n, dtype=np.uint8)
        dst.fill(1)
        ins = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(16)]
        crc_data = src.tobytes()

        def timed(fn: Callable[[], None]) -> float:
            fn()  # warm-up
            count, t0 = 0, time.perf_counter()
            while True:
                fn()
                count += 1
                t = time.perf_counter()
                if t - t0 >= self.s.seconds:
                    return count * n / (t - t0) / 1e6

        def xor_n(k: int) -> Callable[[], None]:
            def run() -> None:
                np.bitwise_xor(ins[0], ins[1], out=dst)
                for arr in ins[2:k]:
                    np.bitwise_xor(dst, arr, out=dst)

            return run

        peers = [
            ("ctypes.memset", lambda: ctypes.memset(dst.ctypes.data, 0, n)),
            ("ctypes.memmove", lambda: ctypes.memmove(dst.ctypes.data, src.ctypes.data, n)),
            ("numpy xor2", xor_n(2)),
            ("numpy xor16", xor_n(16)),
            (f"google-crc32c ({google_crc32c.implementation})", lambda: google_crc32c.value(crc_data)),
        ]
        series = [Series(name) for name, _ in peers]
        self.alternate(
            f"fig 8: in-process Python peers, {human_size(n)}",
            [(ser, lambda fn=fn: timed(fn)) for ser, (_, fn) in zip(series, peers)],
            "MB/s",
        )
        for ser in series:
            key = "8-" + ser.name.split(" (")[0]
            self.figures.append(Figure(key, 8, f"{ser.name}, {human_size(n)}, in process", "MB/s", ser))

    # -- figure 9: server memory

    def memory(self, idle_rss: float, floor_idle_rss: float) -> None:
        assert self.floor is not None and self.dmoverfs is not None
        fl, dm = self.floor, self.dmoverfs
        title = "fig 9: server memory"
        add = self.figures.append

        add(
            Figure(
                "9-idle",
                9,
                "server RSS, idle (fresh mount)",
                "MiB",
                Series("dmoverfs", [idle_rss]),
                Series("floor", [floor_idle_rss]),
                compare=False,
            )
        )
        self.progress.show(title, "idle after the run")
        add(
            Figure(
                "9-idle-after",
                9,
                "server RSS, idle after the figures above",
                "MiB",
                Series("dmoverfs", [rss_mib(dm.pid)]),
                Series("floor", [rss_mib(fl.pid)]),
                compare=False,
            )
        )
        self.progress.step()

        n = self.s.sessions
        held: dict[str, float] = {}

        for mount in (fl, dm):
            self.progress.show(title, f"{n} sessions open on {mount.name}")

            def hold(proc: subprocess.Popen, mount: Mount = mount) -> None:
                assert proc.stdout is not None and proc.stdin is not None
                line = proc.stdout.readline()
                if not line.startswith("ready"):
                    return  # the client failed: communicate() collects why
                time.sleep(0.05)
                held[mount.name] = rss_mib(mount.pid)
                proc.stdin.write("\n")
                proc.stdin.flush()

            self.client_raw_sessions(mount, n, hold)
            self.progress.step()
        add(
            Figure(
                "9-sessions",
                9,
                f"server RSS, {n} sessions open",
                "MiB",
                Series("dmoverfs", [held["dmoverfs"]]),
                Series("floor", [held["floor"]]),
                compare=False,
            )
        )
        time.sleep(0.1)
        add(
            Figure(
                "9-sessions-closed",
                9,
                f"server RSS, after closing the {n} sessions",
                "MiB",
                Series("dmoverfs", [rss_mib(dm.pid)]),
                Series("floor", [rss_mib(fl.pid)]),
                compare=False,
            )
        )

        for size in (self.s.inflight_size, self.s.inflight_small):
            count = self.s.inflight
            self.progress.show(title, f"{count} x {human_size(size)} copies in flight")
            peak, ns = self.sample_rss(dm.pid, lambda size=size, count=count: self.client("inflight", dm.clone, count, size))
            add(
                Figure(
                    f"9-inflight-{human_size(size).replace(' ', '')}",
                    9,
                    f"server RSS, peak with {count} x {human_size(size)} copies in flight",
                    "MiB",
                    Series("dmoverfs", [peak]),
                    note=f"all {count} written at once, done in {ns / 1e9:.2f} s",
                )
            )
            self.progress.step()

    def client_raw_sessions(self, mount: Mount, n: int, hold: Callable[[subprocess.Popen], None]) -> None:
        """Hold *n* sessions open on *mount* while *hold* looks at the server."""
        proc = self._start_client(("sessions", mount.clone, n), subprocess.PIPE)
        try:
            hold(proc)
            _, err = proc.communicate(timeout=120)
        except BaseException:
            proc.kill()
            raise
        self._clients.remove(proc)
        if proc.returncode != 0:
            raise BenchError(f"client sessions {mount.clone} {n} failed: {err.strip()}")

    def sample_rss(self, pid: int, fn: Callable[[], dict]) -> tuple[float, int]:
        """Run *fn* while sampling the RSS of *pid*; (peak MiB, the client's ns)."""
        peak = [rss_mib(pid)]
        stop = threading.Event()

        def sampler() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mib(pid))
                stop.wait(0.002)

        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        try:
            result = fn()
        finally:
            stop.set()
            thread.join()
        return peak[0], result["ns"]


# -- formatting --------------------------------------------------------------------------


def human_size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def fmt(value: float, unit: str) -> str:
    if value != value:  # nan
        return "-"
    if unit == "MiB":
        return f"{value:,.1f} {unit}"
    return f"{value:,.0f} {unit}"


def fmt_cell(fig: Figure, ser: Series, per: str) -> str:
    """A median for the table; with its rate per second (*per*: "req", "copies") when the figure has one."""
    text = fmt(ser.median, fig.unit)
    if fig.op_bytes is not None and ser.median == ser.median:
        text += f" ({ser.median * 1e6 / fig.op_bytes:,.0f} {per}/s)"
    return text


def machine_info(dm: Mount) -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    kernels = ""
    for line in dm.log_text().splitlines():
        if "kernels:" in line:
            kernels = line.split("kernels:", 1)[1].strip(" )")
    try:
        import pyfuse3  # the version only; the server is another process

        pyfuse3_version = getattr(pyfuse3, "__version__", "")
    except ImportError:
        pyfuse3_version = ""
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pyfuse3": pyfuse3_version,
        "dmoverfs": __version__,
        "core_kernels": kernels,
        "loadavg_start": os.getloadavg()[0],
    }


def table(figures: list[Figure], info: dict, settings: Settings) -> str:
    """The figures as a plain-text table."""
    when = time.strftime("%Y-%m-%d %H:%M")
    head = [
        f"dmoverfs benchmark, {when}: {info.get('cpus')} CPUs ({info.get('cpu')}), Linux {info.get('kernel')}, "
        f"C core kernels: {info.get('core_kernels') or '?'}",
        f"medians of {settings.rounds} alternating run(s) of {settings.seconds:g} s; MB = 10^6 bytes; "
        f"load average {info.get('loadavg_start', 0):.1f} at the start, {info.get('loadavg_end', 0):.1f} at the end"
        + (" (a busy machine: expect noise)" if info.get("loadavg_start", 0) > 1.0 else "")
        + (" [QUICK: sizes and times cut, figures not meaningful]" if settings.quick else ""),
        "",
    ]
    rows = [("#", "figure", "dmoverfs / value", "reference", "", "ratio", "target", "")]
    for fig in figures:
        ref = fig.reference
        ratio = fig.ratio
        rows.append(
            (
                fig.label,
                fig.title,
                fmt_cell(fig, fig.value, "req"),
                "" if ref is None else fmt_cell(fig, ref, "copies"),
                "" if ref is None else ref.name,
                "" if ratio is None else f"{ratio:.2f}",
                "" if fig.target is None else f">= {fig.target:g}",
                {True: "ok", False: "MISS", None: ""}[fig.met],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {2, 3, 5}
    lines = []
    for i, r in enumerate(rows):
        cells = [c.rjust(widths[j]) if j in right else c.ljust(widths[j]) for j, c in enumerate(r)]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(head + lines)


def chart(figures: list[Figure], path: Path, title: str) -> None:
    """A PNG: ratios against targets, throughput, small-request rates, server memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(16, 10))
    (ax_ratio, ax_tp), (ax_small, ax_mem) = axes
    fig.suptitle(title, fontsize=11)

    targeted = [f for f in figures if (f.target is not None or f.group in REPORTED) and f.ratio is not None]
    if targeted:
        labels = [f"{f.label}: {f.title}" for f in targeted]
        ratios = [f.ratio for f in targeted]
        colors = ["tab:gray" if f.met is None else "tab:green" if f.met else "tab:red" for f in targeted]
        y = range(len(targeted))
        ax_ratio.barh(list(y), ratios, color=colors)
        for i, f in enumerate(targeted):
            if f.target is not None:
                ax_ratio.plot([f.target, f.target], [i - 0.4, i + 0.4], color="black", linewidth=2)
            ax_ratio.text(f.ratio, i, f" {f.ratio:.2f}", va="center", fontsize=8)
        ax_ratio.set_yticks(list(y), labels, fontsize=8)
        ax_ratio.invert_yaxis()
    ax_ratio.set_title("ratio to reference (black: target; gray: no target yet)", fontsize=10)

    tp: list[tuple[str, float, str]] = []
    for f in figures:
        if f.unit != "MB/s":
            continue
        if f.group == 8:
            tp.append((f.value.name + " (in process)", f.value.median, "tab:gray"))
            continue
        if f.key in ("5b", "7k"):  # kernel references only
            tp.append((f.value.name, f.value.median, "tab:orange"))
        else:
            tp.append(
                (f"dmoverfs {f.value.name}: {f.title}" if f.group == 7 else f"dmoverfs {f.title}", f.value.median, "tab:blue")
            )
        if f.reference is not None:
            color = "tab:orange" if f.key == "7k" or f.reference.name not in ("one client",) else "tab:blue"
            label = f.reference.name if f.key == "7k" else f"{f.reference.name} ({f.title.split(' (')[0]})"
            tp.append((f"dmoverfs {label}" if color == "tab:blue" else label, f.reference.median, color))
    if tp:
        ax_tp.barh(range(len(tp)), [v for _, v, _ in tp], color=[c for _, _, c in tp])
        for i, (_, v, _) in enumerate(tp):
            ax_tp.text(v, i, f" {v:,.0f}", va="center", fontsize=6)
        ax_tp.set_yticks(range(len(tp)), [n for n, _, _ in tp], fontsize=7)
        ax_tp.invert_yaxis()
    ax_tp.set_title("MB/s: dmoverfs (blue), C/kernel reference (orange), Python (gray)", fontsize=10)

    small = [f for f in figures if f.unit == "req/s" and f.target is not None]
    if small:
        context = {f.group: f for f in figures if f.unit == "req/s" and f.target is None}
        bars = [
            ("floor (C, libfuse low-level)", "tab:orange", lambda f: f.reference.median if f.reference else 0.0),
            (
                "pyfuse3 floor (C core, thinnest handlers)",
                "tab:gray",
                lambda f: context[f.group].value.median if f.group in context else 0.0,
            ),
            ("dmoverfs", "tab:blue", lambda f: f.value.median),
        ]
        for k, (label, color, get) in enumerate(bars):
            xs = [i + (k - 1) * 0.27 for i in range(len(small))]
            values = [get(f) for f in small]
            ax_small.bar(xs, values, width=0.27, color=color, label=label)
            for x, v in zip(xs, values):
                if v > 0:
                    ax_small.text(x, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=7)
        ax_small.set_yscale("log")
        top = max(get(f) for _, _, get in bars for f in small)
        ax_small.set_ylim(top=top * 8)
        ax_small.set_xticks(list(range(len(small))), [f.title for f in small], fontsize=8)
        ax_small.legend(fontsize=8, loc="upper left")
    ax_small.set_title("small requests, req/s (log scale)", fontsize=10)

    mem = [f for f in figures if f.unit == "MiB"]
    if mem:
        x = range(len(mem))
        ax_mem.barh([i - 0.2 for i in x], [f.value.median for f in mem], height=0.4, color="tab:blue", label="dmoverfs")
        ax_mem.barh(
            [i + 0.2 for i in x],
            [f.reference.median if f.reference else 0 for f in mem],
            height=0.4,
            color="tab:orange",
            label="floor",
        )
        ax_mem.set_yticks(list(x), [f.title.replace("server RSS, ", "") for f in mem], fontsize=7)
        ax_mem.invert_yaxis()
        ax_mem.legend(fontsize=8)
    ax_mem.set_title("server resident memory, MiB", fontsize=10)

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the command -------------------------------------------------------------------------


def _preload() -> None:
    """Import the heavy modules the figures and the chart need (while something else waits)."""
    import google_crc32c  # noqa: F401
    import matplotlib
    import numpy  # noqa: F401

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def _check_python_deps() -> None:
    missing = []
    for mod in ("numpy", "google_crc32c", "matplotlib"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise BenchError(f"missing Python packages {', '.join(missing)}: install the test extras (pip install -e '.[test]')")


def run(settings: Settings, out: Path, stream=None) -> tuple[list[Figure], str]:
    """Run the benchmark; write bench.json and bench.png into *out*; (figures, table)."""
    _check_python_deps()
    out.mkdir(parents=True, exist_ok=True)
    with INTERRUPTS.installed(), Bench(settings, stream) as bench:
        figures = bench.run()
        log = bench.dmoverfs.log_text() if bench.dmoverfs else ""
        info = {**bench.info, "loadavg_end": os.getloadavg()[0]}
        warnings = bench.warnings
    if "Traceback" in log or " CRITICAL " in log:
        raise BenchError(f"the dmoverfs server logged errors:\n{log[-4000:]}")
    text = table(figures, info, settings)
    data = {
        "format": 1,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": info,
        "settings": {k: (sorted(v) if isinstance(v, frozenset) else v) for k, v in settings.__dict__.items()},
        "build_warnings": warnings,
        "figures": [f.as_dict() for f in figures],
    }
    (out / "bench.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "bench.txt").write_text(text + "\n")
    chart(figures, out / "bench.png", text.splitlines()[0])
    return figures, text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="bench-results", help="where to write bench.json, .png, .txt (default bench-results)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (figures not meaningful)")
    parser.add_argument("--rounds", type=int, help="alternating runs per series (default 5)")
    parser.add_argument("--seconds", type=float, help="timed part of each run (default 0.5)")
    parser.add_argument("--only", help="comma-separated figure numbers to run (default all, 1-11)")
    parser.add_argument("--floor-mt", action="store_true", help="serve the floor with fuse_session_loop_mt (default one thread)")


def given_settings(args: argparse.Namespace, quick: dict, min_seconds: float) -> dict:
    """The settings every benchmark tool takes from its command line: the --quick preset
    (*quick*), and --seconds (at least *min_seconds*)."""
    given: dict = dict(quick) if args.quick else {}
    given["quick"] = bool(args.quick)
    if args.seconds is not None:
        given["seconds"] = max(min_seconds, args.seconds)
    return given


def main(args: argparse.Namespace) -> int:
    """``dmoverfs bench``."""
    given = given_settings(args, QUICK, 0.001)
    if args.rounds is not None:
        given["rounds"] = max(1, args.rounds)
    if args.only:
        try:
            only = frozenset(int(x) for x in args.only.split(","))
        except ValueError:
            raise SystemExit("dmoverfs bench: --only takes figure numbers, e.g. 1,2,9") from None
        if not only <= set(FIGURES):
            raise SystemExit(f"dmoverfs bench: figures are numbered {FIGURES[0]} to {FIGURES[-1]}")
        given["only"] = only
    given["floor_mt"] = bool(args.floor_mt)
    settings = Settings(**given)
    out = Path(args.out)
    try:
        figures, text = run(settings, out)
    except BenchError as exc:
        raise SystemExit(f"dmoverfs bench: {exc}") from None
    print(text)
    print(f"\nwritten: {out / 'bench.json'}, {out / 'bench.png'}, {out / 'bench.txt'}")
    return 0
