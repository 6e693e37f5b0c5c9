"""Callbacks for ``fit``: the ten events of ``fit``, and built-in integrations."""

from fnloop.callbacks.base import EVENTS as EVENTS
from fnloop.callbacks.base import Callback as Callback
from fnloop.callbacks.base import CallbackList as CallbackList
from fnloop.callbacks.metrics_log import CSVLogger as CSVLogger
from fnloop.callbacks.metrics_log import EpochLogger as EpochLogger
from fnloop.callbacks.metrics_log import JSONLinesLogger as JSONLinesLogger
from fnloop.callbacks.plot import PlotHistory as PlotHistory
from fnloop.callbacks.plot import plot_history as plot_history
from fnloop.callbacks.profiler import Profiler as Profiler
from fnloop.callbacks.tensorboard import TensorBoard as TensorBoard
from fnloop.callbacks.wandb import WandB as WandB

__all__ = [
    "EVENTS",
    "CSVLogger",
    "Callback",
    "CallbackList",
    "EpochLogger",
    "JSONLinesLogger",
    "PlotHistory",
    "Profiler",
    "TensorBoard",
    "WandB",
    "plot_history",
]
