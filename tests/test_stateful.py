"""Sessions against a model of SPEC.md, driven by hypothesis.

A rule-based state machine opens sessions (the clone file or func/NAME, with
or without O_NONBLOCK, re-opened through /proc/self/fd), sets functions and
the non-blocking flag through xattrs, writes batches of requests (valid ones
and ones with one defect each: counts, unreadable arrays, overflowing or
unequal lengths, overlap, missing or extra output, unreadable or unwritable
data), reads responses, polls and closes, on one server with a queue depth
of 4.  A model predicts every result from SPEC.md's rules (and NetBSD's
dmover_io.c where SPEC.md is silent, as it says): the errno
of each call, short writes, EAGAIN on either side, each response's error and
immediate, and the bytes of every output buffer (zero, fill8, copy, xor3,
iscsi-crc32c, against plain Python, numpy and google_crc32c).

This process is the client: requests point into an arena it maps
(source data, request metadata, fresh output buffers, a scratch page, a
read-only page and inaccessible guard pages), and the other "random"
pointers are ones that are certainly not accessible here (page 0, the kernel
half, non-canonical addresses, the guards), so no request can write where
the test does not look.  A blocking call is made only when the model says
it cannot block; a watchdog turns a wrong prediction into a failure instead
of a hang.  Completion may be asynchronous, so a non-blocking read after a
write may see fewer responses than are outstanding (never none once poll
said POLLIN), and responses are matched by id, not order.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from dmio import XATTR_FUNCTION, XATTR_NONBLOCK

DEPTH = 4
PAGE = 4096
IOV_MAX = 1024
SSIZE_MAX = 2**63 - 1
REQ = struct.Struct("<QI4x8sQI4x")
RESP = struct.Struct("<Ii8s")
IOV = struct.Struct("<QQ")
DMBUF = struct.Struct("<QI4x")

# The functions driven here: (inputs, has an output).
FUNCS = {"zero": (0, True), "fill8": (0, True), "copy": (1, True), "xor3": (3, True), "iscsi-crc32c": (1, False)}
SERVER_FUNCS = {"zero", "fill8", "copy", *(f"xor{n}" for n in range(2, 17)), "iscsi-crc32c", "fill64", "compare", "copy-crc32c"}
MAX_SESSIONS = 3
MAX_HANDLES = 6
BLOCK_GUARD_S = 20  # a blocking call the model said could not block: fail after this, never hang

# --- the arena -----------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20

SRC_SIZE, META_SIZE, OUT_SIZE = 4 * PAGE, 32 * PAGE, 32 * PAGE
GUARD_FILL = 0xA5
OUT_FILL = 0x5A
GAP = 16  # guard bytes around each output buffer


class Arena:
    """Memory of this process that requests point into.

    src   random bytes, only ever read (inputs)
    meta  iovec and dmio_buffer arrays, written before each write()
    out   one fresh output buffer per request, with guard bytes around it
    tail  scratch page: outputs that run into the guard start here
    guard inaccessible
    ro    random bytes, read-only (a valid input, an unwritable output)
    guard2 inaccessible
    """

    def __init__(self) -> None:
        self.size = SRC_SIZE + META_SIZE + OUT_SIZE + 4 * PAGE
        base = _libc.mmap(None, self.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if base in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        self.base = base
        self.src = base
        self.meta = self.src + SRC_SIZE
        self.out = self.meta + META_SIZE
        self.tail = self.out + OUT_SIZE
        self.guard = self.tail + PAGE
        self.ro = self.guard + PAGE
        self.guard2 = self.ro + PAGE
        rng = np.random.default_rng(20240601)
        self.src_bytes = rng.integers(0, 256, SRC_SIZE, dtype=np.uint8).tobytes()
        self.ro_bytes = rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes()
        self.write(self.src, self.src_bytes)
        self.write(self.ro, self.ro_bytes)
        for addr, prot in ((self.guard, PROT_NONE), (self.ro, PROT_READ), (self.guard2, PROT_NONE)):
            if _libc.mprotect(addr, PAGE, prot) != 0:
                raise OSError(ctypes.get_errno(), "mprotect")
        self.meta_used = 0
        self.out_used = 0
        self.meta_written: list[tuple[int, bytes]] = []
        self.bufs: list[tuple[int, int]] = []  # (address, length) of every output buffer

    def free(self) -> None:
        if self.base is not None:
            _libc.munmap(self.base, self.size)
            self.base = None

    @staticmethod
    def write(addr: int, data: bytes) -> None:
        ctypes.memmove(addr, data, len(data))

    @staticmethod
    def read(addr: int, n: int) -> bytes:
        return ctypes.string_at(addr, n)

    def alloc_meta(self, data: bytes) -> int | None:
        start = (self.meta_used + 15) & ~15
        if start + len(data) > META_SIZE:
            return None
        self.meta_used = start + len(data)
        addr = self.meta + start
        self.write(addr, data)
        self.meta_written.append((addr, data))
        return addr

    def alloc_out(self, n: int) -> int | None:
        if self.out_used + n + 2 * GAP > OUT_SIZE:
            return None
        addr = self.out + self.out_used + GAP
        self.write(addr - GAP, bytes([GUARD_FILL]) * GAP + bytes([OUT_FILL]) * n + bytes([GUARD_FILL]) * GAP)
        self.out_used += n + 2 * GAP
        self.bufs.append((addr, n))
        return addr

    # What this process lets the server read and write.
    def readable(self, addr: int, n: int) -> bool:
        return n == 0 or inside(addr, n, self.src, self.guard - self.src) or inside(addr, n, self.ro, PAGE)

    def writable(self, addr: int, n: int) -> bool:
        return n == 0 or inside(addr, n, self.src, self.guard - self.src)

    def src_read(self, addr: int, n: int) -> bytes:
        """Known content of source bytes (src or ro), from the model's copy."""
        if n == 0:
            return b""
        if inside(addr, n, self.src, SRC_SIZE):
            return self.src_bytes[addr - self.src : addr - self.src + n]
        assert inside(addr, n, self.ro, PAGE)
        return self.ro_bytes[addr - self.ro : addr - self.ro + n]

    def bad_read(self, i: int) -> int:
        """An address where reading fails at once, or (the last) after 4 read-only bytes."""
        return [0x100, self.guard, self.guard2 + 40, 0xFFFF_8000_0000_0000, 0xDEAD_0000_0000_0000, self.ro + PAGE - 4][i % 6]

    def bad_write(self, i: int) -> int:
        """An address where writing fails at once, or (the last) after 4 scratch bytes."""
        return [self.ro, self.ro + 100, self.guard, 0x100, 0xFFFF_8000_0000_0000, self.tail + PAGE - 4][i % 6]


