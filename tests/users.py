"""Throwaway Unix users for the privilege tests, and the little system access they need.

A TempUser is created with ``useradd`` under a unique name and removed with
``userdel -r`` at teardown, after every process it ran has been killed (by
pid) and every mount under its home detached. What the user needs to run
the virtualenv's Python and to mount through ``fusermount3`` is granted as
POSIX ACL entries naming that user alone (search on the directories leading
to the interpreter, the repository and the test directories; read/write on
``/dev/fuse`` where it is not world-accessible, as it is with udev); each
entry is taken out again at teardown, and an ACL that becomes minimal is
removed with the mode put back. ``fuse_conf`` sets ``user_allow_other`` in
``/etc/fuse.conf`` for the duration of a block and restores the file byte
for byte. Changes to shared system files happen under one lock
(``flock`` on the fusermount3 binary), so concurrent test runs do not undo
each other's entries.

Everything here fails loudly (never skips) when it cannot do its job.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import secrets
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from conftest import sanitizer_env
from dmoverfs import mounting

REPO = Path(__file__).resolve().parent.parent
FUSERMOUNT = "/usr/bin/fusermount3"
FUSE_DEVICE = "/dev/fuse"
FUSE_CONF = Path("/etc/fuse.conf")

_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_UNDEFINED_ID = 0xFFFFFFFF
_ENTRY = struct.Struct("<HHI")


class SetupError(AssertionError):
    """The machine cannot give a throwaway user what a test needs (a failure, not a skip)."""


@contextlib.contextmanager
def system_lock() -> Iterator[None]:
    """Serialise changes to shared system files between concurrent test runs."""
    try:
        fd = os.open(FUSERMOUNT, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SetupError(f"{FUSERMOUNT} is missing: install the fuse3 package (scripts/setup does)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- POSIX ACLs (the xattr format of linux/posix_acl_xattr.h) ---------------------------


def _read_acl(path: str) -> list[tuple[int, int, int]] | None:
    try:
        raw = os.getxattr(path, _ACL_XATTR, follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise
    (version,) = struct.unpack_from("<I", raw)
    if version != _ACL_VERSION:
        raise SetupError(f"{path}: unknown ACL version {version}")
    return [_ENTRY.unpack_from(raw, off) for off in range(4, len(raw), _ENTRY.size)]


def _write_acl(path: str, entries: list[tuple[int, int, int]], mask: int) -> None:
    """Write *entries* (no mask entry among them) with *mask*, or drop the ACL when nothing is named."""
    named = [e for e in entries if e[0] in (_USER, _GROUP)]
    base = {e[0]: e for e in entries if e[0] in (_USER_OBJ, _GROUP_OBJ, _OTHER)}
    if not named:
        # Minimal again: no ACL, the group bits are the owning group's permissions once more.
        os.removexattr(path, _ACL_XATTR, follow_symlinks=False)
        mode = os.lstat(path).st_mode
        os.chmod(path, (stat.S_IMODE(mode) & ~0o070) | (base[_GROUP_OBJ][1] << 3))
        return
    full = sorted([*base.values(), *named, (_MASK, mask, _UNDEFINED_ID)], key=lambda e: (e[0], e[2]))
    raw = struct.pack("<I", _ACL_VERSION) + b"".join(_ENTRY.pack(*e) for e in full)
    os.setxattr(path, _ACL_XATTR, raw, follow_symlinks=False)


def _split_mask(entries: list[tuple[int, int, int]]) -> tuple[list[tuple[int, int, int]], int | None]:
    masks = [e[1] for e in entries if e[0] == _MASK]
    return [e for e in entries if e[0] != _MASK], (masks[0] if masks else None)


def acl_add_user(path: str, uid: int, perms: int) -> None:
    """Give *uid* the permissions *perms* (rwx bits, 0-7) on *path* with a named ACL entry."""
    with system_lock():
        entries = _read_acl(path)
        if entries is None:
            mode = os.lstat(path).st_mode
            entries = [
                (_USER_OBJ, (mode >> 6) & 7, _UNDEFINED_ID),
                (_GROUP_OBJ, (mode >> 3) & 7, _UNDEFINED_ID),
                (_OTHER, mode & 7, _UNDEFINED_ID),
            ]
        entries, mask = _split_mask(entries)
        group_obj = next(e[1] for e in entries if e[0] == _GROUP_OBJ)
        entries = [e for e in entries if not (e[0] == _USER and e[2] == uid)] + [(_USER, perms, uid)]
        try:
            _write_acl(path, entries, (group_obj if mask is None else mask) | perms)
        except OSError as exc:
            raise SetupError(f"cannot grant uid {uid} access to {path} with an ACL: {exc.strerror}") from None


def acl_remove_user(path: str, uid: int) -> None:
    """Take *uid*'s named entry out of *path*'s ACL (and the ACL itself if nothing else is named)."""
    with system_lock():
        try:
            entries = _read_acl(path)
        except FileNotFoundError:
            return
        if entries is None or not any(e[0] == _USER and e[2] == uid for e in entries):
            return
        entries, mask = _split_mask(entries)
        entries = [e for e in entries if not (e[0] == _USER and e[2] == uid)]
        needed = 0
        for e in entries:
            if e[0] in (_USER, _GROUP, _GROUP_OBJ):
                needed |= e[1]
        # Never widen: what the mask allowed the remaining entries stays as it was.
        _write_acl(path, entries, (needed if mask is None else mask) & needed)


def acl_users(path: str) -> set[int]:
    """The uids named in *path*'s ACL."""
    entries = _read_acl(path) or []
    return {e[2] for e in entries if e[0] == _USER}


