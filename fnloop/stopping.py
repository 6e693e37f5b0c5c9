"""Early stopping as a pure state machine (S5)."""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping
from typing import Literal

UNKNOWN_MONITOR_MSG = (
    "EarlyStopping monitors {monitor!r}, but the epoch produced only {known}. "
    "Use one of those names ('train/<metric>' or 'valid/<metric>'), or return "
    "{metric!r} from your step function."
)


@dataclasses.dataclass(frozen=True)
class EarlyStoppingState:
    """Progress of one :class:`EarlyStopping` rule.

    Attributes:
      best: the value improvements are measured against: the last value that counted
        as one, by beating the previous ``best`` by more than ``min_delta`` (the best so
        far when ``min_delta`` is 0; ``inf`` / ``-inf`` before the first epoch). With
        ``min_delta`` a later epoch may be slightly better: ``fit``'s best model is that one.
      best_epoch: the epoch that reached ``best`` (``0`` before any).
      bad_epochs: epochs in a row without an improvement larger than ``min_delta``.
      stop_reason: why training should stop, or ``""`` to go on.
    """

    best: float
    best_epoch: int = 0
    bad_epochs: int = 0
    stop_reason: str = ""

    @property
    def should_stop(self) -> bool:
        """Whether this rule asks to stop."""
        return bool(self.stop_reason)


