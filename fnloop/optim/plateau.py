"""``reduce_on_plateau``: a learning rate that drops when a monitored metric stalls.

The decision logic follows ``torch.optim.lr_scheduler.ReduceLROnPlateau`` exactly, as a
pure function of tensors (no host sync, and it works per model under ``vmap``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Literal

import optree
import torch

from fnloop import _tree
from fnloop.optim.base import scalar_dtype

_INT64_MAX = torch.iinfo(torch.int64).max

METRIC_SHAPE_MSG = (
    "reduce_on_plateau was fed a metric of shape {got}, but its state has shape {want}. "
    "Feed one number for a state of one model, or one per model for a stacked state (the "
    "list that validate_epoch returns for it)."
)


@dataclasses.dataclass(frozen=True)
class ReduceOnPlateau:
    """Configuration of a plateau-reduced learning rate; made by :func:`reduce_on_plateau`."""

    learning_rate: float
    mode: Literal["min", "max"] = "min"
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: Literal["rel", "abs"] = "rel"
    cooldown: int = 0
    min_lr: float = 0.0
    eps: float = 1e-8

    def init(self, device: torch.device) -> ReduceOnPlateauState:
        """The state before any metric was seen."""
        f64 = scalar_dtype(device)
        return ReduceOnPlateauState(
            lr=torch.tensor(self.learning_rate, dtype=f64, device=device),
            best=torch.tensor(
                math.inf if self.mode == "min" else -math.inf, dtype=f64, device=device
            ),
            num_bad_epochs=torch.zeros((), dtype=torch.int64, device=device),
            cooldown_counter=torch.zeros((), dtype=torch.int64, device=device),
            config=self,
        )

    def is_better(self, current: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
        """Whether ``current`` improves on ``best`` by more than the threshold."""
        if self.mode == "min" and self.threshold_mode == "rel":
            return current < best * (1.0 - self.threshold)
        if self.mode == "min":
            return current < best - self.threshold
        if self.threshold_mode == "rel":
            return current > best * (self.threshold + 1.0)
        return current > best + self.threshold

    def observe(self, state: ReduceOnPlateauState, metric: Any) -> ReduceOnPlateauState:
        """Feeds one epoch's metric; returns the new state (``lr`` possibly reduced)."""
        current = torch.as_tensor(metric, dtype=state.best.dtype, device=state.best.device)
        if current.shape != state.best.shape:
            # One number for every model, or else the shape would spread to the lr.
            if current.numel() != 1:
                want = tuple(state.best.shape)
                raise ValueError(METRIC_SHAPE_MSG.format(got=tuple(current.shape), want=want))
            current = current.reshape(())
        better = self.is_better(current, state.best)
        best = torch.where(better, current, state.best)
        bad = torch.where(better, 0, state.num_bad_epochs + 1)
        in_cooldown = state.cooldown_counter > 0
        cooldown = torch.where(in_cooldown, state.cooldown_counter - 1, state.cooldown_counter)
        bad = torch.where(in_cooldown, 0, bad)
        # The counts are int64 tensors, and torch wraps a larger Python int (2**63 compares
        # as -2**63): a count that never ends is one that ends past what they reach.
        reduce = bad > min(self.patience, _INT64_MAX)
        new_lr = torch.clamp(state.lr * self.factor, min=self.min_lr)
        lr = torch.where(reduce & (state.lr - new_lr > self.eps), new_lr, state.lr)
        return ReduceOnPlateauState(
            lr=lr,
            best=best,
            num_bad_epochs=torch.where(reduce, 0, bad),
            cooldown_counter=torch.where(reduce, min(self.cooldown, _INT64_MAX), cooldown),
            config=self,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReduceOnPlateauState:
    """State of a plateau-reduced learning rate; ``config`` is static (not a leaf)."""

    lr: torch.Tensor
    best: torch.Tensor
    num_bad_epochs: torch.Tensor
    cooldown_counter: torch.Tensor
    config: ReduceOnPlateau


_tree.register_dataclass(ReduceOnPlateauState, static=("config",))


def reduce_on_plateau(
    learning_rate: float,
    *,
    mode: Literal["min", "max"] = "min",
    factor: float = 0.1,
    patience: int = 10,
    threshold: float = 1e-4,
    threshold_mode: Literal["rel", "abs"] = "rel",
    cooldown: int = 0,
    min_lr: float = 0.0,
    eps: float = 1e-8,
) -> ReduceOnPlateau:
    """A learning rate that is multiplied by ``factor`` when a metric stops improving.

    Pass it wherever a learning rate is taken (``optim.adam(optim.reduce_on_plateau(1e-3))``).
    ``fit`` feeds it the monitored metric at each epoch end; in a custom loop call
    :func:`observe_metric`. The arguments mean what they mean for
    ``torch.optim.lr_scheduler.ReduceLROnPlateau``.

    Args:
      learning_rate: the initial learning rate.
      mode: ``"min"`` when lower is better, ``"max"`` when higher is.
      factor: multiplier applied on a plateau, in ``(0, 1)``.
      patience: epochs without improvement tolerated before reducing.
      threshold: how much better counts as an improvement.
      threshold_mode: ``"rel"`` (relative to the best) or ``"abs"``.
      cooldown: epochs to wait after a reduction before counting bad epochs again.
      min_lr: the learning rate never goes below this.
      eps: reductions smaller than this are ignored.

    Example:
      >>> import torch
      >>> from fnloop import optim
      >>> tx = optim.sgd(optim.reduce_on_plateau(1.0, factor=0.5, patience=0))
      >>> state = tx.init({"w": torch.zeros(1)})
      >>> for loss in [1.0, 1.0, 1.0]:
      ...     state = optim.observe_metric(state, loss)
      >>> [float(lr) for lr in optim.learning_rates(state)]
      [0.25]
    """
    if mode not in ("min", "max"):
        raise ValueError(f"reduce_on_plateau mode must be 'min' or 'max'; got {mode!r}.")
    if threshold_mode not in ("rel", "abs"):
        raise ValueError(
            f"reduce_on_plateau threshold_mode must be 'rel' or 'abs'; got {threshold_mode!r}."
        )
    if not 0.0 < factor < 1.0:
        raise ValueError(f"reduce_on_plateau factor must be in (0, 1); got {factor}.")
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, numbers.Real):
        raise TypeError(
            f"reduce_on_plateau learning_rate must be a real number; got {learning_rate!r} "
            f"({type(learning_rate).__name__})."
        )
    if not 0.0 <= learning_rate < math.inf:
        raise ValueError(
            f"reduce_on_plateau learning_rate must be finite and >= 0; got {learning_rate}."
        )
    # Counts of epochs, kept as ints: a float cooldown made the state's counter a float
    # tensor at the first reduction, which a checkpoint written before it no longer fit.
    patience = _epochs("patience", patience)
    cooldown = _epochs("cooldown", cooldown)
    if not min_lr >= 0.0:  # NaN too: torch.clamp(lr, min=nan) is NaN, so no reduction
        raise ValueError(f"reduce_on_plateau min_lr must be >= 0; got {min_lr}.")
    return ReduceOnPlateau(
        learning_rate=float(learning_rate),
        mode=mode,
        factor=factor,
        patience=patience,
        threshold=threshold,
        threshold_mode=threshold_mode,
        cooldown=cooldown,
        min_lr=min_lr,
        eps=eps,
    )


