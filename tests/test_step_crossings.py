"""Crossings of the train step's options against one hand-written torch loop.

Each option alone is tested in test_step.py; here accumulation, clipping (by norm, by
value, both in either order), the skip policy with non-finite micro-batches inside and at
the end of windows, EMA, donation, BatchNorm, frozen parameters and parameter groups run
together, in float64, and every part of the state is compared with the hand loop's.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnloop as fl
from fnloop import optim

NORM, VALUE = 0.3, 0.05


class Net(nn.Module):
    def __init__(self, bn: bool, frozen: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(5, 16, bias=not bn)
        self.bn = nn.BatchNorm1d(16) if bn else nn.Identity()
        self.l2 = nn.Linear(16, 3)
        if frozen:
            self.l1.weight.requires_grad_(False)
        self.double()

    def forward(self, x):
        return self.l2(torch.tanh(self.bn(self.l1(x))))


def classify(model, batch):
    x, y = batch["x"], batch["y"]
    logits = model(x)
    return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).double().mean()}


def make_batches(kinds, seed=1):
    """One batch per entry: ``"nan"`` puts a NaN in the inputs (loss, gradients and batch
    statistics NaN), ``"empty"`` ignores every target (a NaN loss, 0/0, with zero gradients)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for kind in kinds:
        x = torch.randn(8, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=g)
        if kind == "nan":
            x[3, 1] = math.nan
        elif kind == "empty":
            y = torch.full_like(y, -100)
        out.append({"x": x, "y": y})
    return out


def is_bias(name):
    return name.endswith("bias") or name.startswith("bn.")


def txs(groups):
    if groups:
        return optim.partition(
            {"decay": optim.adamw(1e-2, weight_decay=0.1), "no": optim.sgd(0.05, momentum=0.9)},
            lambda n: "no" if is_bias(n) else "decay",
        )
    return optim.adamw(1e-2, weight_decay=0.05)


def torch_optimizers(named, groups):
    if groups:
        decay = [p for n, p in named if not is_bias(n)]
        no = [p for n, p in named if is_bias(n)]
        return [
            torch.optim.AdamW(decay, 1e-2, weight_decay=0.1, fused=True),
            torch.optim.SGD(no, 0.05, momentum=0.9, fused=True),
        ]
    return [torch.optim.AdamW([p for _, p in named], 1e-2, weight_decay=0.05, fused=True)]


def hand_loop(module, data, *, k, clip, ema_decay, skip, groups):
    """The torch loop: ``(loss / k).backward()`` per micro-batch, clipping and one step
    per window; with ``skip``, a window with a non-finite loss or gradient makes no step
    (nor EMA update), and a non-finite loss leaves the buffers as before its micro-batch."""
    model = copy.deepcopy(module).train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opts = torch_optimizers(named, groups)
    ema = None
    if ema_decay is not None:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay)
        )
    losses, norms, skipped, bad = [], [], 0, False
    for i, batch in enumerate(data):
        kept = {n: b.clone() for n, b in model.named_buffers()}
        loss = classify(model, batch)["loss"]
        (loss / k).backward()
        losses.append(loss.detach())
        if skip and not torch.isfinite(loss):
            bad = True
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(kept[n])
        if (i + 1) % k:
            continue
        grads = [p.grad for p in params]
        norm = torch.nn.utils.clip_grad_norm_(params, math.inf)  # only the total norm
        for how in clip:
            if how == "norm":
                torch.nn.utils.clip_grad_norm_(params, NORM)
            else:
                torch.nn.utils.clip_grad_value_(params, VALUE)
        if skip and (bad or not all(torch.isfinite(g).all() for g in grads)):
            skipped += 1
            norms.append(None)  # a skipped update uses no gradients
        else:
            for opt in opts:
                opt.step()
            if ema is not None:
                ema.update_parameters(model)
            norms.append(norm)
        for opt in opts:
            opt.zero_grad()
        bad = False
    return model, named, opts, ema, losses, norms, skipped


def moments(opt_state):
    """``{(name, key): tensor}`` of fnloop's optimizer state, keyed as torch's."""
    out = {}
    if isinstance(opt_state, optim.ScaleByAdamState):
        for name in opt_state.mu:
            out[name, "exp_avg"], out[name, "exp_avg_sq"] = opt_state.mu[name], opt_state.nu[name]
            out[name, "step"] = opt_state.count
    elif isinstance(opt_state, optim.TraceState):
        out.update({(n, "momentum_buffer"): b for n, b in opt_state.momentum_buffer.items()})
    elif isinstance(opt_state, (tuple, dict)):
        for node in opt_state.values() if isinstance(opt_state, dict) else opt_state:
            out.update(moments(node))
    return out


