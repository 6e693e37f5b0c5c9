"""Stacking and unstacking states (fnloop/ensemble.py) and batches (fnloop/batch.py):
inputs that differ in ways a stacked state cannot hold, and batch shapes."""

from __future__ import annotations

import dataclasses

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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scored(fl.TrainState):
    best: object = None  # a leaf: stacked when it is a tensor
    tag: str = dataclasses.field(default="", metadata={"static": True})


def test_a_field_that_is_no_tensor_in_a_later_state_is_named():
    """Only ``states[0]``'s leaves were checked to be tensors: a float in ``states[1]``
    failed with ``AttributeError: 'float' object has no attribute 'shape'``."""
    one = Scored.create(nn.Linear(3, 2), tx=optim.sgd(0.1), device="cpu", best=torch.tensor(1.0))
    two = one.replace(best=2.0)
    with pytest.raises(TypeError, match=r"states\[1\]'s leaf 'best' is a float"):
        fl.stack_states([one, two])
    with pytest.raises(TypeError, match=r"leaf 'best' is a float"):
        fl.stack_states([two, one])
