"""Type aliases used across fnloop's public API."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import torch

Params: TypeAlias = dict[str, torch.Tensor]
"""Named tensors, keyed like ``module.named_parameters()``."""
Grads: TypeAlias = dict[str, torch.Tensor]
"""Gradients with the same keys as the parameters."""
Updates: TypeAlias = Any
"""A pytree of tensors shaped like the parameters, added to them by ``apply_updates``."""
OptState: TypeAlias = Any
"""The state of a ``GradientTransformation``: a pytree of tensors."""
Batch: TypeAlias = Any
"""Any nesting of tensors: a tensor, tuple, list, dict, namedtuple or dataclass."""
Metrics: TypeAlias = dict[str, torch.Tensor]
"""Named 0-d tensors returned by a step."""
ScalarOrSchedule: TypeAlias = "float | torch.Tensor | Callable[[Any], Any]"
"""A learning rate: a number, a 0-d tensor, or a schedule ``step -> lr``."""
History: TypeAlias = Mapping[str, Mapping[str, tuple[float, ...]]]
"""``{"train": {"loss": (per-epoch values, ...)}, "valid": {...}}``, immutable."""