# -- /etc/fuse.conf -----------------------------------------------------------------------


def user_allow_other_set(text: str) -> bool:
    return any(line.strip() == "user_allow_other" for line in text.splitlines())


@contextlib.contextmanager
def fuse_conf(user_allow_other: bool) -> Iterator[None]:
    """``/etc/fuse.conf`` with ``user_allow_other`` on or off inside the block, restored exactly after.

    Holds the system lock throughout: fusermount3 reads the file when it mounts,
    so keep the block to the mount itself.
    """
    with system_lock():
        try:
            original = FUSE_CONF.read_bytes()
            st = FUSE_CONF.stat()
        except FileNotFoundError:
            original, st = None, None
        text = (original or b"").decode()
        if user_allow_other_set(text) == user_allow_other:
            yield
            return
        if user_allow_other:
            new = text + ("" if text.endswith("\n") or not text else "\n") + "user_allow_other\n"
        else:
            new = "".join(line for line in text.splitlines(keepends=True) if line.strip() != "user_allow_other")
        try:
            FUSE_CONF.write_text(new)
            if st is None:
                os.chmod(FUSE_CONF, 0o644)
            yield
        finally:
            if original is None:
                FUSE_CONF.unlink(missing_ok=True)
            else:
                FUSE_CONF.write_bytes(original)
                os.chmod(FUSE_CONF, stat.S_IMODE(st.st_mode))
                if FUSE_CONF.read_bytes() != original:
                    raise SetupError(f"{FUSE_CONF} could not be restored")


# -- processes --------------------------------------------------------------------------


def pids_of_uid(uid: int) -> list[int]:
    """Processes whose real or effective uid is *uid*."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        real, effective = (int(x) for x in line.split()[1:3])
                        if uid in (real, effective):
                            found.append(int(entry))
                        break
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [arg.decode(errors="replace") for arg in f.read().split(b"\0") if arg]
    except (FileNotFoundError, ProcessLookupError):
        return []


def kill_and_wait(pids: Sequence[int], timeout: float = 10.0) -> None:
    """SIGKILL each pid (through a pidfd, so a reused pid is never hit) and wait until all have exited."""
    pidfds = []
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pidfds.append(pidfd)
    try:
        deadline = time.monotonic() + timeout
        for pidfd in pidfds:
            select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
    finally:
        for pidfd in pidfds:
            os.close(pidfd)


class LineProcess:
    """A child process spoken to in lines: ``send`` on stdin, ``expect`` on stdout (with a deadline)."""

    def __init__(self, proc: subprocess.Popen, name: str) -> None:
        self.proc = proc
        self.name = name
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, line: str) -> None:
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def line(self, timeout: float = 30.0) -> str:
        """The next line of output; fails if the process dies or says nothing in *timeout* seconds."""
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"{self.name} said nothing for {timeout} s; stderr so far: {self.stderr()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                self.proc.wait(10)
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before a line; stderr: {self.stderr()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def expect(self, key: str, timeout: float = 30.0) -> str:
        """The value of the next ``key value`` line (any other line fails)."""
        line = self.line(timeout)
        head, _, value = line.partition(" ")
        assert head == key, f"{self.name}: expected {key!r}, got {line!r}; stderr: {self.stderr()}"
        return value

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""

    def finish(self, timeout: float = 30.0) -> int:
        """Close stdin and wait for the exit status."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


# -- users --------------------------------------------------------------------------------


def _needs_search(path: Path) -> list[Path]:
    """The directories on the way to *path* (itself included if a directory) that "other" cannot search."""
    out = []
    parts = path.resolve().parts
    for i in range(1, len(parts) + 1):
        p = Path(*parts[:i])
        st = p.stat()
        if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH:
            out.append(p)
    return out


