"""dmoverfs from mount(8) and /etc/fstab: `mount -t fuse.dmoverfs`, through Debian's mount.fuse3.

util-linux mount runs /sbin/mount.fuse3 with PATH and HOME removed from the
environment; mount.fuse3 runs `/bin/sh -c "dmoverfs SOURCE DIR -o OPTS"`, so
`dmoverfs` must be in the shell's default PATH (/usr/local/bin ...). The
tests that use the type `fuse.dmoverfs` link /usr/local/bin/dmoverfs to this
checkout's command for their duration (under a lock on the directory, so
concurrent runs do not trip over each other) and remove the link after
(tests/default_path.py).
Old-style sources (`/path/to/dmoverfs#dmoverfs`, type `fuse`) need no link.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import require_fuse, temp_root
from default_path import VENV_DMOVERFS, dmoverfs_in_default_path
from dmio import open_session, request, run, whole
from dmoverfs import cli, mount_helper, mounting
from users import TempUser, python_paths


def require_mount_tools() -> None:
    require_fuse()
    if os.geteuid() != 0:
        pytest.fail("mount -t fuse.dmoverfs needs root here (mount(8) runs mount.fuse3 only for root or `user` fstab lines)")
    for tool in ("mount", "umount", "/sbin/mount.fuse3"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: install util-linux and fuse3 (scripts/setup does)")
    if not VENV_DMOVERFS.exists():
        pytest.fail(f"{VENV_DMOVERFS} is missing: run scripts/setup (the package installs the dmoverfs command)")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd="/")
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def proc_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once *pid* has exited (a zombie counts: its parent, not us, reaps it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = next(
                line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:")
            )
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


UTAB = Path("/run/mount/utab")


def utab_lines(point: Path) -> list[str]:
    """mount(8)'s own records (userspace options such as _netdev) about *point*."""
    try:
        return [line for line in UTAB.read_text().splitlines() if f" TARGET={point} " in f" {line} "]
    except FileNotFoundError:
        return []


@pytest.fixture
def mnt(tmp_path: Path):
    """A mount point; whatever mount(8) left there (a mount, its server, a utab record) is removed."""
    require_mount_tools()
    point = tmp_path / "mnt"
    point.mkdir()
    yield point
    left = []
    if mounting.is_mounted(point):
        left.append("a mount")
        pid = mounting.server_pid(point)
        mounting.lazy_unmount(point)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if utab_lines(point):
        left.append(f"a record in {UTAB}")
        with open(UTAB.with_name("utab.lock"), "a") as lock:  # libmount's lock protocol
            fcntl.flock(lock, fcntl.LOCK_EX)
            stale = utab_lines(point)
            UTAB.write_text("".join(line + "\n" for line in UTAB.read_text().splitlines() if line not in stale))
    if left:
        pytest.fail(f"the test left {' and '.join(left)} of {point}")


@pytest.fixture
def in_default_path():
    """/usr/local/bin/dmoverfs -> this checkout's command while the test runs (removed after)."""
    require_mount_tools()
    with dmoverfs_in_default_path() as link:
        yield link


def check_working_mount(point: Path, **limits: int) -> int:
    """A session runs a request at *point*, stats shows *limits*; returns the server's pid."""
    assert mounting.is_mounted(point)
    fd = open_session(point, "fill8")
    try:
        buf = np.zeros(4096, np.uint8)
        assert run(fd, request(7, out=whole(buf), immediate=b"\x5a"))[7].error == 0
        assert (buf == 0x5A).all()
    finally:
        os.close(fd)
    stats = json.loads((point / "stats").read_text())
    for key, value in limits.items():
        assert stats["limits"][key] == value, key
    assert stats["server"]["mountpoint"] == str(point)
    return int(stats["server"]["pid"])


# -- the command line mount.fuse3 builds -----------------------------------------------


