"""The dmoverfs server: one mount, its sessions, its C core, on trio.

:class:`Device` is the state of one mount (what NetBSD keeps per device);
:func:`serve` mounts it and runs the event loop until it is unmounted or
told to stop (SIGTERM, SIGINT, SIGHUP).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import signal
import time
from collections.abc import Callable

import trio
import trio.testing

from dmoverfs import __version__, stats
from dmoverfs.backends import BuiltinBackend, Dispatcher, Registry
from dmoverfs.core import Core, Function
from dmoverfs.fastpath import FastPath
from dmoverfs.fs import DmoverOperations
from dmoverfs.fuse import pyfuse3
from dmoverfs.process import Client, open_pidfd, thread_group
from dmoverfs.session import Counters, Handle, Session
from dmoverfs.tunables import Tunables

log = logging.getLogger(__name__)

#: How long woken handlers get to answer before the main loop stops.
SHUTDOWN_GRACE_S = 1.0


class Device:
    """The state of one mount: the core, the open sessions, the counters."""

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
        #: Inodes held by the FUSE layer (set by it; shown in stats to expose leaks).
        self.inode_count: Callable[[], int] = lambda: 0
        #: Answers reads and writes that need no wait in C (must exist before pyfuse3.init).
        self.fast: FastPath | None = FastPath() if tunables.fast_path else None

    def _functions(self) -> dict[str, Function]:
        """What the active back-ends offer. A function only the built-in back-end
        offers stays on the C fast path; the others go through the dispatcher."""
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
        if len(self.sessions) >= self.tunables.max_sessions:
            raise OSError(errno.ENFILE, "too many sessions open")
        pid = thread_group(ctx.pid)
        client = Client(pid=pid, uid=ctx.uid, gid=ctx.gid)
        core_session = self.core.session(sid, pid, open_pidfd(pid), self.tunables.queue_depth)
        session = Session(
            sid, core_session, client, self.tunables.queue_depth, self.functions, self.counters, self.dispatcher.dispatch
        )
        if preset is not None:
            session.set_function(preset.name.encode())
        self.sessions[sid] = session
        self.counters.sessions_total += 1
        return session

    def serve_fast(self, handle: Handle) -> None:
        """Let the fast path serve *handle* if its session runs a built-in function (or update it)."""
        func = handle.session.function
        if self.fast is not None and func is not None and not func.external and not handle.session.closed:
            try:
                self.fast.register(handle.fh, handle.session.core, handle.session.depth, handle.nonblock)
            except OSError as exc:
                # Python serves the file instead: slower, the same answers.
                log.warning("session %d: not on the fast path: %s", handle.session.sid, exc)

    def unserve_fast(self, handle: Handle) -> None:
        """Take *handle* back from the fast path (before its session may close)."""
        if self.fast is not None:
            self.fast.unregister(handle.fh)

    def session_times(self, session: Session) -> tuple[int, int]:
        """(atime, mtime) of *session*, counting reads and writes the fast path served."""
        atime, mtime = session.atime_ns, session.mtime_ns
        if self.fast is not None:
            for handle in session.handles:
                fast_atime, fast_mtime = self.fast.times(handle.fh)
                atime, mtime = max(atime, fast_atime), max(mtime, fast_mtime)
        return atime, mtime

    def close_session(self, session: Session) -> None:
        """The last open file of *session* was released."""
        session.close()
        self.sessions.pop(session.sid, None)

    def deliver_completions(self) -> None:
        """Wake the sessions whose requests workers have completed."""
        for sid in self.core.drain():
            session = self.sessions.get(sid)
            if session is not None:
                session.changed()

    def shut_down(self) -> None:
        """Fail every waiter with ENXIO and tell every poller."""
        self.shutting_down = True
        if self.fast is not None:
            self.fast.stop()
        for session in list(self.sessions.values()):
            session.shut_down()

    def fuse_ready(self) -> None:
        """FUSE_INIT has been answered: the mount serves requests."""
        self.fuse_initialised.set()

    def render_stats(self) -> bytes:
        """The ``stats`` file."""
        return (json.dumps(stats.snapshot(self), indent=2) + "\n").encode()

    def close(self) -> None:
        """Free every session and the core (after the event loop has stopped)."""
        for session in list(self.sessions.values()):
            session.close()
        self.sessions.clear()
        self.core.close()


async def _pump_completions(device: Device) -> None:
    fd = device.core.eventfd
    while True:
        await trio.lowlevel.wait_readable(fd)
        device.deliver_completions()


async def _stop_on_signal(device: Device) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: shutting down", signal.Signals(signum).name)
            device.shut_down()
            # Let the woken handlers answer their clients before the loop stops.
            with trio.move_on_after(SHUTDOWN_GRACE_S):
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            pyfuse3.terminate()
            return


async def _announce_ready(device: Device, ready_fd: int | None) -> None:
    await device.fuse_initialised.wait()
    log.info("dmoverfs %s serving %s (pid %d, kernels: %s)", __version__, device.mountpoint, os.getpid(), device.core.kernels)
    if ready_fd is not None:
        try:
            os.write(ready_fd, b"ready\n")
        finally:
            os.close(ready_fd)


async def _run(device: Device, ready_fd: int | None) -> None:
    # Every blocked read or write holds a pyfuse3 worker task: allow one per
    # session and direction, plus room for the requests that never block.
    max_tasks = 2 * device.tunables.max_sessions + 64
    async with trio.open_nursery() as nursery:
        device.dispatcher.nursery = nursery  # plug-in back-ends' requests run as its tasks
        nursery.start_soon(_pump_completions, device)
        nursery.start_soon(_stop_on_signal, device)
        nursery.start_soon(_announce_ready, device, ready_fd)
        await pyfuse3.main(min_tasks=4, max_tasks=max_tasks)
        nursery.cancel_scope.cancel()


def _raise_open_file_limit(tunables: Tunables) -> None:
    """Every session holds a pidfd: take the hard limit on open files, and say if it is short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard != resource.RLIM_INFINITY and hard < tunables.max_sessions + 64:
        log.warning("open files are limited to %d: fewer than --max-sessions %d can be open", hard, tunables.max_sessions)


def serve(
    mountpoint: str,
    tunables: Tunables,
    *,
    allow_other: bool = False,
    debug: bool = False,
    ready_fd: int | None = None,
    registry: Registry | None = None,
) -> None:
    """Mount dmoverfs at *mountpoint* and serve it until unmounted or signalled.

    When *ready_fd* is given, ``ready`` is written to it once the mount
    answers requests, and the descriptor is closed.
    """
    _raise_open_file_limit(tunables)
    device = Device(tunables, mountpoint, registry)
    ops = DmoverOperations(device)
    options = set(pyfuse3.default_options) | {"fsname=dmoverfs", "subtype=dmoverfs"}
    if allow_other:
        options.add("allow_other")
    if debug:
        options.add("debug")
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as exc:
        device.close()
        raise OSError(errno.EIO, f"cannot mount {mountpoint}: {exc}") from None
    try:
        trio.run(_run, device, ready_fd)
    finally:
        device.shut_down()
        pyfuse3.close(unmount=True)
        device.close()
        log.info("unmounted %s", mountpoint)
