"""Resuming a run in the same process: what fit saves and restores beyond the state."""

from __future__ import annotations

import importlib.util
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fnloop as fl
from fnloop import optim


class Crash(Exception):
    pass


class CrashAt(fl.callbacks.Callback):
    """Raises after the given batch of the given epoch (1-based), or at an epoch's start."""

    def __init__(self, epoch, batch=None):
        self.epoch, self.batch = epoch, batch

    def on_train_epoch_start(self, state):
        if self.batch is None and state.epoch + 1 == self.epoch:
            raise Crash

    def on_train_batch_end(self, state, outputs, batch, batch_idx):
        if state.epoch + 1 == self.epoch and batch_idx == self.batch:
            raise Crash


def make_state():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    return fl.TrainState.create(module.double(), tx=optim.adam(1e-2), device="cpu")


def classify(model, batch):
    x, y = batch
    return {"loss": F.cross_entropy(model(x), y)}


def seeded_loader():
    """A shuffling loader with a generator of its own, made afresh as a new process would."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 6, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    return DataLoader(
        TensorDataset(x, y), batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(7)
    )


def run(out_dir, max_epochs=3, callbacks=(), loader=seeded_loader, state=None, **kw):
    """``fit`` of ``state`` (a fresh one by default), its loader made afresh by ``loader()``."""
    return fl.fit(
        make_state() if state is None else state,
        classify,
        loader(),
        max_epochs=max_epochs,
        out_dir=out_dir,
        callbacks=list(callbacks),
        log_to_console=False,
        **kw,
    )


def assert_resumes_as_uninterrupted(tmp_path, epoch, batch, **kw):
    """A run crashed at ``epoch`` (after ``batch``) and run again, in a process whose
    global RNG states are others, ends as the uninterrupted run."""
    ref = run(tmp_path / "ref", checkpoint_every_n_steps=2, **kw)
    with pytest.raises(Crash):
        run(tmp_path / "cut", callbacks=[CrashAt(epoch, batch)], checkpoint_every_n_steps=2, **kw)
    torch.manual_seed(123)  # the re-run's process starts with other global RNG states
    assert_same(run(tmp_path / "cut", checkpoint_every_n_steps=2, **kw), ref)


def assert_same(a, b):
    assert (a.step, a.epoch) == (b.step, b.epoch)
    for name, p in a.params.items():
        assert torch.equal(p, b.params[name]), name
    assert a.history == b.history


@pytest.mark.parametrize(
    ("epoch", "batch"),
    [(1, 4), (2, None), (2, 3), (3, 1)],
    ids=["first-epoch", "epoch-start", "mid-epoch", "late"],
)
def test_a_loader_with_its_own_seeded_generator_resumes_bit_exactly(tmp_path, epoch, batch):
    """The loader's generator (its shuffle order) is checkpointed with the global ones:
    the re-run's new loader, seeded like the first, continues the first run's order."""
    assert_resumes_as_uninterrupted(tmp_path, epoch, batch)


def sampler_seeded_loader():
    """A loader whose sampler has the generator (DataLoader(sampler=RandomSampler(...,
    generator=...))), the loader itself none."""
    loader = seeded_loader()
    sampler = torch.utils.data.RandomSampler(
        loader.dataset, generator=torch.Generator().manual_seed(7)
    )
    return DataLoader(loader.dataset, batch_size=10, sampler=sampler)


@pytest.mark.parametrize(("epoch", "batch"), [(2, None), (2, 3)], ids=["epoch-start", "mid-epoch"])
def test_a_sampler_with_its_own_seeded_generator_resumes_bit_exactly(tmp_path, epoch, batch):
    """The generator of the loader's sampler is checkpointed too: a re-run's new sampler,
    seeded like the first, continues the first run's shuffle order, not epoch 1's."""
    loader = sampler_seeded_loader()
    assert loader.generator is None and loader.sampler.generator is not None
    assert_resumes_as_uninterrupted(tmp_path, epoch, batch, loader=sampler_seeded_loader)


def valid_subset_loaders():
    """The seeded train loader, and a validation loader that draws another random subset
    of its set each epoch with a generator of its own (a large set validated in part)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    valid_set = TensorDataset(x, (x[:, 0] > 0).long())
    sampler = torch.utils.data.RandomSampler(
        valid_set, num_samples=10, generator=torch.Generator().manual_seed(5)
    )
    return {
        "train": seeded_loader(),
        "valid": DataLoader(valid_set, batch_size=5, sampler=sampler),
    }


@pytest.mark.parametrize(("epoch", "batch"), [(3, None), (3, 2)], ids=["epoch-start", "mid-epoch"])
def test_a_validation_loader_with_its_own_generator_resumes_bit_exactly(tmp_path, epoch, batch):
    """The validation loader's generator is checkpointed too (at an epoch's end, and as
    it was at the epoch's start for a mid-epoch checkpoint): the re-run validates each
    epoch on the subset the uninterrupted run drew, not on epoch 1's again."""
    assert_resumes_as_uninterrupted(tmp_path, epoch, batch, loader=valid_subset_loaders)


def test_a_resume_with_other_loader_generators_is_warned_about(tmp_path):
    """The checkpoint holds one loader generator's state; resumed with a loader that has
    none of its own, the run says that the shuffle order will not repeat."""

    def unseeded_loader():
        return DataLoader(seeded_loader().dataset, batch_size=10, shuffle=True)

    run(tmp_path, max_epochs=1)
    run(tmp_path, max_epochs=2, loader=unseeded_loader)
    log = (tmp_path / "run_training.log").read_text()
    assert "holds the states of 1 loader generators and the loaders now have 0" in log


class Shrink(fl.callbacks.Callback):
    """Changes the state after every batch, as a callback may."""

    def on_train_batch_end(self, state, outputs, batch, batch_idx):
        return state.replace(params={n: p * 0.9 for n, p in state.params.items()})


def test_mid_epoch_checkpoints_hold_what_the_callbacks_returned(tmp_path):
    ref = run(tmp_path / "ref", callbacks=[Shrink()], checkpoint_every_n_steps=2)
    with pytest.raises(Crash):
        run(
            tmp_path / "cut",
            callbacks=[Shrink(), CrashAt(2, 4)],  # after the step-10 checkpoint (batch 3)
            checkpoint_every_n_steps=2,
        )
    assert (tmp_path / "cut" / "checkpoints" / "ckpt-0000000010-b.pt").exists()
    assert_same(run(tmp_path / "cut", callbacks=[Shrink()], checkpoint_every_n_steps=2), ref)


def test_mid_epoch_checkpoints_are_written_at_optimizer_steps_only(tmp_path):
    """checkpoint_every_n_steps counts optimizer steps: with accumulation over 2 batches,
    the first batch (step 0, a window open) is no checkpoint's place; each later step is."""
    step = fl.make_train_step(classify, accumulation_steps=2)
    fl.fit(
        make_state(),
        step,
        seeded_loader(),
        max_epochs=1,
        out_dir=tmp_path,
        checkpoint_every_n_steps=1,
        keep_checkpoints=10,
        log_to_console=False,
    )
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.pt"))
    assert names == ["ckpt-0000000001-b.pt", "ckpt-0000000002-b.pt", "ckpt-0000000003-e.pt"]


class DrawAtStart(fl.callbacks.Callback):
    def on_fit_start(self, state):
        torch.randperm(10)


def test_the_generators_are_restored_after_on_fit_start_draws(tmp_path):
    ref = run(tmp_path / "ref", callbacks=[DrawAtStart()])
    with pytest.raises(Crash):
        run(tmp_path / "cut", callbacks=[DrawAtStart(), CrashAt(3)])
    assert_same(run(tmp_path / "cut", callbacks=[DrawAtStart()]), ref)


