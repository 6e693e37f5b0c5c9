"""User code written against fnloop's public API with full annotations.

``tests/test_typing.py`` runs it (it must work) and type-checks it with ``mypy --strict``
(a typed user must not need casts or ignores for what the docs show). ``assert_type``
pins the types the API gives back.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import assert_type

import fnloop as fl
from fnloop import optim
from fnloop.typing import Metrics, Params


def make_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def make_loader() -> DataLoader[tuple[Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)


def training_step(model: fl.BoundModel, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    x, y = batch
    logits: Tensor = model(x)
    return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MyState(fl.TrainState):
    """A state with a field of its own (guide section 1): every function keeps the class."""

    best: Tensor


class Sign(fl.callbacks.Callback):
    """A hook overridden with parameter names of its own."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_train_batch_end(
        self, st: fl.TrainState, out: Mapping[str, Tensor], b: object, i: int
    ) -> fl.TrainState | None:
        self.seen.append(i)
        return None


class CSVWithGap(fl.callbacks.CSVLogger):
    """A logger that adds a metric to the history before its row is written."""

    def on_validation_epoch_end(
        self, state: fl.TrainState, metrics: Mapping[str, float], /
    ) -> fl.TrainState | None:
        gap = metrics["valid/loss"] - state.history["train"]["loss"][-1]
        state = state.replace(history=fl.state.append_history(state.history, "valid", {"gap": gap}))
        super().on_validation_epoch_end(state, metrics)
        return state


def negate() -> optim.GradientTransformation:
    """A transform of one's own, its functions named as in optax."""

    def init(p: Params) -> optim.EmptyState:
        return optim.EmptyState()

    def update(
        g: Params, s: optim.EmptyState, params: Params | None = None
    ) -> tuple[Params, optim.EmptyState]:
        return {n: -u for n, u in g.items()}, s

    return optim.GradientTransformation(init, update)


def steps_and_subclasses() -> None:
    torch.manual_seed(0)
    state = MyState.create(make_net(), tx=optim.adam(1e-2), device="cpu", best=torch.tensor(0.0))
    assert_type(state, MyState)
    assert_type(state.replace(best=torch.tensor(1.0)), MyState)
    assert_type(state.clone(), MyState)
    assert_type(state.loss_scale, fl.LossScaleState | None)

    step = fl.make_train_step(training_step, accumulation_steps=2)
    assert step.accumulation_steps == 2 and not step.donate
    batch = next(iter(make_loader()))
    new, metrics = step(state, batch)
    assert_type(new, MyState)
    assert_type(metrics, Metrics)
    assert isinstance(new, MyState) and float(new.best) == 0.0
    eval_step = fl.make_eval_step(training_step)
    assert eval_step.use_ema
    assert_type(eval_step(new, batch), Metrics)
    pair = (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    assert_type(fl.to_device(pair, "cpu"), tuple[Tensor, Tensor])

    stacked = fl.stack_states([state, state.clone()])
    assert_type(stacked, MyState)
    assert_type(fl.unstack_states(stacked), list[MyState])

    trained, means = fl.train_epoch(state, step, make_loader())
    assert_type(trained, MyState)
    loss: float = means["loss"]
    assert loss > 0
    assert_type(fl.distributed.gather(loss), list[float])

    sgd_neg = optim.chain(negate(), optim.scale(0.1))
    plain = fl.TrainState.create(make_net(), tx=sgd_neg, device="cpu")
    assert_type(fl.make_train_step(training_step)(plain, batch)[0], fl.TrainState)


def fit_and_files(root: Path) -> None:
    torch.manual_seed(0)
    tx = optim.partition(
        {"decay": optim.adamw(1e-2), "no_decay": optim.adamw(1e-2, weight_decay=0.0)},
        lambda name: "no_decay" if name.endswith("bias") else "decay",
    )
    state = MyState.create(make_net(), tx=tx, device="cpu", best=torch.tensor(0.0))
    sign = Sign()
    out = fl.fit(
        state,
        training_step,
        {"train": make_loader(), "valid": make_loader()},
        max_epochs=2,
        callbacks=[sign, CSVWithGap(root / "m.csv")],
        out_dir=os.fspath(root / "run"),
        progress=False,
        log_to_console=False,
    )
    assert_type(out, MyState)
    assert sign.seen and len(out.history["valid"]["gap"]) == 2

    path = fl.save_checkpoint(root / "c.pt", out)
    assert_type(fl.load_checkpoint(path, like=state), MyState)
    restored = fl.checkpoint.load_checkpoint_with_extra(path, like=state)
    assert restored.path == path
    fl.save_model(root / "m.pt", out)
    net = fl.load_model(root / "m.pt", make_net())
    assert_type(net, nn.Sequential)


def sweep() -> list[float]:
    """Several models at once: a per-model mean is a list."""
    torch.manual_seed(0)
    states = [
        fl.TrainState.create(make_net(), tx=optim.sgd(lr), device="cpu") for lr in (0.1, 0.01)
    ]
    step = fl.make_train_step(training_step)
    vstep = torch.func.vmap(step, in_dims=(0, None), randomness="different")
    stacked, means = fl.train_epoch(fl.stack_states(states), vstep, make_loader())
    per_model: list[float] = means["loss"]
    assert len(per_model) == 2 and len(fl.unstack_states(stacked)) == 2
    return per_model


def main(root: Path) -> None:
    steps_and_subclasses()
    fit_and_files(root)
    sweep()
