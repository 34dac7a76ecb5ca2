"""The core's scheduler, driven through cffi with no mount: long requests run in slices
that keep their results exact, workers turn to other sessions and users between slices
(deficit round robin), a write's decoding is bounded per step, and the per-user caps.

Order, not time, is what these tests look at: which request completes while which is
still running, and how many slices the workers ran meanwhile (``slices`` in the stats).
"""

from __future__ import annotations

import errno
import os

import google_crc32c
import numpy as np
import pytest

from core_harness import IOV_MAX, Core, Mem, build_core_module, core_factory, core_module, until, whole

CHUNK = 4160  # no power of two: slice edges fall everywhere in the lists
#: The "attack" of the worker monopoly: a zero whose output lists one region IOV_MAX times.
REGION = 8 << 20


@pytest.fixture(scope="module")
def cm(tmp_path_factory):
    return core_module(build_core_module(tmp_path_factory))


@pytest.fixture
def make_core(cm):
    """Factory of cores; a test's buffers (core.mem) outlive the workers still zeroing them."""
    with core_factory(cm) as make:
        yield make


def le32(v: int) -> bytes:
    return v.to_bytes(4, "little")


def scattered(mem: Mem, data: np.ndarray, rng: np.random.Generator, pieces: int = 300) -> list[tuple[int, int]]:
    """*data* (kept alive by the caller) as a list of *pieces* segments, zero-length ones included."""
    cuts = np.sort(rng.integers(0, data.nbytes + 1, pieces - 1))
    bounds = [0, *cuts.tolist(), data.nbytes]
    return [(data.ctypes.data + a, b - a) for a, b in zip(bounds, bounds[1:])]


def monopoly(mem: Mem, region: np.ndarray, req_id: int) -> bytes:
    """A zero request of IOV_MAX x the region: far more work than any test waits for."""
    return mem.request(out=whole(region) * IOV_MAX, req_id=req_id)


# --- slices keep results exact ---------------------------------------------------


