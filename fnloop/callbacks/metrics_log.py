"""Per-epoch metric logs: one row per epoch, train and validation merged.

:class:`EpochLogger` turns the epoch-end events into rows; :class:`CSVLogger` and
:class:`JSONLinesLogger` write them to files. TensorBoard and W&B build on the same
base (:mod:`fnloop.callbacks.tensorboard`, :mod:`fnloop.callbacks.wandb`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from fnloop._io import _fsync, atomic_write_file
from fnloop.callbacks.base import Callback
from fnloop.distributed import is_main_process
from fnloop.optim.transform import learning_rates
from fnloop.state import TrainState, history_added
from fnloop.typing import History

NOT_STARTED_MSG = (
    "{owner}.{event} came before on_fit_start: the logger opens its file (writer, run) "
    "there, and without it would write nothing. fit sends on_fit_start; in a loop of "
    "your own, call the logger's on_fit_start(state) before the first epoch and "
    "on_fit_end(state) after the last."
)
_NOT_A_NUMBER_MSG = (
    "{owner} can only log numbers; metric {key!r} is a {kind}. Epoch-end metrics must be "
    "floats (or tensors / sequences of numbers, logged element-wise as '{key}/0', ...)."
)


def _scalar_items(key: str, value: Any, owner: str = "EpochLogger") -> dict[str, float]:
    """``{key: float(value)}``; a value with several elements becomes ``key/0``, ``key/1``, ...

    Numbers, tensors (read to the host, which syncs) and sequences of numbers are accepted.

    >>> _scalar_items("train/loss", 0.5)
    {'train/loss': 0.5}
    >>> _scalar_items("train/lr", torch.tensor([0.5, 0.25]))
    {'train/lr/0': 0.5, 'train/lr/1': 0.25}
    """
    if isinstance(value, torch.Tensor):
        values = value.detach().flatten().tolist()
    elif isinstance(value, int | float):
        values = [value]
    elif isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value):
        values = list(value)
    else:
        raise TypeError(_NOT_A_NUMBER_MSG.format(owner=owner, key=key, kind=type(value).__name__))
    if len(values) == 1:
        return {key: float(values[0])}
    return {f"{key}/{i}": float(v) for i, v in enumerate(values)}


def lr_names(count: int) -> list[str]:
    """``lr`` for one learning rate, ``lr_0``, ``lr_1``, ... for several parameter groups."""
    return ["lr"] if count == 1 else [f"lr_{i}" for i in range(count)]


def learning_rate_metrics(opt_state: Any) -> dict[str, float]:
    """The learning rates of ``opt_state`` keyed as ``fit`` logs them.

    ``"train/lr"`` for one learning rate, ``"train/lr_0"``, ``"train/lr_1"``, ... for
    several parameter groups; per-model rates of a stacked state get a ``/j`` suffix.

    >>> from fnloop import optim
    >>> learning_rate_metrics(optim.sgd(0.1).init({"w": torch.zeros(1)}))
    {'train/lr': 0.1}
    """
    lrs = learning_rates(opt_state)
    out: dict[str, float] = {}
    for name, lr in zip(lr_names(len(lrs)), lrs):
        out.update(_scalar_items(f"train/{name}", lr))
    return out


class EpochLogger(Callback):
    """Base of the loggers that write one row per epoch, train and validation merged.

    The metrics of ``on_train_epoch_end`` and ``on_validation_epoch_end`` are collected
    into one row, written at ``on_validation_epoch_end`` (the last event of an epoch);
    a row still pending (an epoch without validation) is written at the next
    ``on_train_epoch_start`` or at ``on_fit_end`` (``fit`` has it written before the
    epoch's checkpoint, so that a run killed after the checkpoint has it). A row is
    ``{"epoch": state.epoch, "step": state.step, "train/loss": ..., "valid/loss": ...}``
    with the counters of the last event that contributed to it; metrics that callbacks
    before this one appended to ``state.history`` in the epoch join the row. When the
    train metrics carry no learning rate (``"train/lr"``, ``"train/lr_0"``, ..., with ``/j``
    for a stacked state), the rates are read from the optimizer state (one host sync per
    epoch). Under ``torch.distributed`` only rank 0 writes.
    In a loop of your own, call ``on_fit_start`` before the first epoch and ``on_fit_end``
    after the last, as ``fit`` does: an epoch-end event outside them raises
    ``RuntimeError`` (the logger has nothing open to write to).

    Subclasses implement :meth:`write_row` and, where they hold a resource,
    :meth:`start` and :meth:`finish`.

    Example:
      >>> import torch
      >>> import fnloop as fl
      >>> class PrintRows(fl.callbacks.EpochLogger):
      ...     def write_row(self, row):
      ...         print(row)
      >>> state = fl.TrainState.create(
      ...     torch.nn.Linear(3, 1), tx=fl.optim.sgd(0.1), device="cpu"
      ... )
      >>> cb = PrintRows()
      >>> cb.on_fit_start(state)
      >>> cb.on_train_epoch_start(state)
      >>> cb.on_train_epoch_end(state.replace(epoch=1, step=4), {"train/loss": 0.5})
      >>> cb.on_validation_epoch_end(state.replace(epoch=1, step=4), {"valid/loss": 0.25})
      {'epoch': 1, 'step': 4, 'train/loss': 0.5, 'train/lr': 0.1, 'valid/loss': 0.25}
      >>> cb.on_train_epoch_start(state.replace(epoch=1, step=4))
      >>> cb.on_train_epoch_end(state.replace(epoch=2, step=8), {"train/loss": 0.25})
      >>> cb.on_fit_end(state.replace(epoch=2, step=8))
      {'epoch': 2, 'step': 8, 'train/loss': 0.25, 'train/lr': 0.1}
    """

    def __init__(self) -> None:
        self._pending: dict[str, float] = {}
        self._counters: tuple[int, int] | None = None
        self._history: History = {}  # at the epoch's start (after the last row)
        self._latest: History = {}  # at the last event collected
        self._active = False
        self._started = False  # on_fit_start ran (on every rank), on_fit_end not yet
        # fit's progress: the last epoch it finished (and checkpointed), and whether a
        # re-run can resume from its checkpoints. Outside fit every row is final.
        self._finished_epoch = 0
        self._resumable = False

    def _check_setup(self) -> None:
        """Raises what ``on_fit_start`` would refuse in the set-up (a package that is not
        installed, a path of a format it cannot write), reading and writing no file:
        ``fit`` calls it with its own checks, before it writes anything in ``out_dir``.
        Nothing to check here."""

    def start(self, state: TrainState) -> None:
        """Opens what the logger writes to (at ``on_fit_start``, rank 0 only)."""

    def write_row(self, row: Mapping[str, float]) -> None:
        """Writes one epoch row: ``epoch`` and ``step`` first, then the metrics."""
        raise NotImplementedError(f"{type(self).__name__} must implement write_row(row)")

    def finish(self, state: TrainState | None) -> None:
        """Closes what :meth:`start` opened (at ``on_fit_end``, after the last row;
        ``state`` is ``None`` when ``fit`` ended by an exception)."""

    def on_fit_start(self, state: TrainState) -> TrainState | None:
        self._pending, self._counters, self._history = {}, None, state.history
        self._finished_epoch = state.epoch
        self._active = is_main_process()
        self._started = True
        if self._active:
            self.start(state)
        return None

    def on_train_epoch_start(self, state: TrainState) -> TrainState | None:
        self._flush()
        self._history = state.history
        return None

    def on_train_epoch_end(
        self, state: TrainState, metrics: Mapping[str, float]
    ) -> TrainState | None:
        self._require_started("on_train_epoch_end")
        if not self._active:
            return None
        self._collect(state, metrics)
        names = {f"train/{n}" for n in lr_names(len(learning_rates(state.opt_state)))}
        if not any(k in names or k.rpartition("/")[0] in names for k in metrics):
            self._pending.update(learning_rate_metrics(state.opt_state))
        return None

    def on_validation_epoch_end(
        self, state: TrainState, metrics: Mapping[str, float]
    ) -> TrainState | None:
        self._require_started("on_validation_epoch_end")
        if self._active:
            self._collect(state, metrics)
            self._flush()
        return None

    def on_fit_end(self, state: TrainState) -> TrainState | None:
        self._started = False
        if not self._active:
            return None
        self._flush()
        self._active = False
        self.finish(state)
        return None

    def teardown(self) -> None:
        self._started = False
        if not self._active:
            return
        try:
            # The row held back for callbacks' additions, if fit finished its epoch (and
            # wrote its checkpoint): a resumed run will not log that epoch again. A row of
            # an unfinished epoch (interrupted in validation) that a resumed run will redo
            # is dropped: that run logs the whole row, which W&B would ignore after a
            # partial one.
            pending = self._counters
            if pending is not None and (not self._resumable or pending[0] <= self._finished_epoch):
                self._flush()
        finally:
            self._active = False
            self.finish(None)

    def _require_started(self, event: str) -> None:
        """Raises for an epoch event outside ``on_fit_start`` .. ``on_fit_end``, which
        would otherwise write nothing without a word."""
        if not self._started:
            raise RuntimeError(NOT_STARTED_MSG.format(owner=type(self).__name__, event=event))

    def _track_epochs(self, *, resumable: bool) -> None:
        """Called by ``fit`` before ``on_fit_start``: whether it writes checkpoints."""
        self._resumable = resumable

    def _epoch_finished(self, epoch: int) -> None:
        """Called by ``fit`` once epoch ``epoch``'s row is final (checkpointed, or the
        run diverged in it)."""
        self._finished_epoch = epoch

    def _collect(self, state: TrainState, metrics: Mapping[str, float]) -> None:
        if any(k in self._pending for k in metrics):  # the same split twice: a new epoch
            self._flush()
        for key, value in metrics.items():
            self._pending.update(_scalar_items(key, value, type(self).__name__))
        # What callbacks before this one appended to the history in this epoch.
        for key, value in history_added(self._history, state.history).items():
            self._pending.setdefault(key, value)
        self._counters, self._latest = (state.epoch, state.step), state.history

    def _flush(self) -> None:
        if not self._active or self._counters is None:
            return
        epoch, step = self._counters
        row: dict[str, float] = {"epoch": epoch, "step": step, **self._pending}
        self._pending, self._counters, self._history = {}, None, self._latest
        self.write_row(row)


# --------------------------------------------------------------------------- files


def _read_complete_lines(path: Path) -> tuple[list[str], bool]:
    """The file's complete lines, and whether a torn (unterminated) last line was dropped."""
    if not path.exists():
        return [], False
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        return lines[:-1], True
    return lines, False


