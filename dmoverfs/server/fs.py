"""The FUSE face of dmoverfs: inodes, open files and xattrs mapped onto sessions.

Layout::

    /dmoverio     clone file: every lookup yields a fresh inode, so every open() is a new session
    /func/NAME    the same, with function NAME already selected
    /stats        read-only JSON counters

Clone lookups answer with ``entry_timeout = attr_timeout = 0``, so the kernel
looks the name up again for every ``open()`` and each open lands on an inode
of its own; ``forget`` frees the ones that were never opened. Re-opening a
session's inode (``/proc/self/fd/N``) attaches to the same session.

The reads, writes and polls of session files never reach these handlers:
the transport serves them in C. Only ``stats`` is read here.
"""

from __future__ import annotations

import enum
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import pyfuse3

from dmoverfs.server.core import Function
from dmoverfs.server.session import Session
from dmoverfs.wire import XATTR_FUNCTION, XATTR_NONBLOCK, XATTR_REGISTER, XATTR_SERVER, XATTR_UNREGISTER

if TYPE_CHECKING:
    from dmoverfs.server.device import Device

log = logging.getLogger(__name__)

ROOT_INO = pyfuse3.ROOT_INODE
FUNCDIR_INO = ROOT_INO + 1
STATS_INO = ROOT_INO + 2
FIRST_DYNAMIC_INO = 16

#: Bytes of ``stats`` per read answer, at most: libfuse's answers travel as one
#: socket message, whose size the socket's buffer bounds.
STATS_READ_MAX = 64 << 10

CLONE_NAME = b"dmoverio"
FUNCDIR_NAME = b"func"
STATS_NAME = b"stats"

_XATTR_FUNCTION = XATTR_FUNCTION.encode()
_XATTR_NONBLOCK = XATTR_NONBLOCK.encode()
_XATTR_SERVER = XATTR_SERVER.encode()
_XATTR_REGISTER = XATTR_REGISTER.encode()
_XATTR_UNREGISTER = XATTR_UNREGISTER.encode()


def _numbers(value: bytes, count: int) -> list[int]:
    """*count* non-negative integers (decimal, or 0x hex) separated by blanks: EINVAL otherwise."""
    try:
        fields = value.rstrip(b"\0\n").decode("ascii").split()
        numbers = [int(f, 0) for f in fields]
    except (UnicodeDecodeError, ValueError):
        raise pyfuse3.FUSEError(errno.EINVAL) from None
    if len(numbers) != count or any(not 0 <= n < 1 << 64 for n in numbers):
        raise pyfuse3.FUSEError(errno.EINVAL)
    return numbers


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class Kind(enum.Enum):
    ROOT = "root"
    FUNCDIR = "funcdir"
    STATS = "stats"
    CLONE = "clone"


@dataclass(eq=False)
class Node:
    """An inode. Clone nodes live from their lookup to their last forget and release."""

    ino: int
    kind: Kind
    preset: Function | None = None
    nlookup: int = 0
    session: Session | None = None


@dataclass(eq=False)
class StatsHandle:
    """An open ``stats`` file: a snapshot taken at open."""

    data: bytes


@dataclass
class Owner:
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)


