"""pyfuse3, with session opens answered FOPEN_STREAM.

Import pyfuse3 from here, never directly: the ``fuse_reply_open``
interposer in ``dmoverfs._stream_open`` (see ``csrc/server/stream_open.c``)
must be in the global symbol scope before pyfuse3 binds its libfuse symbols.
Without it a read() blocked in one thread would hold the file's position
lock and stop other threads from writing to the same descriptor.
"""

from __future__ import annotations

import ctypes
import os
import sys

from dmoverfs import _stream_open

if "pyfuse3" in sys.modules:
    raise ImportError("dmoverfs.fuse must be imported before pyfuse3")
ctypes.CDLL(_stream_open.__file__, mode=os.RTLD_NOW | os.RTLD_GLOBAL)

import pyfuse3  # noqa: E402  (must follow the interposer)


def stream_opens() -> int:
    """Opens answered with FOPEN_STREAM so far (proves the interposer is in use)."""
    return int(_stream_open.lib.dmoverfs_stream_opens())


__all__ = ["pyfuse3", "stream_opens"]
