"""Running the server: :func:`serve` mounts and runs until unmounted or told
to stop (SIGTERM, SIGINT, SIGHUP).

pyfuse3 reaches the kernel only through the transport, which gives libfuse
one end of a socket pair as the mount point ``/dev/fd/N``; the transport's
threads serve the sessions' data calls, pyfuse3's loop the rest.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal

import pyfuse3
import trio
import trio.testing

from dmoverfs import __version__
from dmoverfs.backends import Registry
from dmoverfs.server.device import Device
from dmoverfs.server.fs import DmoverOperations
from dmoverfs.server.transport import MIN_PROTO_MINOR, Transport, TransportError
from dmoverfs.tunables import Tunables

log = logging.getLogger(__name__)

#: How long the control plane's handlers get to answer before the loop stops.
SHUTDOWN_GRACE_S = 1.0
#: pyfuse3 tasks: every handler answers at once (no session call ever waits
#: in Python), so a few cover any load.
MAX_TASKS = 64
#: Set to a FUSE protocol minor to require (the refusal path's tests).
MIN_PROTO_ENV = "DMOVERFS_MIN_FUSE_MINOR"


async def _pump_core_events(device: Device) -> None:
    fd = device.core.eventfd
    while True:
        await trio.lowlevel.wait_readable(fd)
        device.on_core_event()


async def _stop(device: Device, why: str) -> None:
    log.info("%s: shutting down", why)
    device.shut_down()
    # Let the control plane's handlers answer their clients before the loop stops.
    with trio.move_on_after(SHUTDOWN_GRACE_S):
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    pyfuse3.terminate()


async def _stop_on_signal(device: Device) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            await _stop(device, signal.Signals(signum).name)
            return


async def _stop_when_transport_stops(device: Device, transport: Transport) -> None:
    await trio.lowlevel.wait_readable(transport.eventfd)
    state = transport.state()
    if state.unmounted:
        await _stop(device, "unmounted")
    else:
        log.error("dmoverfs cannot serve %s: %s", device.mountpoint, state.message)
        device.failure = state.message
        await _stop(device, "transport stopped")


async def _announce_ready(device: Device, ready_fd: int | None) -> None:
    await device.fuse_initialised.wait()
    log.info("dmoverfs %s serving %s (pid %d, kernels: %s)", __version__, device.mountpoint, os.getpid(), device.core.kernels)
    if ready_fd is not None:
        try:
            os.write(ready_fd, b"ready\n")
        finally:
            os.close(ready_fd)


async def _run(device: Device, transport: Transport, ready_fd: int | None) -> None:
    async with trio.open_nursery() as nursery:
        device.dispatcher.nursery = nursery  # plug-in back-ends' requests run as its tasks
        nursery.start_soon(_pump_core_events, device)
        nursery.start_soon(_stop_on_signal, device)
        nursery.start_soon(_stop_when_transport_stops, device, transport)
        nursery.start_soon(_announce_ready, device, ready_fd)
        await pyfuse3.main(min_tasks=4, max_tasks=MAX_TASKS)
        nursery.cancel_scope.cancel()


def _raise_open_file_limit(tunables: Tunables) -> None:
    """Every session holds a pidfd: take the hard limit on open files, and say if it is short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard != resource.RLIM_INFINITY and hard < tunables.max_sessions + 64:
        log.warning("open files are limited to %d: fewer than --max-sessions %d can be open", hard, tunables.max_sessions)


def _mount_options(allow_other: bool) -> list[str]:
    options = ["fsname=dmoverfs", "subtype=dmoverfs", *sorted(pyfuse3.default_options)]
    if allow_other:
        options.append("allow_other")
    return options


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
    answers requests, and the descriptor is closed. Raises OSError when the
    mount cannot be made or cannot work here (the message says why).
    """
    _raise_open_file_limit(tunables)
    device = Device(tunables, mountpoint, registry)
    ops = DmoverOperations(device)
    min_minor = int(os.environ.get(MIN_PROTO_ENV, MIN_PROTO_MINOR))
    try:
        mount_options = _mount_options(allow_other)
        transport = Transport(device.core, mountpoint, mount_options, min_proto_minor=min_minor)
    except TransportError as exc:
        device.close()
        raise OSError(exc.errno or errno.EIO, f"cannot mount {mountpoint}: {exc.strerror}") from None
    device.transport = transport
    # The same options for libfuse, which mounts nothing here (the transport did), plus its own.
    options = set(mount_options) | ({"debug"} if debug else set())
    try:
        pyfuse3.init(ops, transport.libfuse_mountpoint(), options)
    except RuntimeError as exc:
        transport.forget_libfuse_fd()
        transport.free()
        device.close()
        raise OSError(errno.EIO, f"libfuse refused the transport's connection for {mountpoint}: {exc}") from None
    try:
        transport.start()
        trio.run(_run, device, transport, ready_fd)
    finally:
        device.shut_down()
        pyfuse3.close(unmount=False)
        # The core's threads answer through the transport: stop it, free the core, then it.
        transport.stop()
        device.close()
        transport.free()
        log.info("unmounted %s", mountpoint)
    if device.failure is not None:
        raise OSError(errno.EPROTO, f"cannot serve {mountpoint}: {device.failure}")


__all__ = ["serve"]
