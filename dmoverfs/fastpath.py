"""The server's C fast path (``csrc/server/fastpath.c``), seen from Python.

A C thread owns ``/dev/fuse``: it answers reads and writes of registered
session files that need no wait, straight from the C core, and passes every
other FUSE request on to pyfuse3. Python decides which open files it may
serve (those of sessions with a built-in function) and takes them back
before a session closes or the server shuts down.
"""

from __future__ import annotations

from dmoverfs import _core
from dmoverfs.fuse import hooks_ffi, hooks_lib

_STAT_FIELDS = ("writes", "reads", "errors", "forwarded")


#: The fields of struct dmoverfs_fast_core and the core function each is.
_CORE_ENTRIES = {
    "submit": "dm_sess_submit",
    "submit_whole": "dm_sess_submit_whole",
    "take_if": "dm_sess_take_if",
    "poke": "dm_sess_poke",
}


def _session(core_session) -> object:  # noqa: ANN001 - a CoreSession
    return hooks_ffi.cast("dm_sess *", core_session.address)


class FastPath:
    """Registry of the open files the C thread serves.

    Create it before ``pyfuse3.init()``: the thread starts when pyfuse3 asks
    for the session's file descriptor.
    """

    def __init__(self) -> None:
        ops = hooks_ffi.new("struct dmoverfs_fast_core *")
        # The two extension modules have separate cffi types: pass addresses.
        for field, ctype in hooks_ffi.typeof("struct dmoverfs_fast_core").fields:
            function = _core.ffi.addressof(_core.lib, _CORE_ENTRIES[field])
            setattr(ops, field, hooks_ffi.cast(ctype.type, int(_core.ffi.cast("uintptr_t", function))))
        err = hooks_lib.dmoverfs_fast_prepare(ops)
        if err:
            raise OSError(err, "cannot prepare the C fast path")
        self._times = hooks_ffi.new("int64_t[2]")

    @property
    def running(self) -> bool:
        """True while the C thread serves /dev/fuse and may answer."""
        return bool(hooks_lib.dmoverfs_fast_running())

    def register(self, fh: int, core_session, depth: int, nonblock: bool) -> None:  # noqa: ANN001
        """Let the C thread serve open file *fh* of *core_session* (again, to update it)."""
        err = hooks_lib.dmoverfs_fast_register(fh, _session(core_session), depth, int(nonblock))
        if err:
            raise OSError(err, "cannot register the open file with the fast path")

    def unregister(self, fh: int) -> None:
        """Take *fh* back; returns once the C thread no longer uses its session."""
        hooks_lib.dmoverfs_fast_unregister(fh)

    def times(self, fh: int) -> tuple[int, int]:
        """(atime, mtime) in ns of *fh*'s last fast read and write; 0 for none."""
        t = self._times
        if not hooks_lib.dmoverfs_fast_times(fh, t, t + 1):
            return 0, 0
        return t[0], t[1]

    def stop(self) -> None:
        """Answer nothing more in C: every request goes to pyfuse3 (shutdown)."""
        hooks_lib.dmoverfs_fast_enable(0)

    def stats(self) -> dict[str, int | bool]:
        """What the C thread answered and passed on, and how many files it serves."""
        out = hooks_ffi.new("struct dmoverfs_fast_stats *")
        hooks_lib.dmoverfs_fast_stats(out)
        stats: dict[str, int | bool] = {"running": self.running, "files": hooks_lib.dmoverfs_fast_registered()}
        stats.update({name: getattr(out, name) for name in _STAT_FIELDS})
        return stats
