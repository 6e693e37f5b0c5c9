"""Pure train/eval steps against a hand-written PyTorch loop."""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import gc
import inspect
import re
import sys
import warnings
import weakref
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnloop as fl
from fnloop import optim

torch.set_default_dtype(torch.float32)


def mlp(seed: int = 0, bn: bool = False, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    # No bias before BatchNorm: its true gradient is 0, and Adam would amplify rounding noise.
    layers: list[nn.Module] = [nn.Linear(5, 16, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Linear(16, 3)]
    return nn.Sequential(*layers).to(dtype)


def classify(model, batch):
    x, y = batch
    logits = model(x)
    return {
        "loss": F.cross_entropy(logits, y),
        "acc": (logits.argmax(-1) == y).float().mean(),
    }


def batches(n: int, size: int = 8, dtype: torch.dtype = torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 5, generator=g, dtype=dtype), torch.randint(0, 3, (size,), generator=g))
        for _ in range(n)
    ]


def hand_loop(module, batch_list, opt_fn, clip_norm=None, ema_decay=None):
    module = copy.deepcopy(module).train()
    opt = opt_fn(module.parameters())
    ema = None
    if ema_decay is not None:
        ema = torch.optim.swa_utils.AveragedModel(
            module, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay)
        )
    losses = []
    for x, y in batch_list:
        opt.zero_grad()
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip_norm)
        opt.step()
        if ema is not None:
            ema.update_parameters(module)
        losses.append(loss.detach())
    return module, ema, losses


def assert_state_matches(state, module, rtol=1e-9, atol=1e-12):
    # float64; not bit-exact only because the optimizer rounds in a different op order.

    for name, p in module.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=rtol, atol=atol)
    for name, b in module.named_buffers():
        torch.testing.assert_close(state.buffers[name], b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize(
    ("tx_fn", "opt_fn", "clip"),
    [
        (lambda: optim.adamw(1e-2), lambda p: torch.optim.AdamW(p, 1e-2, foreach=True), None),
        (
            lambda: optim.chain(optim.clip_by_global_norm(0.5), optim.sgd(0.1, momentum=0.9)),
            lambda p: torch.optim.SGD(p, 0.1, momentum=0.9),
            0.5,
        ),
    ],
)
def test_train_step_matches_hand_loop(bn, tx_fn, opt_fn, clip):
    module = mlp(bn=bn)
    data = batches(20)
    ref, _, ref_losses = hand_loop(module, data, opt_fn, clip_norm=clip)
    state = fl.TrainState.create(module, tx=tx_fn(), device="cpu")
    step = fl.make_train_step(classify)
    for (x, y), ref_loss in zip(data, ref_losses):
        state, metrics = step(state, (x, y))
        torch.testing.assert_close(metrics["loss"], ref_loss, rtol=1e-12, atol=1e-14)
    assert state.step == 20
    assert_state_matches(state, ref)


def test_train_step_is_pure_including_batchnorm():
    state = fl.TrainState.create(mlp(bn=True), tx=optim.adam(1e-2), device="cpu")
    leaves = [leaf.clone() for leaf in fl._tree.tree_leaves(state)]
    new_state, _ = fl.make_train_step(classify)(state, batches(1)[0])
    for old, now in zip(leaves, fl._tree.tree_leaves(state)):
        assert torch.equal(old, now)
    assert not torch.equal(new_state.buffers["1.running_mean"], state.buffers["1.running_mean"])
    assert new_state.buffers["1.num_batches_tracked"] == 1
    assert state.buffers["1.num_batches_tracked"] == 0


PURE_TXS = [
    lambda: optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2)),
    lambda: optim.adam(optim.cosine_schedule(1e-2, 10), amsgrad=True),
    lambda: optim.sgd(0.1, momentum=0.9, nesterov=True),
    lambda: optim.rmsprop(1e-2, centered=True, momentum=0.5),
    lambda: optim.partition(
        {"decay": optim.adamw(1e-2), "none": optim.sgd(0.1, momentum=0.9)},
        lambda name: "none" if name.endswith("bias") else "decay",
    ),
]


@pytest.mark.parametrize("tx_fn", PURE_TXS)
def test_pure_step_runs_the_fused_update_on_copies_and_keeps_every_state(tx_fn):
    """Eager pure steps run ``tx.apply_`` on fresh copies: every earlier state stays as it
    was, no tensor it writes is shared, and the numbers are the donating step's."""
    data = batches(4)
    state = fl.TrainState.create(mlp(bn=True), tx=tx_fn(), ema_decay=0.9, device="cpu")
    calls = []
    apply_ = state.tx.apply_
    state = state.replace(tx=state.tx._replace(apply_=lambda *a: calls.append(1) or apply_(*a)))
    pure = fl.make_train_step(classify)
    donating = fl.make_train_step(classify, donate=True)
    donated = state.clone()
    history = [(state, [leaf.clone() for leaf in fl._tree.tree_leaves(state)])]
    for b in data:
        state, _ = pure(state, b)
        donated, _ = donating(donated, b)
        history.append((state, [leaf.clone() for leaf in fl._tree.tree_leaves(state)]))
    assert len(calls) == 2 * len(data)  # both steps took the fused update
    for old, snapshot in history:
        for leaf, saved in zip(fl._tree.tree_leaves(old), snapshot):
            assert torch.equal(leaf, saved)
    first, last = history[0][0], history[-1][0]
    written = [last.params, last.ema, *fl._tree.tree_leaves(last.opt_state)]
    old_ptrs = {t.data_ptr() for t in fl._tree.tree_leaves(first) if t.numel() > 1}
    assert not old_ptrs & {t.data_ptr() for t in fl._tree.tree_leaves(written) if t.numel() > 1}
    for a, b in zip(fl._tree.tree_leaves(state), fl._tree.tree_leaves(donated)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_transform_writing_its_count_in_place_is_caught_and_the_state_kept():
    """``update_`` may write only tensors keyed like the parameters (the documented rule)."""

    counting = optim.GradientTransformation(
        init=lambda params: torch.zeros((), dtype=torch.int64),
        update=lambda updates, count, params=None: (updates, count + 1),
        update_=lambda updates, count, params=None: (updates, count.add_(1)),
    )
    tx = optim.chain(counting, optim.sgd(0.1))
    state = fl.TrainState.create(mlp(), tx=tx, device="cpu")
    with pytest.raises(RuntimeError, match="keyed by parameter names"):
        fl.make_train_step(classify)(state, batches(1)[0])
    assert state.opt_state[0] == 0


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("how", ["eager", "donate", "vmap"])
def test_grad_norm_is_clip_grad_norms_total_norm(k, how):
    """The seed logged the gradient norm in a batch-end hook (and warned when it was
    large), which a callback cannot, since it never sees gradients: with
    ``grad_norm=True`` the step reports the global norm of the gradients the update uses
    (accumulated, before clipping), the norm ``clip_grad_norm_`` returns in a hand loop,
    at each update (not at the micro-batches between)."""
    module = mlp(bn=True)
    data = batches(6)
    ref = copy.deepcopy(module).train()
    opt = torch.optim.SGD(ref.parameters(), 0.1, momentum=0.9)
    want = []
    for i, (x, y) in enumerate(data):
        (F.cross_entropy(ref(x), y) / k).backward()
        if (i + 1) % k == 0:
            want.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5))
            opt.step()
            opt.zero_grad()
    tx = optim.chain(optim.clip_by_global_norm(0.5), optim.sgd(0.1, momentum=0.9))
    state = fl.TrainState.create(module, tx=tx, device="cpu")
    step = fl.make_train_step(
        classify, accumulation_steps=k, grad_norm=True, donate=how == "donate"
    )
    if how == "donate":
        state = state.clone()
    if how == "vmap":  # one model of a stack of one
        state = fl.stack_states([state])
        step = torch.func.vmap(step, in_dims=(0, None), randomness="different")
    got = []
    for batch in data:
        state, metrics = step(state, batch)
        assert ("grad_norm" in metrics) == (state.micro_step == 0)
        if "grad_norm" in metrics:
            got.append(metrics["grad_norm"].reshape(()))
    assert state.step == len(want)
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-9, atol=1e-12)


def test_grad_norm_is_the_unscaled_norm_with_fp16(monkeypatch):
    """With an fp16 loss scale, the norm of the unscaled gradients, as
    ``scaler.unscale_(opt)`` then ``clip_grad_norm_`` gives it; an overflow shows as inf."""
    monkeypatch.setattr(fl.step, "autocast", lambda precision, device: contextlib.nullcontext())
    torch.manual_seed(0)
    module = nn.Linear(4, 1)
    x = torch.randn(8, 4)
    ref = copy.deepcopy(module)
    opt = torch.optim.SGD(ref.parameters(), 0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    want = []
    for bad in (False, True, False):
        loss = (ref(x) ** 2).mean() * (float("inf") if bad else 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        want.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9)))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    def step_fn(model, batch):
        x, bad = batch
        return {"loss": (model(x) ** 2).mean() * torch.where(bad, float("inf"), 1.0)}

    state = fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")
    step = fl.make_train_step(
        step_fn,
        precision="fp16",
        loss_scale=fl.DynamicLossScale(init_scale=1024.0),
        grad_norm=True,
    )
    got = []
    for bad in (False, True, False):
        state, metrics = step(state, (x, torch.tensor(bad)))
        got.append(float(metrics["grad_norm"]))
    assert got[1] != got[1] or got[1] == float("inf")
    assert want[1] != want[1] or want[1] == float("inf")
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    assert got[2] == pytest.approx(want[2], rel=1e-6)


@pytest.mark.parametrize("k", [1, 3])
def test_grad_norm_refuses_a_step_that_returns_one(k):
    """At the first call, also one that opens an accumulation window (no update)."""
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    step = fl.make_train_step(
        lambda m, b: {**classify(m, b), "grad_norm": 1.0}, grad_norm=True, accumulation_steps=k
    )
    with pytest.raises(ValueError, match=r"'grad_norm' entry.*grad_norm=True"):
        step(state, batches(1)[0])


def test_eager_and_torch_func_gradients_agree(monkeypatch):
    import fnloop.step as step_mod

    data = batches(5)
    results = []
    for forced in (False, True):
        monkeypatch.setattr(step_mod, "_in_transform", lambda params, forced=forced: forced)
        state = fl.TrainState.create(mlp(bn=True), tx=optim.adamw(1e-2), device="cpu")
        step = fl.make_train_step(classify)
        for batch in data:
            state, _ = step(state, batch)
        results.append(state)
    for a, b in zip(fl._tree.tree_leaves(results[0]), fl._tree.tree_leaves(results[1])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_accumulation_equals_big_batch():
    module = mlp()
    big = batches(3, size=12)
    micro = [(x[i : i + 4], y[i : i + 4]) for x, y in big for i in range(0, 12, 4)]
    tx = optim.adamw(1e-2)
    s_big = fl.TrainState.create(module, tx=tx, device="cpu")
    s_acc = fl.TrainState.create(module, tx=tx, device="cpu")
    big_step = fl.make_train_step(classify)
    acc_step = fl.make_train_step(classify, accumulation_steps=3)
    for b in big:
        s_big, _ = big_step(s_big, b)
    for i, b in enumerate(micro):
        s_acc, _ = acc_step(s_acc, b)
        assert s_acc.micro_step == (i + 1) % 3
    assert s_acc.step == s_big.step == 3
    for name in s_big.params:
        torch.testing.assert_close(s_acc.params[name], s_big.params[name], rtol=1e-9, atol=1e-12)


def test_ema_matches_averaged_model_and_eval_uses_it():
    module = mlp()
    data = batches(10)
    opt_fn = lambda p: torch.optim.SGD(p, 0.1)  # noqa: E731
    ref, ema, _ = hand_loop(module, data, opt_fn, ema_decay=0.9)
    state = fl.TrainState.create(module, tx=optim.sgd(0.1), ema_decay=0.9, device="cpu")
    step = fl.make_train_step(classify)
    for b in data:
        state, _ = step(state, b)
    for name, p in ema.module.named_parameters():
        torch.testing.assert_close(state.ema[name], p.detach(), rtol=1e-12, atol=1e-14)
    x, y = data[0]
    ema.eval()
    expected = F.cross_entropy(ema(x), y)
    got = fl.make_eval_step(classify)(state, (x, y))["loss"]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    raw = fl.make_eval_step(classify, use_ema=False)(state, (x, y))["loss"]
    ref.eval()
    torch.testing.assert_close(raw, F.cross_entropy(ref(x), y), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"ema_decay": 0.9}, r"ema_decay=0.9 but no EMA weights .* ema=\{n: p.clone\(\)"),
        ({"ema_decay": None}, r"holds EMA weights but has ema_decay=None: .* ema=None\)"),
        ({"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\); got 1.0"),
    ],
    ids=["decay-without-weights", "weights-without-decay", "decay-1"],
)
def test_a_state_whose_ema_and_ema_decay_disagree_is_refused(change, match):
    """``replace`` sets one of the two: the EMA was silently not kept (no weights), or
    its stale weights were evaluated (no decay)."""
    ema_decay = 0.5 if change["ema_decay"] != 0.9 else None
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), ema_decay=ema_decay, device="cpu")
    with pytest.raises(ValueError, match=match):
        fl.make_train_step(classify)(state.replace(**change), batches(1)[0])


def test_an_ema_started_with_replace_matches_one_made_by_create():
    """The recipe the error gives: EMA weights from the current ones, then trained."""
    data = batches(4)
    plain = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    made = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), ema_decay=0.9, device="cpu")
    started = plain.replace(ema_decay=0.9, ema={n: p.clone() for n, p in plain.params.items()})
    step = fl.make_train_step(classify)
    for b in data:
        made, _ = step(made, b)
        started, _ = step(started, b)
    for name in made.ema:
        assert torch.equal(started.ema[name], made.ema[name])
    dropped = started.replace(ema_decay=None, ema=None)
    assert step(dropped, data[0])[0].ema is None


@pytest.mark.parametrize(
    "new_tx",
    [
        optim.sgd(0.1, momentum=0.9),
        optim.adam(0.01),
        optim.sgd(0.1),
        optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(0.01)),
    ],
    ids=["sgd-momentum", "adam", "sgd", "clipped-adamw"],
)
def test_a_tx_replaced_without_its_opt_state_is_refused(new_tx):
    """``state.replace(tx=...)`` alone kept AdamW's state: an AttributeError deep in the
    optimizer, or (plain SGD) SGD silently trained at AdamW's stored rate."""
    state = fl.TrainState.create(mlp(), tx=optim.adamw(0.01), device="cpu")
    step = fl.make_train_step(classify)
    with pytest.raises(ValueError, match=r"was not made by state\.tx.*new_tx\.init"):
        step(state.replace(tx=new_tx), batches(1)[0])


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_a_state_missing_a_buffer_of_its_module_is_refused(kind):
    """``state.replace(buffers=...)`` that drops an entry left the template's meta tensor
    in the forward pass: "Tensor on device meta is not on the expected device cpu"."""
    state = fl.TrainState.create(mlp(bn=True), tx=optim.sgd(0.1), device="cpu")
    name = next(n for n in state.buffers if n.endswith("running_var"))
    broken = state.replace(buffers={n: b for n, b in state.buffers.items() if n != name})
    step = fl.make_train_step(classify) if kind == "train" else fl.make_eval_step(classify)
    with pytest.raises(
        ValueError, match=rf"holds no tensor named {re.escape(repr(name))}, which its module has"
    ):
        step(broken, batches(1)[0])
    step(state, batches(1)[0])  # the module's own slots were put back


