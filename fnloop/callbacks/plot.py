"""Training curves as an image: :func:`plot_history` and the :class:`PlotHistory` callback."""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from fnloop._io import atomic_write_file
from fnloop.callbacks.metrics_log import EpochLogger
from fnloop.state import TrainState
from fnloop.typing import History

MATPLOTLIB_MISSING_MSG = (
    "Plotting the history needs the 'matplotlib' package, which is not installed. "
    "Install it with: pip install 'fnloop[plot]'"
)
_SPLIT_ORDER = ("train", "valid")
UNKNOWN_IMAGE_FORMAT_MSG = (
    "PlotHistory cannot write {path!r}: matplotlib has no {fmt!r} image format (it "
    "writes {known}). Give the path a suffix such as '.png', '.pdf' or '.svg' (none "
    "writes PNG)."
)


def _image_format(path: Path) -> str:
    """The format ``plot_history`` saves ``path`` in: its suffix, PNG without one."""
    return path.suffix[1:].lower() or "png"


def _metric_names(history: Mapping[str, Mapping[str, Sequence[float]]]) -> list[str]:
    names: list[str] = []
    for split in history.values():
        names.extend(n for n, values in split.items() if values and n not in names)
    return names


def plot_history(
    history: Mapping[str, Mapping[str, Sequence[float]]], path: str | os.PathLike[str]
) -> Path:
    """Draws one subplot per metric with the curves of every split overlaid; saves it.

    The x axis is the epoch: the longest curve is drawn at ``1 .. n``, and one with fewer
    values at the last epochs (a metric that began later, such as validation added by a
    second ``fit``); metric and split names are drawn as plain text (a ``$`` in one is
    not TeX). The image is written atomically (a temporary file, then ``os.replace``) in
    the format of ``path``'s suffix (PNG without one). Uses matplotlib's object API only:
    no pyplot, no backend switch, no global state.

    Args:
      history: ``{"train": {"loss": [...], "acc": [...]}, "valid": {...}}``, such as
        ``state.history``.
      path: the image file, e.g. ``runs/demo/history.png`` (a leading ``~`` is the
        home folder); parents are created.

    Returns:
      ``path`` as a ``Path``.

    Raises:
      ValueError: the history holds no values.
      ImportError: matplotlib is not installed.

    Example:
      Plot a finished run's curves::

          fl.callbacks.plot_history(state.history, "runs/demo/history.png")
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise ImportError(MATPLOTLIB_MISSING_MSG) from e

    names = _metric_names(history)
    if not names:
        raise ValueError(
            f"plot_history got a history with no values (splits: {sorted(history)}); "
            f"train at least one epoch first."
        )
    splits = sorted(history, key=lambda s: (_SPLIT_ORDER.index(s) if s in _SPLIT_ORDER else 2, s))
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    # A metric that began later (validation added by a second fit) has fewer values: it
    # holds the last epochs.
    epochs = max(len(v) for metrics in history.values() for v in metrics.values())
    for ax, name in zip(axes, names):
        for split in splits:
            values = history[split].get(name)
            if values:
                first = epochs - len(values) + 1
                x = range(first, epochs + 1)
                ax.plot(x, values, marker="o", markersize=3, label=split)
        # Names are text, not TeX: a "$" pair in one would fail the whole plot at savefig.
        ax.set_title(name, parse_math=False)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        for text in ax.legend().get_texts():
            text.set_parse_math(False)
    for ax in axes[len(names) :]:
        fig.delaxes(ax)

    out = Path(path).expanduser()
    atomic_write_file(out, lambda f: fig.savefig(f, format=_image_format(out)))
    return out


class PlotHistory(EpochLogger):
    """Saves the training curves of ``state.history`` when ``fit`` ends, also by an error.

    Calls :func:`plot_history` at ``on_fit_end`` (on rank 0, once the history holds a
    value: a ``fit`` that trains no epoch, on a finished job, draws the history it got).
    When ``fit`` ends by an exception or Ctrl-C, the plot is drawn on the way out with
    the epochs ``fit`` finished (those its checkpoints and ``metrics.csv`` hold: an
    epoch a resumed run will train again is left out), so it does not lag behind them;
    a draw that fails there does not hide the exception (``fit`` logs the failure as a
    warning).
    Drawing takes about a second, so the plot is not redrawn every epoch. matplotlib's
    presence, and that it writes the format of ``path``'s suffix, are checked when
    ``fit`` starts, before it writes anything (at ``on_fit_start`` in a loop of your
    own), so a missing install or a mistyped suffix fails before training, not after it.

    It follows the epochs as an :class:`~fnloop.callbacks.EpochLogger` whose rows are
    drawn at the end.

    Args:
      path: the image file, e.g. ``runs/demo/history.png`` (a leading ``~`` is the
        home folder).

    Raises:
      ImportError: when ``fit`` starts (at ``on_fit_start`` in a loop of your own),
        when matplotlib is not installed.
      ValueError: when ``fit`` starts (at ``on_fit_start`` in a loop of your own),
        when matplotlib has no image format of ``path``'s suffix.

    Example:
      ::

          fl.fit(state, training_step, loaders, max_epochs=10,
                 callbacks=[fl.callbacks.PlotHistory("runs/demo/history.png")])
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path).expanduser()
        self._final_history: History = {}  # through the last epoch whose row is final

    def _check_setup(self) -> None:
        if importlib.util.find_spec("matplotlib") is None:
            raise ImportError(MATPLOTLIB_MISSING_MSG)
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        known = FigureCanvasAgg.get_supported_filetypes()
        if _image_format(self.path) not in known:
            raise ValueError(
                UNKNOWN_IMAGE_FORMAT_MSG.format(
                    path=str(self.path),
                    fmt=_image_format(self.path),
                    known=", ".join(sorted(known)),
                )
            )

    def on_fit_start(self, state: TrainState) -> None:
        self._check_setup()
        super().on_fit_start(state)

    def start(self, state: TrainState) -> None:
        self._final_history = state.history

    def write_row(self, row: Mapping[str, float]) -> None:
        """Notes that the epoch of ``row`` is final: the history through it is drawn
        should ``fit`` end by an exception."""
        del row
        self._final_history = self._history  # (the history through this row's epoch)

    def finish(self, state: TrainState | None) -> None:
        history = self._final_history if state is None else state.history
        if _metric_names(history):
            plot_history(history, self.path)
