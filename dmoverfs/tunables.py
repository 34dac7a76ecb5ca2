"""Tunables of a mount, fixed when it is mounted and shown in ``stats``."""

from __future__ import annotations

import dataclasses
import os

from dmoverfs.wire import NREQS_MAX


@dataclasses.dataclass(frozen=True)
class Tunables:
    """Limits and sizes of one mount (FreeBSD AIO's spirit: caps, not growth)."""

    #: Requests one session may have outstanding (written, not yet read back).
    queue_depth: int = NREQS_MAX
    #: C worker threads that run large requests.
    workers: int = max(2, os.cpu_count() or 2)
    #: Sessions open at once; more opens fail with ENFILE.
    max_sessions: int = 4096
    #: Requests outstanding over all sessions; more fail with EAGAIN.
    max_requests: int = 65536
    #: Decoded request metadata (iovec copies) over all sessions, bytes.
    max_meta_bytes: int = 256 << 20
    #: Bounce buffer per operand per worker, bytes.
    chunk_bytes: int = 256 << 10
    #: Requests moving at most this many bytes run without a worker hop.
    inline_bytes: int = 64 << 10

    def validate(self) -> None:
        """Raise ValueError for values the server cannot run with."""
        if not 1 <= self.queue_depth <= 65536:
            raise ValueError("queue depth must be between 1 and 65536")
        if not 1 <= self.workers <= 256:
            raise ValueError("workers must be between 1 and 256")
        if self.max_sessions < 1 or self.max_requests < 1 or self.max_meta_bytes < 4096:
            raise ValueError("global limits must be positive (max_meta_bytes >= 4096)")
        if not 4096 <= self.chunk_bytes <= 64 << 20 or self.chunk_bytes % 64:
            raise ValueError("chunk size must be a multiple of 64 between 4 KiB and 64 MiB")
        if self.inline_bytes < 0:
            raise ValueError("inline bytes must not be negative")

    def as_dict(self) -> dict[str, int | bool]:
        """The tunables as a plain dict (for stats)."""
        return dataclasses.asdict(self)