def test_a_tx_replaced_with_its_opt_state_trains_as_a_fresh_optimizer():
    """The recipe the error gives matches a state created with the new optimizer; the same
    optimizer at another rate keeps the stored rate (as torch's ``load_state_dict``)."""
    data = batches(3)
    step = fl.make_train_step(classify)
    state = fl.TrainState.create(mlp(), tx=optim.adamw(0.01), device="cpu")
    state, _ = step(state, data[0])
    sgd = optim.sgd(0.1, momentum=0.9)
    switched = state.replace(tx=sgd, opt_state=sgd.init(state.params))
    module = mlp()
    module.load_state_dict({**state.params, **state.buffers})
    fresh = fl.TrainState.create(module, tx=sgd, device="cpu")
    for b in data[1:]:
        switched, _ = step(switched, b)
        fresh, _ = step(fresh, b)
    for name in fresh.params:
        assert torch.equal(switched.params[name], fresh.params[name])

    same_kind, _ = step(state.replace(tx=optim.adamw(0.5)), data[1])
    assert optim.learning_rates(same_kind.opt_state) == [pytest.approx(0.01)]


def test_a_step_does_not_keep_the_optimizers_it_checked_alive():
    """One step used for a sweep, with a new optimizer per run: the step held every
    optimizer it had checked, and with it each one's closures."""
    step = fl.make_train_step(classify)
    tx = optim.adamw(0.01)
    seen = weakref.ref(tx.update)
    state = fl.TrainState.create(mlp(), tx=tx, device="cpu")
    step(state, batches(1)[0])
    del state, tx
    gc.collect()
    assert seen() is None


