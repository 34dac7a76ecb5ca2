"""``dmoverfs status``: a readable rendering of a mount's ``stats`` file.

Reads JSON only: never imports the server (pyfuse3, the C core).
"""

from __future__ import annotations

from typing import Any


def _transport_line(transport: dict[str, Any]) -> str:
    if not transport.get("running"):
        return "transport: not running"
    return (
        f"transport: FUSE {transport['protocol']}, {transport['readers']} reader threads "
        f"({transport['idle_readers']} idle), {transport['files']} open session files; "
        f"{transport['session_calls']} session calls served, {transport['forwarded']} requests passed to pyfuse3"
    )


def _calls_line(calls: dict[str, Any]) -> str:
    return (
        f"calls: {calls['reads']} reads, {calls['writes']} writes, {calls['polls']} polls answered "
        f"({calls['errors']} with an error); waiting now: {calls['waiting_reads']} reads, {calls['waiting_writes']} writes; "
        f"interrupts {calls['interrupts']} ({calls['interrupts_eintr']} ended, {calls['interrupts_ignored']} kept waiting)"
    )


def format_table(data: dict[str, Any]) -> str:
    """A readable rendering of a ``stats`` snapshot."""
    server = data["server"]
    lines = [
        f"dmoverfs {server['version']} at {server['mountpoint']} (pid {server['pid']}, up {server['uptime_s']:.0f} s)",
        f"sessions: {data['sessions']['open']} open, {data['sessions']['total']} since mount; inodes: {data['inodes']}",
        "requests: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in data["requests"].items()),
        _transport_line(data["transport"]),
        _calls_line(data["calls"]),
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
    users = data.get("users")
    if users and users["listed"]:
        lines += ["", f"{'uid':>8}{'sessions':>10}{'outstanding':>13}{'queued':>9}{'metadata':>12}{'refused':>9}"]
        for u in users["listed"]:
            lines.append(
                f"{u['uid']:>8}{u['sessions']:>10}{u['outstanding']:>13}{u['queued']:>9}{u['meta_bytes']:>12}{u['refused']:>9}"
            )
        if users["not_listed"]:
            lines.append(f"({users['not_listed']} more users)")
    return "\n".join(lines)
