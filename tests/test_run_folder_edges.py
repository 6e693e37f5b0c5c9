"""Edges of fit's run folder and loaders found in review: loggers' hooks called by
keyword, hand-edited and never-logged metrics rows, undeletable checkpoints, errors of
other files while writing, persistent workers across fit calls, on_fit_start and
DataLoader subclasses, and the log line of another process."""

from __future__ import annotations

import pathlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fnloop as fl
from fnloop import optim


def _classify(model, batch):
    x, y = batch
    return {"loss": F.cross_entropy(model(x), y)}


def _data(n=32):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g))


def _state():
    torch.manual_seed(0)
    return fl.TrainState.create(nn.Linear(4, 2), tx=optim.sgd(0.1), device="cpu")


def _fit(state, loader, epochs, **kw):
    kw.setdefault("log_to_console", False)
    return fl.fit(state, _classify, loader, max_epochs=epochs, progress=False, **kw)


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "plain"])
def test_a_second_fit_with_the_same_loader_goes_on_as_one_fit(persistent):
    """fit(2) then fit(4) trains as fit(4): persistent workers running since the first
    fit are not started again (that reset drew another shuffle order)."""

    def run(*epochs):
        state = _state()
        loader = DataLoader(
            _data(),
            batch_size=8,
            shuffle=True,
            num_workers=1 if persistent else 0,
            persistent_workers=persistent,
        )
        torch.manual_seed(1)  # the shuffle order and the workers' base seed
        for n in epochs:
            state = _fit(state, loader, n)
        return state

    one, two = run(4), run(2, 4)
    for k in one.params:
        torch.testing.assert_close(two.params[k], one.params[k], rtol=0, atol=0)


def test_epoch_logger_hooks_take_their_arguments_by_keyword(tmp_path):
    state = _state()
    cb = fl.callbacks.CSVLogger(tmp_path / "m.csv")
    cb.on_fit_start(state=state)
    cb.on_train_epoch_end(state=state.replace(epoch=1, step=4), metrics={"train/loss": 0.5})
    cb.on_fit_end(state=state.replace(epoch=1, step=4))
    assert (tmp_path / "m.csv").read_text().splitlines()[1].startswith("1,4,0.5,")


def test_a_hand_added_cell_does_not_stop_a_resume_that_rewrites_nothing(tmp_path):
    log = tmp_path / "logs" / "m.csv"
    run = tmp_path / "run"
    loader = DataLoader(_data(), batch_size=8)
    _fit(_state(), loader, 2, out_dir=run, callbacks=[fl.callbacks.CSVLogger(log)])
    lines = log.read_text().splitlines(keepends=True)
    lines[1] = lines[1].rstrip("\n") + ",my note\n"
    log.write_text("".join(lines))
    _fit(_state(), loader, 3, out_dir=run, callbacks=[fl.callbacks.CSVLogger(log)])
    assert log.read_text().splitlines()[1].endswith(",my note")
    assert len(log.read_text().splitlines()) == 4


def test_a_trained_state_without_a_checkpoint_gives_no_torn_rows_warning(tmp_path):
    log = tmp_path / "log.jsonl"
    loader = DataLoader(_data(), batch_size=8)
    state = _fit(_state(), loader, 1, callbacks=[fl.callbacks.JSONLinesLogger(log)])
    state = _fit(state, loader, 3)  # trained on without the logger
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _fit(state, loader, 4, callbacks=[fl.callbacks.JSONLinesLogger(log)])


def test_an_undeletable_old_checkpoint_is_warned_about_once(tmp_path, monkeypatch):
    real = pathlib.Path.unlink

    def unlink(self, missing_ok=False):
        if self.name == "ckpt-0000000004-e.pt":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, missing_ok=missing_ok)

    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    loader = DataLoader(_data(), batch_size=8)
    _fit(_state(), loader, 4, out_dir=tmp_path, keep_checkpoints=1)
    log = (tmp_path / "run_training.log").read_text(encoding="utf-8")
    assert sum("Could not delete" in line for line in log.splitlines()) == 1
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.pt"))
    assert kept == ["ckpt-0000000004-e.pt", "ckpt-0000000016-e.pt"]