def inside(addr: int, n: int, lo: int, size: int) -> bool:
    return lo <= addr and addr - lo < size and n <= size - (addr - lo)


# --- requests ------------------------------------------------------------------


@dataclass
class Spec:
    """A request as drawn: sizes, cuts, sources, and at most one defect."""

    size: int
    out_cuts: list[int]
    out_order: list[int]
    in_cuts: list[list[int]]
    in_offsets: list[list[int]]  # source offsets of each input piece (into src, or ro if >= SRC_SIZE)
    imm: bytes
    defect: str | None
    which: int  # which list / piece / address the defect picks
    value: int  # a count or length the defect uses


def defects(func: str) -> list[str]:
    nin, has_out = FUNCS[func]
    found = ["out_cnt_over", "out_array_bad", "len_overflow"]
    if has_out:
        found += ["no_output", "out_data_bad"]
    else:
        found += ["extra_output"]
    if nin:
        found += ["inbuf_bad", "in_cnt_zero", "in_cnt_over", "in_array_bad", "in_data_bad"]
    if nin and has_out:
        found += ["total_mismatch", "overlap"]
    return found


def cuts(draw, size: int) -> list[int]:
    points = sorted(draw(st.lists(st.integers(0, size), max_size=3)))
    return [b - a for a, b in zip([0, *points], [*points, size])]


