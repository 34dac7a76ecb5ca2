"""libdmoverio.so, the preload shim: unmodified NetBSD programs on a real mount.

The programs are C: the dmoverio(4) example and the other NetBSD-style
examples in csrc/examples, and test programs in tests/shim_programs. They
open "/dev/dmoverio" and use ioctl(); the shim, built here from the current
source warning-free, redirects the open and turns the ioctls into the
session's xattrs. Programs that never touch the device must behave exactly
as without the shim: their outputs are compared byte for byte.

/dev/dmoverio must not exist for the redirect to apply, and the --dev-link
tests create it: the module holds an exclusive flock on /dev while it runs,
so concurrent test runs on this machine take turns, and every test that
touches /dev/dmoverio restores it.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import require_fuse
from dmoverfs import mounting, native, paths, wire

ROOT = Path(__file__).resolve().parent.parent
INCLUDE = ROOT / "csrc" / "include"
EXAMPLES = ROOT / "csrc" / "examples"
PROGRAMS = Path(__file__).resolve().parent / "shim_programs"
README = ROOT / "README.md"
sys.path.insert(0, str(ROOT / "csrc" / "shim"))
import build_shim  # noqa: E402  (csrc/shim/build_shim.py: the flags the package is built with)

DEV = Path("/dev/dmoverio")
CFLAGS = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", f"-I{INCLUDE}"]
RUN_TIMEOUT_S = 120  # a guard against hangs, not a performance bound
NOBODY = 65534
FUNCTIONS = ["zero", "fill8", "copy", *(f"xor{n}" for n in range(2, 17)), "iscsi-crc32c"]
EXPORTED = {
    "ioctl", "fcntl", "fcntl64", "write", "close", "dup", "dup2", "dup3", "fclose", "close_range", "closefrom",
    "open", "open64", "openat", "openat64", "__open_2", "__open64_2", "__openat_2", "__openat64_2",
    "dmoverio_shim_device_path", "dmoverfs_shared_alloc", "dmoverfs_shared_free",
}  # fmt: skip
PR_CAPBSET_DROP = 24
CAP_SYS_PTRACE = 19
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates /dev/dmoverio, switches users)")


# -- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def dev_dmoverio_lock():
    """Hold /dev/dmoverio for this module: absent, and ours to create and remove."""
    fd = os.open("/dev", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.path.lexists(DEV):
            pytest.fail(f"{DEV} exists ({describe_dev()}): these tests need it absent (dmoverfs unmount its mount)")
        yield
    finally:
        os.close(fd)


def describe_dev() -> str:
    if DEV.is_symlink():
        return f"a link to {os.readlink(DEV)}"
    return "a file" if os.path.lexists(DEV) else "absent"


@contextmanager
def dev_restored():
    """Whatever a test does to /dev/dmoverio, it is absent again afterwards (it was absent before)."""
    assert not os.path.lexists(DEV)
    try:
        yield
    finally:
        if os.path.lexists(DEV):
            os.unlink(DEV)


def compiler() -> str:
    path = shutil.which(os.environ.get("CC", "cc"))
    if path is None:
        pytest.fail("no C compiler on PATH: these tests need one (scripts/setup installs gcc)")
    return path


def compile_c(sources: list[Path], output: Path, flags: list[str]) -> Path:
    cmd = [compiler(), *flags, "-o", str(output), *map(str, sources)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if proc.returncode != 0 or proc.stderr.strip():
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return output


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """libdmoverio.so built from the current source with the package's flags (-Werror among them)."""
    assert {"-Wall", "-Wextra", "-Werror", "-std=c11"} <= set(build_shim.FLAGS)
    try:
        return build_shim.build(tmp_path_factory.mktemp("shim") / "libdmoverio.so")
    except RuntimeError as exc:
        pytest.fail(str(exc))


