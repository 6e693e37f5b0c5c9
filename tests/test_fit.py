"""The fit driver end to end on small synthetic data."""

from __future__ import annotations

import copy
import json
import logging
import math
import pickle
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fnloop as fl
from fnloop import optim
from fnloop._tree import tree_leaves
from fnloop.fit import epoch_line


def data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return x, y


def loaders(batch_size=16, shuffle=True, valid=True):
    x, y = data()
    train = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)
    xv, yv = data(48, seed=1)
    out = {"train": train}
    if valid:
        out["valid"] = DataLoader(TensorDataset(xv, yv), batch_size=batch_size)
    return out


def classify(model, batch):
    x, y = batch
    logits = model(x)
    return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}


def make_state(tx=None, seed=0, **kw):
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))
    return fl.TrainState.create(module, tx=tx or optim.adam(1e-2), device="cpu", **kw)


def test_history_and_continuation_across_fit_calls():
    state = fl.fit(make_state(), classify, loaders(), max_epochs=2, log_to_console=False)
    assert state.epoch == 2 and state.step == 12
    assert {k: len(v) for k, v in state.history["train"].items()} == {"loss": 2, "acc": 2, "lr": 2}
    assert len(state.history["valid"]["acc"]) == 2
    state = fl.fit(state, classify, loaders(), max_epochs=5, log_to_console=False)
    assert state.epoch == 5 and state.step == 30
    assert len(state.history["train"]["loss"]) == 5
    # Re-running with the same max_epochs trains nothing more.
    again = fl.fit(state, classify, loaders(), max_epochs=5, log_to_console=False)
    assert again.step == 30


def test_epoch_metrics_are_batch_size_weighted_means():
    # 10 examples in batches of 4, 4, 2: the loss mean must weight by batch size.
    x, y = data(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    state = make_state(tx=optim.sgd(0.0))
    eval_step = fl.make_eval_step(classify)
    model_loss = float(eval_step(state, (x, y))["loss"])
    _, means = fl.validate_epoch(state, eval_step, loader)
    assert means["loss"] == pytest.approx(model_loss, rel=1e-6)


def test_predictions_of_a_batch_of_one_are_not_metrics():
    """Whether an entry is a metric does not depend on the batch size: a last batch of
    one example gives one-element predictions, which stay outputs."""
    x, y = data(9)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # 4, 4, 1

    def with_predictions(model, batch):
        out = classify(model, batch)
        return {**out, "pred": model(batch[0]).argmax(-1)}

    seen = []

    class Collect(fl.callbacks.Callback):
        def on_validation_batch_end(self, state, outputs, batch, batch_idx):
            seen.append(outputs["pred"].shape)

    eval_step = fl.make_eval_step(with_predictions)
    _, means = fl.validate_epoch(make_state(), eval_step, loader, callbacks=Collect())
    assert sorted(means) == ["acc", "loss"]
    assert seen == [(4,), (4,), (1,)]


def test_one_element_entries_of_any_shape_are_metrics():
    """A metric of shape (1,) (a mean over dim 0) and a loss of shape (1,) are averaged;
    the eval step reports the loss 0-d, as the train step does."""
    x, y = data(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)

    def shaped(model, batch):
        out = classify(model, batch)
        return {"loss": out["loss"].reshape(1), "acc": out["acc"].reshape(1, 1)}

    eval_step = fl.make_eval_step(shaped)
    assert eval_step(make_state(), (x, y))["loss"].shape == ()
    _, means = fl.validate_epoch(make_state(), eval_step, loader)
    _, want = fl.validate_epoch(make_state(), fl.make_eval_step(classify), loader)
    assert means == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(
    ("stopper", "expected_epochs"),
    [
        (fl.EarlyStopping("train/loss", mode="min", target=10.0), 1),
        (fl.EarlyStopping("valid/acc", mode="max", target=0.0), 1),
        (fl.EarlyStopping("valid/loss", mode="min", patience=2, min_delta=100.0), 3),
        (fl.EarlyStopping("train/acc", mode="max", patience=1, min_delta=100.0), 2),
    ],
)
def test_early_stopping_by_target_and_patience(stopper, expected_epochs):
    state = fl.fit(
        make_state(),
        classify,
        loaders(),
        max_epochs=10,
        early_stopping=stopper,
        log_to_console=False,
    )
    assert state.epoch == expected_epochs


def test_rules_that_stop_in_the_same_epoch_are_all_named(tmp_path):
    """Two rules asking to stop at one epoch end: the log line gives both reasons."""
    rules = [
        fl.EarlyStopping("valid/acc", mode="max", target=0.0),
        fl.EarlyStopping("train/loss", target=10.0),
    ]
    state = fl.fit(
        make_state(),
        classify,
        loaders(),
        max_epochs=3,
        early_stopping=rules,
        out_dir=tmp_path,
        log_to_console=False,
    )
    assert state.epoch == 1
    log = (tmp_path / "run_training.log").read_text()
    assert re.search(
        r"Early stopping: valid/acc reached the target 0\.0 \(.*\); "
        r"train/loss reached the target 10\.0 \(",
        log,
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"patience": 2.5}, ValueError, r"patience counts epochs: a whole number; got 2\.5"),
        ({"patience": float("inf")}, ValueError, r"patience must be finite"),
        ({"patience": None}, TypeError, r"patience takes a number; got None"),
        ({"min_delta": float("nan")}, ValueError, r"min_delta must be finite; got nan"),
        ({"min_delta": None}, TypeError, r"min_delta takes a number; got None"),
        ({"target": float("nan")}, ValueError, r"target must be finite; got nan"),
        ({"target": "high"}, TypeError, r"target takes a number; got 'high'"),
        # Were taken as 1 (patience=True: stop after one bad epoch) and 0.0.
        ({"patience": True}, TypeError, r"patience takes a number; got True\."),
        ({"min_delta": False}, TypeError, r"min_delta takes a number; got False\."),
        ({"target": True}, TypeError, r"target takes a number; got True\."),
        ({"patience": np.True_}, TypeError, r"patience takes a number; got True\."),
        ({"min_delta": torch.tensor(True)}, TypeError, r"min_delta takes a number; got True\."),
        ({"monitor": None}, TypeError, r"monitor takes a metric name"),
        ({"patience": -1}, ValueError, r"patience must be >= 0; got -1"),
        ({"min_delta": -0.1}, ValueError, r"min_delta must be >= 0; got -0\.1"),
        ({"mode": "avg"}, ValueError, r"mode must be 'min' or 'max'; got 'avg'"),
        ({"monitor": "loss"}, ValueError, r"'train/loss' or 'valid/loss'"),
    ],
)
def test_bad_early_stopping_arguments_are_clear_errors(kwargs, error, match):
    """A fractional patience was truncated, a NaN min_delta or target silently never
    improved or never hit, and None gave int()'s or an AttributeError's message."""
    with pytest.raises(error, match=match):
        fl.EarlyStopping(**kwargs)
    assert fl.EarlyStopping(patience=3.0, min_delta="0.1").patience == 3  # whole numbers pass


def test_early_stopping_numbers_given_as_text_or_numpy_become_plain_numbers():
    """A rule read from a config file (text) or a sweep (NumPy) holds plain Python numbers,
    which the checkpoint records; "4.0" is a whole number of epochs like 4.0."""
    np = pytest.importorskip("numpy")
    rule = fl.EarlyStopping(patience="4.0", min_delta="1e-2", target=np.float32(0.5))
    assert (rule.patience, rule.min_delta, rule.target) == (4, 0.01, 0.5)
    assert (type(rule.patience), type(rule.min_delta), type(rule.target)) == (int, float, float)
    assert type(fl.EarlyStopping(target="0.25").target) is float


def test_early_stopping_defaults_are_the_contracts():
    """DESIGN section 2 and the seed's EarlyStopper: ``min_delta=1e-3`` by default (it was
    0.0, so an epoch better by 1e-6 reset the patience)."""
    assert fl.EarlyStopping() == fl.EarlyStopping(
        monitor="valid/loss", mode="min", patience=10, min_delta=1e-3, target=None
    )
    rule = fl.EarlyStopping("valid/loss", patience=2)
    st = rule.init()
    for epoch, loss in enumerate([0.5, 0.4995, 0.499], start=1):  # better, but by < 1e-3
        st = rule.update(st, {"valid/loss": loss}, epoch)
    assert st.stop_reason.startswith("valid/loss did not improve by more than min_delta=0.001")
    assert (st.best, st.best_epoch, st.bad_epochs) == (0.5, 1, 2)


def test_an_int_patience_is_kept_exactly_however_large():
    """patience=sys.maxsize ("no patience: the target alone") stays that int: a round
    trip through float made it 2**63, and a larger int raised OverflowError."""
    assert fl.EarlyStopping(patience=sys.maxsize).patience == sys.maxsize
    assert fl.EarlyStopping(patience=10**30).patience == 10**30
    assert fl.EarlyStopping(patience=torch.tensor(4)).patience == 4


def test_early_stopping_with_min_delta_does_not_call_its_reference_the_best(tmp_path):
    """With min_delta the rule measures improvements against an earlier value, while the
    best model is the best epoch: the stop reason must not name another 'best'."""
    rule = fl.EarlyStopping("valid/loss", patience=2, min_delta=0.1)
    s = rule.init()
    for epoch, loss in enumerate([1.0, 0.95, 0.93], start=1):
        s = rule.update(s, {"valid/loss": loss}, epoch)
    assert s.stop_reason == (
        "valid/loss did not improve by more than min_delta=0.1 on 1 (epoch 1) for 2 epochs"
    )

    fl.fit(
        make_state(tx=optim.sgd(0.05)),
        classify,
        loaders(),
        max_epochs=10,
        early_stopping=fl.EarlyStopping("valid/loss", patience=2, min_delta=100.0),
        out_dir=tmp_path,
        log_to_console=False,
    )
    log = (tmp_path / "run_training.log").read_text()
    stop = re.search(r"Early stopping: (.*)", log).group(1)
    assert re.fullmatch(
        r"valid/loss did not improve by more than min_delta=100 on \S+ "
        r"\(epoch 1\) for 2 epochs",
        stop,
    )
    assert re.search(r"Best model \(valid/loss \S+ at epoch 3\)", log)


def test_unknown_monitor_is_an_error_naming_known_keys():
    with pytest.raises(KeyError, match=r"valid/f1.*valid/acc"):
        fl.fit(
            make_state(),
            classify,
            loaders(),
            max_epochs=2,
            early_stopping=fl.EarlyStopping("valid/f1"),
            log_to_console=False,
        )


def test_the_log_line_of_an_unknown_monitor_is_not_quoted(tmp_path):
    """The message of fnloop's KeyError reads in the log as other errors' do, not as the
    repr of a dict key ("...function.". with the quotes)."""
    with pytest.raises(KeyError):
        fl.fit(
            make_state(),
            classify,
            loaders(),
            max_epochs=1,
            early_stopping=[fl.EarlyStopping("valid/f1")],
            monitor="valid/loss",
            out_dir=tmp_path,
            log_to_console=False,
        )
    log = (tmp_path / "run_training.log").read_text()
    line = re.search(r"ERROR - (Stopped by KeyError.*)", log).group(1)
    assert line.startswith("Stopped by KeyError in epoch 1: EarlyStopping monitors 'valid/f1'")
    assert "from your step function. No checkpoint was written yet" in line
    assert '"' not in line


def test_plateau_matches_torch_reduce_lr_on_plateau():
    """The LR drops in exactly the epochs where torch's ReduceLROnPlateau drops it."""
    kw = dict(mode="min", factor=0.5, patience=1, threshold=0.2, cooldown=1)
    state = make_state(tx=optim.sgd(optim.reduce_on_plateau(0.05, **kw)))
    state = fl.fit(state, classify, loaders(), max_epochs=12, log_to_console=False)
    valid_losses = state.history["valid"]["loss"]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw)
    expected = []
    for loss in valid_losses:
        sched.step(loss)
        expected.append(opt.param_groups[0]["lr"])
    # history["train"]["lr"][e] is the LR used during epoch e: torch's LR before step e.
    assert list(state.history["train"]["lr"]) == [0.05, *expected[:-1]]
    assert float(optim.learning_rates(state.opt_state)[0]) == expected[-1]
    assert expected[-1] < 0.05  # the sequence did exercise a reduction