def test_a_diverging_epoch_writes_no_mid_epoch_checkpoints(tmp_path):
    def diverging(model, batch):
        out = classify(model, batch)
        return {"loss": out["loss"] * (torch.nan if batch[0][0, 0] > 1.0 else 1.0)}

    out = tmp_path / "run"
    fl.fit(make_state(), classify, seeded_loader(), max_epochs=1, out_dir=out, log_to_console=False)
    state = fl.fit(
        make_state(),
        diverging,
        seeded_loader(),
        max_epochs=3,
        out_dir=out,
        checkpoint_every_n_steps=1,
        log_to_console=False,
    )
    assert state.epoch == 2 and not torch.isfinite(state.params["0.weight"]).all()
    assert "Not checkpointing at step" in (out / "run_training.log").read_text()
    for path in (out / "checkpoints").glob("ckpt-*.pt"):
        saved = fl.load_checkpoint(path, like=make_state())
        assert all(torch.isfinite(p).all() for p in saved.params.values()), path.name
    # A re-run resumes from a good checkpoint and stops at the same place.
    again = fl.fit(
        make_state(), diverging, seeded_loader(), max_epochs=3, out_dir=out, log_to_console=False
    )
    assert again.epoch == 2


def test_a_checkpoint_beyond_max_epochs_is_an_error(tmp_path):
    run(tmp_path / "a", max_epochs=3)
    with pytest.raises(ValueError, match=r"max_epochs=2, but .*ckpt-0000000018-e.pt is at epoch 3"):
        run(tmp_path / "a", max_epochs=2)
    with pytest.raises(Crash):
        run(tmp_path / "b", callbacks=[CrashAt(3, 3)], checkpoint_every_n_steps=3)
    with pytest.raises(ValueError, match=r"batch 3 of epoch 3.*max_epochs >= 3"):
        run(tmp_path / "b", max_epochs=2)


def test_an_early_stopped_run_goes_on_when_its_rules_change(tmp_path):
    stop_at_once = fl.EarlyStopping("train/loss", target=100.0)
    first = run(tmp_path, max_epochs=4, early_stopping=stop_at_once)
    assert first.epoch == 1
    # The same rule: still stopped.
    assert run(tmp_path, max_epochs=4, early_stopping=stop_at_once).epoch == 1
    assert (
        "To train on, change the early-stopping rules (or pass early_stopping=None)"
        in (tmp_path / "run_training.log").read_text()
    )
    # Another rule, or none: training goes on.
    patient = fl.EarlyStopping("train/loss", patience=50)
    assert run(tmp_path, max_epochs=2, early_stopping=patient).epoch == 2
    assert run(tmp_path, max_epochs=3, early_stopping=None).epoch == 3


def test_a_rule_keeps_its_progress_only_while_unchanged(tmp_path):
    """A rule's best value and bad epochs come back for the same rule, not another one."""

    def never_improves(patience):  # after its first epoch
        return fl.EarlyStopping("train/loss", mode="max", patience=patience, min_delta=1e9)

    run(tmp_path / "same", max_epochs=2, early_stopping=never_improves(2))
    assert run(tmp_path / "same", max_epochs=9, early_stopping=never_improves(2)).epoch == 3
    run(tmp_path / "changed", max_epochs=2, early_stopping=never_improves(2))
    assert run(tmp_path / "changed", max_epochs=9, early_stopping=never_improves(3)).epoch == 6
    log = (tmp_path / "changed" / "run_training.log").read_text()
    assert "patience=3" in log and "is new or changed: it starts counting now" in log
    # What the resume restores or starts afresh is said after the line that names it.
    assert log.rindex("Resumed from") < log.rindex("is new or changed")


def test_a_run_with_several_rules_none_stopped_goes_on_when_resumed(tmp_path):
    """Resuming restores a stop only if a rule had asked for one: two rules that are
    still counting let the continued run train its epochs."""

    def rules():
        return [
            fl.EarlyStopping("train/loss", patience=50),
            fl.EarlyStopping("train/loss", patience=40, min_delta=0.0),
        ]

    run(tmp_path, max_epochs=1, early_stopping=rules())
    assert run(tmp_path, max_epochs=2, early_stopping=rules()).epoch == 2
    assert "stopped early" not in (tmp_path / "run_training.log").read_text()


def test_resume_false_sets_an_earlier_runs_checkpoints_aside(tmp_path):
    run(tmp_path, max_epochs=3)
    before = sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.pt"))
    state = run(tmp_path, max_epochs=1, resume=False)
    assert state.epoch == 1
    assert [p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.pt")] == [
        "ckpt-0000000006-e.pt"
    ]
    (aside,) = (tmp_path / "checkpoints").glob("previous-*")
    plot = ["history.png"] if importlib.util.find_spec("matplotlib") else []
    assert sorted(p.name for p in aside.iterdir()) == sorted(
        ["best_model.pt", "metrics.csv", *plot, *before]
    )
    # The earlier run's rows are kept there; the new metrics.csv has this run's only.
    assert len((aside / "metrics.csv").read_text().splitlines()) == 1 + 3
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 1
    # A second restart gets a folder of its own.
    run(tmp_path, max_epochs=1, resume=False)
    assert len(list((tmp_path / "checkpoints").glob("previous-*"))) == 2


def test_a_restart_within_the_same_second_sets_aside_into_a_folder_of_its_own(
    tmp_path, monkeypatch
):
    """Two restarts in one second (the time stamp names the folder): the second one's
    files go to previous-<time>-1, and the first one's folder is left as it was."""
    import time

    strftime = time.strftime
    stamp = "previous-20260101-120000"
    monkeypatch.setattr(
        time,
        "strftime",
        lambda fmt, *a: stamp if fmt.startswith("previous-") else strftime(fmt, *a),
    )
    ckpts = tmp_path / "checkpoints"
    run(tmp_path, max_epochs=1)
    first = sorted(p.name for p in ckpts.glob("ckpt-*.pt"))
    run(tmp_path, max_epochs=2, resume=False)
    assert sorted(p.name for p in (ckpts / stamp).iterdir() if p.name.startswith("ckpt-")) == first
    second = sorted(p.name for p in ckpts.glob("ckpt-*.pt"))
    before = {p.name: p.read_bytes() for p in (ckpts / stamp).iterdir()}
    run(tmp_path, max_epochs=1, resume=False)
    assert {p.name: p.read_bytes() for p in (ckpts / stamp).iterdir()} == before
    moved = sorted(p.name for p in (ckpts / f"{stamp}-1").iterdir() if p.name.startswith("ckpt-"))
    assert moved == second
    assert {p.name for p in ckpts.glob("previous-*")} == {stamp, f"{stamp}-1"}


def test_resume_false_on_a_fresh_state_starts_a_metrics_csv_of_its_own_columns(tmp_path):
    """The earlier run's metrics.csv goes aside whole: the new one has this run's columns
    only, not the earlier run's valid/ columns left empty."""

    def with_valid():
        loader = seeded_loader()
        return {"train": loader, "valid": DataLoader(loader.dataset, batch_size=30)}

    run(tmp_path, max_epochs=1, loader=with_valid)
    run(tmp_path, max_epochs=1, resume=False)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header == "epoch,step,train/loss,train/lr"


def test_resume_false_on_a_trained_state_keeps_its_epochs_in_metrics_csv(tmp_path):
    """Continuing the state a fit returned with resume=False (a new optimizer, say): the
    earlier run's files are set aside, and metrics.csv still holds the state's epochs."""
    state = run(tmp_path, max_epochs=2)
    state = run(tmp_path, max_epochs=3, state=state, resume=False)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["epoch", "1", "2", "3"]
    (aside,) = (tmp_path / "checkpoints").glob("previous-*")
    assert len((aside / "metrics.csv").read_text().splitlines()) == 1 + 2


