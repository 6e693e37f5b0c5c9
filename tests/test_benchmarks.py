"""The benchmark scripts' shared helpers (``benchmarks/_common.py``): what their tables print."""

from __future__ import annotations

import importlib.util
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