@pytest.mark.parametrize("slice_chunks", [1, 3])
def test_every_function_is_exact_across_slices(make_core, slice_chunks):
    """A worker runs a request a slice at a time: patterns keep their phase, a CRC its order, and
    compare reports the offset of a difference found in a late slice (oracles: numpy, google_crc32c)."""
    rng = np.random.default_rng(13)
    core = make_core(workers=1, chunk=CHUNK, inline=0, slice_bytes=slice_chunks * CHUNK)
    mem = core.mem
    n = 40 * CHUNK + 4097  # 40 or 14 slices, the last a partial one
    srcs = [mem.buf(rng.integers(0, 256, n, dtype=np.uint8).tobytes()) for _ in range(16)]

    def run(func: str, reqs: list[bytes]):
        s = core.session(func)
        return s.run(reqs)

    out = mem.buf(n)
    assert run("fill8", [mem.request(out=scattered(mem, out, rng), imm=b"\x5a", req_id=1)])[1].error == 0
    assert (out == 0x5A).all()

    pattern = bytes(range(1, 9))
    out = mem.buf(n)
    assert run("fill64", [mem.request(out=scattered(mem, out, rng), imm=pattern, req_id=1)])[1].error == 0
    assert out.tobytes() == (pattern * (n // 8 + 1))[:n]

    out = mem.buf(n)
    out[:] = 0xFF
    assert run("zero", [mem.request(out=scattered(mem, out, rng), req_id=1)])[1].error == 0
    assert not out.any()

    out = mem.buf(n)
    assert run("copy", [mem.request(out=scattered(mem, out, rng), ins=[scattered(mem, srcs[0], rng)], req_id=1)])[1].error == 0
    assert (out == srcs[0]).all()

    out = mem.buf(n)
    ins = [scattered(mem, s, rng) for s in srcs]
    assert run("xor16", [mem.request(out=scattered(mem, out, rng), ins=ins, req_id=1)])[1].error == 0
    assert (out == np.bitwise_xor.reduce(np.stack(srcs))).all()

    seed = 0x12345678
    r = run("iscsi-crc32c", [mem.request(ins=[scattered(mem, srcs[1], rng)], imm=le32(seed), req_id=1)])[1]
    assert (r.error, r.imm[:4]) == (0, le32(google_crc32c.extend(seed, srcs[1].tobytes())))

    out = mem.buf(n)
    r = run("copy-crc32c", [mem.request(out=scattered(mem, out, rng), ins=[scattered(mem, srcs[2], rng)], req_id=1)])[1]
    assert (r.error, r.imm[:4]) == (0, le32(google_crc32c.value(srcs[2].tobytes())))
    assert (out == srcs[2]).all()

    other = mem.buf(srcs[3].tobytes())
    other[n - 5] ^= 1  # in the last slice
    reqs = [
        mem.request(ins=[scattered(mem, srcs[3], rng), scattered(mem, other, rng)], req_id=1),
        mem.request(ins=[scattered(mem, srcs[4], rng), scattered(mem, srcs[4], rng)], req_id=2),
    ]
    got = run("compare", reqs)
    assert got[1].imm == (n - 5).to_bytes(8, "little")
    assert got[2].imm == b"\xff" * 8
    assert core.stats()[0]["slices"] >= 9 * (n // (slice_chunks * CHUNK))


def test_a_closed_sessions_sliced_request_ends_at_its_next_slice(make_core):
    """Closing a session ends its long request at the next transfer: the worker is free again."""
    core = make_core(workers=1, chunk=256 << 10, slice_bytes=1 << 20)
    mem = core.mem
    region = mem.buf(REGION)
    attacker = core.session("zero")
    assert attacker.submit([monopoly(mem, region, 1)]) == (1, 0)
    until(lambda: core.stats()[0]["slices"] > 2, "the long request never started")
    attacker.close()
    victim = core.session("copy")
    src, dst = mem.buf(b"x" * 4096 * 100), mem.buf(4096 * 100)
    assert victim.run([mem.request(out=whole(dst), ins=[whole(src)], req_id=7)])[7].error == 0
    core.wait_idle()


# --- deficit round robin -----------------------------------------------------------


#: Slices the others may run before a newcomer's turn.  Each user or session ahead of it runs
#: for a quantum of worker time (1 ms), some tens of 1 MiB zero slices; without the scheduler
#: it is the whole attack: thousands.
TURN_SLICES_MAX = 100


def victim_copy(core: Core, mem: Mem, uid: int = 0, size: int = 1 << 20) -> int:
    """Run a 1 MiB copy on a new session of *uid*; how many slices the worker ran meanwhile
    (its own included).  With one worker nothing else runs while the copy does, so this
    counts what ran before its turn."""
    src = mem.buf(np.arange(size, dtype=np.uint32).astype(np.uint8).tobytes())
    dst = mem.buf(size)
    victim = core.session("copy", uid=uid)
    # The worker goes on with the attack while this thread wakes up to read the counter: it
    # runs real-time meanwhile, so that what is counted is the wait, not this thread's own.
    normal = os.sched_getparam(0)
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    try:
        before = core.stats()[0]["slices"]
        assert victim.run([mem.request(out=whole(dst), ins=[whole(src)], req_id=99)])[99].error == 0
        between = core.stats()[0]["slices"] - before
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, normal)
    assert (dst == src).all()
    return between


def test_a_victim_runs_between_the_slices_of_a_worker_monopoly(make_core):
    """Two requests of 8 GiB of work each hold the worker; a 1 MiB copy of another session
    submitted after them gets its turn after a quantum of each, while both are still running."""
    core = make_core(workers=1, chunk=256 << 10, slice_bytes=1 << 20, inline=0)
    mem = core.mem
    region = mem.buf(REGION)
    attackers = [core.session("zero") for _ in range(2)]
    for i, s in enumerate(attackers):
        assert s.submit([monopoly(mem, region, i)]) == (1, 0)
    until(lambda: core.stats()[0]["slices"] >= 4, "the attackers never started")
    between = victim_copy(core, mem)
    assert [s.counts() for s in attackers] == [(1, 0), (1, 0)], "an attacker's request finished first"
    assert between <= TURN_SLICES_MAX, f"{between} slices ran before a 1 MiB copy's turn"


def test_without_slices_a_monopoly_holds_the_workers(make_core):
    """The same attack with slice_bytes 0 (whole requests, first come first served): the victim
    waits behind a whole attacking request.  This is what the scheduler's slices prevent."""
    core = make_core(workers=1, chunk=256 << 10, slice_bytes=0, inline=0)
    mem = core.mem
    region = mem.buf(1 << 20)
    attacker = core.session("zero")
    # 1 MiB x 1024 = 1 GiB: long enough to be seen, short enough to wait for.
    assert attacker.submit([monopoly(mem, region, 1)]) == (1, 0)
    victim_copy(core, mem)
    assert attacker.counts() == (1, 1), "without slices the victim completed before the whole attacking request"
    assert core.stats()[0]["slices"] == 2


def test_users_share_the_workers_before_their_sessions_do(make_core):
    """User A has 600 sessions, each with a long request; user B's copy waits for user A's turn
    to end (a quantum), not for a turn of each of A's sessions (600 quanta)."""
    core = make_core(workers=1, chunk=256 << 10, slice_bytes=1 << 20, inline=0)
    mem = core.mem
    region = mem.buf(REGION)
    attackers = [core.session("zero", uid=1000) for _ in range(600)]
    for i, s in enumerate(attackers):
        assert s.submit([monopoly(mem, region, i)]) == (1, 0)
    until(lambda: core.stats()[0]["slices"] >= 40, "the attackers never started")
    between = victim_copy(core, mem, uid=0)
    assert between <= TURN_SLICES_MAX, f"{between} slices of user A's sessions ran before user B's turn"
    queued = {u["uid"]: u["queued"] for u in core.users()}
    assert queued[1000] >= 590 and queued.get(0, 0) == 0


# --- per-user caps --------------------------------------------------------------------


def test_a_user_at_its_session_cap_is_enfile_others_are_not(make_core):
    core = make_core(max_sessions=6, max_user_sessions=3)
    for _ in range(3):
        core.session("zero", uid=1000)
    with pytest.raises(OSError) as exc:
        core.session("zero", uid=1000)
    assert exc.value.errno == errno.ENFILE
    for _ in range(3):
        core.session("zero", uid=1001)
    with pytest.raises(OSError) as exc:
        core.session("zero", uid=1002)  # the global cap still holds
    assert exc.value.errno == errno.ENFILE
    stats = core.stats()[0]
    assert (stats["refused_user_limits"], stats["refused_limits"], stats["users"]) == (1, 1, 2)
    assert {u["uid"]: (u["sessions"], u["refused"]) for u in core.users()} == {1000: (3, 1), 1001: (3, 0)}
    # A closed session makes room for its user again.
    core.sessions[0].close()
    core.session("zero", uid=1000)


def test_a_user_at_its_request_cap_is_eagain_others_are_not(make_core):
    core = make_core(max_requests=100, max_user_requests=8)
    mem = core.mem
    buf = mem.buf(64)
    a, b = core.session("zero", uid=1000), core.session("zero", uid=1001)
    reqs = [mem.request(out=whole(buf), req_id=i) for i in range(12)]
    assert a.submit(reqs) == (8, errno.EAGAIN)  # outstanding until their responses are taken
    assert b.submit(reqs) == (8, errno.EAGAIN)
    a.wait(8)
    assert len(a.take()) == 8
    assert a.submit(reqs[:3]) == (3, 0)
    assert {u["uid"]: u["outstanding"] for u in core.users()} == {1000: 3, 1001: 8}


def test_a_user_at_its_metadata_cap_is_eagain_others_are_not(make_core):
    """Metadata is held by requests on workers: long ones, so that it stays held."""
    core = make_core(workers=1, inline=0, max_user_meta_bytes=40000, slice_bytes=1 << 20)
    mem = core.mem
    region = mem.buf(1 << 20)
    a, b = core.session("zero", uid=1000), core.session("zero", uid=1001)
    reqs = [monopoly(mem, region, i) for i in range(3)]  # 16 KiB of iovecs each
    assert a.submit(reqs) == (2, errno.EAGAIN)
    assert b.submit(reqs[:2]) == (2, 0)
    held = {u["uid"]: u["meta_bytes"] for u in core.users()}
    assert 2 * IOV_MAX * 16 <= held[1000] <= 40000 and 2 * IOV_MAX * 16 <= held[1001] <= 40000
    assert core.stats()[0]["refused_user_limits"] == 1