def test_a_loader_with_workers_resumes_mid_epoch_bit_exactly(tmp_path):
    """Workers make the sampler draw ahead of the batches: the loader's generator is
    where replaying the epoch's skipped batches leaves it, not where it was at saving."""

    def loader():
        base = seeded_loader()
        return DataLoader(
            base.dataset,
            batch_size=10,
            shuffle=True,
            num_workers=2,
            generator=torch.Generator().manual_seed(7),
        )

    ref = run(tmp_path / "ref", loader=loader, checkpoint_every_n_steps=2)
    with pytest.raises(Crash):  # resumes at batch 2, the sampler drawn ahead
        run(tmp_path / "cut", callbacks=[CrashAt(2, 3)], loader=loader, checkpoint_every_n_steps=2)
    assert_same(run(tmp_path / "cut", loader=loader, checkpoint_every_n_steps=2), ref)


class _Noisy(torch.utils.data.Dataset):
    """Random augmentation: every item draws from the global generator when loaded."""

    def __init__(self):
        self.x, self.y = seeded_loader().dataset.tensors

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(6, dtype=torch.float64), self.y[i]


@pytest.mark.parametrize(
    ("epoch", "batch", "workers"),
    [(2, 3, 0), (2, 5, 0), (2, 3, 2)],
    ids=["mid-epoch", "last-batch", "mid-epoch-workers"],
)
def test_a_dataset_drawing_random_numbers_resumes_mid_epoch_bit_exactly(
    tmp_path, epoch, batch, workers
):
    """Without workers the dataset draws in this process: the generators are restored
    after the skipped batches are loaded and before the first trained one is. Workers,
    seeded each epoch, draw for the skipped batches again."""

    def loader():
        return DataLoader(_Noisy(), batch_size=10, shuffle=True, num_workers=workers)

    ref = run(tmp_path / "ref", loader=loader, checkpoint_every_n_steps=2)
    with pytest.raises(Crash):
        run(
            tmp_path / "cut",
            callbacks=[CrashAt(epoch, batch)],
            loader=loader,
            checkpoint_every_n_steps=2,
        )
    torch.manual_seed(123)
    assert_same(run(tmp_path / "cut", loader=loader, checkpoint_every_n_steps=2), ref)


class ShrinkAtEpochStart(fl.callbacks.Callback):
    """Changes the weights at an epoch's start (and counts the calls)."""

    def __init__(self):
        self.calls = 0

    def on_train_epoch_start(self, state):
        self.calls += 1
        return state.replace(params={n: p * 0.9 for n, p in state.params.items()})


def test_a_mid_epoch_resume_keeps_the_state_the_epoch_start_returned_once(tmp_path):
    """The checkpoint holds what on_train_epoch_start returned at the real start of the
    epoch; the event fires again on resume, but applying its change twice would not
    repeat the uninterrupted run."""

    ref = run(tmp_path / "ref", callbacks=[ShrinkAtEpochStart()], checkpoint_every_n_steps=2)
    with pytest.raises(Crash):
        run(
            tmp_path / "cut",
            callbacks=[ShrinkAtEpochStart(), CrashAt(2, 3)],
            checkpoint_every_n_steps=2,
        )
    torch.manual_seed(123)
    again = ShrinkAtEpochStart()
    assert_same(run(tmp_path / "cut", callbacks=[again], checkpoint_every_n_steps=2), ref)
    assert again.calls == 2  # epochs 2 (resumed) and 3


@pytest.mark.parametrize("bad_call", [8, 6], ids=["mid-epoch", "last-batch-of-epoch"])
def test_a_step_with_a_nonfinite_gradient_writes_no_checkpoint_of_its_weights(tmp_path, bad_call):
    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * torch.nan

    calls = []

    def training_step(model, batch):
        x, y = batch
        out = model(x)
        calls.append(1)
        if len(calls) == bad_call:  # a finite loss, NaN gradients
            out = NanGrad.apply(out)
        return {"loss": F.cross_entropy(out, y)}

    out = tmp_path / "run"
    fl.fit(
        make_state(),
        training_step,
        seeded_loader(),
        max_epochs=3,
        out_dir=out,
        checkpoint_every_n_steps=1,
        log_to_console=False,
    )
    for path in (out / "checkpoints").glob("ckpt-*.pt"):
        saved = fl.load_checkpoint(path, like=make_state())
        assert all(torch.isfinite(p).all() for p in saved.params.values()), path.name
    best = out / "best_model.pt"
    if best.exists():  # a diverged epoch is never the best one
        weights = torch.load(best, weights_only=True)
        assert all(torch.isfinite(w).all() for w in weights.values())


class CrashAtFitEnd(fl.callbacks.Callback):
    def on_fit_end(self, state):
        raise Crash


@pytest.mark.parametrize(
    "crash", [CrashAt(2), CrashAtFitEnd()], ids=["at-an-epoch-start", "in-on_fit_end"]
)
def test_an_interrupted_run_loses_no_row_of_the_metrics_files(tmp_path, crash):
    # The loggers hold an epoch's row back until the next epoch starts (for what callbacks
    # add to it); an exception in between must still write it: the epoch's checkpoint is
    # on disk, so the resumed run does not train, nor log, that epoch again.
    def jsonl(name):
        return fl.callbacks.JSONLinesLogger(tmp_path / f"{name}.jsonl")

    ref = run(tmp_path / "ref", callbacks=[jsonl("ref")])
    with pytest.raises(Crash):
        run(tmp_path / "cut", callbacks=[crash, jsonl("cut")])
    state = run(tmp_path / "cut", callbacks=[jsonl("cut")])
    assert_same(state, ref)
    assert (tmp_path / "cut.jsonl").read_text() == (tmp_path / "ref.jsonl").read_text()
    csv = [(tmp_path / run_dir / "metrics.csv").read_text() for run_dir in ("cut", "ref")]
    assert csv[0] == csv[1]


class KilledAt(fl.callbacks.Callback):
    """What a kill -9 at an event leaves: a copy of the run folder as it is on disk then
    (nothing after it is written; no teardown runs)."""

    def __init__(self, event, epoch, out_dir, copy_to):
        self.epoch, self.out_dir, self.copy_to = epoch, out_dir, copy_to
        setattr(self, event, self._kill)

    def _kill(self, state, *args):
        if state.epoch == self.epoch and not self.copy_to.exists():
            shutil.copytree(self.out_dir, self.copy_to)


@pytest.mark.parametrize(
    ("event", "epoch"),
    [("on_fit_end", 3), ("on_train_epoch_start", 2)],
    ids=["in-on_fit_end", "at-the-next-epoch-start"],
)
def test_a_killed_run_loses_no_row_of_the_metrics_files(tmp_path, event, epoch):
    """Without validation the loggers hold an epoch's row back (for what callbacks add to
    it), and wrote it only at the next epoch's start or at on_fit_end, after the epoch's
    checkpoint: a run killed in between (in a user's on_fit_end upload, say) resumed past
    the epoch and never logged it. fit now has the row written before the checkpoint."""
    ref = run(tmp_path / "ref")
    killed = KilledAt(event, epoch, tmp_path / "run", tmp_path / "killed")
    run(tmp_path / "run", callbacks=[killed])  # (runs on: only its copy counts)
    state = run(tmp_path / "killed")
    assert_same(state, ref)
    csv = [(tmp_path / run_dir / "metrics.csv").read_text() for run_dir in ("killed", "ref")]
    assert csv[0] == csv[1]