def test_the_device_is_chosen_automatically_and_batches_are_moved_to_it(monkeypatch):
    """REQUIREMENTS S13 (no test covered it): ``cuda`` when available, else ``cpu``; a
    state made without ``device`` lives there, and both steps move every tensor of a
    nested batch to the state's device."""
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert fl.TrainState.create(mlp(), tx=optim.sgd(0.1)).device.type == want
    if want == "cpu":  # told a GPU is there, create moves the weights to cuda (and fails)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        with pytest.raises((AssertionError, RuntimeError), match=r"(?i)cuda|nvidia"):
            fl.TrainState.create(mlp(), tx=optim.sgd(0.1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fl.TrainState.create(mlp(), tx=optim.sgd(0.1)).device == torch.device("cpu")

    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    moved = []
    monkeypatch.setattr(fl.step, "to_device", lambda b, d: moved.append(d) or fl.to_device(b, d))
    x, y = batches(1)[0]

    def nested(model, batch):
        return classify(model, (batch["inputs"][0], batch["target"]))

    batch = {"inputs": [x], "target": y}
    fl.make_train_step(nested)(state, batch)
    fl.make_eval_step(nested)(state, batch)
    assert moved == [state.device, state.device]


def test_eval_step_uses_eval_mode_and_no_grad():
    state = fl.TrainState.create(mlp(bn=True), tx=optim.sgd(0.1), device="cpu")
    seen = {}

    def probe(model, batch):
        seen["training"] = model.module.training
        seen["grad"] = torch.is_grad_enabled()
        return classify(model, batch)

    fl.make_eval_step(probe)(state, batches(1)[0])
    assert seen == {"training": False, "grad": False}
    fl.make_train_step(probe)(state, batches(1)[0])
    assert seen == {"training": True, "grad": True}


def test_skip_nonfinite_leaves_state_unchanged_and_counts():
    state = fl.TrainState.create(mlp(), tx=optim.adam(1e-2), device="cpu")
    step = fl.make_train_step(classify, on_nonfinite="skip")
    x, y = batches(1)[0]
    bad = (x.clone().fill_(float("nan")), y)
    new_state, metrics = step(state, bad)
    assert torch.isnan(metrics["loss"])
    for a, b in zip(
        fl._tree.tree_leaves(state.opt_state), fl._tree.tree_leaves(new_state.opt_state)
    ):
        assert torch.equal(a, b)
    for name in state.params:
        assert torch.equal(state.params[name], new_state.params[name])
    assert int(new_state.skipped_steps) == 1
    good_state, _ = step(new_state, (x, y))
    assert int(good_state.skipped_steps) == 1
    assert not torch.equal(good_state.params["0.weight"], state.params["0.weight"])


@pytest.mark.parametrize(
    "case",
    [
        "nan-in-an-earlier-micro-batch",
        "nan-loss-finite-gradients-in-an-earlier-micro-batch",
        "nan-loss-finite-gradients",
        "finite-loss-nan-gradient",
    ],
)
def test_skip_checks_the_gradients_too(case):
    state = fl.TrainState.create(mlp(), tx=optim.adam(1e-2), device="cpu")
    x, y = batches(1)[0]
    if case == "nan-in-an-earlier-micro-batch":
        step = fl.make_train_step(classify, accumulation_steps=2, on_nonfinite="skip")
        mid, _ = step(state, (torch.full_like(x, float("nan")), y))
        new, metrics = step(mid, (x, y))
        assert torch.isfinite(metrics["loss"])  # the last micro-batch's loss is fine
    elif case == "nan-loss-finite-gradients-in-an-earlier-micro-batch":
        # Every target ignored: the mean over no element is 0/0 = NaN, the gradients 0.
        # The window has a non-finite loss, so its update is skipped (the guide's promise).
        step = fl.make_train_step(classify, accumulation_steps=2, on_nonfinite="skip")
        mid, metrics = step(state, (x, torch.full_like(y, -100)))
        assert torch.isnan(metrics["loss"])
        new, metrics = step(mid, (x, y))
        assert torch.isfinite(metrics["loss"])
    elif case == "nan-loss-finite-gradients":
        # The same without accumulation: finite (zero) gradients do not make the update.
        step = fl.make_train_step(classify, on_nonfinite="skip")
        new, metrics = step(state, (x, torch.full_like(y, -100)))
        assert torch.isnan(metrics["loss"])
    else:
        # sqrt has an infinite derivative at 0: loss 0, gradient NaN (inf * 0).
        step = fl.make_train_step(
            lambda model, b: {"loss": torch.sqrt((model(b[0]) * 0).sum())}, on_nonfinite="skip"
        )
        new, metrics = step(state, (x, y))
        assert float(metrics["loss"]) == 0.0
    assert int(new.skipped_steps) == 1
    for name in state.params:
        assert torch.equal(new.params[name], state.params[name]), name
    for a, b in zip(fl._tree.tree_leaves(state.opt_state), fl._tree.tree_leaves(new.opt_state)):
        assert torch.equal(a, b)


def test_raise_on_nonfinite():
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    x, y = batches(1)[0]
    with pytest.raises(FloatingPointError, match="non-finite loss at step 0"):
        fl.make_train_step(classify, on_nonfinite="raise")(state, (x * float("inf"), y))


class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


@pytest.mark.filterwarnings("ignore:precision='(fp16|bf16)' does not lower")
def test_raise_on_a_nonfinite_gradient_of_a_finite_loss():
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    x, y = batches(1)[0]

    def blows_up(model, batch):
        x, y = batch
        return {"loss": F.cross_entropy(_InfGrad.apply(model(x)), y)}

    with pytest.raises(FloatingPointError, match="non-finite gradient at step 0"):
        fl.make_train_step(blows_up, on_nonfinite="raise")(state, (x, y))
    # With fp16, overflowing gradients are the loss scale's to skip, not an error.
    step = fl.make_train_step(blows_up, on_nonfinite="raise", precision="fp16")
    new, _ = step(state, (x, y))
    assert float(new.loss_scale.scale) < float(step.loss_scale.init_scale)


def test_fp16_loss_scale_follows_grad_scaler(monkeypatch):
    """Scale, skip and growth sequence of torch.amp.GradScaler with injected infs."""
    torch.manual_seed(0)
    module = nn.Linear(4, 1)
    # One finite step before an inf: the growth counter must restart at 0 after it.
    inject = [False, True, False, False, True, True, False, False, False, True, False, False]
    scale_cfg = fl.DynamicLossScale(init_scale=1024.0, growth_interval=2)

    ref = copy.deepcopy(module)
    opt = torch.optim.SGD(ref.parameters(), 0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    ref_scales = []
    x = torch.randn(8, 4)
    for bad in inject:
        opt.zero_grad()
        loss = (ref(x) ** 2).mean() * (float("inf") if bad else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        ref_scales.append((scaler.get_scale(), int(scaler._growth_tracker)))

    def step_fn(model, batch):
        x, bad = batch
        return {"loss": (model(x) ** 2).mean() * torch.where(bad, float("inf"), 1.0)}

    # Autocast fp16 on CPU would change the forward's numbers; here only the scale logic
    # is under test, so the forward runs in float32 with the fp16 loss-scale machinery.
    monkeypatch.setattr(fl.step, "autocast", lambda precision, device: contextlib.nullcontext())
    state = fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")
    step = fl.make_train_step(step_fn, precision="fp16", loss_scale=scale_cfg)
    scales = []
    for bad in inject:
        state, _ = step(state, (x, torch.tensor(bad)))
        scales.append((float(state.loss_scale.scale), int(state.loss_scale.growth_tracker)))
    assert scales == ref_scales
    assert int(state.skipped_steps) == sum(inject)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-6, atol=1e-7)


def test_an_update_the_fp16_loss_scale_skips_leaves_the_schedule_where_it_was(monkeypatch):
    """The guide: an overflow skips the update as on_nonfinite="skip" does, so a schedule
    counts applied updates; torch's loop (scaler.step(opt); scheduler.step()) steps its
    scheduler on a skipped update too and runs ahead of this one by the skips."""
    monkeypatch.setattr(fl.step, "autocast", lambda precision, device: contextlib.nullcontext())

    def step_fn(model, batch):
        x, bad = batch
        return {"loss": (model(x) ** 2).mean() * torch.where(bad, float("inf"), 1.0)}

    torch.manual_seed(0)
    tx = optim.sgd(optim.step_schedule(1.0, step_size=1, gamma=0.5))
    state = fl.TrainState.create(nn.Linear(4, 1), tx=tx, device="cpu")
    step = fl.make_train_step(step_fn, precision="fp16", loss_scale=fl.DynamicLossScale(8.0))
    x = torch.randn(8, 4)
    rates = []
    for bad in [False, True, True, False]:
        state, _ = step(state, (x, torch.tensor(bad)))
        rates.append(float(optim.learning_rates(state.opt_state)[0]))
    assert rates == [0.5, 0.5, 0.5, 0.25]
    assert (int(state.step), int(state.skipped_steps)) == (4, 2)


def test_fp16_accumulation_scales_like_grad_scaler():
    """fp16 with accumulation_steps=k scales each micro-batch's loss as
    ``scaler.scale(loss / k)`` does: a loss already in float16 receives the gradient
    scale / k, which overflows float16 at the same scales as torch's recipe, so the scale,
    the skipped updates and the weights follow GradScaler's."""
    k = 2

    def step_fn(model, batch):
        x, y = batch
        return {"loss": F.mse_loss(model(x), y).half()}

    torch.manual_seed(0)
    module = nn.Linear(4, 1)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(8)]
    ref = copy.deepcopy(module)
    opt = torch.optim.SGD(ref.parameters(), 0.01)
    scaler = torch.amp.GradScaler("cpu", growth_interval=1)
    ref_scales = []
    for i, b in enumerate(data):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = step_fn(ref, b)["loss"]
        scaler.scale(loss.float() / k).backward()
        if (i + 1) % k == 0:
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            ref_scales.append(scaler.get_scale())

    state = fl.TrainState.create(module, tx=optim.sgd(0.01), device="cpu")
    step = fl.make_train_step(
        step_fn,
        accumulation_steps=k,
        precision="fp16",
        loss_scale=fl.DynamicLossScale(growth_interval=1),
    )
    scales = []
    for b in data:
        state, _ = step(state, b)
        if state.micro_step == 0:
            scales.append(float(state.loss_scale.scale))
    assert scales == ref_scales
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_precision_runs(precision):
    state = fl.TrainState.create(mlp(dtype=torch.float32), tx=optim.adam(1e-2), device="cpu")
    seen = {}

    def probe(model, batch):
        x, y = batch
        logits = model(x)
        seen["dtype"] = logits.dtype
        return {"loss": F.cross_entropy(logits.float(), y)}

    step = fl.make_train_step(probe, precision=precision)
    new_state, metrics = step(state, batches(1, dtype=torch.float32)[0])
    assert seen["dtype"] == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert new_state.params["0.weight"].dtype == torch.float32
    assert torch.isfinite(metrics["loss"])


def test_a_low_precision_or_one_element_loss_is_reported_0d_and_at_least_float32():
    """The loss metric of a train and an eval step is 0-d and upcast from bf16 (as
    loss.float() in a hand loop: the epoch means then add float32 values), however the
    step returned it; a float64 loss stays float64."""
    state = fl.TrainState.create(mlp(dtype=torch.float32), tx=optim.sgd(0.1), device="cpu")
    x, _ = batches(1, dtype=torch.float32)[0]

    def low(model, x):  # under bf16 autocast, the mean of a Linear's output is bf16
        return {"loss": model(x).mean().reshape(1)}

    _, metrics = fl.make_train_step(low, precision="bf16")(state, x)
    assert (metrics["loss"].dtype, metrics["loss"].shape) == (torch.float32, ())
    metrics = fl.make_eval_step(low, precision="bf16")(state, x)
    assert (metrics["loss"].dtype, metrics["loss"].shape) == (torch.float32, ())
    double = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    metrics = fl.make_eval_step(low)(double, x.double())
    assert (metrics["loss"].dtype, metrics["loss"].shape) == (torch.float64, ())


class Pair(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


@dataclasses.dataclass
class Example:
    x: torch.Tensor
    y: torch.Tensor


@pytest.mark.parametrize(
    ("wrap", "unwrap"),
    [
        (lambda x, y: (x, y), lambda b: b),
        (lambda x, y: [x, y], lambda b: tuple(b)),
        (lambda x, y: {"x": x, "y": y}, lambda b: (b["x"], b["y"])),
        (lambda x, y: Pair(x, y), lambda b: (b.x, b.y)),
        (lambda x, y: Example(x, y), lambda b: (b.x, b.y)),
        (lambda x, y: collections.defaultdict(list, x=x, y=y), lambda b: (b["x"], b["y"])),
        (lambda x, y: collections.OrderedDict(x=x, y=y), lambda b: (b["x"], b["y"])),
    ],
)
def test_any_batch_structure(wrap, unwrap):
    x, y = batches(1)[0]
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    step = fl.make_train_step(lambda model, b: classify(model, unwrap(b)))
    ref, _ = fl.make_train_step(classify)(state, (x, y))
    got, _ = step(state, wrap(x, y))
    assert torch.equal(got.params["0.weight"], ref.params["0.weight"])
    assert fl.batch_size(wrap(x, y)) == 8


def test_batch_size_skips_0d_tensors():
    """A 0-d tensor first in a batch (a per-batch temperature or scale) has no leading
    dimension: the size comes from the first tensor that has one, not an error saying the
    batch holds no such tensor."""
    x, y = torch.zeros(6, 3), torch.zeros(6)
    assert fl.batch_size({"scale": torch.tensor(2.0), "x": x, "y": y}) == 6
    assert fl.batch_size((torch.tensor(0.5), (x, y))) == 6
    with pytest.raises(ValueError, match="no tensor with a leading dimension"):
        fl.batch_size({"scale": torch.tensor(2.0), "name": "a"})


@dataclasses.dataclass
class _Pixels:
    """A batch whose __post_init__ rescales a field: it must run once, when made."""

    x: torch.Tensor
    y: torch.Tensor
    made: list = dataclasses.field(default_factory=list, repr=False)

    def __post_init__(self):
        self.made.append(1)
        self.x = self.x / 255.0


@dataclasses.dataclass(frozen=True)
class _Frozen:
    x: torch.Tensor
    mask: torch.Tensor = dataclasses.field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "mask", self.x > 0)


def test_a_dataclass_batch_reaches_the_step_as_it_is():
    x, y = batches(1)[0]
    batch = _Pixels(x * 255.0, y)
    seen = []

    def training_step(model, b):
        seen.append(b.x)
        return classify(model, (b.x, b.y))

    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    fl.make_train_step(training_step)(state, batch)
    fl.make_eval_step(training_step)(state, batch)
    assert len(batch.made) == 1  # __post_init__ did not run again
    assert all(t is batch.x for t in seen)


def test_moving_a_dataclass_batch_copies_it_without_running_init_again():
    batch = _Pixels(torch.full((2, 3), 255.0), torch.zeros(2))
    moved = fl.to_device(batch, "meta")
    assert type(moved) is _Pixels and moved is not batch
    assert moved.x.device.type == "meta" and moved.y.device.type == "meta"
    assert len(batch.made) == 1 and batch.x.device.type == "cpu"  # the input is unchanged
    frozen = _Frozen(torch.tensor([-1.0, 2.0]))
    moved = fl.to_device(frozen, "meta")
    assert moved.x.device.type == "meta" and moved.mask.device.type == "meta"  # init=False too
    assert fl.to_device(frozen, "cpu") is frozen  # nothing to move: the batch itself
    slotted = _Slotted(torch.ones(2))
    moved = fl.to_device(slotted, "meta")
    assert moved.x.device.type == "meta" and moved.mask.device.type == "meta"
    assert slotted.x.device.type == "cpu" and moved.n == 3


@dataclasses.dataclass(slots=True)
class _Slotted:
    x: torch.Tensor
    n: int = 3
    mask: torch.Tensor = dataclasses.field(init=False)

    def __post_init__(self):
        self.mask = self.x > 0


@dataclasses.dataclass
class _WeaklyReferenced:  # as dataclass(slots=True, weakref_slot=True), new in Python 3.11
    __slots__ = ("__weakref__", "n", "x")
    x: torch.Tensor
    n: int


def test_moving_a_dataclass_batch_with_a_weakref_slot_moves_its_fields():
    """The __weakref__ slot is no attribute to copy (it cannot be set): the moved batch
    has the moved fields and can be weakly referenced itself."""
    batch = _WeaklyReferenced(torch.ones(2), 3)
    moved = fl.to_device(batch, "meta")
    assert type(moved) is _WeaklyReferenced and moved.x.device.type == "meta" and moved.n == 3
    assert weakref.ref(moved)() is moved and batch.x.device.type == "cpu"


@dataclasses.dataclass
class _Derived:
    x: torch.Tensor

    def __post_init__(self):
        self.mask = self.x != 0  # an attribute that is not a field

    def __copy__(self):
        return self  # "immutable": copy.copy must not be how the moved batch is made


class _Private:
    __slots__ = ("__mask",)  # stored as _Private__mask

    def mask(self):
        return self.__mask

    def set_mask(self, mask):
        self.__mask = mask


@dataclasses.dataclass
class _WithPrivateSlot(_Private):
    x: torch.Tensor

    def __post_init__(self):
        self.set_mask(self.x > 0)


def test_moving_a_dataclass_batch_moves_a_private_slot_of_its_base():
    moved = fl.to_device(_WithPrivateSlot(torch.ones(2)), "meta")
    assert moved.mask().device.type == "meta" and moved.x.device.type == "meta"


def test_moving_a_dataclass_batch_moves_its_derived_tensors_and_leaves_it_alone():
    batch = _Derived(torch.ones(2))
    moved = fl.to_device(batch, "meta")
    assert moved is not batch and moved.mask.device.type == "meta"
    assert batch.x.device.type == "cpu" and batch.mask.device.type == "cpu"


@pytest.mark.parametrize(
    ("fn", "error", "match"),
    [
        (lambda m, b: {"acc": m(b[0]).mean()}, ValueError, "'loss' entry"),
        (lambda m, b: m(b[0]).mean(), ValueError, "'loss' entry"),
        (lambda m, b: {"loss": m(b[0]).sum(0)}, ValueError, "scalar"),
        (lambda m, b: {"loss": m(b[0]).mean().detach()}, ValueError, "does not depend"),
        (lambda m, b: {"loss": m(b[0]).mean(), "name": "x"}, TypeError, "metric 'name'"),
        (lambda m, b: {"loss": 1.0}, TypeError, "must be a tensor"),
        (lambda b, m: {"loss": m(b[0]).mean()}, TypeError, "fn\\(model, batch\\)"),
        (  # a Sequential's layer: not reachable, and not a question of argument order alone
            lambda m, b: {"loss": m[0](b[0]).mean()},
            TypeError,
            r"cannot be indexed: model\[0\] would be a submodule of your Sequential, which",
        ),
        (  # x, y = batch with the arguments swapped: the model is unpacked
            lambda b, m: {"loss": (lambda x, y: x)(*b)},
            TypeError,
            r"^a BoundModel \(the `model` argument of a step function\) cannot be unpacked",
        ),
        (
            lambda m, b: {"loss": m.forward(b[0]).mean()},
            AttributeError,
            "Sequential.forward is a method",
        ),
        (lambda m, b: {"loss": m.nope(b[0]).mean()}, AttributeError, "no attribute 'nope'"),
        (  # to branch on the mode: "Make forward return what you need" was no fix for it
            lambda m, b: {"loss": m(b[0]).mean() * m.training},
            AttributeError,
            r"Sequential\.training .* give fit a validation_step of its own",
        ),
    ],
)
def test_bad_training_step_output(fn, error, match):
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    with pytest.raises(error, match=match):
        fl.make_train_step(fn)(state, batches(1)[0])


def test_indexing_the_model_of_a_module_without_items_points_at_the_argument_order():
    """A Linear has no items: model[0] is the batch's index with the arguments swapped."""
    state = fl.TrainState.create(nn.Linear(4, 3), tx=optim.sgd(0.1), device="cpu")
    step = fl.make_train_step(lambda b, m: {"loss": b[0].sum()})
    with pytest.raises(TypeError, match=r"cannot be unpacked or indexed\. Step functions are"):
        step(state, (torch.ones(2, 4), torch.zeros(2)))


@pytest.mark.parametrize("shape", [(1,), (1, 1)])
def test_a_loss_with_one_element_is_a_scalar(shape):
    """As ``loss.backward()`` accepts it: the same update as the 0-d loss, eager and
    under vmap, and a 0-d ``"loss"`` metric."""
    state = fl.TrainState.create(mlp(), tx=optim.adam(0.1), device="cpu")
    batch = batches(1)[0]
    ref, ref_metrics = fl.make_train_step(classify)(state, batch)
    step = fl.make_train_step(lambda m, b: {"loss": classify(m, b)["loss"].reshape(shape)})
    got, metrics = step(state, batch)
    assert metrics["loss"].shape == () and torch.equal(metrics["loss"], ref_metrics["loss"])
    assert all(torch.equal(got.params[n], ref.params[n]) for n in ref.params)
    stacked = fl.stack_states([state, state])
    vmapped, _ = torch.func.vmap(step, in_dims=(0, None), randomness="different")(stacked, batch)
    for n in ref.params:
        torch.testing.assert_close(vmapped.params[n][1], ref.params[n])


def test_loss_from_the_users_own_module_is_an_error():
    # Calling the module object instead of `model` gives a loss with a graph but no
    # gradient for any of the state's parameters: silently training nothing is worse
    # than an error.
    net = mlp()
    state = fl.TrainState.create(net, tx=optim.sgd(0.1), device="cpu")
    step = fl.make_train_step(lambda model, b: {"loss": F.cross_entropy(net(b[0]), b[1])})
    with pytest.raises(ValueError, match="does not depend on the state's parameters"):
        step(state, batches(1)[0])


@pytest.mark.parametrize("how", ["compiled", "vmapped"])
def test_loss_from_the_users_own_module_is_as_clear_an_error_compiled_and_vmapped(how):
    """Under torch.compile and vmap the loss from the user's own module has no gradient
    at all (torch.func.grad tracks only the state's parameters), which the error for a
    detached loss described ("do not detach it"): it names the cause as in eager mode.
    (Compiled, dynamo reruns the step eagerly when its trace raises: the eager error.)"""
    net = mlp()
    state = fl.TrainState.create(net, tx=optim.sgd(0.1), device="cpu")
    step = fl.make_train_step(lambda model, b: {"loss": F.cross_entropy(net(b[0]), b[1])})
    if how == "compiled":
        torch._dynamo.reset()
        run = torch.compile(step, backend="eager")
        match = r"(?s)does not depend on the state's parameters.*model\(x\).*own module object"
    else:
        run = torch.func.vmap(step, in_dims=(0, None), randomness="different")
        state = fl.stack_states([state, state])
        match = r"(?s)never called its `model` argument.*model\(x\)"
    try:
        with pytest.raises(ValueError, match=match):
            run(state, batches(1)[0])
    finally:  # dynamo keeps the frames of the failed trace, which later compiles would use
        torch._dynamo.reset()


def test_parameters_without_gradient_get_zero_updates():
    # A parameter the loss does not use gets a zero gradient, not an error. (With plain
    # SGD it then stays put; weight decay or momentum would still move it, where
    # torch.optim skips a parameter whose .grad is None: documented in the guide.)
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")

    def first_layer_only(model, batch):
        return {"loss": model.params["0.weight"].square().sum() + 0 * batch[0].sum()}

    new, _ = fl.make_train_step(first_layer_only)(state, batches(1)[0])
    assert not torch.equal(new.params["0.weight"], state.params["0.weight"])
    for name in state.params:
        if name != "0.weight":
            assert torch.equal(new.params[name], state.params[name]), name


def test_numpy_numbers_are_metrics():
    np = pytest.importorskip("numpy")
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")

    def step_fn(model, batch):
        return {**classify(model, batch), "lr_hint": np.float32(0.5), "n": np.int64(3)}

    _, metrics = fl.make_train_step(step_fn)(state, batches(1)[0])
    assert float(metrics["lr_hint"]) == 0.5 and float(metrics["n"]) == 3.0


def test_an_opt_state_rebuilt_as_a_list_is_named_as_of_other_node_types():
    """The same entries under another container (a list where tx.init makes a tuple, as
    code that rebuilds the state may): the check of the optimizer state says so."""
    state = fl.TrainState.create(mlp(), tx=optim.adam(0.1), device="cpu")
    assert type(state.opt_state) is tuple
    listed = state.replace(opt_state=list(state.opt_state))
    says = "state.opt_state was not made by state.tx (the trees have the same keys but different "
    with pytest.raises(ValueError, match=re.escape(says + "node types; the first tree is")):
        fl.make_train_step(classify)(listed, batches(1)[0])


def test_bad_options():
    with pytest.raises(ValueError, match="accumulation_steps"):
        fl.make_train_step(classify, accumulation_steps=0)
    with pytest.raises(ValueError, match="precision"):
        fl.make_train_step(classify, precision="fp8")
    with pytest.raises(ValueError, match="on_nonfinite"):
        fl.make_train_step(classify, on_nonfinite="ignore")
    with pytest.raises(ValueError, match="loss_scale is only used with precision='fp16'"):
        fl.make_train_step(classify, loss_scale=fl.DynamicLossScale())
    with pytest.raises(TypeError, match="training_step must be callable"):
        fl.make_train_step("classify")
    with pytest.raises(ValueError, match="precision"):
        fl.make_eval_step(classify, precision="fp32")
    # The classes check the same, and a TrainStep made directly gets the default loss scale.
    with pytest.raises(ValueError, match="accumulation_steps"):
        fl.TrainStep(classify, accumulation_steps=2.5)
    with pytest.raises(ValueError, match="precision"):
        fl.EvalStep(classify, precision="fp8")
    assert fl.TrainStep(classify, precision="fp16").loss_scale == fl.DynamicLossScale()
    with pytest.raises(TypeError, match=r"^grad_norm takes True or False; got 1\.$"):
        fl.make_train_step(classify, grad_norm=1)
    with pytest.raises(TypeError, match=r"^validation_step must be callable; got str\.$"):
        fl.make_eval_step("classify")
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    with pytest.raises(TypeError, match="swap the arguments"):
        fl.make_train_step(classify)(batches(1)[0], state)
    with pytest.raises(TypeError, match=r"^eval_step\(state, batch\) needs a TrainState first"):
        fl.make_eval_step(classify)(batches(1)[0], state)


@pytest.mark.parametrize("compiled", [False, True])
def test_a_made_step_given_to_make_train_step_or_make_eval_step_is_named(compiled):
    """make_train_step(make_train_step(f)) made a step that called the made step as the
    user's (model, batch) function, at its first call: "needs a TrainState first; got
    BoundModel. Did you swap the arguments?", though no arguments were swapped."""
    wrap = (lambda f: torch.compile(f, backend="eager")) if compiled else (lambda f: f)
    for made, make, arg, maker in [
        (fl.make_train_step, fl.make_train_step, "training_step", "make_train_step"),
        (fl.make_eval_step, fl.make_train_step, "training_step", "make_eval_step"),
        (fl.make_train_step, fl.make_eval_step, "validation_step", "make_train_step"),
        (fl.make_eval_step, fl.make_eval_step, "validation_step", "make_eval_step"),
    ]:
        with pytest.raises(
            TypeError, match=rf"^{arg} is a step made by {maker} already, a function of \(state"
        ):
            make(wrap(made(classify)))


def test_a_step_given_a_module_or_swapped_arguments_says_how_to_call_it():
    """The hint fits the mistake: a module in place of the state, or the state second."""
    module = mlp()
    state = fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")
    batch = batches(1)[0]
    for call, make in [("train_step", fl.make_train_step), ("eval_step", fl.make_eval_step)]:
        with pytest.raises(
            TypeError,
            match=rf"^{call}\(state, batch\) needs a TrainState first; got Sequential\. Make "
            r"one from the module: fl\.TrainState\.create\(module, tx=optim\.adamw\(1e-3\)\)\.$",
        ):
            make(classify)(module, batch)
        with pytest.raises(TypeError, match=r"got tuple\. Did you swap the arguments\?$"):
            make(classify)(batch, state)
        with pytest.raises(TypeError, match=r"needs a TrainState first; got int\.$"):
            make(classify)(3, batch)


def test_train_and_validate_epoch_given_the_users_function_say_to_make_a_step():
    """train_epoch and validate_epoch take made steps; given the user's (model, batch)
    function (which fit takes), or a vmap of it, the function called the state as its
    model and failed with "'TrainState' object is not callable" alone."""
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    data = batches(1)
    tail = r"fl\.{}\(fn\) \(vmap that step, not fn, for a stacked state\)\. fit is the one"
    with pytest.raises(
        TypeError,
        match=r"^classify called the state it got as its model: "
        r"train_epoch takes a step of \(state, batch\), made from your function "
        r"of \(model, batch\) by " + tail.format("make_train_step"),
    ):
        fl.train_epoch(state, classify, data)
    with pytest.raises(
        TypeError, match=r"^classify .*validate_epoch .*" + tail.format("make_eval_step")
    ):
        fl.validate_epoch(state, classify, data)
    stacked = fl.stack_states([state, state])
    vmapped = torch.func.vmap(classify, in_dims=(0, None), randomness="different")
    with pytest.raises(TypeError, match=r"^classify .*train_epoch .*make_train_step"):
        fl.train_epoch(stacked, vmapped, data)
    # Other TypeErrors from a made step pass unchanged.
    with pytest.raises(TypeError, match=r"forward\(\) takes 2 positional arguments"):
        fl.train_epoch(state, fl.make_train_step(lambda m, b: m(*b)), data)


def test_a_made_step_whose_function_calls_a_state_is_not_taken_for_the_users_function():
    """A made step passed to train_epoch / validate_epoch whose own function calls a
    state (a teacher's, by mistake) raised the "called the state it got as its model"
    error meant for the user's function passed in place of a made step."""
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    teacher = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")

    def distill(model, batch):
        x, _ = batch
        return {"loss": (model(x) - teacher(x)).pow(2).mean()}

    data = batches(1)
    for run, make in ((fl.train_epoch, fl.make_train_step), (fl.validate_epoch, fl.make_eval_step)):
        with pytest.raises(TypeError, match=r"^'TrainState' object is not callable$"):
            run(state, make(distill), data)


def test_a_wrapper_of_a_made_step_taken_for_the_users_function_says_to_mark_it():
    """fit runs a wrapper of a made step as given only when it keeps the step in
    __wrapped__; a plain one (to time or log each step) was called as the user's (model,
    batch) function and said "needs a TrainState first; got BoundModel." alone."""
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    train_step, eval_step = fl.make_train_step(classify), fl.make_eval_step(classify)

    def timed(state, batch):
        return train_step(state, batch)

    def timed_eval(state, batch):
        return eval_step(state, batch)

    hint = r"got BoundModel\. A function of \(state, batch\) that calls this step .*@functools"
    with pytest.raises(TypeError, match=rf"^train_step\(state, batch\) .*{hint}"):
        fl.fit(state, timed, batches(2), max_epochs=1, progress=False, log_to_console=False)
    with pytest.raises(TypeError, match=rf"^eval_step\(state, batch\) .*{hint}"):
        fl.make_eval_step(timed_eval)(state, batches(1)[0])
    # What the hint says to do works.
    marked = functools.wraps(train_step)(timed)
    done = fl.fit(state, marked, batches(2), max_epochs=1, progress=False, log_to_console=False)
    assert done.step == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"init_scale": float("nan")}, "init_scale must be finite and > 0"),
        ({"init_scale": float("inf")}, "init_scale must be finite and > 0"),
        ({"init_scale": 0.0}, "init_scale must be finite and > 0"),
        ({"growth_factor": float("nan")}, "growth_factor must be finite and > 1"),
        ({"growth_factor": 1.0}, "growth_factor must be finite and > 1"),
        ({"growth_factor": float("inf")}, "growth_factor must be finite and > 1"),
        ({"backoff_factor": float("nan")}, "backoff_factor"),
        ({"backoff_factor": 1.0}, r"backoff_factor must be in \(0, 1\)"),
        ({"backoff_factor": 0.0}, r"backoff_factor must be in \(0, 1\)"),
        ({"growth_interval": 2.5}, "growth_interval must be an integer >= 1"),
        ({"growth_interval": True}, "growth_interval must be an integer >= 1"),
        ({"growth_interval": 0}, "growth_interval must be an integer >= 1"),
    ],
)
def test_a_loss_scale_with_a_nan_or_fractional_setting_is_refused(kwargs, match):
    # A NaN init_scale would skip every fp16 step; a growth_interval of 2.5 never grows.
    with pytest.raises(ValueError, match=match):
        fl.DynamicLossScale(**kwargs)


