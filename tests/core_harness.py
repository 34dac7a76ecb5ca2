"""What the tests of the C core share: building and loading dmoverfs._core,
thin wrappers around its C API, and requests packed for this very process.

The module is built from csrc/ (cffi, no libfuse) once per test session,
whichever test file asks first, and loaded once.  The client of every
session is the test process itself: requests point into numpy buffers here,
and the core reaches them with process_vm_readv/writev on os.getpid().
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
import select
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
REQ = struct.Struct("<QI4x8sQI4x")  # struct dmio_usrreq
RESP = struct.Struct("<Ii8s")  # struct dmio_usrresp
DMBUF = struct.Struct("<QI4x")  # dmio_buffer
IOV_MAX = 1024
UNMAPPED = 0x100  # in page 0, which nothing maps

Segment = tuple[int, int]  # (address, length)


# --- building and loading the module ----------------------------------------


def _builder():
    spec = importlib.util.spec_from_file_location("dmoverfs_build_core", REPO / "csrc" / "build_core.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def load_core_module(path: Path):
    """Import a built _core extension from an arbitrary path."""
    loader = importlib.machinery.ExtensionFileLoader("_core", str(path))
    spec = importlib.util.spec_from_file_location("_core", str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


_BUILT: dict[str, Path] = {}
_LOADED: dict[Path, ModuleType] = {}


def build_core_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build dmoverfs._core into a temporary directory, once per test session."""
    if "path" not in _BUILT:
        tmp = tmp_path_factory.mktemp("core-build")
        _BUILT["path"] = Path(_builder().make_builder().compile(tmpdir=str(tmp)))
    return _BUILT["path"]


def core_module(path: Path) -> ModuleType:
    """The built module at path, loaded once."""
    if path not in _LOADED:
        _LOADED[path] = load_core_module(path)
    return _LOADED[path]


# --- wrappers around the C API ----------------------------------------------


class Resp(NamedTuple):
    id: int
    error: int
    imm: bytes


