"""Tests that fail on purpose, run by test_harness.py in a child pytest.

Not collected by the normal run (the file name does not match test_*.py).
"""

import os
import signal

import numpy as np

from dmio import open_session, request, submit, whole


def test_fails_with_a_shared_server(mnt):
    fd = open_session(mnt, "zero")
    submit(fd, request(1, out=whole(np.ones(64, np.uint8))))
    raise AssertionError("failing on purpose with a session open")


def test_fails_after_killing_its_server(server_factory):
    server = server_factory()
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait()
    raise AssertionError("failing on purpose with a stale mount")


def test_fails_with_two_servers(server_factory):
    server_factory()
    server_factory("--queue-depth", "2")
    raise AssertionError("failing on purpose with two servers")
