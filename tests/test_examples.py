"""The examples run end to end (``--fast``) and write a complete run folder."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import fnloop as fl
from fnloop import optim

pytest.importorskip("sklearn", reason="the examples need scikit-learn")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run_example(script: str, *args: str, cwd: Path, timeout: float = 300) -> str:
    """Runs ``examples/<script>`` in a fresh interpreter; returns its stdout."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def load_example(name: str) -> ModuleType:
    """Imports ``examples/<name>.py`` as a module (the examples are not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_run_folder(run_dir: Path, run_name: str) -> None:
    assert (run_dir / f"{run_name}_training.log").is_file()
    assert (run_dir / "metrics.csv").is_file()
    assert (run_dir / "best_model.pt").is_file()
    assert list((run_dir / "checkpoints").glob("*.pt")), "no checkpoint written"
    if HAS_MATPLOTLIB:
        assert (run_dir / "history.png").is_file()
    log = (run_dir / f"{run_name}_training.log").read_text(encoding="utf-8")
    assert "(val) loss:" in log  # the seed's epoch line
    header = (run_dir / "metrics.csv").read_text(encoding="utf-8").splitlines()[0]
    assert "valid/loss" in header, header


def number_after(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not found in:\n{text}"
    return float(match.group(1))


def test_digits_fast(tmp_path: Path) -> None:
    run_dir = tmp_path / "digits"
    stale = run_dir / "checkpoints" / "stale.txt"  # a previous run that --fresh removes
    stale.parent.mkdir(parents=True)
    stale.write_text("old run")
    args = ("--fast", "--fresh", "--out-dir", str(run_dir))
    out = run_example("digits.py", *args, cwd=tmp_path)
    check_run_folder(run_dir, "digits")
    assert not stale.exists()
    assert "Resumed from" not in out
    assert "best_model.pt" in out and "metrics.csv" in out  # the run folder is listed
    assert number_after(r"Validation accuracy: best ([\d.]+)", out) > 0.5
    assert number_after(r"plain nn.Module: validation accuracy ([\d.]+)", out) > 0.5


def test_digits_data_parallel_under_torchrun(tmp_path: Path) -> None:
    run_dir = tmp_path / "digits"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(EXAMPLES / "digits.py"),
            "--fast",
            "--out-dir",
            str(run_dir),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    check_run_folder(run_dir, "digits")
    assert result.stdout.count("Validation accuracy: best") == 1  # rank 0 reports
    log = (run_dir / "digits_training.log").read_text(encoding="utf-8")
    assert log.count("[  1/3]") == 1  # one writer
    assert number_after(r"plain nn.Module: validation accuracy ([\d.]+)", result.stdout) > 0.5


def test_digits_rerun_continues_the_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "digits"
    run_example("digits.py", "--fast", "--epochs", "1", "--out-dir", str(run_dir), cwd=tmp_path)
    out = run_example(
        "digits.py", "--fast", "--epochs", "2", "--out-dir", str(run_dir), cwd=tmp_path
    )
    assert "Resumed from" in out
    assert "after 2 epochs" in out
    rows = (run_dir / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 3, rows  # the header and one row per epoch, across both runs


def test_anomaly_fast(tmp_path: Path) -> None:
    run_dir = tmp_path / "anomaly"
    out = run_example("anomaly.py", "--fast", "--out-dir", str(run_dir), cwd=tmp_path)
    check_run_folder(run_dir, "anomaly")
    assert number_after(r"ROC AUC ([\d.]+)", out) > 0.6


@pytest.mark.parametrize("name", ["digits", "anomaly"])
def test_docstring_commands_parse(name: str) -> None:
    """The commands at the top of each script take its flags; a torchrun command names a
    run folder of its own (the default one holds the finished single-process run)."""
    module = load_example(name)
    commands = [
        line.split("#")[0].split()
        for line in (module.__doc__ or "").splitlines()
        if f"examples/{name}.py" in line
    ]
    assert commands, f"{name}.py's docstring shows no command"
    for words in commands:
        args = module.parse_args(words[words.index(f"examples/{name}.py") + 1 :])
        if words[0] == "torchrun":
            assert args.out_dir != module.parse_args([]).out_dir, words


def test_anomaly_run_folder_names_the_unseen_digit() -> None:
    """Resuming the 9s' run with ``--anomaly 3`` would score a model that saw the 3s."""
    parse_args = load_example("anomaly").parse_args
    assert parse_args([]).out_dir == "runs/anomaly"
    assert parse_args(["--anomaly", "3"]).out_dir == "runs/anomaly-3"
    assert parse_args(["--anomaly", "3", "--fast"]).out_dir == "runs/anomaly-3-fast"
    assert parse_args(["--anomaly", "3", "--out-dir", "mine"]).out_dir == "mine"


