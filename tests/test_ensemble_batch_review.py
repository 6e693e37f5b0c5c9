"""Stacking and unstacking states (fnloop/ensemble.py) and batches (fnloop/batch.py):
inputs that differ in ways a stacked state cannot hold, and batch shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fnloop as fl
from fnloop import optim


def make(seed: int = 0, device: str = "cpu", **kwargs) -> fl.TrainState:
    torch.manual_seed(seed)
    return fl.TrainState.create(nn.Linear(3, 2), tx=optim.sgd(0.1), device=device, **kwargs)


def test_stacking_states_on_different_devices_names_the_tensor_and_the_devices():
    """``torch.stack`` of tensors on two devices raised torch's own error, naming neither
    the state nor the tensor (meta stands in for a second accelerator)."""
    with pytest.raises(ValueError, match=r"states\[1\] leaf 'params\.\w+'.*meta.*cpu"):
        fl.stack_states([make(0), make(1, device="meta")])