def test_mount_fuse3_argv_is_recognised(tmp_path, mnt):
    """A stub in place of dmoverfs records what mount(8) -> mount.fuse3 really passes."""
    record = tmp_path / "argv.json"
    stub = tmp_path / "stub"
    stub.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    stub.chmod(0o755)
    # No userspace option (_netdev, x-*): mount(8) would keep it in its utab for a mount that never happened.
    opts = "queue_depth=8,allow_other,nodev,nosuid,noexec,noauto,nofail,noatime"
    sh("mount", "-t", "fuse", f"{stub}#dmoverfs", str(mnt), "-o", opts)
    argv = json.loads(record.read_text())
    assert not mounting.is_mounted(mnt)  # the stub mounted nothing
    assert argv[:3] == ["dmoverfs", str(mnt), "-o"] and len(argv) == 4
    assert mount_helper.is_helper_form(argv, mount_helper.subcommands(cli.build_parser()))
    assert mount_helper.mount_argv(argv) == ["mount", str(mnt), "--queue-depth", "8", "--allow-other"]


def test_helper_form_is_told_apart_from_subcommands():
    names = mount_helper.subcommands(cli.build_parser())
    assert {"mount", "unmount", "status"} <= names
    form = mount_helper.is_helper_form
    assert form(["dmoverfs", "/m", "-o", "rw"], names)
    assert form(["/m", "-o", "rw"], names)  # an empty source is left out by mount.fuse3
    assert form(["anything", "/m"], names) and form(["dmoverfs", "/m", "-orw,dev"], names)
    assert not form(["mount", "/m"], names) and not form(["status", "/m", "--json"], names)
    assert not form(["stauts"], names)  # a typo stays a usage error, not a mount
    assert not form(["dmoverfs", "relative", "-o", "rw"], names)
    assert not form(["dmoverfs", "/m", "-f"], names) and not form(["--help"], names) and not form([], names)
    mapped = mount_helper.mount_argv(
        [
            "dmoverfs",
            "/m",
            "-o",
            "rw,workers=3,max_sessions=0x10,max_requests=9,max_meta_bytes=65536,dev,suid",
            "-o",
            "debug,dev_link,log_file=/l,x-systemd.automount,comment=x,defaults,users,exec,relatime",
            "-o",
            "backend=a,no_backend=b,backend=c",
        ]
    )
    assert mapped == [
        "mount",
        "/m",
        "--workers",
        "3",
        "--max-sessions",
        "16",
        "--max-requests",
        "9",
        "--max-meta-bytes",
        "65536",
        "--debug",
        "--dev-link",
        "--log-file",
        "/l",
        "--backend",
        "a",
        "--no-backend",
        "b",
        "--backend",
        "c",
    ]
    # Whatever it maps to, the dmoverfs mount parser takes.
    args = cli.build_parser().parse_args(mapped)
    assert (args.workers, args.max_sessions, args.log_file) == (3, 16, "/l")
    assert (args.backend, args.no_backend) == (["a", "c"], ["b"])


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ("rw,bogus=1", "unknown mount option 'bogus=1'"),
        ("rw,allow_root", "unknown mount option 'allow_root'"),
        ("ro", "cannot be read-only"),
        ("rw,queue_depth=0", "queue_depth needs a positive whole number"),
        ("rw,workers=many", "workers needs a positive whole number"),
    ],
)
def test_bad_options_are_refused_by_name(tmp_path, opts, message):
    result = subprocess.run(
        [sys.executable, "-m", "dmoverfs", "dmoverfs", str(tmp_path / "m"), "-o", opts],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "m").exists()


# -- real mounts through mount(8) ------------------------------------------------------