def test_a_relative_run_folder_sets_aside_its_jsonl_log_on_a_fresh_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loader = DataLoader(_data(), batch_size=8)
    cb = fl.callbacks.JSONLinesLogger
    _fit(_state(), loader, 2, out_dir="run", callbacks=[cb("run/logs/x.jsonl")])
    before = (tmp_path / "run/logs/x.jsonl").read_text()
    _fit(_state(), loader, 1, out_dir="run", resume=False, callbacks=[cb("run/logs/x.jsonl")])
    (aside,) = (tmp_path / "run/checkpoints").glob("previous-*")
    assert (aside / "logs/x.jsonl").read_text() == before
    assert len((tmp_path / "run/logs/x.jsonl").read_text().splitlines()) == 1


def test_a_runtime_error_raised_from_another_files_os_error_keeps_its_message(tmp_path):
    from fnloop._io import atomic_write_file

    def write(f):
        try:
            (tmp_path / "no-such-folder" / "latex").read_bytes()
        except FileNotFoundError as e:
            raise RuntimeError("latex could not be found") from e

    with pytest.raises(RuntimeError, match="latex could not be found"):
        atomic_write_file(tmp_path / "history.png", write)
    assert not (tmp_path / "history.png").exists()


def test_another_process_appends_its_line_only_to_an_existing_log(tmp_path):
    from fnloop.fit import _append_to_log

    missing = tmp_path / "run_training.log"
    _append_to_log(missing, "Process 1 of 2: Stopped by ValueError.")
    assert not missing.exists()  # (a node without the run folder makes no file)
    missing.write_text("first\n", encoding="utf-8")
    _append_to_log(missing, "Process 1 of 2: Stopped by ValueError.")
    first, line = missing.read_text(encoding="utf-8").splitlines()
    assert first == "first"
    assert line.endswith(" - ERROR - Process 1 of 2: Stopped by ValueError.")


class _Levels(torch.utils.data.Dataset):
    """Items that carry the dataset's ``level`` as their label (a curriculum setting)."""

    level = 0

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.randn(4), torch.tensor(self.level)


class _SetLevel(fl.callbacks.Callback):
    def __init__(self, dataset):
        self.dataset = dataset

    def on_fit_start(self, state):
        self.dataset.level = 3


def test_persistent_workers_see_what_on_fit_start_set_on_the_dataset():
    dataset, seen = _Levels(), []

    def step(model, batch):
        x, level = batch
        seen.extend(level.tolist())
        return {"loss": model(x).pow(2).mean()}

    loader = DataLoader(dataset, batch_size=8, num_workers=1, persistent_workers=True)
    state = fl.TrainState.create(nn.Linear(4, 1), tx=optim.sgd(0.1), device="cpu")
    fl.fit(state, step, loader, max_epochs=1, callbacks=[_SetLevel(dataset)], log_to_console=False)
    assert seen == [3] * 16


def test_a_full_disk_at_the_files_fsync_raises_an_oserror_naming_the_file(tmp_path, monkeypatch):
    import errno
    import os

    import fnloop._io
    from fnloop.checkpoint import save_checkpoint

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fnloop._io, "_fsync", full)
    with pytest.raises(OSError) as raised:
        save_checkpoint(tmp_path / "ckpt.pt", _state())
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []


class _Forwarding(DataLoader):
    """A DataLoader subclass whose ``__iter__`` is a generator (it could move batches)."""

    def __iter__(self):
        yield from super().__iter__()


@pytest.mark.slow
def test_a_resume_with_a_persistent_dataloader_subclass_repeats_the_run(tmp_path):
    def run(out, epochs):
        loader = _Forwarding(
            _data(), batch_size=8, shuffle=True, num_workers=1, persistent_workers=True
        )
        state = _state()  # (seeds the global generator: the same start in both runs)
        return _fit(state, loader, epochs, out_dir=out)

    ref = run(tmp_path / "ref", 3)
    run(tmp_path / "res", 1)
    resumed = run(tmp_path / "res", 3)  # a new loader, as in a new process
    for k in ref.params:
        torch.testing.assert_close(resumed.params[k], ref.params[k], rtol=0, atol=0)
