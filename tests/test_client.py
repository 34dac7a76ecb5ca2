"""dmoverfs.client against real mounts.

Oracles are independent of the client and of the server: numpy for XOR, the
google-crc32c package and RFC 3720's vector for CRC32C, plain Python for the
rest. Buffers of every kind the buffer protocol offers; scatter/gather lists;
batches; ids; errors; timeouts; non-blocking mode; keep-alive; select,
selectors, trio and asyncio.
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import errno
import gc
import json
import mmap
import os
import select
import selectors
import threading
import time
import weakref

import google_crc32c
import numpy as np
import pytest
import trio

from dmoverfs import client
from dmoverfs.client import Request, Result, Session, SubmitError, SubmitWouldBlock

SIZES = [0, 1, 4096, 65_537, 3 << 20]
BIG = 64 << 20  # runs on a worker thread, not inline in write()
WAIT_S = 30.0


@pytest.fixture(autouse=True, params=["cffi", "ctypes"])
def exporter(request):
    """Every test with both ways of exporting buffers: cffi's (the full install) and ctypes' (the client alone).

    Set by hand, not with monkeypatch: tests call monkeypatch.undo() for their own patches.
    """
    chosen = client._cffi_exporter() if request.param == "cffi" else client._CTYPES
    assert chosen is not None, "cffi is missing: run scripts/setup"
    before, client._EXPORTER = client._EXPORTER, chosen
    yield chosen
    client._EXPORTER = before


def rand(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def sessions_open(mnt) -> int:
    return json.loads((mnt / "stats").read_text())["sessions"]["open"]


@pytest.fixture(autouse=True)
def no_session_left(mnt):
    """Every test closes every session it opened, and the client abandons no buffer."""
    abandoned = len(client._ABANDONED)
    yield
    gc.collect()
    deadline = time.monotonic() + WAIT_S  # a FUSE release may reach the server after close() returns
    while sessions_open(mnt) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sessions_open(mnt) == 0
    assert len(client._ABANDONED) == abandoned


# -- the one-call helpers against oracles --------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_zero(mnt, size):
    buf = bytearray(rand(size, 1).tobytes())
    client.zero(mnt, buf)
    assert buf == bytes(size)


@pytest.mark.parametrize("size", SIZES)
def test_fill8(mnt, size):
    buf = bytearray(size)
    client.fill8(mnt, buf, 0xA5)
    assert buf == b"\xa5" * size


def test_fill8_refuses_a_byte_out_of_range(mnt):
    with pytest.raises(ValueError):
        client.fill8(mnt, bytearray(4), 256)


@pytest.mark.parametrize("size", SIZES)
def test_copy(mnt, size):
    src = rand(size, 2).tobytes()
    dst = bytearray(size)
    client.copy(mnt, dst, src)
    assert dst == src


@pytest.mark.parametrize("n", range(2, 17))
def test_xor_picks_xorn(mnt, n):
    size = 65_537 + n
    srcs = [rand(size, 100 + i) for i in range(n)]
    dst = np.zeros(size, np.uint8)
    client.xor(mnt, dst, *srcs)
    assert np.array_equal(dst, np.bitwise_xor.reduce(srcs))


@pytest.mark.parametrize("n", [0, 1, 17])
def test_xor_refuses_other_input_counts(mnt, n):
    with pytest.raises(ValueError):
        client.xor(mnt, bytearray(8), *[bytes(8)] * n)


@pytest.mark.parametrize("size", SIZES)
def test_crc32c(mnt, size):
    data = rand(size, 3).tobytes()
    assert client.crc32c(mnt, data) == google_crc32c.value(data)


def test_crc32c_rfc3720_vector_and_chaining(mnt):
    assert client.crc32c(mnt, b"123456789") == 0xE3069283
    data = rand(300_001, 4).tobytes()
    crc = 0
    for start in range(0, len(data), 70_000):
        crc = client.crc32c(mnt, data[start : start + 70_000], seed=crc)
    assert crc == google_crc32c.value(data)
    assert client.crc32c(mnt, b"56789", seed=client.crc32c(mnt, b"1234")) == 0xE3069283


def test_helpers_use_the_default_mount_point(mnt, monkeypatch):
    monkeypatch.setenv("DMOVERFS_MOUNTPOINT", str(mnt))
    buf = bytearray(b"abc")
    client.zero(None, buf)
    assert buf == bytes(3)
    assert client.crc32c(None, b"123456789") == 0xE3069283
    assert "zero" in client.functions()


def test_functions_lists_the_func_directory(mnt):
    assert client.functions(mnt) == sorted(os.listdir(mnt / "func"))
    assert {"zero", "fill8", "copy", "xor2", "xor16", "iscsi-crc32c"} <= set(client.functions(str(mnt)))


# -- every kind of buffer -------------------------------------------------------------------

SIZE = 8192


def _mmap_file(tmp_path):
    path = tmp_path / "mapped"
    path.write_bytes(bytes(SIZE))
    with open(path, "r+b") as f:
        return mmap.mmap(f.fileno(), SIZE)


KINDS = {
    "bytearray": lambda tmp: bytearray(SIZE),
    "memoryview-slice": lambda tmp: memoryview(bytearray(SIZE + 100))[37 : 37 + SIZE],
    "numpy-uint8": lambda tmp: np.zeros(SIZE, np.uint8),
    "numpy-2d-float64": lambda tmp: np.zeros((SIZE // 64, 8), np.float64),
    "numpy-slice": lambda tmp: np.zeros(SIZE + 10, np.uint8)[5 : 5 + SIZE],
    "mmap-anonymous": lambda tmp: mmap.mmap(-1, SIZE),
    "mmap-file": _mmap_file,
    "array-I": lambda tmp: array.array("I", bytes(SIZE)),
    "ctypes-char-array": lambda tmp: (ctypes.c_char * SIZE)(),
    "ctypes-uint32-array": lambda tmp: (ctypes.c_uint32 * (SIZE // 4))(),
    "ctypes-string-buffer": lambda tmp: ctypes.create_string_buffer(SIZE),
}


def as_bytes(buf) -> bytes:
    return bytes(memoryview(buf).cast("B"))


def close_if_mmap(buf) -> None:
    if isinstance(buf, mmap.mmap):
        buf.close()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_of_buffer_as_output(mnt, tmp_path, kind):
    buf = KINDS[kind](tmp_path)
    try:
        client.fill8(mnt, buf, 0x5A)
        assert as_bytes(buf) == b"\x5a" * SIZE
        src = rand(SIZE, 5).tobytes()
        client.copy(mnt, buf, src)
        assert as_bytes(buf) == src
        client.zero(mnt, buf)
        assert as_bytes(buf) == bytes(SIZE)
    finally:
        close_if_mmap(buf)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_of_buffer_as_input(mnt, tmp_path, kind):
    buf = KINDS[kind](tmp_path)
    try:
        data = rand(SIZE, 6).tobytes()
        memoryview(buf).cast("B")[:] = data
        dst = bytearray(SIZE)
        client.copy(mnt, dst, buf)
        assert dst == data
        other = rand(SIZE, 7)
        client.xor(mnt, dst, buf, other)
        assert bytes(dst) == (np.frombuffer(data, np.uint8) ^ other).tobytes()
        assert client.crc32c(mnt, buf) == google_crc32c.value(data)
    finally:
        close_if_mmap(buf)


@pytest.mark.parametrize(
    "make",
    [
        lambda: b"\1" * SIZE,
        lambda: bytes(SIZE),
        lambda: memoryview(bytearray(b"\1" * SIZE)).toreadonly(),
    ],
    ids=["bytes", "bytes-zero", "readonly-memoryview"],
)
def test_read_only_inputs_are_accepted(mnt, make):
    src = make()
    dst = bytearray(SIZE)
    client.copy(mnt, dst, src)
    assert dst == bytes(src)


def _readonly_numpy():
    arr = np.zeros(SIZE, np.uint8)
    arr.flags.writeable = False
    return arr


@pytest.mark.parametrize(
    "make",
    [
        lambda: bytes(SIZE),
        lambda: memoryview(bytearray(SIZE)).toreadonly(),
        _readonly_numpy,
        lambda: mmap.mmap(-1, SIZE, prot=mmap.PROT_READ),
    ],
    ids=["bytes", "readonly-memoryview", "readonly-numpy", "readonly-mmap"],
)
def test_read_only_output_is_refused_before_anything_is_written(mnt, make):
    out = make()
    try:
        with Session(mnt, "zero") as s:
            with pytest.raises(TypeError, match="read-only"):
                s.submit(out)
            # The bad request came after a good one: nothing of the batch went out.
            good = bytearray(b"x" * SIZE)
            with pytest.raises(TypeError):
                s.submit_many([Request(good), Request(out)])
            assert s.outstanding == 0
            assert s.results(1, timeout=0) == []
            assert good == b"x" * SIZE
        with Session(mnt, "copy") as s, pytest.raises(TypeError):
            s.submit([bytearray(SIZE), out], [bytes(2 * SIZE)])
    finally:
        close_if_mmap(out)


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.zeros(2 * SIZE, np.uint8)[::2],
        lambda: np.zeros((64, 128), np.uint8).T,
        lambda: memoryview(bytearray(2 * SIZE))[::2],
    ],
    ids=["numpy-strided", "numpy-fortran", "memoryview-strided"],
)
def test_non_contiguous_buffers_are_refused(mnt, make):
    with Session(mnt, "copy") as s:
        with pytest.raises(ValueError, match="contiguous"):
            s.submit(make(), [bytes(SIZE)])
        with pytest.raises(ValueError, match="contiguous"):
            s.submit(bytearray(SIZE), [make()])
        assert s.outstanding == 0


def test_non_buffers_are_refused(mnt):
    with Session(mnt, "copy") as s:
        for bad in ["text", 42, None, {1: 2}]:
            with pytest.raises(TypeError):
                s.submit(bytearray(4), [bad])
        with pytest.raises(TypeError):
            s.submit("text", [b"text"])
        with pytest.raises(TypeError, match="in a list"):
            s.submit(bytearray(4), bytearray(4))  # inputs is not a sequence of buffers
        with pytest.raises(ValueError):
            s.submit(bytearray(4), [bytes(4)], immediate=b"123456789")
        with pytest.raises(ValueError):
            s.submit(bytearray(4), [bytes(4)], immediate=-1)
        with pytest.raises(ValueError):
            s.submit(bytearray(4), [bytes(4)], immediate=1 << 64)
        assert s.outstanding == 0


# -- scatter/gather ----------------------------------------------------------------------


def pieces(data, cuts):
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def test_scatter_gather_output_and_inputs_cut_differently(mnt):
    size = 100_003
    a, b, c = rand(size, 8), rand(size, 9), rand(size, 10)
    out = bytearray(size)
    out_view = memoryview(out)
    out_pieces = pieces(out_view, [1, 4096, 50_000, 50_000, 99_999])  # a zero-length piece too
    in_pieces = [
        pieces(a, [17]),
        [bytes(piece) for piece in pieces(b, [3, 70_000])],
        pieces(memoryview(bytearray(c.tobytes())), [60_000]),
    ]
    client.xor(mnt, out_pieces, *in_pieces)
    assert bytes(out) == (a ^ b ^ c).tobytes()
    out_view.release()


def test_scatter_gather_mixing_buffer_kinds(mnt):
    head, tail = np.zeros(1000, np.uint8), mmap.mmap(-1, 3000)
    mid = (ctypes.c_char * 500)()
    try:
        src = rand(4500, 11).tobytes()
        client.copy(mnt, [head, mid, tail], (src[:2], bytearray(src[2:4000]), array.array("B", src[4000:])))
        assert as_bytes(head) + as_bytes(mid) + tail[:] == src
        assert client.crc32c(mnt, [head, mid, tail]) == google_crc32c.value(src)
    finally:
        tail.close()


# -- sessions: batches, ids, results ---------------------------------------------------------


def test_submit_many_batches_of_64(mnt):
    bufs = [bytearray(4096 + i) for i in range(64)]
    with Session(mnt, "fill8") as s:
        for round_ in range(3):
            ids = s.submit_many(Request(buf, immediate=(i + round_) % 256) for i, buf in enumerate(bufs))
            assert len(ids) == 64 and len(set(ids)) == 64
            assert s.outstanding == 64
            results = s.results(64)
            assert sorted(r.id for r in results) == sorted(ids)
            assert all(r.ok for r in results)
            assert s.outstanding == 0
            for i, buf in enumerate(bufs):
                assert buf == bytes([(i + round_) % 256]) * len(buf)


def test_submit_many_takes_dicts_and_returns_ids_in_order(mnt):
    with Session(mnt, "zero") as s:
        ids = s.submit_many([{"out": bytearray(8), "req_id": 900}, {"out": bytearray(8)}, Request(bytearray(8), req_id=7)])
        assert ids[0] == 900 and ids[2] == 7 and ids[1] not in (900, 7)
        assert sorted(r.id for r in s.results(None)) == sorted(ids)
        assert s.submit_many([]) == []


def test_crc_batch_with_seeds_and_values(mnt):
    chunks = [rand(1000 + i, 20 + i).tobytes() for i in range(64)]
    seeds = [i if i % 3 else np.uint32(i) if i % 2 else i.to_bytes(4, "little") for i in range(64)]
    with Session(mnt, "iscsi-crc32c") as s:
        ids = s.submit_many(Request(inputs=[chunk], immediate=seed) for seed, chunk in zip(seeds, chunks))
        by_id = {r.id: r for r in s.results(64)}
    for i, (rid, chunk) in enumerate(zip(ids, chunks)):
        result = by_id[rid].check()
        assert result.crc == google_crc32c.extend(i, chunk)
        assert result.value == result.crc  # the high half of the immediate is zero


def test_auto_ids_are_unique_and_avoid_outstanding_explicit_ids(mnt):
    with Session(mnt, "zero") as s:
        explicit = s.submit_many(Request(bytearray(1), req_id=i) for i in range(1, 11))
        assert explicit == list(range(1, 11))
        auto = [s.submit(bytearray(1)) for _ in range(20)]
        assert not set(auto) & set(explicit) and len(set(auto)) == 20
        seen = [r.id for r in s.results(30)]
        assert sorted(seen) == sorted(explicit + auto)
        # Once read back an id may be used again.
        assert s.submit(bytearray(1), req_id=5) == 5
        assert s.results()[0].id == 5


def test_ids_wrap_around_32_bits(mnt):
    with Session(mnt, "zero") as s:
        s._next_id = (1 << 32) - 2
        ids = [s.submit(bytearray(1)) for _ in range(4)]
        assert ids == [(1 << 32) - 2, (1 << 32) - 1, 0, 1]
        assert sorted(r.id for r in s.results(4)) == sorted(ids)


def test_bad_ids_are_refused(mnt):
    with Session(mnt, "zero") as s:
        s.submit(bytearray(1), req_id=3)
        with pytest.raises(ValueError, match="outstanding"):
            s.submit(bytearray(1), req_id=3)
        with pytest.raises(ValueError, match="outstanding"):
            s.submit_many([Request(bytearray(1), req_id=4), Request(bytearray(1), req_id=4)])
        for bad in (-1, 1 << 32, 1.5, "7"):
            with pytest.raises(ValueError):
                s.submit(bytearray(1), req_id=bad)
        assert s.outstanding == 1
        assert [r.id for r in s.results()] == [3]


def test_result_helpers(mnt):
    r = Result(7, 0, (0x1122334455667788).to_bytes(8, "little"))
    assert r.ok and r.check() is r
    assert r.value == 0x1122334455667788 and r.crc == 0x55667788
    bad = Result(8, errno.EFAULT, bytes(8))
    assert not bad.ok
    with pytest.raises(OSError) as info:
        bad.check()
    assert info.value.errno == errno.EFAULT and "request 8" in str(info.value)


def test_results_of_all_outstanding_with_n_none(mnt):
    with Session(mnt, "zero") as s:
        s.submit_many(Request(bytearray(16)) for _ in range(10))
        assert len(s.results(None)) == 10
        assert s.results(None) == [] and s.results(0) == []
        with pytest.raises(ValueError):
            s.results(-1)


# -- errors --------------------------------------------------------------------------------


def test_unknown_function_is_esrch(mnt):
    with pytest.raises(client.UnknownFunction) as info:
        Session(mnt, "no-such-function")
    assert info.value.errno == errno.ESRCH
    # Code written against the plain errno keeps catching it.
    assert isinstance(info.value, ProcessLookupError) and isinstance(info.value, LookupError)
    # The message names the function, the mount, and what the mount offers (its func/ directory).
    offered = sorted(os.listdir(mnt / "func"))
    assert info.value.functions == offered and len(offered) >= 6
    assert "'no-such-function'" in str(info.value) and str(mnt) in str(info.value)
    assert ", ".join(offered) in str(info.value)
    for odd in ["", "..", "../stats", "a/b"]:
        with pytest.raises(OSError) as info:
            Session(mnt, odd)
        assert info.value.errno == errno.ESRCH


def test_missing_mount_is_enoent(tmp_path):
    for where in (tmp_path / "nowhere", tmp_path):  # missing, and a directory with no mount on it
        with pytest.raises(client.NotMounted) as info:
            Session(where, "zero")
        assert isinstance(info.value, FileNotFoundError) and info.value.errno == errno.ENOENT
        assert info.value.filename == str(where)
        assert f"dmoverfs mount {where}" in str(info.value)
        with pytest.raises(client.NotMounted):
            client.functions(where)


def test_a_mount_whose_server_died_says_so(server_factory):
    server = server_factory()
    server.proc.kill()
    server.proc.wait()
    with pytest.raises(client.MountGone) as info:
        Session(server.mountpoint, "zero")
    assert info.value.errno == errno.ENOTCONN and isinstance(info.value, client.DmoverfsError)
    assert f"dmoverfs unmount {server.mountpoint}" in str(info.value)


def test_lengths_mismatch_is_einval_at_submit(mnt):
    with Session(mnt, "copy") as s:
        with pytest.raises(SubmitError) as info:
            s.submit(bytearray(10), [bytes(11)])
        exc = info.value
        assert isinstance(exc, OSError) and exc.errno == errno.EINVAL
        assert exc.accepted == [] and exc.index == 0
        assert s.outstanding == 0


def test_refused_request_in_a_batch_reports_what_was_accepted(mnt):
    dsts = [bytearray(100) for _ in range(5)]
    src = rand(100, 12).tobytes()
    reqs = [Request(dst, [src]) for dst in dsts]
    reqs.insert(3, Request(bytearray(100), [bytes(99)]))
    with Session(mnt, "copy") as s:
        with pytest.raises(SubmitError) as info:
            s.submit_many(reqs)
        exc = info.value
        assert exc.errno == errno.EINVAL and exc.index == 3 and len(exc.accepted) == 3
        # The accepted ones are outstanding and complete; the ones after the refused one were not sent.
        assert s.outstanding == 3
        assert sorted(r.check().id for r in s.results(3)) == sorted(exc.accepted)
        assert all(dst == src for dst in dsts[:3]) and all(dst == bytes(100) for dst in dsts[3:])


def test_overlapping_input_and_output_is_einval(mnt):
    buf = bytearray(200)
    view = memoryview(buf)
    with Session(mnt, "copy") as s:
        with pytest.raises(SubmitError) as info:
            s.submit(view[:100], [view[50:150]])
        assert info.value.errno == errno.EINVAL
    view.release()


def test_function_errors_come_back_in_the_result(mnt):
    with Session(mnt, "zero") as s:
        s.submit(None, req_id=1)  # zero needs an output
        (r,) = s.results()
        assert (r.id, r.error) == (1, errno.EINVAL)
        with pytest.raises(OSError) as info:
            r.check()
        assert info.value.errno == errno.EINVAL
    with Session(mnt, "iscsi-crc32c") as s:
        s.submit(bytearray(4), [bytes(4)])  # iscsi-crc32c takes no output
        assert s.results()[0].error == errno.EINVAL


def test_helpers_raise_the_servers_refusal(mnt):
    with pytest.raises(SubmitError) as info:
        client.copy(mnt, bytearray(4), b"abc")
    assert info.value.errno == errno.EINVAL


# -- timeouts, blocking and non-blocking --------------------------------------------------------


def test_results_timeout_returns_what_is_ready(mnt):
    with Session(mnt, "zero") as s:
        assert s.results(1, timeout=0) == []
        assert s.results(3, timeout=0.05) == []
        ids = s.submit_many(Request(bytearray(8)) for _ in range(2))
        got = s.results(5, timeout=0.05)  # only 2 can come: returns them at the deadline
        assert sorted(r.id for r in got) == sorted(ids)
        s.submit(bytearray(8))
        assert len(s.results(1, timeout=WAIT_S)) == 1


def waiting_reads(mnt) -> int:
    """Session reads the server holds waiting now (its own count, not the client's)."""
    return json.loads((mnt / "stats").read_text())["calls"]["waiting_reads"]


def test_blocking_results_wait_for_requests_another_thread_submits_later(mnt):
    """A consumer thread may ask for results before its producer has submitted anything."""
    with Session(mnt, "fill8") as s:
        got: list = []

        def consume() -> None:
            try:
                got.extend(s.results(2))
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                got.append(exc)

        baseline = waiting_reads(mnt)
        consumer = threading.Thread(target=consume)
        consumer.start()
        deadline = time.monotonic() + WAIT_S
        while waiting_reads(mnt) == baseline and consumer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert consumer.is_alive(), got  # waiting in the server, not refused
        bufs = [bytearray(64), bytearray(64)]
        ids = [s.submit(bufs[0], immediate=7), s.submit(bufs[1], immediate=9)]
        consumer.join(WAIT_S)
        if consumer.is_alive():  # never leave it blocked: give it what it waits for, then fail
            s.submit_many(Request(bytearray(8)) for _ in range(2))
            consumer.join(WAIT_S)
            pytest.fail("results(2) did not return once two requests were submitted")
        assert sorted(r.check().id for r in got) == sorted(ids)
        assert bufs == [bytearray(b"\x07" * 64), bytearray(b"\x09" * 64)]


def test_results_wait_for_a_worker(mnt):
    src, dst = np.ones(BIG, np.uint8), np.zeros(BIG, np.uint8)
    with Session(mnt, "copy") as s:
        rid = s.submit(dst, [src])
        got: list[Result] = []
        while not got:
            got = s.results(1, timeout=WAIT_S)
        assert got[0].check().id == rid
    assert dst.all()


def test_non_blocking_queue_full_and_nothing_ready(server_factory):
    mnt = server_factory("--queue-depth", "4").mountpoint
    with Session(mnt, "fill8", nonblocking=True) as s:
        assert s.nonblocking
        with pytest.raises(BlockingIOError):
            s.results(1)
        bufs = [bytearray(32) for _ in range(6)]
        ids = s.submit_many(Request(buf, immediate=9) for buf in bufs)
        assert len(ids) == 4  # a prefix: the queue holds 4, the last two were not sent
        with pytest.raises(SubmitWouldBlock) as info:
            s.submit(bufs[5], immediate=9)
        assert isinstance(info.value, BlockingIOError) and isinstance(info.value, SubmitError)
        assert info.value.errno == errno.EAGAIN and info.value.accepted == [] and info.value.index == 0
        assert s.outstanding == 4
        got = s.results(10)  # non-blocking: what is ready, up to n
        assert sorted(r.id for r in got) == sorted(ids)
        assert bufs[:4] == [b"\x09" * 32] * 4 and bufs[4:] == [bytes(32)] * 2
        with pytest.raises(BlockingIOError):
            s.results(1)
    # A refused request after accepted ones, non-blocking: SubmitError with the accepted ids.
    with Session(mnt, "copy", nonblocking=True) as c:
        with pytest.raises(SubmitError) as info:
            c.submit_many([Request(bytearray(4), [b"abcd"]), Request(bytearray(4), [b"abc"])])
        assert info.value.errno == errno.EINVAL and info.value.index == 1 and len(info.value.accepted) == 1
        assert [r.id for r in c.results(1, timeout=WAIT_S)] == info.value.accepted


def test_blocking_submit_waits_for_room_and_switching_modes(server_factory):
    mnt = server_factory("--queue-depth", "2").mountpoint
    with Session(mnt, "zero") as s:
        s.submit_many([Request(bytearray(8)), Request(bytearray(8))])
        s.set_blocking(False)
        with pytest.raises(SubmitWouldBlock):
            s.submit(bytearray(8))
        s.set_blocking(True)
        assert not s.nonblocking
        done: list[int] = []
        worker = threading.Thread(target=lambda: done.append(s.submit(bytearray(8))))
        worker.start()
        got = s.results(1)  # frees a slot: the blocked submit goes through
        worker.join(WAIT_S)
        assert not worker.is_alive() and len(done) == 1
        got += s.results(2)
        assert len({r.id for r in got}) == 3 and done[0] in {r.id for r in got}
        s.nonblocking = True
        with pytest.raises(BlockingIOError):
            s.results(5)  # nothing ready


def test_submitting_and_reading_from_two_threads(mnt):
    total = 2000
    bufs = [bytearray(64) for _ in range(64)]
    seen: list[int] = []
    submitted: list[int] = []
    with Session(mnt, "fill8") as s:

        def reader() -> None:
            while len(seen) < total:
                seen.extend(r.check().id for r in s.results(64, timeout=0.5))

        thread = threading.Thread(target=reader)
        thread.start()
        for start in range(0, total, 50):
            submitted += s.submit_many(Request(bufs[i % 64], immediate=7) for i in range(start, start + 50))
        thread.join(WAIT_S * 4)
        assert not thread.is_alive()
    assert sorted(seen) == sorted(submitted) and len(submitted) == total
    assert all(buf == b"\7" * 64 for buf in bufs)


# -- keep-alive ------------------------------------------------------------------------------


def test_buffers_dropped_by_the_caller_stay_alive_until_the_result_is_read(mnt):
    out = np.full(4096, 0xEE, np.uint8)
    src = np.arange(4096, dtype=np.uint32).view(np.uint8)[:4096].copy()
    refs = weakref.ref(out), weakref.ref(src)
    with Session(mnt, "copy") as s:
        rid = s.submit(out, [src])
        del out, src
        gc.collect()
        assert all(ref() is not None for ref in refs)
        alive_out = refs[0]()
        assert bytes(alive_out) == bytes(refs[1]())
        del alive_out
        assert s.results()[0].check().id == rid
        gc.collect()
        assert all(ref() is None for ref in refs)


def test_scatter_gather_pieces_are_kept_too(mnt):
    class Buf(bytearray):  # bytearray itself has no weak references
        pass

    pieces_ = [Buf(100) for _ in range(3)]
    refs = [weakref.ref(p) for p in pieces_]
    with Session(mnt, "fill8") as s:
        s.submit(pieces_, immediate=1)
        del pieces_
        gc.collect()
        assert all(ref() is not None for ref in refs)
        s.results()
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_a_bytearray_cannot_be_resized_nor_an_mmap_closed_while_in_use(mnt):
    buf = bytearray(4096)
    mapped = mmap.mmap(-1, 4096)
    with Session(mnt, "copy") as s:
        s.submit(buf, [mapped])
        with pytest.raises(BufferError):
            buf.extend(b"more")
        with pytest.raises(BufferError):
            mapped.close()
        s.results()
        buf.extend(b"more")  # released once the result is read
        mapped.close()
        # Refused requests release their buffers at once: by the server, or by the client's checks.
        with pytest.raises(SubmitError):
            s.submit(buf, [bytes(4)])
        buf.extend(b"again")
        with pytest.raises(TypeError):
            s.submit_many([Request(buf, [bytes(len(buf))]), Request(b"read-only", [bytes(9)])])
        buf.extend(b"and again")


def test_close_waits_for_outstanding_requests(mnt):
    src, dst = np.full(BIG, 3, np.uint8), np.zeros(BIG, np.uint8)
    ref = weakref.ref(dst)
    with Session(mnt, "copy") as s:
        s.submit(dst, [src])
        del dst
    # close() read the result (discarding it): the copy is complete and the buffer released.
    assert s.closed and s.outstanding == 0
    gc.collect()
    assert ref() is None
    s.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        s.submit(bytearray(1), [b"x"])
    with pytest.raises(ValueError, match="closed"):
        s.fileno()


def test_close_after_the_server_is_gone_keeps_the_buffers_forever(server_factory, mnt):
    server = server_factory()
    buf = bytearray(4096)
    s = Session(server.mountpoint, "zero")
    s.submit_many(Request(buf) for _ in range(3))
    s.submit(bytearray(16))
    before = len(client._ABANDONED)
    server.stop()
    s.close()
    assert s.closed
    assert len(client._ABANDONED) == before + 1
    with pytest.raises(BufferError):
        buf.extend(b"x")  # still exported: nothing may reuse the memory
    # Give them back so the autouse check passes (the server is gone, nothing can write any more).
    for exports, _meta in client._ABANDONED.pop():
        client._release(exports)
    buf.extend(b"x")


def test_a_forked_child_cannot_use_the_session(mnt):
    with Session(mnt, "zero") as s:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                s.submit(bytearray(1))
            except RuntimeError:
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        s.submit(bytearray(1))
        assert s.results()[0].ok


# -- readiness: select, selectors, trio, asyncio ------------------------------------------------


def test_select_and_poll_on_the_session(mnt):
    src, dst = np.ones(BIG, np.uint8), np.zeros(BIG, np.uint8)
    with Session(mnt, "copy") as s:
        assert select.select([s], [], [], 0)[0] == []
        assert select.select([], [s], [], 0)[1] == [s]
        s.submit(dst, [src])
        readable, _, _ = select.select([s], [], [], WAIT_S)
        assert readable == [s]
        poller = select.poll()
        poller.register(s, select.POLLIN)
        assert poller.poll(0)
        assert s.results(1, timeout=0)[0].ok


def test_selectors(mnt):
    src, dst = np.ones(BIG, np.uint8), np.zeros(BIG, np.uint8)
    with Session(mnt, "copy") as s, selectors.DefaultSelector() as sel:
        sel.register(s, selectors.EVENT_READ, data="dmover")
        assert sel.select(0) == []
        s.submit(dst, [src])
        events = sel.select(WAIT_S)
        assert [(key.fileobj, key.data) for key, _ in events] == [(s, "dmover")]
        assert s.results()[0].ok
        sel.unregister(s)
    assert dst.all()


def test_trio_wait_readable_and_aresults(mnt):
    src, dst = np.ones(BIG, np.uint8), np.zeros(BIG, np.uint8)

    async def main() -> list[Result]:
        with Session(mnt, "copy", nonblocking=True) as s:
            with trio.move_on_after(0.05) as scope:
                await s.wait_readable()  # nothing submitted: never readable
            assert scope.cancelled_caught
            await s.wait_writable()
            s.submit(dst, [src])
            await s.wait_readable()
            first = s.results(1)
            small = [bytearray(10) for _ in range(5)]
            s.submit_many(Request(b, [bytes(range(10))]) for b in small)
            rest = await s.aresults(5)
            assert all(b == bytes(range(10)) for b in small)
            return first + rest

    results = trio.run(main)
    assert len(results) == 6 and all(r.ok for r in results)
    assert dst.all()


def test_asyncio_wait_readable_and_aresults(mnt):
    src, dst = np.ones(BIG, np.uint8), np.zeros(BIG, np.uint8)

    async def main() -> list[Result]:
        with Session(mnt, "copy") as s:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(s.wait_readable(), 0.05)
            await s.wait_writable()
            s.submit(dst, [src])
            await s.wait_readable()
            first = s.results(1, timeout=0)
            s.submit_many(Request(bytearray(10), [bytes(10)]) for _ in range(5))
            rest = await s.aresults(None)
            return first + rest

    results = asyncio.run(main())
    assert len(results) == 6 and all(r.ok for r in results)
    assert dst.all()


def test_aresults_cancelled_loses_nothing(mnt):
    src, dst = np.ones(BIG, np.uint8), np.zeros(BIG, np.uint8)

    async def main() -> None:
        with Session(mnt, "copy") as s:
            ids = [s.submit(bytearray(4), [b"abcd"]), s.submit(dst, [src])]  # inline; on a worker
            returned: list[Result] = []
            with trio.move_on_after(0):  # cancelled at its first wait, if it has to wait
                returned += await s.aresults(2)
            returned += await s.aresults(None)
            assert sorted(r.id for r in returned) == sorted(ids)

    trio.run(main)


def test_aresults_waits_for_requests_another_task_submits_later(mnt):
    async def main() -> None:
        with Session(mnt, "zero") as s:
            got: list[Result] = []

            async def consume() -> None:
                got.extend(await s.aresults(1))

            with trio.move_on_after(WAIT_S):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(consume)
                    await trio.sleep(0.05)  # the consumer is waiting, nothing submitted
                    assert not got
                    rid = s.submit(bytearray(16))
            assert [r.check().id for r in got] == [rid]

    trio.run(main)


def test_a_batch_larger_than_a_fuse_write(server_factory, monkeypatch):
    # 30000 requests are 1.2 MB: the kernel hands them to the server in pieces of at most 1 MiB,
    # and a piece that ends inside a request comes back short; the client continues from there.
    mnt = server_factory("--queue-depth", "30000").mountpoint
    bufs = [bytearray(1) for _ in range(30000)]
    writes: list[int] = []
    real_write = os.write

    def write(fd, data):
        written = real_write(fd, data)
        writes.append(written)
        return written

    with Session(mnt, "fill8") as s:
        monkeypatch.setattr(os, "write", write)
        ids = s.submit_many(Request(buf, immediate=i % 256) for i, buf in enumerate(bufs))
        monkeypatch.undo()
        assert sum(writes) == 30000 * 40 and all(w % 40 == 0 for w in writes)
        assert ids == list(range(1, 30001))
        results = s.results(None)
        assert sorted(r.check().id for r in results) == ids
    assert all(buf[0] == i % 256 for i, buf in enumerate(bufs))


def test_short_writes_are_continued(mnt, monkeypatch):
    # Whatever cuts a write short (FUSE's transfer size, a signal), the client writes the rest.
    real_write = os.write
    writes: list[int] = []

    def short_write(fd, data):
        written = real_write(fd, bytes(data[: 7 * 40]))
        writes.append(written)
        return written

    bufs = [bytearray(16) for _ in range(64)]
    with Session(mnt, "fill8") as s:
        monkeypatch.setattr(os, "write", short_write)
        ids = s.submit_many(Request(buf, immediate=0x33) for buf in bufs)
        monkeypatch.undo()
        assert len(ids) == 64 and writes == [7 * 40] * 9 + [40]
        assert sorted(r.check().id for r in s.results(64)) == sorted(ids)
    assert bufs == [b"\x33" * 16] * 64
