"""Server shutdown with clients blocked in read, write and poll.

Every blocked client is woken within two seconds with ENXIO (as puffs does),
pollers see their events, the mount goes away and the server exits 0.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from test_signals import client, wait_blocked_in_fuse, wait_line

from dmoverfs import mounting

DEADLINE_S = 2.0

BLOCKED_READ = """
    fd = open_session(mnt, "zero")
    say("blocking")
    try:
        c_read(fd, 16)
        say("no error")
    except OSError as exc:
        say(errno.errorcode[exc.errno])
"""

BLOCKED_WRITE = """
    fd = open_session(mnt, "zero")
    bufs = [np.ones(8, np.uint8) for _ in range(3)]
    submit(fd, request(0, out=whole(bufs[0])), request(1, out=whole(bufs[1])))
    say("blocking")
    try:
        c_write(fd, request(2, out=whole(bufs[2])).packed)
        say("no error")
    except OSError as exc:
        say(errno.errorcode[exc.errno])
"""

BLOCKED_POLL = """
    import select
    fd = open_session(mnt, "zero")
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    say("blocking")
    events = poller.poll(30_000)
    say("events" if events and events[0][1] else "timeout")
"""


def stop_by(how: str, server) -> None:
    if how == "unmount":
        subprocess.run([sys.executable, "-m", "dmoverfs", "unmount", str(server.mountpoint)], check=True, timeout=30)
    else:
        server.proc.send_signal({"sigterm": signal.SIGTERM, "sigint": signal.SIGINT}[how])


@pytest.mark.parametrize("how", ["sigterm", "sigint", "unmount"])
def test_shutdown_wakes_every_blocked_client(server_factory, how):
    server = server_factory("--queue-depth", "2")
    clients = [client(server.mountpoint, body) for body in (BLOCKED_READ, BLOCKED_WRITE, BLOCKED_POLL)]
    try:
        for proc in clients:
            wait_line(proc, "blocking")
        wait_blocked_in_fuse(clients[0].pid)
        wait_blocked_in_fuse(clients[1].pid)
        time.sleep(0.2)  # let the poller reach its wait in the kernel
        start = time.monotonic()
        stop_by(how, server)
        wait_line(clients[0], "ENXIO")
        wait_line(clients[1], "ENXIO")
        wait_line(clients[2], "events")
        assert time.monotonic() - start < DEADLINE_S
        assert server.proc.wait(timeout=10) == 0
        assert not mounting.is_mounted(server.mountpoint)
        for proc in clients:
            assert proc.wait(timeout=10) == 0
    finally:
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_stats_say_when_shutting_down_is_not_reached_by_new_opens(server_factory):
    """After the server stopped, the mount is gone: new opens cannot reach a dying server."""
    server = server_factory()
    assert json.loads((server.mountpoint / "stats").read_text())["server"]["shutting_down"] is False
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=10) == 0
    assert not mounting.is_mounted(server.mountpoint)
    assert not (server.mountpoint / "dmoverio").exists()