class _UnusedFirst(nn.Module):
    """A head registered first and unused by forward: its gradient is zeros for any batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.aux = nn.Linear(5, 3).double()
        self.body = nn.Linear(5, 3).double()

    def forward(self, x):
        return self.body(x)


def test_vmap_over_batches_with_a_parameter_the_loss_does_not_use():
    """in_dims=(None, 0): one state, several batches. The unused parameter's gradient
    is not batched while the others are; the optimizer must still run per tensor."""
    state = fl.TrainState.create(
        _UnusedFirst(),
        tx=optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1, momentum=0.9)),
        device="cpu",
    )
    step = fl.make_train_step(classify)
    data = batches(3)
    xs, ys = torch.stack([x for x, _ in data]), torch.stack([y for _, y in data])
    many, metrics = torch.func.vmap(step, in_dims=(None, 0), randomness="different")(
        state, (xs, ys)
    )
    for i, (one, b) in enumerate(zip(fl.unstack_states(many), data)):
        alone, m = step(state, b)
        torch.testing.assert_close(metrics["loss"][i], m["loss"], rtol=1e-12, atol=1e-14)
        for name in alone.params:
            torch.testing.assert_close(one.params[name], alone.params[name], rtol=1e-9, atol=1e-12)


def test_stacking_refuses_states_of_different_modules():
    a = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    other = mlp()
    other[1] = nn.ReLU()  # same parameters, another activation
    b = fl.TrainState.create(other, tx=optim.sgd(0.1), device="cpu")
    with pytest.raises(ValueError, match=r"states\[1\] was made from another module.*Tanh"):
        fl.stack_states([a, b])
    dropped = fl.TrainState.create(
        nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)), tx=optim.sgd(0.1)
    )
    kept = fl.TrainState.create(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)), tx=optim.sgd(0.1))
    with pytest.raises(ValueError, match=r"1\.p is 0\.1 in one and 0\.5 in the other"):
        fl.stack_states([dropped, kept])
    with pytest.raises(TypeError, match=r"states\[0\] is a int"):
        fl.stack_states([1, a])

    def make(act):
        class Net(nn.Module):  # a class per call, of one name
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(2, 2)

            def forward(self, x):
                return act(self.fc(x))

        return Net()

    for one, other, match in [
        (make(torch.relu), make(torch.tanh), "another class of that name"),
        (nn.Conv2d(1, 2, 3), nn.Conv2d(1, 2, 3, stride=2), r"stride is \(1, 1\)"),
        (
            nn.Sequential(nn.Linear(2, 2), nn.ReLU()),
            nn.Sequential(nn.Linear(2, 2), nn.GELU()),
            "ReLU",
        ),
    ]:
        states = [fl.TrainState.create(m, tx=optim.sgd(0.1)) for m in (one, other)]
        with pytest.raises(ValueError, match=match):
            fl.stack_states(states)
    hooked = nn.Linear(2, 2)
    hooked.register_forward_hook(lambda m, i, o: o * 0)
    with pytest.raises(ValueError, match="_forward_hooks"):
        fl.stack_states(
            [fl.TrainState.create(m, tx=optim.sgd(0.1)) for m in (nn.Linear(2, 2), hooked)]
        )
    inplace = [nn.Sequential(nn.Linear(2, 2), nn.ReLU(inplace=flag)) for flag in (False, True)]
    fl.stack_states([fl.TrainState.create(m, tx=optim.sgd(0.1)) for m in inplace])
    fl.stack_states([a, fl.TrainState.create(mlp(seed=3), tx=optim.sgd(0.2), device="cpu")])
    # parametrize makes a class per module: two weight-normed models are still alike.
    normed = [
        fl.TrainState.create(
            nn.utils.parametrizations.weight_norm(nn.Linear(3, 2)), tx=optim.sgd(0.1)
        )
        for _ in range(2)
    ]
    assert fl.stack_states(normed).params["parametrizations.weight.original0"].shape[0] == 2


def test_a_stacked_state_outside_vmap_is_a_clear_error():
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    stacked = fl.stack_states([state, state])
    b = batches(1)[0]
    for call, name in [
        (lambda: fl.make_train_step(classify)(stacked, b), "train_step"),
        (lambda: fl.make_eval_step(classify)(stacked, b), "eval_step"),
        (lambda: fl.train_epoch(stacked, fl.make_train_step(classify), [b]), "train_step"),
        (lambda: fl.validate_epoch(stacked, fl.make_eval_step(classify), [b]), "eval_step"),
        (lambda: torch.compile(fl.make_train_step(classify))(stacked, b), "train_step"),
        (lambda: torch.compile(fl.make_eval_step(classify))(stacked, b), "eval_step"),
    ]:
        with pytest.raises(ValueError, match=rf"^{name} runs one model.*2 stacked models.*vmap"):
            call()
    raising = fl.make_train_step(classify, on_nonfinite="raise")
    with pytest.raises(ValueError, match=r"on_nonfinite='raise'.*'skip'"):
        torch.func.vmap(raising, in_dims=(0, None), randomness="different")(stacked, b)


def test_a_stacked_state_under_vmap_over_the_batches_only_is_a_clear_error():
    """``in_dims=(None, 0)`` (one state, several batches: the guide's bootstrap) given a
    stacked state: the step, under vmap, skipped the check and torch failed in forward
    with "t() expects a tensor with <= 2 dimensions, but self is 3D"."""
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    stacked = fl.stack_states([state, state])
    x, y = batches(1)[0]
    two = (torch.stack([x, x]), torch.stack([y, y]))
    for make, name, extra in [
        (fl.make_train_step, "train_step", {"randomness": "different"}),
        (fl.make_eval_step, "eval_step", {}),
    ]:
        over_batches = torch.func.vmap(make(classify), in_dims=(None, 0), **extra)
        with pytest.raises(ValueError, match=rf"^{name} runs one model.*2 stacked models"):
            over_batches(stacked, two)
        over_batches(state, two)  # one state: as before


def test_vmap_over_stacked_states_matches_separate_training():
    data = batches(4, dtype=torch.float32)
    lrs = [0.1, 0.03, 0.01]
    states = [
        fl.TrainState.create(
            mlp(seed=i, bn=True, dtype=torch.float32),
            tx=optim.adam(lr),
            ema_decay=0.9,
            device="cpu",
        )
        for i, lr in enumerate(lrs)
    ]
    step = fl.make_train_step(classify)
    separate = list(states)
    for b in data:
        separate = [step(s, b)[0] for s in separate]
    stacked = fl.stack_states(states)
    vstep = torch.func.vmap(step, in_dims=(0, None), randomness="different")
    for b in data:
        stacked, metrics = vstep(stacked, b)
    assert metrics["loss"].shape == (3,)
    for got, want in zip(fl.unstack_states(stacked), separate):
        for a, b in zip(fl._tree.tree_leaves(got), fl._tree.tree_leaves(want)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert got.step == want.step == 4


def classify_with_predictions(model, batch):
    return {**classify(model, batch), "pred": model(batch[0]).argmax(-1)}


def test_train_and_validate_epoch_over_a_stacked_state_match_each_model_alone():
    # Uneven batches (8, 8, 3): the per-model means are weighted by batch size.
    data = batches(2, dtype=torch.float32) + batches(1, size=3, dtype=torch.float32, seed=7)
    states = [
        fl.TrainState.create(
            mlp(seed=i, bn=True, dtype=torch.float32), tx=optim.adam(lr), device="cpu"
        )
        for i, lr in enumerate([0.1, 0.03, 0.01])
    ]
    train_step = fl.make_train_step(classify_with_predictions)
    eval_step = fl.make_eval_step(classify_with_predictions)
    alone = []
    for state in states:
        state, train_means = fl.train_epoch(state, train_step, data)
        alone.append((state, train_means, fl.validate_epoch(state, eval_step, data)[1]))
    many = torch.func.vmap(train_step, in_dims=(0, None), randomness="different")
    stacked, train_means = fl.train_epoch(fl.stack_states(states), many, data, progress=True)
    _, valid_means = fl.validate_epoch(stacked, torch.func.vmap(eval_step, in_dims=(0, None)), data)
    assert list(train_means) == list(valid_means) == ["loss", "acc"]  # "pred" is an output
    for i, (state, train_alone, valid_alone) in enumerate(alone):
        for key in ("loss", "acc"):
            assert train_means[key][i] == pytest.approx(train_alone[key], rel=1e-5)
            assert valid_means[key][i] == pytest.approx(valid_alone[key], rel=1e-5)
        got = fl.unstack_states(stacked)[i]
        for a, b in zip(fl._tree.tree_leaves(got), fl._tree.tree_leaves(state)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_metric_means_per_model_weights_batches_and_keeps_outputs_apart():
    means = fl.MetricMeans(models=2)
    means.add({"loss": torch.tensor([1.0, 2.0]), "pred": torch.zeros(2, 3)}, 3)
    means.add({"loss": torch.tensor([5.0, 10.0]), "pred": torch.zeros(2, 1)}, 1)
    assert means.means() == {"loss": [2.0, 4.0]}
    restored = fl.MetricMeans(models=2)
    restored.load_state_dict(means.state_dict())
    restored.add({"loss": torch.tensor([2.0, 4.0])}, 4)
    assert restored.means() == {"loss": [2.0, 4.0]}
    assert fl.epoch._format({"loss": [0.5, 0.25, 2.0], "acc": 0.5}) == "loss:0.25..2 acc:0.5"
    with pytest.raises(ValueError, match=r"'loss' have shape \(2,\).*models=None.*shape \(\)"):
        fl.MetricMeans().load_state_dict(means.state_dict())
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="models must be None or a positive int"):
            fl.MetricMeans(models=bad)


def test_the_progress_range_of_per_model_means_shows_a_diverged_model():
    # Wherever the NaN is: min and max of floats alone would hide it at the front or middle.
    nan = float("nan")
    for diverged in ([nan, 0.5, 0.25], [0.5, nan, 0.25], [0.5, 0.25, nan]):
        assert fl.epoch._format({"loss": diverged}) == "loss:0.25..nan"
    assert fl.epoch._format({"loss": [nan, nan], "acc": nan}) == "loss:nan..nan acc:nan"


def test_train_epoch_refuses_means_made_for_another_number_of_models():
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    step = fl.make_train_step(classify)
    with pytest.raises(ValueError, match=r"MetricMeans\(models=2\).*one model.*models=None"):
        fl.train_epoch(state, step, batches(1), means=fl.MetricMeans(models=2))
    many = torch.func.vmap(step, in_dims=(0, None), randomness="different")
    with pytest.raises(ValueError, match=r"holds 2 stacked models; .*MetricMeans\(models=2\)"):
        fl.train_epoch(fl.stack_states([state] * 2), many, batches(1), means=fl.MetricMeans())
    with pytest.raises(ValueError, match=r"holds 1 stacked model; .*MetricMeans\(models=1\)"):
        fl.train_epoch(fl.stack_states([state]), many, batches(1), means=fl.MetricMeans())


def test_fit_names_train_epoch_as_the_way_to_train_a_stacked_state():
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    with pytest.raises(ValueError, match=r"^fit runs one model.*fl\.train_epoch"):
        fl.fit(fl.stack_states([state] * 2), classify, batches(1), max_epochs=1)


@pytest.mark.slow
def test_compiled_vmapped_donating_step_is_one_graph_and_writes_into_the_stack_ci_subset():
    """torch.compile(vmap(step made with donate=True)), fullgraph: the same numbers as the
    eager vmapped step, the stacked weights and moments updated in their own storage."""
    torch._dynamo.reset()
    data = batches(3, dtype=torch.float32)
    states = [
        fl.TrainState.create(mlp(seed=i, dtype=torch.float32), tx=optim.adam(lr), device="cpu")
        for i, lr in enumerate([0.1, 0.01])
    ]
    eager = torch.func.vmap(fl.make_train_step(classify), in_dims=(0, None), randomness="same")
    compiled = torch.compile(
        torch.func.vmap(
            fl.make_train_step(classify, donate=True), in_dims=(0, None), randomness="same"
        ),
        fullgraph=True,
    )
    want, got = fl.stack_states(states), fl.stack_states(states)
    before = [t.data_ptr() for t in (*got.params.values(), *got.opt_state[1].mu.values())]
    for b in data:
        want, _ = eager(want, b)
        got, _ = compiled(got, b)
    assert [t.data_ptr() for t in (*got.params.values(), *got.opt_state[1].mu.values())] == before
    for a, b in zip(fl._tree.tree_leaves(got), fl._tree.tree_leaves(want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_vmap_over_batches_only_trains_one_model_per_batch():
    """``in_dims=(None, 0)``: one state, several batches (a bootstrap ensemble from one
    start) gives the states of one step on each batch, stacked. (With BatchNorm, stack
    copies of the state instead: torch.func cannot update unbatched running statistics.)"""
    state = fl.TrainState.create(
        mlp(dtype=torch.float32), tx=optim.adam(0.1), ema_decay=0.9, device="cpu"
    )
    data = batches(3, dtype=torch.float32)
    step, eval_step = fl.make_train_step(classify), fl.make_eval_step(classify)
    separate = [step(state, b)[0] for b in data]
    xs, ys = torch.stack([x for x, _ in data]), torch.stack([y for _, y in data])
    stacked, metrics = torch.func.vmap(step, in_dims=(None, 0), randomness="different")(
        state, (xs, ys)
    )
    assert metrics["loss"].shape == (3,)
    for got, want in zip(fl.unstack_states(stacked), separate):
        for a, b in zip(fl._tree.tree_leaves(got), fl._tree.tree_leaves(want)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    evaluated = torch.func.vmap(eval_step, in_dims=(None, 0))(state, (xs, ys))
    want = torch.stack([eval_step(state, b)["loss"] for b in data])
    torch.testing.assert_close(evaluated["loss"], want)


def test_metrics_stay_on_device_and_detached():
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    _, metrics = fl.make_train_step(lambda m, b: {**classify(m, b), "const": 2})(
        state, batches(1)[0]
    )
    assert set(metrics) == {"loss", "acc", "const"}
    assert all(not m.requires_grad and m.dim() == 0 for m in metrics.values())


@pytest.mark.parametrize("ema", [None, 0.9])
@pytest.mark.parametrize(
    "tx_fn",
    [
        lambda: optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2)),
        lambda: optim.sgd(0.1, momentum=0.9, nesterov=True),
        lambda: optim.rmsprop(1e-2, centered=True, momentum=0.5),
    ],
)
def test_donating_step_matches_pure_step_and_reuses_memory(tx_fn, ema):
    data = batches(6)
    pure_state = fl.TrainState.create(mlp(bn=True), tx=tx_fn(), ema_decay=ema, device="cpu")
    donated = fl._tree.tree_map(torch.clone, pure_state)
    pure, donating = fl.make_train_step(classify), fl.make_train_step(classify, donate=True)
    ptrs = {n: p.data_ptr() for n, p in donated.params.items()}
    ema_ptrs = {n: e.data_ptr() for n, e in (donated.ema or {}).items()}
    for b in data:
        pure_state, m1 = pure(pure_state, b)
        donated, m2 = donating(donated, b)
        torch.testing.assert_close(m1["loss"], m2["loss"], rtol=1e-12, atol=1e-14)
    assert {n: p.data_ptr() for n, p in donated.params.items()} == ptrs
    # The EMA too, from the first step (which sets it to the weights) on.
    assert {n: e.data_ptr() for n, e in (donated.ema or {}).items()} == ema_ptrs
    for a, b in zip(fl._tree.tree_leaves(pure_state), fl._tree.tree_leaves(donated)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("donate", [False, True])
def test_a_parameter_returned_as_a_metric_keeps_the_value_forward_saw(donate):
    # The optimizer updates the parameters in place (the donated ones, or a pure step's
    # copies): a metric that is a parameter, or a view of one, read the updated value,
    # and with donation a later step's (fit's epoch mean was the last step's value).
    def step_fn(model, batch):
        out = classify(model, batch)
        return {**out, "b": model.params["2.bias"][0], "w": model.params["0.weight"]}

    step = fl.make_train_step(step_fn, donate=donate)
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    if donate:
        state = state.clone()
    seen, metrics = [], []
    for b in batches(3):
        seen.append((state.params["2.bias"][0].item(), state.params["0.weight"].clone()))
        state, m = step(state, b)
        metrics.append(m)
    for (bias, weight), m in zip(seen, metrics):
        assert m["b"].item() == bias
        assert torch.equal(m["w"], weight)


@pytest.mark.slow
def test_a_parameter_returned_as_a_metric_of_a_compiled_donating_step_keeps_its_value():
    """Compiled, the donating step writes the update into the parameters, which the
    metric aliased: it read the updated value, then each later step's."""
    torch._dynamo.reset()

    def step_fn(model, batch):
        return {**classify(model, batch), "b": model.params["2.bias"][0]}

    step = torch.compile(fl.make_train_step(step_fn, donate=True))
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu").clone()
    seen, metrics = [], []
    for b in batches(3):
        seen.append(state.params["2.bias"][0].item())
        state, m = step(state, b)
        metrics.append(m)
    assert [m["b"].item() for m in metrics] == seen


def test_reusing_a_donated_state_fails_loudly():
    step = fl.make_train_step(classify, donate=True)
    state = fl.TrainState.create(mlp(), tx=optim.adam(1e-2), device="cpu")
    b = batches(1)[0]
    new_state, _ = step(state, b)
    newer, _ = step(new_state.replace(epoch=1), b)  # a replaced copy of the latest is fine
    with pytest.raises(RuntimeError, match="donated to an earlier call"):
        step(new_state, b)
    with pytest.raises(RuntimeError, match="donated to an earlier call"):
        step(state, b)
    step(newer, b)


def test_every_use_of_a_donated_state_fails_loudly(tmp_path):
    """Not only the donating step: a pure step, an eval step, clone(), state_dict() and
    save_checkpoint() would read values that belong to a later state."""
    state = fl.TrainState.create(mlp(), tx=optim.adam(1e-2), device="cpu").clone()
    b = batches(1)[0]
    new_state, _ = fl.make_train_step(classify, donate=True)(state, b)
    for what, use in [
        ("this train step", lambda s: fl.make_train_step(classify)(s, b)),
        ("this eval step", lambda s: fl.make_eval_step(classify)(s, b)),
        ("clone()", lambda s: s.clone()),
        ("state_dict()", lambda s: s.state_dict()),
        ("save_checkpoint", lambda s: fl.save_checkpoint(tmp_path / "c.pt", s)),
    ]:
        message = rf"donated to an earlier call.*so {re.escape(what)} would"
        with pytest.raises(RuntimeError, match=message):
            use(state)
        with pytest.raises(RuntimeError, match="donated to an earlier call"):
            use(state.replace(epoch=1))  # a changed copy holds the same tensors
        use(new_state)  # the state the step returned is fine
    assert fl.load_checkpoint(tmp_path / "c.pt", like=new_state).step == 1


def test_donation_guard_tracks_several_states_and_forgets_dead_ones():
    step = fl.make_train_step(classify, donate=True)
    b = batches(1)[0]
    a0 = fl.TrainState.create(mlp(seed=0), tx=optim.adam(1e-2), device="cpu").clone()
    b0 = fl.TrainState.create(mlp(seed=1), tx=optim.adam(1e-2), device="cpu").clone()
    a1, _ = step(a0, b)
    b1, _ = step(b0, b)
    with pytest.raises(RuntimeError, match="donated to an earlier call"):
        step(a0, b)  # not the last state the step saw, still consumed
    step(a1, b)
    step(b1, b)
    # States dropped after donation free their memory; fresh states made there later are
    # not mistaken for them.
    template = fl.TrainState.create(mlp(), tx=optim.adam(1e-2), device="cpu")
    for _ in range(20):
        new, _ = step(template.clone(), b)
        del new


@pytest.mark.slow
def test_compiled_step_has_no_graph_breaks_and_matches_eager_ci_subset():
    torch._dynamo.reset()
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(optim.cosine_schedule(1e-2, 50)))
    state = fl.TrainState.create(
        mlp(bn=True, dtype=torch.float32), tx=tx, ema_decay=0.9, device="cpu"
    )
    step = fl.make_train_step(classify, on_nonfinite="skip")
    data = batches(4, dtype=torch.float32)
    explanation = torch._dynamo.explain(step)(state, data[0])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True)
    eager_state = compiled_state = state
    for b in data:
        eager_state, m1 = step(eager_state, b)
        compiled_state, m2 = compiled(compiled_state, b)
        torch.testing.assert_close(m1["loss"], m2["loss"], rtol=1e-5, atol=1e-6)
    for a, b in zip(fl._tree.tree_leaves(eager_state), fl._tree.tree_leaves(compiled_state)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("policy", [None, "skip"])
def test_compiled_donating_step_writes_into_the_donated_state_ci_subset(policy):
    """torch.compile(make_train_step(..., donate=True)): no graph breaks, the same numbers
    as the pure eager step, and params, moments and EMA stay in the donated buffers; also
    when an update may be skipped (the selected state is written back)."""
    torch._dynamo.reset()
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(optim.cosine_schedule(1e-2, 8)))
    state = fl.TrainState.create(
        mlp(bn=True, dtype=torch.float32), tx=tx, ema_decay=0.9, device="cpu"
    )
    state = fl._tree.tree_map(torch.clone, state)  # not the module's own tensors
    data = batches(4, dtype=torch.float32)
    if policy == "skip":
        data[2] = (torch.full_like(data[2][0], float("nan")), data[2][1])
    step = fl.make_train_step(classify, donate=True, on_nonfinite=policy)
    scratch = fl._tree.tree_map(torch.clone, state)
    explanation = torch._dynamo.explain(step)(scratch, data[0])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True)
    eager_step = fl.make_train_step(classify, on_nonfinite=policy)
    donated = fl._tree.tree_map(torch.clone, state)

    def buffers_of(s):  # params, EMA, Adam's moments
        adam = s.opt_state[1][0]
        trees = (s.params, s.ema, adam.mu, adam.nu)
        return [t.data_ptr() for tree in trees for t in tree.values()]

    before = buffers_of(donated)
    eager_state = state
    for b in data:
        eager_state, m1 = eager_step(eager_state, b)
        donated, m2 = compiled(donated, b)
        torch.testing.assert_close(m1["loss"], m2["loss"], rtol=1e-5, atol=1e-6, equal_nan=True)
    assert buffers_of(donated) == before
    assert int(donated.skipped_steps) == (1 if policy == "skip" else 0)
    for a, b in zip(fl._tree.tree_leaves(eager_state), fl._tree.tree_leaves(donated)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_skip_keeps_the_batchnorm_statistics_of_a_nan_batch_out(accumulation_steps):
    """A NaN in the batch makes the loss and the batch's running statistics NaN: "skip"
    leaves the whole state as without that batch (BatchNorm statistics included), apart
    from the counters."""
    step = fl.make_train_step(classify, on_nonfinite="skip", accumulation_steps=accumulation_steps)
    state = fl.TrainState.create(mlp(bn=True), tx=optim.adam(1e-2), ema_decay=0.9, device="cpu")
    good = batches(2 * accumulation_steps)
    bad = (good[0][0].clone(), good[0][1])
    bad[0][0, 0] = float("nan")
    skipped, ref = state, state
    for b in good[:accumulation_steps] + [bad] * accumulation_steps + good[accumulation_steps:]:
        skipped, _ = step(skipped, b)
    for b in good:
        ref, _ = step(ref, b)
    assert int(skipped.skipped_steps) == 1 and int(ref.skipped_steps) == 0
    for tree in ("params", "buffers", "ema", "opt_state"):
        for a, b in zip(
            fl._tree.tree_leaves(getattr(skipped, tree)), fl._tree.tree_leaves(getattr(ref, tree))
        ):
            assert torch.equal(a, b), tree


class WithScalar(nn.Module):
    """A float64 model with a 0-d parameter (a learned temperature)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.lin(x) / self.temperature


def test_compiled_donating_step_advances_scalars():
    """0-d leaves (the schedule's rate, the counts, a 0-d parameter) are returned new, not
    written into the donated ones: dynamo drops writes into 0-d float64 CPU inputs, and the
    learning rate stayed at its first value."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    tx = optim.sgd(optim.exponential_schedule(0.1, 0.5), momentum=0.9)
    state = fl.TrainState.create(WithScalar().double(), tx=tx, device="cpu").clone()
    compiled = torch.compile(fl.make_train_step(classify, donate=True), backend="aot_eager")
    eager_step, eager_state, donated = fl.make_train_step(classify), state, state.clone()
    for b in batches(4):
        eager_state, _ = eager_step(eager_state, b)
        donated, _ = compiled(donated, b)
    assert optim.learning_rates(donated.opt_state)[0].item() == 0.1 * 0.5**4
    for a, b in zip(fl._tree.tree_leaves(eager_state), fl._tree.tree_leaves(donated)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# Graphs dynamo makes of a train step over its first steps: before torch 2.14 one for
# step 0 (the int step 0 specialized) and one for all later steps, from 2.14 one.
TRAIN_GRAPHS = 2 if torch.__version__ < torch.torch_version.TorchVersion("2.14") else 1


def test_compiled_steps_do_not_recompile_as_they_warm_up():
    """The steps keep nothing that their first traced call fills in (dynamo would guard
    on it and recompile), and the eval step's eval-mode module is made with the state,
    not copied inside the trace (a graph break, an error under fullgraph=True)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    state = fl.TrainState.create(mlp(bn=True), tx=optim.adamw(1e-2), device="cpu")
    assert state.module.training  # the eval step needs its eval-mode copy
    train_counter, eval_counter = CompileCounter(), CompileCounter()
    train = torch.compile(fl.make_train_step(classify), backend=train_counter, fullgraph=True)
    evaluate = torch.compile(fl.make_eval_step(classify), backend=eval_counter, fullgraph=True)
    eager_eval = fl.make_eval_step(classify)
    for b in batches(5):
        state, _ = train(state, b)
        torch.testing.assert_close(evaluate(state, b), eager_eval(state, b))
    # Train graphs: before torch 2.14 two, step 0 (the counter's 0 specialized) and every
    # later step; from 2.14 one for all steps. One eval graph.
    assert train_counter.frame_count == TRAIN_GRAPHS
    assert eval_counter.frame_count == 1


def _detached_loss_step(model, batch):
    return {"loss": classify(model, batch)["loss"].detach()}


def _logits_only_step(model, batch):
    return model(batch[0])


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_errors_in_a_fullgraph_compiled_step_name_the_step_function(kind):
    """Under torch.compile(fullgraph=True) dynamo reports an error raised in traced code
    with the message it was built with; the step function's name was read while tracing,
    where dynamo made it "<attribute '__qualname__' of 'function' objects>"."""
    torch._dynamo.reset()
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    if kind == "train":
        step, fn = fl.make_train_step(_detached_loss_step), "_detached_loss_step"
        says = f"the 'loss' returned by {fn} does not depend on any parameter"
    else:
        step, fn = fl.make_eval_step(_logits_only_step), "_logits_only_step"
        says = f"{fn} must return a mapping of metrics"
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    try:
        with pytest.raises(Exception, match=re.escape(says)) as info:
            compiled(state, batches(1)[0])
    finally:  # dynamo keeps the frames of the failed trace, which later compiles would use
        torch._dynamo.reset()
    assert "<attribute" not in str(info.value)


def test_each_made_step_compiles_on_its_own():
    """torch.compile wraps a callable object in one function shared by all, whose graph
    cache (8 graphs) and record of seen shapes would then be shared by every step of the
    process. A made step is a function with a code object of its own: steps for models of
    six widths all compile (no recompile limit), and a step for another batch size traces
    static shapes again, which dropout under torch.func needs."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    for width in range(6):
        torch.manual_seed(width)
        module = nn.Sequential(nn.Linear(5, 8 + width), nn.Dropout(0.1), nn.Linear(8 + width, 3))
        state = fl.TrainState.create(module.double(), tx=optim.adamw(1e-2), device="cpu")
        train = torch.compile(fl.make_train_step(classify), backend=counter, fullgraph=True)
        evaluate = torch.compile(fl.make_eval_step(classify), backend=counter, fullgraph=True)
        for b in batches(3, size=8 + width):  # another batch size for each model
            state, _ = train(state, b)
        evaluate(state, batches(1, size=40)[0])
        assert counter.frame_count == (TRAIN_GRAPHS + 1) * (width + 1)  # train, eval
    made = fl.make_train_step(classify)
    assert made.__name__ == "train_step" and isinstance(inspect.unwrap(made), fl.TrainStep)
    assert isinstance(inspect.unwrap(fl.make_eval_step(classify)), fl.EvalStep)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.1)
        self.scale = 1.0

    def forward(self, x):
        return self.drop(self.lin(x)) * self.scale


def test_eager_steps_see_what_was_set_on_the_template_after_create():
    """The eval-mode copy an eager eval step uses (and the train-mode copy for a module
    made in eval mode) is copied from the template on the step's first call."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for module in (Scaled(), Scaled().eval()):
        state = fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")
        state.module.scale = 0.0  # zero logits: the loss is log(3)
        calls: list[bool] = []
        state.module.lin.register_forward_hook(lambda m, i, o, c=calls: c.append(m.training))
        expected = torch.tensor(3.0).log()
        _, metrics = fl.make_train_step(classify)(state, (x, y))
        torch.testing.assert_close(metrics["loss"], expected)
        torch.testing.assert_close(fl.make_eval_step(classify)(state, (x, y))["loss"], expected)
        assert calls == [True, False]


def test_in_mode_copies_a_module_once_and_leaves_it_alone():
    module = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    training = fl.state.in_mode(module, training=True)
    assert training is not module and fl.state.in_mode(module, training=True) is training
    evaluating = fl.state.in_mode(module, training=False)
    assert evaluating is not module and not any(m.training for m in evaluating.modules())
    assert all(m.training for m in module.modules())
    assert fl.state.in_mode(module, training=False) is evaluating
    assert len(list(module.modules())) == 3  # the copy is not registered as a submodule
    mixed = copy.deepcopy(module)
    mixed[1].eval()
    training = fl.state.in_mode(mixed, training=True)
    assert all(m.training for m in training.modules()) and not mixed[1].training


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(self.emb(x))


def test_tied_weights_get_the_gradient_of_both_uses():
    torch.manual_seed(0)
    module = TiedLM()
    ref = copy.deepcopy(module)
    opt = torch.optim.SGD(ref.parameters(), 0.1)
    state = fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")
    assert list(state.params) == ["emb.weight"]
    step = fl.make_train_step(lambda model, b: {"loss": F.cross_entropy(model(b), b)})
    for i in range(3):
        tokens = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(i))
        state, _ = step(state, tokens)
        opt.zero_grad()
        F.cross_entropy(ref(tokens), tokens).backward()
        opt.step()
    torch.testing.assert_close(state.params["emb.weight"], ref.emb.weight.detach())


def test_train_step_reads_nothing_back_to_the_host(monkeypatch):
    """B3: after its first call a step with clipping, EMA, a schedule and the skip policy
    calls no .item(), bool(), float(), int(), .tolist() or .cpu() on any tensor."""
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(optim.cosine_schedule(1e-2, 20)))
    state = fl.TrainState.create(mlp(bn=True), tx=tx, ema_decay=0.9, device="cpu")
    step = fl.make_train_step(classify, on_nonfinite="skip")
    eval_step = fl.make_eval_step(classify)
    donating = fl.make_train_step(classify, on_nonfinite="skip", donate=True)
    data = batches(4)
    state, _ = step(state, data[0])
    donated = fl._tree.tree_map(torch.clone, state)
    donated, _ = donating(donated, data[0])
    calls = []

    def spy(name):
        def record(self, *args, **kwargs):
            calls.append(name)
            raise AssertionError(f"host read: Tensor.{name}")

        return record

    for name in ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    means = fl.MetricMeans()
    for b in data[1:]:
        state, metrics = step(state, b)
        donated, _ = donating(donated, b)
        means.add(metrics, 8)
        means.add(eval_step(state, b), 8)
    monkeypatch.undo()
    assert calls == []
    assert state.step == 4


@pytest.mark.parametrize("kernel", ["fused", "foreach"])
@pytest.mark.parametrize(
    "tx_fn",
    [
        lambda: optim.adamw(1e-2),
        lambda: optim.chain(optim.clip_by_global_norm(1.0), optim.adam(1e-2, amsgrad=True)),
        lambda: optim.sgd(0.1, momentum=0.9),
    ],
)
def test_pure_and_donating_steps_with_a_constant_rate_read_nothing(tx_fn, kernel, monkeypatch):
    """B3 for the fused update with host-side scalars: after the first call, pure and
    donating steps read nothing back, with torch's fused CPU kernels and with the
    foreach order other devices run (forced here)."""
    from fnloop.optim import _foreach

    if kernel == "foreach":
        monkeypatch.setattr(_foreach, "_fusable", lambda *lists: False)
    state = fl.TrainState.create(mlp(), tx=tx_fn(), ema_decay=0.9, device="cpu")
    pure, donating = fl.make_train_step(classify), fl.make_train_step(classify, donate=True)
    data = batches(4)
    donated, _ = donating(state.clone(), data[0])
    state, _ = pure(state, data[0])
    with monkeypatch.context() as spies:
        for name in ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "numpy"):
            spies.setattr(torch.Tensor, name, _no_host_read(name))
        for b in data[1:]:
            state, _ = pure(state, b)
            donated, _ = donating(donated, b)
    for a, b in zip(fl._tree.tree_leaves(state), fl._tree.tree_leaves(donated)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _no_host_read(name):
    def record(self, *args, **kwargs):
        raise AssertionError(f"host read: Tensor.{name}")

    return record


def test_donating_steps_of_two_states_sharing_one_optimizer_read_nothing(monkeypatch):
    """The fused step keeps each state's update count on the host: after the first call
    per state, alternating two states that share one ``tx`` reads nothing back."""
    tx = optim.adamw(1e-2)
    states = [
        fl.TrainState.create(mlp(), tx=tx, device="cpu").clone(),
        fl.TrainState.create(mlp(), tx=tx, device="cpu").clone(),
    ]
    step = fl.make_train_step(classify, donate=True)
    data = batches(4)
    states = [step(s, data[0])[0] for s in states]

    def spy(self, *args, **kwargs):
        raise AssertionError("host read")

    for name in ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, spy)
    for b in data[1:]:
        states = [step(s, b)[0] for s in states]
    monkeypatch.undo()
    for s in states:
        assert s.step == 4 and int(s.opt_state[0].count) == 4


@pytest.mark.parametrize("make_tx", [optim.adamw, optim.sgd], ids=["adamw", "sgd"])
def test_donating_step_uses_each_states_own_learning_rate(make_tx):
    """Unstacked states keep states[0]'s ``tx`` but their own learning rates: the fused
    step must follow the state, as the pure one does."""
    states = [fl.TrainState.create(mlp(seed=0), tx=make_tx(lr), device="cpu") for lr in (0.1, 0.01)]
    _, second = fl.unstack_states(fl.stack_states(states))
    assert second.tx is states[0].tx
    data = batches(3)
    pure, donated = second, second.clone()
    step, donating = fl.make_train_step(classify), fl.make_train_step(classify, donate=True)
    for b in data:
        pure, _ = step(pure, b)
        donated, _ = donating(donated, b)
    for name in pure.params:
        torch.testing.assert_close(donated.params[name], pure.params[name], rtol=1e-6, atol=1e-7)


class SharedGrad(nn.Module):
    """``autograd.grad`` returns one tensor for p and q, and a stride-0 view for ``scale``."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))
        self.q = nn.Parameter(torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x):
        return ((self.p + self.q) * x).sum() + self.scale.sum()


@pytest.mark.parametrize("donate", [False, True])
def test_shared_and_expanded_gradients_match_a_hand_loop(donate):
    x = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)
    ref = SharedGrad()
    opt = torch.optim.RMSprop(ref.parameters(), lr=0.1, momentum=0.9, foreach=True)
    state = fl.TrainState.create(
        SharedGrad(),
        tx=optim.chain(optim.clip_by_global_norm(1.0), optim.rmsprop(0.1, momentum=0.9)),
        device="cpu",
    )
    state = state.clone() if donate else state
    step = fl.make_train_step(lambda model, b: {"loss": model(b)}, donate=donate)
    for _ in range(3):
        opt.zero_grad()
        ref(x).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        state, _ = step(state, x)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("donate", [False, True])
def test_frozen_parameters_are_not_trained_like_a_hand_loop(donate):
    # A frozen first layer (fine-tuning): torch.optim gets only the trainable params.
    def frozen_mlp():
        module = mlp(bn=True)
        module[0].requires_grad_(False)
        return module

    ref = frozen_mlp()
    opt = torch.optim.AdamW(
        [p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1, foreach=True
    )
    state = fl.TrainState.create(frozen_mlp(), tx=optim.adamw(1e-2, weight_decay=0.1), device="cpu")
    assert "0.weight" not in state.params and "0.weight" in state.buffers
    state = state.clone() if donate else state
    step = fl.make_train_step(classify, donate=donate)
    for b in batches(3):
        opt.zero_grad()
        classify(ref, b)["loss"].backward()
        opt.step()
        state, _ = step(state, b)
    weights = state.state_dict()
    for name, t in ref.state_dict().items():
        torch.testing.assert_close(weights[name], t, rtol=1e-10, atol=1e-12, msg=name)
    assert torch.equal(weights["0.weight"], frozen_mlp()[0].weight.detach())


def test_a_module_with_every_parameter_frozen_is_an_error():
    with pytest.raises(ValueError, match="all 4 have requires_grad=False"):
        fl.TrainState.create(mlp().requires_grad_(False), tx=optim.sgd(0.1), device="cpu")


def test_stack_states_rejects_states_at_different_points_or_ema_decays():
    a = fl.TrainState.create(mlp(seed=0), tx=optim.adam(1e-2), ema_decay=0.9, device="cpu")
    b = fl.TrainState.create(mlp(seed=1), tx=optim.adam(1e-3), ema_decay=0.99, device="cpu")
    with pytest.raises(ValueError, match=r"states\[1\]\.ema_decay is 0\.99"):
        fl.stack_states([a, b])
    with pytest.raises(ValueError, match=r"states\[1\]\.step is 3"):
        fl.stack_states([a, a.replace(step=3)])


def test_a_detached_loss_is_an_error_under_vmap_too():
    bad = fl.make_train_step(lambda model, b: {"loss": model(b[0]).mean().detach()})
    states = fl.stack_states(
        [fl.TrainState.create(mlp(seed=i), tx=optim.sgd(0.1), device="cpu") for i in range(2)]
    )
    with pytest.raises(ValueError, match="does not depend on any parameter"):
        torch.func.vmap(bad, in_dims=(0, None), randomness="different")(states, batches(1)[0])


def test_vmap_of_batchnorm_with_a_cumulative_average_names_the_layer_and_the_fix():
    """``BatchNorm(momentum=None)`` keeps a cumulative average: its forward reads the batch
    count on the host (``1 / float(num_batches_tracked)``), which vmap cannot. The error
    names the layer and the fix (a number momentum), not packed sequences; evaluating,
    which does not update the statistics, works."""
    modules = [mlp(seed=i, bn=True) for i in range(2)]
    for module in modules:
        module[1].momentum = None
    states = [fl.TrainState.create(m, tx=optim.sgd(0.1), device="cpu") for m in modules]
    stacked, batch = fl.stack_states(states), batches(1)[0]
    many = torch.func.vmap(fl.make_train_step(classify), in_dims=(0, None), randomness="different")
    with pytest.raises(
        RuntimeError,
        match=r"(?s)BatchNorm1d '1' has momentum=None.*momentum=0\.1.*fl\.unstack_states",
    ) as info:
        many(stacked, batch)
    assert "PackedSequence" not in str(info.value)
    evals = torch.func.vmap(fl.make_eval_step(classify), in_dims=(0, None))(stacked, batch)
    for i, state in enumerate(states):
        torch.testing.assert_close(
            evals["loss"][i], fl.make_eval_step(classify)(state, batch)["loss"]
        )


class _Checkpointed(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)


def test_vmap_of_activation_checkpointing_names_it_and_the_way_out():
    """torch.func's gradients cannot run saved-tensor hooks (activation checkpointing):
    torch says "don't yet support saved tensor hooks. Please open an issue" (torch 2.11:
    "You tried to vmap over _NoopSaveInputs"); the vmapped step names the checkpointing
    and what to do. The eager step trains as without it."""
    make = lambda wrap, i: fl.TrainState.create(  # noqa: E731
        _Checkpointed(mlp(seed=i)) if wrap else mlp(seed=i), tx=optim.sgd(0.1), device="cpu"
    )
    states, batch = [make(True, i) for i in (0, 1)], batches(1)[0]
    step = fl.make_train_step(classify)
    many = torch.func.vmap(step, in_dims=(0, None), randomness="different")
    with pytest.raises(
        RuntimeError, match=r"(?s)vmap:.*activation checkpointing.*fl\.unstack_states"
    ):
        many(fl.stack_states(states), batch)
    got, want = step(states[0], batch)[0], step(make(False, 0), batch)[0]
    for name, value in want.params.items():
        torch.testing.assert_close(got.params[f"inner.{name}"], value, rtol=0, atol=0)


def _item_step(model, batch):
    out = classify(model, batch)
    return {"loss": out["loss"], "acc": out["acc"].item()}


def _if_step(model, batch):
    loss = classify(model, batch)["loss"]
    if loss > 10:
        loss = loss / 10
    return {"loss": loss}


@pytest.mark.parametrize(
    ("fn", "line"),
    [(_item_step, 'out["acc"].item()'), (_if_step, "if loss > 10:")],
    ids=["item", "if"],
)
def test_vmap_of_a_step_function_reading_a_tensor_on_the_host_names_the_line_and_fix(fn, line):
    """An ``.item()`` or an ``if`` on a tensor in the user's own step function: the error
    points there and says how to keep the value a tensor, instead of blaming the model's
    forward pass (as with packed sequences) and telling to train the models apart."""
    states = [fl.TrainState.create(mlp(seed=i), tx=optim.sgd(0.1), device="cpu") for i in (0, 1)]
    many = torch.func.vmap(fl.make_train_step(fn), in_dims=(0, None), randomness="different")
    with pytest.raises(RuntimeError, match=re.escape(line)) as info:
        many(fl.stack_states(states), batches(1)[0])
    text = str(info.value)
    assert f"{fn.__name__} (" in text and "test_step.py" in text
    assert "torch.where" in text and "not acc.item()" in text
    assert "PackedSequence" not in text and "forward pass" not in text


def _own_error_step(model, batch):
    raise RuntimeError("labels out of range: check the data set")


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_a_step_functions_own_runtime_error_under_vmap_is_raised_as_it_is(kind):
    """Only torch's errors for operations vmap cannot batch get an explanation; any other
    RuntimeError (the user's own, here) comes out of the vmapped step unchanged."""
    states = [fl.TrainState.create(mlp(seed=i), tx=optim.sgd(0.1), device="cpu") for i in (0, 1)]
    make = fl.make_train_step if kind == "train" else fl.make_eval_step
    many = torch.func.vmap(make(_own_error_step), in_dims=(0, None), randomness="different")
    with pytest.raises(RuntimeError) as info:
        many(fl.stack_states(states), batches(1)[0])
    assert str(info.value) == "labels out of range: check the data set"


def test_a_vmapped_eval_step_that_returns_no_mapping_says_so():
    """As the eager step says (the vmapped one runs the function inside a grad level,
    which takes the tensors of a mapping out of it)."""
    states = [fl.TrainState.create(mlp(seed=i), tx=optim.sgd(0.1), device="cpu") for i in (0, 1)]
    eager = fl.make_eval_step(_logits_only_step)
    says = "_logits_only_step must return a mapping of metrics such as {'loss': loss}; got Tensor."
    with pytest.raises(ValueError, match=re.escape(says)):
        eager(states[0], batches(1)[0])
    many = torch.func.vmap(eager, in_dims=(0, None))
    with pytest.raises(ValueError, match=re.escape(says)):
        many(fl.stack_states(states), batches(1)[0])


class _Scale(nn.Module):
    """``x * w`` with a channels-last ``w``: autograd returns a contiguous gradient."""

    def __init__(self) -> None:
        super().__init__()
        w = torch.randn(2, 3, 4, 5, dtype=torch.float64)
        self.w = nn.Parameter(w.contiguous(memory_format=torch.channels_last))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w  # the output (and the gradient) take x's layout


@pytest.mark.parametrize("kernel", ["fused", "foreach"])
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donate"])
@pytest.mark.parametrize(
    ("tx_fn", "torch_fn"),
    [
        (lambda: optim.adam(1e-2), lambda ps, **k: torch.optim.Adam(ps, 1e-2, **k)),
        (
            lambda: optim.sgd(1e-2, momentum=0.9),
            lambda ps, **k: torch.optim.SGD(ps, 1e-2, momentum=0.9, **k),
        ),
    ],
    ids=["adam", "sgd-momentum"],
)
def test_a_gradient_in_another_layout_than_its_parameter(tx_fn, torch_fn, donate, kernel):
    """torch's fused kernels pair elements by memory position: a contiguous gradient of a
    channels-last weight is laid out like the weight first, as ``.grad`` is."""
    torch.manual_seed(0)
    module = _Scale()
    assert module.w.is_contiguous(memory_format=torch.channels_last)
    xs = [torch.randn(2, 3, 4, 5, dtype=torch.float64) for _ in range(3)]

    def step_fn(model, x):
        return {"loss": (model(x) ** 2).sum()}

    hand = copy.deepcopy(module)
    opt = torch_fn(hand.parameters(), **{kernel: True})
    state = fl.TrainState.create(module, tx=tx_fn(), device="cpu")
    state = state.clone() if donate else state
    step = fl.make_train_step(step_fn, donate=donate)
    for x in xs:
        opt.zero_grad()
        step_fn(hand, x)["loss"].backward()
        opt.step()
        state, _ = step(state, x)
    torch.testing.assert_close(state.params["w"], hand.w.detach(), rtol=1e-12, atol=1e-12)


def test_differentiating_a_train_step_is_a_clear_error():
    state = fl.TrainState.create(mlp(), tx=optim.adam(0.1), device="cpu")
    step = fl.make_train_step(classify)
    batch = batches(1)[0]

    def final_weight_sum(w):
        new, _ = step(state.replace(params={**state.params, "0.weight": w}), batch)
        return new.params["0.weight"].sum()

    with pytest.raises(ValueError, match="cannot be differentiated"):
        torch.func.grad(final_weight_sum)(state.params["0.weight"])


def test_unstacking_one_model_is_a_clear_error():
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    with pytest.raises(ValueError, match="takes a stacked state"):
        fl.unstack_states(state)
    assert len(fl.unstack_states(fl.stack_states([state, state]))) == 2


def test_made_steps_get_code_names_of_their_own():
    """Dynamo keeps a step's record of shapes under its code's name after the step is gone:
    a name from id() would pass a dead step's record to a new step at the same address."""
    names = {fl.make_train_step(classify).__code__.co_name for _ in range(50)}
    assert len(names) == 50


# --------------------------------------------------------------------------- what forward does


class _NormEval(nn.Module):
    """Keeps its backbone's BatchNorm in eval mode through train(), as fine-tuning code
    does (``norm_eval``)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.head = nn.Linear(4, 2)

    def train(self, mode=True):
        super().train(mode)
        self.backbone[1].eval()
        return self

    def forward(self, x):
        return self.head(self.backbone(x))


def test_a_modules_train_override_is_honoured():
    torch.manual_seed(0)
    module = _NormEval().double()  # built in training mode: its train() has not run yet
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
    ref = copy.deepcopy(module).train()
    expected = F.cross_entropy(ref(x), y)
    state = fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")
    new, metrics = fl.make_train_step(classify)(state, (x, y))
    assert torch.equal(metrics["loss"], expected.detach())
    assert int(new.buffers["backbone.1.num_batches_tracked"]) == 0


class _Counting(nn.Module):
    """Replaces one buffer in forward and writes another in place, in both modes."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("avg", torch.zeros(3))

    def forward(self, x):
        self.calls += 1
        if self.training:
            self.avg = 0.9 * self.avg + 0.1 * x.mean(0)
        return self.lin(x - self.avg)


@pytest.mark.parametrize("donate", [False, True])
def test_buffers_that_forward_replaces_advance_as_in_torch(donate):
    torch.manual_seed(0)
    module = _Counting().double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    ref = copy.deepcopy(module)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    state = fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")
    state = state.clone() if donate else state
    step = fl.make_train_step(classify, donate=donate)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
        state, _ = step(state, (x, y))
    for name, b in ref.state_dict().items():
        got = state.params.get(name, state.buffers.get(name))
        assert torch.equal(got, b), name
    assert int(module.calls) == 0 and not module.avg.any()  # the module is left alone


class _LazyCache(nn.Module):
    """Fills a buffer on first use, at the batch's size (as rotary-embedding caches do)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("cache", torch.empty(0), persistent=False)

    def forward(self, x):
        if self.cache.numel() < x.shape[0]:
            self.cache = torch.arange(x.shape[0], dtype=x.dtype)
        return self.lin(x) * self.cache[: x.shape[0], None]


@pytest.mark.parametrize(
    "options",
    [
        {"on_nonfinite": "skip"},
        {"on_nonfinite": "skip", "accumulation_steps": 2},
        {"on_nonfinite": "skip", "donate": True},
    ],
    ids=["skip", "skip-accumulation", "skip-donate"],
)
def test_a_buffer_forward_replaces_with_another_shape_under_the_skip_policy(options):
    # The skip policy chooses between old and new buffers with torch.where, which needs
    # equal shapes: a buffer of a new shape keeps forward's value (as without the policy).
    torch.manual_seed(0)
    module = _LazyCache().double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    ref = copy.deepcopy(module)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    state = fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")
    state = state.clone() if options.get("donate") else state
    step = fl.make_train_step(classify, **options)
    for _ in range(2):
        for _ in range(options.get("accumulation_steps", 1)):
            state, _ = step(state, (x, y))
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
    assert torch.equal(state.buffers["cache"], ref.cache)
    for name, p in ref.named_parameters():
        assert torch.allclose(state.params[name], p, rtol=1e-12, atol=0), name


def test_an_eval_step_leaves_the_input_state_alone():
    torch.manual_seed(0)
    module = _Counting()
    state = fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    for _ in range(2):
        fl.make_eval_step(classify)(state, (x, y))
    assert int(state.buffers["calls"]) == 0 and int(module.calls) == 0


def _one_torch_sgd_step(module, batch, lr=0.1):
    """A copy of ``module`` after one hand-written SGD step on ``classify``'s loss."""
    ref = copy.deepcopy(module)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    opt.zero_grad()
    F.cross_entropy(ref(batch[0]), batch[1]).backward()
    opt.step()
    return ref


def test_a_pure_step_leaves_weights_that_forward_writes_alone():
    """nn.Embedding(max_norm) renormalizes the rows it looks up, in place."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Embedding(6, 4, max_norm=0.5), nn.Flatten(), nn.Linear(8, 2))
    module[0].weight.data *= 4
    x, y = torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 1])
    ref = _one_torch_sgd_step(module, (x, y))
    state = fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")
    before = state.params["0.weight"].clone()
    new, _ = fl.make_train_step(classify)(state, (x, y))
    assert torch.equal(state.params["0.weight"], before)
    assert torch.equal(module[0].weight.detach(), before)
    torch.testing.assert_close(new.params["0.weight"], ref[0].weight.detach())


def test_activation_checkpointing_runs_in_eager_steps():
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = checkpoint(lambda t: torch.relu(self.a(t)), x, use_reentrant=False)
            return self.b(h)

    torch.manual_seed(0)
    module = Net().double()
    x, y = torch.randn(6, 4, dtype=torch.float64, requires_grad=True), torch.randint(0, 2, (6,))
    ref = _one_torch_sgd_step(module, (x, y))
    state = fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")
    new, _ = fl.make_train_step(classify)(state, (x, y))
    for name, p in ref.named_parameters():
        torch.testing.assert_close(new.params[name], p.detach(), rtol=0, atol=1e-15)


def test_sparse_gradients_and_gradient_hooks_are_clear_errors():
    module = nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Flatten(), nn.Linear(6, 2))
    state = fl.TrainState.create(module, tx=optim.sgd(0.1), device="cpu")
    batch = (torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"'0.weight' is torch.sparse_coo.*sparse=False"):
        fl.make_train_step(classify)(state, batch)
    hooked = nn.Linear(2, 2)
    hooked.weight.register_hook(lambda g: g * 0)
    with pytest.raises(ValueError, match=r"'weight' has a gradient hook"):
        fl.TrainState.create(hooked, tx=optim.sgd(0.1), device="cpu")


@pytest.mark.parametrize("make", [optim.sgd, optim.adam])
def test_a_learning_rate_written_in_place_is_used_by_the_next_step(make):
    state = fl.TrainState.create(mlp(), tx=make(0.1), device="cpu")
    step = fl.make_train_step(classify)
    batch = batches(1)[0]
    state, _ = step(state, batch)
    optim.learning_rates(state.opt_state)[0].fill_(0.0)
    new, _ = step(state, batch)
    for name, p in state.params.items():
        assert torch.equal(new.params[name], p), name


class _TiedFrozen(nn.Module):
    """A tied embedding and head, a frozen layer, and a buffer forward replaces."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mid = nn.Linear(4, 4)
        self.mid.weight.requires_grad_(False)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("n", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.n = self.n + 1
        return self.head(torch.relu(self.mid(self.emb(x)))).mean(1)


def _tied_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 7, (6, 3), generator=g), torch.randint(0, 7, (6,), generator=g)


def test_vmap_of_steps_with_tied_and_frozen_weights_matches_single_steps():
    torch.manual_seed(0)
    state = fl.TrainState.create(_TiedFrozen().double(), tx=optim.adamw(1e-2), device="cpu")
    batch = _tied_batch()
    single, metrics = fl.make_train_step(classify)(state, batch)
    many = torch.func.vmap(fl.make_train_step(classify), in_dims=(0, None), randomness="same")
    stacked, stacked_metrics = many(fl.stack_states([state, state]), batch)
    for got in fl.unstack_states(stacked):
        for name, p in single.params.items():
            torch.testing.assert_close(got.params[name], p, rtol=0, atol=1e-12)
        assert int(got.buffers["n"]) == 1
    torch.testing.assert_close(stacked_metrics["loss"], metrics["loss"].expand(2))
    evaluate = torch.func.vmap(fl.make_eval_step(classify), in_dims=(0, None))
    torch.testing.assert_close(
        evaluate(stacked, batch)["loss"][0], fl.make_eval_step(classify)(single, batch)["loss"]
    )


@pytest.mark.slow
def test_compiled_step_with_sgd_momentum_and_weight_decay_matches_the_hand_loop_ci_subset():
    """The classic recipe, SGD with momentum and L2 weight decay, compiled: inductor (torch
    2.13) fused the linear layers' gradient matmuls with torch.add(..., alpha=...) into
    addmm calls that drop alpha, so the step used a momentum and a weight decay of 1.0."""
    torch._dynamo.reset()
    module, data = mlp(), batches(3)
    make_opt = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01)  # noqa: E731
    ref, _, losses = hand_loop(module, data, make_opt)
    tx = optim.sgd(0.1, momentum=0.9, weight_decay=0.01)
    state = fl.TrainState.create(module, tx=tx, device="cpu")
    step = torch.compile(fl.make_train_step(classify), fullgraph=True)
    for b, loss in zip(data, losses, strict=True):
        state, metrics = step(state, b)
        torch.testing.assert_close(metrics["loss"], loss, rtol=1e-9, atol=1e-12)
    assert_state_matches(state, ref)


@pytest.mark.slow
def test_compiled_step_with_tied_and_frozen_weights_matches_eager_ci_subset():
    torch.manual_seed(0)
    state = fl.TrainState.create(_TiedFrozen().double(), tx=optim.adamw(1e-2), device="cpu")
    batch = _tied_batch()
    eager, _ = fl.make_train_step(classify)(state, batch)
    compiled, _ = torch.compile(fl.make_train_step(classify))(state, batch)
    for name, p in eager.params.items():
        torch.testing.assert_close(compiled.params[name], p, rtol=0, atol=1e-12)
    assert int(compiled.buffers["n"]) == 1


class _NormEvalReturnsNone(_NormEval):
    def train(self, mode=True):  # as mmcv-style overrides do: no return value
        super().train(mode)


def test_a_train_override_without_return_value_is_honoured():
    torch.manual_seed(0)
    state = fl.TrainState.create(_NormEvalReturnsNone(), tx=optim.sgd(0.1), device="cpu")
    new, _ = fl.make_train_step(classify)(state, (torch.randn(8, 4), torch.randint(0, 2, (8,))))
    assert int(new.buffers["backbone.1.num_batches_tracked"]) == 0


def test_frozen_parameters_are_shared_not_copied_by_pure_steps():
    """A frozen backbone is kept among the buffers and passed on as it is, every step."""
    torch.manual_seed(0)
    state = fl.TrainState.create(_TiedFrozen().double(), tx=optim.sgd(0.1), device="cpu")
    batch = _tied_batch()
    new, _ = fl.make_train_step(classify)(state, batch)
    shares = lambda a, b: a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # noqa: E731
    assert shares(new.buffers["mid.weight"], state.buffers["mid.weight"])
    many = torch.func.vmap(fl.make_train_step(classify), in_dims=(0, None), randomness="same")
    stacked = fl.stack_states([state, state])
    out, _ = many(stacked, batch)
    assert shares(out.buffers["mid.weight"], stacked.buffers["mid.weight"])


@pytest.mark.parametrize("k", [1, 2])
def test_frozen_parameters_are_shared_not_copied_under_the_skip_policy(k):
    """A step that may skip picks the buffers of a finite forward pass, not the frozen
    parameters kept among them: those pass on as they are, eager and under vmap."""
    torch.manual_seed(0)
    state = fl.TrainState.create(_TiedFrozen().double(), tx=optim.sgd(0.1), device="cpu")
    batch = _tied_batch()
    step = fl.make_train_step(classify, on_nonfinite="skip", accumulation_steps=k)
    shares = lambda a, b: a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # noqa: E731
    new, _ = step(state, batch)
    assert shares(new.buffers["mid.weight"], state.buffers["mid.weight"])
    assert int(new.buffers["n"]) == 1
    stacked = fl.stack_states([state, state])
    out, _ = torch.func.vmap(step, in_dims=(0, None), randomness="same")(stacked, batch)
    assert shares(out.buffers["mid.weight"], stacked.buffers["mid.weight"])


@pytest.mark.filterwarnings("ignore:precision='(fp16|bf16)' does not lower")
def test_raise_checks_gradients_when_the_step_has_no_loss_scale_of_its_own():
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")
    x, y = batches(1)[0]
    state, _ = fl.make_train_step(classify, precision="fp16")(state, (x, y))

    def blows_up(model, batch):
        x, y = batch
        return {"loss": F.cross_entropy(_InfGrad.apply(model(x)), y)}

    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        fl.make_train_step(blows_up, on_nonfinite="raise")(state, (x, y))


@pytest.mark.filterwarnings("ignore:precision='(fp16|bf16)' does not lower")
def test_a_step_without_fp16_leaves_the_states_loss_scale_alone():
    """A state from an fp16 run (a resumed checkpoint, say) stepped in full precision: plain
    gradients, as a torch SGD step gives, and the scale kept as it was."""
    data = batches(2)
    state, _ = fl.make_train_step(classify, precision="fp16")(
        fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu"), data[0]
    )
    assert state.loss_scale is not None and state.loss_scale.scale > 1
    module = mlp()
    module.load_state_dict(state.state_dict())
    ref, _, _ = hand_loop(module, data[1:], lambda p: torch.optim.SGD(p, 0.1))
    for precision in (None, "bf16"):
        new, _ = fl.make_train_step(classify, precision=precision)(state, data[1])
        assert_state_matches(new, ref, rtol=1e-12, atol=1e-14)
        assert torch.equal(new.loss_scale.scale, state.loss_scale.scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", ["pure", "donate", "vmap"])
def test_ema_starts_at_the_first_applied_update_after_skipped_ones(how, dtype):
    """Skipped updates are not updates: like AveragedModel updated after each applied
    optimizer step, the first applied one sets the average to the weights; then the same
    lerp, bit for bit, in every dtype, and a later skipped update leaves it alone."""
    data = batches(5, dtype=dtype)
    bad = (torch.full_like(data[0][0], float("nan")), data[0][1])
    state = fl.TrainState.create(mlp(dtype=dtype), tx=optim.sgd(0.1), ema_decay=0.9, device="cpu")
    step = fl.make_train_step(classify, on_nonfinite="skip", donate=how == "donate")
    if how == "donate":
        state = state.clone()
    if how == "vmap":
        state = fl.stack_states([state, state])
        step = torch.func.vmap(step, in_dims=(0, None), randomness="different")
    reference = None  # what AveragedModel(get_ema_multi_avg_fn(0.9)) holds
    for b in [bad, bad, data[2], data[3], bad, data[4]]:
        state, _ = step(state, b)
        one = fl.unstack_states(state)[1] if how == "vmap" else state
        if b is bad:
            continue
        params = [one.params[n].detach().clone() for n in one.params]
        if reference is None:
            reference = params
        else:
            torch._foreach_lerp_(reference, params, 1 - 0.9)
        for name, expected in zip(one.params, reference):
            assert torch.equal(one.ema[name], expected), name
    assert int(one.skipped_steps) == 3 and one.step == 6
    if dtype == torch.float64 and how != "vmap":  # and the weights are a torch loop's
        ref, _, _ = hand_loop(mlp(dtype=dtype), data[2:], lambda p: torch.optim.SGD(p, 0.1))
        assert_state_matches(one, ref, rtol=1e-12, atol=1e-14)


def test_one_step_on_several_states_copies_each_template_once(monkeypatch):
    calls = []
    real = fl.step.in_mode

    def counting(module, **kw):
        calls.append(module)
        return real(module, **kw)

    monkeypatch.setattr(fl.step, "in_mode", counting)
    step = fl.make_train_step(classify)
    states = [fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu") for _ in range(2)]
    batch = batches(1)[0]
    for _ in range(3):
        states = [step(s, batch)[0] for s in states]
    assert len(calls) == 2


def test_a_one_element_metric_of_each_stacked_model_is_averaged_as_alone():
    # A step's metric of shape (1,) is a metric for one model; vmapped it has shape (n, 1).
    def step_fn(model, batch):
        out = classify(model, batch)
        return {**out, "acc1": out["acc"].reshape(1), "count": 1}

    states = [fl.TrainState.create(mlp(seed=i), tx=optim.sgd(0.1), device="cpu") for i in (0, 1)]
    data = batches(2) + batches(1, size=3, seed=5)
    many = torch.func.vmap(fl.make_train_step(step_fn), in_dims=(0, None), randomness="different")
    _, means = fl.train_epoch(fl.stack_states(states), many, data)
    evals = torch.func.vmap(fl.make_eval_step(step_fn), in_dims=(0, None))
    _, valid = fl.validate_epoch(fl.stack_states(states), evals, data)
    for i, state in enumerate(states):
        alone = fl.train_epoch(state, fl.make_train_step(step_fn), data)[1]
        assert set(alone) == set(means) == set(valid) == {"loss", "acc", "acc1", "count"}
        assert means["acc1"][i] == pytest.approx(alone["acc1"]) == pytest.approx(means["acc"][i])
        assert means["count"] == [1.0, 1.0]
    one = fl.MetricMeans(models=1)
    one.add({"loss": torch.tensor([[2.0]]), "pred": torch.zeros(1, 4)}, 2)
    assert one.means() == {"loss": [2.0]}


def test_a_stacked_plateau_fed_each_models_validation_mean_matches_each_model_alone():
    # What docs/guide.md section 6 shows: fit is not there to feed reduce_on_plateau.
    data = batches(2)

    def make(lr):
        tx = optim.sgd(optim.reduce_on_plateau(lr, patience=0, factor=0.5))
        return fl.TrainState.create(mlp(), tx=tx, device="cpu")

    def epochs(state, train_step, eval_step):
        for _ in range(3):
            state, _ = fl.train_epoch(state, train_step, data)
            state, valid = fl.validate_epoch(state, eval_step, data)
            state = state.replace(opt_state=optim.observe_metric(state.opt_state, valid["loss"]))
        return state

    train_step, eval_step = fl.make_train_step(classify), fl.make_eval_step(classify)
    many = torch.func.vmap(train_step, in_dims=(0, None), randomness="different")
    many_evals = torch.func.vmap(eval_step, in_dims=(0, None))
    lrs = [3.0, 0.01]  # the first overshoots, and its rate is halved; the second's is kept
    stacked = epochs(fl.stack_states([make(lr) for lr in lrs]), many, many_evals)
    for lr, got in zip(lrs, fl.unstack_states(stacked)):
        want = epochs(make(lr), train_step, eval_step)
        got_lrs, want_lrs = (optim.learning_rates(s.opt_state) for s in (got, want))
        assert [float(r) for r in got_lrs] == pytest.approx([float(r) for r in want_lrs])
        torch.testing.assert_close(got.params, want.params)
    (stacked_lrs,) = optim.learning_rates(stacked.opt_state)
    assert stacked_lrs[0] < lrs[0] and stacked_lrs[1] == lrs[1]


class _DropsItsBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.register_buffer("cache", torch.zeros(1))

    def forward(self, x):
        self.cache = None  # a buffer a TrainState cannot keep
        return self.lin(x)


@pytest.mark.parametrize("kind", ["train", "eval", "vmap"])
def test_forward_setting_a_buffer_to_none_is_a_clear_error(kind):
    state = fl.TrainState.create(_DropsItsBuffer(), tx=optim.sgd(0.1), device="cpu")
    b = batches(1, dtype=torch.float32)[0]
    if kind == "train":
        call = lambda: fl.make_train_step(classify)(state, b)  # noqa: E731
    elif kind == "eval":
        call = lambda: fl.make_eval_step(classify)(state, b)  # noqa: E731
    else:
        many = torch.func.vmap(
            fl.make_train_step(classify), in_dims=(0, None), randomness="different"
        )
        call = lambda: many(fl.stack_states([state, state]), b)  # noqa: E731
    with pytest.raises(TypeError, match=r"forward set the buffer 'cache' to None.*torch\.tensor"):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("models", [None, 2])
def test_metric_means_restored_on_the_cpu_take_cuda_metrics(models):
    """A mid-epoch resume restores the sums on the CPU; the steps then add CUDA metrics,
    and a metric no later batch reports stays on the CPU."""
    shape = () if models is None else (models,)
    saved = fl.MetricMeans(models=models)
    saved.add({"loss": torch.full(shape, 2.0), "early": torch.full(shape, 1.0)}, 4)
    means = fl.MetricMeans(models=models)
    means.load_state_dict(saved.state_dict())
    means.add({"loss": torch.full(shape, 4.0, device="cuda")}, 4)
    want = {"loss": 3.0, "early": 1.0}
    if models is not None:
        want = {k: [v] * models for k, v in want.items()}
    assert means.means() == want


def test_mixed_precision_on_a_float64_model_warns_at_the_callers_line():
    """autocast leaves float64 operations alone: bf16 on a float64 model silently trained
    in float64. The warning points at the line that called the step."""
    b = batches(1)[0]
    state = fl.TrainState.create(mlp(), tx=optim.sgd(0.1), device="cpu")  # float64
    assert state.params["0.weight"].dtype == torch.float64
    for step in (
        fl.make_train_step(classify, precision="bf16"),
        fl.make_eval_step(classify, precision="bf16"),
    ):
        with pytest.warns(UserWarning, match="precision='bf16' does not lower this float64") as got:
            step(state, b)
        assert got[0].filename == __file__
    float32 = fl.TrainState.create(mlp(dtype=torch.float32), tx=optim.sgd(0.1), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fl.make_train_step(classify, precision="bf16")(float32, batches(1, dtype=torch.float32)[0])
        fl.make_train_step(classify)(state, b)


def test_steps_compiled_after_a_compile_that_raised_still_check_and_train():
    """A compile that raises leaves the step's shared frames to run eagerly under later
    compiles, with helpers compiled as frames of their own: those helpers answered
    "compiling" for the eager step, which then missed the stacked-state check (torch's
    ``t() expects a tensor with <= 2 dimensions`` instead)."""

    def no_mapping(model, batch):
        return model(batch[0])

    def broken(model, batch):  # a graph break in the user's function: the step runs
        torch._dynamo.graph_break()  # its frames eagerly, the helpers compiled
        return classify(model, batch)

    state = fl.TrainState.create(mlp(), tx=optim.adamw(0.1), device="cpu")
    stacked = fl.stack_states([state, state])
    b = batches(1)[0]
    try:
        for make in (fl.make_train_step, fl.make_eval_step):
            with pytest.raises(ValueError, match="no_mapping must return a mapping"):
                torch.compile(make(no_mapping))(state, b)
        for make, name in [(fl.make_train_step, "train_step"), (fl.make_eval_step, "eval_step")]:
            with pytest.raises(ValueError, match=rf"^{name} runs one model.*2 stacked models"):
                torch.compile(make(classify))(stacked, b)
        for fn in (classify, broken):
            new, metrics = torch.compile(fl.make_train_step(fn))(state, b)
            ref, ref_metrics = fl.make_train_step(classify)(state, b)
            torch.testing.assert_close(new.params, ref.params, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(metrics, ref_metrics, rtol=1e-9, atol=1e-12)
            got = torch.compile(fl.make_eval_step(fn))(state, b)
            torch.testing.assert_close(got, fl.make_eval_step(classify)(state, b))
    finally:
        torch._dynamo.reset()  # the frames run eagerly for this test only


def test_a_donating_step_run_eagerly_marks_the_state_it_consumed_whatever_its_helpers_see(
    monkeypatch,
):
    """After a compile of a step raised, a later compiled step whose function breaks the
    graph runs its own frame eagerly while dynamo compiles ``_update`` as a frame of its
    own (seen with torch 2.13). ``_update`` asked its own frame whether it was compiled, so
    the eager step took the compiled write-back and left the consumed state unmarked: using
    it again trained on overwritten weights. Simulated here: only ``_update``'s frame says
    it is compiling."""
    is_compiling = torch.compiler.is_compiling

    def helper_compiled() -> bool:
        return sys._getframe(1).f_code.co_name == "_update" or is_compiling()

    state = fl.TrainState.create(mlp(), tx=optim.adamw(0.1), device="cpu")
    b = batches(1)[0]
    ref, _ = fl.make_train_step(classify)(state, b)
    donated = state.clone()
    monkeypatch.setattr(torch.compiler, "is_compiling", helper_compiled)
    new, _ = fl.make_train_step(classify, donate=True)(donated, b)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="was donated to an earlier call"):
        fl.make_train_step(classify)(donated, b)
    torch.testing.assert_close(new.params, ref.params, rtol=1e-9, atol=1e-12)