class Programs:
    """Compiles the C programs once per module."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.built: dict[str, Path] = {}

    def __call__(self, source: Path, *extra: str, name: str | None = None) -> Path:
        name = name or source.stem
        if name not in self.built:
            self.built[name] = compile_c([source], self.directory / name, [*CFLAGS, *extra])
        return self.built[name]


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Programs:
    return Programs(tmp_path_factory.mktemp("programs"))


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the variables the shim or dmoverfs read, plus *extra*."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "DMOVERIO_PATH", "DMOVERFS_MOUNTPOINT")}
    env.update(extra)
    return env


def run(cmd: list, *, preload: Path | None = None, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    env = clean_env(**(env or {}))
    if preload is not None:
        env["LD_PRELOAD"] = str(preload)
    try:
        return subprocess.run(
            [str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL, **kw
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{cmd} did not finish within {RUN_TIMEOUT_S} s:\nstdout: {exc.stdout!r}\nstderr: {exc.stderr!r}")


def ok_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.stderr == "", f"{proc.args} wrote to stderr:\n{proc.stderr}"
    return proc.stdout.splitlines()


def dmoverfs(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dmoverfs", *args], env=env, **kw)


def device(mnt: Path) -> dict[str, str]:
    return {"DMOVERIO_PATH": str(mnt / "dmoverio")}


HW_BZERO_OK = [f"netbsd_hw_bzero: hw_bzero cleared {1024 * 1024 + 7} bytes, twice"]


# -- the shim itself ----------------------------------------------------------------------


def exported(library: Path) -> set[str]:
    nm = shutil.which("nm")
    if nm is None:
        pytest.fail("nm (binutils) is missing")
    out = subprocess.run([nm, "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


def test_shim_builds_warning_free_and_exports_only_its_interposers(shim, tmp_path):
    assert exported(shim) == EXPORTED
    # Stricter still: -Wpedantic, and every warning gcc has under -Wall -Wextra as an error.
    compile_c([build_shim.SOURCE], tmp_path / "pedantic.so", [*build_shim.FLAGS, "-Wpedantic", f"-I{INCLUDE}", "-ldl"])


def test_installed_shim_has_the_same_interposers(shim):
    installed = native.preload_library()
    assert installed.is_absolute() and installed.is_file()
    assert exported(installed) == exported(shim)


# -- the man-page example, unmodified ---------------------------------------------------------


def test_man_page_example_is_the_man_page_function():
    """The transcription is the function printed in dmoverio(4): ioctl, /dev/dmoverio, no xattrs."""
    text = (EXAMPLES / "netbsd_hw_bzero.c").read_text()
    body = text[text.index("int\nhw_bzero(void *buf, size_t len)") : text.index("/* -- the main() around it")]
    for needle in (
        'fd = open("/dev/dmoverio", O_RDWR, 0666);',
        'strcpy(dsf.dsf_name, "zero");',
        "if (ioctl(fd, DMIO_SETFUNC, &dsf) == -1) {",
        "req.req_id = reqid++;",
        "if (write(fd, &req, sizeof(req)) != sizeof(req)) {",
        "if (read(fd, &resp, sizeof(resp)) != sizeof(resp)) {",
        "if (resp.resp_id != req.req_id) {",
    ):
        assert needle in body
    assert "xattr" not in text and "getenv" not in text and "DMOVERIO_PATH" not in text


def test_man_page_example_through_the_shim(mnt, build, shim):
    program = build(EXAMPLES / "netbsd_hw_bzero.c")
    assert ok_lines(run([program], preload=shim, env=device(mnt))) == HW_BZERO_OK


def test_man_page_example_finds_the_default_mount_point(mnt, build, shim):
    """No DMOVERIO_PATH: the shim opens dmoverio under the default mount point ($DMOVERFS_MOUNTPOINT here)."""
    program = build(EXAMPLES / "netbsd_hw_bzero.c")
    assert ok_lines(run([program], preload=shim, env={"DMOVERFS_MOUNTPOINT": str(mnt)})) == HW_BZERO_OK


def test_man_page_example_fails_without_the_shim(mnt, build):
    proc = run([build(EXAMPLES / "netbsd_hw_bzero.c")], env=device(mnt))
    assert proc.returncode == 1
    assert proc.stderr == "netbsd_hw_bzero: hw_bzero failed (call 1): No such file or directory\n"
    assert not os.path.lexists(DEV)


def test_man_page_example_through_dmoverfs_exec(mnt, build):
    program = build(EXAMPLES / "netbsd_hw_bzero.c")
    assert ok_lines(dmoverfs("exec", "--mountpoint", str(mnt), "--", str(program))) == HW_BZERO_OK
    # The default mount point, and no "--".
    assert ok_lines(dmoverfs("exec", str(program), env={"DMOVERFS_MOUNTPOINT": str(mnt)})) == HW_BZERO_OK


def test_man_page_example_sanitized(mnt, build, shim):
    """Under ASan/UBSan (the runtime must come first in LD_PRELOAD: preload it, then the shim)."""
    program = build(
        EXAMPLES / "netbsd_hw_bzero.c", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g", name="hw_san"
    )
    libasan = subprocess.run([compiler(), "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    env = {**device(mnt), "LD_PRELOAD": f"{libasan}:{shim}", "ASAN_OPTIONS": "detect_leaks=0"}
    proc = subprocess.run([str(program)], env=clean_env(**env), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert ok_lines(proc) == HW_BZERO_OK


# -- every function, and the ioctl errnos ------------------------------------------------


def test_every_function_through_ioctl_setfunc(mnt, build, shim):
    lines = ok_lines(run([build(EXAMPLES / "netbsd_funcs.c")], preload=shim, env=device(mnt)))
    assert lines == [f"{name}: ok" for name in FUNCTIONS] + [f"netbsd_funcs: all {len(FUNCTIONS)} functions passed"]
    # NetBSD's functions, all of them; the mount may offer extensions besides.
    assert set(FUNCTIONS) <= set(os.listdir(mnt / "func"))


def test_an_unknown_function_through_ioctl(mnt, build, shim):
    proc = run([build(EXAMPLES / "netbsd_funcs.c"), "zero", "memset"], preload=shim, env=device(mnt))
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == ["zero: ok", "memset: FAILED", "netbsd_funcs: 1 of 2 functions FAILED"]
    assert proc.stderr == "netbsd_funcs: DMIO_SETFUNC memset: No such process\n"  # ESRCH


SESSION_IOCTLS = [
    "DMIO_SETFUNC no-such-function: ESRCH",
    "DMIO_SETFUNC 64 bytes without NUL: ESRCH",
    "DMIO_SETFUNC NULL: EFAULT",
    "DMIO_SETFUNC straddling an unmapped page: EFAULT",
    "DMIO_SETFUNC zero: ok",
    "function now: zero",
    "DMIO_SETFUNC copy: EBUSY",
    "DMIO_SETFUNC zero again: EBUSY",
    "FIOASYNC: ok",
    "FIONBIO NULL: EFAULT",
    "FIONREAD: ENOTTY",
    "TIOCGWINSZ: ENOTTY",
    "TCGETS: ENOTTY",
    "_IOW('D', 1, int): ENOTTY",
    "_IOR('D', 0, struct dmio_setfunc): ENOTTY",
    "FIOCLEX: ok, FD_CLOEXEC set",
    "FIONCLEX: ok, FD_CLOEXEC clear",
    "dup of the session, DMIO_SETFUNC: EBUSY",
    "F_DUPFD of the session, DMIO_SETFUNC: EBUSY",
    "pipe FIONREAD: 5 bytes",
    "dup2 the session over the pipe: ok, FIONREAD ENOTTY",
    "dup3 the pipe back: ok, FIONREAD 5 bytes",
    "the closed session's number as a pipe: FIONREAD 5 bytes",
    "a new session: FIONREAD ENOTTY",
    "after fclose, its number as a pipe: FIONREAD 5 bytes",
    "threads: 8 x 25 sessions, 0 wrong answers",
]


def test_session_ioctls_give_netbsds_errnos(mnt, build, shim):
    program = build(PROGRAMS / "session_ioctls.c", "-pthread")
    assert ok_lines(run([program], preload=shim, env=device(mnt))) == SESSION_IOCTLS


# -- non-blocking, and select/poll/epoll ------------------------------------------------------


def readiness_lines(way: str, mech: str, depth: int) -> list[str]:
    return [
        f"{way} {mech}: non-blocking (F_GETFL shows O_NONBLOCK)",
        f"{way} {mech}: idle session is writable, not readable; read says EAGAIN",
        f"{way} {mech}: readable once a request completed",
        f"{way} {mech}: EAGAIN after {depth} requests; not writable",
        f"{way} {mech}: blocking read returned all {depth} responses; writable again",
        f"{way} {mech}: blocking read of an idle session waited until interrupted (EINTR)",
        f"{way} {mech}: ok",
    ]


@pytest.mark.parametrize("mech", ["poll", "select", "epoll"])
@pytest.mark.parametrize("way", ["fionbio", "fcntl"])
def test_nonblocking_and_readiness(mnt, build, shim, way, mech):
    program = build(EXAMPLES / "netbsd_readiness.c")
    assert ok_lines(run([program, way, mech], preload=shim, env=device(mnt))) == readiness_lines(way, mech, wire.NREQS_MAX)


def test_nonblocking_with_another_queue_depth(server_factory, build, shim):
    srv = server_factory("--queue-depth", "4")
    program = build(EXAMPLES / "netbsd_readiness.c")
    for way in ("fionbio", "fcntl"):
        proc = run([program, way, "epoll", "4"], preload=shim, env=device(srv.mountpoint))
        assert ok_lines(proc) == readiness_lines(way, "epoll", 4)


def test_readiness_program_checks_the_depth(mnt, build, shim):
    """Told 63 on a depth-64 mount, it fails: the EAGAIN count is really checked."""
    proc = run([build(EXAMPLES / "netbsd_readiness.c"), "fionbio", "poll", "63"], preload=shim, env=device(mnt))
    assert proc.returncode == 1
    assert "more requests accepted than the queue depth" in proc.stderr


# -- programs that never touch the device -------------------------------------------------------


def bystander_run(program: Path, directory: Path, preload: Path | None, *extra: str) -> subprocess.CompletedProcess:
    directory.mkdir()
    return run([program, directory, *extra], preload=preload)


@pytest.mark.parametrize("variant", ["plain", "fortify-lfs"])
def test_a_bystander_behaves_identically(mnt, build, shim, tmp_path, variant):
    """pipes, a pty, bad descriptors, open's mode, fcntl locks, stdio, close_range, threads, fork, exec."""
    extra = ["-pthread"] + (["-D_FORTIFY_SOURCE=2", "-D_FILE_OFFSET_BITS=64"] if variant != "plain" else [])
    program = build(PROGRAMS / "bystander.c", *extra, name=f"bystander-{variant}")
    stats = str(mnt / "stats")  # on FUSE, but no session
    without = bystander_run(program, tmp_path / "without", None, stats)
    with_shim = bystander_run(program, tmp_path / "with", shim, stats)
    assert without.returncode == with_shim.returncode == 0, (without.stderr, with_shim.stderr)
    assert without.stderr == "libdmoverio.so mapped: no\n"
    assert with_shim.stderr == "libdmoverio.so mapped: yes\n"
    assert with_shim.stdout == without.stdout
    lines = with_shim.stdout.splitlines()
    # And it observed what it should have: the comparison is not between two failures.
    for line in (
        "before main: FIONREAD 3 (ok), TIOCGWINSZ on a pipe: ENOTTY",
        "pipe FIONREAD: 0 -> 5, errno kept",
        "pipe F_SETFL O_NONBLOCK: 0, now non-blocking, errno kept",
        "FIONCLEX: 0, FD_CLOEXEC clear",
        "pty TIOCSWINSZ 0, TIOCGWINSZ 0: 33x101, errno kept",
        "pty FIONREAD: 0 -> 6",
        "ioctl on 9999: -1 EBADF",
        "open O_CREAT 0640: ok, mode 640",
        "openat O_CREAT 0604: ok, mode 604",
        "F_GETLK: 0, own lock reported as F_UNLCK",
        "FILE TIOCGWINSZ: ENOTTY",
        "FILE F_SETFL O_NONBLOCK: 0, now non-blocking",
        "close_range: 0, then FIONREAD: EBADF",
        "threads: 8 x 300 rounds, 0 wrong answers",
        "fork: the child saw FIONREAD 5",
        "exec child: FIONREAD on the inherited pipe: 5",
        "exec: the child exited 0",
        "bystander: done",
    ):
        assert line in lines, line
    if variant != "plain":
        symbols = subprocess.run(["nm", "-D", str(program)], capture_output=True, text=True).stdout
        assert "__open64_2" in symbols and "fcntl64" in symbols and "open64" in symbols


