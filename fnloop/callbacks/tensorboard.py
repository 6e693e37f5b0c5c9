"""TensorBoard logging through ``torch.utils.tensorboard`` (seed I7)."""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from fnloop._io import atomic_write_file
from fnloop.callbacks.metrics_log import EpochLogger, lr_names
from fnloop.distributed import is_main_process
from fnloop.optim.transform import learning_rates
from fnloop.typing import Batch

if TYPE_CHECKING:
    from fnloop.state import TrainState

TENSORBOARD_MISSING_MSG = (
    "The TensorBoard callback needs the 'tensorboard' package, which is not installed. "
    "Install it with: pip install 'fnloop[tensorboard]'"
)


def _summary_writer_class() -> Any:
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(TENSORBOARD_MISSING_MSG) from e
    return SummaryWriter


def _host_scalars(outputs: Mapping[str, Any], rates: Mapping[str, Any]) -> dict[str, float]:
    """The 0-d tensors and numbers of ``outputs``, then the learning ``rates`` whose name
    no output has (a stacked state's per-model rates as ``name/0``, ``name/1``, ...), as
    floats: one host sync per device for all of them."""
    values: dict[str, float] = {}
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for key, value in outputs.items():
        if isinstance(value, torch.Tensor):
            if value.ndim == 0 and not value.is_complex():
                by_device.setdefault(value.device, []).append((key, value))
        elif isinstance(value, int | float):
            values[key] = float(value)
    shown = {k for items in by_device.values() for k, _ in items} | set(values)
    names = [k for k in outputs if k in shown]
    for key, rate in rates.items():
        if key in shown:  # an output keeps its name
            continue
        rate = torch.as_tensor(rate)
        if rate.numel() == 1:
            by_device.setdefault(rate.device, []).append((key, rate.reshape(())))
            names.append(key)
        else:
            for j, one in enumerate(rate.reshape(-1)):
                by_device.setdefault(one.device, []).append((f"{key}/{j}", one))
                names.append(f"{key}/{j}")
    for items in by_device.values():
        read = torch.stack([v.detach().float() for _, v in items]).tolist()
        values.update({k: float(x) for (k, _), x in zip(items, read)})
    return {k: values[k] for k in names}


_SUFFIX = ".fnloop"  # the event files this callback writes end with it


def _write_records(f: IO[bytes], records: list[bytes]) -> None:
    from tensorboard.summary.writer.record_writer import RecordWriter

    writer = RecordWriter(f)
    for record in records:
        writer.write(record)


def _event_files(log_dir: Path) -> list[Path]:
    """The event files this callback wrote in ``log_dir`` (named ``*.fnloop``)."""
    return sorted(p for p in log_dir.glob(f"*tfevents*{_SUFFIX}") if p.is_file())


def _drop_scalars_after(
    paths: list[Path], *, epoch: int, step: int | None, splits: tuple[str, ...]
) -> None:
    """Rewrites the event files ``paths`` without the scalars beyond ``epoch`` / ``step``.

    ``"train_step/..."`` scalars are indexed by optimizer step (kept when ``step`` is
    ``None``), ``"<split>/..."`` ones of the ``splits`` (``"train"``, ``"valid"``, and
    those where callbacks add epoch metrics) by epoch. Only the files this callback wrote
    are given: what other writers put in the folder is kept. A file is replaced
    atomically and only when something is dropped; a torn last record (a crash in the
    middle of a write) is dropped with it, a file damaged in the middle is left alone.
    """
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    per_epoch = tuple(f"{s}/" for s in splits if s != "train_step")

    def beyond(event: Any) -> bool:  # only the tags this callback writes
        for value in event.summary.value:
            if step is not None and value.tag.startswith("train_step/") and event.step > step:
                return True
            if value.tag.startswith(per_epoch) and event.step > epoch:
                return True
        return False

    for path in paths:
        if not path.is_file():
            continue
        records = list(RawEventFileLoader(str(path)).Load())
        read = sum(len(r) + 16 for r in records)  # length, 2 checksums: 16 bytes a record
        size = path.stat().st_size
        if read < size and not _torn_last_record(path, read):
            continue  # damaged in the middle: not ours to cut short
        kept = [r for r in records if not beyond(event_pb2.Event.FromString(r))]
        if len(kept) < len(records) or read < size:
            atomic_write_file(path, functools.partial(_write_records, records=kept))


