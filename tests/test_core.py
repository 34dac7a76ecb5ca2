"""Unit tests of the C core (dmoverfs._core), driven in-process through cffi.

The module is built once per test session from csrc/ into a temporary
directory.  The client is this very process: requests point into numpy
buffers here, and the core reaches them with process_vm_readv/writev on
os.getpid().  Oracles are independent of the core: plain Python for
zero/fill/copy, numpy for XOR, google_crc32c and the RFC 3720 vectors for
CRC32C.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import select
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core_harness import (
    IOV_MAX,
    UNMAPPED,
    Core,
    Mem,
    Resp,
    Sess,
    addr,
    assert_consistent,
    build_core_module,
    core_factory,
    core_module,
    pack_req,
    until,
    whole,
)

SSIZE_MAX = 2**63 - 1
GUARD = 0xA5  # fill of the gaps around scattered pieces

XOR_FUNCS = [f"xor{n}" for n in range(2, 17)]
ALL_FUNCS = ["zero", "fill8", "copy", *XOR_FUNCS, "iscsi-crc32c", "fill64", "compare", "copy-crc32c"]


# --- building and loading the module ----------------------------------------


@pytest.fixture(scope="session")
def core_so(tmp_path_factory) -> Path:
    return build_core_module(tmp_path_factory)


@pytest.fixture(scope="session")
def cm(core_so):
    return core_module(core_so)


# --- cores made for one test -----------------------------------------------


@pytest.fixture
def make_core(cm):
    """Factory of cores, all freed at the end of the test."""
    with core_factory(cm) as make:
        yield make


# --- client memory ----------------------------------------------------------


class Region:
    """A logical byte range stored as randomly cut pieces of one buffer,
    placed in shuffled order with guard bytes between them."""

    def __init__(self, mem: Mem, rng: np.random.Generator, size: int, max_pieces: int = 16) -> None:
        k = int(rng.integers(1, max_pieces + 1))
        cuts = np.sort(rng.integers(0, size + 1, k - 1))
        self.lens = np.diff(np.concatenate(([0], cuts, [size]))).astype(np.int64)
        self.offs = np.zeros(k, dtype=np.int64)
        pos = int(rng.integers(1, 64))
        for piece in rng.permutation(k):
            self.offs[piece] = pos
            pos += int(self.lens[piece]) + int(rng.integers(1, 64))
        self.backing = mem.buf(pos)
        self.backing[:] = GUARD
        self.inside = np.zeros(pos, dtype=bool)
        for o, n in zip(self.offs, self.lens):
            self.inside[o : o + n] = True
        base = addr(self.backing)
        self.segs = [(base + int(o), int(n)) for o, n in zip(self.offs, self.lens)]

    def read(self) -> np.ndarray:
        return np.concatenate([self.backing[o : o + n] for o, n in zip(self.offs, self.lens)])

    def write(self, data: np.ndarray) -> None:
        pos = 0
        for o, n in zip(self.offs, self.lens):
            self.backing[o : o + n] = data[pos : pos + n]
            pos += n

    def guards_intact(self) -> bool:
        return bool(np.all(self.backing[~self.inside] == GUARD))


def random_bytes(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(0, 256, size, dtype=np.uint8)


def le32(value: int) -> bytes:
    return struct.pack("<I", value)


PATHS = {"inline": 1 << 62, "worker": 0}  # inline_bytes that forces each path
SMALL_CHUNK = 4160  # no power of two: chunk edges fall everywhere in the lists
# Empty, tiny, odd, over a small chunk, over several rounds of the 3-lane
# SSE4.2 CRC loop (3 x 2 KiB), several MiB.
SIZES = [0, 1, 7, 4096, 4159, SMALL_CHUNK * 3 + 5, 3 * 2048 * 5 + 13, (3 << 20) + 3]


# --- the function table -----------------------------------------------------


def test_function_table_is_stable(cm):
    lib, ffi = cm.lib, cm.ffi
    assert lib.dm_func_count() == len(ALL_FUNCS)
    for i, name in enumerate(ALL_FUNCS):
        assert ffi.string(lib.dm_func_name(i)).decode() == name
        assert lib.dm_func_lookup(name.encode()) == i
    assert [lib.dm_func_ninputs(i) for i in range(len(ALL_FUNCS))] == [0, 0, 1, *range(2, 17), 1, 0, 2, 1]
    assert [lib.dm_func_has_output(i) for i in range(len(ALL_FUNCS))] == [1] * 18 + [0, 1, 0, 1]
    assert lib.dm_func_lookup(b"xor17") == -1
    assert lib.dm_func_lookup(b"") == -1
    assert lib.dm_func_name(len(ALL_FUNCS)) == ffi.NULL
    assert lib.dm_func_name(-1) == ffi.NULL


# --- core creation and kernels ----------------------------------------------


@pytest.mark.parametrize("bad", [dict(workers=0), dict(chunk=0), dict(chunk=(64 << 20) + 1)])
def test_core_rejects_bad_config(make_core, bad):
    with pytest.raises(OSError) as exc:
        make_core(**bad)
    assert exc.value.errno == errno.EINVAL


def test_core_rejects_unknown_kernel_choice(make_core):
    with pytest.raises(OSError) as exc:
        make_core(kernels="turbo")
    assert exc.value.errno == errno.EINVAL


def _cpu_has(flag: str) -> bool:
    text = Path("/proc/cpuinfo").read_text()
    return re.search(rf"^flags\s*:.*\b{flag}\b", text, re.M) is not None


KERNELS = ["auto", "sse4.2", "portable"]


def expected_kernels(choice: str) -> str:
    if choice == "portable":
        return r"crc32c=portable xor=portable"
    if choice == "sse4.2":
        return r"crc32c=sse4\.2 xor=portable" if _cpu_has("sse4_2") else r"crc32c=portable xor=portable"
    return r"crc32c=(isa-l|sse4\.2|portable) xor=(isa-l|portable)"


@pytest.mark.parametrize("choice", KERNELS)
def test_kernels_reported(make_core, choice):
    core = make_core(kernels=choice)
    assert re.fullmatch(expected_kernels(choice), core.kernels)


def test_isal_used_when_installed(make_core):
    try:
        ctypes.CDLL("libisal.so.2")
    except OSError:
        pytest.fail("libisal.so.2 is expected on the test machines (scripts/setup installs libisal2)")
    assert make_core().kernels == "crc32c=isa-l xor=isa-l"


# --- CRC32C -----------------------------------------------------------------

RFC3720 = [
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"123456789", 0xE3069283),
]


@pytest.mark.parametrize("choice", KERNELS)
@pytest.mark.parametrize("data,expected", RFC3720)
def test_crc32c_published_vectors(make_core, choice, data, expected):
    mem = Mem()
    s = make_core(kernels=choice).session("iscsi-crc32c")
    buf = mem.buf(data)
    # Bytes 4..7 of the immediate are not part of the seed.
    r = s.run([mem.request(ins=[whole(buf)], imm=b"\0\0\0\0junk", req_id=9)])[9]
    assert r.error == 0
    assert r.imm == le32(expected) + bytes(4)
    assert google_crc32c.value(data) == expected


@pytest.mark.parametrize("choice", KERNELS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("chunk", [SMALL_CHUNK, 256 << 10])
def test_crc32c_against_google_crc32c(make_core, choice, path, chunk):
    rng = np.random.default_rng(1)
    mem = Mem()
    core = make_core(kernels=choice, chunk=chunk, inline=PATHS[path])
    s = core.session("iscsi-crc32c")
    reqs, want = [], {}
    for i, size in enumerate(SIZES):
        region = Region(mem, rng, size, max_pieces=int(rng.choice([1, 7, IOV_MAX])))
        data = random_bytes(rng, size)
        region.write(data)
        seed = int(rng.integers(0, 2**32))
        reqs.append(mem.request(ins=[region.segs], imm=le32(seed), req_id=i))
        want[i] = google_crc32c.extend(seed, data.tobytes())
    got = s.run(reqs)
    for i, expected in want.items():
        assert got[i].error == 0, SIZES[i]
        assert got[i].imm == le32(expected) + bytes(4), SIZES[i]
    assert_consistent(core)


@pytest.mark.parametrize("choice", KERNELS)
def test_crc32c_chains_across_requests(make_core, choice):
    rng = np.random.default_rng(2)
    mem = Mem()
    s = make_core(kernels=choice).session("iscsi-crc32c")
    data = random_bytes(rng, 100_003)
    cuts = [0, 1, 4096, 50_000, 99_999, 100_003]  # pieces across the 3 x 2 KiB lanes
    crc = 0
    for a, b in zip(cuts, cuts[1:]):
        part = mem.buf(data[a:b])
        r = s.run([mem.request(ins=[whole(part)], imm=le32(crc), req_id=a)])[a]
        assert r.error == 0
        crc = struct.unpack("<I", r.imm[:4])[0]
    assert crc == google_crc32c.value(data.tobytes())


# --- zero, fill8, copy, xor -------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("chunk", [64, SMALL_CHUNK, 256 << 10])
def test_zero_and_fill8(make_core, path, chunk):
    rng = np.random.default_rng(3)
    mem = Mem()
    core = make_core(chunk=chunk, inline=PATHS[path])
    zero, fill = core.session("zero"), core.session("fill8")
    zreqs, freqs, regions = [], [], {}
    for i, size in enumerate(SIZES):
        for kind, reqs in (("zero", zreqs), ("fill8", freqs)):
            region = Region(mem, rng, size, max_pieces=int(rng.choice([1, 16, IOV_MAX])))
            region.write(random_bytes(rng, size) | 1)  # no zero byte to start with
            regions[kind, i] = region
            reqs.append(mem.request(out=region.segs, imm=bytes([0x3C]) + b"echo me", req_id=i))
    for kind, s, reqs, byte in (("zero", zero, zreqs, 0), ("fill8", fill, freqs, 0x3C)):
        for i, r in s.run(reqs).items():
            region = regions[kind, i]
            assert r.error == 0
            assert r.imm == bytes([0x3C]) + b"echo me"  # echoed
            assert np.all(region.read() == byte), (kind, SIZES[i])
            assert region.guards_intact(), (kind, SIZES[i])
    assert_consistent(core)


@pytest.mark.parametrize("path", PATHS)
def test_copy_with_different_cuts(make_core, path):
    rng = np.random.default_rng(4)
    mem = Mem()
    core = make_core(chunk=SMALL_CHUNK, inline=PATHS[path])
    s = core.session("copy")
    reqs, cases = [], {}
    for i, size in enumerate(SIZES * 2):
        src = Region(mem, rng, size, max_pieces=int(rng.choice([1, 5, IOV_MAX])))
        dst = Region(mem, rng, size, max_pieces=int(rng.choice([1, 9, IOV_MAX])))
        data = random_bytes(rng, size)
        src.write(data)
        cases[i] = (dst, data)
        reqs.append(mem.request(out=dst.segs, ins=[src.segs], req_id=i))
    for i, r in s.run(reqs).items():
        dst, data = cases[i]
        assert r.error == 0
        assert np.array_equal(dst.read(), data)
        assert dst.guards_intact()
    assert_consistent(core)


@pytest.mark.parametrize("choice", KERNELS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("chunk", [SMALL_CHUNK, 256 << 10])
@pytest.mark.parametrize("func", ["xor2", "xor3", "xor7", "xor16"])
def test_xor_against_numpy(make_core, choice, path, chunk, func):
    n = int(func[3:])
    rng = np.random.default_rng(n)
    mem = Mem()
    core = make_core(kernels=choice, chunk=chunk, inline=PATHS[path])
    s = core.session(func)
    reqs, cases = [], {}
    sizes = SIZES if n < 16 else SIZES[:-1] + [1 << 20]
    for i, size in enumerate(sizes):
        datas = [random_bytes(rng, size) for _ in range(n)]
        ins = []
        for data in datas:
            region = Region(mem, rng, size, max_pieces=int(rng.choice([1, 3, IOV_MAX])))
            region.write(data)
            ins.append(region.segs)
        dst = Region(mem, rng, size, max_pieces=int(rng.choice([1, 11, IOV_MAX])))
        cases[i] = (dst, np.bitwise_xor.reduce(np.stack(datas)) if size else np.zeros(0, np.uint8))
        reqs.append(mem.request(out=dst.segs, ins=ins, req_id=i))
    for i, r in s.run(reqs).items():
        dst, expected = cases[i]
        assert r.error == 0
        assert np.array_equal(dst.read(), expected), sizes[i]
        assert dst.guards_intact()
    assert_consistent(core)


def test_every_xor_arity(make_core):
    rng = np.random.default_rng(5)
    mem = Mem()
    core = make_core(chunk=SMALL_CHUNK)
    for func in XOR_FUNCS:
        n = int(func[3:])
        datas = [random_bytes(rng, 10_000) for _ in range(n)]
        srcs = [mem.buf(d) for d in datas]
        dst = mem.buf(10_000)
        r = core.session(func).run([mem.request(out=whole(dst), ins=[whole(b) for b in srcs], req_id=n)])[n]
        assert r.error == 0
        assert np.array_equal(dst, np.bitwise_xor.reduce(np.stack(datas))), func


def test_several_mib_through_a_256k_bounce(make_core):
    rng = np.random.default_rng(6)
    mem = Mem()
    core = make_core(inline=0)
    data = random_bytes(rng, 24 << 20)
    src, dst, zeroed = mem.buf(data), mem.buf(24 << 20), mem.buf(data)
    got = core.session("copy").run([mem.request(out=whole(dst), ins=[whole(src)], req_id=1)])
    assert got[1].error == 0 and np.array_equal(dst, data)
    got = core.session("zero").run([mem.request(out=whole(zeroed), req_id=2)])
    assert got[2].error == 0 and not zeroed.any()
    crc = core.session("iscsi-crc32c").run([mem.request(ins=[whole(src)], req_id=3)])[3]
    assert crc.imm[:4] == le32(google_crc32c.value(data.tobytes()))
    stats, funcs = core.stats()
    assert stats["worker_runs"] == 3 and stats["inline_runs"] == 0
    assert funcs["copy"]["bytes"] == 24 << 20


# --- validation errors ------------------------------------------------------


@pytest.fixture
def vcore(make_core):
    return make_core(chunk=SMALL_CHUNK)


def test_no_function_is_enxio(vcore):
    s = vcore.session(None)
    mem = Mem()
    assert s.submit([mem.request(out=whole(mem.buf(8)))]) == (0, errno.ENXIO)
    assert s.counts() == (0, 0)


def test_setfunc_ebusy_and_esrch(vcore):
    s = vcore.session(None)
    assert s.setfunc(len(ALL_FUNCS)) == errno.ESRCH
    assert s.setfunc(-1) == errno.ESRCH
    assert s.setfunc("copy") == 0
    assert s.setfunc("zero") == errno.EBUSY
    assert s.setfunc(len(ALL_FUNCS)) == errno.EBUSY  # NetBSD checks "already set" first


def test_output_iovcnt_above_iov_max_is_einval(vcore):
    mem = Mem()
    buf = mem.buf(np.ones(IOV_MAX + 1, np.uint8))
    segs = [(addr(buf) + i, 1) for i in range(IOV_MAX + 1)]
    s = vcore.session("zero")
    assert s.submit([pack_req(mem.iovecs(segs), IOV_MAX + 1)]) == (0, errno.EINVAL)
    # Exactly IOV_MAX is fine.
    assert s.run([pack_req(mem.iovecs(segs), IOV_MAX, req_id=5)])[5].error == 0
    assert not buf[:IOV_MAX].any() and buf[IOV_MAX] == 1


@pytest.mark.parametrize("cnt", [0, IOV_MAX + 1])
def test_input_iovcnt_zero_or_above_iov_max_is_einval(vcore, cnt):
    mem = Mem()
    src, dst = mem.buf(16), mem.buf(16)
    inbuf = mem.dmbufs([(mem.iovecs(whole(src)), cnt)])
    s = vcore.session("copy")
    assert s.submit([pack_req(mem.iovecs(whole(dst)), 1, b"", inbuf)]) == (0, errno.EINVAL)


def test_length_mismatch_is_einval(vcore):
    mem = Mem()
    a, b, dst = mem.buf(100), mem.buf(101), mem.buf(100)
    s = vcore.session("xor2")
    assert s.submit([mem.request(out=whole(dst), ins=[whole(a), whole(b)])]) == (0, errno.EINVAL)
    s = vcore.session("copy")
    assert s.submit([mem.request(out=whole(dst), ins=[whole(b)])]) == (0, errno.EINVAL)


@pytest.mark.parametrize(
    "lens",
    [[2**62, 2**62], [2**63], [2**64 - 1], [SSIZE_MAX, 1], [1, 2**64 - 1]],
    ids=["sum-2^63", "2^63", "2^64-1", "ssize_max+1", "wraps"],
)
def test_lengths_beyond_ssize_max_are_einval(vcore, lens):
    mem = Mem()
    segs = [(UNMAPPED, n) for n in lens]
    assert vcore.session("zero").submit([mem.request(out=segs)]) == (0, errno.EINVAL)
    # The same on an input (no output: the function constraint is not reached).
    assert vcore.session("iscsi-crc32c").submit([mem.request(ins=[segs])]) == (0, errno.EINVAL)
    # SSIZE_MAX itself passes validation (and fails when run).
    r = vcore.session("zero").run([mem.request(out=[(UNMAPPED, SSIZE_MAX)], req_id=1)])[1]
    assert r.error == errno.EFAULT


def test_overlap_is_einval(vcore):
    mem = Mem()
    buf = mem.buf(64)
    base = addr(buf)
    s = vcore.session("copy")
    # One shared byte.
    assert s.submit([mem.request(out=[(base, 32)], ins=[[(base + 31, 32)]])]) == (0, errno.EINVAL)
    # Input inside an output whose segments are listed out of order.
    out = [(base + 40, 8), (base, 8), (base + 20, 10)]
    assert s.submit([mem.request(out=out, ins=[[(base + 22, 26)]])]) == (0, errno.EINVAL)
    # Touching is not overlapping, and empty segments are ignored.
    r = s.run([mem.request(out=[(base, 32), (base + 40, 0)], ins=[[(base + 45, 0), (base + 32, 32)]], req_id=1)])
    assert r[1].error == 0


def test_overlap_with_nested_output_segments(vcore):
    mem = Mem()
    buf = mem.buf(256)
    base = addr(buf)
    s = vcore.session("copy")
    # The input misses the small segments but not the large one around them.
    out = [(base + 10, 10), (base, 100), (base + 30, 10)]
    assert s.submit([mem.request(out=out, ins=[[(base + 50, 10), (base + 150, 110)]])]) == (0, errno.EINVAL)
    out = [(base, 100), (base + 10, 10), (base + 200, 20)]
    assert s.submit([mem.request(out=out, ins=[[(base + 99, 130)]])]) == (0, errno.EINVAL)


def test_overlap_with_wrapping_segment_saturates(vcore):
    mem = Mem()
    top = 2**64 - 16
    s = vcore.session("copy")
    # An output running past the top of the address space still covers its tail ...
    assert s.submit([mem.request(out=[(top, 32)], ins=[[(top + 8, 8), (top - 24, 24)]])]) == (0, errno.EINVAL)
    # ... and one far from it is accepted, then fails when run (the kernel refuses).
    src = mem.buf(32)
    r = s.run([mem.request(out=[(top, 32)], ins=[whole(src)], req_id=3)])[3]
    assert r.error == errno.EFAULT


def test_overlap_among_many_segments(vcore):
    mem = Mem()
    arena = mem.buf(16 * IOV_MAX * 2 + 64)
    base = addr(arena)
    out = [(base + 2 * i, 1) for i in range(IOV_MAX)]  # even bytes
    ins = [[(base + 2 * i + 1, 1) for i in range(IOV_MAX)] for _ in range(16)]  # odd bytes
    s = vcore.session("xor16")
    assert s.run([mem.request(out=out, ins=ins, req_id=1)])[1].error == 0
    ins[15][IOV_MAX - 1] = (base + 2 * 700, 1)  # the last input segment hits the output
    assert s.submit([mem.request(out=out, ins=ins)]) == (0, errno.EINVAL)


@pytest.fixture
def guard_page():
    """Address A with [A - 4096, A) read-write and [A, A + 4096) inaccessible."""
    region = mmap.mmap(-1, 2 * mmap.PAGESIZE)
    anchor = ctypes.c_char.from_buffer(region)
    base = ctypes.addressof(anchor)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(base + mmap.PAGESIZE, mmap.PAGESIZE, 0) == 0  # PROT_NONE
    yield base + mmap.PAGESIZE
    del anchor
    region.close()


def test_unreadable_iovec_arrays_are_efault(vcore, guard_page):
    mem = Mem()
    buf = mem.buf(16)
    s = vcore.session("zero")
    assert s.submit([pack_req(UNMAPPED, 1)]) == (0, errno.EFAULT)
    s = vcore.session("copy")
    good = mem.iovecs(whole(buf))
    # The input's iovec array ...
    assert s.submit([pack_req(good, 1, b"", mem.dmbufs([(UNMAPPED, 1)]))]) == (0, errno.EFAULT)
    # ... the dmio_buffer array itself, and a NULL one.
    assert s.submit([pack_req(good, 1, b"", UNMAPPED)]) == (0, errno.EFAULT)
    assert s.submit([pack_req(good, 1, b"", 0)]) == (0, errno.EFAULT)
    # An output iovec array whose second entry is past the end of readable memory.
    edge = guard_page - 16
    ctypes.memmove(edge, struct.pack("<QQ", addr(buf), 8), 16)
    assert s.submit([pack_req(edge, 2, b"", mem.dmbufs([(good, 1)]))]) == (0, errno.EFAULT)
    assert vcore.stats()[0]["meta_bytes"] == 0


def test_unaligned_requests_are_decoded(vcore):
    mem = Mem()
    dst = mem.buf(100)
    dst[:] = 7
    req = mem.request(out=whole(dst), req_id=77)
    s = vcore.session("zero")
    raw = bytearray(b"\x99" + req)  # the request starts at an odd address
    err = s.ffi.new("int *")
    cbuf = s.ffi.from_buffer(raw)
    assert s.lib.dm_sess_submit(s.ptr, cbuf + 1, 1, err) == 1 and err[0] == 0
    assert s.take() == [Resp(77, 0, bytes(8))] and not dst.any()


def test_validation_stops_at_first_bad_request(vcore):
    mem = Mem()
    a, b = mem.buf(8), mem.buf(8)
    a[:] = b[:] = 1
    s = vcore.session("zero")
    reqs = [mem.request(out=whole(a), req_id=1), pack_req(UNMAPPED, 1, req_id=2), mem.request(out=whole(b), req_id=3)]
    assert s.submit(reqs) == (1, errno.EFAULT)
    assert s.take() == [Resp(1, 0, bytes(8))]
    assert not a.any() and np.all(b == 1)
    assert_consistent(vcore)


def bad_copy(mem: Mem, kind: str, guard_page: int) -> tuple[bytes, int]:
    """A copy request breaking one rule, and the errno it must get."""
    src, dst = mem.buf(64), mem.buf(64)
    if kind == "outcnt":
        return pack_req(mem.iovecs(whole(dst)), IOV_MAX + 1, b"", mem.dmbufs([(mem.iovecs(whole(src)), 1)])), errno.EINVAL
    if kind == "inbuf":
        return pack_req(mem.iovecs(whole(dst)), 1, b"", UNMAPPED), errno.EFAULT
    if kind == "inbuf_edge":  # the dmio_buffer starts readable and runs past it
        ctypes.memmove(guard_page - 8, struct.pack("<Q", mem.iovecs(whole(src))), 8)
        return pack_req(mem.iovecs(whole(dst)), 1, b"", guard_page - 8), errno.EFAULT
    if kind == "incnt":
        return pack_req(mem.iovecs(whole(dst)), 1, b"", mem.dmbufs([(mem.iovecs(whole(src)), 0)])), errno.EINVAL
    if kind == "outarr":
        return pack_req(UNMAPPED, 1, b"", mem.dmbufs([(mem.iovecs(whole(src)), 1)])), errno.EFAULT
    if kind == "inarr":
        return pack_req(mem.iovecs(whole(dst)), 1, b"", mem.dmbufs([(UNMAPPED, 1)])), errno.EFAULT
    if kind == "edge":  # the second iovec of the output lies past readable memory
        ctypes.memmove(guard_page - 16, struct.pack("<QQ", addr(dst), 32), 16)
        return pack_req(guard_page - 16, 2, b"", mem.dmbufs([(mem.iovecs(whole(src)), 1)])), errno.EFAULT
    if kind == "mismatch":
        return mem.request(out=[(addr(dst), 63)], ins=[whole(src)]), errno.EINVAL
    if kind == "overlap":
        return mem.request(out=[(addr(dst), 64)], ins=[[(addr(dst) + 63, 1), (addr(src), 63)]]), errno.EINVAL
    raise AssertionError(kind)


BAD_KINDS = ["outcnt", "inbuf", "inbuf_edge", "incnt", "outarr", "inarr", "edge", "mismatch", "overlap"]


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("pos", [0, 1, 6, 9])
def test_bad_request_inside_a_batch(make_core, guard_page, kind, pos):
    """Requests are decoded a window at a time: a bad one still stops the
    submission exactly where it stands, with its own errno."""
    rng = np.random.default_rng(pos)
    mem = Mem()
    core = make_core()
    s = core.session("copy")
    datas = [random_bytes(rng, 100) for _ in range(10)]
    srcs, dsts = [mem.buf(d) for d in datas], [mem.buf(100) for _ in range(10)]
    reqs = [mem.request(out=whole(d), ins=[whole(sr)], req_id=i) for i, (sr, d) in enumerate(zip(srcs, dsts))]
    reqs[pos], expected = bad_copy(mem, kind, guard_page)
    assert s.submit(reqs) == (pos, expected)
    assert sorted(r.id for r in s.take()) == list(range(pos))
    for i in range(10):
        assert np.array_equal(dsts[i], datas[i]) if i < pos else not dsts[i].any()
    assert_consistent(core)


@pytest.mark.parametrize("first", BAD_KINDS)
@pytest.mark.parametrize("second", BAD_KINDS)
def test_first_bad_request_wins(make_core, guard_page, first, second):
    mem = Mem()
    s = make_core().session("copy")
    src, dst = mem.buf(8), mem.buf(8)
    good = mem.request(out=whole(dst), ins=[whole(src)], req_id=1)
    bad1, err1 = bad_copy(mem, first, guard_page)
    bad2, _ = bad_copy(mem, second, guard_page)
    assert s.submit([good, bad1, bad2, good]) == (1, err1)


def test_batches_larger_than_a_window(make_core):
    mem = Mem()
    core = make_core()
    zero = core.session("zero", depth=1500)
    buf = mem.buf(np.ones(1500, np.uint8))
    assert zero.submit([mem.request(out=[(addr(buf) + i, 1)], req_id=i) for i in range(1500)]) == (1500, 0)
    assert [r.id for r in zero.take()] == list(range(1500)) and not buf.any()
    copy = core.session("copy", depth=700)
    src = mem.buf(np.arange(700, dtype=np.uint32).view(np.uint8))
    dst = mem.buf(700 * 4)
    reqs = [mem.request(out=[(addr(dst) + 4 * i, 4)], ins=[[(addr(src) + 4 * i, 4)]], req_id=i) for i in range(700)]
    assert copy.submit(reqs + reqs[:5]) == (700, 0)  # then full
    assert len(copy.take()) == 700 and np.array_equal(dst, src)
    xor = core.session("xor16", depth=200)
    ins = [whole(mem.buf(np.full(8, j, np.uint8))) for j in range(16)]
    out = [mem.buf(8) for _ in range(200)]
    assert xor.submit([mem.request(out=whole(o), ins=ins, req_id=i) for i, o in enumerate(out)]) == (200, 0)
    assert len(xor.take()) == 200
    assert all(np.all(o == np.bitwise_xor.reduce(np.arange(16, dtype=np.uint8))) for o in out)
    assert_consistent(core)


# --- execution results ------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_bad_data_pointer_fails_only_its_request(make_core, path):
    mem = Mem()
    core = make_core(chunk=SMALL_CHUNK, inline=PATHS[path])
    bufs = [mem.buf(20_000) for _ in range(3)]
    for b in bufs:
        b[:] = 9
    s = core.session("zero")
    half_bad = [(addr(bufs[1]), 10_000), (UNMAPPED, 10_000)]
    got = s.run(
        [
            mem.request(out=whole(bufs[0]), req_id=1),
            mem.request(out=half_bad, imm=b"12345678", req_id=2),
            mem.request(out=whole(bufs[2]), req_id=3),
        ]
    )
    assert got[1] == Resp(1, 0, bytes(8))
    assert got[2] == Resp(2, errno.EFAULT, bytes(8))  # no immediate on failure
    assert got[3] == Resp(3, 0, bytes(8))
    assert not bufs[0].any() and not bufs[2].any()
    c = core.session("copy")
    got = c.run([mem.request(out=whole(bufs[0]), ins=[[(UNMAPPED, 20_000)]], req_id=4)])
    assert got[4].error == errno.EFAULT
    _, funcs = core.stats()
    assert funcs["zero"]["failed"] == 1 and funcs["zero"]["completed"] == 2
    assert funcs["zero"]["bytes"] == 40_000
    assert_consistent(core)


def test_function_constraints_fail_the_request_not_the_submit(vcore):
    mem = Mem()
    buf, other = mem.buf(32), mem.buf(32)
    buf[:] = 5
    cases = [
        ("zero", mem.request(req_id=1)),
        ("fill8", mem.request(imm=b"\x07", req_id=2)),
        ("copy", mem.request(ins=[whole(buf)], req_id=3)),
        ("xor2", mem.request(ins=[whole(buf), whole(other)], req_id=4)),
        ("iscsi-crc32c", mem.request(out=whole(other), ins=[whole(buf)], imm=b"abcd", req_id=5)),
    ]
    for func, req in cases:
        s = vcore.session(func)
        assert s.submit([req]) == (1, 0), func
        (r,) = s.take()
        assert r.error == errno.EINVAL and r.imm == bytes(8), func
    assert np.all(buf == 5) and not other.any()
    _, funcs = vcore.stats()
    assert all(funcs[f]["failed"] == 1 and funcs[f]["completed"] == 0 for f, _ in cases)
    assert_consistent(vcore)


def exited_pidfd() -> tuple[int, int]:
    """(pid, pidfd) of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    pidfd = os.pidfd_open(child.pid)
    child.wait()
    return child.pid, pidfd


