"""Shared buffers: memory a client registers so that the server works on it directly.

Every function runs on shared buffers and is checked against independent
oracles (numpy for the data, the google-crc32c package and RFC 3720's
published vectors for CRC32C). The server's ``shared_runs`` counter shows
which path a request took; the remapping test shows it without the counter:
a registration keeps the pages it was made on, so a request on a range the
client has remapped acts on the registered file, not on the new mapping.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from dmoverfs import client
from dmoverfs.wire import XATTR_REGISTER, XATTR_UNREGISTER

XORS = [f"xor{n}" for n in range(2, 17)]
PAGE = mmap.PAGESIZE
#: Limits of the core (csrc/core/shared.c).
SESS_REGS = 64
SESS_BYTES = 16 << 30
USER_REGS = 512
USER_BYTES = 64 << 30
#: RFC 3720, B.4: 32 bytes of zeros, of 0xff, ascending, descending.
RFC3720 = [
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


def shared_runs(mnt: Path) -> int:
    return json.loads((mnt / "stats").read_bytes())["backends"]["builtin"]["shared_runs"]


def array(buf: client.SharedBuffer) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint8)


def fill_random(buf: client.SharedBuffer, seed: int) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, len(buf), dtype=np.uint8)
    array(buf)[:] = data
    return data


def run_one(session: client.Session, **request) -> client.Result:
    session.submit(**request)
    (result,) = session.results(1, timeout=60)
    return result


def shared_pair(session: client.Session, size: int) -> tuple[client.SharedBuffer, client.SharedBuffer]:
    return session.shared_buffer(size), session.shared_buffer(size)


def close_all(*bufs: client.SharedBuffer) -> None:
    for buf in bufs:
        buf.close()


# -- every function on shared buffers -------------------------------------------------------

SIZES = [1, 4096 + 3, 3 << 20, 17 << 20]  # inline, worker, split into parts with two workers


@pytest.mark.parametrize("size", SIZES)
def test_fills_and_copy(mnt, size):
    before = shared_runs(mnt)
    with client.Session(mnt, "zero") as z, client.Session(mnt, "fill8") as f, client.Session(mnt, "copy") as c:
        out = z.shared_buffer(size)
        array(out)[:] = 0x77
        run_one(z, out=out).check()
        assert not array(out).any()
        out.close()
        out = f.shared_buffer(size)
        run_one(f, out=out, immediate=0xA5).check()
        assert (array(out) == 0xA5).all()
        out.close()
        dst, src = shared_pair(c, size)
        data = fill_random(src, size)
        run_one(c, out=dst, inputs=[src]).check()
        assert np.array_equal(array(dst), data)
        close_all(dst, src)
    assert shared_runs(mnt) - before == 3


@pytest.mark.parametrize("size", [8 * 3 + 5, 3 << 20, 17 << 20])
def test_fill64(mnt, size):
    pattern = bytes.fromhex("0102030405060708")
    with client.Session(mnt, "fill64") as s:
        out = s.shared_buffer(size)
        before = shared_runs(mnt)
        # Start at byte 3 of the buffer: the pattern's phase follows the output, not the page.
        run_one(s, out=memoryview(out)[3:], immediate=pattern).check()
        assert shared_runs(mnt) - before == 1
        want = np.frombuffer((pattern * (size // 8 + 1))[: size - 3], dtype=np.uint8)
        assert not array(out)[:3].any()
        assert np.array_equal(array(out)[3:], want)
        out.close()


@pytest.mark.parametrize("func", XORS)
def test_xor_against_numpy(mnt, func):
    n = int(func[3:])
    size = (5 << 20) + 7  # split into parts with two workers, and a tail beyond the vector width
    with client.Session(mnt, func) as s:
        out = s.shared_buffer(size)
        ins = [s.shared_buffer(size) for _ in range(n)]
        want = np.zeros(size, dtype=np.uint8)
        for i, buf in enumerate(ins):
            want ^= fill_random(buf, 100 + i)
        before = shared_runs(mnt)
        run_one(s, out=out, inputs=ins).check()
        assert shared_runs(mnt) - before == 1
        assert np.array_equal(array(out), want)
        # Unaligned operands go through the kernel's alignment another way: same result.
        run_one(s, out=memoryview(out)[1 : size - 2], inputs=[memoryview(b)[3:] for b in ins]).check()
        want2 = np.zeros(size - 3, dtype=np.uint8)
        for buf in ins:
            want2 ^= array(buf)[3:]
        assert np.array_equal(array(out)[1 : size - 2], want2)
        close_all(out, *ins)


@pytest.mark.parametrize("size", [1, 100, 4096 * 3 + 1, 9 << 20, (33 << 20) + 5])
def test_crc32c_against_google_crc32c(mnt, size):
    with client.Session(mnt, "iscsi-crc32c") as s:
        buf = s.shared_buffer(size)
        data = fill_random(buf, size)
        seed = 0x12345678
        before = shared_runs(mnt)
        result = run_one(s, inputs=[buf], immediate=seed).check()
        assert shared_runs(mnt) - before == 1
        assert result.crc == google_crc32c.extend(seed, data.tobytes())
        buf.close()


def test_crc32c_published_vectors(mnt):
    with client.Session(mnt, "iscsi-crc32c") as s:
        buf = s.shared_buffer(32)
        for data, crc in RFC3720:
            buf[:] = data
            assert run_one(s, inputs=[buf]).check().crc == crc
        buf.close()


@pytest.mark.parametrize("size", [4096 + 1, 13 << 20])
def test_copy_crc32c_and_compare(mnt, size):
    with client.Session(mnt, "copy-crc32c") as cc, client.Session(mnt, "compare") as cmp:
        dst, src = shared_pair(cc, size)
        data = fill_random(src, 7)
        before = shared_runs(mnt)
        result = run_one(cc, out=dst, inputs=[src]).check()
        assert result.crc == google_crc32c.value(data.tobytes())
        assert np.array_equal(array(dst), data)
        a, b = shared_pair(cmp, size)
        array(a)[:] = data
        array(b)[:] = data
        assert run_one(cmp, inputs=[a, b]).check().value == (1 << 64) - 1  # equal
        for at in (size - 1, size // 2 + 1, 0):  # the first difference wins, whichever part finds it
            array(b)[at] ^= 0xFF
        assert run_one(cmp, inputs=[a, b]).check().value == 0
        array(b)[0] ^= 0xFF
        assert run_one(cmp, inputs=[a, b]).check().value == size // 2 + 1
        assert shared_runs(mnt) - before == 4
        close_all(dst, src, a, b)


# -- mixing shared and unshared memory --------------------------------------------------


def test_scatter_gather_mixing_shared_and_unshared(mnt):
    size = 1 << 20
    with client.Session(mnt, "xor3") as s:
        shared = [s.shared_buffer(size) for _ in range(3)]
        plain = [bytearray(size) for _ in range(3)]
        want = np.zeros(2 * size, dtype=np.uint8)
        for i in range(3):
            data = np.random.default_rng(i).integers(0, 256, 2 * size, dtype=np.uint8)
            array(shared[i])[:] = data[:size]
            plain[i][:] = data[size:].tobytes()
            want ^= data
        out_shared, out_plain = s.shared_buffer(size), bytearray(size)
        before = shared_runs(mnt)
        # Each list: a shared half, then an unshared one, cut at different places.
        result = run_one(
            s,
            out=[memoryview(out_shared)[:1000], memoryview(out_shared)[1000:], out_plain],
            inputs=[[shared[i], plain[i]] for i in range(3)],
        )
        result.check()
        assert shared_runs(mnt) == before  # not all shared: the ordinary path
        assert np.array_equal(array(out_shared), want[:size])
        assert np.array_equal(np.frombuffer(out_plain, dtype=np.uint8), want[size:])
        close_all(out_shared, *shared)


def test_a_buffer_of_another_session_is_not_shared_here(mnt):
    with client.Session(mnt, "copy") as a, client.Session(mnt, "copy") as b:
        dst, src = shared_pair(a, 1 << 20)
        data = fill_random(src, 3)
        before = shared_runs(mnt)
        run_one(b, out=dst, inputs=[src]).check()
        assert shared_runs(mnt) == before
        assert np.array_equal(array(dst), data)
        close_all(dst, src)


# -- registration errors ------------------------------------------------------------------


def register(session: client.Session, fd: int, offset: int, addr: int, length: int) -> None:
    os.setxattr(session.fileno(), XATTR_REGISTER, f"{fd} {offset} {addr} {length}".encode())


def address(buf) -> int:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


def errno_of(fn, *args) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno


@pytest.fixture
def memfd():
    fd = os.memfd_create("test-shared", os.MFD_CLOEXEC)
    os.ftruncate(fd, 16 * PAGE)
    yield fd
    os.close(fd)


def test_registration_errors(mnt, memfd, tmp_path):
    with client.Session(mnt, "copy") as s:
        m = mmap.mmap(memfd, 8 * PAGE, flags=mmap.MAP_SHARED, offset=4 * PAGE)
        addr = address(m)
        # Malformed values, and numbers no mapping can have.
        for value in (b"", b"1 2 3", b"a b c d", b"1 2 3 4 5", b"-1 0 4096 4096"):
            assert errno_of(os.setxattr, s.fileno(), XATTR_REGISTER, value) == errno.EINVAL
        assert errno_of(register, s, memfd, 4 * PAGE, addr + 1, PAGE) == errno.EINVAL  # not page-aligned
        assert errno_of(register, s, memfd, 4 * PAGE, addr, 0) == errno.EINVAL
        # Mapped, but from another offset of the file.
        assert errno_of(register, s, memfd, 0, addr, PAGE) == errno.EINVAL
        # Beyond the mapping (what follows it is not that file), and nothing mapped at all.
        assert errno_of(register, s, memfd, 4 * PAGE, addr, 9 * PAGE) == errno.EFAULT
        anon = mmap.mmap(-1, PAGE)
        assert errno_of(register, s, memfd, 0, address(anon), PAGE) == errno.EFAULT
        # A descriptor this process does not have.
        assert errno_of(register, s, 987654, 4 * PAGE, addr, PAGE) == errno.EBADF
        # A file that is not shared memory.
        disk = tmp_path / "disk"
        disk.write_bytes(bytes(PAGE))
        with open(disk, "r+b") as f:
            dm = mmap.mmap(f.fileno(), PAGE, flags=mmap.MAP_SHARED)
            assert errno_of(register, s, f.fileno(), 0, address(dm), PAGE) == errno.EINVAL
            dm.close()
        # A private mapping of the right file, and a read-only shared one.
        priv = mmap.mmap(memfd, PAGE, flags=mmap.MAP_PRIVATE)
        assert errno_of(register, s, memfd, 0, address(priv), PAGE) == errno.EACCES
        ro = mmap.mmap(memfd, PAGE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        assert errno_of(register, s, memfd, 0, address(ro), PAGE) == errno.EACCES
        # The right one works once; the same range again overlaps it.
        register(s, memfd, 4 * PAGE, addr, 8 * PAGE)
        assert errno_of(register, s, memfd, 4 * PAGE + PAGE, addr + PAGE, PAGE) == errno.EEXIST
        # Unregistering: only what was registered, exactly.
        assert errno_of(os.setxattr, s.fileno(), XATTR_UNREGISTER, f"{addr} {PAGE}".encode()) == errno.ENOENT
        os.setxattr(s.fileno(), XATTR_UNREGISTER, f"{addr} {8 * PAGE}".encode())
        assert errno_of(os.setxattr, s.fileno(), XATTR_UNREGISTER, f"{addr} {8 * PAGE}".encode()) == errno.ENOENT
        for mapping in (m, anon, priv, ro):
            mapping.close()


def test_session_limits(mnt, memfd):
    with client.Session(mnt, "copy") as s:
        bufs = [s.shared_buffer(PAGE) for _ in range(SESS_REGS)]
        with pytest.raises(OSError) as info:
            s.shared_buffer(PAGE)
        assert info.value.errno == errno.ENOSPC
        bufs.pop().close()  # room for one again
        bufs.append(s.shared_buffer(PAGE))
        close_all(*bufs)
    # Bytes: sparse memfds, never touched, cost no memory.
    with client.Session(mnt, "copy") as s:
        big = s.shared_buffer(SESS_BYTES - PAGE)
        with pytest.raises(OSError) as info:
            s.shared_buffer(2 * PAGE)
        assert info.value.errno == errno.ENOSPC
        small = s.shared_buffer(PAGE)
        close_all(big, small)


def test_user_byte_limit(mnt):
    sessions = [client.Session(mnt, "copy") for _ in range(USER_BYTES // SESS_BYTES + 1)]
    bufs = []
    try:
        for s in sessions[:-1]:
            bufs.append(s.shared_buffer(SESS_BYTES))
        with pytest.raises(OSError) as info:
            sessions[-1].shared_buffer(PAGE)
        assert info.value.errno == errno.ENOSPC
        # Closing a session gives its registrations back.
        sessions[0].close()
        bufs.append(sessions[-1].shared_buffer(PAGE))
    finally:
        for s in sessions:
            s.close()
        close_all(*bufs)


def test_user_count_limit(mnt):
    sessions = [client.Session(mnt, "copy") for _ in range(USER_REGS // SESS_REGS + 1)]
    bufs = []
    try:
        for s in sessions[:-1]:
            bufs += [s.shared_buffer(PAGE) for _ in range(SESS_REGS)]
        with pytest.raises(OSError) as info:
            sessions[-1].shared_buffer(PAGE)
        assert info.value.errno == errno.ENOSPC
        bufs.pop().close()  # one given back: room for one
        bufs.append(sessions[-1].shared_buffer(PAGE))
    finally:
        close_all(*bufs)
        for s in sessions:
            s.close()


# -- whose memory: remapping, a forked child, an exec'd image -------------------------------

#: What sharer.c's memory holds (tests/programs/writer.h).
FILLED, OPENER, OTHER = "5a", "50", "c3"
STEP_S = 30.0


@pytest.fixture
def rescue(server):
    """The test's programs, killed (and the mount aborted if it stops answering) at the end."""
    from programs import Rescue

    guard = Rescue()
    guard.watch(server.mountpoint, probe=server.mountpoint / "stats")
    yield guard
    problems = guard.close()
    assert not problems, problems


