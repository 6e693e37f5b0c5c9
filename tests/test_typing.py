"""The public API's types as a user sees them: ``tests/typed_usage.py``, typed user code
that subclasses ``TrainState``, reads a made step's options, writes a transform and
callbacks of its own and trains several models at once, runs, and ``mypy --strict``
accepts it without a cast or an ignore."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typed_usage

ROOT = Path(__file__).resolve().parents[1]


def test_typed_usage_runs(tmp_path: Path) -> None:
    typed_usage.main(tmp_path)


@pytest.mark.slow
def test_typed_usage_passes_mypy_strict_ci_subset(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    config = tmp_path / "mypy.ini"
    # fnloop as an installed package is seen by its users: its own code is not checked
    # here (CI runs mypy on it with the project's settings), only what it exports.
    config.write_text(
        f"[mypy]\nstrict = True\nmypy_path = {ROOT}\ncache_dir = {ROOT / '.mypy_cache'}\n"
        "[mypy-fnloop.*]\nfollow_imports = silent\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(config),
            str(ROOT / "tests" / "typed_usage.py"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