class Recorder(fl.callbacks.Callback):
    def __init__(self):
        self.events = []

    def on_fit_start(self, state):
        self.events.append("fit_start")

    def on_fit_end(self, state):
        self.events.append("fit_end")

    def on_train_epoch_start(self, state):
        self.events.append("train_epoch_start")

    def on_train_epoch_end(self, state, metrics):
        self.events.append("train_epoch_end")

    def on_train_batch_start(self, state, batch, batch_idx):
        self.events.append(f"train_batch_start{batch_idx}")

    def on_train_batch_end(self, state, outputs, batch, batch_idx):
        self.events.append(f"train_batch_end{batch_idx}")

    def on_validation_epoch_start(self, state):
        self.events.append("valid_epoch_start")

    def on_validation_epoch_end(self, state, metrics):
        self.events.append("valid_epoch_end")

    def on_validation_batch_start(self, state, batch, batch_idx):
        self.events.append(f"valid_batch_start{batch_idx}")

    def on_validation_batch_end(self, state, outputs, batch, batch_idx):
        self.events.append(f"valid_batch_end{batch_idx}")


def test_callback_events_fire_in_the_seeds_order():
    rec = Recorder()
    x, y = data(32)
    ld = {
        "train": DataLoader(TensorDataset(x, y), batch_size=16),
        "valid": DataLoader(TensorDataset(x[:16], y[:16]), batch_size=16),
    }
    fl.fit(make_state(), classify, ld, max_epochs=2, callbacks=[rec], log_to_console=False)
    epoch = [
        "train_epoch_start",
        "train_batch_start0",
        "train_batch_end0",
        "train_batch_start1",
        "train_batch_end1",
        "train_epoch_end",
        "valid_epoch_start",
        "valid_batch_start0",
        "valid_batch_end0",
        "valid_epoch_end",
    ]
    assert rec.events == ["fit_start", *epoch, *epoch, "fit_end"]


def test_callback_can_replace_the_state_and_bad_return_is_an_error():
    class Warmup(fl.callbacks.Callback):
        """The seed's LR warm-up hook: here it edits the LR kept in the optimizer state."""

        def on_train_batch_end(self, state, outputs, batch, batch_idx):
            *rest, lr_state = state.opt_state
            new_lr = torch.clamp(lr_state.lr * 0 + 0.01 * state.step / 4, max=0.01)
            return state.replace(opt_state=(*rest, lr_state._replace(lr=new_lr)))

    state = fl.fit(
        make_state(optim.sgd(1.0)),
        classify,
        loaders(),
        max_epochs=1,
        callbacks=[Warmup()],
        log_to_console=False,
    )
    assert float(optim.learning_rates(state.opt_state)[0]) == pytest.approx(0.01)

    class Bad(fl.callbacks.Callback):
        def on_fit_start(self, state):
            return {"not": "a state"}

    with pytest.raises(TypeError, match=r"Bad.on_fit_start returned a dict"):
        fl.fit(
            make_state(), classify, loaders(), max_epochs=1, callbacks=[Bad()], log_to_console=False
        )


class _EpochR2(fl.callbacks.Callback):
    """An epoch-level metric: a score over the whole validation epoch, added to the history."""

    def __init__(self):
        self.scores = []

    def on_validation_epoch_start(self, state):
        self.hits, self.n = 0, 0

    def on_validation_batch_end(self, state, outputs, batch, batch_idx):
        self.hits += float(outputs["acc"]) * len(batch[1])
        self.n += len(batch[1])

    def on_validation_epoch_end(self, state, metrics):
        score = self.hits / self.n - 0.1 * len(self.scores)  # falls after epoch 1
        self.scores.append(score)
        return state.replace(
            history=fl.state.append_history(state.history, "valid", {"score": score})
        )


def test_an_epoch_metric_a_callback_appends_is_logged_shown_and_monitored(tmp_path):
    r2 = _EpochR2()
    state = fl.fit(
        make_state(),
        classify,
        loaders(),
        max_epochs=5,
        callbacks=[r2],
        early_stopping=fl.EarlyStopping("valid/score", mode="max", patience=1),
        out_dir=tmp_path,
        log_to_console=False,
    )
    assert state.epoch == 2  # the score fell at epoch 2: patience 1 stops there
    assert state.history["valid"]["score"] == pytest.approx(tuple(r2.scores))
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    got = [float(row.split(",")[header.index("valid/score")]) for row in rows[1:]]
    assert got == pytest.approx(r2.scores)
    log = (tmp_path / "run_training.log").read_text()
    assert re.search(r"\[  1/5\] .*\(val\) .*score:", log)  # the epoch line
    assert "Best model (valid/score" in log


def test_epoch_metrics_given_to_callbacks_are_read_only():
    seen = []

    class Reads(fl.callbacks.Callback):
        def on_validation_epoch_end(self, state, metrics):
            seen.append((json.loads(json.dumps(metrics)), metrics.copy() | {"x": 1.0}))

    class Sets(fl.callbacks.Callback):
        def on_validation_epoch_end(self, state, metrics):
            metrics["valid/r2"] = 0.5

    fl.fit(
        make_state(), classify, loaders(), max_epochs=1, callbacks=[Reads()], log_to_console=False
    )
    assert set(seen[0][0]) == {"valid/loss", "valid/acc"} and seen[0][1]["x"] == 1.0
    with pytest.raises(TypeError, match=r"read-only.*append_history"):
        fl.fit(
            make_state(),
            classify,
            loaders(),
            max_epochs=1,
            callbacks=[Sets()],
            log_to_console=False,
        )


def test_copies_and_pickles_of_the_epoch_metrics_are_plain_dicts():
    """A callback may keep the metrics (copy.deepcopy, or pickle them to a queue): the
    copies are plain dicts of the same values, which it may change."""
    kept = []

    class Keeps(fl.callbacks.Callback):
        def on_validation_epoch_end(self, state, metrics):
            copies = [copy.copy(metrics), copy.deepcopy(metrics)]
            copies.append(pickle.loads(pickle.dumps(metrics)))
            kept.append((dict(metrics), copies))

    fl.fit(
        make_state(), classify, loaders(), max_epochs=1, callbacks=[Keeps()], log_to_console=False
    )
    ((seen, copies),) = kept
    assert set(seen) == {"valid/loss", "valid/acc"}
    for c in copies:
        assert type(c) is dict and c == seen
        c["valid/r2"] = 0.5  # a plain dict takes new entries


def test_an_epoch_metric_under_a_step_metrics_name_is_an_error():
    class Clashes(fl.callbacks.Callback):
        def on_validation_epoch_end(self, state, metrics):
            history = fl.state.append_history(state.history, "valid", {"loss": 1.0})
            return state.replace(history=history)

    with pytest.raises(ValueError, match=r"'valid/loss'.*a name of its own"):
        fl.fit(
            make_state(),
            classify,
            loaders(),
            max_epochs=1,
            callbacks=[Clashes()],
            log_to_console=False,
        )


@pytest.mark.parametrize("event", ["on_train_epoch_end", "on_validation_epoch_end"])
def test_an_epoch_metric_appended_at_an_epoch_end_is_monitored_and_appended_once(event):
    """An epoch-level metric appended at either epoch end is the epoch's (fit monitors
    it), and has one value per epoch: two callbacks appending the same new name (or one
    appending twice) at one epoch end gave it two values for the epoch in silence, and
    its history no longer lined up with the epochs."""
    split = "train" if event == "on_train_epoch_end" else "valid"

    def append(self, state, metrics):
        return state.replace(history=fl.state.append_history(state.history, split, {"f1": 0.5}))

    appends = type("Appends", (fl.callbacks.Callback,), {event: append})
    state = fl.fit(
        make_state(),
        classify,
        loaders(),
        max_epochs=1,
        callbacks=[appends()],
        monitor=f"{split}/f1",  # appended once: a metric of the epoch, to monitor
        mode="max",
        log_to_console=False,
    )
    assert state.history[split]["f1"] == (0.5,)
    with pytest.raises(ValueError, match=rf"2 value\(s\) for '{split}/f1'.*append it once"):
        fl.fit(
            make_state(),
            classify,
            loaders(),
            max_epochs=1,
            callbacks=[appends(), appends()],
            log_to_console=False,
        )


@pytest.mark.parametrize(
    "event",
    ["on_train_batch_end", "on_validation_batch_end", "on_train_epoch_start", "on_fit_start"],
)
def test_history_appended_outside_an_epoch_end_event_is_an_error(event):
    """The history holds one value per epoch: a callback appending at a batch event gave
    ``train/x`` one value per batch, silently (metrics.csv and the plot then disagreed)."""

    def append(self, state, *args):
        return state.replace(history=fl.state.append_history(state.history, "train", {"x": 1.0}))

    keeps = type("Keeps", (fl.callbacks.Callback,), {event: lambda self, state, *a: state})
    appends = type("Appends", (fl.callbacks.Callback,), {event: append})
    state = fl.fit(
        make_state(), classify, loaders(), max_epochs=1, callbacks=[keeps()], log_to_console=False
    )
    assert "x" not in state.history["train"]
    with pytest.raises(
        ValueError, match=rf"Appends.{event} returned a state with a changed history"
    ):
        fl.fit(
            make_state(),
            classify,
            loaders(),
            max_epochs=1,
            callbacks=[appends()],
            log_to_console=False,
        )


def test_bad_setup_is_reported_before_training():
    calls = []

    def counting(model, batch):
        calls.append(1)
        return classify(model, batch)

    x, y = data(8)
    empty = DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4)
    with pytest.raises(ValueError, match="train loader is empty"):
        fl.fit(make_state(), counting, empty, max_epochs=1)
    state = make_state().replace(epoch=3)
    with pytest.raises(ValueError, match=r"max_epochs=2 is below state\.epoch=3"):
        fl.fit(state, counting, loaders(), max_epochs=2)
    with pytest.raises(ValueError, match="no validation loader"):
        fl.fit(
            make_state(),
            counting,
            loaders(valid=False),
            max_epochs=1,
            early_stopping=fl.EarlyStopping("valid/loss"),
        )
    with pytest.raises(ValueError, match="'train' and optional 'valid'"):
        fl.fit(make_state(), counting, {"training": loaders()["train"]}, max_epochs=1)
    with pytest.raises(ValueError, match=r"list of 2 DataLoaders.*'train': train_loader"):
        fl.fit(make_state(), counting, list(loaders().values()), max_epochs=1)
    stacked = fl.stack_states([make_state(seed=0), make_state(seed=1)])
    with pytest.raises(ValueError, match=r"holds 2 stacked models.*unstack_states"):
        fl.fit(stacked, counting, loaders(), max_epochs=1)
    assert calls == []


def test_a_list_of_batches_is_a_train_loader():
    x, y = data(32)
    state = fl.fit(make_state(), classify, [(x[:16], y[:16]), (x[16:], y[16:])], max_epochs=1)
    assert state.step == 2


def test_fit_leaves_the_handlers_others_attached_to_its_logger(tmp_path):
    """fit removed and closed every handler of fnloop.run.<run_name> when it ended (and
    left propagate off): a handler the user attached got the first fit's lines only."""

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    logger = logging.getLogger("fnloop.run.kept")
    mine = Keep()
    logger.addHandler(mine)
    try:
        state = fl.fit(
            make_state(), classify, loaders(), max_epochs=1, run_name="kept", log_to_console=False
        )
        assert logger.handlers == [mine] and logger.propagate
        fl.fit(state, classify, loaders(), max_epochs=2, run_name="kept", log_to_console=False)
        assert [line[:7] for line in mine.lines if line.startswith("[")] == ["[  1/1]", "[  2/2]"]
    finally:
        logger.removeHandler(mine)


@pytest.mark.parametrize("level", [logging.NOTSET, logging.DEBUG, logging.WARNING])
def test_fit_restores_the_level_of_its_logger(tmp_path, level):
    """fit logs at INFO, and left the run's logger at INFO when it ended. A DEBUG level
    the user set stays during the run: a callback's debug lines reach the log file."""

    class Debug(fl.callbacks.Callback):
        def on_train_epoch_end(self, state, metrics):
            logging.getLogger("fnloop.run.levels").debug(f"debug line {state.epoch}")

    logger = logging.getLogger("fnloop.run.levels")
    logger.setLevel(level)
    try:
        fl.fit(
            make_state(),
            classify,
            loaders(),
            max_epochs=1,
            run_name="levels",
            callbacks=[Debug()],
            out_dir=tmp_path,
            log_to_console=False,
        )
        assert logger.level == level
        log = (tmp_path / "levels_training.log").read_text()
        assert "[  1/1]" in log
        assert ("debug line 1" in log) == (level == logging.DEBUG)
    finally:
        logger.setLevel(logging.NOTSET)