def _epochs(name: str, value: Any) -> int:
    """``value`` as an int, or ``ValueError`` unless it is a whole number >= 0."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 0:
        return int(value)  # as it is: through a float, 2**63 - 1 became 2**63
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not float(value).is_integer()
        or value < 0
    ):
        raise ValueError(
            f"reduce_on_plateau {name} counts epochs: a whole number >= 0; got {name}={value!r}."
        )
    return int(float(value))


def _is_plateau(node: Any) -> bool:
    return isinstance(node, ReduceOnPlateauState)


def observe_metric(opt_state: Any, metric: Any) -> Any:
    """Feeds ``metric`` to every ``reduce_on_plateau`` in ``opt_state``; returns the new state.

    States without a plateau come back unchanged (the same object).
    """
    if not has_plateau(opt_state):
        return opt_state
    return optree.tree_map(
        lambda node: node.config.observe(node, metric) if _is_plateau(node) else node,
        opt_state,
        is_leaf=_is_plateau,
        namespace=_tree.NAMESPACE,
    )


def restart_plateaus(opt_state: Any) -> Any:
    """``opt_state`` with every ``reduce_on_plateau``'s progress (best value, bad epochs,
    cooldown) as before its first metric, its learning rate kept: for a run that goes on
    to follow another metric."""

    def restart(node: Any) -> Any:
        if not _is_plateau(node):
            return node
        fresh = node.config.init(node.best.device)
        return dataclasses.replace(
            node,
            best=fresh.best.expand_as(node.best).clone(),
            num_bad_epochs=torch.zeros_like(node.num_bad_epochs),
            cooldown_counter=torch.zeros_like(node.cooldown_counter),
        )

    return optree.tree_map(restart, opt_state, is_leaf=_is_plateau, namespace=_tree.NAMESPACE)


def plateau_nodes(opt_state: Any) -> list[ReduceOnPlateauState]:
    """The states of the ``reduce_on_plateau`` learning rates in ``opt_state``."""
    return [
        n
        for n in optree.tree_leaves(opt_state, is_leaf=_is_plateau, namespace=_tree.NAMESPACE)
        if _is_plateau(n)
    ]


def has_plateau(opt_state: Any) -> bool:
    """Whether ``opt_state`` contains a ``reduce_on_plateau`` learning rate."""
    return bool(plateau_nodes(opt_state))