def test_mount_t_fuse_dmoverfs(in_default_path, mnt, tmp_path):
    log = tmp_path / "server.log"
    sh("mount", "-t", "fuse.dmoverfs", "dmoverfs", str(mnt), "-o", f"queue_depth=8,log_file={log}")
    pid = check_working_mount(mnt, queue_depth=8)
    # Back-pressure follows the option: a session holds 8 requests, not 64.
    fd = open_session(mnt, "zero", os.O_RDWR | os.O_NONBLOCK)
    try:
        bufs = [np.ones(16, np.uint8) for _ in range(9)]
        packed = [request(i, out=whole(b)) for i, b in enumerate(bufs)]
        assert os.write(fd, b"".join(r.packed for r in packed[:8])) == 8 * 40
        with pytest.raises(BlockingIOError):
            os.write(fd, packed[8].packed)
    finally:
        os.close(fd)
    sh("umount", str(mnt))
    assert not mounting.is_mounted(mnt)
    assert proc_gone(pid), "umount left the server running"
    assert "Traceback" not in log.read_text()


def test_old_style_source_names_the_program(mnt, tmp_path):
    """`mount -t fuse /path/to/dmoverfs#dmoverfs DIR`: no need for dmoverfs in PATH."""
    log = tmp_path / "server.log"
    sh("mount", "-t", "fuse", f"{VENV_DMOVERFS}#dmoverfs", str(mnt), "-o", f"max_sessions=3,workers=2,log_file={log}")
    pid = check_working_mount(mnt, max_sessions=3, workers=2)
    fds = [open_session(mnt) for _ in range(3)]
    try:
        with pytest.raises(OSError) as exc:
            open_session(mnt)
        assert exc.value.errno == errno.ENFILE
    finally:
        for fd in fds:
            os.close(fd)
    sh(str(VENV_DMOVERFS), "unmount", str(mnt))
    assert not mounting.is_mounted(mnt)
    assert proc_gone(pid)


def test_fstab_line(in_default_path, mnt, tmp_path):
    """An fstab line (in a file of our own: mount -T) with the options systemd and mount add."""
    log = tmp_path / "server.log"
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# dmoverfs at boot\n"
        f"dmoverfs  {mnt}  fuse.dmoverfs  queue_depth=4,max_requests=100,allow_other,nofail,_netdev,"
        f"x-systemd.requires=modprobe@fuse.service,backend=builtin,log_file={log}  0  0\n"
    )
    sh("mount", "-T", str(fstab), str(mnt))
    pid = check_working_mount(mnt, queue_depth=4, max_requests=100)
    assert list(json.loads((mnt / "stats").read_text())["backends"]) == ["builtin"]
    assert "allow_other" in next(line for line in Path("/proc/self/mountinfo").read_text().splitlines() if f" {mnt} " in line)
    sh("umount", str(mnt))
    assert not mounting.is_mounted(mnt)
    assert proc_gone(pid)


