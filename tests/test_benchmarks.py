"""The benchmark scripts' shared helpers (``benchmarks/_common.py``): what their tables print."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
    """A fresh import of ``benchmarks/<name>.py`` (the folder is not a package), in
    ``sys.modules`` while it runs (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.fixture
def load_script(monkeypatch):
    """``load`` for the scripts, which put ``benchmarks/`` first on ``sys.path`` and import
    each other (``fit.py`` imports ``step``): both come off again after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield load
    for name in ("step", "_common"):
        if name not in before:
            sys.modules.pop(name, None)


@pytest.mark.parametrize(
    ("value", "target", "text", "verdict"),
    [
        (0.7049, 0.7, "0.705", "MISSED"),  # "0.70" would contradict MISSED
        (0.70004, 0.7, "0.70004", "MISSED"),
        (0.6951, 0.7, "0.70", "met"),  # 0.70 <= 0.7: the figure agrees
        (0.7, 0.7, "0.70", "met"),
        (0.71, 0.7, "0.71", "MISSED"),
        (0.64, 0.7, "0.64", "met"),
        (1.1549, 1.15, "1.155", "MISSED"),
        (0.8049, 0.8, "0.805", "MISSED"),
        (float("nan"), 0.7, "n/a", "n/a"),
    ],
)
def test_a_judged_ratio_is_printed_on_the_side_of_the_target_its_verdict_says(
    value, target, text, verdict
):
    common = load("_common")
    assert common.judged_ratio(value, target) == text
    assert common.verdict(value, target) == verdict


def test_a_judged_ratio_and_its_verdict_agree_around_every_target():
    common = load("_common")
    for target in (0.7, 0.8, 1.0, 1.15):
        for k in range(-2000, 2001):
            value = target + k * 1e-5
            printed = float(common.judged_ratio(value, target))
            assert (printed <= target) == (common.verdict(value, target) == "met"), value
            assert abs(printed - value) <= 0.005 + 1e-12  # never coarser than 2 decimals


def test_fit_s_start_up_is_what_a_run_costs_beyond_its_steps(load_script, monkeypatch):
    """fit.py's start-up column, from runs timed as ``start-up + steps x (1 + wobble) x
    per-step``, with a wobble of up to 5% per run (what a shared VM does): it finds each
    contender's start-up to within the wobble of a one-epoch run (10 ms here). The N-step
    line extrapolated to zero steps (the column until 2026-11-30) could be off by
    N x 5% x per-step: 80 ms here (N = 400 steps), of either sign."""
    fit = load_script("fit")
    per_step, startup = 4e-3, {"none": 0.0, "some": 0.05, "much": 0.2}
    rng = random.Random(0)

    def run_none(module, loader, epochs): ...
    def run_some(module, loader, epochs): ...
    def run_much(module, loader, epochs): ...

    contenders = {"none": run_none, "some": run_some, "much": run_much}
    names = {fn: name for name, fn in contenders.items()}

    def time_run(fn, module, dataset, batch, epochs, seed, quiet):
        steps = epochs * 50
        return startup[names[fn]] + steps * per_step * (1 + rng.uniform(-0.05, 0.05)), 0

    monkeypatch.setattr(fit, "time_run", time_run)
    monkeypatch.setattr(fit.C, "wait_for_quiet", lambda max_wait_s: 0.0)
    r = fit.bench_model(
        "tiny", contenders, steps_per_epoch=50, epochs=8, repeats=7, quiet=True, max_wait_s=0
    )
    for name, true_s in startup.items():
        assert abs(r["startup_ms"][name] - true_s * 1e3) < 15, (name, r["startup_ms"])
        lo, hi = r["startup_iqr"][name]
        assert lo <= r["startup_ms"][name] <= hi
