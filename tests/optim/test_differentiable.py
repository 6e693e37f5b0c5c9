"""Differentiating through ``tx.update`` (meta-learning, learned hyper-parameters).

The pure update must give correct gradients under both ``torch.autograd`` and
``torch.func.grad``: an in-place op on a tensor that a backward formula needs either
raises (autograd) or silently gives wrong gradients (``torch.func``). The reference is
finite differences (``torch.autograd.gradcheck``) in float64.
"""

from __future__ import annotations

import pytest
import torch

from fnloop import optim

OPTIMIZERS = {
    "sgd": lambda: optim.sgd(0.1),
    "sgd-momentum-nesterov-wd": lambda: optim.sgd(
        0.1, momentum=0.9, nesterov=True, weight_decay=0.1
    ),
    "sgd-dampening": lambda: optim.sgd(0.1, momentum=0.9, dampening=0.5),
    "adam": lambda: optim.adam(0.1),
    "adam-amsgrad-l2": lambda: optim.adam(0.1, amsgrad=True, weight_decay=0.1),
    "adamw": lambda: optim.adamw(0.1),
    "rmsprop": lambda: optim.rmsprop(0.1),
    "rmsprop-centered-momentum": lambda: optim.rmsprop(0.1, centered=True, momentum=0.9),
    "adagrad-lr-decay": lambda: optim.adagrad(0.1, lr_decay=0.1),
    "clip-norm-adam-cosine": lambda: optim.chain(
        optim.clip_by_global_norm(0.5), optim.adam(optim.cosine_schedule(0.1, 10))
    ),
    "clip-value-sgd": lambda: optim.chain(optim.clip(10.0), optim.sgd(0.1, momentum=0.9)),
}


def three_updates(tx: optim.GradientTransformation):
    """``f(g)``: a weighted sum of three updates made from gradients that depend on ``g``.

    Two parameters of different shapes: torch's foreach ops (one call for the list)
    differentiate differently from one tensor.
    """
    gen = torch.Generator().manual_seed(0)
    params = {
        "w": torch.randn(3, 4, dtype=torch.float64, generator=gen),
        "b": torch.randn(4, dtype=torch.float64, generator=gen),
    }
    weights = [
        {n: torch.randn(p.shape, dtype=torch.float64, generator=gen) for n, p in params.items()}
        for _ in range(3)
    ]

    def f(g: torch.Tensor) -> torch.Tensor:
        state = tx.init(params)
        total = torch.zeros((), dtype=torch.float64)
        for k, w in enumerate(weights):
            grads = {"w": g * (k + 1), "b": g.sum(0) - k}
            updates, state = tx.update(grads, state, params)
            total = total + sum((updates[n] * w[n]).sum() for n in params)
        return total

    return f


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_gradients_through_the_update_are_right(name: str) -> None:
    f = three_updates(OPTIMIZERS[name]())
    g = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g.requires_grad_()
    assert torch.autograd.gradcheck(f, (g,))
    (expected,) = torch.autograd.grad(f(g), g)
    got = torch.func.grad(f)(g.detach())
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_gradient_with_respect_to_the_learning_rate() -> None:
    """A learned learning rate: the gradient of a loss after one SGD-momentum step."""
    params = {"w": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    grads = {n: torch.randn_like(p) for n, p in params.items()}

    def after_two_steps(lr: torch.Tensor) -> torch.Tensor:
        tx = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(lr, momentum=0.9))
        state, p = tx.init(params), params
        for _ in range(2):
            updates, state = tx.update(grads, state, p)
            p = optim.apply_updates(p, updates)
        return sum((v**2).sum() for v in p.values())

    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(after_two_steps, (lr,))
