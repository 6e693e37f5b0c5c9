"""Profiling the first training batches with ``torch.profiler`` (seed I8)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.profiler import ProfilerActivity

from fnloop._io import atomic_write
from fnloop.callbacks.base import Callback
from fnloop.distributed import is_main_process
from fnloop.typing import Batch

if TYPE_CHECKING:
    from fnloop.state import TrainState


RUNNING_MSG = (
    "Profiler({out_dir!r}) cannot start: another torch profiler is running (a second "
    "fl.callbacks.Profiler in callbacks, or torch.profiler.profile around fit). torch "
    "runs one at a time, and a second one crashes the process when the traces are "
    "written; keep one of them."
)


def _default_activities() -> list[ProfilerActivity]:
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    return activities


class Profiler(Callback):
    """Profiles the first ``num_batches`` training batches and writes a Chrome trace.

    ``torch.profiler.profile`` starts at the first ``on_train_batch_start`` this
    callback sees, marks each batch as a ``train_batch#<i>`` range, and stops after
    ``num_batches`` training batches (or at ``on_fit_end`` if fewer ran). The trace is
    written to ``<out_dir>/trace.json``; open it in ``chrome://tracing`` or
    https://ui.perfetto.dev. Profiling happens once per callback: later epochs, and later
    ``fit`` calls with the same callback, are not profiled. Only rank 0 profiles.

    Args:
      out_dir: where ``trace.json`` goes (a leading ``~`` is the home folder); created
        if missing.
      num_batches: how many training batches to profile.
      activities: ``torch.profiler.ProfilerActivity`` values; ``None`` profiles the CPU
        and, when available, CUDA.

    Raises:
      ValueError: ``num_batches`` is not a positive integer, or ``activities`` is empty.
      RuntimeError: at the first batch, when another profiler is already running.

    Attributes:
      trace_path: ``<out_dir>/trace.json``.

    Example:
      Profile the first 20 steps of a run::

          fl.fit(state, training_step, loaders, max_epochs=10,
                 callbacks=[fl.callbacks.Profiler("runs/demo/profile", num_batches=20)])
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        num_batches: int = 10,
        activities: Sequence[ProfilerActivity] | None = None,
    ) -> None:
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches must be a positive int; got {num_batches!r}.")
        self.out_dir = Path(out_dir).expanduser()
        self.trace_path = self.out_dir / "trace.json"
        self.num_batches = num_batches
        self.activities = list(activities) if activities is not None else None
        if self.activities == []:
            raise ValueError(
                "activities is empty: pass torch.profiler.ProfilerActivity values (e.g. "
                "[ProfilerActivity.CPU]), or None for the CPU and, when available, CUDA."
            )
        self._prof: Any = None
        self._batch_range: Any = None
        self._batches = 0
        self._done = False

    def on_train_batch_start(self, state: TrainState, batch: Batch, batch_idx: int) -> None:
        if self._done:
            return
        if self._prof is None:
            if not is_main_process():
                self._done = True
                return
            if torch._C._autograd._profiler_enabled():
                raise RuntimeError(RUNNING_MSG.format(out_dir=str(self.out_dir)))
            self.out_dir.mkdir(parents=True, exist_ok=True)
            activities = self.activities if self.activities is not None else _default_activities()
            prof = torch.profiler.profile(activities=activities, record_shapes=False)
            prof.start()
            self._prof = prof  # (once started: teardown stops only a running profiler)
        self._close_batch_range()
        self._batch_range = torch.profiler.record_function(f"train_batch#{self._batches}")
        self._batch_range.__enter__()

    def on_train_batch_end(
        self,
        state: TrainState,
        outputs: Mapping[str, torch.Tensor],
        batch: Batch,
        batch_idx: int,
    ) -> None:
        if self._prof is None:
            return
        self._close_batch_range()
        self._batches += 1
        if self._batches >= self.num_batches:
            self._stop()

    def on_fit_end(self, state: TrainState) -> None:
        if self._prof is not None:
            self._stop()

    def teardown(self) -> None:
        if self._prof is not None:  # fit raised: the batches profiled so far
            self._stop()

    def _close_batch_range(self) -> None:
        if self._batch_range is not None:
            self._batch_range.__exit__(None, None, None)
            self._batch_range = None

    def _stop(self) -> None:
        self._close_batch_range()
        prof, self._prof, self._done = self._prof, None, True
        prof.stop()
        atomic_write(self.trace_path, lambda tmp: prof.export_chrome_trace(str(tmp)))