def test_readme_fstab_line(in_default_path, mnt, tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (line,) = re.findall(r"```fstab\n(.*?)\n```", readme, re.S)
    source, point, fstype, opts, *rest = line.split()
    assert (source, point, fstype, rest) == ("dmoverfs", "/run/dmoverfs", "fuse.dmoverfs", ["0", "0"])
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{source} {mnt} {fstype} {opts},log_file={tmp_path / 'server.log'} 0 0\n")
    sh("mount", "-T", str(fstab), str(mnt))
    limits = {k: int(v) for k, v in re.findall(r"(queue_depth|workers|max_\w+)=(\d+)", opts)}
    pid = check_working_mount(mnt, **limits)
    sh("umount", str(mnt))
    assert proc_gone(pid)


def test_setuid_option_serves_as_that_user(in_default_path):
    """-o setuid=USER (done by mount.fuse3): the server runs as USER and mounts through fusermount3."""
    base = temp_root() / f"mount-helper-{os.getpid()}"
    base.mkdir(mode=0o755)
    os.chmod(base, 0o755)
    user = TempUser(base, "h")
    try:
        user.grant_reach([*python_paths(), Path(__file__).resolve().parent.parent, base])
        user.grant_fuse()
        point = user.make_dir(base / "mnt")
        log = user.home / "server.log"
        sh("mount", "-t", "fuse.dmoverfs", "dmoverfs", str(point), "-o", f"setuid={user.name},queue_depth=5,log_file={log}")
        assert mounting.is_mounted(point)
        info = next(line for line in Path("/proc/self/mountinfo").read_text().splitlines() if f" {point} " in line)
        assert f"user_id={user.uid}," in info
        # Without allow_other only the user may look inside (root included).
        probe = "import json, sys; d = json.load(open(sys.argv[1])); print(d['server']['pid'], d['limits']['queue_depth'])"
        result = user.run([sys.executable, "-c", probe, str(point / "stats")])
        assert result.returncode == 0, result.stderr
        pid, depth = map(int, result.stdout.split())
        assert depth == 5 and os.stat(f"/proc/{pid}").st_uid == user.uid
        sh("umount", str(point))
        assert not mounting.is_mounted(point)
        assert proc_gone(pid)
        assert not utab_lines(point)
        assert "Traceback" not in log.read_text()
    finally:
        user.remove()
        shutil.rmtree(base, ignore_errors=True)


def test_mount_failure_is_reported_by_mount(in_default_path, mnt):
    result = sh("mount", "-t", "fuse.dmoverfs", "dmoverfs", str(mnt), "-o", "queue_depth=8,bogus", check=False)
    assert result.returncode != 0
    assert "unknown mount option 'bogus'" in result.stderr
    assert not mounting.is_mounted(mnt)


def test_a_non_empty_directory_needs_the_nonempty_option(in_default_path, mnt, tmp_path):
    """A mount would hide the directory's files: refused by name unless -o nonempty asks for it."""
    (mnt / "kept").write_text("still here")
    log = tmp_path / "server.log"
    refused = sh("mount", "-t", "fuse.dmoverfs", "dmoverfs", str(mnt), "-o", f"log_file={log}", check=False)
    assert refused.returncode != 0 and "is not empty" in refused.stderr and "nonempty" in refused.stderr
    assert not mounting.is_mounted(mnt)
    sh("mount", "-t", "fuse.dmoverfs", "dmoverfs", str(mnt), "-o", f"nonempty,log_file={log}")
    check_working_mount(mnt)
    assert not (mnt / "kept").exists()  # hidden while mounted
    sh("umount", str(mnt))
    assert (mnt / "kept").read_text() == "still here"


def test_unknown_backend_fails_the_mount(in_default_path, mnt, tmp_path):
    log = tmp_path / "server.log"
    result = sh("mount", "-t", "fuse.dmoverfs", "dmoverfs", str(mnt), "-o", f"backend=nosuch,log_file={log}", check=False)
    assert result.returncode != 0
    assert "no back-end named 'nosuch'" in result.stderr
    assert not mounting.is_mounted(mnt)


# -- systemd readiness --------------------------------------------------------------------


def test_foreground_mount_notifies_systemd_when_ready(tmp_path):
    """Under a Type=notify unit: READY=1 on $NOTIFY_SOCKET once the mount answers."""
    require_fuse()
    point = tmp_path / "mnt"
    sock_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(60)
        log = open(tmp_path / "server.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "dmoverfs", "mount", "--foreground", str(point)],
            env={**os.environ, "NOTIFY_SOCKET": str(sock_path)},
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        try:
            message = sock.recv(4096).decode()
            fields = dict(line.split("=", 1) for line in message.splitlines())
            assert fields["READY"] == "1" and int(fields["MAINPID"]) == proc.pid
            assert str(point) in fields["STATUS"]
            # Ready means usable now.
            assert check_working_mount(point) == proc.pid
        finally:
            if mounting.is_mounted(point):
                subprocess.run([sys.executable, "-m", "dmoverfs", "unmount", str(point)], capture_output=True, timeout=60)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                if mounting.is_mounted(point):
                    mounting.lazy_unmount(point)
            log.close()
    assert proc.returncode == 0
    assert not mounting.is_mounted(point)
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_no_notify_socket_no_thread():
    assert mount_helper.systemd_ready_fd(Path("/m"), {}) is None
