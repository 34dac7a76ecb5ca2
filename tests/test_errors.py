"""Every error of SPEC.md's semantics, one test each, with its errno."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import numpy as np
import pytest

from dmio import (
    XATTR_FUNCTION,
    XATTR_NONBLOCK,
    collect,
    errno_of,
    open_session,
    parse,
    raw_request,
    request,
    run,
    submit,
    whole,
)

SSIZE_MAX = (1 << 63) - 1
# A page that no process has mapped: the first page of the address space.
UNMAPPED = 0x1000


@pytest.fixture
def session(mnt):
    fds: list[int] = []

    def open_(function: str | None = None, flags: int = os.O_RDWR) -> int:
        fd = open_session(mnt, function, flags)
        fds.append(fd)
        return fd

    yield open_
    for fd in fds:
        os.close(fd)


# -- write and read framing -------------------------------------------------------------


def test_write_shorter_than_a_request_is_einval(session):
    fd = session("zero")
    assert errno_of(os.write, fd, b"\0" * 39) == errno.EINVAL


def test_read_shorter_than_a_response_is_einval(session):
    fd = session("zero")
    assert errno_of(os.read, fd, 15) == errno.EINVAL


def test_write_before_setfunc_is_enxio(session):
    fd = session()
    buf = np.zeros(16, np.uint8)
    assert errno_of(os.write, fd, request(1, out=whole(buf)).packed) == errno.ENXIO


def test_read_before_setfunc_is_enxio(session):
    fd = session()
    assert errno_of(os.read, fd, 16) == errno.ENXIO


def test_zero_length_write_and_read_return_zero(session):
    fd = session("zero")
    assert os.write(fd, b"") == 0
    assert os.read(fd, 0) == b""


# -- DMIO_SETFUNC equivalent ------------------------------------------------------------


def test_unknown_function_is_esrch(session):
    fd = session()
    assert errno_of(os.setxattr, fd, XATTR_FUNCTION, b"no-such-function") == errno.ESRCH


def test_second_setfunc_is_ebusy(session):
    fd = session("zero")
    assert errno_of(os.setxattr, fd, XATTR_FUNCTION, b"copy") == errno.EBUSY
    assert os.getxattr(fd, XATTR_FUNCTION) == b"zero"


def test_getxattr_before_setfunc_is_enodata(session):
    fd = session()
    assert errno_of(os.getxattr, fd, XATTR_FUNCTION) == errno.ENODATA


def test_function_name_is_cut_at_nul_and_at_63_bytes(session):
    fd = session()
    os.setxattr(fd, XATTR_FUNCTION, b"copy\0trailing garbage")
    assert os.getxattr(fd, XATTR_FUNCTION) == b"copy"
    # 63 bytes of a real name are kept, the 64th and later are cut: still unknown.
    fd2 = session()
    assert errno_of(os.setxattr, fd2, XATTR_FUNCTION, b"z" * 63 + b"zero") == errno.ESRCH


def test_bad_nonblock_value_is_einval(session):
    fd = session("zero")
    assert errno_of(os.setxattr, fd, XATTR_NONBLOCK, b"maybe") == errno.EINVAL


def test_unknown_xattr_is_enotsup(session):
    fd = session("zero")
    assert errno_of(os.setxattr, fd, "user.dmover.other", b"1") == errno.EOPNOTSUPP


def test_xattr_on_the_clone_file_itself_is_enotsup(mnt):
    assert errno_of(os.setxattr, mnt / "dmoverio", XATTR_FUNCTION, b"zero") == errno.EOPNOTSUPP


# -- request validation at write time ---------------------------------------------------


def test_iovcnt_over_iov_max_is_einval(session):
    fd = session("zero")
    buf = np.zeros(1025 * 16, np.uint8)  # readable, so only the count is wrong
    assert errno_of(os.write, fd, raw_request(buf.ctypes.data, 1025)) == errno.EINVAL


def test_unreadable_output_iovec_array_is_efault(session):
    fd = session("zero")
    assert errno_of(os.write, fd, raw_request(UNMAPPED, 1)) == errno.EFAULT


def test_unreadable_input_buffer_array_is_efault(session):
    fd = session("copy")
    dst = np.zeros(16, np.uint8)
    good = request(1, out=whole(dst))
    bad = raw_request(int.from_bytes(good.packed[:8], "little"), 1, in_ptr=UNMAPPED)
    assert errno_of(os.write, fd, bad) == errno.EFAULT


def test_unreadable_input_iovec_array_is_efault(session):
    fd = session("copy")
    dst = np.zeros(16, np.uint8)
    req = request(1, out=whole(dst), inputs=[[(UNMAPPED, 16)]])
    # Point the input's dmio_buffer at an unmapped iovec array.
    table = req.keep[-1]
    table[:8] = np.frombuffer(UNMAPPED.to_bytes(8, "little"), np.uint8)
    assert errno_of(os.write, fd, req.packed) == errno.EFAULT


def test_input_without_iovecs_is_einval(session):
    fd = session("copy")
    dst = np.zeros(16, np.uint8)
    assert errno_of(os.write, fd, request(1, out=whole(dst), inputs=[[]]).packed) == errno.EINVAL


def test_length_sum_overflow_is_einval(session):
    fd = session("zero")
    half = 1 << 63
    req = request(1, out=[(UNMAPPED, half), (UNMAPPED, half)])
    assert errno_of(os.write, fd, req.packed) == errno.EINVAL


def test_length_over_ssize_max_is_einval(session):
    fd = session("zero")
    req = request(1, out=[(UNMAPPED, SSIZE_MAX), (UNMAPPED, 1)])
    assert errno_of(os.write, fd, req.packed) == errno.EINVAL


def test_input_length_differs_from_output_is_einval(session):
    fd = session("copy")
    src, dst = np.zeros(100, np.uint8), np.zeros(99, np.uint8)
    assert errno_of(os.write, fd, request(1, out=whole(dst), inputs=[whole(src)]).packed) == errno.EINVAL


def test_xor_inputs_of_different_lengths_are_einval(session):
    fd = session("xor2")
    a, b, out = np.zeros(64, np.uint8), np.zeros(65, np.uint8), np.zeros(64, np.uint8)
    assert errno_of(os.write, fd, request(1, out=whole(out), inputs=[whole(a), whole(b)]).packed) == errno.EINVAL


def test_input_overlapping_output_is_einval(session):
    fd = session("copy")
    buf = np.zeros(200, np.uint8)
    base = buf.ctypes.data
    req = request(1, out=[(base, 50), (base + 100, 100)], inputs=[[(base + 150, 10), (base + 50, 140)]])
    assert errno_of(os.write, fd, req.packed) == errno.EINVAL


def test_adjacent_regions_do_not_overlap(session):
    fd = session("copy")
    buf = np.arange(200, dtype=np.uint8)
    base = buf.ctypes.data
    resp = run(fd, request(1, out=[(base, 100)], inputs=[[(base + 100, 100)]]))[1]
    assert resp.error == 0
    assert bytes(buf[:100]) == bytes(range(100, 200))


def test_invalid_request_after_valid_ones_gives_a_short_write(session):
    fd = session("zero")
    bufs = [np.ones(64, np.uint8) for _ in range(3)]
    good = [request(i, out=whole(b)) for i, b in enumerate(bufs[:2])]
    bad = raw_request(UNMAPPED, 1, req_id=99)
    assert os.write(fd, good[0].packed + good[1].packed + bad) == 80
    responses = collect(fd, 2)
    assert sorted(r.req_id for r in responses) == [0, 1]
    assert all(r.error == 0 for r in responses)
    assert not bufs[0].any() and not bufs[1].any()


# -- errors in responses (execution time) -----------------------------------------------


def test_bad_data_pointer_fails_only_that_request(session):
    fd = session("zero")
    good = np.ones(4096, np.uint8)
    responses = run(fd, request(1, out=whole(good)), request(2, out=[(UNMAPPED, 4096)]), request(3, out=whole(good)))
    assert responses[2].error == errno.EFAULT
    assert responses[1].error == 0 and responses[3].error == 0
    assert not good.any()


def test_faults_in_one_write_of_many_zero_requests_fail_only_their_requests(session):
    # Small zero requests of one write share process_vm_writev calls: a fault
    # must still land on the request that holds the bad byte, and only there.
    mm = mmap.mmap(-1, 2 * mmap.PAGESIZE)
    try:
        page = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        edge = np.frombuffer(mm, np.uint8, count=mmap.PAGESIZE)
        edge[:] = 1
        # Half of this request's output is beyond the end of the mapping.
        ctypes.CDLL(None, use_errno=True).munmap(ctypes.c_void_p(page + mmap.PAGESIZE), mmap.PAGESIZE)
        rng = np.random.default_rng(5)
        bufs = [np.ones(int(rng.integers(1, 5000)), np.uint8) for _ in range(64)]
        outs: list = [whole(b) for b in bufs]
        outs[0] = [(UNMAPPED, 64)]
        outs[17] = [*whole(bufs[17]), (UNMAPPED, 8)]
        outs[40] = [(page + mmap.PAGESIZE - 100, 200)]
        outs[63] = [(UNMAPPED, 1)]
        fd = session("zero")
        responses = run(fd, *(request(i, out=o) for i, o in enumerate(outs)))
        failed = {0, 17, 40, 63}
        assert {i for i, r in responses.items() if r.error} == failed
        assert all(responses[i].error == errno.EFAULT for i in failed)
        assert all(not bufs[i].any() for i in range(64) if i not in failed)
        assert not edge[-100:].any() and edge[:-100].all()
    finally:
        del edge
        mm.close()


def test_unreadable_input_data_is_efault(session):
    fd = session("copy")
    dst = np.ones(4096, np.uint8)
    resp = run(fd, request(1, out=whole(dst), inputs=[[(UNMAPPED, 4096)]]))[1]
    assert resp.error == errno.EFAULT


@pytest.mark.parametrize("func,inputs", [("zero", 0), ("fill8", 0), ("copy", 1), ("xor2", 2), ("xor16", 16)])
def test_missing_output_buffer_is_einval_in_the_response(session, func, inputs):
    fd = session(func)
    srcs = [np.zeros(32, np.uint8) for _ in range(inputs)]
    resp = run(fd, request(1, out=None, inputs=[whole(s) for s in srcs]))[1]
    assert resp.error == errno.EINVAL


def test_output_buffer_for_crc_is_einval_in_the_response(session):
    fd = session("iscsi-crc32c")
    src, out = np.zeros(32, np.uint8), np.zeros(32, np.uint8)
    resp = run(fd, request(1, out=whole(out), inputs=[whole(src)]))[1]
    assert resp.error == errno.EINVAL


# -- non-blocking -----------------------------------------------------------------------


def test_nonblocking_read_with_nothing_ready_is_eagain(session):
    fd = session("zero", os.O_RDWR | os.O_NONBLOCK)
    assert errno_of(os.read, fd, 16) == errno.EAGAIN


def test_nonblock_xattr_makes_reads_eagain(session):
    fd = session("zero")
    os.setxattr(fd, XATTR_NONBLOCK, b"1")
    assert os.getxattr(fd, XATTR_NONBLOCK) == b"1"
    assert errno_of(os.read, fd, 16) == errno.EAGAIN
    os.setxattr(fd, XATTR_NONBLOCK, b"0")
    assert os.getxattr(fd, XATTR_NONBLOCK) == b"0"


def test_nonblocking_read_returns_what_is_ready(session):
    fd = session("zero", os.O_RDWR | os.O_NONBLOCK)
    buf = np.ones(64, np.uint8)
    submit(fd, request(1, out=whole(buf)))
    # Small requests complete before write() returns, so one response is ready.
    responses = parse(os.read(fd, 16 * 8))
    assert [r.req_id for r in responses] == [1]