def sharer(rescue, programs, mnt: Path, mode: str, size: int):  # noqa: ANN201 - a programs.Child
    child = rescue.spawn([programs("sharer"), mnt, mode, str(size)])
    assert child.expect("registered", STEP_S) == "registered 0"
    return child


#: sharer.c's modes: the lines each must print after registering, and the requests run on shared memory.
WHOSE = {
    # The server works on the pages registered, not on what the process mapped there since.
    "remap": ([f"self result 0 mapping {OTHER} file {FILLED}"], 1),
    # A forked child's request acts on the child's own memory; the parent's still uses its registration.
    "fork": ([f"child result 0 mapping {FILLED} file {OPENER}", f"parent result 0 mapping {FILLED} file {FILLED}"], 1),
    # An exec'd image's request acts on the new image's memory: the old registration is gone with its space.
    "exec": ([f"image result 0 mapping {FILLED} file {OPENER}"], 0),
}


@pytest.mark.parametrize("size", [PAGE, 8 << 20])
@pytest.mark.parametrize("mode", list(WHOSE))
def test_whose_memory_a_registration_serves(mnt, rescue, programs, mode, size):
    lines, runs = WHOSE[mode]
    before = shared_runs(mnt)
    child = sharer(rescue, programs, mnt, mode, size)
    for line in lines:
        assert child.expect(line.split()[0], STEP_S) == line
    assert child.reap(STEP_S)
    assert shared_runs(mnt) - before == runs