@pytest.mark.parametrize("parent", ["fnloop.run", "fnloop"])
def test_fit_keeps_a_debug_level_set_on_a_parent_of_its_logger(tmp_path, parent):
    """A DEBUG level the user set on a parent logger reaches fit's logger, as one set on
    the run's logger itself does: a callback's debug lines reach the log file."""

    class Debug(fl.callbacks.Callback):
        def on_train_epoch_end(self, state, metrics):
            logging.getLogger("fnloop.run.parent").debug("debug line")

    logger = logging.getLogger(parent)
    assert logging.getLogger("fnloop.run.parent").level == logging.NOTSET
    logger.setLevel(logging.DEBUG)
    try:
        fl.fit(
            make_state(),
            classify,
            loaders(valid=False),
            max_epochs=1,
            run_name="parent",
            callbacks=[Debug()],
            out_dir=tmp_path,
            log_to_console=False,
        )
        assert "debug line" in (tmp_path / "parent_training.log").read_text()
    finally:
        logger.setLevel(logging.NOTSET)


def test_run_folder_log_file_csv_and_best_model(tmp_path):
    state = fl.fit(
        make_state(ema_decay=0.9),
        classify,
        loaders(),
        max_epochs=3,
        out_dir=tmp_path,
        run_name="demo",
        log_to_console=False,
    )
    log = (tmp_path / "demo_training.log").read_text()
    lines = log.splitlines()
    assert re.match(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ - INFO - \[  1/3\] loss:\S+ acc:\S+ "
        r"\| \(val\) loss:\S+ acc:\S+ \(\d",
        lines[0],
    )
    assert any("Best model (valid/loss" in line for line in lines)
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,step")
    assert len(csv_lines) == 4
    best = torch.load(tmp_path / "best_model.pt", weights_only=True)
    fresh = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))
    fresh.load_state_dict(best)
    best_epoch = min(range(3), key=lambda e: state.history["valid"]["loss"][e])
    assert f"at epoch {best_epoch + 1}" in log
    # keep_checkpoints=2 by default: the newest and one to fall back on if it is damaged
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.pt"))
    assert kept == ["ckpt-0000000012-e.pt", "ckpt-0000000018-e.pt"]


def test_without_matplotlib_the_run_folder_has_its_metrics_csv_and_no_plot(tmp_path, monkeypatch):
    """matplotlib is an optional extra: without it fit writes no history.png (and does not
    fail at the first epoch end importing it), the rest of the run folder as always."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    with pytest.raises(ImportError):
        import matplotlib  # noqa: F401
    fl.fit(make_state(), classify, loaders(), max_epochs=2, out_dir=tmp_path, log_to_console=False)
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"metrics.csv", "best_model.pt", "run_training.log", "checkpoints"}
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 2


def test_an_out_dir_under_home_is_the_home_folders(tmp_path, monkeypatch):
    """out_dir="~/runs/x" made a folder named "~" in the working directory, where a
    second fit from elsewhere did not find (nor resume) the run; "~" is now home, as
    Path.expanduser has it."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    fl.fit(
        make_state(), classify, loaders(), max_epochs=1, out_dir="~/runs/x", log_to_console=False
    )
    assert list(work.iterdir()) == []
    run_dir = home / "runs" / "x"
    assert (run_dir / "checkpoints" / "ckpt-0000000006-e.pt").is_file()
    assert (run_dir / "metrics.csv").is_file() and (run_dir / "best_model.pt").is_file()
    monkeypatch.chdir(tmp_path)  # the same run, from another working directory
    state = fl.fit(
        make_state(), classify, loaders(), max_epochs=2, out_dir="~/runs/x", log_to_console=False
    )
    assert state.epoch == 2 and "Resumed from" in (run_dir / "run_training.log").read_text()


