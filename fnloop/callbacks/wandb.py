"""Weights & Biases logging (seed I7)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fnloop.callbacks.metrics_log import EpochLogger
from fnloop.distributed import is_main_process

if TYPE_CHECKING:
    from fnloop.state import TrainState

WANDB_MISSING_MSG = (
    "The WandB callback needs the 'wandb' package, which is not installed. "
    "Install it with: pip install 'fnloop[wandb]'"
)


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as e:
        raise ImportError(WANDB_MISSING_MSG) from e
    return wandb


class WandB(EpochLogger):
    """Logs the epoch metrics to a Weights & Biases run.

    ``wandb.init(project=project, **init_kwargs)`` runs at ``on_fit_start``; each epoch
    is one ``run.log({...}, step=state.step, commit=True)`` call with the train and
    validation metrics merged (plus ``"epoch"`` and ``"step"``); the run is finished at
    ``on_fit_end``. Only rank 0 logs.

    The W&B step is the optimizer step (``state.step``), as in a hand-written loop: a
    callback of yours may log per-step values to the same run
    (``cb.run.log({...}, step=state.step)``), and the epoch rows land beside them (W&B
    drops a row whose step is below one it already has). Plot against ``"epoch"`` in the
    W&B interface for per-epoch curves. W&B keeps one row per step, so an epoch that
    ends on the same optimizer step as the one before (an epoch of fewer batches than
    ``accumulation_steps``, in which no window closed) has no row in W&B: W&B ignores it
    with a warning ("Tried to log to step ... that is less than the current step");
    ``metrics.csv`` and ``state.history`` have it.

    To continue the same W&B run when ``fit`` resumes from a checkpoint, give the run a
    fixed ``id`` and ``resume="allow"``: the resumed run carries on from the checkpoint's
    step (rows that W&B already has are ignored by W&B with a warning).

    Args:
      project: the W&B project; ``None`` uses W&B's default (``WANDB_PROJECT``).
      **init_kwargs: passed to ``wandb.init``: ``name``, ``config``, ``id``, ``resume``,
        ``dir``, ``mode``, ``tags``, ... A leading ``~`` in ``dir`` is the home folder,
        as in ``fit(out_dir=...)``.

    Raises:
      ImportError: when ``fit`` starts (at ``on_fit_start`` in a loop of your own),
        when the ``wandb`` package is missing.

    Attributes:
      run: the W&B run while ``fit`` runs, else ``None``.

    Example:
      A resumable run (``WANDB_MODE=offline`` logs without an account)::

          cb = fl.callbacks.WandB(project="demo", id="demo-1", resume="allow",
                                  config={"lr": 1e-3, "batch_size": 64})
          fl.fit(state, training_step, loaders, max_epochs=10, callbacks=[cb])
    """

    def __init__(self, project: str | None = None, **init_kwargs: Any) -> None:
        super().__init__()
        self.project = project
        if isinstance(init_kwargs.get("dir"), (str, os.PathLike)):
            init_kwargs["dir"] = str(Path(init_kwargs["dir"]).expanduser())
        self.init_kwargs = init_kwargs
        self.run: Any = None

    def _check_setup(self) -> None:
        if is_main_process():  # (where on_fit_start starts the run)
            _import_wandb()

    def start(self, state: TrainState) -> None:
        wandb = _import_wandb()
        self.finish(None)  # one left open: on_fit_start again without on_fit_end (own loop)
        self.run = wandb.init(project=self.project, **self.init_kwargs)

    def write_row(self, row: Mapping[str, float]) -> None:
        self.run.log(dict(row), step=int(row["step"]), commit=True)

    def finish(self, state: TrainState | None) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if state is not None else 1)  # None: fit raised
            self.run = None
