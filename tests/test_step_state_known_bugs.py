"""Known bugs in ``fnloop/step.py`` and ``fnloop/state.py``, each a strict xfail.

Found by a line-by-line read (h78). Each test states the behaviour the code should have;
when a fix lands, the test passes, the strict xfail fails, and its marker is removed.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnloop as fl
from fnloop import optim


def _mse(model, batch):
    x, y = batch
    return {"loss": F.mse_loss(model(x), y)}


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(n)]


def _state() -> fl.TrainState:
    torch.manual_seed(0)
    return fl.TrainState.create(nn.Linear(3, 1), tx=optim.sgd(1.0), device="cpu")


def test_a_vmapped_eval_step_returns_a_number_metric_named_keys() -> None:
    stacked = fl.stack_states([_state(), _state()])
    eval_step = fl.make_eval_step(lambda model, x: {"loss": model(x).mean(), "keys": 3})
    metrics = torch.func.vmap(eval_step, in_dims=(0, None))(stacked, torch.randn(2, 3))
    assert metrics["keys"].tolist() == [3.0, 3.0]


def test_a_window_longer_than_the_steps_accumulation_is_an_error() -> None:
    state = _state()
    by_four = fl.make_train_step(_mse, accumulation_steps=4)
    for batch in _batches(3):
        state, _ = by_four(state, batch)
    assert state.micro_step == 3
    with pytest.raises(ValueError, match="accumulation"):
        fl.make_train_step(_mse, accumulation_steps=2)(state, _batches(4)[3])


def test_an_open_window_given_to_a_step_without_accumulation_is_an_error() -> None:
    state, _ = fl.make_train_step(_mse, accumulation_steps=2)(_state(), _batches(1)[0])
    assert state.grad_accum is not None
    with pytest.raises(ValueError, match="accumulation"):
        fl.make_train_step(_mse)(state, _batches(2)[1])


def test_an_eager_train_step_trains_under_an_outer_no_grad() -> None:
    state, batch = _state(), _batches(1)[0]
    want, _ = fl.make_train_step(_mse)(state, batch)
    with torch.no_grad():
        got, _ = fl.make_train_step(_mse)(state, batch)
    torch.testing.assert_close(got.params, want.params)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Slotted(fl.TrainState):
    best: float = 0.0


def test_replace_of_a_slotted_subclass_names_the_subclass() -> None:
    state = _Slotted.create(nn.Linear(3, 1), tx=optim.sgd(0.1), device="cpu")
    with pytest.raises(TypeError, match=r"^_Slotted has no fields \['bogus'\]"):
        state.replace(bogus=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Cached(fl.TrainState):
    @functools.cached_property
    def n_values(self) -> int:
        return sum(t.numel() for t in self.params.values())


def test_replace_does_not_carry_a_cached_property_over() -> None:
    state = _Cached.create(nn.Linear(3, 1), tx=optim.sgd(0.1), device="cpu")
    assert state.n_values == 4
    bigger = state.replace(params={"weight": torch.zeros(5, 3), "bias": torch.zeros(5)})
    assert bigger.n_values == 20


@dataclasses.dataclass(frozen=True, kw_only=True)
class _NoInit(fl.TrainState):
    tag: str = dataclasses.field(default="t", init=False, metadata={"static": True})


def test_a_subclass_with_an_init_false_field_clones() -> None:
    state = _NoInit.create(nn.Linear(3, 1), tx=optim.sgd(0.1), device="cpu")
    assert state.clone().tag == "t"


def test_a_number_loss_scale_is_rejected_when_the_step_is_made() -> None:
    with pytest.raises(TypeError, match="DynamicLossScale"):
        fl.make_train_step(_mse, precision="fp16", loss_scale=2.0**16)


def test_donate_takes_true_or_false() -> None:
    with pytest.raises(TypeError, match="donate"):
        fl.make_train_step(_mse, donate="no")


@pytest.mark.xfail(
    strict=True,
    reason="the EMA starts at the weights of the first applied update only when that step "
    "may skip (on_nonfinite='skip' or fp16): after skipped updates, a step made with "
    "on_nonfinite=None averages from the initial weights instead (docs/guide.md, section 1)",
)
def test_the_ema_starts_at_the_first_applied_update_whatever_the_policy() -> None:
    torch.manual_seed(0)
    state = fl.TrainState.create(nn.Linear(3, 1), tx=optim.sgd(0.5), device="cpu", ema_decay=0.9)
    x, y = _batches(1)[0]
    skipped, _ = fl.make_train_step(_mse, on_nonfinite="skip")(state, (x * math.nan, y))
    assert int(skipped.skipped_steps) == skipped.step == 1
    new, _ = fl.make_train_step(_mse)(skipped, (x, y))
    torch.testing.assert_close(new.ema, new.params)