def _torn_last_record(path: Path, offset: int) -> bool:
    """Whether the bytes after ``offset`` are the beginning of one record (a write that a
    crash cut short, or the zeros a power loss leaves) rather than more records after a
    damaged one."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    with open(path, "rb") as f:
        f.seek(offset)
        tail = f.read()
    if not any(tail) or len(tail) < 12:
        return True
    header, (header_crc,) = tail[:8], struct.unpack("<I", tail[8:12])
    if masked_crc32c(header) != header_crc:
        return False  # a damaged length: what follows may be good records
    (length,) = struct.unpack("<Q", header)
    return len(tail) < length + 16


class TensorBoard(EpochLogger):
    """Logs the epoch metrics (and, optionally, step outputs) to TensorBoard.

    At the end of each epoch every metric (``"train/loss"``, ``"valid/acc"``,
    ``"train/lr"``, ...) is added as a scalar at ``global_step=state.epoch``; train and
    validation metrics of an epoch are written together, as in
    :class:`~fnloop.callbacks.EpochLogger`. With ``log_every_n_steps=N`` the 0-d outputs
    of the training step are also logged as ``"train_step/<name>"`` at
    ``global_step=state.step`` every ``N`` optimizer steps, with the learning rates
    after the update (``"train_step/lr"``, or ``"train_step/lr_0"``, ... for several
    parameter groups, as ``"train/lr"`` at the epoch's end). Reading them copies the
    values to the host, which waits for the device to finish the step (one sync per
    logged step), so keep ``N`` large on a GPU. The writer is created at
    ``on_fit_start`` and closed at ``on_fit_end``; only rank 0 writes.

    Like :class:`~fnloop.callbacks.CSVLogger`, a resumed run continues the curves: at
    ``on_fit_start`` the scalars already in ``log_dir`` that lie beyond the state (epoch
    scalars, of every split in ``state.history``, after ``state.epoch``;
    ``"train_step/..."`` scalars after ``state.step``: written after the checkpoint the
    run resumes from, or by an earlier run in the same place) are removed from the event
    files it wrote (other writers' files are left alone), so no point appears twice. A
    split that first appears in the history later (a callback's, resuming from a
    checkpoint taken before its first value) has its epoch scalars after that
    ``state.epoch`` removed the same way when its first row is written.

    Args:
      log_dir: the run's TensorBoard directory (``tensorboard --logdir`` its parent; a
        leading ``~`` is the home folder).
      log_every_n_steps: also log the step outputs and learning rates every this many
        optimizer steps; ``None`` logs per epoch only.

    Raises:
      ValueError: ``log_every_n_steps`` is not a positive integer.
      ImportError: when ``fit`` starts (at ``on_fit_start`` in a loop of your own),
        when the ``tensorboard`` package is missing.

    Example:
      Log to ``runs/demo/tb`` and view it with ``tensorboard --logdir runs``::

          fl.fit(state, training_step, loaders, max_epochs=10,
                 callbacks=[fl.callbacks.TensorBoard("runs/demo/tb", log_every_n_steps=50)])
    """

    def __init__(
        self, log_dir: str | os.PathLike[str], log_every_n_steps: int | None = None
    ) -> None:
        super().__init__()
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool)
            or not isinstance(log_every_n_steps, int)
            or log_every_n_steps < 1
        ):
            raise ValueError(
                f"log_every_n_steps must be a positive int or None; got {log_every_n_steps!r}."
            )
        self.log_dir = Path(log_dir).expanduser()
        self.log_every_n_steps = log_every_n_steps
        self.writer: Any = None
        self._earlier: list[Path] = []  # the event files of earlier runs, at on_fit_start
        self._start = 0  # the state's epoch at on_fit_start
        self._splits: set[str] = set()  # those whose points beyond it are dropped

    def _check_setup(self) -> None:
        if is_main_process():  # (where on_fit_start starts the writer)
            _summary_writer_class()

    def start(self, state: TrainState) -> None:
        writer_class = _summary_writer_class()
        self.finish(None)  # one left open: on_fit_start again without on_fit_end (own loop)
        # The earlier runs' files (the writer below starts one of its own).
        self._earlier = _event_files(self.log_dir) if self.log_dir.is_dir() else []
        self._start = state.epoch
        self._splits = {"train", "valid", *state.history}
        _drop_scalars_after(
            self._earlier, epoch=state.epoch, step=state.step, splits=tuple(self._splits)
        )
        self.writer = writer_class(log_dir=str(self.log_dir), filename_suffix=_SUFFIX)

    def write_row(self, row: Mapping[str, float]) -> None:
        # A split of this row that the history lacked at on_fit_start (a callback's, first
        # appended after a mid-epoch checkpoint of epoch 1): its points beyond that state
        # go too.
        new = tuple(
            s
            for s in self._history
            if s not in self._splits and any(k.startswith(f"{s}/") for k in row)
        )
        if new:
            self._splits.update(new)
            _drop_scalars_after(self._earlier, epoch=self._start, step=None, splits=new)
        epoch = int(row["epoch"])
        for key, value in row.items():
            if key not in ("epoch", "step"):
                self.writer.add_scalar(key, value, global_step=epoch)
        self.writer.flush()

    def finish(self, state: TrainState | None) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def on_train_batch_end(
        self,
        state: TrainState,
        outputs: Mapping[str, torch.Tensor],
        batch: Batch,
        batch_idx: int,
    ) -> None:
        n = self.log_every_n_steps
        if n is not None and self.writer is None:  # (None on other ranks than 0 too)
            self._require_started("on_train_batch_end")
        # Right after an optimizer update only (not after the micro-batches between).
        if self.writer is None or n is None or state.step % n != 0 or state.micro_step:
            return
        lrs = learning_rates(state.opt_state)  # 0-d tensors on the device: read with outputs
        scalars = _host_scalars(outputs, dict(zip(lr_names(len(lrs)), lrs)))
        for key, value in scalars.items():
            self.writer.add_scalar(f"train_step/{key}", value, global_step=state.step)