PY_BYSTANDER = r"""
import fcntl, os, pty, struct, subprocess, sys, termios, threading, tty

out = []
r, w = os.pipe()
os.write(w, b"hello")
out.append(("pipe FIONREAD", struct.unpack("i", fcntl.ioctl(r, termios.FIONREAD, b"\0" * 4))[0]))
try:
    fcntl.ioctl(r, termios.TIOCGWINSZ, b"\0" * 8)
except OSError as exc:
    out.append(("pipe TIOCGWINSZ", exc.errno))
master, slave = pty.openpty()
fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
out.append(("pty TIOCGWINSZ", struct.unpack("HHHH", fcntl.ioctl(slave, termios.TIOCGWINSZ, b"\0" * 8))[:2]))
tty.setraw(slave)
out.append(("raw", not termios.tcgetattr(slave)[3] & termios.ICANON, os.isatty(slave), os.ttyname(slave) != ""))
flags = fcntl.fcntl(r, fcntl.F_GETFL)
fcntl.fcntl(r, fcntl.F_SETFL, flags | os.O_NONBLOCK)
out.append(("O_NONBLOCK", bool(fcntl.fcntl(r, fcntl.F_GETFL) & os.O_NONBLOCK)))
fcntl.flock(w, fcntl.LOCK_EX)

def churn(i, results):
    wrong = 0
    for k in range(200):
        a, b = os.pipe()
        os.write(b, b"x" * (1 + (i + k) % 40))
        if struct.unpack("i", fcntl.ioctl(a, termios.FIONREAD, b"\0" * 4))[0] != 1 + (i + k) % 40:
            wrong += 1
        c = os.dup(a)
        os.dup2(b, c)
        os.close(a); os.close(b); os.close(c)
    results[i] = wrong

results = {}
threads = [threading.Thread(target=churn, args=(i, results)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
out.append(("threads", sorted(results.items())))
out.append(("subprocess", subprocess.run(["sh", "-c", "echo child says $0", "hi"], capture_output=True, text=True).stdout))
pid = os.fork()
if pid == 0:
    os._exit(struct.unpack("i", fcntl.ioctl(r, termios.FIONREAD, b"\0" * 4))[0])
out.append(("fork", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])))
print(repr(out))
"""


