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


def _count(n: int) -> str:
    """A byte count in a few characters: 1234567 -> '1.2M'."""
    for unit in ("", "K", "M", "G", "T"):
        if n < 1000 or unit == "T":
            return f"{n}" if not unit else f"{n:.1f}{unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)  # pragma: no cover - the loop always returns


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def format_sessions(data: dict[str, Any]) -> str:
    """The open sessions of a ``stats`` snapshot as a table, one row per session."""
    sessions = data["sessions"]
    header = (
        f"{'SESSION':>7} {'PID':>7} {'COMMAND':<15} {'FUNCTION':<13} {'NB':<2} {'OUTST':>5} "
        f"{'DONE':>9} {'FAILED':>7} {'BYTES':>8} {'AGE':>6} {'IDLE':>6}"
    )
    lines = [f"{sessions['open']} sessions open at {data['server']['mountpoint']}", header]
    for row in sessions.get("listed", []):
        lines.append(
            f"{row['id']:>7} {row['pid']:>7} {row['command'][:15]:<15} {(row['function'] or '-')[:13]:<13} "
            f"{'y' if row['nonblock'] else '-':<2} {row['outstanding']:>5} {row['completed']:>9} {row['failed']:>7} "
            f"{_count(row['bytes']):>8} {_age(row['age_s']):>6} {_age(row['idle_s']):>6}"
        )
    if sessions.get("not_listed"):
        lines.append(f"... and {sessions['not_listed']} more (stats lists the {len(sessions['listed'])} most recently active)")
    return "\n".join(lines)
