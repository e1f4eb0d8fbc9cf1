"""`make parity` must fail when a parity test skips (e.g. TensorFlow missing)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).parent / "parity" / "conftest.py"


def _run(tmp_path: Path, strict: bool) -> subprocess.CompletedProcess[str]:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_gate.py").write_text(
        "import pytest\n\n"
        "def test_needs_tf():\n    pytest.skip('TensorFlow is not installed')\n\n"
        "def test_plain():\n    pass\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "BNKIT_PARITY_STRICT"}
    if strict:
        env["BNKIT_PARITY_STRICT"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("strict", [True, False], ids=["make-parity", "plain-pytest"])
def test_skipped_parity_test_fails_only_under_make_parity(tmp_path: Path, strict: bool) -> None:
    result = _run(tmp_path, strict)
    assert "1 passed, 1 skipped" in result.stdout
    if strict:
        assert result.returncode == 1, result.stdout
        assert "1 parity test(s) skipped" in result.stdout
    else:
        assert result.returncode == 0, result.stdout
