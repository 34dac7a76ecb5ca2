"""Fairness under hostile load: how long a victim's round trip takes while another user attacks.

In one run, on this machine: build the victim and the attackers
(``csrc/bench/fairness.c``) and the benchmark's measuring client
(``csrc/bench/client.c``); mount a dmoverfs server with ``--allow-other``
(as root) on a temporary mount point; then measure, one after another:

- the victim's 4 KiB ``zero`` round trip (one request per ``write()``, its
  response per ``read()``, both blocking, timed around the pair) idle, then
  while an attacker running as another user does (a) a worker monopoly (two
  sessions, each keeping one ``zero`` request outstanding whose output lists
  one 64 MiB region 1,024 times), (b) a decode flood (``xor16`` requests
  listing 17 x 1,024 empty iovecs, 8 per write, from one and from several
  threads), (c) 1,000 sessions each kept 64 ``copy`` requests of 1 MiB deep;
  and the victim's 1 MiB ``copy`` round trip during (a);
- the cost of slicing: a lone 16 MiB and a lone 1 GiB ``copy`` on a server
  mounted with default settings against one mounted with ``--slice-bytes 0``
  (whole requests), alternating.

Each attack runs only while the victim measures; then the attacker is stopped
(SIGTERM: it closes its sessions and prints its counters) and the server must
have nothing outstanding again before the next phase; how long that took is
reported. Targets (figures to reach, not timed tests): victim p99 <= 50 ms and
p50 <= 5 x the idle p50 of the same run during every attack; the 1 MiB copy's
longest round trip <= 0.5 s during (a); slicing >= 0.95 of whole requests.

As root the attacker runs as a throwaway system user created for the run
(``useradd``, removed at the end) unless ``--attacker-uid`` names one; as
another user everything runs as that user (per-user fairness is then not
exercised, and the table says so). Nothing is written unless ``--out DIR``.
Mounts, servers, processes and the user are removed on every way out
(Ctrl-C and SIGTERM included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pwd
import secrets
import select
import shlex
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dmoverfs import __version__, mounting
from dmoverfs.tools.bench import (
    BENCH_SRC,
    CFLAGS,
    INCLUDE_DIR,
    INTERRUPTS,
    BenchError,
    MiB,
    Mount,
    given_settings,
    human_size,
)

GiB = 1 << 30
SMALL = 4096
#: Targets of the figures.
P99_TARGET_S = 0.050
P50_RATIO_TARGET = 5.0
COPY_MAX_TARGET_S = 0.5
SLICING_TARGET = 0.95
#: The reference mount of the slicing figures: slices of 0 bytes run whole requests.
UNSLICED_OPTIONS = ("--slice-bytes", "0")


@dataclass(frozen=True)
class Settings:
    """What one run measures, and how long."""

    seconds: float = 3.0  # victim round trips per measurement
    wait_limit: float = 10.0  # a round trip still waiting this long after the measurement ends is cut
    warmup: float = 0.3  # between the attacker's first requests and the victim's start
    monopoly_sessions: int = 2
    monopoly_region: int = 64 * MiB
    monopoly_regions: int = 1024  # times the region is listed in one request
    flood_threads: tuple[int, ...] = (1, 4)
    flood_batch: int = 8  # measured as a stronger attack on the reader than 64 (which decodes 18 MB a write)
    sessions: int = 1000
    depth: int = 64
    queue_size: int = 1 * MiB
    queue_func: str = "copy"
    copy_size: int = 1 * MiB  # the victim's copy during (a)
    slice_sizes: tuple[int, ...] = (16 * MiB, 1 * GiB)
    slice_rounds: int = 5
    slice_seconds: float = 1.0
    reference_options: tuple[str, ...] = UNSLICED_OPTIONS  # how the slicing figures' reference is mounted
    settle_timeout: float = 120.0  # for the server to be idle again after an attacker
    attacker_uid: int | None = None
    quick: bool = False


QUICK = dict(
    seconds=0.3,
    wait_limit=5.0,
    warmup=0.05,
    monopoly_region=1 * MiB,
    monopoly_regions=64,
    flood_threads=(1, 2),
    flood_batch=4,
    sessions=20,
    depth=4,
    queue_size=64 << 10,
    slice_sizes=(1 * MiB, 4 * MiB),
    slice_rounds=1,
    slice_seconds=0.05,
)


def _say(text: str) -> None:
    print(f"fairness: {text}", file=sys.stderr, flush=True)


# -- figures -------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank percentile *q* (0 < q <= 1) of *sorted_values*."""
    rank = max(1, -(-len(sorted_values) * q // 1))  # ceil(n * q)
    return sorted_values[int(rank) - 1]


@dataclass
class Victim:
    """One victim's round trips during one phase."""

    func: str
    size: int
    samples_s: list[float] = field(default_factory=list)
    #: A round trip cut short (still waiting): how long it had waited, a lower bound.
    unfinished_s: float | None = None
    error: str | None = None

    def _all(self) -> list[float]:
        extra = [] if self.unfinished_s is None else [self.unfinished_s]
        return sorted(self.samples_s + extra)

    @property
    def count(self) -> int:
        return len(self.samples_s)

    def stat(self, q: float) -> float | None:
        values = self._all()
        return percentile(values, q) if values else None

    @property
    def p50(self) -> float | None:
        return self.stat(0.5)

    @property
    def p99(self) -> float | None:
        return self.stat(0.99)

    @property
    def max(self) -> float | None:
        return self.stat(1.0)

    def as_dict(self) -> dict:
        return {
            "func": self.func,
            "size": self.size,
            "round_trips": self.count,
            "p50_s": self.p50,
            "p99_s": self.p99,
            "max_s": self.max,
            "mean_s": statistics.fmean(self.samples_s) if self.samples_s else None,
            "unfinished_s": self.unfinished_s,
            "lower_bounds": self.unfinished_s is not None,
            "error": self.error,
        }


@dataclass
class Attack:
    """An attacker's run: what it was, what it counted, how it ended."""

    mode: str
    argv: list[str]
    counters: dict | None = None
    stopped: str = ""  # "SIGTERM" or "killed"
    recovery_s: float | None = None  # attacker gone -> server idle
    settled: bool = True
    server_refused: int = 0  # the server's refused_by_limits during the phase
    error: str | None = None


@dataclass
class Phase:
    """One row group: the victims measured while one attacker (or none) ran."""

    key: str
    label: str  # short, for the tables
    title: str  # what the attacker did
    victims: list[Victim]
    attack: Attack | None = None

    def as_dict(self) -> dict:
        return {
            "key": self.key,
            "label": self.label,
            "title": self.title,
            "victims": [v.as_dict() for v in self.victims],
            "attack": None if self.attack is None else asdict(self.attack),
        }


@dataclass
class SliceRow:
    size: int
    default_mbps: list[float] = field(default_factory=list)
    unsliced_mbps: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if not self.default_mbps or not self.unsliced_mbps:
            return None
        return statistics.median(self.default_mbps) / statistics.median(self.unsliced_mbps)

    def as_dict(self) -> dict:
        return {
            "size": self.size,
            "default_mbps": self.default_mbps,
            "unsliced_mbps": self.unsliced_mbps,
            "default_median": statistics.median(self.default_mbps) if self.default_mbps else None,
            "unsliced_median": statistics.median(self.unsliced_mbps) if self.unsliced_mbps else None,
            "ratio": self.ratio,
        }


@dataclass
class Check:
    """A figure against its target."""

    what: str
    value: float | None
    unit: str  # "s" or "x"
    op: str  # "<=" or ">="
    target: float
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.target if self.op == "<=" else self.value >= self.target

    def as_dict(self) -> dict:
        return {**asdict(self), "met": self.met}


# -- building and users ----------------------------------------------------------------------


def compile_programs(workdir: Path) -> tuple[Path, Path]:
    """Compile the victim/attackers and the benchmark client into *workdir*."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BenchError("no C compiler (Debian: apt-get install gcc)")
    built = []
    for name in ("fairness", "client"):
        src = BENCH_SRC / f"{name}.c"
        if not src.exists():
            raise BenchError(f"{src} is missing: run the benchmark from a dmoverfs source checkout")
        out = workdir / name
        cmd = [cc, *CFLAGS, "-pthread", f"-I{INCLUDE_DIR}", "-o", str(out), str(src)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise BenchError(f"cannot compile {src.name}:\n{result.stdout}{result.stderr}")
        os.chmod(out, 0o755)  # the attacker runs it as another user
        built.append(out)
    return built[0], built[1]


class AttackerUser:
    """The uid the attackers run as: given, or a throwaway system user (root only)."""

    def __init__(self, uid: int | None) -> None:
        self.created: str | None = None
        if uid is None and os.geteuid() == 0:
            self.created = f"dmvfair{secrets.token_hex(4)}"
            cmd = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent"]
            self._account([*cmd, "--shell", "/usr/sbin/nologin", "--user-group", self.created])
            uid = pwd.getpwnam(self.created).pw_uid
        self.uid = os.geteuid() if uid is None else uid
        try:
            self.gid = pwd.getpwuid(self.uid).pw_gid
            self.name = pwd.getpwuid(self.uid).pw_name
        except KeyError:
            self.gid, self.name = self.uid, str(self.uid)

    @property
    def other(self) -> bool:
        """True if the attackers run as another user than the victim."""
        return self.uid != os.geteuid()

    @staticmethod
    def _account(argv: list[str]) -> None:
        if shutil.which(argv[0]) is None:
            raise BenchError(f"{argv[0]} is missing (Debian package passwd); or give --attacker-uid")
        deadline = time.monotonic() + 30
        while True:  # another program may hold the lock on /etc/passwd for a moment
            result = subprocess.run(argv, capture_output=True, text=True)
            if result.returncode == 0:
                return
            if "lock" not in result.stderr or time.monotonic() > deadline:
                raise BenchError(f"{' '.join(argv)}: {result.stderr.strip()}")
            time.sleep(0.2)

    def remove(self) -> None:
        if self.created is None:
            return
        name, self.created = self.created, None
        self._account(["userdel", name])
        if subprocess.run(["getent", "group", name], capture_output=True).returncode == 0:
            self._account(["groupdel", name])

    def popen_args(self) -> dict:
        if not self.other:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def check_reachable(path: Path, user: AttackerUser) -> None:
    """Fail clearly if the attacker's uid cannot search its way to *path*."""
    if not user.other:
        return
    for directory in [path, *path.parents]:
        st = directory.stat()
        if st.st_uid == user.uid or st.st_mode & stat.S_IXOTH:
            continue
        raise BenchError(
            f"the attacker (uid {user.uid}) cannot reach {path}: {directory} is not searchable by others; "
            "set TMPDIR to a directory other users can search"
        )


# -- the run ------------------------------------------------------------------------------------


class Fairness:
    """One benchmark run; use as a context manager so everything is cleaned up."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.workdir: Path | None = None
        self.mounts: list[Mount] = []
        self.procs: list[subprocess.Popen] = []
        self.user: AttackerUser | None = None
        self.phases: list[Phase] = []
        self.slicing: list[SliceRow] = []
        self.slicing_unmeasured: str | None = None
        self.info: dict = {}

    # -- lifecycle

    def __enter__(self) -> Fairness:
        self.workdir = Path(tempfile.mkdtemp(prefix="dmoverfs-fairness-"))
        os.chmod(self.workdir, 0o711)  # the attacker's uid reaches its program and the mount
        return self

    def __exit__(self, *exc) -> None:
        with INTERRUPTS.held():
            self._cleanup()

    def _cleanup(self) -> None:
        problems = []
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                problems.append(f"process {proc.pid} did not exit")
        for mount in self.mounts:
            try:
                mount.stop()
            except (OSError, subprocess.SubprocessError, mounting.MountError) as exc:
                problems.append(f"{mount.name} at {mount.mountpoint}: {exc}")
        if self.user is not None:
            try:
                self.user.remove()
            except BenchError as exc:
                problems.append(str(exc))
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        if problems:
            print("fairness: could not clean up " + "; ".join(problems), file=sys.stderr)

    def _popen(self, argv: list[str], as_attacker: bool) -> subprocess.Popen:
        """Start a program, registered for cleanup before a signal can get in between."""
        extra = self.user.popen_args() if as_attacker and self.user is not None else {}
        with INTERRUPTS.critical():
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd="/",
                text=True,
                start_new_session=True,
                **extra,
            )
            self.procs.append(proc)
        return proc

    def _finish(self, proc: subprocess.Popen, timeout: float, what: str) -> str:
        """Wait for *proc*; its stdout, or BenchError with its stderr."""
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise BenchError(f"{what} did not finish in {timeout:.0f} s: {err.strip()}") from None
        finally:
            if proc.poll() is not None:
                self.procs.remove(proc)
        if proc.returncode != 0:
            raise BenchError(f"{what} failed ({proc.returncode}): {err.strip()}")
        return out

    def mount(self, name: str, args: list[str]) -> Mount:
        assert self.workdir is not None
        mnt = Mount(name, self.workdir / f"{name}-mnt", mounting.FSTYPE, self.workdir / f"{name}.log")
        mnt.mountpoint.mkdir()
        self.mounts.append(mnt)
        with INTERRUPTS.critical():  # a server started must be known to the cleanup
            mnt.proc = mounting.spawn_server(mnt.mountpoint, args, mnt.log)
        return mnt

    def stats(self, mnt: Mount) -> dict:
        return json.loads((mnt.mountpoint / "stats").read_text())

    # -- measuring

    def victim(self, mnt: Mount, func: str, size: int) -> Victim:
        """The victim's round trips on *mnt* for the settings' seconds."""
        limit = self.s.seconds + self.s.wait_limit
        argv = [str(self.fairness_bin), "victim", str(mnt.mountpoint), func, str(size), str(self.s.seconds), str(limit)]
        result = Victim(func, size)
        try:
            out = self._finish(self._popen(argv, as_attacker=False), limit + 30, f"the {func} victim")
        except BenchError as exc:
            result.error = str(exc)
            return result
        data = json.loads(out.strip().splitlines()[-1])
        result.samples_s = [ns / 1e9 for ns in data["samples_ns"]]
        if data["unfinished_ns"] is not None:
            result.unfinished_s = data["unfinished_ns"] / 1e9
        return result

    def attacked(
        self, mnt: Mount, key: str, label: str, title: str, mode: str, args: list[str], victims: list[tuple[str, int]]
    ) -> None:
        """Run the attacker, the victims while it runs, stop it, wait for the server to be idle."""
        argv = [str(self.fairness_bin), mode, str(mnt.mountpoint), *args]
        attack = Attack(mode, argv[1:])
        refused_before = self.stats(mnt)["requests"]["refused_by_limits"]
        _say(f"{label}: starting the attacker: {title}")
        proc = self._popen(argv, as_attacker=True)
        results: list[Victim] = []
        try:
            self._wait_ready(proc, f"the {mode} attacker")
            time.sleep(self.s.warmup)
            for func, size in victims:
                _say(f"{label}: {human_size(size)} {func} victim")
                results.append(self.victim(mnt, func, size))
        except BenchError as exc:
            attack.error = str(exc)
        finally:
            self._stop_attacker(proc, attack)
        attack.recovery_s, attack.settled = self._settle(mnt)
        attack.server_refused = self.stats(mnt)["requests"]["refused_by_limits"] - refused_before
        self.phases.append(Phase(key, label, title, results, attack))

    def _wait_ready(self, proc: subprocess.Popen, what: str) -> None:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        readable, _, _ = select.select([fd], [], [], 300)
        line = os.read(fd, 64).decode(errors="replace") if readable else ""
        if not line.startswith("ready"):
            proc.kill()
            err = proc.stderr.read() if proc.stderr else ""
            raise BenchError(f"{what} did not start: {err.strip() or line.strip() or 'no answer in 300 s'}")

    def _stop_attacker(self, proc: subprocess.Popen, attack: Attack) -> None:
        """SIGTERM (the attacker closes its sessions and prints its counters), SIGKILL after 10 s."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        attack.stopped = "SIGTERM"
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            attack.stopped = "killed (no answer to SIGTERM in 10 s)"
        self.procs.remove(proc)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if lines:
            attack.counters = json.loads(lines[-1])
        elif attack.error is None:
            attack.error = f"the attacker exited {proc.returncode} without its counters: {err.strip()}"

    def _settle(self, mnt: Mount) -> tuple[float, bool]:
        """Seconds until the server holds no session and no request; and whether it got there."""
        start = time.monotonic()
        while True:
            data = self.stats(mnt)
            elapsed = time.monotonic() - start
            requests = data["requests"]
            running = sum(b.get("in_flight", 0) for b in data.get("backends", {}).values())  # workers still at it
            if data["sessions"]["open"] == 0 and requests["outstanding"] == 0 and requests["in_flight"] == 0 and not running:
                return elapsed, True
            if elapsed > self.s.settle_timeout:
                _say(
                    f"the server is not idle {elapsed:.0f} s after the attacker left: "
                    f"{data['sessions']['open']} sessions, {data['requests']['outstanding']} requests outstanding"
                )
                return elapsed, False
            time.sleep(0.01)

    def copy_mbps(self, mnt: Mount, size: int) -> float:
        argv = [str(self.client_bin), "big", str(mnt.mountpoint / "dmoverio"), "copy", str(size), str(self.s.slice_seconds), "1"]
        out = self._finish(self._popen(argv, as_attacker=False), 300, f"the {human_size(size)} copy client")
        r = json.loads(out.strip().splitlines()[-1])
        return r["bytes"] / r["ns"] * 1e3  # MB/s

    # -- the whole run

    def run(self) -> None:
        assert self.workdir is not None
        s = self.s
        _say("building")
        self.fairness_bin, self.client_bin = compile_programs(self.workdir)
        self.user = AttackerUser(s.attacker_uid)
        check_reachable(self.workdir, self.user)
        base = ["--allow-other"] if self.user.other else []
        _say("mounting")
        default = self.mount("default", base)
        self.info = machine_info(self.stats(default))
        self.slices(default, base)

        _say("idle: 4 KiB zero victim")
        self.phases.append(Phase("idle", "idle", "no attacker", [self.victim(default, "zero", SMALL)]))
        work = human_size(s.monopoly_region * s.monopoly_regions)
        self.attacked(
            default,
            "a",
            "(a) monopoly",
            f"worker monopoly: {s.monopoly_sessions} sessions x 1 zero of {work} "
            f"({human_size(s.monopoly_region)} listed {s.monopoly_regions} times)",
            "monopoly",
            [str(s.monopoly_sessions), str(s.monopoly_region), str(s.monopoly_regions)],
            [("zero", SMALL), ("copy", s.copy_size)],
        )
        for threads in s.flood_threads:
            self.attacked(
                default,
                f"b{threads}",
                f"(b) flood x{threads}",
                f"decode flood: xor16 of 17 x 1024 empty iovecs, {s.flood_batch} per write, {threads} thread(s)",
                "flood",
                [str(threads), str(s.flood_batch)],
                [("zero", SMALL)],
            )
        self.attacked(
            default,
            "c",
            "(c) sessions",
            f"{s.sessions} sessions x {s.depth} queued {human_size(s.queue_size)} {s.queue_func}",
            "sessions",
            [s.queue_func, str(s.sessions), str(s.depth), str(s.queue_size)],
            [("zero", SMALL)],
        )
        _say("idle again: 4 KiB zero victim")
        victims = [self.victim(default, "zero", SMALL)]
        self.phases.append(Phase("idle-after", "idle again", "no attacker, after the attacks", victims))
        self.info["loadavg_end"] = os.getloadavg()[0]
        log = default.log_text()
        if "Traceback" in log or " CRITICAL " in log:
            raise BenchError(f"the dmoverfs server logged errors:\n{log[-4000:]}")

    def slices(self, default: Mount, base: list[str]) -> None:
        """Lone copies on *default* and on a server running whole requests, alternating."""
        options = " ".join(self.s.reference_options)
        _say(f"mounting a server with {options}")
        try:
            unsliced = self.mount("unsliced", [*base, *self.s.reference_options])
        except mounting.MountError as exc:
            words = refusal(str(exc)).replace(str(self.workdir), "...")
            self.slicing_unmeasured = f"the server refused {options}: {words}"
            _say(f"slicing cost not measured: {self.slicing_unmeasured}")
            return
        self.slicing = [SliceRow(size) for size in self.s.slice_sizes]
        for rnd in range(self.s.slice_rounds):
            for row in self.slicing:
                _say(f"slicing: {human_size(row.size)} copy, round {rnd + 1}/{self.s.slice_rounds}")
                # A B, then B A: neither server always runs second.
                order = [(default, row.default_mbps), (unsliced, row.unsliced_mbps)]
                for mnt, runs in order if rnd % 2 == 0 else order[::-1]:
                    runs.append(self.copy_mbps(mnt, row.size))
        unsliced.stop()

    def checks(self) -> list[Check]:
        """Every figure with a target."""
        idle = next(p for p in self.phases if p.key == "idle").victims[0]
        out = []
        for phase in self.phases:
            if phase.attack is None:
                continue
            tag = phase.label
            for v in phase.victims:
                bound = " (lower bound: a round trip was cut)" if v.unfinished_s is not None else ""
                err = f"victim failed: {v.error}" if v.error else ""
                if v.func == "zero":
                    out.append(Check(f"{tag}: 4 KiB zero p99", v.p99, "s", "<=", P99_TARGET_S, err or bound))
                    ratio = None if v.p50 is None or not idle.p50 else v.p50 / idle.p50
                    out.append(Check(f"{tag}: 4 KiB zero p50 / idle p50", ratio, "x", "<=", P50_RATIO_TARGET, err or bound))
                else:
                    what = f"{tag}: {human_size(v.size)} copy, longest round trip"
                    out.append(Check(what, v.max, "s", "<=", COPY_MAX_TARGET_S, err or bound))
        for row in self.slicing or [SliceRow(size) for size in self.s.slice_sizes]:
            out.append(
                Check(
                    f"slicing: lone {human_size(row.size)} copy, default / reference",
                    row.ratio,
                    "x",
                    ">=",
                    SLICING_TARGET,
                    "" if self.slicing_unmeasured is None else "not measured (see above)",
                )
            )
        return out


def refusal(message: str) -> str:
    """The server's own words from a MountError (the last line of its log tail)."""
    lines = [line.strip() for line in message.splitlines() if line.startswith("  ") and line.strip()]
    return lines[-1] if lines else message.strip()


def machine_info(stats: dict) -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    builtin = stats.get("backends", {}).get("builtin", {})
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "dmoverfs": __version__,
        "workers": builtin.get("workers"),
        "limits": stats.get("limits"),
        "loadavg_start": os.getloadavg()[0],
    }


# -- formatting ---------------------------------------------------------------------------------


def fmt_s(value: float | None, lower: bool = False) -> str:
    if value is None:
        return "-"
    mark = ">= " if lower else ""
    if value >= 1:
        return f"{mark}{value:.2f} s"
    if value >= 0.001:
        return f"{mark}{value * 1e3:.1f} ms"
    return f"{mark}{value * 1e3:.3f} ms"


def columns(rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        cells = [c.rjust(widths[j]) if j in right else c.ljust(widths[j]) for j, c in enumerate(r)]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def verdict(check: Check) -> str:
    return {True: "PASS", False: "MISS", None: "n/a"}[check.met]


def table(run: Fairness, checks: list[Check]) -> str:
    """The run as plain-text tables."""
    s, info, user = run.s, run.info, run.user
    assert user is not None
    if user.other:
        made = ", created for the run" if user.created else ""
        who = f"attacker uid {user.uid} ({user.name}{made}), victim uid {os.geteuid()}"
    else:
        who = f"attacker and victim both uid {user.uid}: per-user fairness NOT exercised"
    lines = [
        f"dmoverfs fairness benchmark, {time.strftime('%Y-%m-%d %H:%M')}: {info.get('cpus')} CPUs ({info.get('cpu')}), "
        f"Linux {info.get('kernel')}, {info.get('workers')} workers; {who}",
        f"victim: one request per write(), its response per read(), both blocking, for {s.seconds:g} s per row; "
        f"load average {info.get('loadavg_start', 0):.1f} at the start, {info.get('loadavg_end', 0):.1f} at the end"
        + (" [QUICK: sizes and times cut, figures not meaningful]" if s.quick else ""),
        "",
    ]
    lines += ["attacks (all by the attacker uid above):"]
    lines += [f"  {p.label:<13} {p.title}" for p in run.phases if p.attack is not None]
    lines.append("")
    rows = [("phase", "victim", "round trips", "p50", "p99", "max")]
    for phase in run.phases:
        for v in phase.victims:
            lower = v.unfinished_s is not None
            victim = f"{human_size(v.size)} {v.func}"
            if v.error:
                rows.append((phase.label, victim, "FAILED", "(below)", "", ""))
                continue
            rows.append((phase.label, victim, str(v.count), fmt_s(v.p50, lower), fmt_s(v.p99, lower), fmt_s(v.max, lower)))
    lines += columns(rows, {2, 3, 4, 5})
    lines += [f"{p.label}, {v.func} victim: {v.error}" for p in run.phases for v in p.victims if v.error]
    if any(v.unfinished_s is not None for p in run.phases for v in p.victims):
        lines.append(">= : a round trip was still waiting when cut; it counts as its wait so far (a lower bound)")

    lines += ["", "attackers (counted by the attacker; recovery: attacker gone -> server holds no session or request)"]
    rows = [
        ("phase", "sessions", "written", "completed", "failed", "EAGAIN writes", "refused opens", "server refused")
        + ("stopped", "recovery")
    ]
    for phase in run.phases:
        a = phase.attack
        if a is None:
            continue
        c = a.counters or {}
        recovery = f"{a.recovery_s:.2f} s" if a.settled else f"NOT idle after {a.recovery_s:.0f} s"
        rows.append(
            (
                phase.label,
                str(c.get("sessions", "-")),
                str(c.get("written", "-")),
                str(c.get("completed", "-")),
                str(c.get("failed", "-")),
                str(c.get("refused_writes", "-")),
                str(c.get("refused_opens", "-")),
                str(a.server_refused),
                a.stopped,
                recovery,
            )
        )
    lines += columns(rows, {1, 2, 3, 4, 5, 6, 7, 9})
    for phase in run.phases:
        if phase.attack is not None and phase.attack.error:
            lines.append(f"{phase.label}: {phase.attack.error}")

    options = " ".join(s.reference_options)
    lines += ["", f"slicing cost: lone copies, default server against one mounted with {options}"]
    if run.slicing_unmeasured is not None:
        lines.append(f"NOT MEASURED: {run.slicing_unmeasured}")
    else:
        lines.append(f"medians of {s.slice_rounds} alternating run(s) of {s.slice_seconds:g} s each (slowest-fastest run)")
        rows = [("size", "default", "", "reference", "", "ratio")]
        for row in run.slicing:
            d = row.as_dict()
            rows.append(
                (
                    human_size(row.size),
                    f"{d['default_median']:,.0f} MB/s",
                    f"({min(row.default_mbps):,.0f}-{max(row.default_mbps):,.0f})",
                    f"{d['unsliced_median']:,.0f} MB/s",
                    f"({min(row.unsliced_mbps):,.0f}-{max(row.unsliced_mbps):,.0f})",
                    f"{row.ratio:.3f}",
                )
            )
        lines += columns(rows, {1, 2, 3, 4, 5})

    lines += ["", "targets"]
    rows = [("figure", "measured", "target", "")]
    for c in checks:
        value = fmt_s(c.value) if c.unit == "s" else ("-" if c.value is None else f"{c.value:.2f}")
        target = fmt_s(c.target) if c.unit == "s" else f"{c.target:g}"
        rows.append((c.what, value, f"{c.op} {target}", verdict(c) + (f"  {c.note}" if c.note else "")))
    lines += columns(rows, {1})
    return "\n".join(lines)


def document(run: Fairness, checks: list[Check]) -> dict:
    user = run.user
    assert user is not None
    return {
        "format": 1,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": run.info,
        "settings": asdict(run.s),
        "attacker": {"uid": user.uid, "name": user.name, "other_user": user.other, "created": bool(user.created)},
        "phases": [p.as_dict() for p in run.phases],
        "slicing": {
            "measured": run.slicing_unmeasured is None,
            "reason": run.slicing_unmeasured,
            "rows": [r.as_dict() for r in run.slicing],
        },
        "checks": [c.as_dict() for c in checks],
    }


# -- the command --------------------------------------------------------------------------------


def measure(settings: Settings) -> tuple[str, dict]:
    """Run the benchmark; (table, JSON document)."""
    with INTERRUPTS.installed(), Fairness(settings) as run:
        run.run()
        checks = run.checks()
        return table(run, checks), document(run, checks)


def _sizes(text: str) -> tuple[int, ...]:
    units = {"k": 1 << 10, "m": MiB, "g": GiB}
    out = []
    for part in text.split(","):
        part = part.strip().lower().removesuffix("ib").removesuffix("b")
        scale = units.get(part[-1:], 1)
        out.append(int(part[:-1] if part[-1:] in units else part) * scale)
    return tuple(out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dmoverfs.tools.fairness", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (sizes cut, figures not meaningful)")
    p.add_argument("--seconds", type=float, help="victim round trips per row (default 3)")
    p.add_argument("--wait-limit", type=float, help="cut a round trip still waiting this long after its row (default 10 s)")
    p.add_argument("--monopoly-regions", type=int, help="times the 64 MiB region is listed in a monopoly request (default 1024)")
    p.add_argument("--monopoly-region-mib", type=int, help="the monopoly's region, MiB (default 64)")
    p.add_argument("--flood-threads", help="attacker threads of the decode flood, comma-separated (default 1,4)")
    p.add_argument("--flood-batch", type=int, help="requests per write of the decode flood, 1 to 64 (default 8)")
    p.add_argument("--sessions", type=int, help="sessions of attack (c) (default 1000)")
    p.add_argument("--slice-sizes", help="lone copy sizes of the slicing figures (default 16M,1G)")
    p.add_argument("--slice-rounds", type=int, help="alternating runs of the slicing figures (default 5)")
    p.add_argument(
        "--reference-options",
        help="mount options of the slicing figures' reference server (default '--slice-bytes 0': whole requests)",
    )
    p.add_argument("--attacker-uid", type=int, help="run the attackers as this uid (default, as root: a throwaway system user)")
    p.add_argument("--json", action="store_true", help="print the JSON document instead of the tables")
    p.add_argument("--out", type=Path, help="also write fairness.txt and fairness.json into this directory")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    given = given_settings(args, QUICK, 0.01)
    if args.wait_limit is not None:
        given["wait_limit"] = max(0.1, args.wait_limit)
    if args.monopoly_regions is not None:
        if not 1 <= args.monopoly_regions <= 1024:
            raise SystemExit("fairness: --monopoly-regions must be between 1 and 1024 (IOV_MAX)")
        given["monopoly_regions"] = args.monopoly_regions
    if args.monopoly_region_mib is not None:
        given["monopoly_region"] = max(1, args.monopoly_region_mib) * MiB
    if args.flood_threads:
        given["flood_threads"] = tuple(int(x) for x in args.flood_threads.split(","))
    if args.flood_batch is not None:
        if not 1 <= args.flood_batch <= 64:
            raise SystemExit("fairness: --flood-batch must be between 1 and 64 (the queue depth)")
        given["flood_batch"] = args.flood_batch
    if args.sessions is not None:
        given["sessions"] = max(1, args.sessions)
    if args.slice_sizes:
        given["slice_sizes"] = _sizes(args.slice_sizes)
    if args.slice_rounds is not None:
        given["slice_rounds"] = max(1, args.slice_rounds)
    if args.reference_options is not None:
        given["reference_options"] = tuple(shlex.split(args.reference_options))
    given["attacker_uid"] = args.attacker_uid
    return Settings(**given)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = settings_from(args)
        text, data = measure(settings)
    except (BenchError, mounting.MountError, ValueError) as exc:
        print(f"fairness: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"fairness: interrupted ({exc}); cleaned up", file=sys.stderr)
        return 130
    print(json.dumps(data, indent=2) if args.json else text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fairness.txt").write_text(text + "\n")
        (args.out / "fairness.json").write_text(json.dumps(data, indent=2) + "\n")
    failed = [p.key for p in data["phases"] if any(v["error"] for v in p["victims"]) or (p["attack"] or {}).get("error")]
    if failed:
        print(f"fairness: errors in {', '.join(failed)} (see the table)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