def test_python_behaves_identically(shim):
    """CPython itself (pty, termios, fcntl, threads, subprocess, fork) under the shim."""
    without = run([sys.executable, "-c", PY_BYSTANDER])
    with_shim = run([sys.executable, "-c", PY_BYSTANDER], preload=shim)
    assert without.returncode == with_shim.returncode == 0, (without.stderr, with_shim.stderr)
    assert with_shim.stderr == without.stderr == ""
    assert with_shim.stdout == without.stdout
    out = eval(with_shim.stdout)  # noqa: S307 - our own repr
    assert ("pipe FIONREAD", 5) in out and ("pty TIOCGWINSZ", (40, 120)) in out and ("fork", 5) in out
    assert ("threads", [(i, 0) for i in range(8)]) in out


def init_order(stderr: str) -> list[str]:
    return [line.split("calling init: ")[1] for line in stderr.splitlines() if "calling init: " in line]


def test_ioctl_before_the_shims_constructor(mnt, build, shim, tmp_path):
    """Another preloaded library's constructor calls ioctl/fcntl, before and after the shim's own."""
    early = compile_c([PROGRAMS / "early_lib.c"], tmp_path / "early_lib.so", [*CFLAGS, "-fPIC", "-shared"])
    true = shutil.which("true")
    plain = run([true], env={"LD_PRELOAD": str(early)})
    expected = "early_lib: FIONREAD 0 -> 5, TIOCGWINSZ on a pipe ENOTTY, O_NONBLOCK set\n"
    assert (plain.returncode, plain.stderr) == (0, expected)
    firsts = set()
    for order in ([early, shim], [shim, early]):
        env = {"LD_PRELOAD": ":".join(map(str, order)), "LD_DEBUG": "files"}
        proc = run([true], env=env)
        assert proc.returncode == 0
        assert [line for line in proc.stderr.splitlines() if line.startswith("early_lib")] == [expected.strip()]
        inits = [p for p in init_order(proc.stderr) if p in (str(early), str(shim))]
        firsts.add(inits[0])
        # A session, configured with ioctl from a constructor.
        env = {"LD_PRELOAD": ":".join(map(str, order)), "EARLY_LIB_SESSION": "1", **device(mnt)}
        proc = run([true], env=env)
        assert proc.stderr.splitlines()[-1] == "early_lib: session DMIO_SETFUNC: ok"
    assert firsts == {str(early), str(shim)}, "one order must run early_lib's constructor before the shim's"


