"""nonblock.c in Python: O_NONBLOCK through ``os.set_blocking``, no preload shim.

usage: python nonblock.py SESSION DEPTH fcntl|open

Same steps and the same output as nonblock.c ("fcntl" here means a blocking
open, then ``os.set_blocking(fd, False)``; "open" means ``O_NONBLOCK`` at open,
cleared later with ``os.set_blocking(fd, True)``). A 3 s alarm guards each
step: its handler raises, so a step that blocks when it should not is
reported as EINTR instead of hanging.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from dmio import RESP, XATTR_FUNCTION, parse, request, whole  # noqa: E402

GUARD_S = 3


class Interrupted(Exception):
    """Raised by the alarm's handler: the step was blocked."""


def on_alarm(signum: int, frame: object) -> None:
    raise Interrupted


def step(name: str, call, *args) -> object:  # noqa: ANN001
    """Run one step under the alarm and print "NAME RET ERRNO MS"; return what the call returned."""
    signal.alarm(GUARD_S)
    start = time.monotonic()
    value: object = None
    try:
        value = call(*args)
        ret, err = (value if isinstance(value, int) else len(value)), "0"
    except Interrupted:
        ret, err = -1, "EINTR"
    except OSError as exc:
        ret, err = -1, errno.errorcode[exc.errno]
    finally:
        signal.alarm(0)
    print(f"{name} {ret} {err} {int((time.monotonic() - start) * 1000)}", flush=True)
    return value


def wchan(tid: int) -> str:
    try:
        return Path(f"/proc/self/task/{tid}/wchan").read_text()
    except OSError:
        return ""


def main() -> int:
    if len(sys.argv) != 4 or sys.argv[3] not in ("fcntl", "open"):
        print("usage: nonblock.py SESSION DEPTH fcntl|open", file=sys.stderr)
        return 2
    path, depth, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    signal.signal(signal.SIGALRM, on_alarm)
    bufs = [np.ones(64, np.uint8) for _ in range(depth + 3)]
    reqs = [request(i, out=whole(b)) for i, b in enumerate(bufs)]
    late = request(999, out=whole(bufs[-1]))

    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_NONBLOCK if mode == "open" else 0)
    fd = os.open(path, flags)
    os.setxattr(fd, XATTR_FUNCTION, b"zero")
    if mode == "fcntl":
        os.set_blocking(fd, False)

    step("read", os.read, fd, RESP.size)
    step("write", os.write, fd, b"".join(r.packed for r in reqs[: depth + 1]))
    step("write-full", os.write, fd, reqs[depth + 1].packed)
    step("read-ready", os.read, fd, RESP.size * (depth + 1))

    os.set_blocking(fd, True)
    print("flags-cleared", flush=True)
    main_tid = threading.get_native_id()
    returned = threading.Event()
    waited = []

    def helper() -> None:
        deadline = time.monotonic() + 2
        while wchan(main_tid) != "request_wait_answer" and not returned.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        returned.wait(0.3)
        if not returned.is_set():
            waited.append(1)
        os.write(fd, late.packed)

    thread = threading.Thread(target=helper)
    thread.start()
    signal.alarm(GUARD_S)
    start = time.monotonic()
    try:
        data = os.read(fd, RESP.size)
        ret, err = len(data), "0"
        got = parse(data)[0].req_id if data else -1
    except Interrupted:
        ret, err, got = -1, "EINTR", -1
    except OSError as exc:
        ret, err, got = -1, errno.errorcode[exc.errno], -1
    finally:
        signal.alarm(0)
        returned.set()
    elapsed = int((time.monotonic() - start) * 1000)
    thread.join()
    print(f"read-blocks {ret} {err} {elapsed} id={got} waited={len(waited)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