def test_the_best_model_is_chosen_afresh_when_the_monitor_changes(tmp_path):
    # A first fit without validation monitors train/loss; a second one with a validation
    # loader monitors valid/loss, whose values must not be compared with train losses.
    g = torch.Generator().manual_seed(1)
    xv = torch.randn(30, 6, generator=g, dtype=torch.float64)
    valid = DataLoader(TensorDataset(xv, (xv[:, 1] > 0).long()), batch_size=10)
    out = tmp_path / "run"
    state = run(out, max_epochs=2)
    state = fl.fit(
        state,
        classify,
        {"train": seeded_loader(), "valid": valid},
        max_epochs=4,
        out_dir=out,
        log_to_console=False,
    )
    losses = state.history["valid"]["loss"]
    best = losses.index(min(losses)) + 3  # the validated epochs are 3 and 4
    log = (out / "run_training.log").read_text()
    assert "The best model is chosen afresh: this run monitors valid/loss" in log
    assert f"Best model (valid/loss {min(losses):.4g} at epoch {best})" in log


def test_the_best_model_is_chosen_afresh_when_the_mode_changes(tmp_path):
    """The checkpoint's best was the lowest train/loss; a run that resumes it with
    mode="max" on the same monitor does not compare its epochs with that value."""
    out = tmp_path / "run"
    run(out, max_epochs=2)
    state = run(out, max_epochs=3, mode="max")
    log = (out / "run_training.log").read_text()
    assert "The best model is chosen afresh: this run monitors train/loss (mode='max')" in log
    loss = state.history["train"]["loss"][2]
    assert f"Best model (train/loss {loss:.4g} at epoch 3)" in log  # the one epoch it ran


def test_a_mid_epoch_resume_logs_the_epoch_as_an_uninterrupted_run_does(tmp_path):
    # The epoch's learning-rate change and skipped updates are counted from its start,
    # not from the mid-epoch checkpoint the run resumed from.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    x[4] = x[36] = float("nan")  # batches 1 and 9 of 10 give a NaN loss
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=4)
    lr = optim.join_schedules([optim.constant_schedule(0.1), optim.constant_schedule(0.01)], [3])
    step = fl.make_train_step(classify, on_nonfinite="skip")

    class CrashAtBatch(fl.callbacks.Callback):
        def on_train_batch_start(self, state, batch, batch_idx):
            if batch_idx == 6:
                raise Crash

    def lines(out, callbacks=()):
        module = nn.Sequential(nn.Linear(6, 2)).double()
        fl.fit(
            fl.TrainState.create(module, tx=optim.sgd(lr), device="cpu"),
            step,
            loader,
            max_epochs=1,
            out_dir=out,
            checkpoint_every_n_steps=5,
            callbacks=list(callbacks),
            log_to_console=False,
        )
        log = (out / "run_training.log").read_text().splitlines()
        return [line.split(" - ", 2)[-1] for line in log if "Learning" in line or "Skipped" in line]

    with pytest.raises(Crash):
        lines(tmp_path / "cut", [CrashAtBatch()])
    assert (
        lines(tmp_path / "cut")
        == lines(tmp_path / "ref")
        == [
            "Learning rate updated: 0.100000 → 0.010000",
            "Skipped 2 updates with non-finite loss or gradients",
        ]
    )


class _Remote(fl.callbacks.EpochLogger):
    """Rows sent somewhere that cannot take them back (as W&B), into a shared list."""

    def __init__(self, rows):
        super().__init__()
        self.rows = rows

    def write_row(self, row):
        self.rows.append(dict(row))


class CrashInValidation(fl.callbacks.Callback):
    def on_validation_epoch_start(self, state):
        if state.epoch == 2:
            raise Crash


def test_a_run_interrupted_in_validation_sends_no_partial_row(tmp_path):
    g = torch.Generator().manual_seed(1)
    xv = torch.randn(20, 6, generator=g, dtype=torch.float64)
    valid = DataLoader(TensorDataset(xv, (xv[:, 1] > 0).long()), batch_size=10)
    rows = []
    kw = {"max_epochs": 3, "out_dir": tmp_path / "run", "log_to_console": False}
    loaders = {"train": seeded_loader(), "valid": valid}
    with pytest.raises(Crash):
        fl.fit(
            make_state(), classify, loaders, callbacks=[CrashInValidation(), _Remote(rows)], **kw
        )
    assert [r["epoch"] for r in rows] == [1]  # epoch 2 never finished: nothing of it sent
    fl.fit(make_state(), classify, loaders, callbacks=[_Remote(rows)], **kw)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all("valid/loss" in r for r in rows)


def test_without_checkpoints_an_interrupted_epoch_keeps_its_train_row(tmp_path):
    # No out_dir: no run can redo the epoch, so what it measured is written.
    g = torch.Generator().manual_seed(1)
    xv = torch.randn(20, 6, generator=g, dtype=torch.float64)
    valid = DataLoader(TensorDataset(xv, (xv[:, 1] > 0).long()), batch_size=10)
    rows = []
    with pytest.raises(Crash):
        fl.fit(
            make_state(),
            classify,
            {"train": seeded_loader(), "valid": valid},
            max_epochs=3,
            callbacks=[CrashInValidation(), _Remote(rows)],
            log_to_console=False,
        )
    assert [r["epoch"] for r in rows] == [1, 2]
    assert "valid/loss" in rows[0] and "valid/loss" not in rows[1] and "train/loss" in rows[1]


class _NanSecondEpoch:
    """One batch per epoch; epoch 2's is NaN, so the run diverges there."""

    def __init__(self):
        self.n = 0

    def __iter__(self):
        self.n += 1
        g = torch.Generator().manual_seed(self.n)
        x = torch.randn(10, 6, generator=g, dtype=torch.float64)
        yield x * (float("nan") if self.n == 2 else 1.0), (x[:, 0] > 0).long()

    def __len__(self):
        return 1


@pytest.mark.parametrize("out_dir", [False, True], ids=["no-out_dir", "out_dir"])
def test_the_row_of_a_diverged_epoch_survives_a_crash_in_on_fit_end(tmp_path, out_dir):
    rows = []
    with pytest.raises(Crash):
        fl.fit(
            make_state(),
            classify,
            _NanSecondEpoch(),
            max_epochs=5,
            out_dir=tmp_path / "run" if out_dir else None,
            callbacks=[CrashAtFitEnd(), _Remote(rows)],
            log_to_console=False,
        )
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train/loss"] != rows[1]["train/loss"]  # the NaN the run diverged on