def python_paths() -> list[Path]:
    """What running this virtualenv's Python needs: the interpreter, its standard library, the venv."""
    return [Path(os.path.realpath(sys.executable)), Path(sys.base_prefix), Path(sys.prefix)]


def _account_tool(argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run useradd/userdel, waiting out another program's lock on /etc/passwd or /etc/group."""
    deadline = time.monotonic() + timeout
    while True:
        with system_lock():
            result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode == 0 or "lock" not in result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


class TempUser:
    """A Unix user that exists for one test module; see the module docstring."""

    def __init__(self, base: Path, label: str) -> None:
        if os.geteuid() != 0:
            raise SetupError("the privilege tests create users: run them as root (CI does)")
        for tool in ("useradd", "userdel"):
            if shutil.which(tool) is None:
                raise SetupError(f"{tool} is missing (Debian package passwd)")
        self.name = f"dmv{label}{secrets.token_hex(4)}"
        self.home = base / self.name
        self._granted: list[str] = []
        self._dirs: list[Path] = []
        argv = ["useradd", "--create-home", "--home-dir", str(self.home), "--shell", "/bin/sh"]
        result = _account_tool([*argv, "--user-group", "--no-log-init", self.name])
        if result.returncode != 0:
            raise SetupError(f"useradd {self.name} failed: {result.stderr.strip()}")
        entry = pwd.getpwnam(self.name)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        os.chmod(self.home, 0o700)

    def make_dir(self, path: Path, mode: int = 0o755) -> Path:
        """A directory owned by this user outside its home (removed with the user)."""
        path.mkdir(mode=mode)
        os.chown(path, self.uid, self.gid)
        os.chmod(path, mode)
        self._dirs.append(path)
        return path

    def grant(self, path: str | Path, perms: int) -> None:
        acl_add_user(str(path), self.uid, perms)
        self._granted.append(str(path))

    def grant_reach(self, paths: Sequence[Path]) -> None:
        """Let this user search every directory leading to *paths*."""
        for path in paths:
            for directory in _needs_search(path):
                if str(directory) not in self._granted:
                    self.grant(directory, 0o1)

    def grant_fuse(self) -> None:
        """Read/write on /dev/fuse (world-accessible on a udev system; not always in containers)."""
        mode = os.stat(FUSE_DEVICE).st_mode
        if (mode & 0o006) != 0o006:
            self.grant(FUSE_DEVICE, 0o6)

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment: this user's HOME, no XDG_RUNTIME_DIR, no bytecode writes."""
        return {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            **sanitizer_env(),  # scripts/test --sanitize: the user's servers load the ASan-built core too
            **extra,
        }

    def popen(self, argv: Sequence[str], pass_fds: Sequence[int] = (), **kwargs) -> subprocess.Popen:
        return subprocess.Popen(
            list(argv),
            user=self.uid,
            group=self.gid,
            extra_groups=[],
            env=self.env(),
            cwd=self.home,
            pass_fds=tuple(pass_fds),
            **kwargs,
        )

    def run(self, argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        proc = self.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"{argv} as {self.name} did not finish in {timeout} s: {err.decode(errors='replace')}") from None
        return subprocess.CompletedProcess(argv, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))

    def remove(self) -> None:
        """Kill its processes, detach mounts under its home, take back the grants, ``userdel -r``."""
        errors = []
        for _ in range(3):  # a dying server's children, if any, show up once
            pids = pids_of_uid(self.uid)
            if not pids:
                break
            kill_and_wait(pids)
        places = [self.home, *self._dirs]
        for mnt in mounting.mounts("fuse.dmoverfs"):
            if any(mnt == p or str(mnt).startswith(str(p) + "/") for p in places):
                try:
                    mounting.lazy_unmount(mnt)
                except mounting.MountError as exc:
                    errors.append(str(exc))
        for path in reversed(self._granted):
            try:
                acl_remove_user(path, self.uid)
            except OSError as exc:
                errors.append(f"{path}: {exc}")
        self._granted.clear()
        result = _account_tool(["userdel", "--remove", self.name])
        if result.returncode not in (0, 12):  # 12: home already gone, which is fine
            errors.append(f"userdel {self.name}: {result.stderr.strip()}")
        shutil.rmtree(self.home, ignore_errors=True)
        for path in self._dirs:
            shutil.rmtree(path, ignore_errors=True)
        if errors:
            raise SetupError("; ".join(errors))


def make_user(base: Path, label: str, mounts: bool) -> TempUser:
    """A TempUser who can run this virtualenv's Python on the repository's tests, and mount if *mounts*."""
    user = TempUser(base, label)
    try:
        user.grant_reach([*python_paths(), REPO, REPO / "tests", base])
        if mounts:
            user.grant_fuse()
    except BaseException:
        user.remove()
        raise
    return user
