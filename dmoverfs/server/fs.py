"""The FUSE face of dmoverfs: inodes, open files and xattrs mapped onto sessions.

Layout::

    /dmoverio     clone file: every lookup yields a fresh inode, so every open() is a new session
    /func/NAME    the same, with function NAME already selected
    /stats        read-only JSON counters

Clone lookups answer with ``entry_timeout = attr_timeout = 0``, so the kernel
looks the name up again for every ``open()`` and each open lands on an inode
of its own; ``forget`` frees the ones that were never opened. Re-opening a
session's inode (``/proc/self/fd/N``) attaches to the same session.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dmoverfs import fuse
from dmoverfs.core import Function
from dmoverfs.fuse import pyfuse3
from dmoverfs.session import Handle, Session, Waiter
from dmoverfs.wire import XATTR_FUNCTION, XATTR_NONBLOCK, XATTR_SERVER

log = logging.getLogger(__name__)

ROOT_INO = pyfuse3.ROOT_INODE
FUNCDIR_INO = ROOT_INO + 1
STATS_INO = ROOT_INO + 2
FIRST_DYNAMIC_INO = 16

CLONE_NAME = b"dmoverio"
FUNCDIR_NAME = b"func"
STATS_NAME = b"stats"

_XATTR_FUNCTION = XATTR_FUNCTION.encode()
_XATTR_NONBLOCK = XATTR_NONBLOCK.encode()
_XATTR_SERVER = XATTR_SERVER.encode()

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


@contextlib.contextmanager
def interruptible() -> Iterator[Waiter]:
    """A Waiter tied to the read or write request being handled: FUSE_INTERRUPT fails its wait with EINTR.

    Enter it before the handler's first await (see dmoverfs.fuse); the request
    is watched only if the call actually blocks.
    """
    req = fuse.current_request()
    try:
        yield Waiter(lambda w: fuse.watch(req, w.interrupt))
    finally:
        fuse.unwatch(req)


class DmoverOperations(pyfuse3.Operations):
    """pyfuse3 handlers. Session semantics live in :mod:`dmoverfs.session`."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, device: Device) -> None:  # noqa: F821 (see server.Device)
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
        self.handles: dict[int, Handle | StatsHandle] = {}
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
                attrs.st_atime_ns, attrs.st_mtime_ns = self.device.session_times(session)
                attrs.st_ctime_ns = session.created_ns
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
        if node.kind is Kind.STATS:
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EACCES)
            handle: Handle | StatsHandle = StatsHandle(self.device.render_stats())
        elif node.kind is Kind.CLONE:
            if node.session is None:
                node.session = self.device.open_session(node.ino, ctx, node.preset)
            handle = Handle(node.session, nonblock=bool(flags & os.O_NONBLOCK), fh=self._next_fh)
            node.session.handles.add(handle)
            self.device.serve_fast(handle)
        else:
            raise pyfuse3.FUSEError(errno.EISDIR)
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        # Sessions are streams (no position, no f_pos lock: see dmoverfs.fuse); stats is a plain file.
        stream = isinstance(handle, Handle)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=stream)

    def _session_handle(self, fh: int) -> Handle:
        handle = self.handles.get(fh)
        if not isinstance(handle, Handle):
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles.get(fh)
        if isinstance(handle, StatsHandle):
            return handle.data[off : off + size]
        handle = self._session_handle(fh)
        with interruptible() as waiter:
            return await handle.session.read(handle, size, waiter)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._session_handle(fh)
        with interruptible() as waiter:
            return await handle.session.write(handle, buf, waiter)

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if not isinstance(handle, Handle):
            return
        session = handle.session
        session.handles.discard(handle)
        self.device.unserve_fast(handle)
        if not session.handles:
            self.device.close_session(session)
            node = self.nodes.get(session.sid)
            if node is not None:
                node.session = None
                self._maybe_free(node)

    async def poll(self, inode: int, fh: int, poll_handle, ctx: pyfuse3.RequestContext) -> int:
        handle = self.handles.get(fh)
        if isinstance(handle, Handle):
            return handle.session.poll(handle, poll_handle)
        return 0x41  # stats: POLLIN | POLLRDNORM

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
            session.set_function(value)
            for handle in session.handles:
                self.device.serve_fast(handle)
        elif name == _XATTR_NONBLOCK:
            flag = value.rstrip(b"\0\n")
            if flag not in (b"0", b"1"):
                raise pyfuse3.FUSEError(errno.EINVAL)
            # An xattr call cannot tell which descriptor it came through: it sets them all.
            for handle in session.handles:
                handle.nonblock = flag == b"1"
                self.device.serve_fast(handle)
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
            return b"1" if session.handles and all(h.nonblock for h in session.handles) else b"0"
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
        raise pyfuse3.FUSEError(errno.EPERM if name in (_XATTR_FUNCTION, _XATTR_NONBLOCK, _XATTR_SERVER) else errno.ENODATA)

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