def test_a_rerun_removes_temporary_files_a_killed_write_left(tmp_path):
    """kill -9 during a write leaves its hidden temporary file: the next fit in the
    folder removes those, and nothing else."""
    run(tmp_path, max_epochs=1)
    stale = [tmp_path / ".fnloop-0123456789ab.tmp", tmp_path / "checkpoints/.fnloop-dead.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    (tmp_path / "notes.tmp").write_text("the user's own")
    run(tmp_path, max_epochs=2)
    assert not any(path.exists() for path in stale)
    assert (tmp_path / "notes.tmp").exists()


def test_resuming_with_persistent_workers_warns_that_it_is_not_exact(tmp_path):
    """Workers kept between epochs carry random generators no checkpoint holds."""

    def loader():
        return DataLoader(
            seeded_loader().dataset, batch_size=10, num_workers=1, persistent_workers=True
        )

    run(tmp_path, max_epochs=1, loader=loader)
    run(tmp_path, max_epochs=2, loader=loader)
    run(tmp_path, max_epochs=2, loader=loader)  # finished: nothing left to draw
    log = (tmp_path / "run_training.log").read_text()
    assert log.count("The train loader keeps its worker processes between epochs") == 1


def test_a_state_on_meta_trains_only_from_a_checkpoint(tmp_path):
    """A skeleton on the meta device resumes a run (the checkpoint's tensors load onto
    the CPU); with nothing to load, fit says so before training."""
    ref = run(tmp_path / "ref", max_epochs=2)
    run(tmp_path / "run", max_epochs=1)
    assert_same(run(tmp_path / "run", max_epochs=2, state=on_meta()), ref)
    with pytest.raises(ValueError, match="on the meta device, which holds no values"):
        run(tmp_path / "new", max_epochs=2, state=on_meta())


class CrashAtFitStart(fl.callbacks.Callback):
    def on_fit_start(self, state):
        raise Crash("no data")


def test_the_log_says_why_a_run_ended(tmp_path, capsys):
    with pytest.raises(Crash):
        run(tmp_path, callbacks=[CrashAt(1, 1)])
    with pytest.raises(Crash):
        run(tmp_path, callbacks=[CrashAt(2, 3)], checkpoint_every_n_steps=2)
    with pytest.raises(Crash):
        run(tmp_path, callbacks=[CrashAtFitStart()])
    log = (tmp_path / "run_training.log").read_text()
    assert "ERROR - Stopped by Crash in epoch 1. No checkpoint was written yet" in log
    assert (
        "ERROR - Stopped by Crash in epoch 2. Once the cause is fixed, run the same fit again "
        "to resume from" in log
    )
    assert log.endswith("ERROR - Stopped by Crash: no data.\n")
    with pytest.raises(Crash):  # no out_dir and no console: nothing is printed
        run(None, callbacks=[CrashAt(1, 1)])
    assert capsys.readouterr().err == ""


def nan_loader():
    """seeded_loader's examples with a NaN in one (a batch whose update is skipped)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 6, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    x[17, 3] = float("nan")
    return DataLoader(
        TensorDataset(x, y), batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(7)
    )


def test_a_mid_epoch_resume_keeps_the_left_out_values_of_skipped_steps(tmp_path):
    """With on_nonfinite="skip" the epoch means leave skipped steps out (a finite train
    loss every epoch); a checkpoint taken after one keeps what it left out."""
    step = fl.make_train_step(classify, on_nonfinite="skip")

    def skipping(out_dir, callbacks=()):
        return fl.fit(
            make_state(),
            step,
            nan_loader(),
            max_epochs=3,
            out_dir=out_dir,
            callbacks=list(callbacks),
            checkpoint_every_n_steps=2,
            log_to_console=False,
        )

    ref = skipping(tmp_path / "ref")
    assert all(math.isfinite(v) for v in ref.history["train"]["loss"])
    assert int(ref.skipped_steps) == 3
    for epoch in (1, 2, 3):  # a crash after batch 5 of each epoch
        with pytest.raises(Crash):
            skipping(tmp_path / f"cut{epoch}", [CrashAt(epoch, 4)])
        torch.manual_seed(123)
        assert_same(skipping(tmp_path / f"cut{epoch}"), ref)


def test_a_mid_epoch_record_holds_the_left_out_counts_on_the_cpu(monkeypatch):
    """Each process's partial means go through gather (pickled: "tensors on the CPU") and
    into the checkpoint: the sums were copied to the CPU, the counts finite_only left out
    stayed on the step's device (rank 0 unpickled rank 1's on rank 1's GPU). Meta stands
    in for the accelerator; its copy to the CPU is zeros of the same shape."""
    from types import SimpleNamespace

    from fnloop.fit import _Run

    means = fl.MetricMeans(finite_only=True)
    means.add({"loss": torch.tensor(1.0, device="meta")}, 3)
    means.add({"loss": torch.tensor(float("nan"), device="meta")}, 2)
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t: torch.zeros(t.shape, dtype=t.dtype))
    run = SimpleNamespace(
        means=means, epoch_rng=None, epoch_start=None, rng_state=lambda: None, train_loader=[1]
    )
    record = _Run.local_record(run, 5)  # type: ignore[arg-type]
    saved = record["means"]
    assert set(saved["dropped"]) == set(saved["sums"]) == {"loss"}
    for part in ("sums", "dropped"):
        assert [t.device.type for t in saved[part].values()] == ["cpu"], part


def test_resume_takes_the_checkpoint_of_the_latest_step_whatever_the_file_times(tmp_path):
    """A copy of the run folder (``cp -r``, a download) gives the files new modification
    times in any order: fit resumed from an older mid-epoch checkpoint by its time, and
    trained that epoch again (overwriting its logged metrics); pruning by time could
    delete the newest checkpoint."""
    import os

    straight = run(tmp_path / "straight", max_epochs=4, checkpoint_every_n_steps=3)
    run(tmp_path / "copied", max_epochs=3, checkpoint_every_n_steps=3, keep_checkpoints=3)
    folder = tmp_path / "copied" / "checkpoints"
    names = sorted(p.name for p in folder.glob("ckpt-*.pt"))
    assert names[-1].endswith("-e.pt") and any(n.endswith("-b.pt") for n in names), names
    for age, name in enumerate(names):  # the oldest step gets the newest time
        os.utime(folder / name, (1e9 - age * 100, 1e9 - age * 100))
    resumed = run(tmp_path / "copied", max_epochs=4, checkpoint_every_n_steps=3, keep_checkpoints=3)
    log = (tmp_path / "copied" / "run_training.log").read_text()
    assert f"Resumed from {folder / names[-1]} (epoch 3," in log
    assert_same(resumed, straight)
    kept = sorted(p.name for p in folder.glob("ckpt-*.pt"))
    assert kept[-1] == f"ckpt-{resumed.step:010d}-e.pt" and len(kept) == 3


def test_a_damaged_newest_checkpoint_does_not_push_out_the_new_ones(tmp_path):
    """The two newest checkpoints are damaged, so the re-run starts from an older one.
    The damaged newest file sorts first by its step: pruning counted it among the
    ``keep_checkpoints`` newest and deleted every good checkpoint the re-run wrote."""
    run(tmp_path, max_epochs=3, keep_checkpoints=3)
    _, middle, newest = sorted((tmp_path / "checkpoints").glob("ckpt-*.pt"))
    for path in (middle, newest):
        path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(Crash):
        run(tmp_path, max_epochs=3, keep_checkpoints=1, callbacks=[CrashAt(3, 2)])
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.pt"))
    assert kept == [middle.name, newest.name]  # epoch 2's, written again, and the damaged
    log = (tmp_path / "run_training.log").read_text()
    resumed = run(tmp_path, max_epochs=3, keep_checkpoints=1)
    assert f"Resumed from {middle} (epoch 2," in (
        tmp_path / "run_training.log"
    ).read_text().removeprefix(log)
    assert_same(resumed, run(tmp_path / "ref", max_epochs=3))
    # The epoch that reached the damaged file's step replaced it.
    assert [p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.pt")] == [newest.name]
    assert not list((tmp_path / "checkpoints").glob("previous-*"))


@pytest.mark.parametrize("lost", ["damaged", "deleted"])
def test_a_folder_without_a_usable_checkpoint_keeps_the_earlier_best_model(tmp_path, lost):
    """Every checkpoint damaged (or deleted to free space): the re-run starts over, and
    it wrote its own best_model.pt over the earlier run's, and dropped its metrics rows.
    They are set aside, as resume=False does."""
    valid = DataLoader(seeded_loader().dataset, batch_size=30)
    with_valid = lambda: {"train": seeded_loader(), "valid": valid}  # noqa: E731
    run(tmp_path, max_epochs=2, loader=with_valid)
    best = (tmp_path / "best_model.pt").read_bytes()
    checkpoints = sorted((tmp_path / "checkpoints").glob("ckpt-*.pt"))
    for path in checkpoints:
        if lost == "damaged":
            path.write_bytes(path.read_bytes()[:1000])
        else:
            path.unlink()
    state = run(tmp_path, max_epochs=1, loader=with_valid)
    assert state.epoch == 1
    (aside,) = (tmp_path / "checkpoints").glob("previous-*")
    assert (aside / "best_model.pt").read_bytes() == best
    assert len((aside / "metrics.csv").read_text().splitlines()) == 1 + 2
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 1
    kept = checkpoints if lost == "damaged" else []
    assert sorted(p.name for p in aside.glob("ckpt-*.pt")) == [p.name for p in kept]
    log = (tmp_path / "run_training.log").read_text()
    assert (
        f"no usable checkpoint to resume from: set the earlier run's files aside in {aside}" in log
    )
    # A folder that is new, or that this run fills, has nothing to set aside.
    run(tmp_path, max_epochs=2, loader=with_valid)
    assert len(list((tmp_path / "checkpoints").glob("previous-*"))) == 1


def test_a_run_that_trains_no_epoch_writes_the_best_of_a_later_checkpoint(tmp_path):
    """best_model.pt of a finished fit, then a longer fit crashes after a better epoch's
    checkpoint, and a re-run with the lower max_epochs trains nothing: it kept the first
    fit's file (epoch 1), not the checkpoint's best (epoch 2), as a re-run of a finished
    job does; and that one still leaves the file, and the log, as they were."""
    valid = DataLoader(seeded_loader().dataset, batch_size=30)  # the training examples

    def with_valid():
        return {"train": seeded_loader(), "valid": valid}

    ref = run(tmp_path / "ref", max_epochs=2, loader=with_valid)
    losses = ref.history["valid"]["loss"]
    assert losses[1] < losses[0]  # epoch 2 is the best one
    out = tmp_path / "run"
    run(out, max_epochs=1, loader=with_valid)
    with pytest.raises(Crash):
        run(out, max_epochs=4, loader=with_valid, callbacks=[CrashAt(3, 2)])
    run(out, max_epochs=2, loader=with_valid)
    got = torch.load(out / "best_model.pt", weights_only=True)
    want = torch.load(tmp_path / "ref" / "best_model.pt", weights_only=True)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    log = (out / "run_training.log").read_text()
    run(out, max_epochs=2, loader=with_valid)
    assert "Best model" not in (out / "run_training.log").read_text().removeprefix(log)


def test_a_state_beyond_the_checkpoint_it_is_resumed_over_is_warned_about(tmp_path):
    """A state trained on elsewhere (no out_dir) and passed back with its old run folder:
    fit resumed from the folder's older checkpoint and dropped the state's later epochs,
    saying only "Resumed from"."""
    state = run(tmp_path, max_epochs=1)
    state = run(None, max_epochs=2, state=state)
    assert run(tmp_path, max_epochs=2, state=state).step == state.step  # retrained epoch 2
    log = (tmp_path / "run_training.log").read_text()
    assert "fit got a state at epoch 2, step 12, beyond" in log
    assert "ckpt-0000000006-e.pt (epoch 1, step 6), which it resumes from" in log
    # A state at or behind the checkpoint (a fresh one, or the one fit returned) is not.
    run(tmp_path, max_epochs=3)
    run(tmp_path, max_epochs=4, state=run(tmp_path, max_epochs=3))
    assert (tmp_path / "run_training.log").read_text().count("fit got a state at") == 1


def test_a_continued_run_whose_best_is_an_earlier_fits_logs_where_it_is(tmp_path):
    """A fit that trains epochs says where the best model is, also when the best is still
    the epoch an earlier fit saved (only a re-run that trains nothing keeps quiet)."""
    run(tmp_path, max_epochs=2, mode="max")  # the highest train loss: epoch 1
    log = (tmp_path / "run_training.log").read_text()
    state = run(tmp_path, max_epochs=3, mode="max")
    losses = state.history["train"]["loss"]
    assert max(losses) == losses[0]
    added = (tmp_path / "run_training.log").read_text().removeprefix(log)
    assert f"Best model (train/loss {losses[0]:.4g} at epoch 1) saved to" in added


def test_a_state_of_more_steps_in_as_many_epochs_is_warned_about_too(tmp_path):
    """Beyond the checkpoint in steps alone: a state that trained its one epoch elsewhere
    with smaller batches (12 steps) is dropped for the folder's (epoch 1, step 6) too."""

    def small_batches():
        return DataLoader(seeded_loader().dataset, batch_size=5)

    run(tmp_path, max_epochs=1)
    state = run(None, max_epochs=1, loader=small_batches)
    assert (state.epoch, state.step) == (1, 12)
    run(tmp_path, max_epochs=1, state=state)
    log = (tmp_path / "run_training.log").read_text()
    assert "fit got a state at epoch 1, step 12, beyond" in log


def test_a_state_with_other_learning_rates_at_the_checkpoints_step_is_warned_about(tmp_path):
    """The state a fit returned, given another rate and passed back with its run folder:
    fit resumes from the checkpoint of that step, whose rate wins, and says so. A
    callback's on_fit_start is where a resumed run takes another rate."""
    state = run(tmp_path, max_epochs=1)
    lower = state.replace(opt_state=optim.with_learning_rates(state.opt_state, 1e-3))
    resumed = run(tmp_path, max_epochs=2, state=lower)
    log = (tmp_path / "run_training.log").read_text()
    assert "fit got a state whose learning rates ([0.001]) differ from those of" in log
    assert "ckpt-0000000006-e.pt, at the same step, which it resumes from" in log
    assert optim.learning_rates(resumed.opt_state)[0].item() == 1e-2

    class LowerRate(fl.callbacks.Callback):
        def on_fit_start(self, state):
            return state.replace(opt_state=optim.with_learning_rates(state.opt_state, 1e-3))

    resumed = run(tmp_path, max_epochs=3, callbacks=[LowerRate()])
    assert (resumed.step, optim.learning_rates(resumed.opt_state)[0].item()) == (18, 1e-3)
    # A state at the checkpoint's step with the same rates, or a fresh one, is not warned of.
    run(tmp_path, max_epochs=4, state=resumed)
    run(tmp_path, max_epochs=4, state=make_state())
    assert (tmp_path / "run_training.log").read_text().count("whose learning rates") == 1


def test_a_run_of_another_name_does_not_resume_the_folders_run(tmp_path):
    """A second experiment under another run_name in the same out_dir, from a fresh
    state: fit resumed the first run's checkpoint and returned its model as the new one
    (here, trained nothing at all). It is an error that names the run and the fixes, and
    nothing is written; the state fit returned goes on under the new name."""
    first = run(tmp_path, max_epochs=2, run_name="a")
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"written by the run 'a'.*run_name='a'.*resume=False"):
        run(tmp_path, max_epochs=2, run_name="b")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == files
    assert not (tmp_path / "b_training.log").exists()  # the error is the record
    # Going on from the checkpoint's own state, or under the name that wrote it, resumes.
    assert run(tmp_path, max_epochs=3, run_name="b", state=first).epoch == 3
    assert run(tmp_path, max_epochs=4, run_name="b").epoch == 4


