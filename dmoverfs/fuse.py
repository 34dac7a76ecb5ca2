"""pyfuse3, with the server's libfuse interposers in place.

Import pyfuse3 from here, never directly: ``dmoverfs._fuse_hooks`` (see
``csrc/server/``) must be in the global symbol scope before pyfuse3 binds its
libfuse symbols. It makes session opens FOPEN_STREAM (otherwise a read()
blocked in one thread holds the file's position lock and stops other threads
writing to the same descriptor), passes FUSE_INTERRUPT on to the read and
write handlers (otherwise a client killed while blocked would hang until its
request completed) and, once dmoverfs.fastpath asks for it, serves the
session reads and writes that need no wait from a C thread.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

from dmoverfs import _fuse_hooks

if "pyfuse3" in sys.modules:
    raise ImportError("dmoverfs.fuse must be imported before pyfuse3")
ctypes.CDLL(_fuse_hooks.__file__, mode=os.RTLD_NOW | os.RTLD_GLOBAL)

import pyfuse3  # noqa: E402  (must follow the interposers)

_ffi, _lib = _fuse_hooks.ffi, _fuse_hooks.lib
#: The hooks module itself, for dmoverfs.fastpath.
hooks_ffi, hooks_lib = _ffi, _lib
#: Watched requests (by address) and what to call when the kernel interrupts them
#: (None once called).
_watched: dict[int, Callable[[], None] | None] = {}


@_ffi.def_extern()
def dmoverfs_on_interrupt(req) -> None:  # noqa: ANN001 - a cffi pointer
    key = int(_ffi.cast("uintptr_t", req))
    callback = _watched.get(key)
    if callback is not None:
        _watched[key] = None
        callback()


_lib.dmoverfs_set_interrupt_handler(_lib.dmoverfs_on_interrupt)


def stream_opens() -> int:
    """Opens answered with FOPEN_STREAM so far (proves that interposer is in use)."""
    return int(_lib.dmoverfs_stream_opens())


def interrupts_enabled() -> bool:
    """True once pyfuse3's read and write operations go through the interrupt hook."""
    return bool(_lib.dmoverfs_hooks_installed())


def current_request():  # noqa: ANN201 - an opaque cffi pointer
    """The request of the read or write handler that calls this before its first await."""
    return _lib.dmoverfs_current_request()


def watch(req, on_interrupt: Callable[[], None]) -> None:  # noqa: ANN001
    """Call *on_interrupt* if the kernel interrupts *req* (at once if it already has)."""
    if req != _ffi.NULL:
        _watched[int(_ffi.cast("uintptr_t", req))] = on_interrupt
        _lib.dmoverfs_watch_interrupt(req)


def unwatch(req) -> None:  # noqa: ANN001
    """Stop watching *req*; must come before the request is answered."""
    if req != _ffi.NULL and int(_ffi.cast("uintptr_t", req)) in _watched:
        del _watched[int(_ffi.cast("uintptr_t", req))]
        _lib.dmoverfs_unwatch_interrupt(req)


__all__ = ["pyfuse3", "stream_opens", "interrupts_enabled", "current_request", "watch", "unwatch"]
