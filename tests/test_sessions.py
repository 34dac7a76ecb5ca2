"""Sessions: clone opens, func/NAME, re-opens, many at once, close in flight, no leaks."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
import time
from pathlib import Path

import numpy as np

from dmio import XATTR_FUNCTION, collect, errno_of, open_session, request, run, submit, wait_for, whole


def read_stats(mnt: Path) -> dict:
    with open(mnt / "stats") as f:
        return json.load(f)


def test_mount_layout(mnt):
    assert sorted(os.listdir(mnt)) == ["dmoverio", "func", "stats"]
    assert stat.S_ISREG(os.stat(mnt / "dmoverio").st_mode)
    assert stat.S_ISDIR(os.stat(mnt / "func").st_mode)
    assert stat.S_IMODE(os.stat(mnt / "stats").st_mode) == 0o444


def test_every_open_is_a_session_with_its_own_inode(mnt):
    fds = [open_session(mnt) for _ in range(5)]
    try:
        inodes = {os.fstat(fd).st_ino for fd in fds}
    finally:
        for fd in fds:
            os.close(fd)
    assert len(inodes) == 5


def test_session_attributes(mnt):
    before = time.time_ns()
    fd = open_session(mnt, "zero")
    try:
        st = os.fstat(fd)
        assert st.st_uid == os.getuid() and st.st_gid == os.getgid()
        assert before - 10**9 <= st.st_ctime_ns <= time.time_ns()
        buf = np.ones(8, np.uint8)
        submit(fd, request(1, out=whole(buf)))
        after_write = os.fstat(fd)
        assert after_write.st_mtime_ns >= st.st_ctime_ns
        collect(fd, 1)
        after_read = os.fstat(fd)
        assert after_read.st_atime_ns >= after_write.st_mtime_ns
        assert after_read.st_ctime_ns == st.st_ctime_ns
    finally:
        os.close(fd)


def test_sessions_are_independent(mnt):
    a, b = open_session(mnt, "zero"), open_session(mnt, "fill8")
    try:
        x, y = np.ones(100, np.uint8), np.zeros(100, np.uint8)
        submit(a, request(1, out=whole(x)))
        submit(b, request(2, out=whole(y), immediate=7))
        assert [r.req_id for r in collect(b, 1)] == [2]
        assert [r.req_id for r in collect(a, 1)] == [1]
        assert not x.any() and (y == 7).all()
    finally:
        os.close(a)
        os.close(b)


def test_func_name_opens_with_the_function_selected(mnt):
    fd = os.open(mnt / "func" / "copy", os.O_RDWR)
    try:
        assert os.getxattr(fd, XATTR_FUNCTION) == b"copy"
        assert errno_of(os.setxattr, fd, XATTR_FUNCTION, b"zero") == errno.EBUSY
        src, dst = np.arange(50, dtype=np.uint8), np.zeros(50, np.uint8)
        assert run(fd, request(1, out=whole(dst), inputs=[whole(src)]))[1].error == 0
        assert bytes(dst) == bytes(src)
    finally:
        os.close(fd)


def test_unknown_func_name_is_enoent(mnt):
    assert errno_of(os.open, mnt / "func" / "nope", os.O_RDWR) == errno.ENOENT


def test_reopen_through_proc_attaches_to_the_same_session(mnt):
    fd = open_session(mnt, "zero")
    try:
        again = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            assert os.fstat(again).st_ino == os.fstat(fd).st_ino
            assert os.getxattr(again, XATTR_FUNCTION) == b"zero"
            buf = np.ones(10, np.uint8)
            submit(fd, request(5, out=whole(buf)))
            assert [r.req_id for r in collect(again, 1)] == [5]
        finally:
            os.close(again)
        # The session outlives one of its two opens.
        buf = np.ones(10, np.uint8)
        assert run(fd, request(6, out=whole(buf)))[6].error == 0
    finally:
        os.close(fd)


def test_many_sessions_at_once(mnt):
    fds = [open_session(mnt, "fill8") for _ in range(300)]
    bufs = [np.zeros(64, np.uint8) for _ in fds]
    try:
        for i, (fd, buf) in enumerate(zip(fds, bufs)):
            submit(fd, request(i, out=whole(buf), immediate=i % 256))
        for i, fd in enumerate(fds):
            assert [r.req_id for r in collect(fd, 1)] == [i]
    finally:
        for fd in fds:
            os.close(fd)
    assert all((buf == i % 256).all() for i, buf in enumerate(bufs))


def test_close_with_requests_in_flight_frees_everything(mnt):
    baseline = read_stats(mnt)
    src = np.ones(32 << 20, np.uint8)
    dst = np.zeros(32 << 20, np.uint8)
    for _ in range(3):
        fd = open_session(mnt, "copy")
        submit(fd, *[request(i, out=whole(dst), inputs=[whole(src)]) for i in range(8)])
        os.close(fd)  # responses never read

    def settled() -> bool:
        now = read_stats(mnt)
        return (
            now["sessions"]["open"] == baseline["sessions"]["open"]
            and now["requests"]["outstanding"] == 0
            and now["requests"]["in_flight"] == 0
            and now["requests"]["metadata_bytes"] == 0
        )

    assert wait_for(settled), read_stats(mnt)
    # The server is fine afterwards.
    fd = open_session(mnt, "zero")
    try:
        assert run(fd, request(1, out=whole(np.ones(8, np.uint8))))[1].error == 0
    finally:
        os.close(fd)


def test_open_close_does_not_leak_sessions_or_inodes(mnt):
    for _ in range(200):
        os.close(open_session(mnt, "zero"))
    stats = read_stats(mnt)
    assert stats["sessions"]["open"] == 0
    # Forgotten inodes are freed: the count does not grow with the opens.
    assert stats["inodes"] < 50, stats["inodes"]


def test_concurrent_opens_never_share_a_session(mnt):
    inodes: list[int] = []
    lock = threading.Lock()

    def opener() -> None:
        fds = [open_session(mnt) for _ in range(50)]
        with lock:
            inodes.extend(os.fstat(fd).st_ino for fd in fds)
        for fd in fds:
            os.close(fd)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(inodes) == 200 and len(set(inodes)) == 200


def test_stats_is_json_with_the_counters(mnt):
    fd = open_session(mnt, "zero")
    try:
        run(fd, request(1, out=whole(np.ones(100, np.uint8))))
        stats = read_stats(mnt)
    finally:
        os.close(fd)
    assert stats["sessions"]["open"] >= 1
    assert stats["functions"]["zero"]["completed"] >= 1
    assert stats["functions"]["zero"]["bytes"] >= 100
    assert stats["limits"]["queue_depth"] == 64
    assert stats["server"]["pid"] > 0
    assert {"outstanding", "in_flight", "queue_waits"} <= set(stats["requests"])


def test_stats_is_read_only(mnt):
    assert errno_of(os.open, mnt / "stats", os.O_WRONLY) == errno.EACCES
    assert errno_of(os.open, mnt / "newfile", os.O_CREAT | os.O_WRONLY) == errno.EPERM


def test_server_xattr_names_the_server(server, mnt):
    fd = open_session(mnt)
    try:
        assert os.getxattr(fd, "user.dmover.server") == str(server.pid).encode()
        assert "user.dmover.server" in os.listxattr(fd)
        assert errno_of(os.setxattr, fd, "user.dmover.server", b"1") == errno.EPERM
    finally:
        os.close(fd)
