"""The public API's types as a user sees them: ``tests/typed_usage.py``, typed user code
that subclasses ``TrainState``, reads a made step's options, writes a transform and
callbacks of its own and trains several models at once, runs, and ``mypy --strict``
accepts it without a cast or an ignore."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import typed_usage

import fnloop as fl

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


@pytest.mark.parametrize("package", ["fnloop", "fnloop.callbacks", "fnloop.optim"])
def test_all_lists_every_reexport(package: str) -> None:
    # The `x as x` imports of a package's __init__ are its public API; `__all__` must
    # name each of them (the top level leaves out two modules, see the next test).
    module = importlib.import_module(package)
    source = Path(module.__file__ or "").read_text()
    reexports = {
        alias.name
        for node in ast.parse(source).body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.asname == alias.name
    }
    left_out = {"state", "typing"} if package == "fnloop" else set()
    assert sorted(module.__all__) == sorted(reexports - left_out)


def test_star_import_does_not_shadow_typing_or_state() -> None:
    namespace: dict[str, object] = {"state": "a user's state"}
    exec("import typing\nfrom fnloop import *", namespace)
    assert namespace["typing"] is typing
    assert namespace["state"] == "a user's state"
    assert namespace["TrainState"] is fl.TrainState
    assert namespace["optim"] is fl.optim
