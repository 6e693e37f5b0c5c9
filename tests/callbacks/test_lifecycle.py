"""What callbacks hold is released when fit raises; outputs are not kept; hooks on instances."""

from __future__ import annotations

import gc
import json
import math
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnloop as fl
from fnloop.callbacks import JSONLinesLogger, Profiler, TensorBoard
from fnloop.epoch import MetricMeans
from fnloop.state import append_history


def state() -> fl.TrainState:
    torch.manual_seed(0)
    return fl.TrainState.create(nn.Linear(3, 2), tx=fl.optim.sgd(0.1), device="cpu")


def batches(n: int = 4) -> list:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(4, 3, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(n)
    ]


def classify(model, batch):
    x, y = batch
    return {"loss": F.cross_entropy(model(x), y)}


class Boom(Exception):
    pass


class RaiseAt(fl.callbacks.Callback):
    def on_train_batch_end(self, state, outputs, batch, idx):
        if state.step == 6:
            raise Boom


def test_writers_and_profilers_are_released_when_fit_raises(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    tb = TensorBoard(tmp_path / "tb", log_every_n_steps=1)
    prof = Profiler(tmp_path / "prof", num_batches=100)
    with pytest.raises(Boom):
        fl.fit(
            state(),
            classify,
            batches(),
            max_epochs=3,
            callbacks=[tb, prof, RaiseAt()],
            log_to_console=False,
        )
    assert tb.writer is None
    assert not torch.autograd.profiler._is_profiler_enabled
    assert (tmp_path / "prof" / "trace.json").exists()  # the batches profiled before
    # The same objects work in the next fit.
    fl.fit(state(), classify, batches(), max_epochs=1, callbacks=[tb, prof], log_to_console=False)
    assert tb.writer is None


def test_epoch_means_keep_only_the_scalars_of_each_step() -> None:
    means = MetricMeans()
    big = torch.ones(1000)
    ref = weakref.ref(big)
    means.add({"loss": torch.tensor(2.0), "features": big}, 4)
    del big
    gc.collect()
    assert ref() is None
    assert means.means() == {"loss": 2.0}


def test_a_hook_set_on_an_instance_is_called() -> None:
    seen = []
    cb = fl.callbacks.Callback()
    cb.on_train_epoch_end = lambda s, metrics: seen.append(s.epoch)
    fl.fit(state(), classify, batches(), max_epochs=2, callbacks=cb, log_to_console=False)
    assert seen == [1, 2]


def test_a_hook_set_on_an_instance_is_named_by_its_callback_in_errors() -> None:
    """Such a hook is a plain function: an error about what it returned named the
    callback "function" ("function.on_train_batch_end returned a dict")."""

    class Tracker(fl.callbacks.Callback):
        pass

    cb = Tracker()
    cb.on_train_batch_end = lambda s, outputs, batch, idx: {"loss": 1.0}
    callbacks = fl.callbacks.CallbackList([cb])
    with pytest.raises(TypeError, match=r"^Tracker\.on_train_batch_end returned a dict"):
        callbacks("on_train_batch_end", state(), {}, None, 0)
    start = state()
    cb.on_train_batch_end = lambda s, outputs, batch, idx: s.replace(
        history=append_history(s.history, "train", {"x": 1.0})
    )
    callbacks = fl.callbacks.CallbackList([cb])
    with pytest.raises(ValueError, match=r"^Tracker\.on_train_batch_end returned a state"):
        callbacks("on_train_batch_end", start, {}, None, 0)


def test_jsonl_writes_nonfinite_values_as_null(tmp_path: Path) -> None:
    def diverging(model, batch):
        return {"loss": classify(model, batch)["loss"] * torch.nan}

    log = JSONLinesLogger(tmp_path / "m.jsonl")
    fl.fit(state(), diverging, batches(), max_epochs=2, callbacks=[log], log_to_console=False)

    def strict(constant: str) -> None:  # NaN / Infinity are not JSON
        raise ValueError(constant)

    row = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0], parse_constant=strict)
    assert row["train/loss"] is None


def test_epoch_loops_take_callbacks_as_a_list() -> None:
    seen = []

    class Count(fl.callbacks.Callback):
        def on_train_batch_end(self, state, outputs, batch, idx):
            seen.append(idx)

    step = fl.make_train_step(classify)
    fl.train_epoch(state(), step, batches(3), callbacks=[Count()])
    fl.train_epoch(state(), step, batches(3), callbacks=Count())
    assert seen == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize(
    "error",
    [
        OSError("No space left on device"),
        ValueError("Image size of 90000x320 pixels is too large"),  # matplotlib's
    ],
    ids=["OSError", "ValueError"],
)
def test_a_failed_teardown_is_reported_and_the_others_still_run(error: Exception) -> None:
    """CallbackList.teardown swallowed a callback's error without a word (a plot that
    could not be drawn on the way out of a crashed fit left no trace); it now warns,
    naming the callback and the error, and tears the other callbacks down, whatever the
    kind of error (not only a file system's)."""
    released = []

    class FailingPlot(fl.callbacks.Callback):
        def teardown(self):
            raise error

    class Writer(fl.callbacks.Callback):
        def teardown(self):
            released.append(True)

    callbacks = fl.callbacks.CallbackList([FailingPlot(), Writer()])
    name = type(error).__name__
    with pytest.warns(RuntimeWarning, match=rf"FailingPlot failed .*{name}: {error}"):
        callbacks.teardown()
    assert released == [True]