def test_an_empty_out_dir_is_an_error_not_the_working_directory(tmp_path, monkeypatch):
    """out_dir="" (the default of an unset --out-dir option) wrote the run folder into
    the working directory, and moved a metrics.csv, best_model.pt or history.png found
    there into checkpoints/previous-<time>/ as an earlier run's."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics.csv").write_text("not fit's\n")
    with pytest.raises(ValueError, match=r"out_dir is an empty string.* None .* '\.'"):
        fl.fit(make_state(), classify, loaders(), max_epochs=1, out_dir="", log_to_console=False)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


@pytest.mark.parametrize("relative", [False, True])
def test_a_users_logger_of_the_run_folders_metrics_csv_is_not_doubled(
    tmp_path, monkeypatch, relative
):
    """A CSVLogger of the user's writing <out_dir>/metrics.csv, where fit adds its own:
    the two wrote the same file, and it lost the first epoch's row of one and held every
    later epoch twice. fit adds no logger of a file a callback already writes."""
    monkeypatch.chdir(tmp_path)
    path = "metrics.csv" if relative else tmp_path / "metrics.csv"
    mine = fl.callbacks.CSVLogger(path)
    fl.fit(
        make_state(),
        classify,
        loaders(),
        max_epochs=3,
        out_dir=tmp_path,
        callbacks=[mine],
        log_to_console=False,
    )
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["epoch", "1", "2", "3"]


def test_a_validation_step_without_a_validation_loader_is_warned_about(tmp_path):
    """fit(..., train_loader, validation_step=...) trained without ever validating and
    said nothing: the best model and the monitor fell back to the train loss."""
    state = fl.fit(
        make_state(),
        classify,
        loaders()["train"],
        max_epochs=1,
        validation_step=classify,
        out_dir=tmp_path,
        log_to_console=False,
    )
    assert "valid" not in state.history
    log = (tmp_path / "run_training.log").read_text()
    assert "validation_step was given but no validation loader" in log
    assert "{'train': train_loader, 'valid': valid_loader}" in log
    fl.fit(
        make_state(),
        classify,
        loaders(),
        max_epochs=1,
        out_dir=tmp_path / "v",
        validation_step=classify,
        log_to_console=False,
    )
    assert "no validation loader" not in (tmp_path / "v" / "run_training.log").read_text()


def test_progress_auto_shows_bars_only_when_stderr_is_a_terminal(capsys, monkeypatch):
    """progress="auto", the default, keeps the bars out of a log that stderr is
    redirected to (a batch job's output file), and shows them on a terminal."""
    fl.fit(make_state(), classify, loaders(), max_epochs=1, log_to_console=False)
    assert "epoch 1/1" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    fl.fit(make_state(), classify, loaders(), max_epochs=1, log_to_console=False)
    assert "epoch 1/1" in capsys.readouterr().err


def test_console_gets_messages_only(capsys):
    fl.fit(make_state(), classify, loaders(), max_epochs=1, progress=False)
    out = capsys.readouterr().out
    assert out.startswith("[  1/1] loss:")
    assert " - INFO - " not in out
    assert not logging.getLogger("fnloop.run.run").handlers


def test_lr_changes_are_logged(tmp_path):
    tx = optim.sgd(optim.step_schedule(0.1, step_size=6, gamma=0.5))
    fl.fit(
        make_state(tx), classify, loaders(), max_epochs=2, out_dir=tmp_path, log_to_console=False
    )
    log = (tmp_path / "run_training.log").read_text()
    assert "Learning rate updated: 0.100000 → 0.050000" in log


def test_a_learning_rate_set_in_on_fit_start_is_logged_before_the_first_epoch(tmp_path):
    """A callback's on_fit_start is where a run takes another rate (with_learning_rates):
    the change is logged as the schedule's are, once, before epoch 1's line."""

    class Lower(fl.callbacks.Callback):
        def on_fit_start(self, state):
            return state.replace(opt_state=optim.with_learning_rates(state.opt_state, 1e-3))

    fl.fit(
        make_state(optim.adam(1e-2)),
        classify,
        loaders(),
        max_epochs=2,
        callbacks=[Lower()],
        out_dir=tmp_path,
        log_to_console=False,
    )
    log = (tmp_path / "run_training.log").read_text()
    assert log.count("Learning rate updated: 0.010000 → 0.001000") == 1
    assert log.index("Learning rate updated") < log.index("[  1/2]")


def test_skipped_updates_are_counted_per_epoch_in_the_log(tmp_path):
    """Each epoch's line says how many updates that epoch skipped, not how many the run
    has skipped so far: two NaN batches per epoch are 2 in every epoch."""
    x, y = data(48)
    x[4] = x[36] = float("nan")  # batches 1 and 9 of 12 give a NaN loss
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    step = fl.make_train_step(classify, on_nonfinite="skip")
    state = fl.fit(make_state(), step, loader, max_epochs=2, out_dir=tmp_path, log_to_console=False)
    assert int(state.skipped_steps) == 4
    log = (tmp_path / "run_training.log").read_text()
    skipped = [line.split(" - ", 2)[-1] for line in log.splitlines() if "Skipped" in line]
    assert skipped == ["Skipped 2 updates with non-finite loss or gradients"] * 2


def test_validation_step_can_differ_and_steps_can_be_premade():
    def val(model, batch):
        return {"loss": classify(model, batch)["loss"], "zero": 0.0}

    step = fl.make_train_step(classify, accumulation_steps=2)
    state = fl.fit(
        make_state(), step, loaders(), max_epochs=1, validation_step=val, log_to_console=False
    )
    assert state.step == 3  # 6 batches, one update per 2
    assert state.history["valid"]["zero"] == (0.0,)


def test_validation_runs_under_the_train_steps_precision():
    """The seed validated under autocast too (I3): fit's eval step, made from the
    training function or from a validation function, takes the made train step's
    precision (no test checked it)."""
    seen = []

    def probe(model, batch):
        if not torch.is_grad_enabled():  # validation
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return classify(model, batch)

    step = fl.make_train_step(probe, precision="bf16")
    for validation_step in (None, probe):
        seen.clear()
        fl.fit(
            make_state(),
            step,
            loaders(),
            max_epochs=1,
            validation_step=validation_step,
            log_to_console=False,
        )
        assert seen == [(True, torch.bfloat16)] * 3  # 48 examples in batches of 16


def test_fit_records_the_epoch_mean_of_the_gradient_norm():
    norms = []

    class Norms(fl.callbacks.Callback):
        def on_train_batch_end(self, state, outputs, batch, batch_idx):
            assert ("grad_norm" in outputs) == (state.micro_step == 0)
            if "grad_norm" in outputs:
                norms.append(float(outputs["grad_norm"]))

    step = fl.make_train_step(classify, accumulation_steps=2, grad_norm=True)
    state = fl.fit(
        make_state(), step, loaders(), max_epochs=1, callbacks=[Norms()], log_to_console=False
    )
    assert len(norms) == 3  # 6 batches of 16, an update every 2
    assert state.history["train"]["grad_norm"] == pytest.approx((sum(norms) / 3,), rel=1e-6)


def test_divergence_stops_training_without_overwriting_checkpoints(tmp_path):
    def exploding(model, batch):
        out = classify(model, batch)
        return {**out, "loss": out["loss"] * torch.inf}

    state = fl.fit(
        make_state(), classify, loaders(), max_epochs=1, out_dir=tmp_path, log_to_console=False
    )
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    state = fl.fit(
        state, exploding, loaders(), max_epochs=3, out_dir=tmp_path, log_to_console=False
    )
    assert state.epoch == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    assert "training diverged" in (tmp_path / "run_training.log").read_text()


@pytest.mark.slow
def test_fit_accepts_a_compiled_step_ci_subset():
    # Dynamo remembers input shapes per code object, and every torch.compile(step) wraps
    # one shared function: a step compiled by an earlier test with other batch sizes
    # would make this one trace dynamic shapes (which dropout under torch.func.grad
    # cannot run on torch 2.13).
    torch._dynamo.reset()
    step = fl.make_train_step(classify, on_nonfinite="skip")
    eager = fl.fit(make_state(), step, loaders(shuffle=False), max_epochs=2, log_to_console=False)
    compiled = fl.fit(
        make_state(),
        torch.compile(step),
        loaders(shuffle=False),
        max_epochs=2,
        log_to_console=False,
    )
    donating = fl.fit(
        make_state(),
        torch.compile(fl.make_train_step(classify, donate=True)),  # writes back in place
        loaders(shuffle=False),
        max_epochs=2,
        log_to_console=False,
    )
    assert compiled.step == eager.step == donating.step == 12
    for name in eager.params:
        torch.testing.assert_close(compiled.params[name], eager.params[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(donating.params[name], eager.params[name], rtol=1e-4, atol=1e-5)


def test_a_compiled_step_is_not_recompiled_by_later_epochs():
    """The step passes the history through unread, so dynamo does not guard on it: the
    epochs that fill it (and an eval step compiled with another batch size in between)
    leave the train step's graphs in use."""
    from torch._dynamo.testing import CompileCounter

    # How many graphs the first epochs take depends on dynamo: torch 2.13 compiles two
    # (step 0, then later steps with the int step dynamic), torch 2.14 one. torch 2.11
    # also specializes the int epoch the step passes through: one more graph at epoch 1,
    # compiled after the eval step. It still sees the train batch size only (each made
    # step compiles on its own): with the eval step's, it would trace dynamic shapes, and
    # dropout under torch.func cannot. After the second epoch, no version compiles again.
    old_dynamo = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 12)
    torch._dynamo.reset()
    train_counter, eval_counter = CompileCounter(), CompileCounter()
    step = torch.compile(fl.make_train_step(classify, donate=True), backend=train_counter)
    evaluate = torch.compile(fl.make_eval_step(classify), backend=eval_counter)
    x, y = data()
    xv, yv = data(48, seed=1)
    loaders = {
        "train": DataLoader(TensorDataset(x, y), batch_size=16),
        "valid": DataLoader(TensorDataset(xv, yv), batch_size=48),
    }
    state = make_state()
    graphs = []
    for max_epochs in (1, 2, 4):
        state = fl.fit(
            state,
            step,
            loaders,
            validation_step=evaluate,
            max_epochs=max_epochs,
            log_to_console=False,
        )
        graphs.append(train_counter.frame_count)
    assert state.epoch == 4 and len(state.history["valid"]["loss"]) == 4
    assert 1 <= graphs[0] <= 2 and graphs[1] - graphs[0] == (1 if old_dynamo else 0)
    assert graphs[2] == graphs[1]
    assert eval_counter.frame_count == 1


def test_best_model_is_written_before_on_fit_end(tmp_path):
    """A callback's on_fit_end sees this run's best_model.pt (to upload it), and one that
    raises there (a plot, a W&B upload) does not cost the run its best model."""
    seen = []

    class UploadThenFail(fl.callbacks.Callback):
        def on_fit_end(self, state):
            seen.append((tmp_path / "best_model.pt").exists())
            raise OSError("upload failed")

    with pytest.raises(OSError, match="upload failed"):
        fl.fit(
            make_state(),
            classify,
            loaders(),
            max_epochs=2,
            out_dir=tmp_path,
            callbacks=[UploadThenFail()],
            log_to_console=False,
        )
    assert seen == [True]
    best = torch.load(tmp_path / "best_model.pt", weights_only=True)
    assert set(best) == {"0.weight", "0.bias", "3.weight", "3.bias"}


@pytest.mark.parametrize("change", ["extra-entry", "float64", "truncated"])
def test_a_rerun_rewrites_a_best_model_that_is_not_exactly_the_runs(tmp_path, change):
    """A re-run of a finished job leaves best_model.pt as it was only if it holds exactly
    the best weights: a file with the same values in another dtype, or with an entry
    more (which module.load_state_dict refuses), or one torch.load cannot read (cut
    short by a full disk), is written afresh."""

    def rerun():
        fl.fit(
            make_state(), classify, loaders(), max_epochs=1, out_dir=tmp_path, log_to_console=False
        )

    rerun()
    want = torch.load(tmp_path / "best_model.pt", weights_only=True)  # float32 weights
    if change == "truncated":
        raw = (tmp_path / "best_model.pt").read_bytes()
        (tmp_path / "best_model.pt").write_bytes(raw[: len(raw) // 2])
    elif change == "extra-entry":
        torch.save({**want, "extra": torch.zeros(1)}, tmp_path / "best_model.pt")
    else:  # the same values
        torch.save({k: v.double() for k, v in want.items()}, tmp_path / "best_model.pt")
    rerun()
    got = torch.load(tmp_path / "best_model.pt", weights_only=True)
    assert got.keys() == want.keys()
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in want.items())


def test_best_model_follows_a_single_early_stopping_rule(tmp_path):
    stopper = fl.EarlyStopping("valid/acc", mode="max", patience=100)
    state = fl.fit(
        make_state(),
        classify,
        loaders(),
        max_epochs=4,
        early_stopping=stopper,
        out_dir=tmp_path,
        log_to_console=False,
    )
    accs = state.history["valid"]["acc"]
    best_epoch = max(range(4), key=lambda e: (accs[e], -e)) + 1
    assert (
        f"Best model (valid/acc {accs[best_epoch - 1]:.4g} at epoch {best_epoch})"
        in (tmp_path / "run_training.log").read_text()
    )


@pytest.mark.parametrize("use_ema", [True, False], ids=["ema", "eval-without-ema"])
def test_best_model_holds_the_best_epochs_ema_weights(tmp_path, use_ema):
    """REQUIREMENTS S8, I6: ``best_model.pt`` holds the weights of the best monitored
    epoch (here the second of three), with the buffers: the EMA weights when kept, the raw
    ones when fit validates with ``make_eval_step(fn, use_ema=False)`` (the weights it
    scored; it exported the EMA, h88)."""
    kept = []

    class Score(fl.callbacks.Callback):
        def on_validation_epoch_end(self, state, metrics):
            kept.append({k: v.clone() for k, v in state.state_dict(use_ema=use_ema).items()})
            score = {"score": [0.3, 0.9, 0.5][state.epoch - 1]}
            return state.replace(history=fl.state.append_history(state.history, "valid", score))

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    state = fl.TrainState.create(module, tx=optim.adam(1e-2), ema_decay=0.5, device="cpu")
    fl.fit(
        state,
        classify,
        loaders(),
        max_epochs=3,
        validation_step=fl.make_eval_step(classify, use_ema=use_ema),
        callbacks=[Score()],
        monitor="valid/score",
        mode="max",
        out_dir=tmp_path,
        log_to_console=False,
    )
    best = torch.load(tmp_path / "best_model.pt", weights_only=True)
    assert best.keys() == kept[1].keys()
    for name, value in kept[1].items():
        torch.testing.assert_close(best[name], value, rtol=0, atol=0)
    assert not torch.equal(kept[1]["0.weight"], kept[2]["0.weight"])
    assert not torch.equal(kept[1]["1.running_mean"], kept[2]["1.running_mean"])


@pytest.mark.parametrize(
    ("scores", "mode"),
    [
        ([0.3, 0.9, 0.9], "max"),
        ([0.9, 0.3, 0.3], "min"),
        ([math.nan, 0.9, 0.5], "max"),
        ([math.nan, 0.3, 0.5], "min"),
    ],
    ids=["tie-max", "tie-min", "nan-max", "nan-min"],
)
def test_the_best_model_is_the_first_epoch_of_the_best_finite_value(tmp_path, scores, mode):
    """An epoch improves on the best only by a better value (a tie keeps the earlier
    epoch, as early stopping does), and a NaN value is never the best: the best model is
    epoch 2's here, the log says so, and best_model.pt holds its weights."""
    kept = []

    class Score(fl.callbacks.Callback):
        def on_validation_epoch_end(self, state, metrics):
            kept.append({k: v.clone() for k, v in state.state_dict().items()})
            score = {"score": scores[state.epoch - 1]}
            return state.replace(history=fl.state.append_history(state.history, "valid", score))

    fl.fit(
        make_state(),
        classify,
        loaders(),
        max_epochs=3,
        callbacks=[Score()],
        monitor="valid/score",
        mode=mode,
        out_dir=tmp_path,
        log_to_console=False,
    )
    log = (tmp_path / "run_training.log").read_text()
    assert f"Best model (valid/score {scores[1]:.4g} at epoch 2)" in log
    best = torch.load(tmp_path / "best_model.pt", weights_only=True)
    assert all(torch.equal(best[k], v) for k, v in kept[1].items())
    assert not torch.equal(kept[1]["0.weight"], kept[2]["0.weight"])


def test_resuming_into_a_folder_of_another_model_says_how_to_fix_it(tmp_path):
    fl.fit(make_state(), classify, loaders(), max_epochs=1, out_dir=tmp_path, log_to_console=False)
    other = fl.TrainState.create(nn.Linear(6, 2), tx=optim.adam(1e-2), device="cpu")
    with pytest.raises(
        fl.CheckpointMismatchError,
        match=r"^\S*checkpoints holds checkpoints of another model or optimizer than the state "
        r"given to fit\. Pass resume=False .* \(`like` is the state given to fit\): Checkpoint ",
    ):
        fl.fit(other, classify, loaders(), max_epochs=2, out_dir=tmp_path, log_to_console=False)


def test_epoch_end_checkpoint_replaces_a_mid_epoch_one_at_the_same_step(tmp_path):
    # 6 batches per epoch, a mid-epoch checkpoint every 3 steps: steps 6 and 12 end epochs.
    fl.fit(
        make_state(),
        classify,
        loaders(),
        max_epochs=2,
        out_dir=tmp_path,
        checkpoint_every_n_steps=3,
        keep_checkpoints=10,
        log_to_console=False,
    )
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.pt"))
    assert names == [
        "ckpt-0000000003-b.pt",
        "ckpt-0000000006-e.pt",
        "ckpt-0000000009-b.pt",
        "ckpt-0000000012-e.pt",
    ]


def interrupt_fit(out_dir, epoch, before=lambda: None):
    """A fit of 3 epochs that Ctrl-C stops after batch 2 of epoch ``epoch + 1`` (after
    calling ``before``); it raises the KeyboardInterrupt."""

    class CtrlC(fl.callbacks.Callback):
        def on_train_batch_end(self, state, outputs, batch, batch_idx):
            if state.epoch == epoch and batch_idx == 2:
                before()
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fl.fit(
            make_state(),
            classify,
            loaders(),
            max_epochs=3,
            out_dir=out_dir,
            callbacks=[CtrlC()],
            log_to_console=False,
        )


def test_keyboard_interrupt_is_logged_with_how_to_resume(tmp_path):
    """The hint names the newest checkpoint (epoch 2's), not the oldest one kept."""
    interrupt_fit(tmp_path, epoch=2)
    log = (tmp_path / "run_training.log").read_text()
    assert re.search(
        r"Interrupted in epoch 3\. Run the same fit again to resume from .*ckpt-0000000012-e\.pt",
        log,
    )
    interrupt_fit(None, epoch=2)  # without a run folder too


def test_ctrl_c_whose_best_model_cannot_be_written_logs_that_and_raises_the_interrupt(tmp_path):
    """Ctrl-C ends the run with KeyboardInterrupt even when best_model.pt cannot be
    written then (here a folder of that name is in the way): the failed write is logged,
    not raised in place of the interrupt."""
    interrupt_fit(tmp_path, epoch=1, before=(tmp_path / "best_model.pt").mkdir)
    log = (tmp_path / "run_training.log").read_text()
    assert "Interrupted in epoch 2." in log
    assert re.search(r"ERROR - Could not write the best model: \w+Error: ", log)
    assert (tmp_path / "best_model.pt").is_dir()


def test_torchs_symbolic_sizes_error_gets_the_hint_for_a_last_smaller_batch(tmp_path):
    """The error torch raises when a compiled step recompiled for any shape cannot run
    under torch.func (simulated here: the step raises torch's message) says what to do,
    in the log and in the traceback (a note), before the hint to resume."""
    from fnloop.fit import SYMBOLIC_SIZES, SYMBOLIC_SIZES_HINT

    def fails(model, batch):
        raise RuntimeError(f"{SYMBOLIC_SIZES} (while tracing the step)")

    with pytest.raises(RuntimeError, match="symbolic sizes") as info:
        fl.fit(make_state(), fails, loaders(), max_epochs=1, out_dir=tmp_path, log_to_console=False)
    # (Python 3.10 has no exception notes: there the log alone holds the hint.)
    notes = [SYMBOLIC_SIZES_HINT] if sys.version_info >= (3, 11) else None
    assert getattr(info.value, "__notes__", None) == notes
    log = (tmp_path / "run_training.log").read_text()
    want = f"Stopped by RuntimeError in epoch 1: {SYMBOLIC_SIZES} (while tracing the step). "
    assert want + SYMBOLIC_SIZES_HINT + " No checkpoint was written yet" in log


@pytest.mark.parametrize("event", ["on_fit_start", "on_fit_end"])
def test_keyboard_interrupt_outside_the_epochs_is_logged(tmp_path, event):
    """Ctrl-C before the first epoch or after the last one left no line in the log: the
    run's log just ended."""

    def interrupt(self, state):
        raise KeyboardInterrupt

    CtrlC = type("CtrlC", (fl.callbacks.Callback,), {event: interrupt})
    kw = dict(max_epochs=1, out_dir=tmp_path, log_to_console=False)
    with pytest.raises(KeyboardInterrupt):
        fl.fit(make_state(), classify, loaders(), callbacks=[CtrlC()], **kw)
    log = (tmp_path / "run_training.log").read_text()
    hint = "No checkpoint was written yet" if event == "on_fit_start" else "Run the same fit again"
    assert f"WARNING - Interrupted before or after the epochs. {hint}" in log
    assert log.count("Interrupted") == 1


def test_resume_false_without_an_out_dir_trains_as_a_plain_fit():
    """Without out_dir there is nothing to set aside: the same run as resume=True."""
    runs = []
    for resume in (True, False):
        torch.manual_seed(5)
        runs.append(
            fl.fit(
                make_state(),
                classify,
                loaders(),
                max_epochs=2,
                resume=resume,
                log_to_console=False,
            )
        )
    assert runs[0].history == runs[1].history and runs[1].step == 12
    assert all(torch.equal(runs[0].params[n], p) for n, p in runs[1].params.items())


def test_sys_exit_before_the_epochs_tears_the_callbacks_down_and_is_not_a_failure(tmp_path):
    """SystemExit (sys.exit in a callback) is neither an error nor Ctrl-C: the log says
    nothing of a failure or an interrupt, the callbacks still release what they hold,
    and the exit goes on."""
    torn = []

    class Exits(fl.callbacks.Callback):
        def on_fit_start(self, state):
            sys.exit(3)

    class Holds(fl.callbacks.Callback):
        def teardown(self):
            torn.append("holds")

    with pytest.raises(SystemExit) as info:
        fl.fit(
            make_state(),
            classify,
            loaders(),
            max_epochs=1,
            out_dir=tmp_path,
            callbacks=[Exits(), Holds()],
            log_to_console=False,
        )
    assert info.value.code == 3 and torn == ["holds"]
    log = (tmp_path / "run_training.log").read_text()
    assert "Stopped by" not in log and "Interrupted" not in log


def test_a_run_stopped_with_ctrl_c_leaves_its_best_model(tmp_path):
    """Ctrl-C, the usual way to end a run early by hand, after better epochs than the
    first fit's: best_model.pt kept that fit's best (epoch 2) though the checkpoints knew
    a better one, and a first fit interrupted so left none. It now holds the best of the
    epochs finished, as an uninterrupted run to that epoch writes it."""

    class CtrlC(fl.callbacks.Callback):
        def on_train_batch_end(self, state, outputs, batch, batch_idx):
            if state.epoch == 4 and batch_idx == 2:
                raise KeyboardInterrupt

    def run(out, max_epochs, callbacks=()):
        return fl.fit(
            make_state(),
            classify,
            loaders(shuffle=False),
            max_epochs=max_epochs,
            out_dir=out,
            callbacks=list(callbacks),
            log_to_console=False,
        )

    ref = run(tmp_path / "ref", 4)
    losses = ref.history["valid"]["loss"]
    assert min(losses) < min(losses[:2])  # epoch 3 or 4 beats the first fit's best
    want = torch.load(tmp_path / "ref" / "best_model.pt", weights_only=True)
    for first in (2, None):  # a finished fit first, or none
        out = tmp_path / f"after-{first}"
        if first:
            run(out, first)
        with pytest.raises(KeyboardInterrupt):
            run(out, 6, [CtrlC()])
        got = torch.load(out / "best_model.pt", weights_only=True)
        assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    "options",
    [{"precision": "fp16"}, {"accumulation_steps": 4}],
    ids=["fp16-loss-scale", "accumulation-window-open-at-epoch-end"],
)
def test_resume_restores_fields_made_while_training(tmp_path, options):
    # The loss scale (fp16) and an open accumulation window (6 batches per epoch, k=4)
    # exist in the checkpoint but not in the freshly made state of the re-run.
    def run(out_dir, max_epochs):
        torch.manual_seed(0)
        return fl.fit(
            make_state(),
            fl.make_train_step(classify, **options),
            loaders(),
            max_epochs=max_epochs,
            out_dir=out_dir,
            log_to_console=False,
        )

    straight = run(tmp_path / "straight", 2)
    run(tmp_path / "resumed", 1)
    resumed = run(tmp_path / "resumed", 2)
    assert resumed.step == straight.step
    for name, p in straight.params.items():
        assert torch.equal(resumed.params[name], p), name


class _Stream(torch.utils.data.IterableDataset):
    """Batches from a stream: no ``__len__``."""

    def __iter__(self):
        x, y = data()
        return iter(zip(x.split(16), y.split(16), strict=True))


def test_a_loader_without_length_trains(tmp_path):
    """DataLoader has ``__len__`` even over an IterableDataset without one (it raises)."""
    loader = DataLoader(_Stream(), batch_size=None)
    with pytest.raises(TypeError):
        len(loader)
    state = fl.fit(
        make_state(), classify, loader, max_epochs=2, progress=True, log_to_console=False
    )
    ref = fl.fit(
        make_state(),
        classify,
        loaders(shuffle=False, valid=False),
        max_epochs=2,
        log_to_console=False,
    )
    assert state.step == 12 and torch.equal(state.params["0.weight"], ref.params["0.weight"])


def stream_loader():
    """A DataLoader of ``_Stream``: its ``len()`` raises ``TypeError``."""
    return DataLoader(_Stream(), batch_size=None)


class _StreamOfUnknownLength(_Stream):
    """A stream whose ``__len__`` says the length is not known (as some streaming
    datasets do): a DataLoader's ``len()`` passes the error on."""

    def __len__(self):
        raise NotImplementedError("the length of a stream is not known")


class _BatchesOfUnknownLength:
    """An iterable of one's own whose ``__len__`` raises ``NotImplementedError``."""

    def __iter__(self):
        return iter(_Stream())

    def __len__(self):
        raise NotImplementedError


@pytest.mark.parametrize(
    ("loader", "like"),
    [
        (lambda: DataLoader(_StreamOfUnknownLength(), batch_size=None), stream_loader),
        (_BatchesOfUnknownLength, _Stream),
    ],
    ids=["dataloader", "iterable"],
)
def test_a_loader_whose_len_raises_not_implemented_is_of_unknown_length(loader, like):
    """len() raising NotImplementedError (as TypeError, which was handled) means the
    length is not known: fit's loader check, the progress bars and the epoch loops
    crashed on it before the first batch. They now run as for a loader like it whose
    len() raises TypeError."""
    with pytest.raises(NotImplementedError):
        len(loader())

    def run(make):
        return fl.fit(
            make_state(),
            classify,
            {"train": make(), "valid": make()},
            max_epochs=1,
            progress=True,
            log_to_console=False,
        )

    state = run(loader)
    assert state.history == run(like).history
    eval_step = fl.make_eval_step(classify)
    _, got = fl.validate_epoch(state, eval_step, loader(), progress=True)
    assert got == fl.validate_epoch(state, eval_step, like())[1]
    train_step = fl.make_train_step(classify)
    torch.manual_seed(0)
    _, got = fl.train_epoch(state, train_step, loader(), progress=True)
    torch.manual_seed(0)
    assert got == fl.train_epoch(state, train_step, like())[1]


class _EmptyStream(torch.utils.data.IterableDataset):
    """A stream with nothing in it (a filter that let no example through)."""

    def __iter__(self):
        return iter(())


class _OneShotStream(torch.utils.data.IterableDataset):
    """A stream whose iterator is made once: the second pass over it yields nothing."""

    def __init__(self):
        x, y = data(32, seed=1)
        self.batches = iter(zip(x.split(16), y.split(16), strict=True))

    def __iter__(self):
        return self.batches


@pytest.mark.parametrize(
    ("stream", "epoch"), [(_EmptyStream, 3), (_OneShotStream, 4)], ids=["empty", "one-shot"]
)
def test_a_validation_stream_that_yields_nothing_is_named_and_costs_no_saved_file(
    tmp_path, stream, epoch
):
    """An empty validation loader without len() cannot be found before training without
    iterating it (using up a stream's batch, starting its workers, drawing the global
    generator for their seeds), so it shows after the epoch's training. The error then
    says why it was not found earlier and what to check (it blamed the dataset length,
    batch_size and drop_last), and the files of the epochs before are kept."""
    run = {"out_dir": tmp_path, "log_to_console": False}
    fl.fit(make_state(), classify, loaders(), max_epochs=2, **run)
    saved = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".log"}
    valid = DataLoader(stream(), batch_size=None)
    with pytest.raises(ValueError, match=r"valid loader yielded no batches\. It has no len\(\)"):
        fl.fit(make_state(), classify, {**loaders(), "valid": valid}, max_epochs=4, **run)
    assert f"Stopped by ValueError in epoch {epoch}" in (tmp_path / "run_training.log").read_text()
    newest = max((tmp_path / "checkpoints").glob("ckpt-*.pt"))
    assert fl.load_checkpoint(newest, like=make_state()).epoch == epoch - 1
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + epoch - 1
    if epoch == 3:  # no epoch finished: every file is as the first fit left it
        assert {p: p.read_bytes() for p in saved} == saved


class _Samples(torch.utils.data.Dataset):
    """A map-style dataset whose __getitem__ never raises IndexError: iterated directly
    it yields single samples, forever."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        x, y = data()
        return x[i % 8], y[i % 8]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"loaders": TensorDataset(*data())}, TypeError, r"yields single samples.*DataLoader"),
        ({"loaders": _Samples()}, TypeError, r"loader is a dataset \(_Samples\), which yields"),
        (
            {"loaders": {"train": loaders()["train"], "valid": _Samples()}},
            TypeError,
            r"the valid loader is a dataset",
        ),
        ({"progress": "no"}, TypeError, r"progress takes True, False or 'auto'; got 'no'"),
        ({"loaders": "train.csv"}, TypeError, r"loader is a str \('train.csv'\), .* by character"),
        (
            {"loaders": {"train": loaders()["train"], "valid": b"valid.pt"}},
            TypeError,
            r"the valid loader is a bytes .*shuffle=False",
        ),
        ({"resume": "no"}, TypeError, r"resume takes True or False; got 'no'"),
        ({"log_to_console": "no"}, TypeError, r"log_to_console takes True or False; got 'no'"),
        ({"donate": 1}, TypeError, r"donate takes True or False; got 1"),
        ({"monitor": 3}, TypeError, r"monitor takes a metric name such as 'valid/loss'.*got 3"),
        ({"run_name": "a/b"}, ValueError, r"without path separators; got 'a/b'"),
        ({"loaders": (b for b in loaders()["train"])}, TypeError, "first epoch would use up"),
        ({"callbacks": [fl.callbacks.CSVLogger]}, TypeError, r"pass an instance: CSVLogger"),
        (
            {"callbacks": [object()]},
            TypeError,
            r"object is not a callback: it has none of the events on_fit_start, .*Subclass",
        ),
        (
            {"loaders": {"train": None, "valid": loaders()["valid"]}},
            ValueError,
            r"loaders\['train'\] is None; pass a loader to train on\.",
        ),
        ({"mode": "maximum"}, ValueError, r"mode must be 'min' or 'max'; got 'maximum'\."),
        ({"early_stopping": "valid/acc"}, TypeError, r"fl.EarlyStopping rules; got 'valid/acc'"),
        ({"monitor": "val/acc", "mode": "max"}, ValueError, r"pass monitor='valid/acc'"),
        ({"checkpoint_every_n_steps": 5, "out_dir": None}, ValueError, "needs out_dir"),
        (  # a second rule on valid/ with no validation loader: a KeyError after epoch 1
            {
                "loaders": loaders(valid=False),
                "monitor": "train/loss",
                "early_stopping": [fl.EarlyStopping("train/loss"), fl.EarlyStopping("valid/loss")],
            },
            ValueError,
            r"EarlyStopping monitors 'valid/loss' but no validation loader was given",
        ),
        ({"max_epochs": 1.5}, TypeError, r"max_epochs takes an int; got 1.5"),
        ({"max_epochs": None}, TypeError, r"max_epochs takes an int; got None"),
        ({"keep_checkpoints": 1.5}, TypeError, r"keep_checkpoints takes an int"),
        ({"checkpoint_every_n_steps": 1.5}, TypeError, r"checkpoint_every_n_steps takes an int"),
        ({"checkpoint_every_n_steps": 0}, ValueError, r"checkpoint_every_n_steps must be >= 1"),
        ({"keep_checkpoints": 0}, ValueError, r"keep_checkpoints must be >= 1; got 0"),
        ({"batch_size": 0}, ValueError, r"batch_size must be .* a positive int"),
        ({"loaders": {"train": [], "val": []}}, ValueError, r"'valid' \(the validation loader\)"),
        (
            {"monitor": "valid/acc", "mode": "max"},
            ValueError,
            r"reduce_on_plateau\(mode='min'\) would be fed 'valid/acc'",
        ),
        (  # the rule forgot mode="max": it would stop while the accuracy rises
            {
                "monitor": "valid/acc",
                "mode": "max",
                "early_stopping": fl.EarlyStopping("valid/acc"),
            },
            ValueError,
            r"EarlyStopping\(monitor='valid/acc', mode='min'\) contradicts fit's mode='max'",
        ),
    ],
)
def test_bad_fit_arguments_fail_before_anything_is_written(tmp_path, kwargs, error, match):
    args = {"loaders": loaders(), "out_dir": tmp_path / "run", **kwargs}
    state = make_state(tx=optim.adam(optim.reduce_on_plateau(1e-2)))
    args = {"max_epochs": 1, **args}
    with pytest.raises(error, match=match):
        fl.fit(state, classify, **{"log_to_console": False, **args})
    assert not (tmp_path / "run").exists()


def test_fit_given_a_module_instead_of_a_state_says_it_needs_a_train_state(tmp_path):
    module = make_state().module
    with pytest.raises(
        TypeError,
        match=r"^fit needs a TrainState first; got Sequential\. Make one from the module: "
        r"fl\.TrainState\.create\(module, tx=optim\.adamw\(1e-3\)\)\.$",
    ):
        fl.fit(module, classify, loaders(), max_epochs=1, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("split", ["train", "valid"])
def test_the_iterator_of_a_dataloader_is_refused_before_training(tmp_path, split):
    """iter(loader) (as a hand-written loop keeps it) trained its first epoch, wrote its
    checkpoint and then failed with "yielded no batches. Check the dataset length,
    batch_size and drop_last": it was not refused up front like the other one-shot
    iterators."""
    given = loaders()
    given[split] = iter(given[split])
    with pytest.raises(TypeError, match=rf"the {split} loader is an iterator \(_\w+DataLoaderIter"):
        fl.fit(make_state(), classify, given, max_epochs=2, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("compiled", [False, True])
def test_steps_of_the_wrong_kind_are_named(tmp_path, compiled):
    """A made train step as validation_step (or a made eval step as training_step) was
    called as the user's (model, batch) function, and said "needs a TrainState first;
    got BoundModel. Did you swap the arguments?"."""
    wrap = (lambda f: torch.compile(f, backend="eager")) if compiled else (lambda f: f)
    state = make_state()
    for training_step, validation_step, match in [
        (classify, wrap(fl.make_train_step(classify)), r"validation_step is a train step"),
        (wrap(fl.make_eval_step(classify)), None, r"training_step is an eval step"),
    ]:
        with pytest.raises(TypeError, match=match + r".*make_(train|eval)_step"):
            fl.fit(
                state,
                training_step,
                loaders(),
                max_epochs=1,
                validation_step=validation_step,
                out_dir=tmp_path / "run",
                log_to_console=False,
            )
        assert not (tmp_path / "run").exists()


def test_a_supplied_batch_size_weighs_the_epoch_means():
    """REQUIREMENTS I10, S11: batches whose first tensor is not batch-major (time-major
    sequences, (T, B, F)) are weighed by the size fit(batch_size=...) finds in them, in
    training and validation (no test passed one)."""
    g = torch.Generator().manual_seed(0)
    sizes = [8, 8, 2]  # examples per batch; every batch has T=5 steps
    batches = [
        (torch.randn(5, b, 6, generator=g), torch.randint(0, 2, (b,), generator=g)) for b in sizes
    ]

    def last_step(model, batch):
        x, y = batch
        return classify(model, (x[-1], y))

    module = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))  # no dropout
    state = fl.TrainState.create(module, tx=optim.sgd(0.0), device="cpu")
    per_batch = [float(fl.make_eval_step(last_step)(state, b)["loss"]) for b in batches]
    want = sum(n * v for n, v in zip(sizes, per_batch)) / sum(sizes)
    state = fl.fit(
        state,
        last_step,
        {"train": batches, "valid": batches},
        max_epochs=1,
        batch_size=lambda b: b[0].shape[1],
        log_to_console=False,
    )
    assert want != pytest.approx(sum(per_batch) / 3, rel=1e-3)  # the weights matter here
    assert state.history["valid"]["loss"][0] == pytest.approx(want, rel=1e-6)
    assert state.history["train"]["loss"][0] == pytest.approx(want, rel=1e-6)