def on_meta():
    """``make_state()``'s state on the meta device: a skeleton, without values."""
    with torch.device("meta"):
        module = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    return fl.TrainState.create(module.double(), tx=optim.adam(1e-2), device="meta")


def listing(folder):
    """Every file and folder under ``folder`` with its size and mtime_ns (None: missing)."""
    if not folder.exists():
        return None
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    }


def refusal_folder(kind, folder):
    """Makes ``folder`` as the refusal ``kind`` finds it; returns the refused fit's arguments."""
    if kind == "a new folder, a state on meta":
        return {"state": on_meta()}
    if kind == "mid-epoch checkpoint at max_epochs":
        with pytest.raises(Crash):
            run(folder, callbacks=[CrashAt(2, 3)], checkpoint_every_n_steps=3)
        return {"max_epochs": 1}
    run(folder, max_epochs=2, run_name="a")
    (folder / ".fnloop-0123456789ab.tmp").write_bytes(b"what a killed write left")
    if kind == "another run's checkpoints":
        return {"run_name": "b"}
    if kind == "a checkpoint beyond max_epochs":
        return {"run_name": "a", "max_epochs": 1}
    if kind == "checkpoints of another model":
        state = fl.TrainState.create(nn.Linear(6, 2).double(), tx=optim.adam(1e-2))
        return {"run_name": "a", "state": state}
    if kind == "resume=False, a state on meta":
        return {"run_name": "a", "resume": False, "state": on_meta()}
    assert kind == "damaged checkpoints, a state on meta"
    for path in (folder / "checkpoints").glob("ckpt-*.pt"):
        path.write_bytes(path.read_bytes()[:1000])
    return {"run_name": "a", "state": on_meta()}