@pytest.mark.parametrize(
    ("k", "clip", "kinds", "flags"),
    [
        # Batches: "." clean, "n" a NaN input, "e" every target ignored (see make_batches).
        (2, "norm", "......", "ema bn"),
        (2, "value+norm", "......", "donate groups"),
        (3, "norm+value", "......", "ema frozen groups"),
        (2, "norm", "..n...", "ema bn"),  # a NaN opens the second window
        (3, "value", "n...n.", "ema bn donate groups"),  # the first update is skipped
        (2, "norm", "ne...e", "ema bn frozen groups"),  # a NaN loss closes a window
        (3, "", ".e....", "ema bn donate"),  # a NaN loss, finite gradients, mid-window
        (1, "norm+value", "n.e.", "ema bn frozen groups donate"),
    ],
)
def test_crossed_options_match_a_hand_loop(k, clip, kinds, flags):
    clip = clip.split("+") if clip else []
    kinds = [{"n": "nan", "e": "empty"}.get(c) for c in kinds]
    ema_decay = 0.9 if "ema" in flags else None
    donate, bn, frozen, groups = (f in flags.split() for f in ("donate", "bn", "frozen", "groups"))
    skip = any(kinds)
    module = Net(bn, frozen)
    data = make_batches(kinds)
    model, named, opts, ema, losses, norms, skipped = hand_loop(
        module, data, k=k, clip=clip, ema_decay=ema_decay, skip=skip, groups=groups
    )
    clips = [optim.clip_by_global_norm(NORM) if c == "norm" else optim.clip(VALUE) for c in clip]
    state = fl.TrainState.create(
        module, tx=optim.chain(*clips, txs(groups)), ema_decay=ema_decay, device="cpu"
    )
    state = state.clone() if donate else state
    step = fl.make_train_step(
        classify,
        accumulation_steps=k,
        on_nonfinite="skip" if skip else None,
        donate=donate,
        grad_norm=True,
    )
    # Bit for bit where the math is the same: torch's fused step, and dividing by 2 before
    # or after summing; the skip policy's pure update (and 1/3) round otherwise.
    exact = not skip and k != 3
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-11, "atol": 1e-13}
    updates = iter(norms)
    for i, batch in enumerate(data):
        old, before = state, [t.clone() for t in fl._tree.tree_leaves(state)]
        state, metrics = step(state, batch)
        if not donate:  # a pure step leaves its input state as it was
            after = fl._tree.tree_leaves(old)
            torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)
        assert state.micro_step == (i + 1) % k
        torch.testing.assert_close(metrics["loss"], losses[i], equal_nan=True, **tol)
        assert ("grad_norm" in metrics) == (state.micro_step == 0)
        if "grad_norm" in metrics and (norm := next(updates)) is not None:
            torch.testing.assert_close(metrics["grad_norm"], norm, **tol)
    assert state.step == len(data) // k
    assert int(state.skipped_steps) == skipped
    for name, p in named:
        torch.testing.assert_close(state.params[name], p.detach(), **tol, msg=name)
    for name, b in model.named_buffers():
        torch.testing.assert_close(state.buffers[name], b, **tol, msg=name)
    assert not frozen or torch.equal(state.buffers["l1.weight"], module.l1.weight)
    ours = moments(state.opt_state)
    for opt in opts:
        for p in (p for group in opt.param_groups for p in group["params"]):
            name = next(n for n, q in named if q is p)
            for key, value in opt.state[p].items():
                mine = ours[name, key]  # (torch counts steps in float32)
                torch.testing.assert_close(mine, value.to(mine.dtype), **tol, msg=(name, key))
    if ema is not None:
        averaged = dict(ema.module.named_parameters())
        for name, _ in named:
            torch.testing.assert_close(state.ema[name], averaged[name], **tol, msg=name)
        # Evaluation uses the average with the current buffers, in eval mode.
        clean = make_batches([None], seed=2)[0]
        evaluated = copy.deepcopy(model).eval()
        with torch.no_grad():
            for name, _ in named:
                evaluated.get_parameter(name).copy_(averaged[name])
            want = classify(evaluated, clean)
        got = fl.make_eval_step(classify)(state, clean)
        torch.testing.assert_close(got["loss"], want["loss"], **tol)
