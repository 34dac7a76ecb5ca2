"""Every function against an independent oracle, through a real mount.

Oracles: plain Python/numpy for zero, fill8 and copy; numpy's bitwise XOR for
xorN; the google-crc32c package and RFC 3720's published vectors for CRC32C.
Sizes and scatter/gather cuts are random (seeded, so failures reproduce).
"""

from __future__ import annotations

import json
import os
import threading

import google_crc32c
import numpy as np
import pytest

from dmio import collect, cut, open_session, request, run, submit, whole

XORS = [f"xor{n}" for n in range(2, 17)]
FUNCTIONS = ["zero", "fill8", "copy", *XORS, "iscsi-crc32c"]
EXTENSIONS = ["fill64", "compare", "copy-crc32c"]
SIZES = [0, 1, 7, 4096, 65_537, 300_001, 3 << 20]


def random_bytes(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(0, 256, size, dtype=np.uint8)


def test_func_directory_lists_every_function(mnt):
    assert sorted(os.listdir(mnt / "func")) == sorted(FUNCTIONS + EXTENSIONS)


@pytest.mark.parametrize("size", SIZES)
def test_zero(mnt, size):
    rng = np.random.default_rng(size)
    out = rng.integers(1, 256, size, dtype=np.uint8)
    fd = open_session(mnt, "zero")
    try:
        resp = run(fd, request(7, out=cut(out, rng)))[7]
    finally:
        os.close(fd)
    assert resp.error == 0
    assert not out.any()


@pytest.mark.parametrize("size", SIZES)
def test_fill8(mnt, size):
    rng = np.random.default_rng(size + 1)
    byte = int(rng.integers(1, 256))
    out = np.zeros(size, dtype=np.uint8)
    fd = open_session(mnt, "fill8")
    try:
        resp = run(fd, request(1, out=cut(out, rng), immediate=bytes([byte, 0xAA, 0xBB])))[1]
    finally:
        os.close(fd)
    assert resp.error == 0
    assert bytes(out) == bytes([byte]) * size


@pytest.mark.parametrize("size", SIZES)
def test_copy_with_different_cuts(mnt, size):
    rng = np.random.default_rng(size + 2)
    src = random_bytes(rng, size)
    dst = np.zeros(size, dtype=np.uint8)
    fd = open_session(mnt, "copy")
    try:
        resp = run(fd, request(2, out=cut(dst, rng), inputs=[cut(src, rng)]))[2]
    finally:
        os.close(fd)
    assert resp.error == 0
    assert bytes(dst) == bytes(src)


@pytest.mark.parametrize("func", XORS)
def test_xor_against_numpy(mnt, func):
    n = int(func[3:])
    rng = np.random.default_rng(n)
    for size in (0, 33, 4096 + 17, int(rng.integers(100_000, 700_000))):
        srcs = [random_bytes(rng, size) for _ in range(n)]
        out = random_bytes(rng, size)
        fd = open_session(mnt, func)
        try:
            resp = run(fd, request(n, out=cut(out, rng), inputs=[cut(s, rng) for s in srcs]))[n]
        finally:
            os.close(fd)
        assert resp.error == 0
        expected = np.bitwise_xor.reduce(np.stack(srcs), axis=0) if size else np.zeros(0, np.uint8)
        assert np.array_equal(out, expected), f"{func} of {size} bytes"


RFC3720_VECTORS = [
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"123456789", 0xE3069283),
]


@pytest.mark.parametrize("data,expected", RFC3720_VECTORS, ids=["zeros", "ones", "incrementing", "decrementing", "check"])
def test_crc32c_published_vectors(mnt, data, expected):
    buf = np.frombuffer(bytearray(data), dtype=np.uint8)
    fd = open_session(mnt, "iscsi-crc32c")
    try:
        resp = run(fd, request(5, inputs=[whole(buf)]))[5]
    finally:
        os.close(fd)
    assert resp.error == 0
    assert resp.crc == expected
    assert resp.immediate[4:] == bytes(4)


@pytest.mark.parametrize("size", SIZES)
def test_crc32c_against_google_crc32c(mnt, size):
    rng = np.random.default_rng(size + 3)
    data = random_bytes(rng, size)
    fd = open_session(mnt, "iscsi-crc32c")
    try:
        resp = run(fd, request(9, inputs=[cut(data, rng)]))[9]
    finally:
        os.close(fd)
    assert resp.error == 0
    assert resp.crc == google_crc32c.value(bytes(data))


def test_crc32c_chained_across_requests(mnt):
    rng = np.random.default_rng(42)
    pieces = [random_bytes(rng, int(rng.integers(0, 200_000))) for _ in range(6)]
    fd = open_session(mnt, "iscsi-crc32c")
    crc = 0
    try:
        for i, piece in enumerate(pieces):
            crc = run(fd, request(i, inputs=[cut(piece, rng)], immediate=crc))[i].crc
    finally:
        os.close(fd)
    assert crc == google_crc32c.value(b"".join(bytes(p) for p in pieces))


def test_crc32c_seed_is_the_crc_so_far(mnt):
    data = np.frombuffer(bytearray(b"world"), dtype=np.uint8)
    seed = google_crc32c.value(b"hello ")
    fd = open_session(mnt, "iscsi-crc32c")
    try:
        resp = run(fd, request(1, inputs=[whole(data)], immediate=seed.to_bytes(4, "little") + b"\xde\xad\xbe\xef"))[1]
    finally:
        os.close(fd)
    assert resp.crc == google_crc32c.value(b"hello world")