@pytest.mark.parametrize(
    "kind",
    [
        "another run's checkpoints",
        "a checkpoint beyond max_epochs",
        "mid-epoch checkpoint at max_epochs",
        "checkpoints of another model",
        "a new folder, a state on meta",
        "resume=False, a state on meta",
        "damaged checkpoints, a state on meta",
    ],
)
def test_a_fit_refused_by_what_the_run_folder_holds_leaves_it_as_it_was(tmp_path, kind):
    """A fit refused once it looks at out_dir wrote <run_name>_training.log (a new file,
    or a line appended), made the folder and checkpoints/, removed temporary files, and
    (resume=False, or no usable checkpoint, with a state on meta) set the earlier run's
    files aside: its error is the record, and the folder stays as it was."""
    folder = tmp_path / "run"
    kwargs = refusal_folder(kind, folder)
    before = listing(folder)
    with pytest.raises(ValueError):  # (CheckpointMismatchError is one)
        run(folder, **{"max_epochs": 2, **kwargs})
    assert listing(folder) == before


@pytest.mark.xfail(
    strict=True,
    reason="metrics.csv with a hand-added cell in a row, which its CSVLogger would have to "
    "rewrite (a torn last line, rows beyond the state), is refused at on_fit_start: after "
    "fit opened the run's log (appending 'Resumed from ...' and the error) and, with "
    "resume=False and a trained state, set the earlier checkpoints and best model aside. "
    "Checking it earlier needs the logger to know, before fit's resume, the state it will "
    "start from and whether fit sets its file aside: a change of the EpochLogger protocol.",
)
@pytest.mark.parametrize("resume", [True, False])
def test_a_metrics_csv_refused_at_fit_start_leaves_the_run_folder_as_it_was(tmp_path, resume):
    folder = tmp_path / "run"
    run(folder, max_epochs=2)
    csv = folder / "metrics.csv"
    lines = csv.read_text().splitlines(keepends=True)
    lines[1] = lines[1].rstrip("\n") + ",my note\n"
    csv.write_text("".join(lines) + ("3,99" if resume else ""))  # a torn line: rewritten
    state = make_state() if resume else run(None, max_epochs=1)
    before = listing(folder)
    with pytest.raises(ValueError, match="line 2, has 5 cells and the header 4"):
        run(folder, max_epochs=3, state=state, resume=resume)
    assert listing(folder) == before


class CtrlCAt(CrashAt):
    """Ctrl-C after the given batch of the given epoch."""

    def on_train_batch_end(self, state, outputs, batch, batch_idx):
        if state.epoch + 1 == self.epoch and batch_idx == self.batch:
            raise KeyboardInterrupt


class CrashInValidationOf(fl.callbacks.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_validation_epoch_start(self, state):
        if state.epoch == self.epoch:
            raise Crash


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="draws with matplotlib")
@pytest.mark.parametrize(
    ("crash", "error"),
    [(CrashAt(4, 2), Crash), (CrashInValidationOf(4), Crash), (CtrlCAt(4, 2), KeyboardInterrupt)],
    ids=["in-training", "in-validation", "ctrl-c"],
)
def test_the_history_plot_of_a_crashed_run_shows_its_finished_epochs(tmp_path, crash, error):
    """history.png was drawn at on_fit_end only: a run that crashed or was stopped by
    Ctrl-C after some epochs kept an earlier fit's plot (or none) though metrics.csv and
    the checkpoints held more epochs. It now shows the epochs whose checkpoints were
    written, as metrics.csv does, also when the crash came in an epoch's validation."""
    from fnloop.callbacks.plot import plot_history

    g = torch.Generator().manual_seed(1)
    xv = torch.randn(20, 6, generator=g, dtype=torch.float64)
    valid = DataLoader(TensorDataset(xv, (xv[:, 1] > 0).long()), batch_size=10)
    out = tmp_path / "run"

    def loaders():
        return {"train": seeded_loader(), "valid": valid}

    run(out, max_epochs=1, loader=loaders)  # a finished fit draws its epoch
    with pytest.raises(error):
        run(out, max_epochs=5, loader=loaders, callbacks=[crash])
    (newest, *_) = sorted((out / "checkpoints").glob("ckpt-*.pt"), reverse=True)
    saved = fl.load_checkpoint(newest, like=make_state())
    assert saved.epoch == 3 and len((out / "metrics.csv").read_text().splitlines()) == 1 + 3
    plot_history(saved.history, tmp_path / "want.png")
    assert (out / "history.png").read_bytes() == (tmp_path / "want.png").read_bytes()


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="fit adds no plot")
def test_a_failed_draw_of_a_crashed_runs_plot_does_not_hide_the_crash(tmp_path, monkeypatch):
    from fnloop.callbacks import plot

    tried = []

    def fail(history, path):
        tried.append(len(history["train"]["loss"]))
        raise OSError("No space left on device")

    monkeypatch.setattr(plot, "plot_history", fail)
    with pytest.raises(Crash):
        run(tmp_path, max_epochs=3, callbacks=[CrashAt(2, 1)])
    assert tried == [1]  # epoch 1's plot, drawn on the way out
    log = (tmp_path / "run_training.log").read_text()
    assert "Stopped by Crash in epoch 2" in log
    # The failed draw was swallowed without a word: the log now says so, after the crash.
    (line,) = [line for line in log.splitlines() if "PlotHistory failed" in line]
    assert " - WARNING - " in line and "OSError: No space left on device" in line
    assert log.index("Stopped by Crash") < log.index("PlotHistory failed")


@pytest.mark.parametrize("batch_size", [5, 20])
def test_a_mid_epoch_resume_with_another_epoch_length_is_warned_about(tmp_path, batch_size):
    """The saved position counts batches of the interrupted run's loader: resumed with
    another batch size, fit skipped that many of the new loader's batches in silence."""
    with pytest.raises(Crash):
        run(tmp_path, callbacks=[CrashAt(2, 3)], checkpoint_every_n_steps=2)

    def other():
        g = torch.Generator().manual_seed(7)
        return DataLoader(seeded_loader().dataset, batch_size=batch_size, shuffle=True, generator=g)

    run(tmp_path, loader=other, checkpoint_every_n_steps=2)
    log = (tmp_path / "run_training.log").read_text()
    assert (
        "ckpt-0000000008-b.pt was saved after batch 2 of an epoch of 6 batches, and the "
        f"train loader now has {60 // batch_size} per epoch" in log
    )
    assert f"the resumed epoch skips its first {min(2, 60 // batch_size)} batches" in log


