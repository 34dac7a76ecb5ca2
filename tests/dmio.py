"""Test-side client of a dmoverfs session, written from the wire format alone.

Buffers are numpy arrays (their addresses go into iovecs); every object a
request points at is kept alive in the Request until its response is read.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REQ = struct.Struct("<QI4x8sQI4x")
RESP = struct.Struct("<Ii8s")
IOV = struct.Struct("<QQ")
DMBUF = struct.Struct("<QI4x")
XATTR_FUNCTION = "user.dmover.function"
XATTR_NONBLOCK = "user.dmover.nonblock"

Segment = tuple[int, int]  # (address, length)


def addr(array: np.ndarray) -> int:
    return array.ctypes.data


def whole(array: np.ndarray) -> list[Segment]:
    return [(addr(array), array.nbytes)]


def cut(array: np.ndarray, rng: np.random.Generator, max_pieces: int = 8) -> list[Segment]:
    """*array* as a scatter/gather list cut at random places (zero-length pieces allowed)."""
    n = array.nbytes
    k = int(rng.integers(1, max_pieces + 1))
    points = sorted(int(p) for p in rng.integers(0, n + 1, size=k - 1)) if n else [0] * (k - 1)
    bounds = [0, *points, n]
    return [(addr(array) + a, b - a) for a, b in zip(bounds, bounds[1:])]


@dataclass
class Request:
    """A packed dmio_usrreq and everything it points at."""

    packed: bytes
    req_id: int
    keep: list = field(default_factory=list, repr=False)


def iovec_array(segments: Sequence[Segment]) -> np.ndarray:
    raw = b"".join(IOV.pack(a, n) for a, n in segments)
    return np.frombuffer(bytearray(raw or b"\0" * 16), dtype=np.uint8)


def request(
    req_id: int,
    out: Sequence[Segment] | None = None,
    inputs: Sequence[Sequence[Segment]] = (),
    immediate: bytes | int = b"",
) -> Request:
    """Pack a request; *out* None means no output buffer."""
    keep: list = []
    out_ptr, out_cnt = 0, 0
    if out is not None:
        arr = iovec_array(out)
        keep.append(arr)
        out_ptr, out_cnt = addr(arr), len(out)
    in_ptr = 0
    if inputs:
        bufs = b""
        for segs in inputs:
            arr = iovec_array(segs)
            keep.append(arr)
            bufs += DMBUF.pack(addr(arr), len(segs))
        table = np.frombuffer(bytearray(bufs), dtype=np.uint8)
        keep.append(table)
        in_ptr = addr(table)
    if isinstance(immediate, int):
        immediate = immediate.to_bytes(8, "little")
    packed = REQ.pack(out_ptr, out_cnt, immediate.ljust(8, b"\0"), in_ptr, req_id)
    return Request(packed, req_id, keep)


def raw_request(out_ptr: int, out_cnt: int, in_ptr: int = 0, req_id: int = 0, immediate: bytes = b"") -> bytes:
    """A request with arbitrary pointers and counts (for error tests)."""
    return REQ.pack(out_ptr, out_cnt, immediate.ljust(8, b"\0"), in_ptr, req_id)


@dataclass(frozen=True)
class Response:
    req_id: int
    error: int
    immediate: bytes

    @property
    def crc(self) -> int:
        return int.from_bytes(self.immediate[:4], "little")


def parse(data: bytes) -> list[Response]:
    assert len(data) % RESP.size == 0, f"read returned {len(data)} bytes"
    return [Response(*RESP.unpack_from(data, i)) for i in range(0, len(data), RESP.size)]


def open_session(mnt: Path, function: str | None = None, flags: int = os.O_RDWR) -> int:
    fd = os.open(mnt / "dmoverio", flags)
    if function is not None:
        os.setxattr(fd, XATTR_FUNCTION, function.encode())
    return fd


def submit(fd: int, *requests: Request) -> int:
    return os.write(fd, b"".join(r.packed for r in requests))


def collect(fd: int, n: int) -> list[Response]:
    """Read exactly n responses (looping over short reads)."""
    out: list[Response] = []
    while len(out) < n:
        out += parse(os.read(fd, 16 * (n - len(out))))
    return out


def run(fd: int, *requests: Request) -> dict[int, Response]:
    """Submit requests, wait for all their responses, return them by id."""
    written = submit(fd, *requests)
    assert written == REQ.size * len(requests)
    responses = collect(fd, len(requests))
    by_id = {r.req_id: r for r in responses}
    assert sorted(by_id) == sorted(r.req_id for r in requests)
    return by_id


def errno_of(fn, *args) -> int:
    """The errno an OS call fails with (AssertionError if it succeeds)."""
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno
    raise AssertionError(f"{fn.__name__}{args!r} succeeded")


def stats(mnt: Path) -> dict:
    """The mount's ``stats`` file, parsed."""
    return json.loads((mnt / "stats").read_bytes())


def wait_for(predicate, timeout: float = 10.0) -> bool:
    """Poll *predicate* until true or the deadline; a deadline, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
