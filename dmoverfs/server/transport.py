"""The data plane (``csrc/server/transport.c``), seen from the control plane.

The transport mounts the file system and owns ``/dev/fuse``: it serves every
read, write, poll and interrupt of a session file in C, through the core,
and hands every other request to libfuse, which pyfuse3 runs with the mount
point ``/dev/fd/N`` (:meth:`Transport.libfuse_mountpoint`): libfuse then takes
descriptor N as its connection, mounts nothing, and never sees a session's
data.  Python registers each open session file before its open is answered.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dmoverfs._server import ffi, lib
from dmoverfs.server.core import Core, CoreSession

#: FUSE protocol 7.31 brought what the transport relies on being there
#: (the file's flags in every read and write, FOPEN_STREAM, poll wake-ups).
MIN_PROTO_MINOR = 31
#: Threads reading /dev/fuse, at most: each one beyond the first stands in
#: for one that waits on a client's memory (a slow FUSE file, a fault).
MAX_READERS = 64


class TransportError(OSError):
    """The transport cannot mount, or cannot work with this kernel or libfuse."""


@dataclass(frozen=True)
class State:
    """What the transport is doing: running, or why it stopped."""

    running: bool
    unmounted: bool
    message: str


class Transport:
    """One mount's data plane."""

    def __init__(self, core: Core, mountpoint: str, options: list[str], *, min_proto_minor: int = MIN_PROTO_MINOR) -> None:
        self._mountpoint = ffi.new("char[]", os.fsencode(mountpoint))
        self._options = ffi.new("char[]", ",".join(options).encode())
        cfg = ffi.new(
            "struct dm_transport_config *",
            {
                "mountpoint": self._mountpoint,
                "options": self._options,
                "max_readers": MAX_READERS,
                "min_proto_minor": min_proto_minor,
            },
        )
        msg = ffi.new("char[]", 512)
        err = ffi.new("int *")
        ptr = lib.dm_transport_new(core.ptr, cfg, msg, len(msg), err)
        if ptr == ffi.NULL:
            raise TransportError(err[0], ffi.string(msg).decode(errors="replace"))
        self._ptr = ptr
        self._lib_fd: int | None = None

    def libfuse_mountpoint(self) -> str:
        """What to give pyfuse3.init as the mount point: libfuse's end of the socket pair.

        A duplicate, which libfuse closes when its session is destroyed.
        """
        if self._lib_fd is None:
            self._lib_fd = os.dup(lib.dm_transport_libfuse_fd(self._ptr))
        return f"/dev/fd/{self._lib_fd}"

    def forget_libfuse_fd(self) -> None:
        """libfuse never took its descriptor (pyfuse3.init failed): close it here."""
        if self._lib_fd is not None:
            os.close(self._lib_fd)
            self._lib_fd = None

    def start(self) -> None:
        """Start reading /dev/fuse (after libfuse has its session)."""
        err = lib.dm_transport_start(self._ptr)
        if err:
            raise TransportError(err, f"cannot start the transport's threads: {os.strerror(err)}")

    @property
    def eventfd(self) -> int:
        """Readable once the transport stops running (see :meth:`state`)."""
        return lib.dm_transport_eventfd(self._ptr)

    def state(self) -> State:
        """Running, unmounted by the kernel, or refused/failed with a message."""
        code = lib.dm_transport_state(self._ptr)
        message = ffi.string(lib.dm_transport_message(self._ptr)).decode(errors="replace")
        return State(code == lib.DM_TRANSPORT_RUNNING, code == lib.DM_TRANSPORT_UNMOUNTED, message)

    def register(self, fh: int, session: CoreSession) -> None:
        """Serve open file *fh* of *session* in C (call before the open is answered)."""
        err = lib.dm_transport_register(self._ptr, fh, session.ptr)
        if err:
            raise OSError(err, "cannot register the open file")

    def unregister(self, fh: int) -> None:
        """*fh* was released (call before its session may close)."""
        lib.dm_transport_unregister(self._ptr, fh)

    def stats(self) -> dict[str, int]:
        """Counters: the protocol in use, readers, what was served and relayed."""
        out = ffi.new("struct dm_transport_stats *")
        lib.dm_transport_stats(self._ptr, out)
        return {name: getattr(out, name) for name, _ in ffi.typeof("struct dm_transport_stats").fields}

    def stop(self) -> None:
        """Unmount and stop every thread of the transport (after pyfuse3 is closed)."""
        if self._ptr is not None:
            lib.dm_transport_stop(self._ptr)

    def free(self) -> None:
        """End the connection and free (after the core is closed: its threads answer through here)."""
        if self._ptr is not None:
            lib.dm_transport_free(self._ptr)
            self._ptr = None