def test_batch_of_64_mixed_requests_in_one_write(mnt):
    rng = np.random.default_rng(64)
    srcs = [random_bytes(rng, int(rng.integers(0, 50_000))) for _ in range(64)]
    dsts = [np.zeros(s.size, dtype=np.uint8) for s in srcs]
    reqs = [request(1000 + i, out=cut(d, rng), inputs=[cut(s, rng)]) for i, (s, d) in enumerate(zip(srcs, dsts))]
    fd = open_session(mnt, "copy")
    try:
        assert submit(fd, *reqs) == 64 * 40
        responses = collect(fd, 64)
    finally:
        os.close(fd)
    assert sorted(r.req_id for r in responses) == list(range(1000, 1064))
    assert all(r.error == 0 for r in responses)
    for s, d in zip(srcs, dsts):
        assert bytes(s) == bytes(d)


def test_iovec_lists_up_to_iov_max(mnt):
    rng = np.random.default_rng(1024)
    src = random_bytes(rng, 1024 * 3)
    dst = np.zeros_like(src)
    out = [(dst.ctypes.data + 3 * i, 3) for i in range(1024)]
    fd = open_session(mnt, "copy")
    try:
        resp = run(fd, request(1, out=out, inputs=[cut(src, rng, 50)]))[1]
    finally:
        os.close(fd)
    assert resp.error == 0
    assert bytes(dst) == bytes(src)


def test_large_copy_does_not_stall_other_sessions(mnt):
    """While 64 x 64 MiB copies run on one session, another session keeps being served."""
    size = 64 << 20
    src = np.full(size, 0x5A, dtype=np.uint8)
    dst = np.zeros(size, dtype=np.uint8)
    big = open_session(mnt, "copy")
    small = open_session(mnt, "zero")
    try:
        big_reqs = [request(i, out=whole(dst), inputs=[whole(src)]) for i in range(64)]
        assert submit(big, *big_reqs) == 64 * 40
        buf = np.ones(4096, dtype=np.uint8)
        for i in range(100):
            assert run(small, request(i, out=whole(buf)))[i].error == 0
        # The big session is still busy: the small ones did not wait behind it.
        with open(mnt / "stats") as f:
            in_flight = json.load(f)["requests"]["in_flight"]
        assert in_flight > 0
        assert all(r.error == 0 for r in collect(big, 64))
        assert bytes(dst[:: 1 << 20]) == bytes(src[:: 1 << 20])
    finally:
        os.close(big)
        os.close(small)


def test_sessions_in_parallel_threads(mnt):
    """Several threads, each with its own session, get their own results."""
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            rng = np.random.default_rng(seed)
            fd = open_session(mnt, "xor3")
            try:
                for i in range(20):
                    size = int(rng.integers(1, 100_000))
                    srcs = [random_bytes(rng, size) for _ in range(3)]
                    out = np.zeros(size, dtype=np.uint8)
                    assert run(fd, request(i, out=cut(out, rng), inputs=[cut(s, rng) for s in srcs]))[i].error == 0
                    assert np.array_equal(out, srcs[0] ^ srcs[1] ^ srcs[2])
            finally:
                os.close(fd)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# -- dmoverfs extensions ------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_fill64(mnt, size):
    rng = np.random.default_rng(size + 4)
    pattern = bytes(rng.integers(0, 256, 8, dtype=np.uint8))
    out = np.zeros(size, dtype=np.uint8)
    fd = open_session(mnt, "fill64")
    try:
        resp = run(fd, request(1, out=cut(out, rng), immediate=pattern))[1]
    finally:
        os.close(fd)
    assert resp.error == 0
    assert bytes(out) == (pattern * (size // 8 + 1))[:size]


@pytest.mark.parametrize("size", [1, 4096, 300_001, 3 << 20])
def test_compare_finds_the_first_difference(mnt, size):
    rng = np.random.default_rng(size + 5)
    a = random_bytes(rng, size)
    b = a.copy()
    where = int(rng.integers(0, size))
    b[where] ^= 0x40
    b[min(size - 1, where + 7)] ^= 0x01  # a later difference must not matter
    twin = a.copy()
    fd = open_session(mnt, "compare")
    try:
        differ = run(fd, request(1, inputs=[cut(a, rng), cut(b, rng)]))[1]
        same = run(fd, request(2, inputs=[cut(a, rng), cut(twin, rng)]))[2]
    finally:
        os.close(fd)
    assert differ.error == 0 and int.from_bytes(differ.immediate, "little") == where
    assert same.error == 0 and same.immediate == b"\xff" * 8


def test_compare_of_unequal_lengths_is_einval(mnt):
    a, b = np.zeros(10, np.uint8), np.zeros(11, np.uint8)
    fd = open_session(mnt, "compare")
    try:
        with pytest.raises(OSError) as info:
            submit(fd, request(1, inputs=[whole(a), whole(b)]))
    finally:
        os.close(fd)
    assert info.value.errno == 22


@pytest.mark.parametrize("size", SIZES)
def test_copy_crc32c_copies_and_checksums(mnt, size):
    rng = np.random.default_rng(size + 6)
    src = random_bytes(rng, size)
    dst = np.zeros(size, dtype=np.uint8)
    seed = google_crc32c.value(b"prefix")
    fd = open_session(mnt, "copy-crc32c")
    try:
        resp = run(fd, request(3, out=cut(dst, rng), inputs=[cut(src, rng)], immediate=seed))[3]
    finally:
        os.close(fd)
    assert resp.error == 0
    assert bytes(dst) == bytes(src)
    assert resp.crc == google_crc32c.value(b"prefix" + bytes(src))