def test_a_mid_epoch_resume_with_the_same_epoch_length_is_not_warned_about(tmp_path):
    with pytest.raises(Crash):
        run(tmp_path, callbacks=[CrashAt(2, 3)], checkpoint_every_n_steps=2)
    run(tmp_path, checkpoint_every_n_steps=2)
    log = (tmp_path / "run_training.log").read_text()
    assert "Resumed from" in log and "per epoch (another batch size" not in log


class _GrowingSampler(torch.utils.data.Sampler):
    """A curriculum: epoch e (from 0) takes the first 20 + 10 e examples."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return min(60, 20 + 10 * self.epoch)

    def __iter__(self):
        return iter(range(len(self)))


def test_a_mid_epoch_resume_of_a_loader_whose_length_follows_set_epoch_is_not_warned_about(
    tmp_path,
):
    """The length compared was the sampler's before set_epoch of the resumed epoch: fit
    warned that the epoch would skip other batches, and resumed it exactly."""

    def curriculum():
        return DataLoader(seeded_loader().dataset, batch_size=10, sampler=_GrowingSampler())

    with pytest.raises(Crash):
        run(tmp_path, loader=curriculum, callbacks=[CrashAt(2, 2)], checkpoint_every_n_steps=2)
    run(tmp_path, loader=curriculum, checkpoint_every_n_steps=2)
    log = (tmp_path / "run_training.log").read_text()
    assert "ckpt-0000000004-b.pt (epoch 1, step 4, batch 2 of epoch 2)" in log
    assert "per epoch (another batch size" not in log


class _Scores(fl.callbacks.Callback):
    """Appends ``train/score`` = SCORES[epoch - 1] at each train epoch end."""

    SCORES = (1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0)

    def on_train_epoch_end(self, state, metrics):
        score = {"score": self.SCORES[state.epoch - 1]}
        return state.replace(history=fl.state.append_history(state.history, "train", score))


def _without_stopper_rules(folder):
    """Rewrites each checkpoint in ``folder`` as fnloop 0.1.0 wrote it: its fit record
    does not say which rules its early-stopping states belong to."""
    for path in sorted((folder / "checkpoints").glob("ckpt-*.pt")):
        found = fl.checkpoint.load_checkpoint_with_extra(path, make_state())
        record = {k: v for k, v in found.extra["fit"].items() if k != "stopper_rules"}
        fl.save_checkpoint(path, found.state, **{**found.extra, "fit": record})


@pytest.mark.parametrize("rules", ["same", "one more"])
def test_a_checkpoint_without_stopper_rules_matches_its_progress_by_position(tmp_path, rules):
    """Scores 1, 2, 2, 2, ... with patience 2 stop after epoch 4. A run that crashed at
    the start of epoch 4 (one epoch waited) and resumes from a checkpoint without the
    rules' record: the same rules take the saved progress back (the run stops after
    epoch 4, as the uninterrupted one); another number of rules cannot be matched, and
    every rule starts counting afresh (the scores of epoch 4 on: it stops after 6)."""
    rule = fl.EarlyStopping("train/score", mode="max", patience=2)
    kw = {"loader": seeded_loader, "max_epochs": 8, "early_stopping": [rule]}
    whole = run(tmp_path / "whole", callbacks=[_Scores()], **kw)
    assert whole.epoch == 4
    with pytest.raises(Crash):
        run(tmp_path / "old", callbacks=[_Scores(), CrashAt(4)], **kw)
    _without_stopper_rules(tmp_path / "old")
    if rules == "one more":
        kw["early_stopping"] = [rule, fl.EarlyStopping("train/loss", patience=100)]
    resumed = run(tmp_path / "old", callbacks=[_Scores()], **kw)
    assert resumed.epoch == (4 if rules == "same" else 6)
    if rules == "same":
        assert_same(resumed, whole)


def test_partial_means_summed_over_processes_keep_the_step_outputs_out():
    """A mid-epoch checkpoint resumed with another number of processes sums every
    process's partial means (fit._summed_means). An entry that had several elements
    before the checkpoint (predictions) stays an output, also in a last batch of one
    example, as it does when each process takes back its own part."""
    from fnloop.fit import _summed_means

    parts = []
    for r in range(2):
        means = fl.MetricMeans()
        means.add({"loss": torch.tensor(1.0 + r), "pred": torch.arange(4.0)}, 4)
        parts.append(means.state_dict())
    resumed = fl.MetricMeans()
    resumed.load_state_dict(_summed_means(parts))
    resumed.add({"loss": torch.tensor(3.0), "pred": torch.tensor([7.0])}, 1)
    assert sorted(resumed.means()) == ["loss"]


def _plateau_fit(out_dir, mode, monitor, max_epochs):
    """fit with a reduce_on_plateau fed ``monitor`` (train/acc, or train/big: near 10)."""

    def step(model, batch):
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).double().mean()
        return {"loss": loss, "acc": acc, "big": loss.detach() + 10.0}

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2)).double()
    tx = optim.adam(optim.reduce_on_plateau(1e-2, mode=mode, patience=0))
    state = fl.TrainState.create(module, tx=tx, device="cpu")
    return fl.fit(
        state,
        step,
        seeded_loader(),
        max_epochs=max_epochs,
        out_dir=out_dir,
        monitor=monitor,
        mode=mode,
        log_to_console=False,
    )


def test_a_plateau_resumed_to_follow_another_metric_starts_from_its_first_value(tmp_path):
    """Run 1 follows an accuracy (mode='max', best near 1); run 2, resumed, a loss-like
    metric near 10 (mode='min'). Its first epoch must set the plateau's best, as the
    first observation of a fresh plateau does; the accuracy it kept is never beaten by
    the new metric, so the rate is cut every patience + 1 epochs however it improves."""
    from fnloop.optim.plateau import plateau_nodes

    assert _plateau_fit(tmp_path, "max", "train/acc", 1).epoch == 1
    resumed = _plateau_fit(tmp_path, "min", "train/big", 2)
    assert resumed.epoch == 2
    (node,) = plateau_nodes(resumed.opt_state)
    assert float(node.best) == resumed.history["train"]["big"][-1]
    assert float(node.lr) == 1e-2 and int(node.num_bad_epochs) == 0  # the rate is kept
    # Fed the same metric again, it keeps its progress: the best of both runs' values.
    again = _plateau_fit(tmp_path, "min", "train/big", 3)
    (node,) = plateau_nodes(again.opt_state)
    assert float(node.best) == min(again.history["train"]["big"][1:])


def test_a_plateau_resumed_from_a_checkpoint_that_names_no_feed_goes_by_its_best(
    tmp_path, monkeypatch
):
    """A checkpoint written before the record named what fed the plateaus (no top-level
    monitor and mode) has its best model's, which fed them too: the plateau of a run
    resumed to follow another metric starts afresh from it as well."""
    from fnloop.fit import _Run
    from fnloop.optim.plateau import plateau_nodes

    record = _Run.record

    def older_record(self, position, ranks):
        rec = record(self, position, ranks)
        del rec["monitor"], rec["mode"]
        return rec

    with monkeypatch.context() as patch:
        patch.setattr(_Run, "record", older_record)
        assert _plateau_fit(tmp_path, "max", "train/acc", 1).epoch == 1
    resumed = _plateau_fit(tmp_path, "min", "train/big", 2)
    (node,) = plateau_nodes(resumed.opt_state)
    assert float(node.best) == resumed.history["train"]["big"][-1]
    assert float(node.lr) == 1e-2