def test_numpy_numbers_are_numbers_for_fit(tmp_path):
    np = pytest.importorskip("numpy")
    rule = fl.EarlyStopping("valid/loss", patience=np.int64(3), min_delta=np.float32(0.0))
    state = fl.fit(
        make_state(),
        classify,
        loaders(),
        max_epochs=np.int64(1),
        batch_size=np.int64(16),
        early_stopping=rule,
        out_dir=tmp_path,  # the rule is recorded in the checkpoint as plain numbers
        log_to_console=False,
    )
    assert state.epoch == 1 and type(rule.patience) is int


def test_with_several_early_stopping_rules_the_monitor_is_the_default_one(tmp_path):
    """Only a single rule lends fit its monitor, and only a rule on the monitor its mode:
    with a rule on valid/acc (mode="max") and one on train/loss, the best model follows
    valid/loss, the documented default with a validation loader, and its lowest value,
    not the first rule's metric or mode."""
    rules = [
        fl.EarlyStopping("valid/acc", mode="max", patience=100),
        fl.EarlyStopping("train/loss", patience=100),
    ]
    state = fl.fit(
        make_state(),
        classify,
        loaders(),
        max_epochs=3,
        early_stopping=rules,
        out_dir=tmp_path,
        log_to_console=False,
    )
    losses = state.history["valid"]["loss"]
    best_epoch = min(range(3), key=lambda e: (losses[e], e)) + 1
    assert (
        f"Best model (valid/loss {losses[best_epoch - 1]:.4g} at epoch {best_epoch})"
        in (tmp_path / "run_training.log").read_text()
    )