_BOOL_DTYPES = ("bool", "torch.bool")  # str() of NumPy's and torch's bool dtypes


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Stops training when a monitored metric stops improving or reaches a target.

    Args:
      monitor: the metric to watch, ``"train/<name>"`` or ``"valid/<name>"``.
      mode: ``"min"`` if lower is better, ``"max"`` if higher is.
      patience: epochs without improvement tolerated before stopping.
      min_delta: an epoch improves only if it beats the best by more than this (the
        ``BaseTrainer``'s default, 1e-3; pass ``0.0`` to count any improvement). The
        stop reason then names the value that was not beaten by ``min_delta``, which
        need not be the best one (``fit``'s best model).
      target: stop as soon as the metric is at least this good (``<=`` for ``"min"``,
        ``>=`` for ``"max"``); ``None`` for no target.

    Raises:
      TypeError: a monitor that is not a string, or a number argument that is not one.
      ValueError: an unknown mode, a monitor without the ``train/`` or ``valid/`` prefix,
        a negative, fractional or infinite patience, a negative ``min_delta``, or a NaN
        or infinite ``min_delta`` or ``target``.

    Example:
      >>> stopper = EarlyStopping(monitor="valid/loss", patience=2)
      >>> s = stopper.init()
      >>> for epoch, loss in enumerate([0.5, 0.4, 0.45, 0.41], start=1):
      ...     s = stopper.update(s, {"valid/loss": loss}, epoch)
      >>> s.stop_reason
      'valid/loss did not improve by more than min_delta=0.001 on 0.4 (epoch 2) for 2 epochs'
      >>> exact = EarlyStopping(monitor="valid/loss", patience=2, min_delta=0.0)
      >>> s = exact.init()
      >>> for epoch, loss in enumerate([0.5, 0.4, 0.45, 0.41], start=1):
      ...     s = exact.update(s, {"valid/loss": loss}, epoch)
      >>> s.stop_reason
      'valid/loss did not improve for 2 epochs (best 0.4 at epoch 2)'
    """

    monitor: str = "valid/loss"
    mode: Literal["min", "max"] = "min"
    patience: int = 10
    min_delta: float = 1e-3
    target: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.monitor, str):
            raise TypeError(
                f"EarlyStopping monitor takes a metric name such as 'valid/loss'; "
                f"got {self.monitor!r}."
            )
        for name in ("patience", "min_delta", "target"):
            value = getattr(self, name)
            # Which int() and float() take as 1 or 0: a bool, NumPy's or a tensor's too.
            if isinstance(value, bool) or str(getattr(value, "dtype", "")) in _BOOL_DTYPES:
                raise TypeError(f"EarlyStopping {name} takes a number; got {value}.")
        try:  # an int (a NumPy one, an integer tensor) as it is, however large
            whole: int | None = operator.index(self.patience)
        except TypeError:
            whole = None
        for name in ("patience", "min_delta", "target"):
            value = getattr(self, name)
            if (value is None and name == "target") or (name == "patience" and whole is not None):
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"EarlyStopping {name} takes a number; got {value!r}.") from None
            if not math.isfinite(number):
                raise ValueError(f"EarlyStopping {name} must be finite; got {value!r}.")
        if whole is None and not float(self.patience).is_integer():
            raise ValueError(
                f"EarlyStopping patience counts epochs: a whole number; got {self.patience!r}."
            )
        # Plain Python numbers (NumPy ones from a sweep, too): checkpoints record the rule.
        patience = whole if whole is not None else int(float(self.patience))
        object.__setattr__(self, "patience", patience)
        object.__setattr__(self, "min_delta", float(self.min_delta))
        if self.target is not None:
            object.__setattr__(self, "target", float(self.target))
        if self.mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode must be 'min' or 'max'; got {self.mode!r}.")
        if self.patience < 0:
            raise ValueError(f"EarlyStopping patience must be >= 0; got {self.patience}.")
        if self.min_delta < 0:
            raise ValueError(f"EarlyStopping min_delta must be >= 0; got {self.min_delta}.")
        if not self.monitor.startswith(("train/", "valid/")):
            name = self.monitor.split("/", 1)[-1]
            raise ValueError(
                f"EarlyStopping monitor {self.monitor!r} needs the split prefix fit gives "
                f"metrics: 'train/{name}' or 'valid/{name}'."
            )

    def init(self) -> EarlyStoppingState:
        """The state before the first epoch."""
        return EarlyStoppingState(best=math.inf if self.mode == "min" else -math.inf)

    def improved(self, value: float, best: float) -> bool:
        """Whether ``value`` beats ``best`` by more than ``min_delta``."""
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def update(
        self, state: EarlyStoppingState, metrics: Mapping[str, float], epoch: int
    ) -> EarlyStoppingState:
        """The state after an epoch with ``metrics``; raises ``KeyError`` for an unknown
        monitor and ``TypeError`` for a value that is not one number (a list of one mean
        per stacked model)."""
        if self.monitor not in metrics:
            raise KeyError(
                UNKNOWN_MONITOR_MSG.format(
                    monitor=self.monitor,
                    known=sorted(metrics),
                    metric=self.monitor.split("/", 1)[1],
                )
            )
        value = _number(self.monitor, metrics[self.monitor])
        if self.improved(value, state.best):
            state = dataclasses.replace(state, best=value, best_epoch=epoch, bad_epochs=0)
        else:
            state = dataclasses.replace(state, bad_epochs=state.bad_epochs + 1)
        if self.target is not None and (
            value <= self.target if self.mode == "min" else value >= self.target
        ):
            return dataclasses.replace(
                state, stop_reason=f"{self.monitor} reached the target {self.target} ({value:.6g})"
            )
        if state.bad_epochs >= self.patience and state.bad_epochs > 0:
            epochs = f"{state.bad_epochs} {'epoch' if state.bad_epochs == 1 else 'epochs'}"
            if self.min_delta:  # the reference need not be the best value (nor fit's best model)
                reason = (
                    f"{self.monitor} did not improve by more than min_delta={self.min_delta:g} "
                    f"on {state.best:.6g} (epoch {state.best_epoch}) for {epochs}"
                )
            else:
                reason = (
                    f"{self.monitor} did not improve for {epochs} "
                    f"(best {state.best:.6g} at epoch {state.best_epoch})"
                )
            return dataclasses.replace(state, stop_reason=reason)
        return state


def _number(monitor: str, value: object) -> float:
    """The monitored value as a float, or a ``TypeError`` that says what to pass."""
    if isinstance(value, list | tuple):  # train_epoch's means of a stacked state
        raise TypeError(
            f"EarlyStopping watches one number, but {monitor!r} holds one value per model "
            f"({len(value)}, the means of a stacked state). Pass one model's, "
            f"metrics[{monitor!r}][i], or a summary such as min(metrics[{monitor!r}])."
        )
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(
            f"EarlyStopping watches {monitor!r}, which must be a number; got {value!r}."
        ) from None
