"""Tunables of a mount, fixed when it is mounted and shown in ``stats``."""

from __future__ import annotations

import dataclasses
import os

from dmoverfs.wire import NREQS_MAX

#: The caps that exist globally and per user, by name.
USER_CAPS = ("sessions", "requests", "meta_bytes")


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
    #: The same three caps for each user (the uid that opened a session); 0
    #: means the global cap (see :meth:`shared`).
    max_user_sessions: int = 0
    max_user_requests: int = 0
    max_user_meta_bytes: int = 0
    #: Bytes of a request a worker runs before it turns to other sessions'
    #: work (rounded up to whole chunks); 0 runs every request whole.
    slice_bytes: int = 4 << 20
    #: Bounce buffer per operand per worker, bytes.
    chunk_bytes: int = 256 << 10
    #: Requests moving at most this many bytes run without a worker hop.
    inline_bytes: int = 64 << 10

    def __post_init__(self) -> None:
        for cap in USER_CAPS:
            if not getattr(self, f"max_user_{cap}"):
                object.__setattr__(self, f"max_user_{cap}", getattr(self, f"max_{cap}"))

    @classmethod
    def shared(cls, **given: int) -> Tunables:
        """The tunables of a mount other users may use (``--allow-other``): each per-user cap
        not given is half the global one, so that one user cannot lock the others out."""
        for cap in USER_CAPS:
            given.setdefault(f"max_user_{cap}", max(1, given.get(f"max_{cap}", DEFAULT_CAPS[cap]) // 2))
        return cls(**given)

    def validate(self) -> None:
        """Raise ValueError for values the server cannot run with."""
        if not 1 <= self.queue_depth <= 65536:
            raise ValueError("queue depth must be between 1 and 65536")
        if not 1 <= self.workers <= 256:
            raise ValueError("workers must be between 1 and 256")
        if self.max_sessions < 1 or self.max_requests < 1 or self.max_meta_bytes < 4096:
            raise ValueError("global limits must be positive (max_meta_bytes >= 4096)")
        if min(self.max_user_sessions, self.max_user_requests, self.max_user_meta_bytes) < 1:
            raise ValueError("per-user limits must be positive")
        if self.slice_bytes < 0:
            raise ValueError("slice bytes must not be negative")
        if not 4096 <= self.chunk_bytes <= 64 << 20 or self.chunk_bytes % 64:
            raise ValueError("chunk size must be a multiple of 64 between 4 KiB and 64 MiB")
        if self.inline_bytes < 0:
            raise ValueError("inline bytes must not be negative")

    def as_dict(self) -> dict[str, int | bool]:
        """The tunables as a plain dict (for stats)."""
        return dataclasses.asdict(self)


#: The global caps' defaults (what a per-user cap not given is derived from).
DEFAULT_CAPS = {cap: Tunables.__dataclass_fields__[f"max_{cap}"].default for cap in USER_CAPS}