def _write_text(path: Path, text: str) -> None:
    atomic_write_file(path, lambda f: f.write(text.encode("utf-8")))


def _warn_missing_rows(path: Path, state: TrainState, epochs: Iterable[Any]) -> None:
    """Warns when the file's last row comes before ``state.epoch``, the resumed state's:
    rows fsynced before their epoch's checkpoint and gone all the same (a file system
    that ignored the fsync, an edit). Their values are in ``state.history``."""
    last = max((int(e) for e in epochs if str(e).isdigit()), default=None)
    if last is not None and last < state.epoch:
        rows = f"row of epoch {state.epoch}"
        if last + 1 < state.epoch:
            rows = f"rows of epochs {last + 1}-{state.epoch}"
        warnings.warn(
            f"{path} lacks the {rows}, which the resumed state has finished; their "
            f"values are in state.history.",
            RuntimeWarning,
            stacklevel=3,
        )


def _after(epoch: Any, state_epoch: int) -> bool:
    """Whether a logged ``epoch`` lies beyond the state's: left by a run that resumed earlier."""
    try:
        return int(epoch) > state_epoch
    except (TypeError, ValueError):
        return False


_EXTRA_CELLS_MSG = (
    "{path}, line {line}, has {cells} cells and the header {columns}: the logger cannot "
    "rewrite the file (to drop the rows after the checkpoint a run resumes from, or to "
    "widen the header for a new metric) without losing them. Remove or repair that line "
    "(a hand edit, or files joined?), or move the file away."
)