# -- where open("/dev/dmoverio") goes ---------------------------------------------------------------


DEVICE_PATH_DRIVER = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv)
{
	char buf[4096];
	void *h = argc == 2 ? dlopen(argv[1], RTLD_NOW | RTLD_LOCAL) : NULL;
	int (*f)(char *, size_t) = NULL;
	void *sym = h ? dlsym(h, "dmoverio_shim_device_path") : NULL;

	if (sym == NULL)
		return 2;
	memcpy(&f, &sym, sizeof(f));
	if (f(buf, sizeof(buf)) != 0)
		return 1;
	printf("%s\n", buf);
	return 0;
}
"""


@contextmanager
def searchable(path: Path):
    """Let other users through *path* and its ancestors (o+x) for a while, as they were after."""
    changed = []
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH:
            changed.append((p, mode))
            p.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
    try:
        yield
    finally:
        for p, mode in changed:
            p.chmod(stat.S_IMODE(mode))


def python_device_path(env: dict[str, str], euid: int, monkeypatch) -> str:
    """The Python rule (paths.default_mountpoint) for that environment and user."""
    with monkeypatch.context() as m:
        for key in ("DMOVERIO_PATH", "DMOVERFS_MOUNTPOINT", "XDG_RUNTIME_DIR"):
            m.delenv(key, raising=False)
        for key, value in env.items():
            m.setenv(key, value)
        m.setattr(os, "geteuid", lambda: euid)
        if env.get("DMOVERIO_PATH"):
            return env["DMOVERIO_PATH"]
        return str(paths.default_mountpoint() / "dmoverio")


def test_device_path_rule_agrees_with_python(shim, tmp_path, monkeypatch):
    """The C rule in the shim and paths.default_mountpoint(), for root and for another user."""
    work = tmp_path / "work"
    work.mkdir()
    library = work / "libdmoverio.so"
    shutil.copy(shim, library)
    source = work / "driver.c"
    source.write_text(DEVICE_PATH_DRIVER)
    driver = compile_c([source], work / "driver", ["-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", "-ldl"])
    xdg = work / "xdg"
    xdg.mkdir()
    xdg.chmod(0o755)
    not_a_dir = work / "file"
    not_a_dir.write_text("")
    cases = [
        {},
        {"DMOVERFS_MOUNTPOINT": "/srv/dm"},
        {"DMOVERFS_MOUNTPOINT": ""},
        {"DMOVERIO_PATH": "/elsewhere/dev"},
        {"DMOVERIO_PATH": "", "DMOVERFS_MOUNTPOINT": "/srv/dm"},
        {"DMOVERIO_PATH": "relative/dev"},
        {"XDG_RUNTIME_DIR": str(xdg)},
        {"XDG_RUNTIME_DIR": str(xdg), "DMOVERFS_MOUNTPOINT": "/srv/dm"},
        {"XDG_RUNTIME_DIR": str(work / "missing")},
        {"XDG_RUNTIME_DIR": str(not_a_dir)},
        {"XDG_RUNTIME_DIR": ""},
    ]
    users = [os.geteuid()] + ([NOBODY] if os.geteuid() == 0 else [])
    seen = set()
    with searchable(work):
        for euid in users:
            for env in cases:
                as_user = {"user": euid, "group": euid, "extra_groups": []} if euid != os.geteuid() else {}
                proc = subprocess.run(
                    [str(driver), str(library)], env={"PATH": os.environ["PATH"], **env}, capture_output=True,
                    text=True, timeout=RUN_TIMEOUT_S, cwd="/", **as_user,
                )  # fmt: skip
                assert proc.returncode == 0, (euid, env, proc.stderr)
                c_rule = proc.stdout.strip()
                assert c_rule == python_device_path(env, euid, monkeypatch), (euid, env)
                seen.add(c_rule)
    # The cases reach every branch.
    expected = {"/srv/dm/dmoverio", "/elsewhere/dev", "relative/dev"}
    expected.add("/run/dmoverfs/dmoverio" if os.geteuid() == 0 else f"/tmp/dmoverfs-{os.geteuid()}/dmoverio")
    if NOBODY in users:
        expected |= {f"{xdg}/dmoverfs/dmoverio", f"/tmp/dmoverfs-{NOBODY}/dmoverio"}
    assert expected <= seen


OPEN_DEVICE = r"""
import os, sys
try:
    fd = os.open("/dev/dmoverio", os.O_RDWR | os.O_CREAT, 0o666)