# -- unregistering, truncating, another process's descriptor --------------------------------


def test_unregistering_with_requests_in_flight(mnt):
    size, count = 32 << 20, 8
    with client.Session(mnt, "copy") as s:
        src = s.shared_buffer(size)
        dsts = [s.shared_buffer(size) for _ in range(count)]
        data = fill_random(src, 11)
        before = shared_runs(mnt)
        for dst in dsts:
            s.submit(dst, inputs=[src])
        # While they run: the registrations go (the buffers stay mapped here).
        for buf in (src, *dsts):
            os.setxattr(s.fileno(), XATTR_UNREGISTER, f"{buf.address} {size}".encode())
        for result in s.results(count, timeout=120):
            result.check()
        assert shared_runs(mnt) - before == count
        for dst in dsts:
            assert np.array_equal(array(dst), data)
        # From now on the same buffers take the ordinary path, with the same result.
        array(dsts[0])[:] = 0
        run_one(s, out=dsts[0], inputs=[src]).check()
        assert shared_runs(mnt) - before == count
        assert np.array_equal(array(dsts[0]), data)
        for buf in (src, *dsts):
            buf.session = None  # unregistered already
            buf.close()


def test_truncated_file_fails_the_request_not_the_server(mnt, memfd):
    size = 16 * PAGE
    with client.Session(mnt, "fill8") as s:
        m = mmap.mmap(memfd, size, flags=mmap.MAP_SHARED)
        register(s, memfd, 0, address(m), size)
        os.ftruncate(memfd, 0)  # the pages are gone: an access now faults
        result = run_one(s, out=memoryview(m)[PAGE:], immediate=1)
        assert result.error == errno.EFAULT
        os.ftruncate(memfd, size)
        run_one(s, out=m, immediate=7).check()
        assert m[:] == b"\x07" * size
        m.close()


def test_another_processs_descriptor_is_never_reached(mnt, tmp_path):
    """The numbers name the setting process's descriptor and memory, never another's."""
    code = (
        "import mmap, os, sys, numpy as np\n"
        "fd = os.memfd_create('other'); os.ftruncate(fd, 4096); os.dup2(fd, 900)\n"
        "m = mmap.mmap(900, 4096, flags=mmap.MAP_SHARED)\n"
        "print(np.frombuffer(m, dtype=np.uint8).ctypes.data, flush=True); sys.stdin.read()\n"
    )
    other = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        addr = int(other.stdout.readline())
        with client.Session(mnt, "copy") as s:
            assert errno_of(register, s, 900, 0, addr, PAGE) == errno.EBADF  # not ours: we have no 900
            mine = os.memfd_create("mine")
            os.ftruncate(mine, PAGE)
            os.dup2(mine, 900)
            try:
                # Our own 900, but the address is not where we map it.
                assert errno_of(register, s, 900, 0, addr, PAGE) == errno.EFAULT
            finally:
                os.close(900)
                os.close(mine)
    finally:
        other.stdin.close()
        other.wait(30)