class Core:
    """One dm_core, created with the given tunables and kernel choice."""

    def __init__(
        self,
        cm,
        *,
        workers=2,
        chunk=256 << 10,
        inline=64 << 10,
        max_requests=0,
        max_meta=0,
        kernels=None,
        transport=0,
        slice_bytes=None,
        **caps,
    ):
        """*slice_bytes* defaults to two chunks, so that every request a worker runs is run in
        several slices; *caps* are the other dm_config caps (max_sessions, max_user_*)."""
        self.cm, self.ffi, self.lib = cm, cm.ffi, cm.lib
        cfg = self.ffi.new(
            "struct dm_config *",
            dict(
                workers=workers,
                chunk_bytes=chunk,
                inline_bytes=inline,
                max_requests=max_requests,
                max_meta_bytes=max_meta,
                transport=transport,
                slice_bytes=2 * chunk if slice_bytes is None else slice_bytes,
                **caps,
            ),
        )
        err = self.ffi.new("int *")
        saved = os.environ.pop("DMOVERFS_KERNELS", None)
        if kernels is not None:
            os.environ["DMOVERFS_KERNELS"] = kernels
        try:
            ptr = self.lib.dm_core_new(cfg, err)
        finally:
            os.environ.pop("DMOVERFS_KERNELS", None)
            if saved is not None:
                os.environ["DMOVERFS_KERNELS"] = saved
        if ptr == self.ffi.NULL:
            raise OSError(err[0], os.strerror(err[0]))
        self.ptr = ptr
        self.sessions: list[Sess] = []
        self._next_id = 1

    def free(self) -> None:
        if self.ptr is not None:
            self.lib.dm_core_free(self.ptr)
            self.ptr = None
            for s in self.sessions:
                s.ptr = None  # freed with the core

    @property
    def eventfd(self) -> int:
        return self.lib.dm_core_eventfd(self.ptr)

    @property
    def kernels(self) -> str:
        return self.ffi.string(self.lib.dm_core_kernels(self.ptr)).decode()

    def session(self, func: str | None, depth: int = 64, pid: int | None = None, pidfd: int | None = None, uid: int = 0) -> Sess:
        """A session opened by user *uid* (OSError ENFILE at a cap on sessions)."""
        pid = os.getpid() if pid is None else pid
        pidfd = os.pidfd_open(pid) if pidfd is None else pidfd
        sid = self._next_id
        self._next_id += 1
        err = self.ffi.new("int *")
        ptr = self.lib.dm_sess_open(self.ptr, sid, pid, pidfd, uid, depth, err)
        if ptr == self.ffi.NULL:
            os.close(pidfd)
            raise OSError(err[0], f"dm_sess_open: {os.strerror(err[0])}")
        s = Sess(self, ptr, sid)
        self.sessions.append(s)
        if func is not None:
            assert s.setfunc(func) == 0
        return s

    def drain(self, max_ids: int = 64) -> list[int]:
        ids = self.ffi.new("uint64_t[]", max_ids)
        n = self.lib.dm_core_drain(self.ptr, ids, max_ids)
        return list(ids[0:n])

    def stats(self) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        total = self.ffi.new("struct dm_core_stats *")
        nfunc = self.lib.dm_func_count()
        per = self.ffi.new("struct dm_func_stats[]", nfunc)
        self.lib.dm_core_stats(self.ptr, total, per, nfunc)
        core = {
            k: getattr(total, k)
            for k in (
                "outstanding",
                "executing",
                "meta_bytes",
                "inline_runs",
                "worker_runs",
                "refused_limits",
                "executing_bytes",
                "run_bytes",
                "busy_ns",
                "external",
                "refused_user_limits",
                "slices",
                "users",
            )
        }
        funcs = {
            self.ffi.string(self.lib.dm_func_name(i)).decode(): {
                k: getattr(per[i], k) for k in ("submitted", "completed", "failed", "bytes")
            }
            for i in range(nfunc)
        }
        return core, funcs

    def users(self, limit: int = 64) -> list[dict[str, int]]:
        """dm_core_users: each user's share of the caps, most outstanding first."""
        out = self.ffi.new("struct dm_user_stats[]", limit)
        n = self.lib.dm_core_users(self.ptr, out, limit, self.ffi.NULL)
        fields = [name for name, _ in self.ffi.typeof("struct dm_user_stats").fields]
        return [{k: getattr(out[i], k) for k in fields} for i in range(n)]

    def idle(self) -> bool:
        core, _ = self.stats()
        return core["outstanding"] == core["executing"] == core["meta_bytes"] == 0

    def wait_idle(self) -> dict[str, int]:
        """Until nothing is outstanding, executing or held; the final counters."""
        until(self.idle, "the core never became idle")
        return self.stats()[0]


class Sess:
    """One dm_sess of a Core."""

    def __init__(self, core: Core, ptr, sid: int) -> None:
        self.core, self.ptr, self.id = core, ptr, sid
        self.lib, self.ffi = core.lib, core.ffi

    def setfunc(self, func: str | int) -> int:
        index = func if isinstance(func, int) else self.lib.dm_func_lookup(func.encode())
        return self.lib.dm_sess_setfunc(self.ptr, index)

    def submit(self, reqs: Sequence[bytes]) -> tuple[int, int]:
        """(accepted, errno)."""
        err = self.ffi.new("int *")
        data = b"".join(reqs)
        n = self.lib.dm_sess_submit(self.ptr, data, len(reqs), err)
        return n, err[0]

    def take(self, max_resps: int = 1 << 16) -> list[Resp]:
        buf = self.ffi.new("char[]", max_resps * RESP.size)
        n = self.lib.dm_sess_take(self.ptr, buf, max_resps)
        raw = self.ffi.unpack(buf, n * RESP.size)
        return [Resp(*RESP.unpack_from(raw, i * RESP.size)) for i in range(n)]

    def counts(self) -> tuple[int, int]:
        """(outstanding, ready)."""
        c = self.ffi.new("unsigned[2]")
        self.lib.dm_sess_counts(self.ptr, c, c + 1)
        return c[0], c[1]

    def close(self) -> None:
        if self.ptr is not None:
            self.lib.dm_sess_close(self.ptr)
            self.ptr = None

    def wait(self, n: int, timeout: float = 60.0) -> None:
        """Until n responses are ready.  Worker completions must be announced
        on the eventfd: this waits on it, never on the counts alone."""
        deadline = time.monotonic() + timeout
        while self.counts()[1] < n:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"session {self.id}: {self.counts()} after {timeout}s, wanted {n} ready")
            readable, _, _ = select.select([self.core.eventfd], [], [], left)
            if readable:
                self.core.drain()

    def run(self, reqs: Sequence[bytes]) -> dict[int, Resp]:
        """Submit everything, wait, take: responses by request id."""
        assert self.submit(reqs) == (len(reqs), 0)
        self.wait(len(reqs))
        resps = self.take()
        assert len(resps) == len(reqs)
        assert self.counts() == (0, 0)
        return {r.id: r for r in resps}