def fuse_errors(fn: F) -> F:
    """Turn the OSErrors of the session layer into FUSE replies."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except OSError as exc:
            if isinstance(exc, pyfuse3.FUSEError):
                raise
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    return wrapper  # type: ignore[return-value]


class DmoverOperations(pyfuse3.Operations):
    """pyfuse3 handlers. Session semantics live in :mod:`dmoverfs.session`."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, device: Device) -> None:
        super().__init__()
        self.device = device
        self.owner = Owner()
        self.mounted_ns = time.time_ns()
        self._next_ino = FIRST_DYNAMIC_INO
        self._next_fh = 1
        self.nodes: dict[int, Node] = {
            ROOT_INO: Node(ROOT_INO, Kind.ROOT, nlookup=1),
            FUNCDIR_INO: Node(FUNCDIR_INO, Kind.FUNCDIR, nlookup=1),
            STATS_INO: Node(STATS_INO, Kind.STATS, nlookup=1),
        }
        #: Open files: a session's, or a snapshot of stats.
        self.handles: dict[int, Session | StatsHandle] = {}
        device.inode_count = lambda: len(self.nodes)

    # -- lifecycle --------------------------------------------------------------------

    def init(self) -> None:
        self.device.fuse_ready()

    # -- names and attributes ---------------------------------------------------------

    def _new_clone(self, preset: Function | None) -> Node:
        node = Node(self._next_ino, Kind.CLONE, preset=preset)
        self._next_ino += 1
        self.nodes[node.ino] = node
        return node

    def _node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _resolve(self, parent: int, name: bytes) -> Node:
        if parent == ROOT_INO:
            if name == CLONE_NAME:
                return self._new_clone(None)
            if name == FUNCDIR_NAME:
                return self.nodes[FUNCDIR_INO]
            if name == STATS_NAME:
                return self.nodes[STATS_INO]
        elif parent == FUNCDIR_INO:
            func = self.device.functions.get(name.decode("utf-8", "replace"))
            if func is not None:
                return self._new_clone(func)
        raise pyfuse3.FUSEError(errno.ENOENT)

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.ino
        attrs.generation = 0
        attrs.st_nlink = 1
        attrs.st_blksize = 4096
        attrs.st_uid, attrs.st_gid = self.owner.uid, self.owner.gid
        t = self.mounted_ns
        if node.kind is Kind.ROOT:
            attrs.st_mode = stat.S_IFDIR | 0o755
            attrs.st_nlink = 3
            attrs.entry_timeout = attrs.attr_timeout = 3600
        elif node.kind is Kind.FUNCDIR:
            attrs.st_mode = stat.S_IFDIR | 0o555
            attrs.st_nlink = 2
            attrs.entry_timeout = attrs.attr_timeout = 3600
        elif node.kind is Kind.STATS:
            attrs.st_mode = stat.S_IFREG | 0o444
            attrs.st_size = len(self.device.render_stats())
            attrs.entry_timeout, attrs.attr_timeout = 3600, 0
            t = time.time_ns()
        else:
            attrs.entry_timeout = attrs.attr_timeout = 0
            session = node.session
            if session is None:
                attrs.st_mode = stat.S_IFREG | 0o666
            else:
                attrs.st_mode = stat.S_IFREG | 0o600
                attrs.st_uid, attrs.st_gid = session.client.uid, session.client.gid
                attrs.st_atime_ns, attrs.st_mtime_ns, attrs.st_ctime_ns = session.times()
                return attrs
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = t
        return attrs

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._resolve(parent_inode, name)
        node.nlookup += 1
        return self._attrs(node)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            node = self.nodes.get(ino)
            if node is None:
                continue
            node.nlookup = max(0, node.nlookup - count)
            self._maybe_free(node)

    def _maybe_free(self, node: Node) -> None:
        if node.kind is Kind.CLONE and node.nlookup == 0 and node.session is None:
            del self.nodes[node.ino]

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    async def setattr(self, inode, attr, fields, fh, ctx) -> pyfuse3.EntryAttributes:
        # open(O_TRUNC) and touch are harmless no-ops; nothing else can be changed.
        node = self._node(inode)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_size and (node.kind is not Kind.CLONE or attr.st_size != 0):
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attrs(node)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_files = len(self.nodes)
        data.f_namemax = 255
        return data

    # -- directories ------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if node.kind not in (Kind.ROOT, Kind.FUNCDIR):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh == ROOT_INO:
            entries: list[tuple[bytes, Callable[[], Node]]] = [
                (CLONE_NAME, lambda: self._new_clone(None)),
                (FUNCDIR_NAME, lambda: self.nodes[FUNCDIR_INO]),
                (STATS_NAME, lambda: self.nodes[STATS_INO]),
            ]
        else:
            entries = [
                (name.encode(), functools.partial(self._new_clone, func)) for name, func in sorted(self.device.functions.items())
            ]
        for index in range(start_id, len(entries)):
            name, make = entries[index]
            node = make()
            # readdirplus: an entry the kernel takes counts as a lookup.
            if not pyfuse3.readdir_reply(token, name, self._attrs(node), index + 1):
                self._maybe_free(node)
                return
            node.nlookup += 1

    async def releasedir(self, fh: int) -> None:
        return None

    # -- files ------------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        fh = self._next_fh
        if node.kind is Kind.STATS:
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EACCES)
            self.handles[fh] = StatsHandle(self.device.render_stats())
        elif node.kind is Kind.CLONE:
            if node.session is None:
                node.session = self.device.open_session(node.ino, ctx, node.preset)
            # Registered before the answer: the client may write at once.
            self.device.add_file(node.session, fh)
            self.handles[fh] = node.session
        else:
            raise pyfuse3.FUSEError(errno.EISDIR)
        self._next_fh += 1
        # Session files are streams (the transport adds FOPEN_STREAM to their opens).
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=node.kind is Kind.CLONE)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles.get(fh)
        if not isinstance(handle, StatsHandle):
            # Session files are read through the transport, never here.
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle.data[off : off + min(size, STATS_READ_MAX)]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EBADF)

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if not isinstance(handle, Session):
            return
        self.device.remove_file(handle, fh)
        if handle.closed:
            node = self.nodes.get(handle.sid)
            if node is not None:
                node.session = None
                self._maybe_free(node)

    async def poll(self, inode: int, fh: int, poll_handle, ctx: pyfuse3.RequestContext) -> int:
        return 0x41  # stats (sessions are polled through the transport): POLLIN | POLLRDNORM

    # -- xattrs: the ioctl equivalents -------------------------------------------------

    def _xattr_session(self, inode: int) -> Session:
        node = self._node(inode)
        if node.kind is not Kind.CLONE or node.session is None:
            # Only an open session has settings; the clone file itself has none.
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        return node.session

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        session = self._xattr_session(inode)
        if name == _XATTR_FUNCTION:
            session.set_function(value, self.device.functions)
        elif name == _XATTR_NONBLOCK:
            flag = value.rstrip(b"\0\n")
            if flag not in (b"0", b"1"):
                raise pyfuse3.FUSEError(errno.EINVAL)
            # An xattr call cannot tell which descriptor it came through: it is
            # the session's (a file's own O_NONBLOCK counts as well).
            session.core.nonblock = flag == b"1"
        elif name == _XATTR_REGISTER:
            fd, offset, addr, length = _numbers(value, 4)
            session.core.register(ctx.pid, ctx.uid, ctx.gid, fd, offset, addr, length)
        elif name == _XATTR_UNREGISTER:
            addr, length = _numbers(value, 2)
            session.core.unregister(ctx.pid, addr, length)
        elif name == _XATTR_SERVER:
            raise pyfuse3.FUSEError(errno.EPERM)
        else:
            raise pyfuse3.FUSEError(errno.ENOTSUP)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        session = node.session
        if session is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        if name == _XATTR_SERVER:
            return str(os.getpid()).encode()
        if name == _XATTR_FUNCTION and session.function is not None:
            return session.function.name.encode()
        if name == _XATTR_NONBLOCK:
            return b"1" if session.core.nonblock else b"0"
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        session = self._node(inode).session
        if session is None:
            return []
        names = [_XATTR_NONBLOCK, _XATTR_SERVER]
        if session.function is not None:
            names.insert(0, _XATTR_FUNCTION)
        return names

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        fixed = (_XATTR_FUNCTION, _XATTR_NONBLOCK, _XATTR_SERVER, _XATTR_REGISTER, _XATTR_UNREGISTER)
        raise pyfuse3.FUSEError(errno.EPERM if name in fixed else errno.ENODATA)

    # -- nothing can be created here ---------------------------------------------------

    async def create(self, parent_inode, name, mode, flags, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(self, parent_inode, name, mode, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)