def test_dead_client_is_efault(make_core):
    pid, pidfd = exited_pidfd()
    s = make_core().session("zero", pid=pid, pidfd=pidfd)
    mem = Mem()
    assert s.submit([mem.request(out=whole(mem.buf(8)))]) == (0, errno.EFAULT)


def test_reused_pid_is_never_touched(make_core):
    """The pid names a live process (this one) but the pidfd says the
    client exited: the pid counts as reused and is left alone."""
    mem = Mem()
    buf = mem.buf(np.ones(64, np.uint8))
    _, pidfd = exited_pidfd()
    s = make_core().session("zero", pidfd=pidfd)
    assert s.submit([mem.request(out=whole(buf), req_id=1)]) == (0, errno.EFAULT)
    assert np.all(buf == 1)


def test_another_process_memory(make_core):
    """A real client: the iovec array and the data live in a child process."""
    script = textwrap.dedent(
        """
        import ctypes, sys
        data = ctypes.create_string_buffer(b"x" * 5000, 5000)
        iov = (ctypes.c_uint64 * 2)(ctypes.addressof(data), 5000)
        print(ctypes.addressof(iov), flush=True)
        sys.stdin.readline()
        print(data.raw.hex(), flush=True)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        iov_addr = int(child.stdout.readline())
        core = make_core()
        s = core.session("fill8", pid=child.pid, pidfd=os.pidfd_open(child.pid))
        assert s.submit([pack_req(iov_addr, 1, b"\x42", req_id=1)]) == (1, 0)
        assert s.take() == [Resp(1, 0, b"\x42" + bytes(7))]
        child.stdin.write("\n")
        child.stdin.flush()
        assert bytes.fromhex(child.stdout.readline().strip()) == b"\x42" * 5000
    finally:
        child.kill()
        child.wait()


def test_no_ptrace_permission_is_eperm(core_so, tmp_path):
    """Without CAP_SYS_PTRACE a process of another user is out of reach."""
    target = None
    if os.geteuid() == 0:
        target = subprocess.Popen(["sleep", "60"], user=65534, group=65534)
        pid = target.pid
    else:
        pid = 1
    script = textwrap.dedent(
        f"""
        import ctypes, importlib.machinery, importlib.util, os, struct
        libc = ctypes.CDLL(None, use_errno=True)

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

        header, data = Header(0x20080522, 0), (Data * 2)()
        assert libc.capget(ctypes.byref(header), data) == 0
        data[0].effective &= ~(1 << 19)  # CAP_SYS_PTRACE
        data[0].permitted &= ~(1 << 19)
        assert libc.capset(ctypes.byref(header), data) == 0

        path = {str(core_so)!r}
        loader = importlib.machinery.ExtensionFileLoader("_core", path)
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("_core", path, loader=loader))
        loader.exec_module(module)
        ffi, lib = module.ffi, module.lib
        err = ffi.new("int *")
        core = lib.dm_core_new(ffi.new("struct dm_config *", dict(workers=1, chunk_bytes=4096)), err)
        s = lib.dm_sess_new(core, 1, {pid}, os.pidfd_open({pid}), 4)
        assert lib.dm_sess_setfunc(s, lib.dm_func_lookup(b"zero")) == 0
        n = lib.dm_sess_submit(s, struct.pack("<QI4x8sQI4x", 0x10000, 1, bytes(8), 0, 1), 1, err)
        print(n, err[0])
        lib.dm_sess_close(s)
        lib.dm_core_free(core)
        """
    )
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    finally:
        if target is not None:
            target.kill()
            target.wait()
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", str(errno.EPERM)]


# --- queueing, responses, notifications -------------------------------------


def test_depth_stops_submission(vcore):
    mem = Mem()
    s = vcore.session("zero", depth=3)
    bufs = [mem.buf(8) for _ in range(10)]
    reqs = [mem.request(out=whole(b), req_id=i) for i, b in enumerate(bufs)]
    assert s.submit(reqs[:5]) == (3, 0)
    assert s.counts() == (3, 3)
    assert s.submit(reqs[3:5]) == (0, 0)  # full: nothing accepted, no error
    assert [r.id for r in s.take(1)] == [0]
    assert s.counts() == (2, 2)
    assert s.submit(reqs[3:5]) == (1, 0)
    assert [r.id for r in s.take()] == [1, 2, 3]
    assert s.counts() == (0, 0)


def test_take_order_and_ring_wraparound(vcore):
    mem = Mem()
    s = vcore.session("fill8", depth=4)
    buf = mem.buf(4)
    next_id, expected = 0, []
    for round_ in range(25):
        room = 4 - s.counts()[0]
        batch = [mem.request(out=whole(buf), imm=bytes([next_id + i]), req_id=next_id + i) for i in range(room)]
        assert s.submit(batch) == (room, 0)
        expected += list(range(next_id, next_id + room))
        next_id += room
        got = s.take(1 + round_ % 3)
        assert [r.id for r in got] == expected[: len(got)]
        assert all(r.imm[0] == r.id % 256 for r in got)
        expected = expected[len(got) :]
        assert s.counts() == (len(expected), len(expected))
    assert [r.id for r in s.take()] == expected


def test_take_with_nothing_ready(vcore):
    s = vcore.session("zero")
    assert s.take(0) == [] and s.take(5) == []
    n = s.lib.dm_sess_take(s.ptr, s.ffi.NULL, 0)
    assert n == 0


def test_worker_completions_are_announced_once_per_drain(make_core):
    mem = Mem()
    core = make_core(inline=0)
    a, b = core.session("zero"), core.session("zero")
    efd = core.eventfd
    assert select.select([efd], [], [], 0)[0] == []
    bufs = [mem.buf(1 << 16) for _ in range(4)]
    assert a.submit([mem.request(out=whole(bufs[0]), req_id=1), mem.request(out=whole(bufs[1]), req_id=2)]) == (2, 0)
    assert b.submit([mem.request(out=whole(bufs[2]), req_id=3)]) == (1, 0)
    until(lambda: a.counts()[1] == 2 and b.counts()[1] == 1, "the workers never completed")
    assert select.select([efd], [], [], 0)[0] == [efd]
    first = core.drain(1)
    assert len(first) == 1
    assert select.select([efd], [], [], 0)[0] == [efd]  # still more to report
    second = core.drain(8)
    assert sorted(first + second) == [a.id, b.id]
    assert select.select([efd], [], [], 0)[0] == []
    assert core.drain() == []
    # An inline completion is not announced.
    inline = make_core(inline=1 << 20)
    c = inline.session("zero")
    assert c.submit([mem.request(out=whole(bufs[3]), req_id=4)]) == (1, 0)
    assert c.counts() == (1, 1)
    assert select.select([inline.eventfd], [], [], 0)[0] == [] and inline.drain() == []


def test_closed_session_is_not_announced(make_core):
    mem = Mem()
    core = make_core(inline=0)
    s = core.session("zero")
    assert s.submit([mem.request(out=whole(mem.buf(64)), req_id=1)]) == (1, 0)
    until(lambda: s.counts()[1] == 1, "the worker never completed")
    s.close()
    assert core.drain() == []
    assert_consistent(core)


# --- limits -----------------------------------------------------------------


def test_global_request_cap_is_eagain(make_core):
    mem = Mem()
    core = make_core(max_requests=3)
    s, t = core.session("zero"), core.session("zero")
    bufs = [mem.buf(8) for _ in range(4)]
    assert s.submit([mem.request(out=whole(bufs[0])), mem.request(out=whole(bufs[1]))]) == (2, 0)
    assert t.submit([mem.request(out=whole(bufs[2])), mem.request(out=whole(bufs[3]))]) == (1, errno.EAGAIN)
    stats, _ = core.stats()
    assert stats["refused_limits"] == 1 and stats["outstanding"] == 3
    assert len(s.take()) == 2
    assert t.submit([mem.request(out=whole(bufs[3]))]) == (1, 0)
    assert len(t.take()) == 2
    assert_consistent(core)


def test_metadata_cap_is_eagain(make_core):
    mem = Mem()
    core = make_core(max_meta=8192, inline=0)
    s = core.session("zero")
    buf = mem.buf(IOV_MAX)
    many = [(addr(buf) + i, 1) for i in range(IOV_MAX)]  # 16 KiB of iovecs
    assert s.submit([mem.request(out=many)]) == (0, errno.EAGAIN)
    stats, _ = core.stats()
    assert stats["refused_limits"] == 1 and stats["meta_bytes"] == 0 and stats["outstanding"] == 0
    got = s.run([mem.request(out=many[:100], req_id=1)])
    assert got[1].error == 0 and not buf[:100].any()
    assert_consistent(core)


# --- close and teardown -----------------------------------------------------


def test_close_with_requests_in_flight(make_core):
    mem = Mem()
    core = make_core(workers=1, chunk=64 << 10, inline=0)
    s = core.session("copy", depth=8)
    src = mem.buf(np.full(16 << 20, 3, np.uint8))
    dsts = [mem.buf(16 << 20) for _ in range(8)]
    reqs = [mem.request(out=whole(d), ins=[whole(src)], req_id=i) for i, d in enumerate(dsts)]
    assert s.submit(reqs) == (8, 0)
    s.close()
    stats = core.wait_idle()
    assert stats["worker_runs"] == 8
    assert_consistent(core)
    for d in dsts:  # each chunk was copied whole or not at all
        chunks = d.reshape(-1, 64 << 10)
        assert np.all((chunks == 3).all(axis=1) | (chunks == 0).all(axis=1))


def test_close_discards_ready_responses(make_core):
    mem = Mem()
    core = make_core()
    s = core.session("zero")
    assert s.submit([mem.request(out=whole(mem.buf(8))) for _ in range(5)]) == (5, 0)
    assert core.stats()[0]["outstanding"] == 5
    s.close()
    assert_consistent(core)


def test_core_free_with_open_sessions_and_queued_requests(cm):
    mem = Mem()
    core = Core(cm, workers=1, chunk=64 << 10, inline=0)
    s = core.session("copy", depth=16)
    src = mem.buf(np.full(8 << 20, 6, np.uint8))
    dsts = [mem.buf(8 << 20) for _ in range(16)]
    assert s.submit([mem.request(out=whole(d), ins=[whole(src)], req_id=i) for i, d in enumerate(dsts)]) == (16, 0)
    core.free()  # the session was never closed: the core frees it
    for d in dsts:
        chunks = d.reshape(-1, 64 << 10)
        assert np.all((chunks == 6).all(axis=1) | (chunks == 0).all(axis=1))


# --- external sessions (back-ends outside the C code) -------------------------


def set_external(s: Sess, func: str | None, ninputs: int, has_output: bool) -> int:
    index = -1 if func is None else s.lib.dm_func_lookup(func.encode())
    return s.lib.dm_sess_set_external(s.ptr, index, ninputs, int(has_output))


def take_external(core: Core, max_reqs: int = 1024) -> list:
    out = core.ffi.new("dm_req *[]", max_reqs)
    n = core.lib.dm_core_take_external(core.ptr, out, max_reqs)
    return list(out[0:n])


def req_info(core: Core, r) -> dict:
    info = core.ffi.new("struct dm_req_info *")
    core.lib.dm_req_info(r, info)
    fields = ("session", "id", "func", "err", "ninputs", "has_output", "total")
    return {k: getattr(info, k) for k in fields} | {"immediate": bytes(info.immediate)}


def req_read(core: Core, r, i: int, off: int, n: int) -> tuple[int, bytes]:
    buf = core.ffi.new("char[]", max(n, 1))
    err = core.lib.dm_req_read(r, i, off, buf, n)
    return err, core.ffi.unpack(buf, n)


def req_write(core: Core, r, off: int, data: bytes) -> int:
    return core.lib.dm_req_write(r, off, core.ffi.from_buffer(data), len(data))


def complete(core: Core, r, err: int = 0, imm: bytes | None = None) -> None:
    core.lib.dm_req_complete(r, err, core.ffi.NULL if imm is None else core.ffi.from_buffer(imm))


def test_set_external_rules(vcore):
    s = vcore.session(None)
    assert set_external(s, "copy", 2, True) == errno.EINVAL  # the table says 1 input
    assert set_external(s, None, 17, True) == errno.EINVAL
    assert set_external(s, None, 0, False) == errno.EINVAL  # no operand at all
    assert s.lib.dm_sess_set_external(s.ptr, 10_000, 1, 1) == errno.ESRCH
    assert set_external(s, None, 1, True) == 0
    assert set_external(s, None, 1, True) == errno.EBUSY
    assert s.setfunc("copy") == errno.EBUSY
    t = vcore.session("zero")
    assert set_external(t, "zero", 0, True) == errno.EBUSY


def test_external_requests_are_validated_and_taken(make_core):
    rng = np.random.default_rng(11)
    mem = Mem()
    core = make_core(chunk=SMALL_CHUNK)
    s = core.session(None)
    assert set_external(s, None, 1, True) == 0  # a function the table lacks ("rot13")
    size = 3 * SMALL_CHUNK + 7
    src = Region(mem, rng, size, max_pieces=IOV_MAX)
    dst = Region(mem, rng, size, max_pieces=9)
    data = random_bytes(rng, size)
    src.write(data)
    good = mem.request(out=dst.segs, ins=[src.segs], imm=b"12345678", req_id=7)
    short = mem.buf(size - 1)
    bad = mem.request(out=dst.segs, ins=[whole(short)], req_id=8)  # lengths differ: EINVAL
    assert s.submit([good, bad]) == (1, errno.EINVAL)
    assert s.counts() == (1, 0)
    (r,) = take_external(core)
    assert take_external(core) == []
    info = req_info(core, r)
    assert info == {
        "session": s.id,
        "id": 7,
        "func": -1,
        "err": 0,
        "ninputs": 1,
        "has_output": 1,
        "total": size,
        "immediate": b"12345678",
    }
    # Reads and writes at any offset, through the cuts of both lists.
    for off, n in [(0, size), (1, 5), (SMALL_CHUNK - 3, 2 * SMALL_CHUNK), (size - 1, 1), (size, 0)]:
        err, got = req_read(core, r, 0, off, n)
        assert err == 0 and got == data[off : off + n].tobytes()
    assert req_read(core, r, 0, size - 1, 2)[0] == errno.EINVAL
    assert req_read(core, r, 1, 0, 1)[0] == errno.EINVAL  # no input 1
    rot = bytes((b + 13) % 256 for b in data.tobytes())
    assert req_write(core, r, 0, rot[:100]) == 0
    assert req_write(core, r, 100, rot[100:]) == 0
    assert req_write(core, r, size, b"x") == errno.EINVAL
    assert core.stats()[0]["external"] == 1
    complete(core, r, 0, b"ABCDEFGH")
    assert core.drain() == [s.id]  # announced like a worker completion
    assert s.take() == [Resp(7, 0, b"ABCDEFGH")]
    assert dst.read().tobytes() == rot and dst.guards_intact()
    assert core.stats()[0]["external"] == 0
    assert_consistent(core)


def test_external_constraint_error_and_immediate_echo(vcore):
    mem = Mem()
    s = vcore.session(None)
    assert set_external(s, "copy", 1, True) == 0  # a table function performed outside
    src = mem.buf(b"abc")
    # No output: accepted, failing on its own with EINVAL as in the C back-end.
    assert s.submit([mem.request(ins=[whole(src)], req_id=1)]) == (1, 0)
    dst = mem.buf(3)
    assert s.submit([mem.request(out=whole(dst), ins=[whole(src)], imm=b"imm", req_id=2)]) == (1, 0)
    r1, r2 = take_external(vcore)
    assert req_info(vcore, r1)["err"] == errno.EINVAL and req_info(vcore, r1)["func"] == vcore.lib.dm_func_lookup(b"copy")
    assert req_write(vcore, r1, 0, b"") == errno.EINVAL  # it has no output
    complete(vcore, r1, errno.EINVAL)
    complete(vcore, r2)  # imm NULL: the request's immediate is echoed
    assert sorted(s.take()) == [Resp(1, errno.EINVAL, bytes(8)), Resp(2, 0, b"imm".ljust(8, b"\0"))]
    funcs = vcore.stats()[1]
    assert funcs["copy"]["submitted"] == 2 and funcs["copy"]["failed"] == 1 and funcs["copy"]["completed"] == 1
    assert_consistent(vcore)


@pytest.mark.parametrize("path", PATHS)
def test_external_requests_run_by_the_core(make_core, path):
    rng = np.random.default_rng(12)
    mem = Mem()
    core = make_core(chunk=SMALL_CHUNK, inline=PATHS[path])
    s = core.session(None)
    assert set_external(s, "copy", 1, True) == 0
    cases = {}
    reqs = []
    for i, size in enumerate(SIZES):
        src, dst = Region(mem, rng, size), Region(mem, rng, size)
        data = random_bytes(rng, size)
        src.write(data)
        cases[i] = (dst, data)
        reqs.append(mem.request(out=dst.segs, ins=[src.segs], req_id=i))
    assert s.submit(reqs) == (len(reqs), 0)
    before = core.stats()[0]
    for r in take_external(core):
        core.lib.dm_req_run(r)
    s.wait(len(reqs))
    for resp in s.take():
        dst, data = cases[resp.id]
        assert resp.error == 0 and np.array_equal(dst.read(), data) and dst.guards_intact()
    after = core.wait_idle()
    runs = after["inline_runs"] + after["worker_runs"] - before["inline_runs"] - before["worker_runs"]
    assert runs == len(reqs)
    if path == "worker":  # all but the empty request
        assert after["worker_runs"] - before["worker_runs"] == len(reqs) - 1
    assert after["run_bytes"] - before["run_bytes"] == sum(SIZES)
    assert after["busy_ns"] > before["busy_ns"] and after["executing_bytes"] == 0
    assert_consistent(core)


def test_external_function_unknown_to_the_core_is_enosys_when_run(vcore):
    mem = Mem()
    s = vcore.session(None)
    assert set_external(s, None, 0, True) == 0
    assert s.submit([mem.request(out=whole(mem.buf(4)), req_id=3)]) == (1, 0)
    (r,) = take_external(vcore)
    vcore.lib.dm_req_run(r)
    s.wait(1)
    assert s.take() == [Resp(3, errno.ENOSYS, bytes(8))]
    assert_consistent(vcore)


def test_external_requests_of_a_closed_session(make_core):
    mem = Mem()
    core = make_core()
    s = core.session(None)
    assert set_external(s, None, 1, True) == 0
    src, dst = mem.buf(b"x" * 64), mem.buf(64)
    assert s.submit([mem.request(out=whole(dst), ins=[whole(src)], req_id=i) for i in range(3)]) == (3, 0)
    r1, r2, r3 = take_external(core)
    s.close()  # the requests keep the session alive; their work is cancelled
    assert req_read(core, r1, 0, 0, 8)[0] == errno.ECANCELED
    assert req_write(core, r1, 0, b"y") == errno.ECANCELED
    complete(core, r1)
    core.lib.dm_req_run(r2)
    complete(core, r3, errno.EIO)
    assert core.drain() == []
    assert_consistent(core)
    assert bytes(dst) == bytes(64)


def test_core_free_with_external_requests_never_completed(cm):
    mem = Mem()
    core = Core(cm)
    s = core.session(None)
    assert set_external(s, "zero", 0, True) == 0
    assert s.submit([mem.request(out=whole(mem.buf(8)), req_id=i) for i in range(4)]) == (4, 0)
    assert len(take_external(core, 2)) == 2  # two taken, two never taken
    core.free()


# --- properties -------------------------------------------------------------


ARENA = 128


@st.composite
def copy_layouts(draw):
    """Input and output lists of equal total length inside a small arena
    (so that segments often overlap, contain and touch one another)."""
    total = draw(st.integers(0, 96))

    def segments():
        n = draw(st.integers(1, 6))
        cuts = sorted(draw(st.lists(st.integers(0, total), min_size=n - 1, max_size=n - 1)))
        lens = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
        return [(draw(st.integers(0, ARENA - n_)), n_) for n_ in lens]

    return segments(), segments()


@pytest.fixture(scope="module")
def prop_core(cm):
    core = Core(cm, chunk=64)
    yield core
    for s in core.sessions:
        s.close()
    core.free()


@settings(max_examples=1000, deadline=None)
@given(layout=copy_layouts(), seed=st.integers(0, 2**32 - 1))
def test_overlap_check_matches_brute_force(prop_core, layout, seed):
    ins, outs = layout
    mem = Mem()
    arena = mem.buf(random_bytes(np.random.default_rng(seed), ARENA))
    base = addr(arena)
    overlap = any(a < c + m and c < a + n for a, n in ins if n for c, m in outs if m)
    s = prop_core.session("copy")
    req = mem.request(out=[(base + o, n) for o, n in outs], ins=[[(base + o, n) for o, n in ins]], req_id=1)
    if overlap:
        assert s.submit([req]) == (0, errno.EINVAL)
    else:
        expected = arena.copy()
        src = np.concatenate([arena[o : o + n] for o, n in ins])
        pos = 0
        for o, n in outs:  # later segments win where outputs overlap each other
            expected[o : o + n] = src[pos : pos + n]
            pos += n
        assert s.run([req])[1].error == 0
        assert np.array_equal(arena, expected)
    s.close()
