"""``benchmarks/gpu.py --device cpu``: the GPU checks' code runs on the CPU (the CUDA-only
parts print SKIP), so a renamed helper or a changed signature fails here, in CI, and not
in a scarce GPU session."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def load_script() -> ModuleType:
    """A fresh import of ``benchmarks/gpu.py`` (not a package), with its own report lines."""
    spec = importlib.util.spec_from_file_location("gpu_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_step_script(monkeypatch) -> ModuleType:
    """A fresh import of ``benchmarks/step.py``; the folder it puts first on ``sys.path``
    comes off again after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("step_script", SCRIPT.parent / "step.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def failed_rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.endswith("| FAIL |")]


def test_cheap_checks_pass_on_cpu(monkeypatch, capsys):
    gpu = load_script()
    argv = ["gpu.py", "--device", "cpu", "--quick", "--no-compile"]
    monkeypatch.setattr(sys, "argv", [*argv, "--only", "check_optimizers", "count_kernels"])
    gpu.main()  # a FAIL row would exit with status 1
    out = capsys.readouterr().out
    assert not failed_rows(out), out
    assert out.count("vs torch.optim (50 steps, fp32) |") == 5, out
    assert "| count_kernels | skipped on cpu | SKIP |" in out


def test_a_failed_check_exits_with_status_1(monkeypatch, capsys):
    gpu = load_script()

    def check_optimizers(dev):  # as if fnloop had renamed an optimizer
        raise AttributeError("module 'fnloop.optim' has no attribute 'adamw'")

    monkeypatch.setattr(gpu, "check_optimizers", check_optimizers)
    argv = ["gpu.py", "--device", "cpu", "--only", "check_optimizers", "count_kernels"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        gpu.main()
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    error = "AttributeError: module 'fnloop.optim' has no attribute 'adamw'"
    assert failed_rows(out) == [f"| check_optimizers | {error} | FAIL |"]
    assert "| count_kernels | skipped on cpu | SKIP |" in out  # it went on after the failure


def test_an_unknown_check_name_is_refused(monkeypatch, capsys):
    gpu = load_script()
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--device", "cpu", "--only", "check_optimisers"])
    with pytest.raises(SystemExit) as exit_info:
        gpu.main()
    assert exit_info.value.code == 2
    assert "unknown checks ['check_optimisers']" in capsys.readouterr().err


def test_the_step_benchmark_times_step_py_s_models(monkeypatch):
    """The GPU table is step.py's benchmark on another device: the same modules (conv
    biases included), initial weights and batch shapes."""
    gpu, step = load_script(), load_step_script(monkeypatch)
    timed = []

    def hand_steps(module, batch):
        timed.append((repr(module), [p.sum().item() for p in module.parameters()], batch[0].shape))
        return {"foreach": lambda: None, "fused": lambda: None}

    monkeypatch.setattr(gpu, "hand_steps", hand_steps)
    monkeypatch.setattr(gpu, "time_blocks", lambda fns, *args: dict.fromkeys(fns, 1.0))
    monkeypatch.setattr(gpu.fl, "make_train_step", lambda *a, **k: lambda s, b: (s, {}))
    gpu.bench_steps(torch.device("cpu"), blocks=1, steps=1, compile_too=False)
    expected = []
    for name in ("tiny", "mlp", "cnn"):
        _, factory, batch, shape = step.C.MODELS[name]
        torch.manual_seed(0)
        module = factory()
        sums = [p.sum().item() for p in module.parameters()]
        expected.append((repr(module), sums, torch.Size([batch, *shape])))
    assert timed == expected


@pytest.mark.slow  # ~30 s on 2 cores: every CPU-capable check, the benchmarks one block each
def test_every_check_passes_or_skips_on_cpu_ci_subset():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--no-compile"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # as cheap on a shared host as alone
    )
    assert done.returncode == 0 and not failed_rows(done.stdout), done.stdout + done.stderr
    skipped = [line for line in done.stdout.splitlines() if line.endswith("| SKIP |")]
    assert len(skipped) == 10, skipped  # the 9 sync checks' rows and the kernel count
    assert "(total " in done.stdout


def test_an_error_in_a_sync_checked_block_fails_on_cpu(monkeypatch, capsys):
    gpu = load_script()

    @contextlib.contextmanager
    def broken(dev):  # as if a step raised a RuntimeError after its warm-up calls
        raise RuntimeError("the step broke")
        yield

    monkeypatch.setattr(gpu, "_sync_errors", broken)
    monkeypatch.setattr(gpu, "check_cnn", lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--device", "cpu", "--only", "check_no_sync"])
    with pytest.raises(SystemExit) as exit_info:
        gpu.main()
    assert exit_info.value.code == 1
    rows = failed_rows(capsys.readouterr().out)
    assert len(rows) == 8 and all("train step: the step broke" in row for row in rows), rows
