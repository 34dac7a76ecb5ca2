"""The state of one mount: what NetBSD keeps per device, for the control plane.

:class:`Device` holds the core, the transport and the open sessions; the FUSE
face (:mod:`dmoverfs.server.fs`) creates and closes sessions through it, and
``stats`` is rendered from it.
"""

from __future__ import annotations

import errno
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3
import trio

from dmoverfs.backends import BuiltinBackend, Dispatcher, Registry
from dmoverfs.server import stats
from dmoverfs.server.core import Core, Function
from dmoverfs.server.process import Client, command_name, thread_group
from dmoverfs.server.session import Session
from dmoverfs.server.transport import Transport
from dmoverfs.tunables import Tunables

log = logging.getLogger(__name__)


@dataclass
class Counters:
    """Server-wide counters of the control plane."""

    sessions_total: int = 0


class Device:
    """The state of one mount: the core, the transport, the open sessions, the counters."""

    def __init__(self, tunables: Tunables, mountpoint: str, registry: Registry | None = None) -> None:
        tunables.validate()
        self.tunables = tunables
        self.mountpoint = mountpoint
        self.core = Core(tunables)
        if registry is None:
            registry = Registry()
            registry.register(BuiltinBackend())
        self.registry = registry
        registry.builtin_load = lambda: self.core.executing_bytes
        self.functions: dict[str, Function] = self._functions()
        self.sessions: dict[int, Session] = {}
        self.dispatcher = Dispatcher(self.core, registry, self._function_of)
        self.counters = Counters()
        self.started_ns = time.time_ns()
        self.fuse_initialised = trio.Event()
        self.shutting_down = False
        #: Set by serve() once mounted.
        self.transport: Transport | None = None
        #: Why the transport stopped serving, when it was not an unmount.
        self.failure: str | None = None
        #: Inodes held by the FUSE layer (set by it; shown in stats to expose leaks).
        self.inode_count: Callable[[], int] = lambda: 0

    def _functions(self) -> dict[str, Function]:
        """What the active back-ends offer. A function a plug-in offers too is
        external: its requests are handed to the dispatcher once accepted."""
        table = {f.name: f for f in self.core.functions}
        out: dict[str, Function] = {}
        for name, spec in self.registry.functions().items():
            plugins = [b for b in self.registry.offering(name) if not isinstance(b, BuiltinBackend)]
            index = table[name].index if name in table else -1
            out[name] = Function(index, name, spec.ninputs, spec.has_output, external=bool(plugins))
        return out

    def _function_of(self, sid: int) -> str | None:
        session = self.sessions.get(sid)
        return session.function.name if session is not None and session.function is not None else None

    # -- sessions ---------------------------------------------------------------------

    def open_session(self, sid: int, ctx: pyfuse3.RequestContext, preset: Function | None) -> Session:
        """A new session for the process that is opening inode *sid*."""
        if self.shutting_down:
            raise OSError(errno.ENXIO, "the server is shutting down")
        # Requests act on the memory of whoever writes them; the opener is for
        # stats, and its uid is the user the caps and the scheduler count.
        pid = thread_group(ctx.pid)
        client = Client(pid=pid, uid=ctx.uid, gid=ctx.gid, command=command_name(pid))
        core_session = self.core.session(sid, self.tunables.queue_depth, ctx.uid)
        session = Session(sid, core_session, client, self.tunables.queue_depth)
        if preset is not None:
            try:
                session.set_function(preset.name.encode(), self.functions)
            except OSError:
                session.close()
                raise
        self.sessions[sid] = session
        self.counters.sessions_total += 1
        return session

    def add_file(self, session: Session, fh: int) -> None:
        """Open file *fh* of *session*: the transport serves it from now on."""
        assert self.transport is not None
        try:
            self.transport.register(fh, session.core)
        except OSError:
            if not session.files:
                self.close_session(session)
            raise
        session.files.add(fh)

    def remove_file(self, session: Session, fh: int) -> None:
        """Open file *fh* was released; the session closes with its last file."""
        if self.transport is not None:
            self.transport.unregister(fh)
        session.files.discard(fh)
        if not session.files:
            self.close_session(session)

    def close_session(self, session: Session) -> None:
        """Discard its responses and let its requests finish harmlessly."""
        session.close()
        self.sessions.pop(session.sid, None)

    # -- events from the core --------------------------------------------------------

    def on_core_event(self) -> None:
        """External requests to hand to back-ends, EPERM to explain."""
        for sid in self.core.drain():
            session = self.sessions.get(sid)
            writer = session.core.take_eperm() if session is not None else 0
            if writer and not session.eperm_explained:
                session.eperm_explained = True
                session.explain_eperm(writer)
        self.dispatcher.dispatch()

    def shut_down(self) -> None:
        """Fail every waiting call with ENXIO and tell every poller; refuse new calls."""
        self.shutting_down = True
        self.core.shutdown()

    def fuse_ready(self) -> None:
        """FUSE_INIT has been answered: the mount serves requests."""
        self.fuse_initialised.set()

    def render_stats(self) -> bytes:
        """The ``stats`` file."""
        return (json.dumps(stats.snapshot(self), indent=2) + "\n").encode()

    def close(self) -> None:
        """Free every session and the core (after the transport is closed)."""
        for session in list(self.sessions.values()):
            session.close()
        self.sessions.clear()
        self.core.close()