def _read_rows(
    lines: Iterable[str], path: Path
) -> tuple[list[str], list[dict[str, Any]], str | None]:
    """A CSV file's header and rows, and for a row with more cells than the header (a
    hand edit) the error to raise before the file is rewritten, which would lose them."""
    reader = csv.DictReader(lines)
    fieldnames = list(reader.fieldnames or [])
    rows, error = [], None
    for row in reader:
        if None in row and error is None:  # (DictReader's key for the cells beyond)
            cells = len(fieldnames) + len(row[None])
            error = _EXTRA_CELLS_MSG.format(
                path=path, line=reader.line_num, cells=cells, columns=len(fieldnames)
            )
        rows.append(row)
    return fieldnames, rows, error


def _csv_text(fieldnames: list[str], rows: Iterable[Mapping[str, Any]], header: bool) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames, restval="", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


class CSVLogger(EpochLogger):
    """Writes one CSV row per epoch: ``epoch``, ``step``, then the metric names.

    The file is appended to across ``fit`` calls, so a resumed run continues it; rows of
    epochs beyond the state's epoch at ``on_fit_start`` (written after the checkpoint a
    run resumes from, or left by an earlier run in the same place) are dropped first, so
    no epoch appears twice. When a metric appears that the header lacks, the file is
    rewritten with the wider header (earlier rows get empty cells). Each row is flushed
    and fsynced as it is written (before ``fit`` writes the epoch's checkpoint); a
    resumed run whose file lacks rows of finished epochs all the same (a file system
    that ignores fsync, an edit) gets a ``RuntimeWarning`` (the values are in
    ``state.history``). A row with more cells than the header (a hand edit) is a
    ``ValueError`` naming its line when the file is to be rewritten, which would lose
    its cells.

    Args:
      path: the CSV file (a leading ``~`` is the home folder, as in ``fit``'s
        ``out_dir``); its parent directories are created.

    Example:
      >>> import pathlib, tempfile, torch
      >>> import fnloop as fl
      >>> state = fl.TrainState.create(torch.nn.Linear(3, 1), tx=fl.optim.sgd(0.1), device="cpu")
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     cb = fl.callbacks.CSVLogger(f"{tmp}/metrics.csv")
      ...     cb.on_fit_start(state)
      ...     cb.on_train_epoch_end(state.replace(epoch=1, step=8), {"train/loss": 0.5})
      ...     cb.on_fit_end(state)
      ...     print(pathlib.Path(tmp, "metrics.csv").read_text(), end="")
      epoch,step,train/loss,train/lr
      1,8,0.5,0.1
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path).expanduser()
        self._fieldnames: list[str] = []

    def start(self, state: TrainState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines, torn = _read_complete_lines(self.path)
        if not lines:  # (a torn header goes at the first row, which writes the file afresh)
            self._fieldnames = []
            return
        self._fieldnames, rows, error = _read_rows(lines, self.path)
        kept = [r for r in rows if not _after(r.get("epoch"), state.epoch)]
        if self._resumable:
            _warn_missing_rows(self.path, state, (r.get("epoch") for r in kept))
        if torn or len(kept) != len(rows):
            if error is not None:
                raise ValueError(error)
            _write_text(self.path, _csv_text(self._fieldnames, kept, header=True))

    def write_row(self, row: Mapping[str, float]) -> None:
        new = [k for k in row if k not in self._fieldnames]
        if new:
            old_rows: list[dict[str, Any]] = []
            if self._fieldnames and self.path.exists():
                with open(self.path, encoding="utf-8", newline="") as f:
                    _, old_rows, error = _read_rows(f, self.path)
                if error is not None:
                    raise ValueError(error)
            self._fieldnames = [*self._fieldnames, *new]
            _write_text(self.path, _csv_text(self._fieldnames, old_rows, header=True))
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            f.write(_csv_text(self._fieldnames, [row], header=False))
            f.flush()
            _fsync(f.fileno())  # on disk before the epoch's checkpoint


class JSONLinesLogger(EpochLogger):
    """Writes one JSON object per epoch and line: ``{"epoch": 1, "step": 80, "train/loss": ...}``.

    Appends across ``fit`` calls like :class:`CSVLogger`, dropping lines of epochs
    beyond the state's epoch at ``on_fit_start`` and warning about lines of finished
    epochs that are missing. Each line is flushed and fsynced as it is written.
    A value that is not finite (a diverged epoch's loss) is written as ``null``, so every
    line is standard JSON.

    Args:
      path: the ``.jsonl`` file (a leading ``~`` is the home folder); its parent
        directories are created.

    Example:
      Read the log back with the standard library::

          rows = [json.loads(line) for line in open("runs/demo/metrics.jsonl")]
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path).expanduser()

    def start(self, state: TrainState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines, torn = _read_complete_lines(self.path)
        kept, logged = [], []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None  # kept as it is
            if isinstance(record, dict):
                if _after(record.get("epoch"), state.epoch):
                    continue
                logged.append(record.get("epoch"))
            kept.append(line)
        if self._resumable:
            _warn_missing_rows(self.path, state, logged)
        if torn or len(kept) != len(lines):
            _write_text(self.path, "".join(kept))

    def write_row(self, row: Mapping[str, float]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(_json_line(row))
            f.flush()
            _fsync(f.fileno())  # on disk before the epoch's checkpoint


def _json_line(row: Mapping[str, float]) -> str:
    return json.dumps({k: v if math.isfinite(v) else None for k, v in row.items()}) + "\n"
