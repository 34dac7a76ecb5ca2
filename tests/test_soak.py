"""A small soak: the server's memory, open files and threads return to their baseline."""

from __future__ import annotations

import io

from dmoverfs.tools import soak


def test_server_returns_to_baseline_after_load():
    report = io.StringIO()
    ok = soak.run(sessions=3000, requests=64 * 8 * 100, out=report)
    assert ok, report.getvalue()
    assert "back to baseline" in report.getvalue()