@pytest.mark.parametrize("name", ["digits", "anomaly"])
def test_run_folder_names_the_seed(name: str) -> None:
    """The seed picks the split: seed 0's run resumed with ``--seed 1`` would validate and
    score on images it trained on (anomaly.py: 182 of 243 normal test images)."""
    parse_args = load_example(name).parse_args
    assert parse_args([]).out_dir == f"runs/{name}"
    assert parse_args(["--seed", "1"]).out_dir == f"runs/{name}-seed1"
    assert parse_args(["--seed", "1", "--fast"]).out_dir == f"runs/{name}-seed1-fast"
    assert parse_args(["--seed", "1", "--out-dir", "mine"]).out_dir == "mine"
    if name == "anomaly":
        assert parse_args(["--anomaly", "3", "--seed", "2"]).out_dir == "runs/anomaly-3-seed2"


@pytest.mark.slow
def test_digits_full_reaches_97_percent_ci_subset(tmp_path: Path) -> None:
    run_dir = tmp_path / "digits"
    out = run_example("digits.py", "--out-dir", str(run_dir), cwd=tmp_path, timeout=600)
    check_run_folder(run_dir, "digits")
    assert number_after(r"Validation accuracy: best ([\d.]+)", out) >= 0.97
    assert number_after(r"plain nn.Module: validation accuracy ([\d.]+)", out) >= 0.97


@pytest.mark.slow
def test_anomaly_full_auc(tmp_path: Path) -> None:
    out = run_example("anomaly.py", "--out-dir", str(tmp_path / "a"), cwd=tmp_path)
    assert number_after(r"ROC AUC ([\d.]+)", out) > 0.8


@pytest.mark.slow
def test_digits_extras(tmp_path: Path) -> None:
    """The step-alone, torch.compile and vmap demos at the bottom of digits.py."""
    pytest.importorskip("torch._inductor", reason="torch.compile needs inductor")
    args = ("--fast", "--extras", "--out-dir", str(tmp_path / "d"))
    out = run_example("digits.py", *args, cwd=tmp_path, timeout=600)
    assert "[step alone]" in out and "[compiled]" in out and "[vmap]" in out
    assert "best: lr" in out  # the sweep's per-model validation accuracies were compared


def test_digits_training_step_in_isolation() -> None:
    """What examples/README.md shows: a step tested with no fit, no files, no logging."""
    digits = load_example("digits")
    torch.manual_seed(0)
    state = fl.TrainState.create(digits.make_model(), tx=optim.adamw(1e-2), device="cpu")
    batch = (torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    train_step = fl.make_train_step(digits.training_step)

    new_state, metrics = train_step(state, batch)
    assert (state.step, new_state.step) == (0, 1)  # the input state is unchanged
    assert metrics["loss"].shape == () and 0.0 <= float(metrics["acc"]) <= 1.0

    for _ in range(30):  # it can overfit one batch
        new_state, metrics = train_step(new_state, batch)
    assert float(metrics["loss"]) < 0.5
