"""Mixed precision: autocast settings and a dynamic loss scale kept in the state (I3)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import warnings
from typing import Literal, NamedTuple

import torch

from fnloop.optim.base import scalar_dtype

Precision = Literal["bf16", "fp16"] | None

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: object) -> None:
    """Raises ``ValueError`` unless ``precision`` is ``None``, ``"bf16"`` or ``"fp16"``."""
    if precision is not None and not (isinstance(precision, str) and precision in _DTYPES):
        raise ValueError(f"precision must be None, 'bf16' or 'fp16'; got {precision!r}.")


def warn_if_no_effect(precision: Literal["bf16", "fp16"], weight: torch.Tensor | None) -> None:
    """Warns (once per call site) that ``precision`` does not lower float64 weights'
    operations: autocast runs only float32 operations in lower precision (an fp16 loss
    scale still scales the loss). ``weight``: the model's first trainable parameter, or
    ``None`` (no warning). Eager steps with a ``precision`` call this; compiled ones do
    not (their check keeps dynamo from tracing the call)."""
    if weight is not None and weight.dtype == torch.float64:
        warnings.warn(
            f"precision={precision!r} does not lower this float64 model's operations: "
            f"autocast runs only float32 operations in {precision}, so the model computes "
            "in float64. Make the model float32 (module.float() before "
            "TrainState.create) to train in mixed precision, or leave precision out.",
            UserWarning,
            stacklevel=4,  # the caller of a made step (make_train_step's wrapper, __call__)
        )


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """``torch.autocast`` for ``precision`` on ``device``'s type, or a no-op for ``None``."""
    if precision is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


class LossScaleState(NamedTuple):
    """The dynamic loss scale: the current scale and the count of finite steps since a change."""

    scale: torch.Tensor
    growth_tracker: torch.Tensor


@dataclasses.dataclass(frozen=True)
class DynamicLossScale:
    """Dynamic loss scaling with ``torch.amp.GradScaler``'s rules.

    The loss is multiplied by ``scale`` before the backward pass and the gradients are
    divided by it. A step whose gradients contain inf or NaN is skipped and the scale is
    multiplied by ``backoff_factor``; after ``growth_interval`` finite steps in a row it
    is multiplied by ``growth_factor``.

    >>> import torch
    >>> ls = DynamicLossScale(init_scale=8.0, growth_interval=2)
    >>> s = ls.init(torch.device("cpu"))
    >>> for found_inf in [False, False, True]:
    ...     s = ls.update(s, torch.tensor(found_inf))
    ...     print(float(s.scale))
    8.0
    16.0
    8.0
    """

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self) -> None:
        # Written so that NaN fails each check.
        if not 0.0 < self.init_scale < math.inf:
            raise ValueError(f"init_scale must be finite and > 0; got {self.init_scale}.")
        if not 0.0 < float(torch.tensor(float(self.init_scale), dtype=torch.float32)) < math.inf:
            raise ValueError(
                f"init_scale is kept in float32, where {self.init_scale} is "
                f"{'0' if self.init_scale < 1 else 'inf'}; pick one between about 1e-45 and "
                f"3.4e38 (the default is 2**16)."
            )
        if not 1.0 < self.growth_factor < math.inf:
            raise ValueError(f"growth_factor must be finite and > 1; got {self.growth_factor}.")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1); got {self.backoff_factor}.")
        interval = self.growth_interval
        if isinstance(interval, bool) or not isinstance(interval, numbers.Integral) or interval < 1:
            raise ValueError(
                f"growth_interval must be an integer >= 1 (updates without overflow before "
                f"the scale grows); got {interval!r}."
            )

    def init(self, device: torch.device) -> LossScaleState:
        """The state before the first step."""
        return LossScaleState(
            scale=torch.full((), self.init_scale, dtype=torch.float32, device=device),
            growth_tracker=torch.zeros((), dtype=torch.int32, device=device),
        )

    def update(self, state: LossScaleState, found_inf: torch.Tensor) -> LossScaleState:
        """The state after a step; ``found_inf`` is a 0-d bool tensor (no host sync)."""
        tracker = torch.where(found_inf, 0, state.growth_tracker + 1)
        # (>=, not GradScaler's ==: a state resumed under a shorter interval, its count
        # past it, grows at its next finite step instead of never.) The int32 count is
        # compared with an int32 number: 2**31 would wrap to -2**31, and grow every step.
        due = tracker >= min(self.growth_interval, torch.iinfo(torch.int32).max)
        # As GradScaler's kernel: the float32 scale times the factor in float64, rounded
        # to float32 once (a float32 product would round the factor first, and drift from
        # GradScaler's scale for factors that are not powers of two).
        wide = state.scale.to(scalar_dtype(state.scale.device))
        grown = (wide * self.growth_factor).to(state.scale.dtype)
        backed_off = (wide * self.backoff_factor).to(state.scale.dtype)
        grow = due & torch.isfinite(grown)
        scale = torch.where(found_inf, backed_off, torch.where(grow, grown, state.scale))
        tracker = torch.where(due, 0, tracker)
        return LossScaleState(scale=scale, growth_tracker=tracker.to(torch.int32))
