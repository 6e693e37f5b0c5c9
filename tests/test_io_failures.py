"""File-system failures while fit writes its run folder, and damaged files it reads back."""

from __future__ import annotations

import builtins
import errno
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fnloop as fl
import fnloop._io
from fnloop import optim
from fnloop.checkpoint import load_checkpoint, save_checkpoint, save_model


def make_state():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))
    return fl.TrainState.create(module.double(), tx=optim.adam(1e-2), device="cpu")


def classify(model, batch):
    x, y = batch
    return {"loss": F.cross_entropy(model(x), y)}


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    return DataLoader(
        TensorDataset(x, y), batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(7)
    )


class OwnPlot(fl.callbacks.Callback):
    """Stands for a callback that writes history.png itself, so fit adds no PlotHistory
    (drawing takes a second); the plot's own failures are tested elsewhere."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "history.png"


def run(folder: Path, max_epochs: int = 3, step=classify) -> fl.TrainState:
    return fl.fit(
        make_state(),
        step,
        loader(),
        max_epochs=max_epochs,
        out_dir=folder,
        callbacks=[OwnPlot(folder)],
        log_to_console=False,
    )


def files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(".log")
    }


def assert_same(a: fl.TrainState, b: fl.TrainState) -> None:
    assert (a.step, a.epoch) == (b.step, b.epoch)
    for name, p in a.params.items():
        assert torch.equal(p, b.params[name]), name
    leaves_a = torch.utils._pytree.tree_leaves(a.opt_state)
    leaves_b = torch.utils._pytree.tree_leaves(b.opt_state)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert a.history == b.history


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    return run(folder), files(folder)


def _full(path: object) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("point", ["open", "fsync", "replace"])
def test_a_full_disk_at_an_epochs_checkpoint_loses_nothing_and_a_rerun_ends_as_uninterrupted(
    tmp_path, monkeypatch, reference, point
):
    """ENOSPC while the checkpoint of epoch 2 is written (creating its temporary file,
    fsyncing it, renaming it): fit raises that OSError, every file written before is
    bit-identical, no temporary file is left, and the same fit run again ends as the
    uninterrupted run, its metrics.csv included."""
    target = "ckpt-0000000008-e.pt"  # 4 batches per epoch: epoch 2 ends at step 8
    seen: dict[str, bytes] = {}
    armed = [False]  # set while the target's atomic write runs
    real_write, real_fsync, real_replace = fl.checkpoint.atomic_write_file, os.fsync, os.replace

    def fail_here(at: str, path: object) -> None:
        if armed[0] and point == at:
            armed[0] = False
            seen.update(files(tmp_path))
            raise _full(path)

    def atomic_write_file(path, write):
        armed[0] = Path(path).name == target
        try:
            return real_write(path, write)
        finally:
            armed[0] = False

    def open_(file, mode="r", *args, **kwargs):
        fail_here("open", file)
        return builtins.open(file, mode, *args, **kwargs)

    def fsync(fd):
        fail_here("fsync", fd)
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        fail_here("replace", dst)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(fl.checkpoint, "atomic_write_file", atomic_write_file)
    monkeypatch.setattr(fnloop._io, "open", open_, raising=False)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError) as raised:
        run(tmp_path)
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC
    assert seen, "the failure was not injected"
    after = files(tmp_path)
    assert {k: after.get(k) for k in seen if ".fnloop-" not in k} == {
        k: v for k, v in seen.items() if ".fnloop-" not in k
    }
    assert not [k for k in after if ".fnloop-" in k]
    assert "checkpoints/" + target not in after
    final = run(tmp_path)
    ref_state, ref_files = reference
    assert_same(final, ref_state)
    assert files(tmp_path)["metrics.csv"] == ref_files["metrics.csv"]
    assert files(tmp_path)["best_model.pt"] == ref_files["best_model.pt"]


class _FailingWrites:
    """An ``open`` for fnloop._io whose files fail their ``n``-th write with ENOSPC, as a
    full disk fails a write(2) in the middle of a file."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 (closed by File's __exit__)
        outer = self

        class File:
            calls = 0

            def write(self, data):
                File.calls += 1
                if File.calls == outer.n:  # as write(2) fails: an OSError naming no file
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return f.write(data)

            def __getattr__(self, name):
                return getattr(f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return f.__exit__(*exc)

        return File()


@pytest.mark.parametrize("save", [save_checkpoint, save_model])
def test_a_write_that_fails_midway_keeps_the_earlier_file_and_leaves_no_temporary(
    tmp_path, monkeypatch, save
):
    state = make_state()
    path = save(tmp_path / "file.pt", state)
    before = path.read_bytes()
    monkeypatch.setattr(fnloop._io, "open", _FailingWrites(3), raising=False)
    with pytest.raises(Exception):  # noqa: B017  (which one: the test below)
        save(path, state.replace(step=5))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.pt"]
    if save is save_checkpoint:
        assert load_checkpoint(path, like=state).step == 0


@pytest.mark.parametrize("save", [save_checkpoint, save_model])
def test_a_write_that_fails_midway_raises_the_oserror_naming_the_file(tmp_path, monkeypatch, save):
    state = make_state()
    monkeypatch.setattr(fnloop._io, "open", _FailingWrites(3), raising=False)
    with pytest.raises(OSError) as raised:
        save(tmp_path / "file.pt", state)
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(tmp_path / "file.pt")
    assert isinstance(raised.value.__cause__, RuntimeError)  # torch's, kept in the chain
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_metrics_csv_row_with_extra_cells_is_an_error_naming_the_file_or_is_kept(tmp_path):
    """A hand-edited metrics.csv whose first row has two cells more than the header, and
    a resume from epoch 1 (the file's epoch-2 row must go): either the logger goes on, or
    its error says which file to fix."""
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss\n1,4,0.5,999,888\n2,8,0.25\n")
    logger = fl.callbacks.CSVLogger(path)
    state = make_state().replace(epoch=1, step=4)
    try:
        logger.on_fit_start(state)
    except Exception as e:
        assert str(path) in str(e) or "metrics.csv" in str(e), str(e)
    else:
        assert path.read_text().splitlines()[:2] == ["epoch,step,train/loss", "1,4,0.5,999,888"]


class _CrashAtEpoch3(fl.callbacks.Callback):
    def on_train_epoch_start(self, state):
        if state.epoch == 2:
            raise KeyError("crash")


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _foreign(path: Path) -> None:
    path.write_bytes(b"not a checkpoint\n")


def _newer_export(path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, path.with_name("ckpt-9999999999-e.pt"))


def _crashed_run(folder: Path, crash: fl.callbacks.Callback) -> None:
    """A run to 3 epochs that ``crash`` ends with a KeyError."""
    with pytest.raises(KeyError):
        fl.fit(
            make_state(),
            classify,
            loader(),
            max_epochs=3,
            out_dir=folder,
            callbacks=[OwnPlot(folder), crash],
            log_to_console=False,
        )


@pytest.mark.parametrize("damage", [_cut, _empty, _foreign, _newer_export])
def test_a_damaged_newest_checkpoint_is_named_and_skipped_and_the_run_ends_as_uninterrupted(
    tmp_path, reference, damage
):
    """The newest checkpoint cut by one byte, emptied, overwritten by a text file, or a
    newer-named file that is a model export: the re-run names the file it skips, resumes
    from the one before, and ends bit for bit as the uninterrupted run."""
    _crashed_run(tmp_path, _CrashAtEpoch3())  # after the checkpoints of epochs 1 and 2
    newest = tmp_path / "checkpoints" / "ckpt-0000000008-e.pt"
    damage(newest)
    skipped = newest if damage is not _newer_export else newest.with_name("ckpt-9999999999-e.pt")
    log = (tmp_path / "run_training.log").read_text()
    final = run(tmp_path)
    new_log = (tmp_path / "run_training.log").read_text().removeprefix(log)
    assert f"Skipping damaged checkpoint {skipped}: " in new_log
    resumed_from = "ckpt-0000000004-e.pt" if damage is not _newer_export else newest.name
    assert f"Resumed from {tmp_path / 'checkpoints' / resumed_from} " in new_log
    ref_state, ref_files = reference
    assert_same(final, ref_state)
    assert files(tmp_path)["metrics.csv"] == ref_files["metrics.csv"]
    assert files(tmp_path)["best_model.pt"] == ref_files["best_model.pt"]


def test_a_torn_metrics_row_of_a_checkpointed_epoch_is_warned_about(tmp_path, reference):
    """Rows are fsynced before their epoch's checkpoint; one lost all the same (a file
    system that ignored the fsync) is named in a warning when the run resumes, its
    values being in the history, and the file goes on without it."""
    _crashed_run(tmp_path, _CrashAtEpoch3())  # after the checkpoints of epochs 1 and 2
    csv = tmp_path / "metrics.csv"
    csv.write_text(csv.read_text()[:-12])  # epoch 2's row, partly on disk
    with pytest.warns(RuntimeWarning, match=f"{csv} lacks the row of epoch 2, which the"):
        final = run(tmp_path)
    assert [line.split(",")[0] for line in csv.read_text().splitlines()[1:]] == ["1", "3"]
    assert final.history == reference[0].history


def _logged_state(epochs: int, step: int) -> fl.TrainState:
    state = make_state().replace(epoch=epochs, step=step)
    history = state.history
    for epoch in range(1, epochs + 1):
        history = fl.state.append_history(history, "train", {"loss": 1 / epoch, "lr": 0.01})
        history = fl.state.append_history(history, "valid", {"loss": 2 / epoch})
    return state.replace(history=history)


def test_json_lines_lost_after_the_last_one_are_named_in_a_warning(tmp_path):
    """Lines of finished epochs after the file's last line (torn or lost): a resumed run
    warns, naming the file and the epochs, and keeps the lines that are there."""
    path = tmp_path / "m.jsonl"
    logger = fl.callbacks.JSONLinesLogger(path)
    logger.on_fit_start(_logged_state(0, 0))
    state = _logged_state(3, 12)
    for epoch in (1, 2, 3):
        at = state.replace(epoch=epoch, step=4 * epoch)
        logger.on_train_epoch_start(at)
        logger.on_train_epoch_end(at, {"train/loss": 1 / epoch, "train/lr": 0.01})
        logger.on_validation_epoch_end(at, {"valid/loss": 2 / epoch})
    logger.on_fit_end(state)
    first = path.read_text().splitlines(keepends=True)[0]
    path.write_text(first + '{"epoch": 2, "st')
    logger = fl.callbacks.JSONLinesLogger(path)
    logger._track_epochs(resumable=True)  # as fit sets it with a run folder
    with pytest.warns(RuntimeWarning, match=f"{path} lacks the rows of epochs 2-3, which"):
        logger.on_fit_start(state)
    logger.on_fit_end(state)
    assert path.read_text() == first


def test_rows_lost_before_a_mid_epoch_checkpoint_are_named(tmp_path):
    """A state past its last epoch's end (a mid-epoch checkpoint): the warning names the
    file and the row, and the file stays as it is."""
    path = tmp_path / "metrics.csv"
    text = "epoch,step,train/loss,train/lr,valid/loss\n1,4,1.0,0.01,2.0\n"
    path.write_text(text)
    logger = fl.callbacks.CSVLogger(path)
    logger._track_epochs(resumable=True)
    with pytest.warns(RuntimeWarning, match=f"{path} lacks the row of epoch 2, which"):
        logger.on_fit_start(_logged_state(2, 10))
    assert path.read_text() == text


def test_starting_over_keeps_the_earlier_runs_json_lines_somewhere(tmp_path):
    def fit_(max_epochs, **kw):
        return fl.fit(
            make_state(),
            classify,
            loader(),
            max_epochs=max_epochs,
            out_dir=tmp_path,
            callbacks=[OwnPlot(tmp_path), fl.callbacks.JSONLinesLogger(tmp_path / "m.jsonl")],
            log_to_console=False,
            **kw,
        )

    fit_(2)
    earlier = (tmp_path / "m.jsonl").read_text().splitlines()
    fit_(1, resume=False)
    everywhere = "".join(p.read_text() for p in tmp_path.rglob("*.jsonl"))
    assert [line for line in earlier if line not in everywhere] == []


def test_a_runtimeerror_of_the_writer_not_caused_by_an_oserror_is_raised_as_it_is(tmp_path):
    def write(f):
        raise RuntimeError("not a file system's")

    with pytest.raises(RuntimeError, match="not a file system's"):
        fnloop._io.atomic_write_file(tmp_path / "file.pt", write)
    assert list(tmp_path.iterdir()) == []


def test_a_metrics_csv_row_with_extra_cells_stops_a_rewrite_and_loses_nothing(tmp_path):
    """A row with more cells than the header, and a resumed run that logs a metric the
    header lacks, so that the logger would rewrite the file with a wider header (losing
    the cells): fit raises when the row is written, before the epoch's checkpoint,
    naming the file, the line and the fix; no file changes."""
    run(tmp_path, max_epochs=1)
    csv = tmp_path / "metrics.csv"
    header, row = csv.read_text().splitlines()
    csv.write_text(f"{header}\n{row},999\n")
    before = files(tmp_path)

    def classify_more(model, batch):
        return {**classify(model, batch), "more": torch.tensor(1.0)}

    with pytest.raises(ValueError) as raised:
        run(tmp_path, max_epochs=2, step=classify_more)
    message = str(raised.value)
    assert f"{csv}, line 2, has " in message
    assert "Remove or repair that line" in message and "move the file away" in message
    assert files(tmp_path) == before


@pytest.mark.parametrize("trained", [False, True])
def test_starting_over_sets_the_epoch_loggers_files_aside_at_their_place(tmp_path, trained):
    """A JSONLinesLogger writing a subfolder of the run folder: resume=False moves its
    file to the folder set aside, under the same relative path (copies it, for a state
    with trained epochs, whose lines stay in the new file too)."""

    def fit_(state, max_epochs, **kw):
        return fl.fit(
            state,
            classify,
            loader(),
            max_epochs=max_epochs,
            out_dir=tmp_path,
            callbacks=[OwnPlot(tmp_path), fl.callbacks.JSONLinesLogger(tmp_path / "l" / "m.jsonl")],
            log_to_console=False,
            **kw,
        )

    first = fit_(make_state(), 2)
    earlier = (tmp_path / "l" / "m.jsonl").read_bytes()
    fit_(first if trained else make_state(), 3 if trained else 1, resume=False)
    (aside,) = (tmp_path / "checkpoints").glob("previous-*")
    assert (aside / "l" / "m.jsonl").read_bytes() == earlier
    now = (tmp_path / "l" / "m.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in now] == ([1, 2, 3] if trained else [1])


@pytest.mark.parametrize("kind", ["CSVLogger", "JSONLinesLogger"])
def test_an_epoch_row_is_fsynced_as_it_is_written(tmp_path, monkeypatch, kind):
    path = tmp_path / "m.log"
    logger = getattr(fl.callbacks, kind)(path)
    state = make_state()
    logger.on_fit_start(state)
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        same = path.exists() and os.fstat(fd).st_ino == path.stat().st_ino
        synced.append(same and os.fstat(fd).st_size)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    logger.on_train_epoch_start(state)
    logger.on_train_epoch_end(state.replace(epoch=1, step=4), {"train/loss": 0.5})
    logger.on_fit_end(state.replace(epoch=1, step=4))
    assert synced and synced[-1] == path.stat().st_size  # the file, with its last row


def test_a_failed_delete_of_an_old_checkpoint_is_a_warning_and_the_run_goes_on(
    tmp_path, monkeypatch, reference
):
    """EIO deleting the checkpoint of epoch 1 (keep_checkpoints=2, after epoch 3's is
    written): the run ends as the uninterrupted one, and the log names the file."""
    stuck = tmp_path / "checkpoints" / "ckpt-0000000004-e.pt"
    real_unlink = Path.unlink

    def unlink(path, *args, **kwargs):  # (Path's: on Python 3.10 it holds its own os.unlink)
        if Path(path) == stuck:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    final = run(tmp_path)
    monkeypatch.undo()
    assert_same(final, reference[0])
    assert stuck.exists()
    log = (tmp_path / "run_training.log").read_text()
    assert f"Could not delete the old checkpoint {stuck} ([Errno 5] " in log


class _CrashAtOnce(fl.callbacks.Callback):
    def on_train_epoch_start(self, state):
        raise KeyError("crash")


@pytest.mark.parametrize("damage", [_cut, _empty, _foreign, _newer_export])
def test_the_resume_hint_names_the_checkpoint_a_resume_would_take(tmp_path, damage):
    """After a damaged newest checkpoint, a run that fails names in its log the file
    the next resume takes, not the damaged one it skips."""
    run(tmp_path, max_epochs=2)
    ckpts = tmp_path / "checkpoints"
    damage(ckpts / "ckpt-0000000008-e.pt")
    _crashed_run(tmp_path, _CrashAtOnce())
    usable = "ckpt-0000000004-e.pt" if damage is not _newer_export else "ckpt-0000000008-e.pt"
    skipped = "ckpt-0000000008-e.pt" if damage is not _newer_export else "ckpt-9999999999-e.pt"
    (line,) = [
        x for x in (tmp_path / "run_training.log").read_text().splitlines() if "Stopped" in x
    ]
    assert line.endswith(f"to resume from {ckpts / usable} (the newer {skipped}: damaged).")


def test_the_resume_hint_says_when_no_checkpoint_is_usable(tmp_path):
    class EmptyThemAndCrash(fl.callbacks.Callback):
        def on_train_epoch_start(self, state):
            for path in (tmp_path / "checkpoints").glob("ckpt-*.pt"):
                _empty(path)
            raise KeyError("crash")

    run(tmp_path, max_epochs=1)
    with pytest.raises(KeyError):
        fl.fit(
            make_state(),
            classify,
            loader(),
            max_epochs=2,
            out_dir=tmp_path,
            callbacks=[OwnPlot(tmp_path), EmptyThemAndCrash()],
            log_to_console=False,
        )
    log = (tmp_path / "run_training.log").read_text()
    assert f"No usable checkpoint in {tmp_path / 'checkpoints'} (the files there are dam" in log


def test_the_folders_fsync_after_the_rename_is_best_effort(tmp_path, monkeypatch):
    """As the guide says (section 5): an error fsyncing the folder after the rename is
    ignored, the file being in place; an error fsyncing the file fails the write."""
    import stat

    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = save_checkpoint(tmp_path / "file.pt", make_state())
    assert load_checkpoint(path, like=make_state()).step == 0
