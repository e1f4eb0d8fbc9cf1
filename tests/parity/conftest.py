"""Parity-suite settings: with BNKIT_PARITY_STRICT=1 (``make parity``) a skipped test fails."""

from __future__ import annotations

import os

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("BNKIT_PARITY_STRICT") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped:
        if reporter is not None:
            reporter.write_line(
                f"make parity: {skipped} parity test(s) skipped; every parity test must run "
                "against real TensorFlow (install the tf extra: pip install -e .[tf])",
                red=True,
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