def test_monitor_takes_the_mode_of_an_early_stopping_rule_on_it(tmp_path):
    """An explicit monitor that an early-stopping rule watches keeps the rule's mode: the
    best model is the epoch with the highest accuracy, not the lowest."""

    class Record(fl.callbacks.Callback):
        def on_train_epoch_start(self, state):
            return None

    state = fl.fit(
        make_state(),
        classify,
        loaders(),
        max_epochs=4,
        monitor="valid/acc",
        early_stopping=fl.EarlyStopping("valid/acc", mode="max", patience=10),
        callbacks=Record(),  # one callback need not be in a list
        out_dir=tmp_path,
        log_to_console=False,
    )
    accs = state.history["valid"]["acc"]
    best = max(range(4), key=lambda e: (accs[e], -e)) + 1
    assert f"at epoch {best})" in (tmp_path / "run_training.log").read_text()


def test_metrics_of_a_float64_model_keep_float64():
    """The loss of a float64 model and a Python number are logged as given, not rounded
    to float32."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2)).double()
    state = fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")
    x, y = data()
    batch = (x.double(), y)
    _, metrics = fl.make_train_step(lambda m, b: {**classify(m, b), "const": 0.4})(state, batch)
    assert metrics["loss"].dtype == torch.float64
    assert metrics["loss"].item() == F.cross_entropy(module(x.double()), y).item()
    final = fl.fit(
        state,
        lambda m, b: {**classify(m, b), "const": 0.4},
        DataLoader(TensorDataset(x.double(), y), batch_size=16),
        max_epochs=1,
        log_to_console=False,
    )
    assert final.history["train"]["const"][0] == pytest.approx(0.4, rel=1e-14)


def test_fit_runs_a_users_wrapper_of_a_made_step():
    """A wrapper (functools.wraps of a made step) is run as given, not unwrapped."""
    import functools

    step, calls = fl.make_train_step(classify), []

    @functools.wraps(step)
    def with_noise(state, batch):
        calls.append(1)
        x, y = batch
        return step(state, (x + 0.01, y))

    fl.fit(make_state(), with_noise, loaders(valid=False), max_epochs=2, log_to_console=False)
    assert len(calls) == 12
    assert step.donate is False and fl.make_train_step(classify, donate=True).donate is True


class _Restarting:
    """An iterator whose __iter__ starts over (as data-loading libraries' iterators do)."""

    def __init__(self):
        self.batches = list(loaders(shuffle=False, valid=False)["train"])

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.i = 0
        return self

    def __next__(self):
        if self.i == len(self.batches):
            raise StopIteration
        self.i += 1
        return self.batches[self.i - 1]


class _BatchDataset(torch.utils.data.Dataset):
    """A map-style dataset whose items are whole batches."""

    def __init__(self):
        self.batches = list(loaders(shuffle=False, valid=False)["train"])

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def test_a_dataset_of_batches_trains_through_a_dataloader_without_batching():
    # Given directly it is refused as any map-style dataset is (it cannot be told from a
    # dataset of samples); the error names DataLoader(dataset, batch_size=None).
    with pytest.raises(TypeError, match=r"DataLoader\(dataset, batch_size=None\)"):
        fl.fit(make_state(), classify, _BatchDataset(), max_epochs=1, log_to_console=False)
    batches = list(loaders(shuffle=False, valid=False)["train"])
    loader = torch.utils.data.DataLoader(_BatchDataset(), batch_size=None)
    state = fl.fit(make_state(), classify, loader, max_epochs=2, log_to_console=False)
    assert state.step == 12 and fl.batch_size(next(iter(loader))) == len(batches[0][0])


class _IteratingDataset(_BatchDataset):
    """A dataset class with an __iter__ of its own that yields the batches."""

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.parametrize("loader", [_Restarting, _IteratingDataset])
def test_loaders_that_give_batches_every_epoch_train(loader):
    """As a list of the same batches does (a DataLoader would also draw a seed from the
    global generator each epoch, which moves the dropout masks)."""
    batches = list(loaders(shuffle=False, valid=False)["train"])
    ref = fl.fit(make_state(), classify, batches, max_epochs=2, log_to_console=False)
    given = loader()  # before make_state seeds the generator: building it draws seeds
    state = fl.fit(
        make_state(), classify, given, max_epochs=2, log_to_console=False, early_stopping=None
    )
    assert state.step == 12 and torch.equal(state.params["0.weight"], ref.params["0.weight"])


def test_one_callback_class_or_rule_class_is_a_clear_error():
    with pytest.raises(TypeError, match=r"pass an instance: CSVLogger"):
        fl.fit(make_state(), classify, loaders(), max_epochs=1, callbacks=fl.callbacks.CSVLogger)
    with pytest.raises(TypeError, match=r"fl\.EarlyStopping rules"):
        fl.fit(make_state(), classify, loaders(), max_epochs=1, early_stopping=fl.EarlyStopping)


def test_two_file_loggers_of_one_file_are_an_error_before_anything_is_written(
    tmp_path, monkeypatch
):
    """Two loggers of one file wrote epoch 1 once (the second truncated the first's
    rows) and every later row twice; the same logger object twice did the same."""
    monkeypatch.setenv("HOME", str(tmp_path))
    saved = tmp_path / "m.csv"
    saved.write_text("epoch,step\n1,6\n")
    csv = fl.callbacks.CSVLogger(saved)
    for callbacks, what in [
        ([csv, fl.callbacks.CSVLogger("~/m.csv")], "two callbacks"),
        ([csv, fl.callbacks.JSONLinesLogger(tmp_path / "sub" / ".." / "m.csv")], "two callbacks"),
        ([csv, csv], "the same callback object twice"),
    ]:
        with pytest.raises(ValueError, match=rf"holds {what} writing {re.escape(str(saved))}"):
            fl.fit(make_state(), classify, loaders(), max_epochs=1, callbacks=callbacks)
    assert saved.read_text() == "epoch,step\n1,6\n"
    assert not (tmp_path / "sub").exists()
    state = fl.fit(  # one file each: fine
        make_state(),
        classify,
        loaders(),
        max_epochs=1,
        callbacks=[fl.callbacks.CSVLogger(tmp_path / "a.csv"), csv],
        log_to_console=False,
    )
    assert state.epoch == 1 and len((tmp_path / "a.csv").read_text().splitlines()) == 2


def test_learning_rate_changes_are_logged_once_per_distinct_change(caplog):
    from fnloop.fit import _log_lr_changes

    logger = logging.getLogger("fnloop.test.lr")
    with caplog.at_level(logging.INFO, logger="fnloop.test.lr"):
        _log_lr_changes(logger, [0.1, 0.1, 0.2], [0.05, 0.05, 0.2])
        _log_lr_changes(logger, [0.1, 0.2], [0.05, 0.1])
        _log_lr_changes(logger, [0.1], [0.05])
        _log_lr_changes(logger, [1e-7, 3e-7], [2e-7, 1e-7])  # alike only when rounded
    assert caplog.messages == [
        "Learning rate [groups 0, 1] updated: 0.100000 → 0.050000",
        "Learning rate [group 0] updated: 0.100000 → 0.050000",
        "Learning rate [group 1] updated: 0.200000 → 0.100000",
        "Learning rate updated: 0.100000 → 0.050000",
        "Learning rate [group 0] updated: 1.000e-07 → 2.000e-07",
        "Learning rate [group 1] updated: 3.000e-07 → 1.000e-07",
    ]


def test_small_learning_rates_and_their_changes_are_logged_faithfully(caplog):
    """Rates below 1e-4 are printed with 4 significant digits, not as 0.000000 or
    0.000020, and their changes (below the 1e-8 an absolute threshold would take for
    noise) are logged; a change too small to show is not."""
    from fnloop.fit import _log_lr_changes

    logger = logging.getLogger("fnloop.test.small_lr")
    with caplog.at_level(logging.INFO, logger="fnloop.test.small_lr"):
        _log_lr_changes(logger, [1e-9], [5e-10])
        _log_lr_changes(logger, [3e-4], [1.5e-4])
        _log_lr_changes(logger, [0.1], [0.1 * (1 + 1e-12)])
        _log_lr_changes(logger, [2e-5], [1.951e-5])
    assert caplog.messages == [
        "Learning rate updated: 1.000e-09 → 5.000e-10",
        "Learning rate updated: 0.000300 → 0.000150",
        "Learning rate updated: 2.000e-05 → 1.951e-05",
    ]


@pytest.mark.parametrize(
    ("monitor", "rule", "warned"),
    [
        ("valid/acc", None, ["fit"]),
        (None, fl.EarlyStopping("valid/acc", patience=3), ["fit", "EarlyStopping"]),
        (None, fl.EarlyStopping("valid/top1_acc", mode="max", patience=3), []),
        ("valid/loss", fl.EarlyStopping("train/macro-f1", patience=3), ["EarlyStopping"]),
        ("valid/loss", fl.EarlyStopping("valid/accelerations", patience=3), []),
    ],
)
def test_a_score_followed_with_mode_min_is_warned_about(tmp_path, monitor, rule, warned):
    """mode defaults to "min": fit(monitor="valid/acc") kept the worst epoch as the best
    model, and EarlyStopping("valid/acc") stopped while the accuracy rose, silently."""

    def scores(model, batch):
        out = classify(model, batch)
        return {**out, "top1_acc": out["acc"], "macro-f1": out["acc"], "accelerations": out["acc"]}

    fl.fit(
        make_state(),
        scores,
        loaders(),
        max_epochs=1,
        monitor=monitor,
        early_stopping=[rule] if rule else [],
        out_dir=tmp_path,
        log_to_console=False,
    )
    log = (tmp_path / "run_training.log").read_text().splitlines()
    lines = [line.split(" - WARNING - ")[-1] for line in log if "reads like" in line]
    assert [line.split("(", 1)[0].split(" ", 1)[0] for line in lines] == warned
    assert all("mode='max'" in line for line in lines)


def test_a_step_metric_named_like_the_learning_rate_is_an_error():
    """fit records the optimizer's rate as train/lr: a step's own "lr" was overwritten by
    it silently (and valid/lr kept the step's)."""

    def with_lr(model, batch):
        return {**classify(model, batch), "lr": torch.tensor(0.5)}

    with pytest.raises(ValueError, match=r"returns a metric 'lr'.*train/lr.*rename"):
        fl.fit(make_state(), with_lr, loaders(), max_epochs=1, log_to_console=False)
    fine = fl.fit(
        make_state(),
        classify,
        loaders(),
        max_epochs=1,
        validation_step=with_lr,
        log_to_console=False,
    )
    assert fine.history["valid"]["lr"] == (0.5,) and fine.history["train"]["lr"] != (0.5,)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("rows", [33, 32])
def test_a_validation_sampler_that_repeats_or_drops_examples_is_warned_about(
    tmp_path, rows, drop_last
):
    """DistributedSampler evens out the processes' shares: with 33 validation rows and 2
    processes, one row counted twice in the validation metrics (and in the best model
    and early stopping), silently; with drop_last=True one row was left out, silently."""
    x, y = data(rows)
    valid = TensorDataset(x, y)
    sampler = torch.utils.data.DistributedSampler(
        valid, num_replicas=2, rank=0, shuffle=False, drop_last=drop_last
    )
    assert len(sampler) == (rows + (0 if drop_last else 1)) // 2  # this process's share
    fl.fit(
        make_state(),
        classify,
        {"train": loaders()["train"], "valid": DataLoader(valid, batch_size=8, sampler=sampler)},
        max_epochs=1,
        out_dir=tmp_path,
        log_to_console=False,
    )
    log = (tmp_path / "run_training.log").read_text()
    if rows % 2:
        warning = (
            "WARNING - The valid loader's DistributedSampler has drop_last=True and leaves "
            "out 1 example(s)"
            if drop_last
            else "WARNING - The valid loader's DistributedSampler repeats 1 example(s)"
        )
        assert warning in log
        assert "Subset(valid_set, range(rank, len(valid_set), world_size))" in log
    else:
        assert "DistributedSampler" not in log


@pytest.mark.parametrize("inside", [False, True], ids=["sampler", "batch_sampler"])
def test_a_distributed_sampler_is_reseeded_every_epoch_and_on_resume(tmp_path, inside):
    """REQUIREMENTS I5: ``sampler.set_epoch(state.epoch)`` before each epoch's batches, so
    a shuffling ``DistributedSampler`` draws a new order every epoch (no test failed
    without it: both sides of the two-process comparison repeated epoch 0's order), and a
    resumed run goes on with the epoch it resumes at. Also when the sampler is inside a
    ``BatchSampler`` (it was not reseeded there: every epoch repeated epoch 0's order)."""
    x, y = data(64)
    sampler = torch.utils.data.DistributedSampler(
        TensorDataset(x, y), num_replicas=1, rank=0, shuffle=True, seed=5
    )
    seen = []

    def step(model, batch):
        seen.append(batch[2].tolist())
        return classify(model, batch[:2])

    ds = TensorDataset(x, y, torch.arange(64))
    if inside:
        batches = torch.utils.data.BatchSampler(sampler, batch_size=64, drop_last=False)
        loader = DataLoader(ds, batch_sampler=batches)
    else:
        loader = DataLoader(ds, batch_size=64, sampler=sampler)
    state = fl.fit(make_state(), step, loader, max_epochs=2, out_dir=tmp_path, log_to_console=False)
    fl.fit(state, step, loader, max_epochs=3, out_dir=tmp_path, log_to_console=False)

    def order(epoch):
        g = torch.Generator().manual_seed(5 + epoch)  # DistributedSampler's shuffle
        return torch.randperm(64, generator=g).tolist()

    assert seen == [order(0), order(1), order(2)]
    assert order(0) != order(1)


def test_progress_bars_show_running_batch_weighted_means(monkeypatch):
    """REQUIREMENTS S10: each bar's postfix is the running mean of the epoch so far,
    weighted by batch size (no test looked at what the bars show)."""
    bars = []

    class FakeBar:
        def __init__(self, **kwargs):
            self.desc, self.total, self.postfix, self.n = kwargs["desc"], kwargs["total"], [], 0
            bars.append(self)

        def set_postfix_str(self, text, refresh=True):
            self.postfix.append((self.n, text))

        def update(self, n):
            self.n += n

        def close(self):
            pass

    clock = iter(range(1000))  # a second per reading: every batch redraws the postfix
    monkeypatch.setattr(fl.epoch, "tqdm", FakeBar)
    monkeypatch.setattr(fl.epoch.time, "monotonic", lambda: float(next(clock)))
    x, y = data(10)
    losses = iter([1.0, 2.0, 5.0, 0.5, 0.25])

    def step(model, batch):
        return {"loss": classify(model, batch)["loss"] * 0 + next(losses)}

    ld = {
        "train": DataLoader(TensorDataset(x, y), batch_size=4),  # 4, 4, 2
        "valid": DataLoader(TensorDataset(x[:6], y[:6]), batch_size=3),  # 3, 3
    }
    fl.fit(make_state(tx=optim.sgd(0.0)), step, ld, max_epochs=1, progress=True)
    train, valid = bars
    assert (train.desc, train.total, valid.desc, valid.total) == ("epoch 1/1", 3, "valid 1/1", 2)
    assert train.postfix == [(0, "loss:1"), (1, "loss:1.5"), (2, "loss:2.2")]
    assert valid.postfix == [(0, "loss:0.5"), (1, "loss:0.375")]


def test_the_epoch_line_has_the_seeds_format():
    """REQUIREMENTS S10: ``[ 15/50] loss:0.023 | (val) loss:0.019 (2m 15s)``: the epoch
    right-aligned in three places (it printed ``[15/50]``), and 4 significant digits, as
    the progress bars show (it printed ``loss:0.0230``, and ``0.0000`` for 2.5e-5)."""
    line = epoch_line(15, 50, {"train/loss": 0.023, "valid/loss": 0.019}, 135)
    assert line == "[ 15/50] loss:0.023 | (val) loss:0.019 (2m 15s)"
    assert epoch_line(7, 1000, {"train/loss": 2.5e-5}, 3) == "[   7/1000] loss:2.5e-05 (3.0s)"
    line = epoch_line(1, 2, {"train/loss": 0.018146, "valid/loss": 0.0189}, 1)
    assert line == "[  1/2] loss:0.01815 | (val) loss:0.0189 (1.0s)"
    nan = epoch_line(1, 2, {"train/loss": float("nan"), "train/acc": 0.0}, 1)
    assert nan == "[  1/2] loss:nan acc:0 (1.0s)"
    # An epoch of an hour or more: 1 h 2 min 5 s, and 2 h to the second.
    assert epoch_line(1, 2, {"train/loss": 0.5}, 3725.4).endswith(" (1h 2m 5s)")
    assert epoch_line(1, 2, {"train/loss": 0.5}, 7199.6).endswith(" (2h 0m 0s)")


def test_the_epoch_line_shows_a_step_metric_named_like_lr_but_not_the_rates():
    """The epoch line leaves out fit's learning rates (lr, lr_0, ...), which have log
    lines of their own, and shows the step's metrics, also one whose name starts with
    'lr' (lr_scale)."""
    metrics = {"train/loss": 0.5, "train/lr_scale": 0.25, "train/lr_0": 0.1, "train/lr_1": 0.2}
    line = epoch_line(1, 2, metrics, 1, rates=("train/lr_0", "train/lr_1"))
    assert line == "[  1/2] loss:0.5 lr_scale:0.25 (1.0s)"


def test_the_epoch_line_shows_a_callbacks_metrics_of_another_split(tmp_path):
    class TestAcc(fl.callbacks.Callback):
        def on_validation_epoch_end(self, state, metrics):
            acc = {"acc": 0.5 + state.epoch / 10}
            return state.replace(history=fl.state.append_history(state.history, "test", acc))

    fl.fit(
        make_state(),
        classify,
        loaders(),
        max_epochs=2,
        callbacks=[TestAcc()],
        out_dir=tmp_path,
        log_to_console=False,
    )
    log = (tmp_path / "run_training.log").read_text()
    assert re.search(
        r"\[  2/2\] loss:\S+ acc:\S+ \| \(val\) loss:\S+ acc:\S+ \| \(test\) acc:0\.7 \(", log
    )


@pytest.mark.slow
def test_a_compiled_dropout_step_meeting_a_smaller_batch_is_told_to_drop_last(tmp_path):
    step = torch.compile(fl.make_train_step(classify))
    try:
        fl.fit(
            make_state(),
            step,
            loaders(batch_size=40, valid=False),
            max_epochs=1,
            out_dir=tmp_path,
            log_to_console=False,
        )  # batches of 40, 40 and 16
    except Exception as e:  # torch's own error type, whichever it is
        error = e
    else:
        pytest.skip("this torch version compiles dropout under torch.func for any batch size")
    assert "symbolic sizes" in str(error)
    log = (tmp_path / "run_training.log").read_text()
    assert "met a batch of another shape" in log and "drop_last=True" in log
    notes = getattr(error, "__notes__", ["drop_last=True"])  # Python 3.11+
    assert any("drop_last=True" in note for note in notes)


class _KeepStates(fl.callbacks.Callback):
    """Keeps the state of each epoch end as given, and a clone of it."""

    def __init__(self):
        self.kept, self.clones = [], []

    def on_train_epoch_end(self, state, metrics):
        self.kept.append(state)
        self.clones.append(state.clone())


def test_a_state_a_callback_kept_from_an_event_is_refused_after_later_steps():
    """fit donates each state to the next step: a state kept from an epoch end held the
    last epoch's weights by the end of the run (its state_dict() gave them silently).
    Using it is an error that says to keep state.clone(); a clone keeps its epoch."""

    keep = _KeepStates()
    final = fl.fit(
        make_state(),
        classify,
        loaders(valid=False),
        max_epochs=3,
        callbacks=keep,
        progress=False,
        log_to_console=False,
    )
    with pytest.raises(RuntimeError, match=r"callback that keeps a state .* state\.clone\(\)"):
        keep.kept[0].state_dict()
    assert [c.step for c in keep.clones] == [6, 12, 18]
    assert not torch.equal(keep.clones[0].params["0.weight"], final.params["0.weight"])
    assert torch.equal(keep.clones[-1].params["0.weight"], final.params["0.weight"])


def test_fit_donates_with_a_step_made_without_donate_but_runs_a_wrapped_one_as_given():
    """fit runs a made step donating whatever its donate= (it owns the states it makes):
    a state a callback kept is refused after later steps. A made step in a wrapper (or
    compiled) is run as given: made with donate=False, the kept state keeps its values."""
    import functools

    def run(step):
        keep = _KeepStates()
        fl.fit(
            make_state(),
            step,
            loaders(valid=False),
            max_epochs=2,
            callbacks=keep,
            progress=False,
            log_to_console=False,
        )
        return keep

    made = run(fl.make_train_step(classify, donate=False))
    with pytest.raises(RuntimeError, match=r"state\.clone\(\)"):
        made.kept[0].state_dict()
    step = fl.make_train_step(classify, donate=False)
    kept = run(functools.wraps(step)(lambda state, batch: step(state, batch)))
    for state, clone in zip(kept.kept, kept.clones):
        assert torch.equal(state.params["0.weight"], clone.params["0.weight"])
    assert not torch.equal(kept.kept[0].params["0.weight"], kept.kept[1].params["0.weight"])


def test_fit_log_lines_do_not_reach_the_root_loggers_handlers(tmp_path):
    """fit's logger writes to the console and the log file itself, so while fit runs its
    lines do not also go up to the root logger: after logging.basicConfig() a user saw
    every line twice, the second time in the root handler's format."""

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.names = []

        def emit(self, record):
            self.names.append(record.name)

    root = logging.getLogger()
    mine = Keep()
    root.addHandler(mine)
    try:
        fl.fit(
            make_state(),
            classify,
            loaders(),
            max_epochs=1,
            out_dir=tmp_path,
            run_name="quiet",
            log_to_console=False,
        )
    finally:
        root.removeHandler(mine)
    assert "[  1/1]" in (tmp_path / "quiet_training.log").read_text()
    assert not [name for name in mine.names if name.startswith("fnloop.run")]
    assert logging.getLogger("fnloop.run.quiet").propagate  # restored when fit ends


@pytest.mark.xfail(
    strict=True,
    reason="fit keeps as the best model the state that on_validation_epoch_end returned, "
    "not the weights the validation measured; whether a callback's new weights (a rollback) "
    "may replace them is a design decision (see /tmp/h87/s9_rollback.py)",
)
def test_the_best_model_holds_the_weights_its_validation_measured(tmp_path):
    validated = {}

    class Rollback(fl.callbacks.Callback):
        """At epoch 2, goes back to the initial weights after the validation."""

        def on_fit_start(self, state):
            self.first = state.clone()

        def on_validation_epoch_end(self, state, metrics):
            validated[state.epoch] = {k: v.clone() for k, v in state.params.items()}
            if state.epoch == 2:
                return state.replace(params=self.first.clone().params)
            return None

    state = fl.fit(
        make_state(tx=optim.sgd(0.5)),
        classify,
        loaders(shuffle=False),
        max_epochs=2,
        out_dir=tmp_path,
        callbacks=[Rollback()],
        monitor="valid/loss",
        log_to_console=False,
    )
    best_epoch = 1 + min(range(2), key=lambda e: state.history["valid"]["loss"][e])
    best = torch.load(tmp_path / "best_model.pt", weights_only=True)
    for name, value in validated[best_epoch].items():
        torch.testing.assert_close(best[name], value, rtol=0, atol=0)


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="Python 3.10 keeps a call's arguments until it returns"
)
def test_a_state_only_fit_holds_is_freed_once_fit_has_its_copy():
    """``fit(TrainState.create(...), ...)``: nothing but ``fit`` refers to the state passed
    in, so its optimizer state (and EMA) is freed when ``fit`` has made its private copy,
    and ``fit`` holds one state in memory, as a donating loop does, not two."""
    import gc
    import weakref

    import optree

    refs = []

    def fresh():
        state = make_state(ema_decay=0.9)
        leaves = [*optree.tree_leaves(state.opt_state), *state.ema.values()]
        refs.extend(weakref.ref(t) for t in leaves if isinstance(t, torch.Tensor))
        return state

    alive = []

    class Count(fl.callbacks.Callback):
        def on_train_epoch_start(self, state):
            gc.collect()
            alive.append(sum(r() is not None for r in refs))

    fl.fit(fresh(), classify, loaders(), max_epochs=1, callbacks=[Count()], log_to_console=False)
    assert len(refs) > 8 and alive == [0]


