"""Type aliases used across fnloop's public API."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import torch

Params: TypeAlias = dict[str, torch.Tensor]
"""Named tensors, keyed like ``module.named_parameters()``."""
Updates: TypeAlias = Any
"""A pytree of tensors shaped like the parameters, added to them by ``apply_updates``."""
OptState: TypeAlias = Any
"""The state of a ``GradientTransformation``: a pytree of tensors."""
Batch: TypeAlias = Any
"""Any nesting of tensors: a tensor, tuple, list, dict, namedtuple or dataclass."""
Metrics: TypeAlias = dict[str, torch.Tensor]
"""Named 0-d tensors returned by a step."""
Schedule: TypeAlias = Callable[[Any], Any]
"""A schedule: ``step -> value`` (a number or a 0-d tensor), such as ``optim.cosine_schedule``."""
History: TypeAlias = Mapping[str, Mapping[str, tuple[float, ...]]]
"""``{"train": {"loss": (per-epoch values, ...)}, "valid": {...}}``, immutable."""
EpochMeans: TypeAlias = dict[str, Any]
"""An epoch's metric means: a float per name, or for a stacked state one float per model."""
