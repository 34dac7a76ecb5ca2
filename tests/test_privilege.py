"""Privilege: an unprivileged server, allow_other, and whose memory a session reaches.

Real users are created for this module (``useradd``, removed with ``userdel -r``
at teardown even when a test fails; see users.py for what they are granted and
how it is taken back). Every client below is a real process running as one of
those users; its memory is laid out at fixed addresses so that the same
address holds different bytes in different processes, which is what shows
whose memory a request acted on.

The page every process lays out at an address (``lay_out`` below)::

    +0     64 bytes of data ("src"), different in every process
    +2048  iovec {page + 0, 64}               the source list
    +2064  iovec {page + 4096, 64}            the destination list
    +2080  dmio_buffer {page + 2048, 1}       the input table of a copy
    +4096  64 bytes, zero ("dst")

``page_copy(page, id)`` is a copy request that lies entirely inside such a page:
written on a session, it copies the writer's src to the writer's dst (SPEC.md,
"Wire format": a request's pointers are addresses in the address space of the
process that wrote it, whoever opened the session).
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Server, temp_root
from dmio import stats, wait_for
from dmoverfs import mounting
from programs import Builder
from users import LineProcess, TempUser, cmdline, fuse_conf, kill_and_wait, make_user, pids_of_uid

TESTS = Path(__file__).resolve().parent
PY = sys.executable

#: Fixed addresses, far from where Linux puts heaps, libraries and stacks.
BASE = 0x3A5A_0000_0000
OTHER = 0x3A5B_0000_0000
PAGE = 8192

PRELUDE = """
import ctypes, errno, json, mmap, os, select, socket, stat, struct, sys
sys.path.insert(0, {tests!r})
import numpy as np
from dmio import *
from pathlib import Path
mnt = Path({mnt!r})
BASE, OTHER, PAGE = {base}, {other}, {page}

def say(key, value=None):
    print(key, json.dumps(value), flush=True)

def hear(expected):
    line = sys.stdin.readline().strip()
    assert line == expected, f"expected {{expected!r}}, got {{line!r}}"

def name(code):
    return "OK" if code == 0 else errno.errorcode.get(code, str(code))

def err(fn, *args):
    try:
        fn(*args)
    except OSError as exc:
        return name(exc.errno)
    return "OK"

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
MAP_FIXED_NOREPLACE = 0x100000

def map_at(address, size=PAGE):
    got = libc.mmap(address, size, mmap.PROT_READ | mmap.PROT_WRITE,
                    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
    if got != address:
        raise OSError(ctypes.get_errno(), f"cannot map {{address:#x}}")
    return np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(address))

def mapped(address):
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return True
    return False

def lay_out(page, base, data):
    assert len(data) == 64
    page[:] = 0
    page[:64] = np.frombuffer(data, np.uint8)
    page[2048:2064] = np.frombuffer(IOV.pack(base, 64), np.uint8)
    page[2064:2080] = np.frombuffer(IOV.pack(base + 4096, 64), np.uint8)
    page[2080:2096] = np.frombuffer(DMBUF.pack(base + 2048, 1), np.uint8)

def page_copy(base, req_id):
    return REQ.pack(base + 2064, 1, bytes(8), base + 2080, req_id)

def dst_of(page):
    return bytes(page[4096:4160])

def whose(dst):
    # Whose bytes a dst holds: "zero", the label given to data() in the test, or their hex.
    if dst == bytes(64):
        return "zero"
    text = dst.decode("latin-1").rstrip("#")
    label = text[:-1] if text.endswith(" ") else text
    return label if (label.encode("latin-1") + b" ").ljust(64, b"#") == dst else dst.hex()

def round_trip(fd, req):
    # The outcome of one request: the write's errno name if it failed, else its response's.
    try:
        os.write(fd, req)
    except OSError as exc:
        return name(exc.errno)
    return name(collect(fd, 1)[0].error)
