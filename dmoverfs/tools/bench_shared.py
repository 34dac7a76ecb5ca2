"""Figure 11 of ``dmoverfs bench``: requests on shared buffers against the client's own kernels.

dmoverfs runs requests whose buffers all lie in shared buffers
(:meth:`dmoverfs.client.Session.shared_buffer`) on the server's mapping of
the same pages. This measures such requests, one at a time from this
process, against the same work done in this process with the best kernel it
has: ``memmove`` / ``memset`` (ctypes), ISA-L's ``xor_gen`` and
``crc32_iscsi`` (ctypes on libisal.so.2, the library the server uses), or,
without ISA-L, numpy's XOR and google-crc32c. Each series' name says which.
The reference works on the same kind of memory as the requests, in the
client's own mapping: shared buffers of the same size (so the comparison is
between offloading the work and doing it, not between kinds of pages).
"""

from __future__ import annotations

import ctypes
import mmap
import time
from collections.abc import Callable
from dataclasses import dataclass

from dmoverfs import client

#: The functions measured with one worker, and the ratio each must reach.
FUNCTIONS = ("copy", "fill8", "xor2", "xor16", "iscsi-crc32c")
ONE_WORKER_TARGET = 0.9
#: Requests a client keeps in flight, as an asynchronous mover is used: each
#: completion read is followed by a new request, so the worker goes from one to
#: the next and a round trip's fixed cost (about 0.1 ms through FUSE) is not
#: paid per request.
IN_FLIGHT = 4
#: A copy this many times the figure's size, split across two workers, against one memmove.
SPLIT_FACTOR = 4
SPLIT_TARGET = 1.3


@dataclass
class Peer:
    """The in-process reference of one function: what it is, and one run of it."""

    name: str
    run: Callable[[], None]


def _isal() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libisal.so.2")
    except OSError:
        return None


def _address(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def timed(fn: Callable[[], None], nbytes: int, seconds: float, drain: Callable[[], None] | None = None) -> float:
    """MB/s of *fn*, which moves *nbytes* a call, over at least *seconds* (after one warm-up call);
    *drain*, if given, then waits for what *fn* left running, so that nothing of it overlaps
    the next measurement."""
    fn()
    count, t0 = 0, time.perf_counter()
    while True:
        fn()
        count += 1
        t = time.perf_counter()
        if t - t0 >= seconds:
            if drain is not None:
                drain()
            return count * nbytes / (t - t0) / 1e6


class SharedBench:
    """Buffers and sessions of figure 11 on one mount; close() releases them."""

    def __init__(self, mountpoint: str, size: int) -> None:
        self.size = size
        self.isal = _isal()
        self.sessions: dict[str, client.Session] = {}
        self.pending: dict[str, int] = {}  # requests submitted and not yet waited for, by function
        self.shared: list[client.SharedBuffer] = []
        self.mountpoint = mountpoint

    def session(self, func: str) -> client.Session:
        if func not in self.sessions:
            self.pending[func] = 0
            self.sessions[func] = client.Session(self.mountpoint, "copy" if func == "reference" else func)
        return self.sessions[func]

    def buffers(self, func: str, count: int) -> list[client.SharedBuffer]:
        """*count* shared buffers of the session of *func*, filled with a byte pattern."""
        bufs = []
        for i in range(count):
            buf = self.session(func).shared_buffer(self.size)
            buf[:] = bytes([(i * 37 + 1) & 0xFF]) * self.size
            bufs.append(buf)
        self.shared.extend(bufs)
        return bufs

    def reference_buffers(self, count: int) -> list[mmap.mmap]:
        """*count* buffers for the reference: shared buffers of a session of its own, used in this process."""
        return self.buffers("reference", count)

    def request(self, func: str, in_flight: int = 1) -> Callable[[], None]:
        """A run: one request of *func* on shared buffers completes, with *in_flight* kept
        submitted (a sliding window: the run tops it up, then waits for the oldest)."""
        s = self.session(func)
        ninputs = 0 if func == "fill8" else 16 if func == "xor16" else 2 if func == "xor2" else 1
        has_output = func != "iscsi-crc32c"
        bufs = self.buffers(func, int(ninputs) + has_output)
        out = bufs[0] if has_output else None
        inputs = bufs[1:] if has_output else bufs
        immediate = 0xA5 if func == "fill8" else 0

        def run() -> None:
            while self.pending[func] < in_flight:
                s.submit(out, inputs, immediate)
                self.pending[func] += 1
            s.results(1)[0].check()
            self.pending[func] -= 1

        return run

    def peer(self, func: str) -> Peer:
        """The best in-process kernel for *func* on ordinary buffers of the same size."""
        n = self.size
        if func == "copy":
            dst, src = map(_address, self.reference_buffers(2))
            return Peer("ctypes memmove", lambda: ctypes.memmove(dst, src, n))
        if func == "fill8":
            (dst,) = map(_address, self.reference_buffers(1))
            return Peer("ctypes memset", lambda: ctypes.memset(dst, 0xA5, n))
        if func.startswith("xor"):
            k = int(func[3:])
            bufs = self.reference_buffers(k + 1)
            if self.isal is not None:
                # xor_gen(vects, len, array): the sources, then the destination last.
                array = (ctypes.c_void_p * (k + 1))(*[_address(b) for b in bufs[1:]], _address(bufs[0]))
                xor_gen = self.isal.xor_gen
                return Peer("ISA-L xor_gen", lambda: xor_gen(k + 1, n, array))
            import numpy as np

            dst, *ins = (np.frombuffer(b, dtype=np.uint8) for b in bufs)

            def numpy_xor() -> None:
                np.bitwise_xor(ins[0], ins[1], out=dst)
                for arr in ins[2:]:
                    np.bitwise_xor(dst, arr, out=dst)

            return Peer("numpy XOR", numpy_xor)
        (data,) = self.reference_buffers(1)
        if self.isal is not None:
            crc = self.isal.crc32_iscsi
            crc.restype = ctypes.c_uint
            crc.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint]
            address = _address(data)
            return Peer("ISA-L crc32_iscsi", lambda: crc(address, n, 0xFFFFFFFF))
        import google_crc32c

        view = memoryview(data)
        return Peer(f"google-crc32c ({google_crc32c.implementation})", lambda: google_crc32c.value(view))

    def drain(self) -> None:
        """Wait for every request still in flight."""
        for func, n in self.pending.items():
            if n:
                self.sessions[func].results(n)
                self.pending[func] = 0

    def close(self) -> None:
        self.drain()  # before the buffers the requests use go
        for buf in self.shared:
            buf.close()
        for s in self.sessions.values():
            s.close()
        self.shared.clear()
        self.sessions.clear()