except OSError as exc:
    print("error", exc.errno)
else:
    print(os.readlink(f"/proc/self/fd/{fd}"))
"""


def test_open_of_the_device_is_redirected_never_created(shim, tmp_path):
    target = tmp_path / "stand-in"
    target.write_text("")
    # Absolute, and relative to the working directory.
    assert run([sys.executable, "-c", OPEN_DEVICE], preload=shim, env={"DMOVERIO_PATH": str(target)}).stdout == f"{target}\n"
    proc = run([sys.executable, "-c", OPEN_DEVICE], preload=shim, env={"DMOVERIO_PATH": "stand-in"}, cwd=tmp_path)
    assert proc.stdout == f"{target}\n"
    # Nothing there: ENOENT, and O_CREAT creates neither the device nor the stand-in.
    missing = tmp_path / "missing"
    proc = run([sys.executable, "-c", OPEN_DEVICE], preload=shim, env={"DMOVERIO_PATH": str(missing)})
    assert proc.stdout == "error 2\n"
    assert not os.path.lexists(DEV) and not missing.exists()


# -- Yama: the server may not read the client ------------------------------------------------------


CAPLESS_LAUNCHER = """#!{python}
# Starts {python} without CAP_SYS_PTRACE (so process_vm_readv obeys the client's dumpable flag).
import ctypes, os, sys
if os.geteuid() == 0 and ctypes.CDLL(None, use_errno=True).prctl({drop}, {cap}, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")
os.execv({python!r}, [{python!r}] + sys.argv[1:])
"""


def drop_ptrace_capability() -> None:
    """preexec_fn: the program runs without CAP_SYS_PTRACE (as root: only its bounding set changes)."""
    if os.geteuid() == 0 and ctypes.CDLL(None, use_errno=True).prctl(PR_CAPBSET_DROP, CAP_SYS_PTRACE, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")


@pytest.fixture
def capless_server(server_factory, tmp_path, monkeypatch):
    """A server without CAP_SYS_PTRACE: a non-dumpable client's memory is closed to it (EPERM)."""
    launcher = tmp_path / "python-without-cap-sys-ptrace"
    launcher.write_text(CAPLESS_LAUNCHER.format(python=sys.executable, drop=PR_CAPBSET_DROP, cap=CAP_SYS_PTRACE))
    launcher.chmod(0o755)
    with monkeypatch.context() as m:
        m.setattr(sys, "executable", str(launcher))  # mounting.spawn_server starts sys.executable
        srv = server_factory()
    status = Path(f"/proc/{srv.pid}/status").read_text()
    cap_bnd = int(next(line for line in status.splitlines() if line.startswith("CapBnd:")).split()[1], 16)
    assert not cap_bnd & (1 << CAP_SYS_PTRACE)
    return srv


def run_ptracer(program: Path, mode: str, srv, shim) -> list[str]:
    proc = run([program, mode], preload=shim, env=device(srv.mountpoint), preexec_fn=drop_ptrace_capability)
    return ok_lines(proc)


def test_eperm_write_grants_the_server_and_retries_once(capless_server, build, shim):
    """The retry path, exercised for real up to Yama: the EPERM is the server's, the grant is simulated.

    This kernel's Yama may be absent, so the program's own prctl() stands in
    for it: PR_SET_PTRACER makes the process dumpable again, which opens its
    memory to the server exactly as Yama's grant would.
    """
    program = build(PROGRAMS / "ptracer.c", "-rdynamic")
    assert run_ptracer(program, "fake", capless_server, shim) == [
        "write: ok",
        "PR_SET_PTRACER calls: 1",
        f"PR_SET_PTRACER pid: {capless_server.pid}, result: ok",
        "request: ok, buffer zeroed",
    ]


def test_eperm_write_stays_eperm_when_the_grant_does_not_help(capless_server, build, shim):
    """The real prctl: EINVAL without Yama (no retry), or a grant that cannot beat non-dumpable (retry fails)."""
    program = build(PROGRAMS / "ptracer.c", "-rdynamic")
    lines = run_ptracer(program, "real", capless_server, shim)
    yama = os.path.exists("/proc/sys/kernel/yama/ptrace_scope")
    assert lines == [
        "write: EPERM",
        "PR_SET_PTRACER calls: 1",
        f"PR_SET_PTRACER pid: {capless_server.pid}, result: {'ok' if yama else 'EINVAL'}",
    ]


# -- dmoverfs cflags, preload, exec; pkg-config ------------------------------------------------------


def test_cflags_name_the_installed_header(mnt, tmp_path):
    out = ok_lines(dmoverfs("cflags"))
    assert len(out) == 1 and out[0].startswith("-I")
    include = Path(out[0][2:])
    assert include.is_absolute() and (include / "dev" / "dmover" / "dmover_io.h").is_file()
    assert (include / "dev" / "dmover" / "dmover_io.h").read_bytes() == (INCLUDE / "dev" / "dmover" / "dmover_io.h").read_bytes()
    # What the README says: cc $(dmoverfs cflags) prog.c
    compile_c(
        [EXAMPLES / "netbsd_hw_bzero.c"], tmp_path / "prog", ["-std=c11", "-Wall", "-Wextra", "-Werror", *shlex.split(out[0])]
    )


def test_preload_names_the_shim():
    (path,) = ok_lines(dmoverfs("preload"))
    assert Path(path).is_absolute() and Path(path) == native.preload_library()
    assert exported(Path(path)) == EXPORTED


def test_pkg_config_finds_dmoverio_in_the_virtualenv():
    pkg_config = shutil.which("pkg-config")
    if pkg_config is None:
        pytest.fail("pkg-config is missing (scripts/setup installs it)")
    pc_dir = Path(sys.prefix) / "lib" / "pkgconfig"
    assert (pc_dir / "dmoverio.pc").is_file(), f"the package did not install {pc_dir / 'dmoverio.pc'}"
    env = {"PKG_CONFIG_PATH": str(pc_dir)}
    cflags = run([pkg_config, "--cflags", "dmoverio"], env=env)
    assert cflags.returncode == 0, cflags.stderr
    (flag,) = cflags.stdout.split()
    assert Path(flag[2:]).resolve() == native.include_dir().resolve()
    assert "-I" + str(native.include_dir()) == ok_lines(dmoverfs("cflags"))[0]
    preload = run([pkg_config, "--variable=preload", "dmoverio"], env=env).stdout.strip()
    assert Path(preload).resolve() == native.preload_library().resolve()
    version = dmoverfs("--version").stdout.split()[1]
    assert run([pkg_config, "--modversion", "dmoverio"], env=env).stdout.strip() == version


def test_exec_prepends_the_shim_and_sets_the_device(mnt, tmp_path, shim):
    other = compile_c([PROGRAMS / "early_lib.c"], tmp_path / "other.so", [*CFLAGS, "-fPIC", "-shared"])
    script = 'printf "%s\\n" "$LD_PRELOAD" "$DMOVERIO_PATH" "$0" "$1"'
    proc = dmoverfs("exec", "--mountpoint", str(mnt), "--", "sh", "-c", script, "zero", "--one", env={"LD_PRELOAD": str(other)})
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [f"{native.preload_library()}:{other}", str(mnt / "dmoverio"), "zero", "--one"]


def test_exec_errors(mnt, tmp_path):
    proc = dmoverfs("exec", "--mountpoint", str(tmp_path), "--", "true")
    assert proc.returncode == 1
    assert proc.stderr == f"dmoverfs: {tmp_path} is not a dmoverfs mount; mount one with: dmoverfs mount {tmp_path}\n"
    proc = dmoverfs("exec", "--mountpoint", str(mnt))
    assert proc.returncode == 1 and "no program given" in proc.stderr
    proc = dmoverfs("exec", "--mountpoint", str(mnt), "--", str(tmp_path / "no-such-program"))
    assert proc.returncode == 127 and "No such file or directory" in proc.stderr


def readme_section() -> str:
    text = README.read_text()
    start = text.index("### Running an existing NetBSD dmoverio program")
    end = text.index("\n#", start + 10)
    return text[start:end]


def test_readme_three_commands_run_as_printed(build, tmp_path):
    """The README's three commands, verbatim, with the default mount point moved under tmp_path."""
    require_fuse()
    section = readme_section()
    block = section[section.index("```sh\n") + 6 : section.index("```", section.index("```sh\n") + 6)]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert len(commands) == 3 and commands[0].startswith("dmoverfs mount")
    shutil.copy(EXAMPLES / "netbsd_hw_bzero.c", tmp_path / "prog.c")
    mnt = tmp_path / "mnt"
    env = clean_env(
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        DMOVERFS_MOUNTPOINT=str(mnt),
        XDG_STATE_HOME=str(tmp_path / "state"),
    )
    try:
        proc = subprocess.run(
            ["bash", "-e", "-c", "\n".join(commands)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[-1] == HW_BZERO_OK[0]
    finally:
        if mounting.is_mounted(mnt):
            mounting.unmount(mnt)
    assert not mounting.is_mounted(mnt)


# -- mount --dev-link --------------------------------------------------------------------------------


def mount_dev_link(mnt: Path, tmp_path: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = dmoverfs("mount", "--dev-link", str(mnt), "--log-file", str(tmp_path / f"{mnt.name}.log"))
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@needs_root
def test_dev_link_lets_the_example_open_the_real_path(background, build, shim, tmp_path):
    program = build(EXAMPLES / "netbsd_hw_bzero.c")
    with dev_restored():
        out = mount_dev_link(background, tmp_path).stdout
        assert f"/dev/dmoverio -> {background / 'dmoverio'}" in out
        assert os.readlink(DEV) == str(background / "dmoverio")
        # The real /dev/dmoverio, not the shim's fallback (which points nowhere here).
        assert ok_lines(run([program], preload=shim, env={"DMOVERIO_PATH": "/nonexistent"})) == HW_BZERO_OK
        # Without the shim the device opens, but ioctl() on FUSE is ENOTTY.
        proc = run([program])
        assert proc.stderr == "netbsd_hw_bzero: hw_bzero failed (call 1): Inappropriate ioctl for device\n"
        assert dmoverfs("unmount", str(background)).returncode == 0
        assert not os.path.lexists(DEV)


@needs_root
def test_dev_link_of_a_foreground_server(server_factory, build, shim):
    with dev_restored():
        srv = server_factory("--dev-link")
        assert os.readlink(DEV) == str(srv.mountpoint / "dmoverio")
        assert ok_lines(run([build(EXAMPLES / "netbsd_hw_bzero.c")], preload=shim)) == HW_BZERO_OK
        srv.stop()  # SIGTERM
        assert not os.path.lexists(DEV)


@needs_root
def test_dev_link_of_a_killed_server_goes_with_the_unmount(background, tmp_path):
    with dev_restored():
        mount_dev_link(background, tmp_path)
        pid = mounting.server_pid(background)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert DEV.is_symlink()  # nobody was there to remove it
        assert dmoverfs("unmount", str(background)).returncode == 0
        assert not os.path.lexists(DEV) and not mounting.is_mounted(background)


@needs_root
def test_dev_link_refuses_what_is_not_its_own(background, tmp_path):
    with dev_restored():
        # A file that is not a link: left alone.
        DEV.write_text("")
        proc = mount_dev_link(background, tmp_path, check=False)
        assert proc.returncode == 1
        assert proc.stderr == f"dmoverfs: {DEV} exists and is not a symbolic link: not replacing it\n"
        assert not mounting.is_mounted(background) and DEV.is_file()
        DEV.unlink()
        # A link to another live mount: left alone.
        other = tmp_path / "other"
        mount_dev_link(other, tmp_path)
        try:
            proc = mount_dev_link(background, tmp_path, check=False)
            assert proc.returncode == 1 and "already points to" in proc.stderr
            assert os.readlink(DEV) == str(other / "dmoverio") and not mounting.is_mounted(background)
        finally:
            dmoverfs("unmount", str(other))
        assert not os.path.lexists(DEV)
        # A link left by a mount that is gone: replaced.
        DEV.symlink_to(tmp_path / "gone" / "dmoverio")
        mount_dev_link(background, tmp_path)
        assert os.readlink(DEV) == str(background / "dmoverio")
        # Re-pointed elsewhere meanwhile: the unmount leaves it.
        DEV.unlink()
        DEV.symlink_to("/somewhere/else")
        assert dmoverfs("unmount", str(background)).returncode == 0
        assert os.readlink(DEV) == "/somewhere/else"


def test_dev_link_needs_root(tmp_path, monkeypatch):
    """As another user (the check is on the effective uid; faked here, as this interpreter may live
    where other users cannot run it): a clear error before anything is mounted or created."""
    from dmoverfs import cli

    monkeypatch.setattr(os, "geteuid", lambda: NOBODY)
    with pytest.raises(SystemExit) as exc:
        cli.main(["mount", "--dev-link", str(tmp_path / "m")])
    assert str(exc.value).startswith("dmoverfs: --dev-link needs root: it creates /dev/dmoverio")
    assert not (tmp_path / "m").exists() and not os.path.lexists(DEV)


# -- shared buffers through the shim's allocation API -------------------------------------------


def test_shared_buffers_through_the_shim(mnt, shim, tmp_path):
    """dmoverfs_shared_alloc / _free: a copy between shared buffers, the session's limit, the releases."""
    # Linked against the shim (after the program, which needs it), and preloaded as usual.
    program = compile_c([PROGRAMS / "shared_alloc.c", shim], tmp_path / "shared_alloc", [*CFLAGS, f"-Wl,-rpath,{shim.parent}"])
    before = json.loads((mnt / "stats").read_bytes())["backends"]["builtin"]["shared_runs"]
    lines = ok_lines(run([program], preload=shim, env=device(mnt)))
    assert lines == [
        "copy error 0, 0 bytes differ",
        "allocated 62 more, then ENOSPC",  # 64 registrations per session, two of them the copy's
        "free 0 0",
        "free again -1 ENOENT",  # unregistered already (and unmapping nothing is no error)
    ]
    assert json.loads((mnt / "stats").read_bytes())["backends"]["builtin"]["shared_runs"] == before + 1