@st.composite
def specs(draw, func: str) -> Spec:
    nin, _ = FUNCS[func]
    size = draw(st.sampled_from([0, 1, 7, 16, 100, 333, 512]) | st.integers(0, 512))
    out_cuts = cuts(draw, size)
    out_order = draw(st.permutations(range(len(out_cuts))))
    in_cuts = [cuts(draw, size) for _ in range(nin)]
    in_offsets = [
        [draw(st.integers(0, SRC_SIZE - n) | st.integers(SRC_SIZE, SRC_SIZE + PAGE - n)) for n in pieces] for pieces in in_cuts
    ]
    return Spec(
        size=size,
        out_cuts=out_cuts,
        out_order=list(out_order),
        in_cuts=in_cuts,
        in_offsets=in_offsets,
        imm=draw(st.binary(min_size=8, max_size=8)),
        defect=draw(st.none() | st.sampled_from(defects(func))),
        which=draw(st.integers(0, 63)),
        value=draw(st.sampled_from([IOV_MAX + 1, 4096, 2**31, 2**32 - 1])),
    )


@dataclass
class Built:
    """A request laid out in the arena, and what the model expects of it."""

    packed: bytes
    req_id: int
    write_error: int  # 0: accepted (when its turn comes)
    resp_error: int = 0
    resp_imm: bytes = bytes(8)
    buf: int | None = None  # the fresh output buffer, if any
    buf_len: int = 0
    after: bytes | None = None  # its bytes once the request ran (None: unspecified)


def _segments(arena: Arena, spec: Spec, buf: int) -> tuple[list[tuple[int, int]], list[list[tuple[int, int]]]]:
    offs, pos = [], 0
    for n in spec.out_cuts:
        offs.append((buf + pos, n))
        pos += n
    out = [offs[i] for i in spec.out_order]  # the stream order need not follow memory order
    ins = []
    for pieces, starts in zip(spec.in_cuts, spec.in_offsets):
        ins.append([((arena.src + o) if o < SRC_SIZE else (arena.ro + o - SRC_SIZE), n) for o, n in zip(starts, pieces)])
    return out, ins


