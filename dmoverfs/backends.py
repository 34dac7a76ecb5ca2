"""Back-ends: dmover(9)'s middle end on the server's side.

A back-end declares a name, an estimated speed (bytes per second) and the
functions it performs (name, number of inputs, whether it has an output). The
C core is the built-in back-end; other packages add back-ends through the
``dmoverfs.backends`` entry-point group, each entry point naming a
:class:`Backend` subclass or a factory returning a :class:`Backend` instance::

    [project.entry-points."dmoverfs.backends"]
    rot13 = "mypkg.dmover:Rot13Backend"

    class Rot13Backend(dmoverfs.backends.Backend):
        name = "rot13"
        speed = 200e6
        functions = {"rot13": FunctionSpec(ninputs=1)}

        async def run(self, job: Job) -> tuple[int, bytes]:
            data = job.read_input(0)
            job.write_output(rot13(data))
            return 0, job.immediate

All back-ends offering a name must agree on its shape (registration that
disagrees is refused). Every request of a session is assigned, when it is
written, to the back-end offering its function that minimises
``(bytes queued on it + bytes of the request) / speed`` -- dmover(9)'s "speed
and current load". A session whose function only the built-in back-end
offers never reaches Python per request.

:meth:`Backend.run` runs as a task of the server's trio event loop. Requests
arrive already decoded and validated by the C core (lengths, overlap, client
memory of the iovec arrays), and ``job.size`` bytes are readable from each
input and writable to the output. :meth:`Job.read_input` and
:meth:`Job.write_output` copy between the client's memory and Python
(``process_vm_readv``/``writev`` through the request's scatter/gather lists);
they block the event loop while they copy, so a back-end moving large
requests should call them through ``trio.to_thread.run_sync`` (the C calls
release the GIL), in pieces if it wants bounded memory.
"""

from __future__ import annotations

import errno
import importlib.metadata
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from dmoverfs.server.core import Core

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dmoverfs.backends"
BUILTIN = "builtin"
#: The built-in back-end's speed estimate: memory bandwidth through bounce buffers.
BUILTIN_SPEED = 5e9
MAX_INPUTS = 16


class BackendError(Exception):
    """A back-end cannot be loaded or registered."""


@dataclass(frozen=True)
class FunctionSpec:
    """The shape of a function: its inputs, and whether it writes an output."""

    ninputs: int
    has_output: bool = True

    def describe(self) -> str:
        inputs = f"{self.ninputs} input{'s' if self.ninputs != 1 else ''}"
        return f"{inputs}, {'output' if self.has_output else 'no output'}"


