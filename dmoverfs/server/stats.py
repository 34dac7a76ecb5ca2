"""The ``stats`` file: what it contains, and how ``dmoverfs status`` shows it."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from dmoverfs import __version__
from dmoverfs.fuse import interrupts_enabled, stream_opens

if TYPE_CHECKING:
    from dmoverfs.server import Device


def snapshot(device: Device) -> dict[str, Any]:
    """Counters of a running mount, as a JSON-ready dict."""
    core, per_function = device.core.stats()
    sessions = list(device.sessions.values())
    ready = sum(s.counts()[1] for s in sessions)
    return {
        "server": {
            "pid": os.getpid(),
            "version": __version__,
            "mountpoint": device.mountpoint,
            "uptime_s": round((time.time_ns() - device.started_ns) / 1e9, 3),
            "shutting_down": device.shutting_down,
            "stream_opens": stream_opens(),
            "interrupts": interrupts_enabled(),
        },
        "sessions": {
            "open": len(sessions),
            "total": device.counters.sessions_total,
        },
        "inodes": device.inode_count(),
        "fast_path": device.fast.stats() if device.fast is not None else {"running": False},
        "requests": {
            "outstanding": core["outstanding"],
            "in_flight": core["executing"],
            "ready": ready,
            "queue_waits": device.counters.queue_waits,
            "read_waits": device.counters.read_waits,
            "refused_by_limits": core["refused_limits"],
            "metadata_bytes": core["meta_bytes"],
        },
        "functions": per_function | {name: vars(c).copy() for name, c in device.dispatcher.plugin_functions.items()},
        "backends": _backends(device, core),
        "limits": device.tunables.as_dict(),
    }


def _backends(device: Device, core: dict[str, int]) -> dict[str, Any]:
    """Per back-end: what it offers, its speed, and assigned / bytes / busy time / queue length."""
    from dmoverfs.backends import BuiltinBackend

    out: dict[str, Any] = {}
    for name, backend in device.registry.backends.items():
        functions = {f: {"ninputs": s.ninputs, "has_output": s.has_output} for f, s in backend.functions.items()}
        if isinstance(backend, BuiltinBackend):
            # The core counts every request it runs, fast-path sessions' included.
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


def _fast_path_line(fast: dict[str, Any]) -> str:
    if not fast["running"]:
        return "fast path: off (Python serves every read and write)"
    return (
        f"fast path: {fast['files']} open files; answered in C {fast['writes']} writes, {fast['reads']} reads "
        f"({fast['errors']} with an error); {fast['forwarded']} requests passed to Python"
    )


def format_table(data: dict[str, Any]) -> str:
    """A readable rendering of a :func:`snapshot` for ``dmoverfs status``."""
    server = data["server"]
    lines = [
        f"dmoverfs {server['version']} at {server['mountpoint']} (pid {server['pid']}, up {server['uptime_s']:.0f} s)",
        f"sessions: {data['sessions']['open']} open, {data['sessions']['total']} since mount; inodes: {data['inodes']}",
        "requests: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in data["requests"].items()),
        _fast_path_line(data["fast_path"]),
        "",
        f"{'function':<14}{'submitted':>12}{'completed':>12}{'failed':>9}{'bytes':>16}",
    ]
    for name, row in data["functions"].items():
        lines.append(f"{name:<14}{row['submitted']:>12}{row['completed']:>12}{row['failed']:>9}{row['bytes']:>16}")
    lines.append("")
    for name, backend in data["backends"].items():
        details = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in backend.items() if k != "functions")
        if backend.get("functions"):
            details += "; functions " + " ".join(backend["functions"])
        lines.append(f"back-end {name}: {details}")
    lines.append("limits: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in data["limits"].items()))
    return "\n".join(lines)