def build(arena: Arena, func: str, spec: Spec, req_id: int) -> Built | None:
    """Lay the request out and judge it by SPEC.md's rules; None when the arena is full."""
    nin, has_out = FUNCS[func]
    buf = arena.alloc_out(spec.size)
    if buf is None:
        return None
    out, ins = _segments(arena, spec, buf)
    if not has_out:
        out = []
    d, k = spec.defect, spec.which
    if d == "no_output":
        out = []
    elif d == "extra_output":
        out = [(buf, spec.size)]
    elif d == "out_data_bad" and spec.size > 0:
        i = max(range(len(out)), key=lambda p: (out[p][1] > 0, p == k % len(out)))  # a non-empty piece
        out[i] = (arena.bad_write(k // 8), out[i][1])
    elif d == "len_overflow":
        target = out if out else ins[0]
        target.append((buf, [2**63, 2**64 - 1, SSIZE_MAX][k % 3]))
        if k % 3 == 2:
            target.append((buf, 1))
    elif d == "total_mismatch":
        ins[k % nin].append((arena.src, 1 + k))
    elif d == "overlap" and spec.size > 0:
        pieces = ins[k % nin]
        j = max(range(len(pieces)), key=lambda p: pieces[p][1])
        pieces[j] = (buf + (k % spec.size), pieces[j][1])
    elif d == "in_data_bad" and spec.size > 0:
        pieces = ins[k % nin]
        j = max(range(len(pieces)), key=lambda p: (pieces[p][1] > 0, p == k % len(pieces)))
        pieces[j] = (arena.bad_read(k // 8), pieces[j][1])

    # Arrays in the arena; counts and pointers as the defect wants them.
    out_ptr, out_cnt = 0, len(out)
    if out:
        out_ptr = arena.alloc_meta(b"".join(IOV.pack(a, n) for a, n in out))
    if d == "out_cnt_over":
        out_cnt = spec.value
    elif d == "out_array_bad" and out:
        out_ptr = arena.bad_read(k)
    in_lists = []
    for pieces in ins:
        in_lists.append([arena.alloc_meta(b"".join(IOV.pack(a, n) for a, n in pieces)), len(pieces)])
    if d in ("in_cnt_zero", "in_cnt_over", "in_array_bad"):
        target = in_lists[k % nin]
        if d == "in_cnt_zero":
            target[1] = 0
        elif d == "in_cnt_over":
            target[1] = spec.value
        else:
            target[0] = arena.bad_read(k // 8)
    inbuf = 0
    if in_lists:
        inbuf = arena.alloc_meta(b"".join(DMBUF.pack(a or 0, n) for a, n in in_lists))
        if d == "inbuf_bad":
            inbuf = arena.bad_read(k)
    if None in (out_ptr, inbuf) or any(a is None for a, _ in in_lists):
        return None
    packed = REQ.pack(out_ptr, out_cnt, spec.imm, inbuf, req_id)

    built = Built(packed, req_id, 0, buf=buf, buf_len=spec.size)
    built.write_error = validate(arena, nin, out_ptr, out_cnt, out, inbuf, in_lists, ins)
    if built.write_error:
        return built
    run(arena, func, spec, built, out, ins)
    return built


def validate(arena, nin, out_ptr, out_cnt, out, inbuf, in_lists, ins) -> int:
    """SPEC.md's checks at write(): 0, EINVAL or EFAULT (requests here break at most one rule)."""
    if out_cnt > IOV_MAX:
        return errno.EINVAL
    if nin and not arena.readable(inbuf, DMBUF.size * nin):
        return errno.EFAULT
    if any(n == 0 or n > IOV_MAX for _, n in in_lists):
        return errno.EINVAL
    if out_cnt and not arena.readable(out_ptr, IOV.size * out_cnt):
        return errno.EFAULT
    if any(not arena.readable(a, IOV.size * n) for a, n in in_lists):
        return errno.EFAULT
    totals = []
    for segs in [out, *ins] if out else ins:
        total = 0
        for _, n in segs:
            total += n
            if total > SSIZE_MAX:
                return errno.EINVAL
        totals.append(total)
    if len(set(totals)) > 1:  # the output's length, or input 0's without one
        return errno.EINVAL
    for a, n in out:
        for segs in ins:
            for c, m in segs:
                if n and m and a < c + m and c < a + n:
                    return errno.EINVAL
    return 0


def run(arena: Arena, func: str, spec: Spec, built: Built, out, ins) -> None:
    """What running an accepted request does: its response and its buffer's bytes."""
    nin, has_out = FUNCS[func]
    before = bytes([OUT_FILL]) * spec.size
    built.after = before
    if has_out != bool(out):
        built.resp_error = errno.EINVAL
        return
    total = sum(n for _, n in (out or ins[0]))
    readable = all(arena.readable(a, n) for segs in ins for a, n in segs)
    writable = all(arena.writable(a, n) for a, n in out)
    if total and not (readable and writable):
        built.resp_error = errno.EFAULT
        built.after = None
        return
    streams = [b"".join(arena.src_read(a, n) for a, n in segs) for segs in ins]
    built.resp_imm = spec.imm
    if func == "zero":
        result = bytes(total)
    elif func == "fill8":
        result = bytes([spec.imm[0]]) * total
    elif func == "copy":
        result = streams[0]
    elif func == "xor3":
        result = (
            np.frombuffer(streams[0], np.uint8) ^ np.frombuffer(streams[1], np.uint8) ^ np.frombuffer(streams[2], np.uint8)
        ).tobytes()
    else:
        crc = google_crc32c.extend(int.from_bytes(spec.imm[:4], "little"), streams[0])
        built.resp_imm = crc.to_bytes(4, "little") + bytes(4)
        return
    after = bytearray(before)
    pos = 0
    for a, n in out:
        if inside(a, n, built.buf, built.buf_len):  # else the scratch page
            after[a - built.buf : a - built.buf + n] = result[pos : pos + n]
        pos += n
    built.after = bytes(after)


# --- the model of sessions -------------------------------------------------------


@dataclass
class MSession:
    ino: int
    handles: dict[int, bool] = field(default_factory=dict)  # fd -> non-blocking
    function: str | None = None
    pending: dict[int, Built] = field(default_factory=dict)  # accepted, response not read

    @property
    def outstanding(self) -> int:
        return len(self.pending)


OUTCOMES: Counter[str] = Counter()  # printed by the test (pytest -s): what the examples exercised


def note(what: str) -> None:
    OUTCOMES[what] += 1
    event(what)


class Blocked(Exception):
    pass


_in_call = False


def _blocked(signum, frame):
    if _in_call:  # else the call returned just as the watchdog fired
        raise Blocked


def blocking(fn, *args):
    """A call the model says cannot block: if it does, a watchdog thread signals this
    one (the server answers an interrupted call with EINTR) and the test fails."""
    global _in_call
    old = signal.signal(signal.SIGUSR1, _blocked)
    watchdog = threading.Timer(BLOCK_GUARD_S, signal.pthread_kill, (threading.get_ident(), signal.SIGUSR1))
    watchdog.start()
    try:
        _in_call = True
        try:
            return fn(*args)
        finally:
            _in_call = False
    except Blocked:
        raise AssertionError(f"{fn.__name__} blocked for {BLOCK_GUARD_S} s although the model said it could not") from None
    finally:
        watchdog.cancel()
        watchdog.join()
        signal.signal(signal.SIGUSR1, old)


def direct(fn, *args):
    return fn(*args)


def outcome(fn, *args):
    """(result, 0) or (None, errno)."""
    try:
        return fn(*args), 0
    except OSError as exc:
        return None, exc.errno


SETFUNC_NAMES = [*(n.encode() for n in FUNCS), b"no-such-function", b"xor17", b"", b"copy\0junk", b"z" * 63 + b"zero"]


class SessionMachine(RuleBasedStateMachine):
    mnt: Path

    def __init__(self) -> None:
        super().__init__()
        self.arena: Arena | None = None
        self.sessions: list[MSession] = []
        self.next_id = 1
        self.unsent: list[Built] = []  # never accepted: their buffers stay untouched

    @initialize()
    def make_arena(self) -> None:
        self.arena = Arena()

    def teardown(self) -> None:
        try:
            for s in self.sessions:
                for fd in s.handles:
                    os.close(fd)
            self.sessions = []
            if self.arena is not None:
                self.check_memory()
        finally:
            if self.arena is not None:
                self.arena.free()

    def check_memory(self) -> None:
        a = self.arena
        assert a.read(a.src, SRC_SIZE) == a.src_bytes, "source bytes were written"
        assert a.read(a.ro, PAGE) == a.ro_bytes
        for addr, data in a.meta_written:
            assert a.read(addr, len(data)) == data, "request metadata was written"
        for addr, n in a.bufs:
            assert a.read(addr - GAP, GAP) == bytes([GUARD_FILL]) * GAP, f"guard before the buffer at {addr:#x} overwritten"
            assert a.read(addr + n, GAP) == bytes([GUARD_FILL]) * GAP, f"guard after the buffer at {addr:#x} overwritten"
        for b in self.unsent:
            assert a.read(b.buf, b.buf_len) == bytes([OUT_FILL]) * b.buf_len, f"request {b.req_id} was never accepted but ran"

    # -- helpers --------------------------------------------------------------------

    def pick_session(self, data, busy: bool = False) -> MSession:
        """Any session; with busy, mostly one that has a function (and requests, if any has)."""
        pool = self.sessions
        if busy and data.draw(st.integers(0, 4)) > 0:
            pool = [s for s in pool if s.function] or pool
            pool = [s for s in pool if s.outstanding] or pool
        return data.draw(st.sampled_from(pool))

    def pick_fd(self, data, s: MSession) -> int:
        return data.draw(st.sampled_from(sorted(s.handles)))

    def n_handles(self) -> int:
        return sum(len(s.handles) for s in self.sessions)

    # -- open and close -----------------------------------------------------------------

    @precondition(lambda self: self.n_handles() < MAX_HANDLES)
    @rule(data=st.data(), via=st.sampled_from(["dmoverio", *FUNCS, "reopen"]), nonblock=st.booleans())
    def open(self, data, via, nonblock) -> None:
        if via == "reopen" and self.sessions:
            self.reopen(data, nonblock)
            return
        if len(self.sessions) == MAX_SESSIONS:
            return
        if via == "reopen":
            via = "dmoverio"
        path = self.mnt / "dmoverio" if via == "dmoverio" else self.mnt / "func" / via
        fd = os.open(path, os.O_RDWR | (os.O_NONBLOCK if nonblock else 0))
        ino = os.fstat(fd).st_ino
        assert ino not in [s.ino for s in self.sessions], "a new session shares an inode"
        s = MSession(ino=ino, function=None if via == "dmoverio" else via)
        s.handles[fd] = nonblock
        self.sessions.append(s)

    def reopen(self, data, nonblock) -> None:
        """Another open file of a session, through /proc/self/fd (as /dev/fd/N on NetBSD)."""
        s = self.pick_session(data)
        fd = os.open(f"/proc/self/fd/{self.pick_fd(data, s)}", os.O_RDWR | (os.O_NONBLOCK if nonblock else 0))
        assert os.fstat(fd).st_ino == s.ino, "re-opening a session's inode gave another session"
        s.handles[fd] = nonblock

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def close(self, data) -> None:
        s = self.pick_session(data)
        fd = self.pick_fd(data, s)
        os.close(fd)
        del s.handles[fd]
        if not s.handles:
            self.sessions.remove(s)

    # -- the ioctl equivalents ------------------------------------------------------------

    @precondition(lambda self: self.sessions)
    @rule(data=st.data(), raw=st.sampled_from(SETFUNC_NAMES))
    def set_function(self, data, raw) -> None:
        s = self.pick_session(data)
        fd = self.pick_fd(data, s)
        name = raw.split(b"\0", 1)[0][:63].decode()
        if s.function is not None:
            want = errno.EBUSY  # NetBSD: EBUSY once a session exists, whatever the name
        elif name not in SERVER_FUNCS:
            want = errno.ESRCH
        else:
            want = 0
        _, err = outcome(os.setxattr, fd, XATTR_FUNCTION, raw)
        assert err == want, f"setxattr(function={raw!r}) on a session with function {s.function}: {errno.errorcode.get(err, err)}"
        if not err:
            s.function = name
        value, err = outcome(os.getxattr, self.pick_fd(data, s), XATTR_FUNCTION)
        if s.function is None:
            assert err == errno.ENODATA
        else:
            assert (value, err) == (s.function.encode(), 0)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data(), on=st.booleans())
    def set_nonblock(self, data, on) -> None:
        s = self.pick_session(data)
        os.setxattr(self.pick_fd(data, s), XATTR_NONBLOCK, b"1" if on else b"0")
        for fd in s.handles:  # it sets every open file of the session
            s.handles[fd] = on

    # -- the data path --------------------------------------------------------------------

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def write(self, data) -> None:
        s = self.pick_session(data, busy=True)
        fd = self.pick_fd(data, s)
        nonblock = s.handles[fd]
        func = s.function or data.draw(st.sampled_from(list(FUNCS)))
        specs_ = data.draw(st.lists(specs(func), min_size=1, max_size=DEPTH + 2))
        garble = data.draw(st.sampled_from([0] * 12 + [1, 39, -1, -39]))
        reqs = []
        for spec in specs_:
            b = build(self.arena, func, spec, self.next_id)
            if b is None:
                note("write: skipped, arena full")
                return  # the arena is full: nothing more to write in this example
            self.next_id += 1
            reqs.append(b)
        payload = b"".join(b.packed for b in reqs)
        payload = payload + b"\0" * garble if garble > 0 else payload[: len(payload) + garble]

        # A write that is not whole requests (as the kernel may cut one) serves its whole ones
        # and returns short; one that holds none is EINVAL.
        sent = reqs
        reqs = reqs[: len(payload) // REQ.size]
        room = DEPTH - s.outstanding
        first_bad = next((i for i, b in enumerate(reqs) if b.write_error), len(reqs))
        if not reqs:
            want, accepted = errno.EINVAL, 0
        elif s.function is None:
            want, accepted = errno.ENXIO, 0
        elif room == 0:
            if not nonblock:
                note("write: skipped, would block")
                self.unsent += sent
                return  # it would wait for a read that never comes
            want, accepted = errno.EAGAIN, 0
        elif first_bad < room:
            accepted = first_bad
            want = reqs[0].write_error if first_bad == 0 else 0
        elif len(reqs) <= room:
            want, accepted = 0, len(reqs)
        else:
            if not nonblock:
                note("write: skipped, would block")
                self.unsent += sent
                return  # it would wait for room
            want, accepted = 0, room

        result, err = outcome(direct if nonblock else blocking, os.write, fd, payload)
        note(f"write: {errno.errorcode.get(err, 'ok')}{' short' if 0 < accepted < len(reqs) else ''}")
        assert err == want, (
            f"write of {len(reqs)} requests ({[b.write_error for b in reqs]}, room {room}): errno {err}, model {want}"
        )
        if not err:
            assert result == accepted * REQ.size, f"write returned {result}, model {accepted * REQ.size}"
        for b in reqs[:accepted]:
            s.pending[b.req_id] = b
        self.unsent += sent[accepted:]

    @precondition(lambda self: self.sessions)
    @rule(data=st.data(), garble=st.sampled_from([0] * 9 + [1, 15, -1]))
    def read(self, data, garble) -> None:
        s = self.pick_session(data, busy=True)
        fd = self.pick_fd(data, s)
        # Mostly all that is outstanding (responses to check), sometimes anything.
        count = data.draw(st.sampled_from([max(1, s.outstanding)] * 3) | st.integers(1, DEPTH + 2))
        nonblock = s.handles[fd]
        size = count * RESP.size + garble
        count = size // RESP.size  # a read serves as many whole responses as fit
        if count == 0:
            want = errno.EINVAL
        elif s.function is None:
            want = errno.ENXIO
        elif nonblock and s.outstanding == 0:
            want = errno.EAGAIN
        elif not nonblock and count > s.outstanding:
            note("read: skipped, would block")
            return  # it would wait for responses that never come
        else:
            want = 0
        if want == 0 and nonblock:
            self.wait_readable(fd)
        result, err = outcome(direct if nonblock else blocking, os.read, fd, size)
        note(f"read: {errno.errorcode.get(err, 'ok')}")
        assert err == want, f"read of {size} bytes ({s.outstanding} outstanding, nonblock {nonblock}): errno {err}, model {want}"
        if err:
            return
        assert len(result) % RESP.size == 0
        got = [RESP.unpack_from(result, i) for i in range(0, len(result), RESP.size)]
        if nonblock:
            assert 1 <= len(got) <= min(count, s.outstanding), f"non-blocking read gave {len(got)} responses"
        else:
            assert len(got) == count, f"blocking read of {count} gave {len(got)}"
        for req_id, error, imm in got:
            b = s.pending.pop(req_id, None)
            assert b is not None, f"response for request {req_id}, which is not outstanding on this session"
            assert (error, imm) == (b.resp_error, b.resp_imm), (
                f"request {req_id}: response ({errno.errorcode.get(error, error)}, {imm.hex()}), "
                f"model ({errno.errorcode.get(b.resp_error, b.resp_error)}, {b.resp_imm.hex()})"
            )
            note(f"response: {errno.errorcode.get(b.resp_error, 'ok')}")
            if b.after is not None:
                assert self.arena.read(b.buf, b.buf_len) == b.after, f"request {req_id}: output bytes differ from the model"

    @invariant()
    def readiness(self) -> None:
        OUTCOMES["steps"] += 1
        """poll on every open file: POLLOUT iff there is room, POLLIN iff a response is (or will be) ready."""
        for s in self.sessions:
            for fd in s.handles:
                self.check_poll(s, fd)

    def check_poll(self, s: MSession, fd: int) -> None:
        p = select.poll()
        p.register(fd, select.POLLIN | select.POLLOUT)
        events = dict(p.poll(0)).get(fd, 0)
        assert not events & (select.POLLERR | select.POLLHUP | select.POLLNVAL), events
        assert bool(events & select.POLLOUT) == (s.outstanding < DEPTH), f"POLLOUT {events:#x} with {s.outstanding} outstanding"
        if s.outstanding == 0:
            assert not events & select.POLLIN, "POLLIN with nothing outstanding"
        else:
            self.wait_readable(fd)

    def wait_readable(self, fd: int) -> None:
        """Responses are on their way: POLLIN must come (a notification, if not at once)."""
        p = select.poll()
        p.register(fd, select.POLLIN)
        events = dict(p.poll(BLOCK_GUARD_S * 1000)).get(fd, 0)
        assert events & select.POLLIN, "outstanding requests never made the session readable"


# A failure is shrunk by replaying steps against the server: allow hypothesis
# its five minutes of shrinking on top of the run (about ten seconds when it passes).
@pytest.mark.timeout(900)
def test_sessions_follow_the_model(server_factory):
    server = server_factory("--queue-depth", str(DEPTH))
    SessionMachine.mnt = server.mountpoint
    run_state_machine_as_test(
        SessionMachine,
        settings=settings(
            max_examples=50,
            stateful_step_count=30,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        ),
    )
    print("\n".join(f"{n:6} {what}" for what, n in sorted(OUTCOMES.items())))