class Job:
    """One request handed to a back-end; valid until :meth:`Backend.run` returns.

    Attributes: ``function`` (name), ``req_id``, ``immediate`` (8 bytes),
    ``size`` (bytes of the output and of each input), ``ninputs``,
    ``has_output``, ``session`` (the session's inode number).
    """

    __slots__ = ("function", "req_id", "immediate", "size", "ninputs", "has_output", "session", "_core", "_ptr")

    def __init__(self, core: Core, ptr: Any, function: str, info: dict[str, Any]) -> None:
        self._core = core
        self._ptr = ptr
        self.function = function
        self.req_id: int = info["id"]
        self.immediate: bytes = info["immediate"]
        self.size: int = info["total"]
        self.ninputs: int = info["ninputs"]
        self.has_output: bool = bool(info["has_output"])
        self.session: int = info["session"]

    def _live(self) -> Any:
        if self._ptr is None:
            raise OSError(errno.ECANCELED, "the request was already completed")
        return self._ptr

    def read_input(self, i: int, offset: int = 0, size: int | None = None) -> bytes:
        """*size* bytes (default: to the end) of input *i* from *offset*.

        OSError: EINVAL (no such input, range beyond it), EFAULT (the
        client's memory), EPERM (no access to it), ECANCELED (session closed).
        """
        if size is None:
            size = max(0, self.size - offset)
        return self._core.req_read(self._live(), i, offset, size)

    def write_output(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        """Write *data* to the output at *offset* (errors as :meth:`read_input`)."""
        self._core.req_write(self._live(), offset, data)

    def __repr__(self) -> str:
        return f"<Job {self.function} id={self.req_id} size={self.size} session={self.session}>"


class Backend:
    """Base class of back-ends. Subclasses set the class attributes and :meth:`run`."""

    #: Unique name (``--backend NAME``); the entry point's name when left empty.
    name: str = ""
    #: Estimated bytes per second, for the scheduler.
    speed: float = 1e9
    #: Function name -> shape.
    functions: dict[str, FunctionSpec] = {}

    async def run(self, job: Job) -> tuple[int, bytes]:
        """Perform *job*; return (0 or an errno, the 8-byte response immediate).

        An OSError raised by the Job's methods fails the request with its
        errno; any other exception fails it with EIO (and is logged).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<back-end {self.name} speed={self.speed:.3g} B/s functions={sorted(self.functions)}>"


class BuiltinBackend(Backend):
    """The C core. Its requests go to the core's own workers (dm_req_run), never to :meth:`run`."""

    name = BUILTIN
    speed = BUILTIN_SPEED

    def __init__(self) -> None:
        from dmoverfs.server.core import functions

        self.functions = {f.name: FunctionSpec(f.ninputs, f.has_output) for f in functions()}

    async def run(self, job: Job) -> tuple[int, bytes]:  # pragma: no cover - never called
        raise RuntimeError("the built-in back-end runs in C")


@dataclass
class BackendStats:
    """Per back-end counters (Python-side; the built-in one's come from the core)."""

    assigned: int = 0
    bytes: int = 0
    busy_ns: int = 0
    queued: int = 0
    queued_bytes: int = 0
    failed: int = 0


@dataclass
class Registry:
    """The active back-ends of a mount, and the scheduler choosing among them."""

    backends: dict[str, Backend] = field(default_factory=dict)
    stats: dict[str, BackendStats] = field(default_factory=dict)
    #: Bytes queued on the built-in back-end (set by the server: the core's executing bytes).
    builtin_load: Callable[[], int] = lambda: 0
    _shapes: dict[str, tuple[FunctionSpec, str]] = field(default_factory=dict)

    def register(self, backend: Backend) -> None:
        """Add *backend*; ValueError if its name is taken or a function's shape disagrees."""
        name = backend.name
        if not isinstance(name, str) or not name:
            raise ValueError(f"back-end {backend!r} has no name")
        if name in self.backends:
            raise ValueError(f"back-end {name!r} is already registered")
        if not isinstance(backend.speed, (int, float)) or not backend.speed > 0:
            raise ValueError(f"back-end {name!r}: speed must be a positive number of bytes per second, not {backend.speed!r}")
        for func, spec in backend.functions.items():
            if not isinstance(spec, FunctionSpec):
                raise ValueError(f"back-end {name!r}: function {func!r} must be described by a FunctionSpec, not {spec!r}")
            if not func or len(func.encode()) > 63 or "/" in func or "\0" in func:
                raise ValueError(f"back-end {name!r}: {func!r} is not a valid function name (1 to 63 bytes, no '/')")
            if not 0 <= spec.ninputs <= MAX_INPUTS or (spec.ninputs == 0 and not spec.has_output):
                raise ValueError(f"back-end {name!r}: function {func!r} has {spec.describe()} (0 to 16 inputs, and an operand)")
            known = self._shapes.get(func)
            if known is not None and known[0] != spec:
                raise ValueError(
                    f"back-end {name!r} offers {func!r} with {spec.describe()}, "
                    f"but back-end {known[1]!r} offers it with {known[0].describe()}: all back-ends must agree"
                )
        for func, spec in backend.functions.items():
            self._shapes.setdefault(func, (spec, name))
        self.backends[name] = backend
        self.stats[name] = BackendStats()

    def functions(self) -> dict[str, FunctionSpec]:
        """Every function some back-end offers, in registration order."""
        return {func: spec for func, (spec, _) in self._shapes.items()}

    def offering(self, function: str) -> list[Backend]:
        """The back-ends that perform *function*, in registration order."""
        return [b for b in self.backends.values() if function in b.functions]

    def load(self, backend: Backend) -> int:
        """Bytes queued on *backend* now."""
        if isinstance(backend, BuiltinBackend):
            return self.builtin_load()
        return self.stats[backend.name].queued_bytes

    def choose(self, function: str, nbytes: int) -> Backend:
        """The back-end that would finish a request of *nbytes* soonest (earlier registered on ties)."""
        candidates = self.offering(function)
        if not candidates:
            raise OSError(errno.ESRCH, f"no back-end offers {function!r}")
        return min(candidates, key=lambda b: (self.load(b) + nbytes) / b.speed)


# -- discovery ------------------------------------------------------------------------


def entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """Installed back-end entry points by name."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load_entry_point(ep: importlib.metadata.EntryPoint) -> Backend:
    """Instantiate the back-end an entry point names; BackendError with the reason if it cannot."""
    try:
        obj = ep.load()
    except Exception as exc:  # a broken plugin must not take the server down
        raise BackendError(f"back-end {ep.name!r} ({ep.value}) cannot be imported: {type(exc).__name__}: {exc}") from None
    try:
        backend = obj() if callable(obj) else obj
    except Exception as exc:
        raise BackendError(f"back-end {ep.name!r} ({ep.value}) failed to start: {type(exc).__name__}: {exc}") from None
    if not isinstance(backend, Backend):
        raise BackendError(f"back-end {ep.name!r} ({ep.value}) is not a dmoverfs.backends.Backend: {backend!r}")
    if not backend.name:
        backend.name = ep.name
    if not backend.functions:
        raise BackendError(f"back-end {ep.name!r} ({ep.value}) offers no function")
    return backend


def installed() -> list[Backend | BackendError]:
    """The built-in back-end and every installed plugin (or why it cannot load)."""
    found: list[Backend | BackendError] = [BuiltinBackend()]
    for ep in sorted(entry_points().values(), key=lambda e: e.name):
        try:
            found.append(load_entry_point(ep))
        except BackendError as exc:
            found.append(exc)
    return found


def make_registry(include: Iterable[str] = (), exclude: Iterable[str] = ()) -> Registry:
    """The back-ends of a mount: all installed, or only *include*, less *exclude*.

    A plugin that cannot be loaded or registered is skipped with an error in
    the log, unless it was named in *include*: then BackendError, as for an
    unknown name.
    """
    include, exclude = list(dict.fromkeys(include)), set(exclude)
    eps = entry_points()
    known = {BUILTIN, *eps}
    for name in [*include, *exclude]:
        if name not in known:
            raise BackendError(f"no back-end named {name!r} is installed (installed: {', '.join(sorted(known))})")
    wanted = include or [BUILTIN, *sorted(eps)]
    registry = Registry()
    for name in wanted:
        if name in exclude:
            continue
        try:
            backend = BuiltinBackend() if name == BUILTIN else load_entry_point(eps[name])
            registry.register(backend)
        except (BackendError, ValueError) as exc:
            if include:
                raise BackendError(str(exc)) from None
            log.error("skipping back-end %r: %s", name, exc)
            continue
        log.info("back-end %s: speed %.3g B/s, functions %s", backend.name, backend.speed, ", ".join(backend.functions))
    if not registry.backends:
        raise BackendError("no back-end is left to serve requests")
    return registry


# -- the dispatcher -------------------------------------------------------------------


@dataclass
class FunctionCounters:
    """Counters of a function the C table lacks (the core counts the others)."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    bytes: int = 0


class Dispatcher:
    """Assigns the requests of external sessions to back-ends and completes them."""

    def __init__(self, core: Core, registry: Registry, function_of: Callable[[int], str | None]) -> None:
        self.core = core
        self.registry = registry
        self.function_of = function_of
        self.nursery: trio.Nursery | None = None
        #: Counters of the functions only plugins perform.
        self.plugin_functions: dict[str, FunctionCounters] = {}

    def dispatch(self) -> None:
        """Assign every request external sessions have had accepted since the last call."""
        for ptr in self.core.take_external():
            self._assign(ptr)

    def _assign(self, ptr: Any) -> None:
        info = self.core.req_info(ptr)
        function = self.function_of(info["session"])
        counters = None
        if info["func"] < 0 and function is not None:
            counters = self.plugin_functions.setdefault(function, FunctionCounters())
            counters.submitted += 1
        if function is None or info["err"] or self.nursery is None:
            # A function constraint (e.g. a missing output) fails before any back-end sees it.
            err = info["err"] or errno.ECANCELED
            self._complete(ptr, err, None, info["total"], counters)
            return
        backend = self.registry.choose(function, info["total"])
        if isinstance(backend, BuiltinBackend):
            self.core.req_run(ptr)  # counted by the core
            return
        stats = self.registry.stats[backend.name]
        stats.assigned += 1
        stats.bytes += info["total"]
        stats.queued += 1
        stats.queued_bytes += info["total"]
        self.nursery.start_soon(self._run, backend, Job(self.core, ptr, function, info), counters)

    async def _run(self, backend: Backend, job: Job, counters: FunctionCounters | None) -> None:
        stats = self.registry.stats[backend.name]
        err, imm = errno.ECANCELED, None
        start = time.monotonic_ns()
        try:
            result = await backend.run(job)
            err, imm = _check_result(backend, job, result)
        except OSError as exc:
            err = exc.errno or errno.EIO
        except Exception as exc:  # noqa: BLE001 - a back-end's bug fails its request, never the server
            err = errno.EIO
            log.error("back-end %s failed on %r: %s: %s", backend.name, job, type(exc).__name__, exc)
            log.debug("back-end %s failure", backend.name, exc_info=True)
        finally:
            stats.busy_ns += time.monotonic_ns() - start
            stats.queued -= 1
            stats.queued_bytes -= job.size
            if err:
                stats.failed += 1
            ptr, job._ptr = job._ptr, None
            self._complete(ptr, err, imm, job.size, counters)

    def _complete(self, ptr: Any, err: int, imm: bytes | None, size: int, counters: FunctionCounters | None) -> None:
        if counters is not None:
            if err:
                counters.failed += 1
            else:
                counters.completed += 1
                counters.bytes += size
        self.core.req_complete(ptr, err, imm)


def _check_result(backend: Backend, job: Job, result: Any) -> tuple[int, bytes | None]:
    """(errno, immediate) from what run() returned; EIO (logged) if it makes no sense."""
    try:
        err, imm = result
        err = int(err)
        imm = bytes(imm)
    except Exception:  # noqa: BLE001
        log.error("back-end %s returned %r for %r: want (errno, immediate bytes)", backend.name, result, job)
        return errno.EIO, None
    if err < 0 or len(imm) > 8:
        log.error("back-end %s returned %r for %r: errno >= 0 and at most 8 bytes of immediate", backend.name, result, job)
        return errno.EIO, None
    return err, imm.ljust(8, b"\0")


def describe(backend: Backend) -> str:
    """One line per function, for ``dmoverfs backends``."""
    return "\n".join(f"    {name}: {spec.describe()}" for name, spec in backend.functions.items())


__all__ = [
    "Backend",
    "BackendError",
    "BuiltinBackend",
    "Dispatcher",
    "FunctionSpec",
    "Job",
    "Registry",
    "make_registry",
    "installed",
    "ENTRY_POINT_GROUP",
]