def _pointers(state):
    """Where the state's parameter-sized tensors live (step counters are new each step)."""
    return [t.data_ptr() for t in tree_leaves(state) if isinstance(t, torch.Tensor) and t.dim()]


def test_donate_trains_in_the_given_state_s_memory_to_the_same_numbers():
    """``fit(..., donate=True)`` makes no private copy: the returned state's parameters,
    moments and EMA live in the given state's tensors (so the module it was made from holds
    the trained weights too), the numbers are bit for bit those of a plain ``fit``, and the
    given state, consumed by the first step, cannot be used again."""
    run = dict(max_epochs=2, log_to_console=False)
    fresh = make_state(ema_decay=0.9)
    torch.manual_seed(5)
    plain = fl.fit(fresh, classify, loaders(), **run)
    given = make_state(ema_decay=0.9)
    module = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    pointers = _pointers(given)
    torch.manual_seed(5)
    donated = fl.fit(given, classify, loaders(), **run, donate=True)
    assert _pointers(donated) == pointers
    for a, b in zip(tree_leaves(plain), tree_leaves(donated)):
        assert torch.equal(a, b)
    assert plain.history == donated.history and (plain.step, plain.epoch) == (12, 2)
    with pytest.raises(RuntimeError, match="donat"):
        given.clone()
    # The module a state is made from shares its parameters: trained in place.
    state = fl.TrainState.create(module, tx=optim.adam(1e-2), device="cpu")
    before = module[0].weight.detach().clone()
    trained = fl.fit(state, classify, loaders(), **run, donate=True)
    assert torch.equal(module[0].weight, trained.params["0.weight"])
    assert not torch.equal(module[0].weight, before)