def test_teardown_passes_over_a_callback_without_one() -> None:
    """A callback need not subclass Callback (an object with an event method is one), so
    it may have no teardown: the callbacks after it are still torn down."""
    released = []

    class PrintLoss:  # no teardown
        def on_train_epoch_end(self, state, metrics):
            pass

    class Writer(fl.callbacks.Callback):
        def teardown(self):
            released.append(True)

    fl.callbacks.CallbackList([PrintLoss(), Writer()]).teardown()
    assert released == [True]


def test_a_batch_event_may_return_a_state_whose_history_is_equal_but_rebuilt(
    tmp_path: Path,
) -> None:
    """Only the epoch-end events may change the history, and a history equal to the one
    the event got is no change, though another object: a callback that rolls back to a
    checkpoint mid-epoch returns the loaded state, and training goes on from it."""
    start = state()
    start = start.replace(history=append_history(start.history, "train", {"loss": 1.0}))
    path = tmp_path / "start.pt"
    fl.save_checkpoint(path, start)

    class RollBack(fl.callbacks.Callback):
        def on_train_batch_end(self, st, outputs, batch, idx):
            if idx == 1:
                return fl.load_checkpoint(path, like=st)
            return None

    end, _ = fl.train_epoch(start, fl.make_train_step(classify), batches(3), callbacks=[RollBack()])
    assert end.step == 1  # the rolled-back state, then one more step
    assert end.history == start.history


def test_callback_list_takes_a_generator_or_one_callback() -> None:
    """CallbackList checked a generator of callbacks, which used it up, and then kept an
    empty list: no event reached any callback, without a word. One callback (as fit and
    train_epoch take it) failed with "object is not iterable"."""
    seen = []

    class Count(fl.callbacks.Callback):
        def on_train_batch_end(self, state, outputs, batch, idx):
            seen.append(idx)

    step = fl.make_train_step(classify)
    fl.train_epoch(state(), step, batches(2), callbacks=[Count()])  # the reference
    want, seen[:] = list(seen), []
    for callbacks in [(cb for cb in [Count()]), Count()]:
        fl.train_epoch(state(), step, batches(2), callbacks=fl.callbacks.CallbackList(callbacks))
        assert seen == want
        seen.clear()
    with pytest.raises(TypeError, match="pass an instance: Profiler"):
        fl.callbacks.CallbackList(Profiler)


def test_a_batch_event_may_roll_back_to_a_history_holding_a_nan(tmp_path: Path) -> None:
    """A validation loss that went NaN does not end a run; a state loaded from a
    checkpoint holds other NaN objects, and ``nan != nan`` made its equal history look
    changed: the rollback above raised "returned a state with a changed history"."""
    start = state()
    start = start.replace(history=append_history(start.history, "valid", {"loss": math.nan}))
    path = tmp_path / "start.pt"
    fl.save_checkpoint(path, start)
    loaded = fl.load_checkpoint(path, like=start)
    assert loaded.history["valid"]["loss"][0] is not start.history["valid"]["loss"][0]
    callbacks = fl.callbacks.CallbackList(_Return(loaded))
    assert callbacks("on_train_batch_end", start, {}, None, 0) is loaded
    changed = loaded.replace(history=append_history(loaded.history, "valid", {"loss": 1.0}))
    with pytest.raises(ValueError, match="changed history"):
        fl.callbacks.CallbackList(_Return(changed))("on_train_batch_end", start, {}, None, 0)


class _Return(fl.callbacks.Callback):
    def __init__(self, result: fl.TrainState) -> None:
        self.result = result

    def on_train_batch_end(self, st, outputs, batch, idx):
        return self.result


class _EpochEndReturn(fl.callbacks.Callback):
    def __init__(self, result: fl.TrainState) -> None:
        self.result = result

    def on_train_epoch_end(self, st, metrics):
        return self.result


def test_histories_holding_values_that_are_not_numbers_compare_without_raising() -> None:
    """The NaN-aware comparison called math.isnan on each value that differed: a history
    with a value that is not a number (a callback's marker, None) raised TypeError from
    it, at an epoch end too, where a changed history is allowed and is not compared."""
    start = state()
    start = start.replace(history=append_history(start.history, "train", {"loss": 1.0}))
    marked = start.replace(history={"train": {"loss": ("n/a",)}})
    epoch_end = fl.callbacks.CallbackList(_EpochEndReturn(marked))
    assert epoch_end("on_train_epoch_end", start, {}) is marked
    with pytest.raises(ValueError, match="changed history"):
        fl.callbacks.CallbackList(_Return(marked))("on_train_batch_end", start, {}, None, 0)
