"""The ``stats`` file: what it contains (``dmoverfs.status`` shows it)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from dmoverfs import __version__

if TYPE_CHECKING:
    from dmoverfs.server.device import Device
    from dmoverfs.server.session import Session

#: Sessions listed in ``stats`` at most (the most recently active); the rest are only counted.
SESSIONS_LISTED = 100


def snapshot(device: Device) -> dict[str, Any]:
    """Counters of a running mount, as a JSON-ready dict."""
    core, per_function = device.core.stats()
    calls = device.core.io_stats()
    sessions = list(device.sessions.values())
    ready = sum(s.counts()[1] for s in sessions)
    return {
        "server": {
            "pid": os.getpid(),
            "version": __version__,
            "mountpoint": device.mountpoint,
            "uptime_s": round((time.time_ns() - device.started_ns) / 1e9, 3),
            "shutting_down": device.shutting_down,
        },
        "transport": _transport(device),
        "sessions": {
            "open": len(sessions),
            "total": device.counters.sessions_total,
            **_session_list(sessions),
        },
        "inodes": device.inode_count(),
        "requests": {
            "outstanding": core["outstanding"],
            "in_flight": core["executing"],
            "ready": ready,
            # Writes that waited for room in their session's queue, reads for responses.
            "queue_waits": calls["parked_writes"],
            "read_waits": calls["parked_reads"],
            "refused_by_limits": core["refused_limits"],
            "refused_by_user_limits": core["refused_user_limits"],
            "metadata_bytes": core["meta_bytes"],
            # Slices of requests and steps of write decoding the workers ran, turn by turn.
            "worker_slices": core["slices"],
        },
        "users": _users(device),
        "calls": calls,
        "functions": per_function | {name: vars(c).copy() for name, c in device.dispatcher.plugin_functions.items()},
        "backends": _backends(device, core),
        "limits": device.tunables.as_dict(),
    }


#: Users listed in ``stats`` at most (the most outstanding first); the rest are counted.
USERS_LISTED = 32


def _users(device: Device) -> dict[str, Any]:
    """Each user's share of the caps: sessions, outstanding requests, metadata, refusals."""
    listed, count = device.core.users(USERS_LISTED)
    return {"count": count, "not_listed": count - len(listed), "listed": listed}


def _session_list(sessions: list[Session]) -> dict[str, Any]:
    """The open sessions, each with its opener, function, queue and counters; at most SESSIONS_LISTED."""
    now = time.time_ns()
    rows = []
    for session in sessions:
        if session.closed:
            continue
        st = session.core.stats()
        last = max(st["atime_ns"], st["mtime_ns"], st["ctime_ns"])
        rows.append(
            (
                last,
                {
                    "id": session.sid,
                    "pid": session.client.pid,
                    "command": session.client.command,
                    "uid": session.client.uid,
                    "function": session.function.name if session.function else None,
                    "nonblock": bool(st["nonblock"]),
                    "outstanding": st["outstanding"],
                    "ready": st["ready"],
                    "completed": st["completed"],
                    "failed": st["failed"],
                    "bytes": st["bytes"],
                    "files": len(session.files),
                    "age_s": round((now - st["ctime_ns"]) / 1e9, 3),
                    "idle_s": round(max(0, now - last) / 1e9, 3),
                },
            )
        )
    # The most recently active first when capped; listed in the order they were opened.
    rows.sort(key=lambda row: row[0], reverse=True)
    listed = sorted((row for _, row in rows[:SESSIONS_LISTED]), key=lambda row: row["id"])
    return {"listed": listed, "not_listed": max(0, len(rows) - SESSIONS_LISTED)}


def _transport(device: Device) -> dict[str, Any]:
    """The data plane: the FUSE protocol in use, its threads, what it served and relayed."""
    if device.transport is None:
        return {"running": False}
    counters = device.transport.stats()
    state = device.transport.state()
    return {
        "running": state.running,
        "protocol": f"{counters.pop('proto_major')}.{counters.pop('proto_minor')}",
        # What the data plane relies on, all in use whenever it runs.
        "features": ["file flags per call", "FOPEN_STREAM", "poll notification", "FUSE_INTERRUPT", "libfuse via /dev/fd/N"],
        **counters,
    }


def _backends(device: Device, core: dict[str, int]) -> dict[str, Any]:
    """Per back-end: what it offers, its speed, and assigned / bytes / busy time / queue length."""
    from dmoverfs.backends import BuiltinBackend

    out: dict[str, Any] = {}
    for name, backend in device.registry.backends.items():
        functions = {f: {"ninputs": s.ninputs, "has_output": s.has_output} for f, s in backend.functions.items()}
        if isinstance(backend, BuiltinBackend):
            # The core counts every request it runs, its sessions' and those handed to it.
            out[name] = {
                "speed": backend.speed,
                "assigned": core["inline_runs"] + core["worker_runs"] + core["executing"],
                "bytes": core["run_bytes"],
                "busy_s": round(core["busy_ns"] / 1e9, 6),
                "queue_length": core["executing"],
                "queued_bytes": core["executing_bytes"],
                "kernels": device.core.kernels,
                "workers": device.tunables.workers,
                "inline_runs": core["inline_runs"],
                "worker_runs": core["worker_runs"],
                "shared_runs": core["shared_runs"],
                "in_flight": core["executing"],
                "functions": functions,
            }
            continue
        st = device.registry.stats[name]
        out[name] = {
            "speed": backend.speed,
            "assigned": st.assigned,
            "bytes": st.bytes,
            "busy_s": round(st.busy_ns / 1e9, 6),
            "queue_length": st.queued,
            "queued_bytes": st.queued_bytes,
            "failed": st.failed,
            "functions": functions,
        }
    return out