"""


def data(label: str) -> bytes:
    """64 recognisable bytes."""
    return (label.encode() + b" ").ljust(64, b"#")


def expected_page(base: int, content: bytes) -> bytes:
    """The bytes ``lay_out(page, base, content)`` leaves in a page."""
    page = bytearray(PAGE)
    page[:64] = content
    page[2048:2064] = base.to_bytes(8, "little") + (64).to_bytes(8, "little")
    page[2064:2080] = (base + 4096).to_bytes(8, "little") + (64).to_bytes(8, "little")
    page[2080:2096] = (base + 2048).to_bytes(8, "little") + (1).to_bytes(4, "little") + bytes(4)
    return bytes(page)


def script(mnt: Path, body: str) -> list[str]:
    prelude = PRELUDE.format(tests=str(TESTS), mnt=str(mnt), base=BASE, other=OTHER, page=PAGE)
    return [PY, "-c", prelude + textwrap.dedent(body)]


def spawn(user: TempUser | None, mnt: Path, body: str, name: str, pass_fds: tuple[int, ...] = ()) -> LineProcess:
    """A client running *body* as *user* (None: root, this process's user)."""
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    argv = script(mnt, body)
    if user is None:
        proc = subprocess.Popen(argv, pass_fds=pass_fds, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, **pipes)
    else:
        proc = user.popen(argv, pass_fds=pass_fds, **pipes)
    return LineProcess(proc, name)


def result(proc: LineProcess, key: str = "result"):
    return json.loads(proc.expect(key))


def mapped_in(pid: int, address: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return True
    return False


def ids(pid: int) -> dict[str, list[int]]:
    """Uid, Gid lines and the effective capabilities of *pid* from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid"):
                out[key] = [int(x) for x in value.split()]
            elif key == "CapEff":
                out[key] = int(value, 16)
    return out


def exited(pid: int, timeout: float = 10.0) -> bool:
    """True once *pid* has exited (a zombie counts: its parent, not us, reaps it)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def errno_name(fn, *args) -> str:
    try:
        fn(*args)
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "OK"


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def users_base():
    """A directory for the users' homes and the root server's mount, searchable by them."""
    base = temp_root() / f"privilege-{os.getpid()}"
    base.mkdir(mode=0o755)
    os.chmod(base, 0o755)
    yield base
    # The users remove their homes; the root server's mount point is removed by its fixture.
    try:
        base.rmdir()
    except OSError:
        pass


@pytest.fixture(scope="module")
def user_a(users_base):
    """The unprivileged user who mounts, and who opens sessions against the root server."""
    user = make_user(users_base, "a", mounts=True)
    yield user
    user.remove()


@pytest.fixture(scope="module")
def user_b(users_base):
    """Another unprivileged user: a victim, an intruder or a receiver of a passed descriptor."""
    user = make_user(users_base, "b", mounts=False)
    yield user
    user.remove()


@pytest.fixture(scope="module")
def root_server(users_base):
    """A root server mounted with --allow-other where the users can reach it."""
    home = users_base / "root-allow-other"
    home.mkdir()
    os.chmod(home, 0o755)  # whatever the umask
    srv = Server(home / "mnt", ["--allow-other"]).start()
    yield srv
    srv.stop()
    log = srv.log()
    srv.log_path.unlink(missing_ok=True)
    try:
        home.rmdir()
    except OSError:
        pass
    assert "Traceback" not in log and " CRITICAL " not in log, f"the root server logged errors:\n{log}"


class UserMount:
    """A mount made by ``dmoverfs mount`` run as an unprivileged user."""

    def __init__(self, user: TempUser, *options: str) -> None:
        self.user = user
        # Outside the user's (private) home, so that other users can reach it under allow_other.
        self.mountpoint = user.make_dir(user.home.parent / f"{user.name}-mnt-{secrets.token_hex(2)}")
        self.log = user.home / f"{self.mountpoint.name}.log"
        self.options = list(options)
        self.server_pid: int | None = None

    def mount(self) -> subprocess.CompletedProcess:
        done = self.user.run([PY, "-m", "dmoverfs", "mount", str(self.mountpoint), "--log-file", str(self.log), *self.options])
        found = re.search(r"\(server pid (\d+),", done.stdout)
        if found:
            self.server_pid = int(found.group(1))
        return done

    def unmount(self) -> subprocess.CompletedProcess:
        return self.user.run([PY, "-m", "dmoverfs", "unmount", str(self.mountpoint)])

    def mounted(self) -> bool:
        return mounting.is_mounted(self.mountpoint)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cleanup(self) -> str:
        """Whatever a failed test left: unmount as the user, else detach as root; returns the server's log."""
        if self.mounted():
            try:
                self.unmount()
            except AssertionError:
                pass  # it hung: detach below
        if self.mounted():
            mounting.lazy_unmount(self.mountpoint)
        # A server that outlived its mount: the user's processes serving this mount point, by pid.
        kill_and_wait([pid for pid in pids_of_uid(self.user.uid) if str(self.mountpoint) in cmdline(pid)])
        log = self.log_text()
        self.log.unlink(missing_ok=True)
        return log


@pytest.fixture
def user_mount(user_a):
    made: list[UserMount] = []

    def make(*options: str) -> UserMount:
        um = UserMount(user_a, *options)
        made.append(um)
        return um

    yield make
    logs = [um.cleanup() for um in made]
    for log in logs:
        assert "Traceback" not in log and " CRITICAL " not in log, f"a server of {user_a.name} logged errors:\n{log}"


# -- the device as an unprivileged user -----------------------------------------------------

DEVICE_CHECKS = """
import google_crc32c
rng = np.random.default_rng(2024)
out = {}
st = os.stat(mnt)
out["mount_owner"] = st.st_uid

def one(function, req):
    fd = open_session(mnt, function)
    try:
        return run(fd, req)[req.req_id]
    finally:
        os.close(fd)

def rand(n):
    return rng.integers(0, 256, n, dtype=np.uint8)

# zero: the output cut at random places
buf = rng.integers(1, 256, 300_001, dtype=np.uint8)
r = one("zero", request(1, out=cut(buf, rng)))
out["zero"] = [name(r.error), not buf.any()]

# fill8: the byte is immediate[0]
buf = np.zeros(65_537, np.uint8)
r = one("fill8", request(2, out=cut(buf, rng), immediate=b"\\x5a\\x01\\x02"))
out["fill8"] = [name(r.error), bytes(buf) == b"\\x5a" * buf.size]

# copy: output and input cut differently; larger than the inline limit (a worker runs it)
src, dst = rand(3 << 20), np.zeros(3 << 20, np.uint8)
r = one("copy", request(3, out=cut(dst, rng), inputs=[cut(src, rng)]))
out["copy"] = [name(r.error), bytes(dst) == bytes(src)]

# xor2 and xor16 against numpy
for n in (2, 16):
    srcs = [rand(100_003) for _ in range(n)]
    dst = rand(100_003)
    r = one(f"xor{n}", request(4, out=cut(dst, rng), inputs=[cut(s, rng) for s in srcs]))
    out[f"xor{n}"] = [name(r.error), bytes(dst) == bytes(np.bitwise_xor.reduce(srcs))]

# iscsi-crc32c: RFC 3720's check value, then a CRC chained over two requests against google-crc32c
check = np.frombuffer(bytearray(b"123456789"), np.uint8)
r = one("iscsi-crc32c", request(5, inputs=[whole(check)]))
out["crc_check"] = [name(r.error), hex(r.crc)]
data = rand(200_000)
fd = open_session(mnt, "iscsi-crc32c")
first = run(fd, request(6, inputs=[cut(data[:70_000], rng)]))[6]
second = run(fd, request(7, inputs=[cut(data[70_000:], rng)], immediate=first.crc))[7]
os.close(fd)
out["crc_chained"] = [name(first.error), name(second.error), second.crc == google_crc32c.value(bytes(data))]

# a bad address in the client's own memory: EFAULT for that request only
fd = open_session(mnt, "zero")
good = np.ones(4096, np.uint8)
res = run(fd, request(8, out=[(16, 64)]), request(9, out=whole(good)))
out["efault"] = [name(res[8].error), name(res[9].error), not good.any()]
os.close(fd)

# poll: an idle session is writable, not readable; a completed request makes it readable
fd = open_session(mnt, "zero")
p = select.poll()
p.register(fd, select.POLLIN | select.POLLOUT)
idle = p.poll(0)[0][1]
keep = np.ones(4096, np.uint8)
req = request(10, out=whole(keep))
submit(fd, req)
ready = p.poll(10_000)[0][1]
got = collect(fd, 1)
out["poll"] = [bool(idle & select.POLLIN), bool(idle & select.POLLOUT), bool(ready & select.POLLIN), got[0].req_id]

# the ioctl equivalents: ENODATA before a function, ESRCH for an unknown one, EBUSY once set
out["xattr"] = [os.getxattr(fd, XATTR_FUNCTION).decode(), err(os.setxattr, fd, XATTR_FUNCTION, b"copy")]
os.close(fd)
fd = os.open(mnt / "dmoverio", os.O_RDWR)
out["xattr"] += [err(os.getxattr, fd, XATTR_FUNCTION), err(os.setxattr, fd, XATTR_FUNCTION, b"no-such-function")]
os.setxattr(fd, XATTR_FUNCTION, b"copy")
out["xattr"] += [os.getxattr(fd, XATTR_FUNCTION).decode(), err(os.setxattr, fd, XATTR_FUNCTION, b"zero")]

# the session's inode belongs to its opener, mode 0600
st = os.fstat(fd)
out["session_inode"] = [st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode))]
out["server_xattr"] = int(os.getxattr(fd, "user.dmover.server"))
out["stats_sessions_open"] = json.loads((mnt / "stats").read_text())["sessions"]["open"]
os.close(fd)
say("result", out)
"""


def test_an_unprivileged_user_mounts_uses_and_unmounts(user_a, user_b, user_mount):
    um = user_mount()
    done = um.mount()
    assert done.returncode == 0, done.stderr
    assert um.mounted()
    assert um.server_pid is not None, done.stdout

    # The server is the user's process, with no capability at all; the kernel mount is the user's.
    server = ids(um.server_pid)
    assert server["Uid"] == [user_a.uid] * 4 and server["Gid"] == [user_a.gid] * 4
    assert server["CapEff"] == 0
    with open("/proc/self/mountinfo") as f:
        (line,) = [entry for entry in f if f" {um.mountpoint} " in entry]
    assert f"user_id={user_a.uid}" in line and "default_permissions" in line and "allow_other" not in line

    client = spawn(user_a, um.mountpoint, DEVICE_CHECKS, "device checks")
    out = result(client)
    assert client.finish() == 0
    assert out == {
        "mount_owner": user_a.uid,
        "zero": ["OK", True],
        "fill8": ["OK", True],
        "copy": ["OK", True],
        "xor2": ["OK", True],
        "xor16": ["OK", True],
        "crc_check": ["OK", "0xe3069283"],
        "crc_chained": ["OK", "OK", True],
        "efault": ["EFAULT", "OK", True],
        "poll": [False, True, True, 10],
        "xattr": ["zero", "EBUSY", "ENODATA", "ESRCH", "copy", "EBUSY"],
        "session_inode": [user_a.uid, user_a.gid, "0o600"],
        "server_xattr": um.server_pid,
        "stats_sessions_open": 1,
    }

    status = user_a.run([PY, "-m", "dmoverfs", "status", str(um.mountpoint), "--json"])
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["server"]["pid"] == um.server_pid

    # Without allow_other, FUSE refuses every other user, root included.
    assert errno_name(os.open, um.mountpoint / "dmoverio", os.O_RDWR) == "EACCES"
    assert errno_name(os.stat, um.mountpoint / "stats") == "EACCES"
    assert errno_name(os.listdir, um.mountpoint) == "EACCES"
    intruder = spawn(
        user_b,
        um.mountpoint,
        """
        say("result", [err(os.open, mnt / "dmoverio", os.O_RDWR), err(os.open, mnt / "func" / "zero", os.O_RDWR),
                       err(os.stat, mnt / "stats"), err(os.listdir, mnt)])
        """,
        "user b",
    )
    assert result(intruder) == ["EACCES"] * 4
    assert intruder.finish() == 0

    undone = um.unmount()
    assert undone.returncode == 0, undone.stderr
    assert not um.mounted()
    assert exited(um.server_pid)
    assert "Traceback" not in um.log_text()


def test_a_user_mount_with_allow_other_needs_user_allow_other(user_a, user_mount):
    um = user_mount("--allow-other")
    with fuse_conf(user_allow_other=False):
        done = um.mount()
    assert done.returncode != 0
    assert "user_allow_other" in done.stderr  # fusermount3's reason, passed on by dmoverfs mount
    assert len(done.stderr.strip().splitlines()) <= 3 and "Traceback" not in done.stderr, done.stderr
    assert not um.mounted()


def mount_allowing_others(user_mount) -> UserMount:
    """A's mount with --allow-other; user_allow_other is in /etc/fuse.conf only while fusermount3 mounts."""
    um = user_mount("--allow-other")
    with fuse_conf(user_allow_other=True):
        done = um.mount()
    assert done.returncode == 0, done.stderr
    with open("/proc/self/mountinfo") as f:
        (line,) = [entry for entry in f if f" {um.mountpoint} " in entry]
    assert "allow_other" in line
    return um


def test_a_user_mount_with_allow_other_serves_only_processes_it_may_ptrace(user_a, user_b, user_mount):
    """The server runs as A: other users (root too) may open sessions, but A cannot reach their memory.

    process_vm_readv needs ptrace access to the client: A has it over A's own
    processes only, so every request from B or root fails with EPERM at write
    time, before anything is read or written.
    """
    um = mount_allowing_others(user_mount)

    # A's own requests work in its allow_other mount.
    owner = spawn(
        user_a,
        um.mountpoint,
        """
        page = map_at(BASE); lay_out(page, BASE, b"A" * 64)
        fd = os.open(mnt / "func" / "copy", os.O_RDWR)
        os.write(fd, page_copy(BASE, 1))
        say("result", [name(collect(fd, 1)[0].error), dst_of(page) == b"A" * 64])
        """,
        "user a",
    )
    assert result(owner) == ["OK", True]
    assert owner.finish() == 0

    # B opens sessions (allow_other), owns them, and cannot get anything done through them.
    other = spawn(
        user_b,
        um.mountpoint,
        """
        page = map_at(BASE); lay_out(page, BASE, b"B" * 64)
        fd = os.open(mnt / "func" / "copy", os.O_RDWR)
        st = os.fstat(fd)
        say("result", [st.st_uid, oct(stat.S_IMODE(st.st_mode)), err(os.write, fd, page_copy(BASE, 2)),
                       dst_of(page) == bytes(64)])
        """,
        "user b",
    )
    assert result(other) == [user_b.uid, "0o600", "EPERM", True]
    assert other.finish() == 0

    # Root too: an unprivileged server may not ptrace root's processes.
    import numpy as np

    from dmio import open_session, request, submit, whole

    buf = np.ones(64, np.uint8)
    fd = open_session(um.mountpoint, "zero")
    try:
        assert os.fstat(fd).st_uid == 0
        assert errno_name(submit, fd, request(3, out=whole(buf))) == "EPERM"
        assert buf.all()
    finally:
        os.close(fd)

    assert um.unmount().returncode == 0
    assert not um.mounted()


def test_eperm_is_explained_in_the_server_log(user_b, user_mount):
    um = mount_allowing_others(user_mount)
    other = spawn(
        user_b,
        um.mountpoint,
        """
        page = map_at(BASE); lay_out(page, BASE, b"B" * 64)
        fd = os.open(mnt / "func" / "copy", os.O_RDWR)
        say("result", [os.getpid(), err(os.write, fd, page_copy(BASE, 1))])
        """,
        "user b",
    )
    pid, outcome = result(other)
    assert other.finish() == 0
    assert outcome == "EPERM"
    assert um.unmount().returncode == 0
    explained = [line for line in um.log_text().splitlines() if str(pid) in line and "ptrace" in line.lower()]
    assert explained, f"nothing in the server's log names client {pid} and ptrace:\n{um.log_text()}"


# -- whose memory a session reaches -------------------------------------------------------

VICTIM = """
page = map_at(BASE); lay_out(page, BASE, SECRET)
say("ready", os.getpid())
hear("report")
say("page", bytes(page).hex())
"""

INTRUDER = """
out = {"base_mapped_here": mapped(BASE)}
fd = os.open(mnt / "func" / "copy", os.O_RDWR)
st = os.fstat(fd)
out["session_inode"] = [st.st_uid, oct(stat.S_IMODE(st.st_mode))]
dst = np.zeros(64, np.uint8)

# 1. Copy from BASE, where every victim keeps its secret, into our own buffer.
r = run(fd, request(1, out=whole(dst), inputs=[[(BASE, 64)]]))[1]
out["copy_from_base"] = [name(r.error), bool(dst.any())]

# 2. The victims' own iovec array (at BASE + 2048, pointing at their secret) as our input list:
#    the write fails, because iovec arrays are read from our memory, where nothing is there.
table = np.frombuffer(bytearray(DMBUF.pack(BASE + 2048, 1)), np.uint8)
dst_list = iovec_array(whole(dst))
out["victims_iovec_array"] = err(os.write, fd, REQ.pack(addr(dst_list), 1, bytes(8), addr(table), 2))
out["dst_still_zero"] = not bool(dst.any())

# 3. Fill the victims' secret.
fill = os.open(mnt / "func" / "fill8", os.O_RDWR)
r = run(fill, request(3, out=[(BASE, 64)], immediate=b"\\xee"))[3]
out["fill_base"] = name(r.error)

# 4. Now map BASE ourselves, with our own bytes: the same requests act on them.
page = map_at(BASE); lay_out(page, BASE, OWN)
r = run(fd, request(4, out=whole(dst), inputs=[[(BASE, 64)]]))[4]
out["copy_from_own_base"] = [name(r.error), bytes(dst) == OWN]
dst[:] = 0
os.write(fd, REQ.pack(addr(dst_list), 1, bytes(8), addr(table), 5))
out["own_iovec_array"] = [name(collect(fd, 1)[0].error), bytes(dst) == OWN]
r = run(fill, request(6, out=[(BASE, 64)], immediate=b"\\xee"))[6]
out["fill_own_base"] = [name(r.error), bytes(page[:64]) == b"\\xee" * 64]
say("result", out)
"""


def test_a_session_reaches_only_its_writers_memory(root_server, user_a, user_b):
    """Against a root server with --allow-other, which could reach any process, A's requests reach only A.

    Three victims hold a secret at BASE (and, at BASE + 2048, an iovec array
    pointing at it): a root process, a process of user B, and another process
    of user A itself. A's requests naming BASE fail with EFAULT while A has
    nothing there, and act on A's own bytes once it maps BASE; no victim's page
    changes by a single byte.
    """
    mnt = root_server.mountpoint
    secrets_of = {"root": data("root's secret"), "b": data("user b's secret"), "a2": data("user a's other process")}
    owners = {"root": None, "b": user_b, "a2": user_a}
    victims = {
        label: spawn(owners[label], mnt, f"SECRET = {secrets_of[label]!r}\n" + VICTIM, f"victim {label}") for label in secrets_of
    }
    try:
        for label, victim in victims.items():
            pid = int(victim.expect("ready"))
            assert mapped_in(pid, BASE)
            assert ids(pid)["Uid"][0] == (0 if owners[label] is None else owners[label].uid)

        own = data("user a's own bytes")
        intruder = spawn(user_a, mnt, f"OWN = {own!r}\n" + INTRUDER, "intruder a")
        out = result(intruder)
        assert intruder.finish() == 0
        assert out == {
            "base_mapped_here": False,
            "session_inode": [user_a.uid, "0o600"],
            "copy_from_base": ["EFAULT", False],
            "victims_iovec_array": "EFAULT",
            "dst_still_zero": True,
            "fill_base": "EFAULT",
            "copy_from_own_base": ["OK", True],
            "own_iovec_array": ["OK", True],
            "fill_own_base": ["OK", True],
        }

        for label, victim in victims.items():
            victim.send("report")
            assert bytes.fromhex(json.loads(victim.expect("page"))) == expected_page(BASE, secrets_of[label]), label
            assert victim.finish() == 0
    finally:
        for victim in victims.values():
            victim.kill()


PASS_OPENER = """
sock = socket.socket(fileno=SOCK)
page = map_at(BASE); lay_out(page, BASE, OPENER)
fd = os.open(mnt / "func" / "copy", os.O_RDWR)
path_fd = os.open(f"/proc/self/fd/{fd}", os.O_PATH)
socket.send_fds(sock, [b"session"], [fd, path_fd])
os.close(path_fd)
say("sent", [os.getpid(), fd, os.fstat(fd).st_ino])
hear("report")
say("dst", whose(dst_of(page)))
hear("exit")
"""

PASS_RECEIVER = """
sock = socket.socket(fileno=SOCK)
_, (fd, path_fd), _, _ = socket.recv_fds(sock, 64, 2)
say("pid", os.getpid())
out = {"fstat": err(os.fstat, fd)}
if out["fstat"] == "OK":
    st = os.fstat(fd)
    out["session_inode"] = [st.st_uid, oct(stat.S_IMODE(st.st_mode))]
# The same page at the same address as the opener's, with our own bytes: a request inside it names both.
page = map_at(BASE); lay_out(page, BASE, RECEIVER)
out["copy_in_page"] = round_trip(fd, page_copy(BASE, 1))
out["own_dst"] = whose(dst_of(page))
# A page only we have (the opener has nothing at OTHER).
other = map_at(OTHER); lay_out(other, OTHER, RECEIVER)
out["copy_in_own_only_page"] = round_trip(fd, page_copy(OTHER, 2))
out["own_only_dst"] = whose(dst_of(other))
p = select.poll(); p.register(fd, select.POLLIN | select.POLLOUT)
out["poll"] = p.poll(0)[0][1]
# Attributes are checked against the inode (user.* xattrs need read permission): 0600, not ours.
out["xattr"] = err(os.getxattr, fd, XATTR_FUNCTION)
# Attaching to the session anew through its inode is an open(): the 0600 mode refuses us.
out["reopen"] = err(os.open, f"/proc/self/fd/{path_fd}", os.O_RDWR)
say("result", out)
hear("opener gone")
page[4096:4160] = 0
out = {"copy_in_page": round_trip(fd, page_copy(BASE, 3)), "own_dst": whose(dst_of(page))}
os.close(fd)
say("after", out)
"""


def _pass_session(opener_user: TempUser, receiver_user: TempUser, mnt: Path) -> tuple[LineProcess, LineProcess]:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        opener = spawn(
            opener_user, mnt, f"SOCK = {left.fileno()}\nOPENER = {data('opener')!r}\n" + PASS_OPENER, "opener", (left.fileno(),)
        )
        receiver = spawn(
            receiver_user,
            mnt,
            f"SOCK = {right.fileno()}\nRECEIVER = {data('receiver')!r}\n" + PASS_RECEIVER,
            "receiver",
            (right.fileno(),),
        )
    finally:
        left.close()
        right.close()
    return opener, receiver


def _reopen_as_root(pid: int, fd: int, ino: int) -> str:
    """Attach to a session through /proc/PID/fd/N, as root."""
    try:
        new = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
    except OSError as exc:
        return errno.errorcode[exc.errno]
    try:
        return "the same session" if os.fstat(new).st_ino == ino else "another inode"
    finally:
        os.close(new)


def _check_passed_session(opener: LineProcess, receiver: LineProcess, expected: dict, root_reopen: str, after: dict) -> int:
    """The receiver's results, the opener's memory and the receiver's once the opener has exited.

    Returns the receiver's pid.
    """
    opener_pid, opener_fd, session_ino = json.loads(opener.expect("sent"))
    receiver_pid = result(receiver, "pid")
    out = result(receiver)
    assert not mapped_in(opener_pid, OTHER)
    assert out == expected
    assert _reopen_as_root(opener_pid, opener_fd, session_ino) == root_reopen
    # The receiver's requests never touched the opener: its dst is still zero.
    opener.send("report")
    assert json.loads(opener.expect("dst")) == "zero"
    # The opener's exit changes nothing for the receiver, whose requests never involved it.
    opener.send("exit")
    assert opener.finish() == 0
    receiver.send("opener gone")
    assert result(receiver, "after") == after
    assert receiver.finish() == 0
    return receiver_pid


def test_a_session_passed_to_another_user_addresses_the_receivers_memory(root_server, user_a, user_b):
    """SCM_RIGHTS from A to B (root server, --allow-other): B's requests act on B's memory, never A's.

    A session descriptor is no capability over its opener's memory: whoever
    holds it moves only its own. The session's inode stays A's (0600), so B
    can neither read its attributes nor open it anew.
    """
    mnt = root_server.mountpoint
    opener, receiver = _pass_session(user_a, user_b, mnt)
    try:
        _check_passed_session(
            opener,
            receiver,
            {
                "fstat": "OK",
                "session_inode": [user_a.uid, "0o600"],
                "copy_in_page": "OK",
                "own_dst": "receiver",
                "copy_in_own_only_page": "OK",
                "own_only_dst": "receiver",
                "poll": select.POLLOUT,
                "xattr": "EACCES",
                "reopen": "EACCES",
            },
            # default_permissions: the 0600 mode does not stop root (CAP_DAC_OVERRIDE).
            root_reopen="the same session",
            after={"copy_in_page": "OK", "own_dst": "receiver"},
        )
    finally:
        opener.kill()
        receiver.kill()
    assert wait_for(lambda: stats(mnt)["sessions"]["open"] == 0)


def test_a_session_passed_out_of_a_mount_without_allow_other(user_a, user_b, user_mount):
    """A user mount without allow_other: a descriptor A passes to B moves nothing, of A's or of B's.

    FUSE applies allow_other to lookups, attributes, xattrs and opens, not to
    read, write and poll on a file that is already open: B can write on the
    session but cannot fstat it. B's requests name B's memory, which A's
    unprivileged server may not reach: EPERM, explained in its log, and no
    byte of A's memory or of B's changes.
    """
    um = user_mount()
    assert um.mount().returncode == 0
    opener, receiver = _pass_session(user_a, user_b, um.mountpoint)
    try:
        receiver_pid = _check_passed_session(
            opener,
            receiver,
            {
                "fstat": "EACCES",
                "copy_in_page": "EPERM",
                "own_dst": "zero",
                "copy_in_own_only_page": "EPERM",
                "own_only_dst": "zero",
                "poll": select.POLLOUT,
                "xattr": "EACCES",
                "reopen": "EACCES",
            },
            root_reopen="EACCES",  # without allow_other, FUSE refuses root too
            after={"copy_in_page": "EPERM", "own_dst": "zero"},
        )
    finally:
        opener.kill()
        receiver.kill()
    assert um.unmount().returncode == 0
    explained = [line for line in um.log_text().splitlines() if str(receiver_pid) in line and "ptrace" in line.lower()]
    assert explained, f"nothing in the server's log names client {receiver_pid} and ptrace:\n{um.log_text()}"


FORK = """
page = map_at(BASE); lay_out(page, BASE, PARENT)
fd = os.open(mnt / "func" / "copy", os.O_RDWR)
r, w = os.pipe()
parent = os.getpid()
child = os.fork()
if child == 0:
    parent_fd = os.pidfd_open(parent)
    page[:64] = np.frombuffer(CHILD, np.uint8)        # copy-on-write: the parent still has PARENT
    say("child", [round_trip(fd, page_copy(BASE, 1)), whose(dst_of(page))])
    os.write(w, b"x")
    select.select([parent_fd], [], [], 30)            # until the parent (the opener) has exited
    page[4096:4160] = 0
    say("orphan", [round_trip(fd, page_copy(BASE, 2)), whose(dst_of(page))])
    os._exit(0)
os.read(r, 1)
say("parent", [child, whose(dst_of(page))])
say("parent-own", [round_trip(fd, page_copy(BASE, 3)), whose(dst_of(page))])
"""


def test_a_forked_child_addresses_its_own_memory(root_server, user_a):
    """A session inherited across fork addresses whichever process writes on it: the child its own memory.

    The child changes its copy-on-write copy of the source and writes a copy
    request on the inherited descriptor: the child's destination receives the
    child's source, the parent's stays zero. The parent's own request then
    acts on the parent; after the parent (the opener) exits, the child's
    requests still act on the child.
    """
    mnt = root_server.mountpoint
    proc = spawn(user_a, mnt, f"PARENT = {data('parent')!r}\nCHILD = {data('child')!r}\n" + FORK, "fork")
    try:
        assert json.loads(proc.expect("child")) == ["OK", "child"]
        child, parent_dst = json.loads(proc.expect("parent"))
        assert parent_dst == "zero"
        assert json.loads(proc.expect("parent-own")) == ["OK", "parent"]
        assert proc.proc.wait(30) == 0
        assert json.loads(proc.expect("orphan")) == ["OK", "child"]
        assert exited(child)
    finally:
        proc.kill()
    assert wait_for(lambda: stats(mnt)["sessions"]["open"] == 0)


# -- exec of a setuid-root program ------------------------------------------------------------


@pytest.fixture(scope="module")
def programs(users_base: Path) -> Iterator[Builder]:
    """tests/programs compiled where the users can run them."""
    directory = users_base / "programs"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    yield Builder(directory)
    shutil.rmtree(directory, ignore_errors=True)


def words_after(proc: LineProcess, key: str, timeout: float = 30.0) -> list[str]:
    """The words after *key* on the next line starting with it (other lines are skipped); fails at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        head, _, rest = proc.line(max(0.1, deadline - time.monotonic())).partition(" ")
        if head == key:
            return rest.split()


def nosuid(path: Path) -> bool:
    """True if *path*'s file system ignores set-user-ID bits."""
    return bool(os.statvfs(path).f_flag & os.ST_NOSUID)


def test_a_setuid_root_image_is_never_touched_by_requests_its_user_queued(users_base, user_a, programs):
    """User A queues requests on a root --allow-other mount, then execs a setuid-root program at once.

    The requests are A's and name A's memory; the new image is root's. A
    holder (A's child) keeps the session open and, with the mount's one
    worker, busy with a request of its own, so A's requests can only run
    after the exec: none may succeed, and the setuid image, which maps a
    region at their addresses right away, finds it untouched (execer.c,
    image.c). The holder's copy of the region is untouched too.
    """
    home = users_base / "setuid"
    home.mkdir()
    os.chmod(home, 0o755)
    image = home / "image"
    shutil.copy(programs("image"), image)
    os.chown(image, 0, 0)
    os.chmod(image, 0o4755)
    srv = Server(home / "mnt", ["--allow-other", "--workers", "1"]).start()
    mnt = srv.mountpoint
    count = 16
    argv = [str(programs("execer")), str(mnt), str(image), str(16 << 20), str(count), str(512 << 20)]
    pipes = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    proc = LineProcess(user_a.popen(argv, **pipes), "execer as user a")
    try:
        assert words_after(proc, "queued") == [str(40 * count), "0"]
        pid, euid = (int(w) for w in words_after(proc, "mapped"))
        assert pid == proc.pid
        assert euid == 0 or nosuid(image), "the image did not run as root"
        settled = wait_for(lambda: stats(mnt)["requests"]["in_flight"] == 0, 60)
        proc.proc.send_signal(signal.SIGUSR1)  # read what came, look at the memory now
        assert settled, stats(mnt)["requests"]
        got, _, ok, _, efault, _, other, *first_other = words_after(proc, "responses")
        assert words_after(proc, "memory") == ["00"], "the setuid image's memory was written"
        assert (int(other), first_other) == (0, []), "a request failed with another error than EFAULT"
        assert int(ok) == 0 and int(got) == int(efault) <= count, f"{got} responses, {ok} OK, {efault} EFAULT"
        assert words_after(proc, "busy") == ["0", "5a"]
        assert words_after(proc, "holder-memory") == ["33"], "the holder's memory was written"
        assert proc.proc.wait(30) == 0
        assert wait_for(lambda: stats(mnt)["sessions"]["open"] == 0)
    finally:
        proc.kill()
        srv.stop()
        log = srv.log()
        srv.log_path.unlink(missing_ok=True)
        shutil.rmtree(home, ignore_errors=True)
    assert "Traceback" not in log and " CRITICAL " not in log, f"the server logged errors:\n{log}"