# --- client memory ----------------------------------------------------------


class Mem:
    """Buffers, iovec arrays and dmio_buffer arrays in this process, kept alive."""

    def __init__(self) -> None:
        self._keep: list[np.ndarray] = []

    def buf(self, size_or_data) -> np.ndarray:
        if isinstance(size_or_data, int):
            arr = np.zeros(size_or_data, dtype=np.uint8)
        else:
            arr = np.frombuffer(bytes(size_or_data), dtype=np.uint8).copy()
        self._keep.append(arr)
        return arr

    def iovecs(self, segs: Sequence[Segment]) -> int:
        arr = np.array(list(segs) or [(0, 0)], dtype=np.uint64).reshape(-1, 2)
        self._keep.append(arr)
        return arr.ctypes.data

    def dmbufs(self, lists: Sequence[tuple[int, int]]) -> int:
        """Address of an array of dmio_buffer {iov address, iovcnt}."""
        raw = b"".join(DMBUF.pack(a, n) for a, n in lists)
        return self.buf(raw or b"\0" * DMBUF.size).ctypes.data

    def request(
        self, out: Sequence[Segment] | None = None, ins: Sequence[Sequence[Segment]] = (), imm: bytes = b"", req_id: int = 0
    ) -> bytes:
        out_iov = self.iovecs(out) if out else 0
        inbuf = self.dmbufs([(self.iovecs(segs), len(segs)) for segs in ins]) if ins else 0
        return pack_req(out_iov, len(out) if out else 0, imm, inbuf, req_id)


def pack_req(out_iov: int = 0, out_cnt: int = 0, imm: bytes = b"", inbuf: int = 0, req_id: int = 0) -> bytes:
    return REQ.pack(out_iov, out_cnt, imm.ljust(8, b"\0"), inbuf, req_id)


def addr(arr: np.ndarray) -> int:
    return arr.ctypes.data


def whole(arr: np.ndarray) -> list[Segment]:
    return [(addr(arr), arr.nbytes)]


def until(predicate, what: str, timeout: float = 60.0) -> None:
    """Poll predicate; fail (never hang) if it stays false."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(what)
        time.sleep(0.001)


def assert_consistent(core: Core) -> None:
    """Nothing held, and every submitted request accounted for exactly once."""
    stats, funcs = core.stats()
    assert (stats["outstanding"], stats["executing"], stats["meta_bytes"]) == (0, 0, 0)
    assert (stats["executing_bytes"], stats["external"]) == (0, 0)
    for name, f in funcs.items():
        assert f["submitted"] == f["completed"] + f["failed"], name


@contextlib.contextmanager
def core_factory(cm) -> Iterator[Callable[..., Core]]:
    """Make cores; each carries a Mem (``core.mem``) that lives as long as it does, so that
    workers still running a request when a test ends never write into freed memory.  Every
    core's sessions are closed and the core freed at the end."""
    cores: list[Core] = []

    def make(**kw) -> Core:
        core = Core(cm, **kw)
        core.mem = Mem()
        cores.append(core)
        return core

    try:
        yield make
    finally:
        for core in cores:
            for s in core.sessions:
                s.close()
            core.free()
