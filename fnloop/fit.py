"""``fit``: the thin driver that composes pure steps into a training run.

It owns every side effect (files, logs, progress bars, checkpoints); the steps own none.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import itertools
import logging
import math
import numbers
import os
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import torch
from tqdm.auto import tqdm

from fnloop import _tree
from fnloop import checkpoint as ckpt
from fnloop._io import remove_temporaries
from fnloop.callbacks.base import Callback, CallbackList, as_list, check_callbacks
from fnloop.callbacks.metrics_log import CSVLogger, EpochLogger, learning_rate_metrics
from fnloop.callbacks.plot import PlotHistory
from fnloop.distributed import (
    barrier,
    broadcast_state,
    gather,
    is_main_process,
    mean_grads_and_buffers,
    rank,
    world_size,
)
from fnloop.ensemble import STACKED_LOOP_FIX, check_one_model
from fnloop.epoch import BatchSize, MetricMeans, loader_length, train_epoch, validate_epoch
from fnloop.optim.plateau import has_plateau, observe_metric, plateau_nodes, restart_plateaus
from fnloop.optim.transform import learning_rates
from fnloop.state import (
    MAKE_STATE_HINT,
    StateT,
    TrainState,
    append_history,
    donated,
    history_added,
    history_growth,
)
from fnloop.step import (
    EvalStep,
    EvalStepFn,
    StepFn,
    TrainStep,
    TrainStepFn,
    _frozen,
    all_finite,
    made_step,
    make_eval_step,
)
from fnloop.stopping import EarlyStopping, EarlyStoppingState
from fnloop.typing import EpochMeans, History

Loaders = Iterable[Any] | Mapping[str, Iterable[Any] | None]

CHECKPOINT_DIR = "checkpoints"
BEST_MODEL = "best_model.pt"
LOG_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"  # the log file's lines

MONITOR_WITHOUT_VALID_MSG = (
    "{what} monitors {monitor!r} but no validation loader was given. Pass "
    "loaders={{'train': ..., 'valid': ...}} or monitor a 'train/...' metric."
)
UNKNOWN_FIT_MONITOR_MSG = (
    "the monitored metric {monitor!r} is not among the epoch's metrics {known}. Name one "
    "of them in fit(monitor=...) or EarlyStopping(monitor=...): 'valid/<metric>' or "
    "'train/<metric>' for a metric your step returns or a callback appends to the "
    "history (fl.state.append_history)."
)
EPOCH_METRICS_MSG = (
    "the epoch metrics a callback gets are read-only, so {key!r} cannot be set there. Add "
    "an epoch-level metric to the history instead: state = state.replace(history="
    "fl.state.append_history(state.history, 'valid', {{'name': value}})), returned from "
    "the callback; fit then logs, shows and monitors it as 'valid/name'."
)
HISTORY_CLASH_MSG = (
    "a callback appended {n} value(s) for {key!r} to the history at the end of this "
    "epoch, on top of what the epoch already has: an epoch-level metric gets one value "
    "per epoch, under a name of its own (not one the steps return). Rename it, or "
    "append it once."
)
# Metric names of scores where higher is better (warned about under mode="min").
_SCORE_NAME = re.compile(
    r"(?:^|[^a-z0-9])(?:acc|accuracy|f1|auc|auroc|precision|recall|iou|miou|dice|r2|bleu|"
    r"top1|top5)(?:$|[^a-z0-9])"
)
SCORE_MINIMIZED_MSG = (
    "{what} follows {monitor} with mode='min' (lower is better), the default, but the name "
    "reads like a score where higher is better: pass mode='max' (to fit or EarlyStopping) "
    "if it is one."
)
LR_CLASH_MSG = (
    "the training step returns a metric {key!r}, the name under which fit records the "
    "optimizer's learning rate (train/{key}): rename the step's metric."
)
REPEATED_VALIDATION_MSG = (
    "The valid loader's DistributedSampler repeats {n} example(s) to give every process "
    "as many: the validation metrics count them twice, and differ from one process's on "
    "the whole set. For exact metrics give each process its share without repeats, "
    "DataLoader(torch.utils.data.Subset(valid_set, range(rank, len(valid_set), world_size)), "
    "...): validation shares may differ in size."
)
DROPPED_VALIDATION_MSG = (
    "The valid loader's DistributedSampler has drop_last=True and leaves out {n} "
    "example(s) to give every process as many: the validation metrics are those of the "
    "rest of the set. For exact metrics give each process its share, "
    "DataLoader(torch.utils.data.Subset(valid_set, range(rank, len(valid_set), world_size)), "
    "...): validation shares may differ in size."
)
UNSHARDED_TRAIN_MSG = (
    "The train loader has no DistributedSampler, so each of the {world} processes trains "
    "on the whole data set every epoch: an epoch takes as long as in one process, and "
    "processes that shuffle alike train on the same batches. Give it one, "
    "DataLoader(train_set, batch_size=..., sampler=DistributedSampler(train_set)) (fit "
    "calls its set_epoch), or ignore this if its data set is this process's share."
)
SETUP_MISMATCH_MSG = (
    "fit got other settings in process {p} than in rank 0: {name} is {theirs!r} there "
    "and {ours!r} in rank 0. The processes make collective calls together (each update, "
    "the epoch means, validation, checkpoints), so pass every process the same fit "
    "arguments; validate in every process, each on its share of the set, rather than "
    "in rank 0 alone."
)
OTHER_RUN_MSG = (
    "{path} was written by the run {theirs!r} (at epoch {epoch}, step {step}), and this "
    "fit is the run {ours!r} from a state at epoch {given_epoch}, step {given_step}: "
    "resuming would train on, and return, run {theirs!r}'s model as this one. Give this "
    "run an out_dir of its own; or pass run_name={theirs!r} to continue that run; or "
    "resume=False to start over in this folder (its files are set aside)."
)
VALIDATION_STEP_UNUSED_MSG = (
    "validation_step was given but no validation loader, so no epoch is validated (the "
    "best model and the monitor follow {monitor}). Pass loaders={{'train': train_loader, "
    "'valid': valid_loader}} to validate."
)
FIT_DONATED_MSG = (
    "fit got a TrainState that a donating train step consumed (a step made with "
    "donate=True, or a fit(..., donate=True), which trains with one): its tensors now "
    "hold a later state, so fit would use the wrong values. Pass the state that the step "
    "or fit returned. A fit(..., donate=True) that an exception or Ctrl-C ended returned "
    "none: make the state again as you made it before (fl.TrainState.create(...)) and run "
    "the same fit, which resumes from the newest checkpoint in out_dir."
)
LOADER_LIST_MSG = (
    "loaders is a {kind} of {n} DataLoaders; fit takes one train loader or a mapping. "
    "Pass loaders={{'train': train_loader, 'valid': valid_loader}}."
)
# Where the iterators that a second pass finds used up come from: iter() of a list or a
# map, itertools, and iter() of a DataLoader (its _SingleProcess/_MultiProcessingDataLoaderIter).
_ONE_SHOT_ITERATOR_MODULES = ("builtins", "itertools", "torch.utils.data.dataloader")
SYMBOLIC_SIZES = "Cannot call numel() on tensor with symbolic sizes"
SYMBOLIC_SIZES_HINT = (
    "A compiled step met a batch of another shape (a last, smaller batch, or sequences of "
    "another length) and recompiled for any shape, which this model cannot run under "
    "torch.func (dropout is such an op): give the train loader drop_last=True, and pad "
    "sequences to a fixed length (docs/guide.md, section 6)."
)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _count(n: int, one: str, many: str) -> str:
    """``n`` and the noun in the number it needs.

    >>> _count(1, "update", "updates"), _count(3, "update", "updates")
    ('1 update', '3 updates')
    """
    return f"{n} {one if n == 1 else many}"


def _format_time(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{seconds:.1f}s"


def epoch_line(
    epoch: int,
    max_epochs: int,
    metrics: Mapping[str, float],
    seconds: float,
    rates: Collection[str] = (),
) -> str:
    """The epoch summary line: ``[ 15/50] loss:0.023 | (val) loss:0.019 (2m 15s)``.

    The epoch is right-aligned in at least three places; a metric shows 4 significant
    digits, as in the progress bars (``0.01815``, ``2.5e-05``). Metrics of other splits
    (a callback's ``test/acc``) follow, each split after its name. The learning rates,
    ``rates`` (keys of ``metrics``), have log lines of their own and are left out.

    >>> epoch_line(15, 50, {"train/loss": 0.023, "train/acc": 0.98125, "valid/loss": 0.019}, 135)
    '[ 15/50] loss:0.023 acc:0.9812 | (val) loss:0.019 (2m 15s)'
    >>> epoch_line(2, 5, {"train/loss": 0.5, "test/acc": 0.75}, 3)
    '[  2/5] loss:0.5 | (test) acc:0.75 (3.0s)'
    """
    width = max(3, len(str(max_epochs)))
    parts = [f"[{epoch:>{width}}/{max_epochs}]"]
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for key, value in metrics.items():
        if key in rates:
            continue
        split, _, name = key.partition("/")
        shown = f"{name}:{value:.4g}"
        splits.setdefault("val" if split == "valid" else split, []).append(shown)
    parts.append(" ".join(splits.pop("train")))
    parts += [f"| ({split}) " + " ".join(shown) for split, shown in splits.items() if shown]
    parts.append(f"({_format_time(seconds)})")
    return " ".join(p for p in parts if p)


class _TqdmHandler(logging.Handler):
    """Console handler that prints through ``tqdm.write`` so bars are not broken."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class _HeldFileHandler(logging.Handler):
    """The log file's handler, which holds the records until :meth:`open` creates or opens
    the file: a ``fit`` refused by what it finds in the run folder (another run's
    checkpoints, a ``max_epochs`` below theirs) leaves no log file there, its error being
    the record. Records held when the file never opens are dropped at :meth:`close`."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.held: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None

    def open(self) -> None:
        """Opens the file (to append) and writes the records held so far."""
        if self.file is not None:
            return
        self.file = logging.FileHandler(self.path, encoding="utf-8")
        self.file.setFormatter(logging.Formatter(LOG_FORMAT))
        held, self.held = self.held, []
        for record in held:
            self.file.handle(record)

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is None:
            self.held.append(record)
        else:
            self.file.handle(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.held = []
        super().close()


def _append_to_log(path: Path, message: str) -> None:
    """Appends one ERROR line to the log file of rank 0, formatted as its own lines, from
    another process: the file must be there already (no file on a node without the run
    folder), and a write that fails is skipped (the error being logged is what counts)."""
    record = logging.LogRecord("fnloop", logging.ERROR, "", 0, message, None, None)
    line = logging.Formatter(LOG_FORMAT).format(record) + "\n"
    try:
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND), "a", encoding="utf-8") as f:
            f.write(line)
    except OSError:
        pass


def _in_collective(error: BaseException) -> bool:
    """Whether ``error`` was raised inside ``torch.distributed`` (a collective cut off)."""
    frames = traceback.extract_tb(error.__traceback__)
    return any(f"torch{os.sep}distributed{os.sep}" in frame.filename for frame in frames)


def _drop_record(record: logging.LogRecord) -> bool:
    """A logging filter that lets no record through (the run's logger off rank 0)."""
    del record
    return False


def _open_logger(
    run_name: str, out_dir: Path | None, console: bool
) -> tuple[logging.Logger, Callable[[], None], Callable[[], None]]:
    """The run's logger with fit's handlers added (on rank 0 alone: the console's, and
    the log file's in ``out_dir``), the function that removes and closes them
    (handlers the user attached stay) and restores its ``propagate`` and level, and the
    function that opens the log file, which holds the records until then (see
    :class:`_HeldFileHandler`). The level is at most INFO meanwhile: a lower one the
    user set on it or on a parent logger (DEBUG) stays."""
    logger = logging.getLogger(f"fnloop.run.{run_name}")
    propagate, level = logger.propagate, logger.level
    logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    logger.propagate = False
    added: list[logging.Handler] = []
    log_file: _HeldFileHandler | None = None
    main = is_main_process()
    if not main:
        added.append(logging.NullHandler())
        # Handlers of the script's own, attached in every process, hear rank 0 alone too.
        logger.addFilter(_drop_record)
    else:
        if console:
            handler: logging.Handler = _TqdmHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            added.append(handler)
        if out_dir is not None:
            log_file = _HeldFileHandler(out_dir / f"{run_name}_training.log")
            added.append(log_file)
        if not logger.handlers and not added:  # not Python's last-resort handler
            added.append(logging.NullHandler())
    for handler in added:
        logger.addHandler(handler)

    def close() -> None:
        for handler in added:
            logger.removeHandler(handler)
            handler.close()
        if not main:
            logger.removeFilter(_drop_record)
        logger.propagate = propagate
        logger.setLevel(level)

    def open_file() -> None:
        if log_file is not None:
            log_file.open()

    return logger, close, open_file


def _lr_text(rate: float) -> str:
    """``0.001000`` (as the ``BaseTrainer`` logged rates), or ``2.000e-05`` below 1e-4,
    where six decimals would hide the rate and its changes.

    >>> _lr_text(5e-4), _lr_text(2e-5), _lr_text(0.0)
    ('0.000500', '2.000e-05', '0.000000')
    """
    return f"{rate:.6f}" if rate == 0 or abs(rate) >= 1e-4 else f"{rate:.3e}"


def _lrs(opt_state: Any) -> list[float]:
    """The values of :func:`learning_rate_metrics`: the rates the log lines compare."""
    return list(learning_rate_metrics(opt_state).values())


def _log_lr_changes(logger: logging.Logger, old: Sequence[float], new: Sequence[float]) -> None:
    """One line per distinct change that shows in :func:`_lr_text`; groups that changed
    alike share it."""
    changes: dict[tuple[str, str], list[int]] = {}
    for i, (a, b) in enumerate(zip(old, new)):
        texts = (_lr_text(a), _lr_text(b))
        if texts[0] != texts[1]:
            changes.setdefault(texts, []).append(i)
    for (before, after), groups in changes.items():
        change = f"{before} → {after}"
        if len(new) == 1:
            logger.info(f"Learning rate updated: {change}")
        else:
            which = ", ".join(map(str, groups))
            logger.info(f"Learning rate [group{'s' * (len(groups) > 1)} {which}] updated: {change}")


def _callback_metrics(
    state: TrainState, before: History, known: Mapping[str, float]
) -> tuple[TrainState, dict[str, float]]:
    """The epoch metrics callbacks appended to the history at an epoch-end event (one
    value per key, under names the steps do not already use), and the state.

    With several processes, rank 0's metrics in every process's history (a collective
    call): a metric computed over one process's examples would otherwise make the
    processes' plateau schedules, best models and early stopping decide apart.
    """
    for key, values in history_growth(before, state.history).items():
        if key in known or len(values) > 1:
            raise ValueError(HISTORY_CLASH_MSG.format(key=key, n=len(values)))
    if world_size() > 1:
        # By split, not by "<split>/<name>" key: a split's name may hold a "/" too.
        appended = {
            split: {n: v[-1] for n, v in metrics.items() if len(v) > len(old.get(n, ()))}
            for split, metrics in state.history.items()
            for old in [before.get(split, {})]
        }
        ours = {split: metrics for split, metrics in appended.items() if metrics}
        first = gather(ours)[0]
        if first != ours:
            history = before
            for split, metrics in first.items():
                history = append_history(history, split, metrics)
            state = state.replace(history=history)
    return state, history_added(before, state.history)


class EpochMetrics(dict[str, float]):
    """An epoch's metrics as callbacks get them: ``{"train/loss": 0.31, ...}``, read-only.

    A callback adds an epoch-level metric (an F1 score over the whole epoch) to the
    history instead, with ``state.replace(history=fl.state.append_history(state.history,
    "valid", {"f1": f1}))``: ``fit`` then shows, logs, monitors and early-stops on
    ``"valid/f1"`` like the metrics the steps return. Reading works as on a ``dict``
    (``json.dumps``, ``copy()`` and ``|`` give plain dicts).
    """

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        key = args[0] if args and isinstance(args[0], str) else "a metric"
        raise TypeError(EPOCH_METRICS_MSG.format(key=key))

    __setitem__ = __delitem__ = __ior__ = _refuse  # type: ignore[assignment]
    update = setdefault = pop = popitem = clear = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:  # copies and pickles are plain dicts
        return dict, (dict(self),)


@dataclasses.dataclass
class _Best:
    """The best monitored epoch so far and its weights (EMA weights when kept, unless the
    eval step was made with ``use_ema=False``)."""

    value: float
    epoch: int
    state_dict: dict[str, torch.Tensor] | None = None


def _as_train_step(fn: StepFn | TrainStepFn) -> tuple[Callable[..., Any], TrainStep]:
    """The callable to run and the ``TrainStep`` that describes it: a donating copy of
    the ``TrainStep`` when ``fn`` is the user's function or a made step as made (``fit``
    owns the states it makes, so each step may reuse the previous one's memory)."""
    made = made_step(fn, TrainStep)
    if made is None and made_step(fn, EvalStep) is not None:
        raise TypeError(
            "fit's training_step is an eval step (made by make_eval_step); pass your "
            "function training_step(model, batch), or a step made by make_train_step."
        )
    if made is None:  # the user's training_step(model, batch)
        made = TrainStep(cast(StepFn, fn))
    elif fn is not made and getattr(fn, "__wrapped__", None) is not made:
        return fn, made  # compiled, or in a wrapper of the user's: run as given
    if not made.donate:
        made = dataclasses.replace(made, donate=True)
    return made, made


def _as_eval_step(fn: StepFn | EvalStepFn | None, train_step: TrainStep) -> Callable[..., Any]:
    if fn is None:
        return make_eval_step(train_step.training_step, precision=train_step.precision)
    if made_step(fn, EvalStep) is not None:
        return fn
    if made_step(fn, TrainStep) is not None:
        raise TypeError(
            "fit's validation_step is a train step (made by make_train_step); pass your "
            "function validation_step(model, batch), or a step made by make_eval_step."
        )
    # Not a made step: the user's validation_step(model, batch).
    return make_eval_step(cast(StepFn, fn), precision=train_step.precision)


def _split_loaders(loaders: Loaders) -> tuple[Iterable[Any], Iterable[Any] | None]:
    if isinstance(loaders, Mapping):
        unknown = sorted(set(loaders) - {"train", "valid"})
        if unknown or "train" not in loaders:
            raise ValueError(
                f"loaders must be one train loader or a mapping with 'train' and optional "
                f"'valid' (the validation loader); got keys {sorted(loaders)}."
            )
        train = loaders["train"]
        if train is None:
            raise ValueError("loaders['train'] is None; pass a loader to train on.")
        return train, loaders.get("valid")
    if (
        isinstance(loaders, list | tuple)
        and loaders
        and all(isinstance(x, torch.utils.data.DataLoader) for x in loaders)
    ):
        raise ValueError(LOADER_LIST_MSG.format(kind=type(loaders).__name__, n=len(loaders)))
    return loaders, None


def _check_loader(loader: Iterable[Any], split: str) -> None:
    """Rejects what cannot give fit batches epoch after epoch, before anything runs."""
    data = torch.utils.data
    if isinstance(loader, str | bytes):  # a file name: iterable, by characters
        raise TypeError(
            f"the {split} loader is a {type(loader).__name__} ({loader!r}), which fit would "
            f"iterate character by character. Load the data and pass a DataLoader of it "
            f"(DataLoader(dataset, batch_size=..., shuffle={split == 'train'})), or a list "
            f"of batches."
        )
    # A map-style dataset iterates by __getitem__: single samples, and forever when
    # __getitem__ never raises IndexError. (An IterableDataset, or a dataset class with an
    # __iter__ of its own, may yield batches.)
    if isinstance(loader, data.Dataset) and getattr(type(loader), "__iter__", None) is None:
        raise TypeError(
            f"the {split} loader is a dataset ({type(loader).__name__}), which yields single "
            f"samples, not batches. Wrap it: DataLoader(dataset, batch_size=..., "
            f"shuffle={split == 'train'}); if its items are batches already, "
            f"DataLoader(dataset, batch_size=None)."
        )
    # A generator, or iter() of a list or a DataLoader: used up by the first epoch. (A
    # class of its own whose __iter__ starts over, as data-loading libraries' iterators
    # do, is fine.)
    if inspect.isgenerator(loader) or (
        isinstance(loader, Iterator) and type(loader).__module__ in _ONE_SHOT_ITERATOR_MODULES
    ):
        raise TypeError(
            f"the {split} loader is an iterator ({type(loader).__name__}), which the first "
            f"epoch would use up. Pass something fit can iterate once per epoch: a "
            f"DataLoader, or a list of batches."
        )
    lengths = [loader_length(loader)]
    if split == "valid" and world_size() > 1:
        # Each process validates its own share, which may be empty (a set smaller than
        # the number of processes): only no share at all is an error (a collective call).
        lengths = gather(lengths[0])
    if all(n == 0 for n in lengths):
        raise ValueError(
            f"the {split} loader is empty (len 0). Check the dataset length, batch_size and "
            f"drop_last."
        )


def _check_same_setup(settings: Mapping[str, Any]) -> None:
    """Raises in every process of a distributed run whose ``fit`` settings that decide
    its collective calls differ from rank 0's (a collective call; nothing outside one)."""
    if world_size() == 1:
        return
    everyone = gather(dict(settings))
    for other, theirs in enumerate(everyone[1:], start=1):
        for name, value in everyone[0].items():
            if theirs[name] != value:
                raise ValueError(
                    SETUP_MISMATCH_MSG.format(p=other, name=name, theirs=theirs[name], ours=value)
                )


def _samplers(loader: Iterable[Any] | None) -> list[Any]:
    """The loader's sampler, its batch sampler and the sampler inside that
    (``DataLoader(batch_sampler=BatchSampler(DistributedSampler(...), ...))``), each once."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    found: list[Any] = []
    for obj in (
        getattr(loader, "sampler", None),
        batch_sampler,
        getattr(batch_sampler, "sampler", None),
    ):
        if obj is not None and not any(obj is seen for seen in found):
            found.append(obj)
    return found


def _loader_generators(*loaders: Iterable[Any] | None) -> list[torch.Generator]:
    """The generators the loaders own (``DataLoader(generator=...)``, a sampler's), which
    draw their shuffle order and worker seeds: fit checkpoints them with the global ones."""
    found: list[torch.Generator] = []
    for loader in loaders:
        for obj in (loader, *_samplers(loader)):
            g = getattr(obj, "generator", None)
            if isinstance(g, torch.Generator) and not any(g is h for h in found):
                found.append(g)
    return found


def _own_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints ``fit`` wrote in ``folder``, newest first: ordered by the step in
    their names (``ckpt-<step, 10 digits>-<b|e>.pt``; at one step the epoch's end, ``e``,
    after a mid-epoch ``b``), which a copy of the run folder keeps, unlike the files'
    modification times."""
    return sorted(ckpt.find_checkpoints(folder, "ckpt-*.pt"), key=lambda p: p.name, reverse=True)


def _set_epoch(loader: Iterable[Any], epoch: int) -> None:
    """Calls ``set_epoch`` on the loader's samplers (see :func:`_samplers`)."""
    for sampler in _samplers(loader):
        set_epoch = getattr(sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)


def fit(
    state: StateT,
    training_step: StepFn | TrainStepFn,
    loaders: Loaders,
    *,
    max_epochs: int,
    validation_step: StepFn | EvalStepFn | None = None,
    early_stopping: EarlyStopping | Sequence[EarlyStopping] | None = (),
    callbacks: Callback | Sequence[Callback] = (),
    out_dir: str | os.PathLike[str] | None = None,
    run_name: str = "run",
    resume: bool = True,
    monitor: str | None = None,
    mode: Literal["min", "max"] | None = None,
    progress: bool | Literal["auto"] = "auto",
    batch_size: BatchSize = None,
    checkpoint_every_n_steps: int | None = None,
    keep_checkpoints: int = 2,
    log_to_console: bool = True,
    donate: bool = False,
) -> StateT:
    """Trains ``state`` until ``state.epoch == max_epochs`` (or early stopping).

    Each epoch runs the train loader, then the validation loader when there is one,
    records the batch-size-weighted means in ``state.history`` (``"train"`` and
    ``"valid"``, plus the learning rate under ``"train"``), feeds the monitored metric to
    a ``reduce_on_plateau`` learning rate, keeps the best weights, checks early
    stopping, logs one line per epoch and, with ``out_dir``, writes a checkpoint.

    With ``out_dir`` the run folder holds ``<run_name>_training.log``, ``metrics.csv``,
    ``checkpoints/`` (resumed from automatically), ``best_model.pt`` (a state dict for
    ``module.load_state_dict``, written at the end, or when Ctrl-C stops the run) and
    ``history.png`` when matplotlib is installed (drawn at the end, or with the finished
    epochs when an exception or Ctrl-C ends the run).

    Launched by ``torchrun`` (an initialized ``torch.distributed`` group), every process
    runs ``fit`` on its share of the data (give the train loader a ``DistributedSampler``,
    whose ``set_epoch`` is called every epoch, and each process its own share of the
    validation set): steps average gradients over the processes,
    epoch metrics are means over every process's examples, and rank 0 alone logs, shows
    bars and writes the run folder.

    Args:
      state: the state to train; a second ``fit`` continues its step, epoch and history.
      training_step: ``(model, batch) -> {"loss": ..., ...}``, or a step made by
        ``make_train_step`` (its options, such as precision, are used as made), compiled
        or in a wrapper of yours marked ``@functools.wraps(step)``.
      loaders: a train loader, or ``{"train": loader, "valid": loader}``.
      max_epochs: the epoch count to reach (on the state a ``fit`` returned,
        ``max_epochs=state.epoch + 5`` trains five more).
      validation_step: the validation function, or a step made by ``make_eval_step``;
        defaults to ``training_step``'s function. Without a validation loader it is not
        used, and the log warns.
      early_stopping: one :class:`EarlyStopping` rule or several (train and valid monitors).
      callbacks: a :class:`fnloop.callbacks.Callback` object, or several.
      out_dir: the run folder (``~`` is the home folder); ``None`` writes nothing
        (``""`` is an error: ``"."`` is the working directory).
      run_name: names the logger (``logging.getLogger(f"fnloop.run.{run_name}")``: log
        there to reach the console and the log file; in a ``torch.distributed`` run only
        rank 0's records get through; a DEBUG level set on it or a parent stays), the log
        file, and the run its checkpoints belong to: ``fit`` does not resume another run's
        checkpoints into a state that is not at their step (an error says what to pass
        instead).
      resume: continue from the newest good checkpoint in ``out_dir``: the state, the
        best model (if ``monitor`` and ``mode`` are unchanged), early-stopping progress
        (of the rules given now that are unchanged; a run that stopped early stays
        stopped unless they changed), and the random generators (global ones and the
        loaders' own). ``False`` starts over and moves the earlier checkpoints, best
        model and the files of the run's loggers in the run folder (``metrics.csv``,
        ``history.png``, ...: these copied, not moved, when ``state`` has trained epochs) to
        ``checkpoints/previous-<time>/``, as ``True`` does when the folder holds no
        checkpoint that loads.
      monitor: the metric that picks the best model and feeds ``reduce_on_plateau``;
        defaults to the monitor of a single ``early_stopping`` rule, else
        ``"valid/loss"`` with a validation loader, else ``"train/loss"``.
      mode: ``"min"`` if a lower ``monitor`` is better, ``"max"`` otherwise; defaults to
        the mode of an early-stopping rule on ``monitor``, else ``"min"`` (a warning
        names a score, such as ``acc`` or ``f1``, followed with ``"min"``). A
        ``reduce_on_plateau`` learning rate must have the same mode. A run resumed with
        another monitor or mode chooses its best model afresh and restarts its plateaus'
        counts (their learning rates are kept).
      progress: tqdm bars; ``"auto"`` shows them when stderr is a terminal.
      batch_size: a fixed size or ``batch -> size`` when the first tensor of a batch is
        not batch-major (used for weighted means).
      checkpoint_every_n_steps: also checkpoint in the middle of epochs, every this many
        optimizer steps (resumes at the right batch).
      keep_checkpoints: how many checkpoint files to keep.
      log_to_console: print log messages (the log file gets them either way).
      donate: give up ``state``: ``fit`` trains in its memory instead of a private copy,
        as a hand-written loop trains the module's own tensors, so the parameters and the
        optimizer state are held once, not twice. A state ``fit`` loads from a checkpoint
        or receives from rank 0 is copied into ``state``'s tensors when laid out alike.
        Do not use ``state`` afterwards (a step, ``clone()`` or ``fit`` of it raises once an
        eager donating step has consumed it) and take the weights from the returned state:
        the module ``state`` was made from shares its parameters, so it may change too.
        When an exception or Ctrl-C ends ``fit``, the trained state goes with it: make the
        state again and rerun; with ``out_dir``, ``fit`` resumes from the last checkpoint.

    Returns:
      The final state.

    Raises:
      TypeError: a wrong kind of argument, before anything runs or is written: a state
        that is not a ``TrainState``, a dataset or a one-shot iterator as loader, a
        callback class or non-callback, an early-stopping rule that is not one, a made
        eval step as ``training_step`` or a made train step as ``validation_step``.
      ValueError: bad set-up, reported before any training: an empty loader (one
        without ``len()``, such as a DataLoader of an IterableDataset, only when its
        epoch iterates it: ``fit`` does not iterate a loader ahead of its epoch),
        ``max_epochs`` below ``state.epoch`` or the epoch of the checkpoint to resume,
        a checkpoint to resume that another ``run_name`` wrote (unless ``state`` is at its
        step and epoch), with ``donate=True`` a state trained beyond the checkpoint to
        resume (its training would be overwritten),
        a monitor without the ``train/``/``valid/`` prefix,
        a ``valid/`` monitor without a validation loader, a ``reduce_on_plateau`` or an
        early-stopping rule on ``monitor`` whose mode is not fit's,
        ``checkpoint_every_n_steps`` without ``out_dir``, an empty string as ``out_dir``,
        two file loggers in ``callbacks`` writing one file. A ``fit`` refused by what
        ``out_dir`` holds leaves it as it was (no log file, no ``checkpoints/``).
      RuntimeError: ``state`` was consumed by a donating train step (its tensors hold a
        later state), before anything runs or is written.
      KeyError: a monitored metric is not produced (raised at the first epoch end).
      ValueError: at the first epoch end, a training-step metric under the name ``fit``
        records the learning rate by (``lr``, or ``lr_0``, ... with parameter groups).
    """
    # ------------------------------------------------------------ set-up checks (fail fast)
    if not isinstance(state, TrainState):
        hint = f" {MAKE_STATE_HINT}" if isinstance(state, torch.nn.Module) else ""
        raise TypeError(f"fit needs a TrainState first; got {type(state).__name__}.{hint}")
    for arg, value in [
        ("max_epochs", max_epochs),
        ("keep_checkpoints", keep_checkpoints),
        ("checkpoint_every_n_steps", checkpoint_every_n_steps),
    ]:
        if (value is not None or arg != "checkpoint_every_n_steps") and not _is_int(value):
            raise TypeError(f"fit's {arg} takes an int; got {value!r}.")
    if not (batch_size is None or callable(batch_size) or (_is_int(batch_size) and batch_size > 0)):
        raise ValueError(
            f"batch_size must be None (the first tensor's length), a positive int, or a "
            f"function batch -> size; got {batch_size!r}."
        )
    if max_epochs < state.epoch:
        raise ValueError(
            f"max_epochs={max_epochs} is below state.epoch={state.epoch}: fit trains until "
            f"state.epoch == max_epochs. To train more, pass max_epochs=state.epoch + n."
        )
    check_one_model(state, "fit", STACKED_LOOP_FIX)
    if donated(state):  # fit's own words: a fit that raised returned no state to pass
        raise RuntimeError(FIT_DONATED_MSG)
    train_loader, valid_loader = _split_loaders(loaders)
    _check_loader(train_loader, "train")
    step_fn, train_step = _as_train_step(training_step)
    _check_same_setup(
        {
            "valid loader given": valid_loader is not None,
            "out_dir given": out_dir is not None,
            "resume": resume,
            "max_epochs": max_epochs,
            "checkpoint_every_n_steps": checkpoint_every_n_steps,
            "accumulation_steps": train_step.accumulation_steps,
            "on_nonfinite": train_step.on_nonfinite,
        }
    )
    if valid_loader is not None:
        _check_loader(valid_loader, "valid")
    eval_step = _as_eval_step(validation_step, train_step) if valid_loader is not None else None
    user_callbacks = as_list(callbacks, Callback)
    check_callbacks(user_callbacks)
    _check_one_writer_per_file(user_callbacks)
    for cb in user_callbacks:  # a missing package, an image format: before any write
        if isinstance(cb, EpochLogger):
            cb._check_setup()
    stoppers = as_list(early_stopping, EarlyStopping)
    for rule in stoppers:
        if not isinstance(rule, EarlyStopping):
            raise TypeError(
                f"early_stopping takes fl.EarlyStopping rules; got {rule!r}. Pass e.g. "
                f"fl.EarlyStopping('valid/loss', patience=5) (mode='max' for accuracies)."
            )
    if monitor is not None and not isinstance(monitor, str):
        raise TypeError(
            f"fit's monitor takes a metric name such as 'valid/loss' or 'train/acc'; got "
            f"{monitor!r}."
        )
    if monitor is None and len(stoppers) == 1:
        monitor = stoppers[0].monitor
    monitor = monitor or ("valid/loss" if valid_loader is not None else "train/loss")
    if not monitor.startswith(("train/", "valid/")):
        name = monitor.split("/", 1)[-1]
        raise ValueError(
            f"fit monitors {monitor!r}, but fit names metrics 'train/<name>' and "
            f"'valid/<name>': pass monitor='valid/{name}' or 'train/{name}'."
        )
    # A rule on the monitored metric knows whether higher is better.
    mode = mode or next((s.mode for s in stoppers if s.monitor == monitor), "min")
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max'; got {mode!r}.")
    for rule in stoppers:
        if rule.monitor == monitor and rule.mode != mode:
            raise ValueError(
                f"EarlyStopping(monitor={monitor!r}, mode={rule.mode!r}) contradicts fit's "
                f"mode={mode!r} for the same metric: early stopping would wait for it to get "
                f"{'lower' if rule.mode == 'min' else 'higher'} while the best model is the "
                f"{'lowest' if mode == 'min' else 'highest'}. Give both the same mode "
                f"(EarlyStopping(..., mode={mode!r}) for a metric where "
                f"{'lower' if mode == 'min' else 'higher'} is better)."
            )
    for plateau in plateau_nodes(state.opt_state):
        if plateau.config.mode != mode:
            raise ValueError(
                f"reduce_on_plateau(mode={plateau.config.mode!r}) would be fed {monitor!r}, "
                f"which fit counts as better when {'lower' if mode == 'min' else 'higher'} "
                f"(mode={mode!r}). Pass reduce_on_plateau(..., mode={mode!r}), or the "
                f"monitor and mode it should follow: fit(..., monitor=..., mode=...)."
            )
    if isinstance(out_dir, str) and not out_dir:  # an unset option's default, say
        raise ValueError(
            "out_dir is an empty string, which would make the working directory the run "
            "folder: pass None to write nothing, or '.' to write there."
        )
    if checkpoint_every_n_steps is not None and out_dir is None:
        raise ValueError("checkpoint_every_n_steps needs out_dir: fit writes checkpoints there.")
    for what, name in [("fit", monitor)] + [("EarlyStopping", s.monitor) for s in stoppers]:
        if name.startswith("valid/") and valid_loader is None:
            raise ValueError(MONITOR_WITHOUT_VALID_MSG.format(what=what, monitor=name))
    if checkpoint_every_n_steps is not None and checkpoint_every_n_steps < 1:
        raise ValueError(f"checkpoint_every_n_steps must be >= 1; got {checkpoint_every_n_steps}.")
    if keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints must be >= 1; got {keep_checkpoints}.")
    if progress != "auto" and not isinstance(progress, bool):
        raise TypeError(f"progress takes True, False or 'auto'; got {progress!r}.")
    for arg, flag in [("resume", resume), ("log_to_console", log_to_console), ("donate", donate)]:
        if not isinstance(flag, bool):  # resume="no" would resume
            raise TypeError(f"fit's {arg} takes True or False; got {flag!r}.")
    if not isinstance(run_name, str) or not run_name or any(c in run_name for c in "/\\"):
        raise ValueError(
            f"run_name names the logger and the log file <run_name>_training.log in out_dir, "
            f"so it must be a non-empty string without path separators; got {run_name!r}."
        )
    main = is_main_process()  # in a torch.distributed run, rank 0 alone shows and writes
    show_bars = main and (sys.stderr.isatty() if progress == "auto" else bool(progress))

    run_dir = ckpt_dir = None
    if out_dir is not None:
        # Made (with the log file) once the run's checks of what the folder holds pass.
        run_dir = Path(out_dir).expanduser()  # "~/runs/x" is in the home folder
        ckpt_dir = run_dir / CHECKPOINT_DIR
        if main:
            # After the user's callbacks: the metrics they add to the history get logged too.
            user_callbacks = user_callbacks + _default_callbacks(run_dir, user_callbacks)
    logger, close_logger, open_log_file = _open_logger(run_name, run_dir, log_to_console)

    try:
        if validation_step is not None and valid_loader is None:
            logger.warning(VALIDATION_STEP_UNUSED_MSG.format(monitor=monitor))
        run = _Run(
            state=state,
            step_fn=step_fn,
            train_step=train_step,
            eval_step=eval_step,
            train_loader=train_loader,
            valid_loader=valid_loader,
            max_epochs=max_epochs,
            stoppers=stoppers,
            user_callbacks=user_callbacks,
            run_dir=run_dir,
            ckpt_dir=ckpt_dir,
            monitor=monitor,
            mode=mode,
            show_bars=show_bars,
            batch_size=batch_size,
            every_n_steps=checkpoint_every_n_steps,
            keep=keep_checkpoints,
            logger=logger,
            open_log_file=open_log_file,
            main=main,
            run_name=run_name,
            donate=donate,
        )
        # Only the run holds the state passed in now: a caller that keeps no reference of
        # its own (fit(TrainState.create(...), ...)) frees it once the run has its copy.
        del state
        try:
            return cast(StateT, run.run(resume=resume))  # steps keep the class
        except BaseException as e:
            # Before or after the epochs (in them, logged there): resuming, in on_fit_start,
            # writing the best model, in on_fit_end.
            if isinstance(e, Exception):
                run.log_failure(e)
            elif isinstance(e, KeyboardInterrupt):
                run.log_interrupt(" before or after the epochs")
            # Writers, runs and profilers that on_fit_end would close; a failure there
            # is logged, and the exception that ended fit is raised.
            run.callbacks.teardown(logger)
            raise
    finally:
        close_logger()


def _written_into(given: TrainState, state: TrainState) -> TrainState:
    """``state`` with its tensors copied into ``given``'s, which ``fit(..., donate=True)``
    trains in, matched by their place in the state (``opt_state.0.mu.0.weight``). A tensor
    of ``state`` that ``given`` lacks (an open accumulation window's sums, a loss scale),
    or whose match differs in shape, dtype or device, or overlaps another of ``given``'s
    tensors in memory (tied weights), is not written: ``state`` keeps its own there.
    Tensors laid out side by side in one buffer (``clone()``'s) are written."""
    if state is given:
        return state
    keys, mine, _ = _tree.tree_flatten_with_keys(given)
    their_keys, theirs, treedef = _tree.tree_flatten_with_keys(state)
    tensors = {i: m for i, m in enumerate(mine) if isinstance(m, torch.Tensor) and m.numel()}
    shared = _overlapping(tensors)
    # (A key that two leaves of either state read alike matches neither.)
    count = collections.Counter(keys) + collections.Counter(their_keys)
    place = {keys[i]: m for i, m in tensors.items() if count[keys[i]] == 2 and i not in shared}
    leaves = []
    with torch.no_grad():
        for key, t in zip(their_keys, theirs):
            m = place.get(key)
            if (
                isinstance(t, torch.Tensor)
                and m is not None
                and (m.shape, m.dtype, m.device) == (t.shape, t.dtype, t.device)
            ):
                t = m.copy_(t)
            leaves.append(t)
    return cast(TrainState, _tree.tree_unflatten(treedef, leaves))


def _overlapping(tensors: Mapping[int, torch.Tensor]) -> set[int]:
    """The keys of the (non-empty) ``tensors`` whose memory overlaps another's: the same
    tensor twice (tied weights), or views that share elements; not views side by side in
    one buffer."""
    spans: list[tuple[int, int, int, int]] = []
    for i, t in tensors.items():
        start = int(t.storage_offset())
        end = start + 1 + sum((int(n) - 1) * abs(step) for n, step in zip(t.shape, t.stride()))
        size = t.element_size()
        spans.append((t.untyped_storage().data_ptr(), start * size, end * size, i))
    spans.sort()
    shared: set[int] = set()
    reach: dict[int, int] = {}  # per buffer: the furthest end of the spans before
    for n, (buffer, start, end, i) in enumerate(spans):
        after = spans[n + 1] if n + 1 < len(spans) else None
        if start < reach.get(buffer, start) or (
            after is not None and after[0] == buffer and after[1] < end
        ):
            shared.add(i)
        reach[buffer] = max(reach.get(buffer, end), end)
    return shared


def _one_model(means: EpochMeans) -> dict[str, float]:
    """An epoch's means in ``fit``, which trains one model (it refuses a stacked state, and
    its ``MetricMeans`` are made without ``models``): a float per name, never a list."""
    return cast(dict[str, float], means)


def _summed_means(parts: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """One ``MetricMeans`` state dict holding the sums and counts of several."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    dropped: dict[str, torch.Tensor] = {}
    outputs: set[str] = set()
    for part in present:
        for k, v in part["sums"].items():
            sums[k] = sums[k] + v if k in sums else v
            counts[k] = counts.get(k, 0) + int(part["counts"][k])
        for k, v in part.get("dropped", {}).items():
            dropped[k] = dropped[k] + v if k in dropped else v
        outputs.update(part.get("outputs", ()))
    return {"sums": sums, "counts": counts, "dropped": dropped, "outputs": sorted(outputs)}


def _holds_weights(path: Path, weights: Mapping[str, Any]) -> bool:
    """Whether the state dict file ``path`` holds exactly ``weights`` (False when it is
    missing or cannot be read, or holds extra state that does not compare equal)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # missing, damaged, or not a state dict: write it afresh
        return False
    return (
        isinstance(saved, dict)
        and saved.keys() == weights.keys()
        and all(_same_entry(saved[k], w) for k, w in weights.items())
    )


def _same_entry(saved: Any, value: Any) -> bool:
    """Whether a state dict file's entry is ``value``: a tensor of its dtype and values,
    or extra state (get_extra_state) equal to it; what cannot be compared is not."""
    if isinstance(value, torch.Tensor):
        return (
            isinstance(saved, torch.Tensor)
            and saved.dtype == value.dtype
            and torch.equal(saved, value.detach().cpu())
        )
    try:
        return type(saved) is type(value) and bool(saved == value)
    except Exception:  # (tensors inside extra state: ambiguous truth values)
        return False


def _default_callbacks(run_dir: Path, given: Sequence[Callback]) -> list[Callback]:
    """The loggers ``fit`` adds for ``run_dir``, less those of a file that one of the
    ``given`` callbacks already writes (two writers of one ``metrics.csv`` would drop and
    double its rows)."""
    taken = {_resolved(getattr(cb, "path", None)) for cb in given} - {None}
    defaults: list[Callback] = [CSVLogger(run_dir / "metrics.csv")]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        defaults.append(PlotHistory(run_dir / "history.png"))
    return [cb for cb in defaults if _resolved(cast(Any, cb).path) not in taken]


def _check_one_writer_per_file(callbacks: Sequence[Callback]) -> None:
    """Raises ``ValueError`` when two of fnloop's file loggers in ``callbacks`` write one
    file: the second would truncate the first's rows or write each row twice."""
    writers: dict[Path, Callback] = {}
    for cb in callbacks:
        if not isinstance(cb, EpochLogger):  # (PlotHistory is one)
            continue
        path = _resolved(getattr(cb, "path", None))
        if path is None:
            continue
        if path in writers:
            first = writers[path]
            same = "the same callback object twice" if first is cb else "two callbacks"
            raise ValueError(
                f"callbacks holds {same} writing {path} ({type(first).__name__} and "
                f"{type(cb).__name__}): the file would get each row twice or lose rows. "
                f"Keep one, or give each its own file."
            )
        writers[path] = cb


def _resolved(path: Any) -> Path | None:
    """``path`` made absolute, or None when it is not a file name (a callback's ``path``
    may be anything)."""
    try:
        return Path(path).resolve()
    except (TypeError, OSError):
        return None


def _window_mean(state: TrainState) -> TrainState:
    """The state to save while an accumulation window is open in several processes: the
    gradient sums and the running statistics averaged over them. Both enter the next
    update linearly, so every process continues from the mean exactly (up to rounding).
    Otherwise ``state`` itself."""
    if state.grad_accum is None or world_size() == 1:
        return state
    frozen = _frozen(state.module)
    grads, buffers, _, _ = mean_grads_and_buffers(state.grad_accum, state.buffers, frozen)
    return state.replace(grad_accum=grads, buffers=buffers)


class _MidEpochCheckpoints(Callback):
    """Internal: writes a checkpoint every N optimizer steps inside an epoch."""

    def __init__(self, run: _Run, every: int) -> None:
        self.run = run
        self.every = every
        self.last_step = -1
        self.warned = False

    def on_train_batch_end(
        self, state: TrainState, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if state.step % self.every != 0 or state.step == self.last_step or state.micro_step:
            return
        self.last_step = state.step
        run = self.run
        if run.train_step.on_nonfinite != "skip":
            # A diverged epoch ends the run at its end: its checkpoints would replace the
            # good ones (and a re-run would resume from them).
            loss = _one_model(run.means.means(all_processes=True)).get("loss", 0.0)
            if run.diverged(state, loss):
                if not self.warned:
                    self.warned = True
                    run.logger.warning(
                        f"Not checkpointing at step {state.step}: the epoch's training loss "
                        f"is {loss}, or the weights are not finite. The last good checkpoint "
                        f"is kept."
                    )
                return
        run.save(state, position=batch_idx + 1)


@dataclasses.dataclass
class _Run:
    """One call of ``fit``: the mutable bookkeeping the driver keeps between epochs."""

    state: TrainState
    step_fn: Callable[..., Any]
    train_step: TrainStep
    eval_step: Callable[..., Any] | None
    train_loader: Iterable[Any]
    valid_loader: Iterable[Any] | None
    max_epochs: int
    stoppers: list[EarlyStopping]
    user_callbacks: list[Callback]
    run_dir: Path | None
    ckpt_dir: Path | None
    monitor: str
    mode: str
    show_bars: bool
    batch_size: BatchSize
    every_n_steps: int | None
    keep: int
    logger: logging.Logger
    open_log_file: Callable[[], None]
    main: bool
    run_name: str
    donate: bool
    stopper_states: list[EarlyStoppingState] = dataclasses.field(init=False)
    best: _Best | None = None
    stop_reason: str = ""
    epoch_rng: dict[str, Any] | None = None
    # The learning rates and skipped-update count at the epoch's start, for its log lines.
    epoch_start: dict[str, Any] | None = None
    # The epoch's running means (a mid-epoch checkpoint holds them).
    means: MetricMeans = dataclasses.field(init=False)
    callbacks: CallbackList = dataclasses.field(init=False)
    # The callbacks that write one row per epoch: fit tells them how far the run got.
    epoch_loggers: list[EpochLogger] = dataclasses.field(init=False)
    generators: list[torch.Generator] = dataclasses.field(init=False)
    epochs_run: int = 0
    failure_logged: bool = False
    run_dir_open: bool = False  # see open_run_dir
    # Old checkpoints whose delete failed (warned about once; not counted as kept).
    undeletable: set[Path] = dataclasses.field(default_factory=set)

    def __post_init__(self) -> None:
        extra: list[Callback] = []
        if self.every_n_steps is not None:  # fit checked that out_dir is given
            extra.append(_MidEpochCheckpoints(self, self.every_n_steps))
        # Last: a mid-epoch checkpoint holds the state the user's callbacks returned.
        self.callbacks = CallbackList([*self.user_callbacks, *extra])
        self.epoch_loggers = [cb for cb in self.callbacks.callbacks if isinstance(cb, EpochLogger)]
        self.stopper_states = [s.init() for s in self.stoppers]
        self.means = MetricMeans(finite_only=self.train_step.on_nonfinite == "skip")
        self.generators = _loader_generators(self.train_loader, self.valid_loader)

    # ------------------------------------------------------------------ checkpoints
    def rng_state(self) -> dict[str, Any]:
        """The global generators' states and those of the loaders' own generators."""
        return {**ckpt.rng_state(), "loaders": [g.get_state() for g in self.generators]}

    def set_rng_state(self, saved: Mapping[str, Any]) -> None:
        ckpt.set_rng_state(saved)
        states = saved.get("loaders")
        if states is None:
            return
        if len(states) != len(self.generators):
            self.logger.warning(
                f"The checkpoint holds the states of {len(states)} loader generators and "
                f"the loaders now have {len(self.generators)}: they keep their own seeds, so "
                f"the shuffle order will not repeat the interrupted run's."
            )
            return
        for g, st in zip(self.generators, states):
            g.set_state(torch.as_tensor(st).cpu().to(torch.uint8))

    def record(self, position: int | None, ranks: list[dict[str, Any]]) -> dict[str, Any]:
        """The driver's part of a checkpoint: everything needed to continue bit-exactly.

        ``ranks`` holds each process's own part (see :meth:`local_record`); the top-level
        copy of rank 0's is what a run with another number of processes falls back to.
        """
        best = None
        if self.best is not None:
            best = {
                "value": self.best.value,
                "epoch": self.best.epoch,
                "state_dict": self.best.state_dict,
                "monitor": self.monitor,
                "mode": self.mode,
            }
        return {
            "stoppers": [dataclasses.asdict(s) for s in self.stopper_states],
            "stopper_rules": [dataclasses.asdict(r) for r in self.stoppers],
            "best": best,
            "monitor": self.monitor,  # what fed reduce_on_plateau
            "mode": self.mode,
            "stop_reason": self.stop_reason,
            "position": position,
            "run_name": self.run_name,
            **ranks[0],
            "ranks": ranks if len(ranks) > 1 else None,
        }

    def local_record(self, position: int | None) -> dict[str, Any]:
        """This process's part of a checkpoint: its generators' states and, mid-epoch, the
        epoch's generators and counts at its start, its length and its partial means (CPU
        tensors)."""
        means = None
        if position is not None:
            means = self.means.state_dict()
            for part in ("sums", "dropped"):
                means[part] = {k: v.cpu() for k, v in means[part].items()}
        return {
            "epoch_rng": self.epoch_rng if position is not None else None,
            "epoch_start": self.epoch_start if position is not None else None,
            # What ``position`` counts: resuming it in an epoch of another length skips
            # batches that are not the ones the run trained on.
            "epoch_batches": loader_length(self.train_loader) if position is not None else None,
            "means": means,
            "rng": self.rng_state(),
        }

    def save(self, state: TrainState, position: int | None) -> None:
        if self.ckpt_dir is None:
            return
        # Every process takes part (collectives): its own record goes into rank 0's file.
        ranks = gather(self.local_record(position))
        state = _window_mean(state)
        if self.main:
            kind = "b" if position is not None else "e"
            path = self.ckpt_dir / f"ckpt-{state.step:010d}-{kind}.pt"
            ckpt.save_checkpoint(path, state, fit=self.record(position, ranks))

            # An epoch that ended on a mid-epoch checkpoint's step supersedes that one.
            old = [path.with_name(f"ckpt-{state.step:010d}-b.pt")] if kind == "e" else []
            # Only files of earlier steps make way: a newer one that the run did not resume
            # from (damaged, skipped) must not push out the good checkpoints it writes.
            earlier = [
                p
                for p in _own_checkpoints(self.ckpt_dir)
                if p.name <= path.name and p not in old and p not in self.undeletable
            ]
            for p in old + earlier[self.keep :]:
                self.delete_checkpoint(p)
        barrier()  # no process reads the folder (a restart after a crash) while rank 0 writes

    def delete_checkpoint(self, path: Path) -> None:
        """Deletes an old checkpoint; a failure is a warning (once per file): the new
        checkpoint is written, and a resume takes the newest good one."""
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            self.undeletable.add(path)
            self.logger.warning(
                f"Could not delete the old checkpoint {path} ({e}); it stays. Delete it "
                f"by hand to free its space."
            )

    def restore(self) -> tuple[int | None, dict[str, Any] | None]:
        """Resumes from the newest good checkpoint; returns the batch position and RNG."""
        if self.ckpt_dir is None:
            return None, None
        try:
            found, skipped = ckpt.first_good_checkpoint(_own_checkpoints(self.ckpt_dir), self.state)
        except ckpt.CheckpointMismatchError as e:
            raise ckpt.CheckpointMismatchError(
                f"{self.ckpt_dir} holds checkpoints of another model or optimizer than the "
                f"state given to fit. Pass resume=False to start over there (the files move "
                f"to a folder of their own), use another out_dir, or make the state as the "
                f"run that wrote them did. What differs (`like` is the state given to fit): "
                f"{e}"
            ) from e
        for item in skipped:
            self.logger.warning(f"Skipping damaged checkpoint {item.path}: {item.reason}")
        if found is None:
            # An earlier run's files with no checkpoint to go on from (all damaged, or
            # deleted): this run starts over, and would overwrite its best model.
            self.refuse_meta()
            barrier()  # every process has read the folder before rank 0 changes it
            self.open_run_dir()
            self.set_aside_checkpoints("no usable checkpoint to resume from")
            return None, None
        given = self.state
        rec = found.extra.get("fit", {})
        theirs = rec.get("run_name", self.run_name)  # (0.1.0 checkpoints do not say)
        at = (found.state.step, found.state.epoch)
        if theirs != self.run_name and (given.step, given.epoch) != at:
            raise ValueError(
                OTHER_RUN_MSG.format(
                    path=found.path,
                    theirs=theirs,
                    ours=self.run_name,
                    epoch=found.state.epoch,
                    step=found.state.step,
                    given_epoch=given.epoch,
                    given_step=given.step,
                )
            )
        if (given.step > found.state.step or given.epoch > found.state.epoch) and self.donate:
            raise ValueError(
                f"fit(..., donate=True) got a state at epoch {given.epoch}, step "
                f"{given.step}, beyond {found.path} (epoch {found.state.epoch}, step "
                f"{found.state.step}), which it would resume from, into the given state's "
                f"tensors: the given state's further training would be lost. To go on from "
                f"the given state, pass resume=False (the folder's earlier files are set "
                f"aside) or another out_dir; to resume from the checkpoint and keep the given "
                f"state, pass donate=False."
            )
        if given.step > found.state.step or given.epoch > found.state.epoch:
            self.logger.warning(
                f"fit got a state at epoch {given.epoch}, step {given.step}, beyond "
                f"{found.path} (epoch {found.state.epoch}, step {found.state.step}), which "
                f"it resumes from: the given state's further training is not used. To go on "
                f"from the given state, pass resume=False (the folder's earlier files are "
                f"set aside) or another out_dir."
            )
        elif given.step > 0 and (given.step, given.epoch) == at:
            rates = [lr.tolist() for lr in learning_rates(given.opt_state)]
            if rates != [lr.tolist() for lr in learning_rates(found.state.opt_state)]:
                self.logger.warning(
                    f"fit got a state whose learning rates ({rates}) differ from those of "
                    f"{found.path}, at the same step, which it resumes from: the checkpoint's "
                    f"are used. To train on with the given state's, pass resume=False (the "
                    f"folder's earlier files are set aside), or set them in a callback's "
                    f"on_fit_start (optim.with_learning_rates)."
                )
        self.state = found.state
        ranks = rec.get("ranks") or [rec]  # one process wrote its part at the top level
        if len(ranks) == world_size():
            rec = {**rec, **ranks[rank()]}  # this process's generators and partial means
        else:
            self.logger.warning(
                f"{found.path} was written by {_count(len(ranks), 'process', 'processes')} "
                f"and this run has {world_size()}: every process continues with rank 0's "
                f"random generators, so the run will not repeat an uninterrupted one."
            )
            # The partial epoch means of every saved process, counted once: on rank 0.
            parts = [r.get("means") for r in ranks]
            rec = {**rec, "means": _summed_means(parts) if rank() == 0 else None}
        position = rec.get("position")
        where = f"epoch {self.state.epoch}, step {self.state.step}"
        if position is not None:
            where += f", batch {position} of epoch {self.state.epoch + 1}"
        if self.state.epoch > self.max_epochs or (
            self.state.epoch == self.max_epochs and position is not None
        ):
            raise ValueError(
                f"max_epochs={self.max_epochs}, but {found.path} is at {where}: fit trains "
                f"until state.epoch == max_epochs. Pass max_epochs >= "
                f"{self.state.epoch + (position is not None)} to continue that run, or "
                f"resume=False (or another out_dir) to start over."
            )
        self.logger.info(f"Resumed from {found.path} ({where})")  # before what it restores
        if len(ranks) == world_size():  # (another number of processes is warned about)
            self.warn_other_epoch_length(found.path, rec)
        self.restore_stoppers(rec)
        if self.state.epoch < self.max_epochs and not self.stop_reason:  # training goes on
            self.warn_persistent_workers()
        self.restore_best(rec.get("best"))
        self.restore_plateaus(rec)
        if position is not None:
            self.epoch_rng = rec.get("epoch_rng")
            self.epoch_start = rec.get("epoch_start")
            if rec.get("means") is not None:
                self.means.load_state_dict(rec["means"])
        return position, rec.get("rng")

    def warn_other_epoch_length(self, path: Path, rec: Mapping[str, Any]) -> None:
        """Warns when a mid-epoch checkpoint counted its position in an epoch of another
        length than the train loader's now (another batch size, data set or sampler)."""
        position, saved = rec.get("position"), rec.get("epoch_batches")
        if position is None or saved is None:
            return  # (an epoch-end or older checkpoint)
        # The length of the epoch being resumed, which a sampler's set_epoch may set (a
        # curriculum), as it was when the checkpoint counted it.
        _set_epoch(self.train_loader, self.state.epoch)
        now = loader_length(self.train_loader)
        if now is None or saved == now:  # (None: a loader of unknown length)
            return
        self.logger.warning(
            f"{path} was saved after batch {position} of an epoch of {saved} batches, and "
            f"the train loader now has {now} per epoch (another batch size, data set or "
            f"sampler?): the resumed epoch skips its first {min(position, now)} batches, "
            f"which are not the ones the run trained on, so some of its examples are "
            f"trained on twice and others not at all. Resume with the loader the run was "
            f"saved with to train the epoch as an uninterrupted run would."
        )

    def restore_best(self, best: Mapping[str, Any] | None) -> None:
        """The checkpoint's best model, if it was chosen by this run's monitor and mode."""
        if best is None:
            return
        # (Checkpoints of fnloop 0.1.0 do not say what their best was measured by.)
        monitor, mode = best.get("monitor", self.monitor), best.get("mode", self.mode)
        if (monitor, mode) == (self.monitor, self.mode):
            self.best = _Best(best["value"], best["epoch"], best["state_dict"])
        else:
            self.logger.info(
                f"The best model is chosen afresh: this run monitors {self.monitor} "
                f"(mode={self.mode!r}), the checkpoint's best was by {monitor} "
                f"(mode={mode!r})."
            )

    def restore_plateaus(self, rec: Mapping[str, Any]) -> None:
        """Restarts the ``reduce_on_plateau`` progress (best, bad epochs) of a checkpoint
        whose plateaus followed another metric or mode: their best would be compared
        with values of another metric. Their learning rates are kept."""
        # A checkpoint that does not say (written before it did) has its best model's
        # monitor and mode, which fed the plateaus too; the earliest ones have neither.
        best = rec.get("best") or {}
        fed = (
            rec.get("monitor", best.get("monitor", self.monitor)),
            rec.get("mode", best.get("mode", self.mode)),
        )
        if fed == (self.monitor, self.mode) or not has_plateau(self.state.opt_state):
            return
        self.state = self.state.replace(opt_state=restart_plateaus(self.state.opt_state))
        self.logger.info(
            f"reduce_on_plateau starts counting afresh: this run feeds it {self.monitor} "
            f"(mode={self.mode!r}), the checkpoint's was fed {fed[0]} (mode={fed[1]!r}); "
            f"its learning rate is kept."
        )

    def restore_stoppers(self, rec: Mapping[str, Any]) -> None:
        """The checkpoint's early-stopping progress for the rules given now: a rule that is
        new or changed (another patience, say) starts counting afresh, and the run stops
        at once only if one of the rules given now had asked to stop."""
        saved = [EarlyStoppingState(**s) for s in rec.get("stoppers", [])]
        rules = rec.get("stopper_rules")
        if rules is None:  # a checkpoint of fnloop 0.1.0: rules matched by position
            rules = [dataclasses.asdict(r) for r in self.stoppers]
            if len(saved) != len(rules):
                saved, rules = [], []
        unused = list(zip(rules, saved))
        states = []
        for rule in self.stoppers:
            config = dataclasses.asdict(rule)
            match = next((i for i, (r, _) in enumerate(unused) if r == config), None)
            if match is None:
                states.append(rule.init())
                if saved:
                    self.logger.info(f"{rule} is new or changed: it starts counting now.")
            else:
                states.append(unused.pop(match)[1])
        self.stopper_states = states
        self.stop_reason = "; ".join(st.stop_reason for st in states if st.should_stop)

    # ------------------------------------------------------------------ the loop
    def refuse_meta(self) -> None:
        """Raises for a state on the meta device (one without params raises here too)."""
        if self.state.device.type == "meta":
            raise ValueError(
                "fit got a state on the meta device, which holds no values, and found no "
                "checkpoint in out_dir to load into it. Make the state on the device to "
                "train on (TrainState.create(..., device=...)), or load a checkpoint first."
            )

    def open_run_dir(self) -> None:
        """Makes the run folder and its checkpoints/ (rank 0), removes what an earlier
        run killed while writing left there, and opens the log file with the records
        held so far. Called once the checks of what the folder holds pass, before
        anything in it changes: a ``fit`` refused by them leaves the folder as it was."""
        if self.run_dir_open:
            return
        self.run_dir_open = True
        if self.ckpt_dir is not None and self.main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            for folder in (self.ckpt_dir.parent, self.ckpt_dir):
                remove_temporaries(folder)
        self.open_log_file()

    def run(self, *, resume: bool) -> TrainState:
        given = self.state
        if not resume:
            self.refuse_meta()  # before the earlier run's files are set aside
            self.open_run_dir()
            self.set_aside_checkpoints("resume=False")
        position, rng = self.restore() if resume else (None, None)
        self.refuse_meta()
        self.open_run_dir()
        # Data parallelism starts from one state: rank 0's (a copy, so never the caller's).
        # An open accumulation window in every process holds each process's own sums:
        # their mean goes on. Open in some only (a state that rank 0 alone loaded), the
        # processes cannot average it (a collective call): rank 0's goes on, as it is.
        open_everywhere = all(gather(self.state.grad_accum is not None))
        self.state = broadcast_state(_window_mean(self.state) if open_everywhere else self.state)
        if self.donate:  # the caller gave the state up: train in its memory
            self.state = _written_into(given, self.state)
        elif self.state is given and self.train_step.donate:
            # One private copy: the steps then write into it, never into the caller's state.
            self.state = given.clone()
        del given  # (not kept: see fit)
        for epoch_logger in self.epoch_loggers:
            epoch_logger._track_epochs(resumable=self.ckpt_dir is not None)
        self.warn_uneven_validation()
        self.warn_unsharded_train()
        self.warn_scores_minimized()
        state = self.callbacks("on_fit_start", self.state)
        if state.opt_state is not self.state.opt_state:  # a callback set another rate, say
            _log_lr_changes(self.logger, _lrs(self.state.opt_state), _lrs(state.opt_state))
        if state.epoch < self.max_epochs and not self.stop_reason:
            self.start_persistent_workers()  # after on_fit_start, which may set up the data
        if rng is not None and position is None:  # after on_fit_start, which may draw
            self.set_rng_state(rng)
        if self.stop_reason:
            self.logger.info(
                f"Training had stopped early: {self.stop_reason}. To train on, change the "
                f"early-stopping rules (or pass early_stopping=None)."
            )
        start = time.monotonic()
        try:
            while state.epoch < self.max_epochs and not self.stop_reason:
                state = self.one_epoch(state, position, rng)
                self.epochs_run += 1
                position, rng = None, None
        except KeyboardInterrupt:
            self.log_interrupt(f" in epoch {state.epoch + 1}")
            # Ctrl-C is how a run is ended early by hand: best_model.pt then holds the best
            # of the finished epochs, not an earlier fit's (or nothing).
            try:
                self.export_best(state)
            except Exception as e:  # the interrupt, not a failed write, is what ends fit
                self.logger.error(f"Could not write the best model: {type(e).__name__}: {e}")
            raise
        except Exception as e:  # the log file then says why the run ended
            self.log_failure(e, f" in epoch {state.epoch + 1}")
            raise
        # Before on_fit_end: a callback there may use best_model.pt (upload it), and one
        # that raises there does not cost the run its best model.
        self.export_best(state)
        state = self.callbacks("on_fit_end", state)
        self.logger.info(
            f"Finished at epoch {state.epoch}, step {state.step} "
            f"({_format_time(time.monotonic() - start)})"
        )
        # Rank 0 wrote the best model and on_fit_end's files after the last checkpoint:
        # when fit returns, every process finds the run folder complete.
        barrier()
        return state

    def start_persistent_workers(self) -> None:
        """Starts the workers of the loaders that keep them between epochs, before any
        random state is restored or recorded. Started, they draw their base seed from the
        loader's generator (the global one without) once: at a resumed run's first epoch,
        after the restore, that draw would shift its shuffle order (and the global stream)
        from the uninterrupted run's, where it came before the epoch's state was saved."""
        for loader in (self.train_loader, self.valid_loader):
            if (
                isinstance(loader, torch.utils.data.DataLoader)
                and loader.persistent_workers
                and loader._iterator is None  # (running since an earlier fit: drew already)
            ):
                # DataLoader's own: a subclass's __iter__ may be a generator, which starts
                # nothing until the epoch. The batches it prefetches are dropped then.
                torch.utils.data.DataLoader.__iter__(loader)

    def warn_persistent_workers(self) -> None:
        """Warns, on resuming, about loaders whose workers outlive an epoch: their random
        generators are not checkpointed."""
        for split, loader in (("train", self.train_loader), ("valid", self.valid_loader)):
            if getattr(loader, "persistent_workers", False):
                self.logger.warning(
                    f"The {split} loader keeps its worker processes between epochs "
                    f"(persistent_workers=True): their random generators are not in the "
                    f"checkpoint, so randomness in them (data augmentation) will not repeat "
                    f"an uninterrupted run. Make it with persistent_workers=False for a "
                    f"bit-exact resume."
                )

    def warn_scores_minimized(self) -> None:
        """Warns when the monitor or an early-stopping rule follows a metric named like a
        score (an accuracy, F1, AUC, ...) with ``mode="min"``, the default: the best model
        would be the worst epoch, and early stopping would wait for the score to drop."""
        followed = [("fit", self.monitor, self.mode)]
        followed += [(repr(rule), rule.monitor, rule.mode) for rule in self.stoppers]
        for what, monitor, mode in followed:
            if mode == "min" and _SCORE_NAME.search(monitor.split("/", 1)[-1].lower()):
                self.logger.warning(SCORE_MINIMIZED_MSG.format(what=what, monitor=monitor))

    def warn_uneven_validation(self) -> None:
        """Warns when the validation loader's ``DistributedSampler`` evens out the
        processes' shares: padded with repeated examples, which the validation metrics
        then count twice, or (``drop_last=True``) cut, leaving examples out."""
        loader = self.valid_loader
        for sampler in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
            sampler = getattr(sampler, "sampler", sampler)  # (inside a BatchSampler)
            if not isinstance(sampler, torch.utils.data.DistributedSampler):
                continue
            extra = sampler.total_size - len(sampler.dataset)  # type: ignore[arg-type]
            if extra:
                msg = REPEATED_VALIDATION_MSG if extra > 0 else DROPPED_VALIDATION_MSG
                self.logger.warning(msg.format(n=abs(extra)))
                return

    def warn_unsharded_train(self) -> None:
        """Warns, with several processes, when the train loader is a ``DataLoader`` over
        a map-style data set and no sampler of it shards (a ``DistributedSampler``, or
        one of its own with ``num_replicas`` and ``rank``); a ``Subset`` is taken for this
        process's share, as the guide makes them."""
        loader, data = self.train_loader, torch.utils.data
        if world_size() == 1 or not isinstance(loader, data.DataLoader):
            return
        if isinstance(loader.dataset, data.IterableDataset | data.Subset):
            return
        for sampler in _samplers(loader):
            if hasattr(sampler, "num_replicas") and hasattr(sampler, "rank"):
                return
        self.logger.warning(UNSHARDED_TRAIN_MSG.format(world=world_size()))

    def set_aside_checkpoints(self, why: str) -> None:
        """Starting over: an earlier run's checkpoints and best model, and the files of
        the run's loggers in the run folder (metrics.csv, history.png, a JSON lines
        log), go to a subfolder, the logs at their place relative to the run folder:
        kept, but neither pruned with this run's nor resumed from, and the new run's logs
        start empty instead of dropping the earlier rows (for a state with trained epochs
        the logs are copied, and keep the rows of those epochs). ``why`` starts the log
        line that says where they went."""
        if self.run_dir is None or self.ckpt_dir is None or not self.main:
            return
        old = {p: Path(p.name) for p in ckpt.find_checkpoints(self.ckpt_dir, "ckpt-*.pt")}
        if (self.run_dir / BEST_MODEL).exists():
            old[self.run_dir / BEST_MODEL] = Path(BEST_MODEL)
        run_dir = self.run_dir.resolve()
        logs = {}  # file -> where it goes, under the folder set aside
        for epoch_logger in self.epoch_loggers:
            path = _resolved(getattr(epoch_logger, "path", None))
            if path is not None and path.is_file() and path.is_relative_to(run_dir):
                logs[path] = path.relative_to(run_dir)
        if not old and not logs:
            return
        stamp = time.strftime("previous-%Y%m%d-%H%M%S")
        aside = self.ckpt_dir / stamp
        for i in itertools.count(1):
            try:
                aside.mkdir()
                break
            except FileExistsError:
                aside = self.ckpt_dir / f"{stamp}-{i}"
        for path, to in [*old.items(), *logs.items()]:
            (aside / to).parent.mkdir(parents=True, exist_ok=True)
            if path in logs and self.state.epoch > 0:
                shutil.copy2(path, aside / to)  # a trained state goes on: its rows stay
            else:
                path.rename(aside / to)
        self.logger.info(f"{why}: set the earlier run's files aside in {aside}")

    def resume_hint(self, failed: bool = False) -> str:
        """How to go on after an interrupt, or after an error (``failed``), which a rerun
        repeats unless its cause is gone (a bug in a step or callback, bad data)."""
        if self.ckpt_dir is None:
            return "No checkpoint was written (fit checkpoints only with out_dir)."
        found = _own_checkpoints(self.ckpt_dir)
        if not found:
            return "No checkpoint was written yet: running the same fit again starts over."
        # The file a resume would take: the newest that is an fnloop checkpoint by its
        # wrapper, read by mapping the file (cheap at any size). Its checksum is checked
        # by the resume alone (that reads the whole file): a file damaged inside passes.
        usable = None
        for path in found:
            try:
                wrapper = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # empty, cut short, not a PyTorch file
                continue
            if isinstance(wrapper, dict) and wrapper.get("format") == ckpt.FORMAT:
                usable = path
                break
        if usable is None:
            return (
                f"No usable checkpoint in {self.ckpt_dir} (the files there are damaged): "
                f"running the same fit again sets them aside and starts over."
            )
        damaged = [p.name for p in found[: found.index(usable)]]
        skipped = f" (the newer {', '.join(damaged)}: damaged)" if damaged else ""
        run = "Once the cause is fixed, run" if failed else "Run"
        return f"{run} the same fit again to resume from {usable}{skipped}."

    def log_interrupt(self, where: str) -> None:
        """Says in the log that Ctrl-C ended the run (once), and how to go on."""
        if not self.failure_logged:
            self.failure_logged = True
            self.logger.warning(f"Interrupted{where}. {self.resume_hint()}")

    def log_failure(self, error: Exception, where: str = "") -> None:
        """Says in the log why the run ended (once), and, in an epoch, how to go on."""
        if not self.failure_logged:
            self.failure_logged = True
            hint = f" {self.resume_hint(failed=True)}" if where and self.main else ""
            if SYMBOLIC_SIZES in str(error):
                hint = f" {SYMBOLIC_SIZES_HINT}{hint}"
                if hasattr(error, "add_note"):  # Python 3.11+: the traceback shows it too
                    error.add_note(SYMBOLIC_SIZES_HINT)
            # str() of a KeyError is the repr of its key: fnloop's messages would be quoted.
            args = error.args
            keyed = isinstance(error, KeyError) and len(args) == 1 and isinstance(args[0], str)
            message = (args[0] if keyed else str(error)).rstrip(".")
            detail = f": {message}." if message else "."
            line = f"Stopped by {type(error).__name__}{where}{detail}"
            if self.main:
                self.logger.error(f"{line}{hint}")
            elif self.run_dir is not None and not _in_collective(error):
                # The cause of a failure in another process: rank 0 only sees a collective
                # cut off ("Connection closed by peer"), so that process says why itself
                # (not when its own collective was cut off: rank 0 failed first).
                log_file = self.run_dir / f"{self.run_name}_training.log"
                _append_to_log(log_file, f"Process {rank()} of {world_size()}: {line}")

    def one_epoch(
        self, state: TrainState, position: int | None, rng: dict[str, Any] | None
    ) -> TrainState:
        t0 = time.monotonic()
        epoch = state.epoch + 1
        _set_epoch(self.train_loader, state.epoch)
        if position is None or self.epoch_start is None:  # (None: a 0.1.0 checkpoint)
            self.epoch_start = {
                "lrs": _lrs(state.opt_state),
                "skipped": int(state.skipped_steps),
            }
        if position is None:
            self.epoch_rng = self.rng_state()
            self.means = MetricMeans(finite_only=self.means.finite_only)  # a fresh one alike
        elif self.epoch_rng is not None:
            self.set_rng_state(self.epoch_rng)
        lrs_before, skipped_before = self.epoch_start["lrs"], self.epoch_start["skipped"]

        started = self.callbacks("on_train_epoch_start", state)
        # Resuming mid-epoch, the callbacks set themselves up again, but the checkpoint
        # already holds the state they returned at the epoch's start: keep that one.
        state = started if position is None else state
        state, train_means = train_epoch(
            state,
            self.step_fn,
            self.train_loader,
            callbacks=self.callbacks,
            batch_size=self.batch_size,
            progress=self.show_bars,
            desc=f"epoch {epoch}/{self.max_epochs}",
            start_batch=position or 0,
            # The loaders' generators are where replaying the skipped batches from the
            # epoch's start left them (a loader with workers draws ahead of its batches).
            after_skip=(lambda: ckpt.set_rng_state(rng)) if rng is not None and position else None,
            means=self.means,
        )
        train_metrics = {f"train/{k}": v for k, v in _one_model(train_means).items()}
        rates = learning_rate_metrics(state.opt_state)
        clash = sorted(rates.keys() & train_metrics.keys())
        if clash:
            raise ValueError(LR_CLASH_MSG.format(key=clash[0].removeprefix("train/")))
        train_metrics.update(rates)
        state = state.replace(
            epoch=epoch,
            history=append_history(
                state.history,
                "train",
                {k.removeprefix("train/"): v for k, v in train_metrics.items()},
            ),
        )
        before = state.history
        state = self.callbacks("on_train_epoch_end", state, EpochMetrics(train_metrics))
        state, added = _callback_metrics(state, before, train_metrics)
        train_metrics.update(added)

        metrics = dict(train_metrics)
        if self.eval_step is not None and self.valid_loader is not None:
            state = self.callbacks("on_validation_epoch_start", state)
            state, valid_epoch_means = validate_epoch(
                state,
                self.eval_step,
                self.valid_loader,
                callbacks=self.callbacks,
                batch_size=self.batch_size,
                progress=self.show_bars,
                desc=f"valid {epoch}/{self.max_epochs}",
            )
            valid_means = _one_model(valid_epoch_means)
            valid_metrics = {f"valid/{k}": v for k, v in valid_means.items()}
            state = state.replace(history=append_history(state.history, "valid", valid_means))
            before = state.history
            state = self.callbacks("on_validation_epoch_end", state, EpochMetrics(valid_metrics))
            metrics.update(valid_metrics)
            state, added = _callback_metrics(state, before, metrics)
            metrics.update(added)

        if self.monitor not in metrics:
            raise KeyError(
                UNKNOWN_FIT_MONITOR_MSG.format(monitor=self.monitor, known=sorted(metrics))
            )
        value = metrics[self.monitor]
        loss = metrics.get("train/loss", 0.0)
        diverged = self.diverged(state, loss)
        if not diverged:  # a diverged epoch is neither the best nor fed to any rule
            if has_plateau(state.opt_state):
                state = state.replace(opt_state=observe_metric(state.opt_state, value))
            self.update_best(state, value, epoch)
            self.stopper_states = [
                s.update(st, metrics, epoch) for s, st in zip(self.stoppers, self.stopper_states)
            ]

        line = epoch_line(epoch, self.max_epochs, metrics, time.monotonic() - t0, rates.keys())
        self.logger.info(line)
        _log_lr_changes(self.logger, lrs_before, _lrs(state.opt_state))
        skipped = int(state.skipped_steps) - skipped_before
        if skipped:
            self.logger.warning(
                f"Skipped {_count(skipped, 'update', 'updates')} with non-finite loss or gradients"
            )

        if diverged:
            self.stop_reason = (
                f"the training loss is {loss} in epoch {epoch} (or the weights are not "
                f"finite): training diverged. Lower the "
                f"learning rate, clip gradients, or pass make_train_step(..., "
                f"on_nonfinite='skip'). The last checkpoint is kept as it was."
            )
            self.logger.error(self.stop_reason)
            self.epoch_finished(epoch)  # its row is final: a resumed run would redo it
            return state
        reasons = [st.stop_reason for st in self.stopper_states if st.should_stop]
        if reasons:
            self.stop_reason = "; ".join(reasons)
            self.logger.info(f"Early stopping: {self.stop_reason}")
        # The epoch's row goes out before its checkpoint: a run killed after the checkpoint
        # resumes past the epoch and would never log a row still held back.
        for epoch_logger in self.epoch_loggers:
            epoch_logger._flush()
        self.save(state, position=None)
        self.epoch_finished(epoch)
        return state

    def epoch_finished(self, epoch: int) -> None:
        """Tells the epoch loggers that ``epoch``'s row is final (see ``EpochLogger``)."""
        for epoch_logger in self.epoch_loggers:
            epoch_logger._epoch_finished(epoch)

    def diverged(self, state: TrainState, loss: float) -> bool:
        """Whether training diverged: a non-finite epoch loss or non-finite weights (one
        host read), unless the step skips such updates itself."""
        if self.train_step.on_nonfinite == "skip":
            return False
        return not (math.isfinite(loss) and bool(all_finite(state.params.values())))

    def update_best(self, state: TrainState, value: float, epoch: int) -> None:
        better = self.best is None or (
            value < self.best.value if self.mode == "min" else value > self.best.value
        )
        if not better or not math.isfinite(value):
            return
        if self.run_dir is None or not self.main:  # no best_model.pt to write: no copy
            self.best = _Best(value, epoch)
            return
        # The weights the eval step scores: the EMA unless it was made with use_ema=False.
        ema = state.ema is not None and getattr(self.eval_step, "use_ema", True)
        weights = state.state_dict(use_ema=ema)
        # Tensors only: extra state (get_extra_state) is the template's, which export_best
        # writes as it is.
        self.best = _Best(
            value,
            epoch,
            {k: v.detach().clone() for k, v in weights.items() if isinstance(v, torch.Tensor)},
        )

    def export_best(self, state: TrainState) -> None:
        if self.run_dir is None or not self.main or self.best is None:
            return
        path = self.run_dir / BEST_MODEL
        weights = self.best.state_dict or {}
        best_state = state.replace(
            params={k: weights[k] for k in state.params},
            buffers={k: weights.get(k, b) for k, b in state.buffers.items()},
            ema=None,
        )
        # A re-run of a finished job leaves the file as it was; one that resumed from a
        # later checkpoint than the fit that wrote it (a crash, then a lower max_epochs)
        # writes the checkpoint's best.
        if not self.epochs_run and _holds_weights(path, best_state.state_dict()):
            return
        ckpt.save_model(path, best_state)
        self.logger.info(
            f"Best model ({self.monitor} {self.best.value:.4g} at epoch {self.best.epoch}) "
            f"saved to {path}"
        )