def test_donate_writes_a_resumed_checkpoint_into_the_given_state(tmp_path):
    """A state ``fit(..., donate=True)`` resumes from a checkpoint is copied into the given
    state's tensors (one state in memory, not the given one beside the loaded one), and
    trains on as a plain resumed ``fit`` does."""
    finals = []
    for donate in (False, True):
        out = tmp_path / str(donate)
        torch.manual_seed(3)
        fl.fit(make_state(), classify, loaders(), max_epochs=1, out_dir=out, log_to_console=False)
        given = make_state(seed=9)  # other weights: the checkpoint's are used
        pointers = _pointers(given)
        torch.manual_seed(4)
        run = dict(max_epochs=2, out_dir=out, log_to_console=False)
        final = fl.fit(given, classify, loaders(), **run, donate=donate)
        assert (_pointers(final) == pointers) is donate
        finals.append(final)
    for a, b in zip(tree_leaves(finals[0]), tree_leaves(finals[1])):
        assert torch.equal(a, b)
    assert finals[0].history == finals[1].history and finals[1].epoch == 2


def test_donate_writes_a_checkpoint_with_an_open_window_into_the_given_state(tmp_path, monkeypatch):
    """A checkpoint saved with an accumulation window open (3 batches an epoch, windows of
    2) holds gradient sums a fresh state lacks: ``fit(..., donate=True)`` still copies the
    rest into the given state's tensors, and trains on as a plain resumed ``fit`` does.
    It used to copy nothing then, training beside the given state (held twice) and
    leaving the module untrained."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no history.png to draw (time)
    step = fl.make_train_step(classify, accumulation_steps=2)
    finals = []
    for donate in (False, True):
        out = tmp_path / str(donate)
        torch.manual_seed(3)
        run = dict(out_dir=out, log_to_console=False)
        first = fl.fit(make_state(), step, loaders(32, valid=False), max_epochs=1, **run)
        assert first.micro_step == 1
        given = make_state(seed=9)
        pointers = _pointers(given)
        torch.manual_seed(4)
        final = fl.fit(given, step, loaders(32, valid=False), max_epochs=2, **run, donate=donate)
        assert final.grad_accum is None and (_pointers(final) == pointers) is donate
        finals.append(final)
    for a, b in zip(tree_leaves(finals[0]), tree_leaves(finals[1])):
        assert torch.equal(a, b)
    assert finals[0].history == finals[1].history


def test_donate_writes_a_resumed_checkpoint_into_a_cloned_state(tmp_path, monkeypatch):
    """``state.clone()`` lays each group of tensors (parameters, moments) side by side in
    one buffer: a checkpoint ``fit(..., donate=True)`` resumes is still written into
    them (it used to be written into none, any shared buffer counting as tied weights,
    so the run held two states), and trains on as a plain resumed ``fit`` does."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no history.png to draw (time)
    finals = []
    for donate in (False, True):
        out = tmp_path / str(donate)
        run = dict(out_dir=out, log_to_console=False)
        torch.manual_seed(3)
        fl.fit(make_state(), classify, loaders(32, valid=False), max_epochs=1, **run)
        given = make_state(seed=9).clone()
        pointers = _pointers(given)
        torch.manual_seed(4)
        final = fl.fit(
            given, classify, loaders(32, valid=False), max_epochs=2, **run, donate=donate
        )
        assert (_pointers(final) == pointers) is donate
        finals.append(final)
    for a, b in zip(tree_leaves(finals[0]), tree_leaves(finals[1])):
        assert torch.equal(a, b)
    assert finals[0].history == finals[1].history


def test_a_donating_fit_ended_by_ctrl_c_is_resumed_from_a_state_made_again(tmp_path, monkeypatch):
    """Run again after Ctrl-C, ``fit(state, ..., donate=True)`` gets the state the ended
    fit consumed, and returned none: the refusal says to make it again (it used to say
    "Pass the state that call returned"), and a state made again resumes."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no history.png to draw (time)

    class CtrlC(fl.callbacks.Callback):
        def on_train_batch_end(self, state, outputs, batch, batch_idx):
            if state.step == 4:
                raise KeyboardInterrupt

    run = dict(max_epochs=2, out_dir=tmp_path, log_to_console=False, donate=True)
    state = make_state()
    with pytest.raises(KeyboardInterrupt):
        fl.fit(state, classify, loaders(32), **run, callbacks=CtrlC(), checkpoint_every_n_steps=2)
    with pytest.raises(
        RuntimeError, match=r"so fit would use the wrong values.*make the state again"
    ):
        fl.fit(state, classify, loaders(32), **run)
    assert fl.fit(make_state(), classify, loaders(32), **run).step == 6


@pytest.mark.parametrize("donate", [False, True])
def test_a_donated_state_is_refused_before_fit_writes_anything(tmp_path, donate):
    """A state a donating step consumed holds a later state's tensors: ``fit`` refuses it
    at once (with ``donate=True`` it would otherwise write a checkpoint into them)."""
    state = make_state()
    step = fl.make_train_step(classify, donate=True)
    step(state, next(iter(loaders()["train"])))
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"so fit would use the wrong values"):
        fl.fit(state, classify, loaders(), max_epochs=1, out_dir=out, donate=donate)
    assert not out.exists()


def test_donate_refuses_a_state_beyond_the_checkpoint_it_would_resume_from(tmp_path):
    """A plain ``fit`` resumes the folder's older checkpoint and warns that the given
    state's further training is not used (the caller still has it); with ``donate=True``
    the checkpoint would be written into that state's tensors and its training lost, so
    ``fit`` refuses, leaving the folder and the state as they were."""
    out = tmp_path / "run"
    run = dict(log_to_console=False)
    fl.fit(make_state(), classify, loaders(), max_epochs=1, out_dir=out, **run)
    ahead = fl.fit(make_state(), classify, loaders(), max_epochs=2, **run)
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*")}
    kept = ahead.clone()
    with pytest.raises(ValueError, match=r"further training would be lost.*pass donate=False"):
        fl.fit(ahead, classify, loaders(), max_epochs=3, out_dir=out, **run, donate=True)
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*")} == before
    for a, b in zip(tree_leaves(ahead), tree_leaves(kept)):
        assert torch.equal(a, b)
