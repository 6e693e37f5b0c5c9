"""Resume is bit-exact: after a clean stop, a crash mid-epoch, and kill -9 at random points."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

JOB = Path(__file__).parent / "jobs" / "resume_job.py"


def run_job(out_dir: Path, max_epochs: int, sleep: float = 0.0) -> None:
    subprocess.run(
        [sys.executable, str(JOB), str(out_dir), str(max_epochs), str(sleep)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )


def final(out_dir: Path) -> dict:
    return torch.load(out_dir / "final.pt", weights_only=True)


def assert_same_run(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name
        assert torch.equal(a["ema"][name], b["ema"][name]), name
    assert a["history"] == b["history"]
    # The optimizer state and best_model.pt (the best epoch's EMA weights, which may lie
    # before the interruption) resume too: no test compared them.
    assert len(a["opt_state"]) == len(b["opt_state"])
    for x, y in zip(a["opt_state"], b["opt_state"]):
        assert torch.equal(x, y)
    assert a["best"].keys() == b["best"].keys()
    for name in a["best"]:
        assert torch.equal(a["best"][name], b["best"][name]), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted")
    run_job(out, 4)
    return final(out)


def test_clean_stop_then_continue_is_bit_exact(tmp_path, reference):
    run_job(tmp_path, 2)
    run_job(tmp_path, 4)
    assert_same_run(final(tmp_path), reference)


@pytest.mark.parametrize(("crash_batch", "resumed_at"), [(7, 6), (None, 12)])
def test_crash_mid_epoch_then_rerun_is_bit_exact(tmp_path, reference, crash_batch, resumed_at):
    """An exception in epoch 2 after a mid-epoch checkpoint, then a rerun.

    ``None`` crashes at the end of the epoch's training, after the checkpoint of its last
    batch: a position past the last batch.
    """
    code = f"""
import sys, runpy
import fnloop as fl
class Crash(fl.callbacks.Callback):
    def on_train_batch_end(self, state, outputs, batch, batch_idx):
        if state.epoch == 1 and batch_idx == {crash_batch}:
            raise SystemExit(3)
    def on_train_epoch_end(self, state, metrics):
        if state.epoch == 2 and {crash_batch} is None:
            raise SystemExit(3)
orig = fl.fit
def fit(*a, **k):
    k["callbacks"] = [*k["callbacks"], Crash()]
    return orig(*a, **k)
fl.fit = fit
sys.argv = ["job", {str(tmp_path)!r}, "4"]
runpy.run_path({str(JOB)!r}, run_name="__main__")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*-b.pt"))
    assert names, "a mid-epoch checkpoint should exist"
    run_job(tmp_path, 4)
    log = (tmp_path / "run_training.log").read_text()
    assert f"batch {resumed_at} of epoch 2" in log
    assert_same_run(final(tmp_path), reference)


def kill_and_resume(out_dir: Path, rng: random.Random, kills: int) -> None:
    for _ in range(kills):
        proc = subprocess.Popen(
            [sys.executable, str(JOB), str(out_dir), "4", "0.01"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stdout is not None
        proc.stdout.readline()  # READY: training (and checkpoint writing) is under way
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (out_dir / "final.pt").exists():
            break
    if not (out_dir / "final.pt").exists():
        run_job(out_dir, 4)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(10))
def test_kill_9_at_random_points_is_bit_exact(tmp_path, reference, trial):
    kill_and_resume(tmp_path, random.Random(trial), kills=3)
    assert_same_run(final(tmp_path), reference)


def test_kill_9_ci_subset(tmp_path, reference):
    """Two kill -9 trials in the fast suite (the ten-trial version is marked slow)."""
    for trial in range(2):
        out = tmp_path / str(trial)
        out.mkdir()
        kill_and_resume(out, random.Random(100 + trial), kills=2)
        assert_same_run(final(out), reference)
