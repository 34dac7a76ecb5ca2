"""`dmoverfs status`: the table, --json, and --watch refreshing until interrupted."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

from dmio import open_session

CLEAR = "\x1b[H\x1b[2J"
GIVE_UP_S = 60.0  # only so a broken --watch fails instead of hanging; nothing is timed


def status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dmoverfs", "status", *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )


class Watcher:
    """`dmoverfs status --watch` in a subprocess, its screens read as they come."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dmoverfs", "status", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        self.text = ""

    def screens(self) -> list[str]:
        """Complete screens so far (each one ends where the next begins)."""
        return self.text.split(CLEAR)[1:-1]

    def wait_for(self, predicate, what: str) -> list[str]:
        deadline = time.monotonic() + GIVE_UP_S
        while not predicate(self.screens()):
            assert self.proc.poll() is None, f"status --watch exited ({self.proc.returncode}): {self.proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, f"status --watch never showed {what}; it printed:\n{self.text}"
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if ready:
                self.text += os.read(self.proc.stdout.fileno(), 65536).decode()
        return self.screens()

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C: the command ends quietly with 130."""
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode, err.decode()


def test_table_and_json(mnt):
    table = status(str(mnt))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("dmoverfs ") and f"at {mnt} " in lines[0]
    assert any(line.startswith("sessions: ") for line in lines)
    assert any(line.startswith("transport: FUSE 7.") and "session calls served" in line for line in lines)
    assert any(line.startswith("calls: ") and "reads" in line for line in lines)
    assert any(line.startswith("limits: ") and "queue depth 64" in line for line in lines)
    for name in ("zero", "fill8", "copy", "xor2", "xor16", "iscsi-crc32c"):
        assert any(line.split()[:1] == [name] for line in lines), name
    data = json.loads(status(str(mnt), "--json").stdout)
    assert data["server"]["mountpoint"] == str(mnt) and data["limits"]["queue_depth"] == 64


def test_status_of_something_else_is_an_error(tmp_path):
    result = status(str(tmp_path))
    assert result.returncode == 1 and "not a dmoverfs mount" in result.stderr


def test_watch_refreshes_until_interrupted(mnt):
    watcher = Watcher(str(mnt), "--watch", "0.1")
    try:
        first = watcher.wait_for(lambda s: len(s) >= 2, "two tables")
        for screen in first[:2]:
            assert screen.startswith("dmoverfs ") and "\nsessions: 0 open" in screen and "\nlimits: " in screen
        # Each refresh reads the counters again: a session opened now shows up.
        fd = open_session(mnt, "zero")
        try:
            watcher.wait_for(lambda s: any("\nsessions: 1 open" in screen for screen in s), "the new session")
        finally:
            os.close(fd)
        watcher.wait_for(lambda s: "\nsessions: 0 open" in s[-1], "the session closed")
    finally:
        code, err = watcher.interrupt()
    assert code == 130 and "Traceback" not in err, err


def test_watch_json_prints_whole_documents(mnt):
    watcher = Watcher(str(mnt), "--json", "--watch", "0.1")
    try:
        screens = watcher.wait_for(lambda s: len(s) >= 2, "two documents")
    finally:
        code, err = watcher.interrupt()
    assert code == 130 and "Traceback" not in err, err
    docs = [json.loads(screen) for screen in screens]
    assert all(doc["server"]["mountpoint"] == str(mnt) for doc in docs)
    assert docs[0]["server"]["uptime_s"] <= docs[1]["server"]["uptime_s"]
