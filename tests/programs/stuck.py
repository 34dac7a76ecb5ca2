"""One call on a mount that is expected to block; says what it returned.

usage: python stuck.py MOUNT read|write|poll|stats DEPTH

read   read() of one response on a new zero session (none will come)
write  write() of one request on a zero session whose DEPTH slots are full
poll   poll(POLLIN) on a new zero session
stats  open() and read() of MOUNT/stats

Prints "ready" just before the call, then "result RET ERRNO" (RET is the
bytes read or written, or the poll's revents as POLLIN|POLLERR|...; ERRNO
is 0 or its name), then "after RET ERRNO" for the same call made once more
on the session (not for stats).
"""

from __future__ import annotations

import errno
import os
import select
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from dmio import open_session, request, submit, whole  # noqa: E402

POLL_BITS = {"POLLIN": select.POLLIN, "POLLOUT": select.POLLOUT, "POLLERR": select.POLLERR, "POLLHUP": select.POLLHUP}


def revents(mask: int) -> str:
    return "|".join(name for name, bit in POLL_BITS.items() if mask & bit) or "0"


def main() -> None:
    mnt, kind, depth = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    outputs = [np.ones(64, np.uint8) for _ in range(depth + 1)]  # the zero requests' memory, kept alive
    fd = open_session(mnt, "zero") if kind != "stats" else -1
    if kind == "write":
        assert submit(fd, *(request(i, out=whole(outputs[i])) for i in range(depth))) == 40 * depth

    def call() -> str:
        if kind == "read":
            return str(len(os.read(fd, 16)))
        if kind == "write":
            return str(submit(fd, request(depth, out=whole(outputs[depth]))))
        if kind == "poll":
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return revents(poller.poll()[0][1])
        with open(mnt / "stats", "rb") as f:
            return str(len(f.read()))

    print("ready", flush=True)
    for label in ("result", "after"):  # the blocked call, then the same call once more
        try:
            print(f"{label} {call()} 0", flush=True)
        except OSError as exc:
            print(f"{label} -1 {errno.errorcode.get(exc.errno, exc.errno)}", flush=True)
        if kind == "stats":
            break  # once unmounted, the path is no longer the mount's


if __name__ == "__main__":
    main()
