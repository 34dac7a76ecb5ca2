"""The per-session view: ``stats`` lists open sessions, ``dmoverfs status --sessions`` shows them.

Sessions are opened by separate client processes, each doing known work
(requests completed, failed, left outstanding, the nonblock attribute set).
Oracles: what each process did and reports (its pid, its byte counts),
``/proc/PID/comm`` read here, and the clock around the calls.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

from test_status import Watcher

from dmio import stats

#: A client process: does the work its arguments ask for, prints "ready", waits for stdin to close.
CLIENT = """
import os, sys
from dmoverfs import client
mnt, function, size, done, failing, pending, nonblock = sys.argv[1:]
s = client.Session(mnt, function)
if nonblock == "1":
    os.setxattr(s.fileno(), "user.dmover.nonblock", b"1")
keep = [bytearray(int(size)) for _ in range(int(done) + int(pending))]
for buf in keep[: int(done)]:
    s.submit(buf, immediate=1)
for _ in range(int(failing)):
    s.submit(None)  # no output for a function that needs one: fails with EINVAL, as a result
for result in s.results(int(done) + int(failing), timeout=30):
    pass
for buf in keep[int(done):]:
    s.submit(buf, immediate=2)  # left outstanding: their results are never read
print("ready", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def clients(mnt, *specs: tuple) -> Iterator[list[subprocess.Popen]]:
    """One process per spec (function, size, done, failing, pending, nonblock), each holding its session open."""
    procs: list[subprocess.Popen] = []
    try:
        for spec in specs:
            proc = subprocess.Popen(
                [sys.executable, "-c", CLIENT, str(mnt), *map(str, spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append(proc)
            line = proc.stdout.readline()
            assert line == "ready\n", proc.stderr.read()
        yield procs
    finally:
        for proc in procs:
            proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def comm(pid: int) -> str:
    return open(f"/proc/{pid}/comm").read().strip()


def test_stats_lists_each_session_of_each_process(mnt):
    before = time.time()
    specs = [("fill8", 4096, 3, 0, 0, 0), ("zero", 1000, 1, 2, 0, 0), ("fill8", 512, 0, 0, 2, 1)]
    with clients(mnt, *specs) as procs:
        time.sleep(0.2)  # the sessions age; the last activity stays where it was
        data = stats(mnt)
        rows = {row["pid"]: row for row in data["sessions"]["listed"]}
        assert data["sessions"]["not_listed"] == 0
        for proc, (function, size, done, failing, pending, nonblock) in zip(procs, specs):
            row = rows[proc.pid]
            assert row["command"] == comm(proc.pid) and row["uid"] == os.getuid()
            assert row["function"] == function
            assert row["nonblock"] is bool(nonblock)
            # The pending requests (small: run inside write()) completed too; their results wait, unread.
            assert (row["completed"], row["failed"], row["bytes"]) == (done + pending, failing, (done + pending) * size)
            assert row["outstanding"] == row["ready"] == pending
            assert row["files"] == 2  # the client's blocking and non-blocking open files
            assert 0.2 <= row["age_s"] <= time.time() - before + 0.01
            assert 0.2 <= row["idle_s"] <= row["age_s"]
    assert stats(mnt)["sessions"]["listed"] == []


def test_status_sessions_table(mnt):
    specs = [("copy", 0, 0, 0, 0, 0), ("fill8", 2_000_000, 2, 1, 1, 1)]
    with clients(mnt, *specs) as procs:
        out = subprocess.run(
            [sys.executable, "-m", "dmoverfs", "status", "--sessions", str(mnt)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == f"2 sessions open at {mnt}"
        header = "SESSION PID COMMAND FUNCTION NB OUTST DONE FAILED BYTES AGE IDLE"
        assert lines[1].split() == header.split()
        cells = {int(line.split()[1]): line.split() for line in lines[2:]}
        assert set(cells) == {p.pid for p in procs}
        assert cells[procs[0].pid][2:9] == [comm(procs[0].pid)[:15], "copy", "-", "0", "0", "0", "0"]
        assert cells[procs[1].pid][2:9] == [comm(procs[1].pid)[:15], "fill8", "y", "1", "3", "1", "6.0M"]


def test_the_list_is_capped_at_the_most_recently_active(mnt):
    from dmoverfs.client import Session

    cap = 100
    sessions = [Session(mnt, "zero") for _ in range(cap + 5)]
    try:
        time.sleep(0.05)
        first = sessions[0]
        first.submit(bytearray(8))  # the oldest session is now the most recently active
        first.results(1)
        data = stats(mnt)
        listed = data["sessions"]["listed"]
        assert len(listed) == cap and data["sessions"]["not_listed"] == 5 and data["sessions"]["open"] == cap + 5
        ids = [row["id"] for row in listed]
        assert ids == sorted(ids)  # in the order they were opened
        assert listed[0]["completed"] == 1 and listed[0]["bytes"] == 8
        table = subprocess.run(
            [sys.executable, "-m", "dmoverfs", "status", "--sessions", str(mnt)], capture_output=True, text=True, timeout=60
        ).stdout.splitlines()
        assert len(table) == 2 + cap + 1 and table[-1] == f"... and 5 more (stats lists the {cap} most recently active)"
    finally:
        for s in sessions:
            s.close()


def test_watch_refreshes_the_session_table(mnt):
    watcher = Watcher(str(mnt), "--sessions", "--watch", "0.1")
    try:
        watcher.wait_for(lambda s: len(s) >= 1 and s[-1].startswith("0 sessions open"), "no session")
        with clients(mnt, ("copy", 0, 0, 0, 0, 0)) as (proc,):
            watcher.wait_for(lambda s: any(f" {proc.pid} " in screen for screen in s), "the new session's row")
        watcher.wait_for(lambda s: s[-1].startswith("0 sessions open"), "the session gone")
    finally:
        code, err = watcher.interrupt()
    assert code == 130 and err == "", err


def test_sessions_json_lists_the_same_sessions(mnt):
    with clients(mnt, ("zero", 64, 1, 0, 0, 0), ("copy", 0, 0, 0, 0, 0)) as procs:
        out = subprocess.run(
            [sys.executable, "-m", "dmoverfs", "status", "--sessions", "--json", str(mnt)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        rows = json.loads(out.stdout)["sessions"]["listed"]
        assert [(r["pid"], r["function"]) for r in rows] == [(procs[0].pid, "zero"), (procs[1].pid, "copy")]
