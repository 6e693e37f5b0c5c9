"""Every optimizer alias against its ``torch.optim`` twin, driven by one table.

The table ``CASES`` pairs an ``fnloop.optim`` configuration with the ``torch.optim`` class
and keyword arguments that mean the same thing. Every property below (step-for-step
agreement, purity, ``vmap``, bad input) runs over the whole table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import optree
import pytest
import torch
from torch.testing import assert_close

from fnloop import _tree as fl_tree
from fnloop import optim
from fnloop.optim import _foreach

F64 = torch.float64
STEPS = 50
RTOL, ATOL = 1e-9, 1e-12
# Several shapes, including a 0-d and a 1-d tensor.
SHAPES = {"conv.weight": (3, 2, 2, 2), "fc.weight": (5, 4), "fc.bias": (4,), "scale": ()}


@dataclasses.dataclass(frozen=True)
class Case:
    """One optimizer configuration and its ``torch.optim`` twin."""

    id: str
    make: Callable[[Any], optim.GradientTransformation]  # learning rate -> optimizer
    torch_cls: type[torch.optim.Optimizer]
    torch_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    lr: float = 1e-2


SGD, Adam, AdamW = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW
RMSprop, Adagrad = torch.optim.RMSprop, torch.optim.Adagrad

CASES = [
    Case("sgd", lambda lr: optim.sgd(lr), SGD, lr=0.1),
    Case("sgd-momentum", lambda lr: optim.sgd(lr, momentum=0.9), SGD, {"momentum": 0.9}),
    Case(
        "sgd-dampening",
        lambda lr: optim.sgd(lr, momentum=0.9, dampening=0.3),
        SGD,
        {"momentum": 0.9, "dampening": 0.3},
    ),
    Case(
        "sgd-nesterov",
        lambda lr: optim.sgd(lr, momentum=0.8, nesterov=True),
        SGD,
        {"momentum": 0.8, "nesterov": True},
    ),
    Case("sgd-wd", lambda lr: optim.sgd(lr, weight_decay=0.1), SGD, {"weight_decay": 0.1}),
    Case(
        "sgd-momentum-wd",
        lambda lr: optim.sgd(lr, momentum=0.9, weight_decay=0.05),
        SGD,
        {"momentum": 0.9, "weight_decay": 0.05},
    ),
    Case("adam", lambda lr: optim.adam(lr), Adam),
    Case(
        "adam-betas-eps",
        lambda lr: optim.adam(lr, b1=0.8, b2=0.99, eps=1e-6),
        Adam,
        {"betas": (0.8, 0.99), "eps": 1e-6},
    ),
    Case(  # beta1 = 0: no first moment; bias correction 1 stays 1
        "adam-b1-zero",
        lambda lr: optim.adam(lr, b1=0.0),
        Adam,
        {"betas": (0.0, 0.999)},
    ),
    Case("adam-wd", lambda lr: optim.adam(lr, weight_decay=0.1), Adam, {"weight_decay": 0.1}),
    Case("adam-amsgrad", lambda lr: optim.adam(lr, amsgrad=True), Adam, {"amsgrad": True}),
    Case("adamw", lambda lr: optim.adamw(lr), AdamW),  # both default to weight_decay=1e-2
    Case(
        "adamw-amsgrad",
        lambda lr: optim.adamw(lr, weight_decay=0.1, amsgrad=True),
        AdamW,
        {"weight_decay": 0.1, "amsgrad": True},
    ),
    Case("rmsprop", lambda lr: optim.rmsprop(lr), RMSprop),
    Case("rmsprop-alpha", lambda lr: optim.rmsprop(lr, alpha=0.9), RMSprop, {"alpha": 0.9}),
    Case(
        "rmsprop-momentum",
        lambda lr: optim.rmsprop(lr, momentum=0.9),
        RMSprop,
        {"momentum": 0.9},
    ),
    Case(
        "rmsprop-centered",
        lambda lr: optim.rmsprop(lr, centered=True),
        RMSprop,
        {"centered": True},
    ),
    Case(
        "rmsprop-centered-momentum",
        lambda lr: optim.rmsprop(lr, momentum=0.5, centered=True),
        RMSprop,
        {"momentum": 0.5, "centered": True},
    ),
    Case(
        "rmsprop-wd",
        lambda lr: optim.rmsprop(lr, weight_decay=0.1),
        RMSprop,
        {"weight_decay": 0.1},
    ),
    Case("adagrad", lambda lr: optim.adagrad(lr), Adagrad, lr=0.1),
    Case(
        "adagrad-lr-decay",
        lambda lr: optim.adagrad(lr, lr_decay=0.05),
        Adagrad,
        {"lr_decay": 0.05},
        lr=0.1,
    ),
    Case(
        "adagrad-initial-acc",
        lambda lr: optim.adagrad(lr, initial_accumulator_value=0.3),
        Adagrad,
        {"initial_accumulator_value": 0.3},
        lr=0.1,
    ),
    Case(
        "adagrad-wd",
        lambda lr: optim.adagrad(lr, weight_decay=0.1),
        Adagrad,
        {"weight_decay": 0.1},
        lr=0.1,
    ),
    Case("adagrad-eps", lambda lr: optim.adagrad(lr, eps=1e-3), Adagrad, {"eps": 1e-3}, lr=0.1),
]
CASE_IDS = [c.id for c in CASES]


# ----------------------------------------------------------------------------- data


def make_params(seed: int = 0, dtype: torch.dtype = F64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g, dtype=dtype) for name, shape in SHAPES.items()}


def make_grads(
    steps: int = STEPS, seed: int = 1, dtype: torch.dtype = F64
) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {name: torch.randn(shape, generator=g, dtype=dtype) for name, shape in SHAPES.items()}
        for _ in range(steps)
    ]


def fnloop_trajectory(
    tx: optim.GradientTransformation,
    params: dict[str, torch.Tensor],
    grads_seq: list[dict[str, torch.Tensor]],
) -> Iterator[dict[str, torch.Tensor]]:
    """The params after each update."""
    state = tx.init(params)
    for grads in grads_seq:
        updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        yield params


def torch_trajectory(
    make_opt: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    params: dict[str, torch.Tensor],
    grads_seq: list[dict[str, torch.Tensor]],
    make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """The params after each ``torch.optim`` step (the scheduler, if any, stepped after)."""
    ps = {name: torch.nn.Parameter(p.clone()) for name, p in params.items()}
    opt = make_opt(list(ps.values()))
    scheduler = make_scheduler(opt) if make_scheduler is not None else None
    for grads in grads_seq:
        for name, p in ps.items():
            p.grad = grads[name].clone()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        yield {name: p.detach().clone() for name, p in ps.items()}


def assert_same_trajectory(
    ours: Iterator[dict[str, torch.Tensor]], theirs: Iterator[dict[str, torch.Tensor]]
) -> None:
    n = 0
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert list(a) == list(b)
        for name in a:
            where = f"step {step}, {name}"
            assert_close(a[name], b[name], rtol=RTOL, atol=ATOL, msg=lambda m, w=where: f"{w}: {m}")
        n += 1
    assert n == STEPS


def torch_twin(case: Case, foreach: bool) -> Callable[[list], torch.optim.Optimizer]:
    return lambda ps: case.torch_cls(ps, lr=case.lr, foreach=foreach, **case.torch_kwargs)


# ----------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_torch_step_for_step(case: Case, foreach: bool) -> None:
    params, grads_seq = make_params(), make_grads()
    assert_same_trajectory(
        fnloop_trajectory(case.make(case.lr), params, grads_seq),
        torch_trajectory(torch_twin(case, foreach), params, grads_seq),
    )


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_tensor_learning_rate_matches_torch(case: Case, foreach: bool) -> None:
    # torch.optim.Adam(W) rejects a tensor lr with foreach=True: its twin takes the float.
    params, grads_seq = make_params(), make_grads()
    lr = torch.tensor(case.lr, dtype=F64)
    tx = case.make(lr)
    assert_same_trajectory(
        fnloop_trajectory(tx, params, grads_seq),
        torch_trajectory(torch_twin(case, foreach), params, grads_seq),
    )
    assert lr.item() == case.lr  # the caller's tensor is untouched


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_keeps_dtypes_and_stays_close_to_torch(case: Case) -> None:
    """Updates and moments keep each param's dtype (the 0-d one included)."""
    f32 = torch.float32
    params, grads_seq = make_params(dtype=f32), make_grads(steps=20, dtype=f32)
    tx = case.make(case.lr)
    state = tx.init(params)
    state_dtypes = [x.dtype for x in optree.tree_leaves(state, namespace="fnloop")]
    ours = params
    for grads in grads_seq:
        updates, state = tx.update(grads, state, ours)
        assert {n: u.dtype for n, u in updates.items()} == dict.fromkeys(params, f32)
        assert [x.dtype for x in optree.tree_leaves(state, namespace="fnloop")] == state_dtypes
        ours = optim.apply_updates(ours, updates)
    *_, theirs = torch_trajectory(torch_twin(case, True), params, grads_seq)
    for name in params:
        assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-5)


SCHEDULE_CASES = [
    pytest.param(
        lambda lr: optim.sgd(lr, momentum=0.9),
        lambda ps, fe: SGD(ps, lr=0.01, momentum=0.9, foreach=fe),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.99**e),
        id="sgd-momentum-LambdaLR",
    ),
    pytest.param(
        lambda lr: optim.adam(lr),
        lambda ps, fe: Adam(ps, lr=0.01, foreach=fe),
        lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.99),
        id="adam-ExponentialLR",
    ),
    pytest.param(
        lambda lr: optim.adamw(lr, weight_decay=0.1),
        lambda ps, fe: AdamW(ps, lr=0.01, weight_decay=0.1, foreach=fe),
        lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.99),
        id="adamw-ExponentialLR",
    ),
    pytest.param(
        lambda lr: optim.rmsprop(lr, momentum=0.5),
        lambda ps, fe: RMSprop(ps, lr=0.01, momentum=0.5, foreach=fe),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.99**e),
        id="rmsprop-LambdaLR",
    ),
]


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
@pytest.mark.parametrize(("make", "make_torch", "make_scheduler"), SCHEDULE_CASES)
def test_schedule_matches_torch_scheduler(make, make_torch, make_scheduler, foreach) -> None:
    params, grads_seq = make_params(), make_grads()
    tx = make(lambda t: 0.01 * 0.99**t)
    assert_same_trajectory(
        fnloop_trajectory(tx, params, grads_seq),
        torch_trajectory(lambda ps: make_torch(ps, foreach), params, grads_seq, make_scheduler),
    )


def test_learning_rates_follow_the_schedule() -> None:
    params = make_params()
    tx = optim.adam(lambda t: 0.01 * 0.5**t)
    state = tx.init(params)
    for step, grads in enumerate(make_grads(steps=4)):
        (lr,) = optim.learning_rates(state)
        assert lr.item() == pytest.approx(0.01 * 0.5**step, rel=1e-12)
        _, state = tx.update(grads, state, params)


CHANGE_AT = 20  # updates before the learning rate changes


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_with_learning_rates_matches_setting_torchs_param_groups(case: Case) -> None:
    """Going on with another rate, moments kept: ``g["lr"] = ...`` on torch's groups."""
    params, grads_seq = make_params(), make_grads()
    tx = case.make(case.lr)

    def ours() -> Iterator[dict[str, torch.Tensor]]:
        state, ps = tx.init(params), params
        for t, grads in enumerate(grads_seq):
            if t == CHANGE_AT:
                before = state
                state = optim.with_learning_rates(state, 0.3 * case.lr)
                assert [lr.item() for lr in optim.learning_rates(before)] == [case.lr]
            updates, state = tx.update(grads, state, ps)
            ps = optim.apply_updates(ps, updates)
            yield ps
        assert [lr.item() for lr in optim.learning_rates(state)] == [0.3 * case.lr]

    def theirs() -> Iterator[dict[str, torch.Tensor]]:
        ps = {name: torch.nn.Parameter(p.clone()) for name, p in params.items()}
        opt = torch_twin(case, True)(list(ps.values()))
        for t, grads in enumerate(grads_seq):
            if t == CHANGE_AT:
                for group in opt.param_groups:
                    group["lr"] = 0.3 * case.lr
            for name, p in ps.items():
                p.grad = grads[name].clone()
            opt.step()
            yield {name: p.detach().clone() for name, p in ps.items()}

    assert_same_trajectory(ours(), theirs())


def test_with_learning_rates_sets_each_partition_group_as_torch_does() -> None:
    params, grads_seq = make_params(), make_grads()
    biases = ("fc.bias", "scale")
    tx = optim.partition(
        {"decay": optim.adamw(1e-2), "no_decay": optim.adamw(1e-2, weight_decay=0.0)},
        lambda name: "no_decay" if name in biases else "decay",
    )
    state, ours = tx.init(params), params
    ps = {name: torch.nn.Parameter(p.clone()) for name, p in params.items()}
    opt = AdamW(
        [
            {"params": [p for n, p in ps.items() if n not in biases]},
            {"params": [p for n, p in ps.items() if n in biases], "weight_decay": 0.0},
        ],
        lr=1e-2,
        foreach=True,
    )
    for t, grads in enumerate(grads_seq):
        if t == CHANGE_AT:
            # learning_rates' order; any sequence (a tuple here, lists elsewhere)
            state = optim.with_learning_rates(state, (3e-3, 5e-2))
            opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = 3e-3, 5e-2
        updates, state = tx.update(grads, state, ours)
        ours = optim.apply_updates(ours, updates)
        for name, p in ps.items():
            p.grad = grads[name].clone()
        opt.step()
    for name, p in ps.items():
        assert_close(ours[name], p.detach(), rtol=RTOL, atol=ATOL)
    assert [lr.item() for lr in optim.learning_rates(state)] == [3e-3, 5e-2]


def test_with_learning_rates_under_a_plateau_is_reduced_from_the_new_rate() -> None:
    """torch's ReduceLROnPlateau reduces the rate a param group holds, set by hand or not."""
    params = make_params()
    tx = optim.sgd(optim.reduce_on_plateau(0.1, factor=0.5, patience=0))
    state = optim.with_learning_rates(tx.init(params), 0.04)
    opt = SGD([torch.nn.Parameter(p.clone()) for p in params.values()], lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    opt.param_groups[0]["lr"] = 0.04
    for metric in [1.0, 0.5, 0.7, 0.8, 0.4, 0.9]:
        state = optim.observe_metric(state, metric)
        plateau.step(metric)
        assert optim.learning_rates(state)[0].item() == pytest.approx(
            opt.param_groups[0]["lr"], rel=1e-12
        )
    assert opt.param_groups[0]["lr"] == pytest.approx(0.04 * 0.5**3)


def test_with_learning_rates_under_a_schedule_sets_the_next_update_only() -> None:
    params, grads_seq = make_params(), make_grads(steps=3)
    tx = optim.adam(lambda t: 0.01 * 0.5**t)
    state = optim.with_learning_rates(tx.init(params), 0.2)
    updates, after = tx.update(grads_seq[0], state, params)
    (expected,) = fnloop_trajectory(optim.adam(0.2), params, grads_seq[:1])
    for name, value in optim.apply_updates(params, updates).items():
        assert_close(value, expected[name], rtol=RTOL, atol=ATOL)
    assert optim.learning_rates(after)[0].item() == pytest.approx(0.01 * 0.5, rel=1e-12)


def test_with_learning_rates_of_a_stacked_state_takes_one_rate_per_model() -> None:
    params = make_params()
    stacked = stack([optim.adamw(lr).init(params) for lr in (1e-3, 2e-3, 4e-3)])
    per_model = optim.with_learning_rates(stacked, torch.tensor([1.0, 2.0, 3.0]))
    assert optim.learning_rates(per_model)[0].tolist() == [1.0, 2.0, 3.0]
    assert optim.learning_rates(per_model)[0].dtype == F64
    everyone = optim.with_learning_rates(stacked, 5e-4)
    assert optim.learning_rates(everyone)[0].tolist() == [5e-4] * 3
    assert optim.learning_rates(stacked)[0].tolist() == [1e-3, 2e-3, 4e-3]  # unchanged
    with pytest.raises(ValueError, match=r"entry per model .* shape \(3,\)\); got shape \(2,\)"):
        optim.with_learning_rates(stacked, torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize(
    ("rates", "error", "match"),
    [
        ([1e-3, 1e-3], ValueError, r"has 1 learning rates .* got 2\. Pass one rate for all"),
        (-1e-3, ValueError, r"Invalid learning_rate: .* must be >= 0"),
        (torch.ones(2), ValueError, r"a rate is a number or a 0-d tensor .* got shape \(2,\)"),
        ("1e-3", TypeError, r"takes numbers or tensors; got a str"),
        (True, TypeError, r"takes numbers or tensors; got a bool"),
    ],
    ids=["count", "negative", "shape", "str", "bool"],
)
def test_with_learning_rates_refuses_bad_rates(rates, error, match) -> None:
    state = optim.adam(1e-3).init(make_params())
    with pytest.raises(error, match=match):
        optim.with_learning_rates(state, rates)
    assert optim.learning_rates(state)[0].item() == 1e-3


def test_with_learning_rates_needs_a_learning_rate_in_the_state() -> None:
    state = optim.clip_by_global_norm(1.0).init(make_params())
    with pytest.raises(ValueError, match="holds no learning rate"):
        optim.with_learning_rates(state, 1e-3)


# ----------------------------------------------------------------------------- purity


def snapshot(tree: Any) -> list[tuple[torch.Tensor, torch.Tensor, int, int]]:
    """(leaf, clone, version counter, data pointer) for every tensor leaf."""
    return [
        (x, x.clone(), x._version, x.data_ptr())
        for x in optree.tree_leaves(tree, namespace="fnloop")
        if isinstance(x, torch.Tensor)
    ]


def assert_untouched(snap: list[tuple[torch.Tensor, torch.Tensor, int, int]], what: str) -> None:
    for i, (x, before, version, ptr) in enumerate(snap):
        assert x._version == version, f"{what} leaf {i} was written in place"
        assert x.data_ptr() == ptr, f"{what} leaf {i} had its storage swapped"
        assert torch.equal(x, before), f"{what} leaf {i} changed"


def storages(tree: Any) -> set[int]:
    return {
        x.untyped_storage().data_ptr()
        for x in optree.tree_leaves(tree, namespace="fnloop")
        if isinstance(x, torch.Tensor) and x.numel()
    }


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_init_update_apply_do_not_change_inputs(case: Case) -> None:
    tx = case.make(case.lr)
    params = make_params()
    params_snap = snapshot(params)
    state = tx.init(params)
    assert_untouched(params_snap, "params (init)")
    for grads in make_grads(steps=3):
        grads_snap, state_snap, params_snap = snapshot(grads), snapshot(state), snapshot(params)
        updates, new_state = tx.update(grads, state, params)
        updates_snap = snapshot(updates)
        new_params = optim.apply_updates(params, updates)
        assert_untouched(grads_snap, "grads")
        assert_untouched(state_snap, "opt_state")
        assert_untouched(params_snap, "params")
        assert_untouched(updates_snap, "updates (apply_updates)")
        # apply_updates returns new tensors: nothing shares memory with the old params.
        assert not storages(new_params) & storages(params)
        # The new moments are new tensors too, so a later in-place use of one state
        # cannot corrupt the other.
        changed = [
            (old, new)
            for old, new in zip(
                optree.tree_leaves(state, namespace="fnloop"),
                optree.tree_leaves(new_state, namespace="fnloop"),
                strict=True,
            )
            if not torch.equal(old, new)
        ]
        for old, new in changed:
            assert old.untyped_storage().data_ptr() != new.untyped_storage().data_ptr()
        params, state = new_params, new_state


# ----------------------------------------------------------------------------- vmap


def stack(trees: list[Any]) -> Any:
    return optree.tree_map(lambda *xs: torch.stack(xs), *trees, namespace="fnloop")


def unstack(tree: Any, i: int) -> Any:
    return optree.tree_map(lambda x: x[i], tree, namespace="fnloop")


def vmap_step(tx: optim.GradientTransformation) -> Callable[..., Any]:
    def step(grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return optim.apply_updates(params, updates), state

    return step


VMAP_STEPS = 5
N_MODELS = 3


def check_vmap_matches_separate(case: Case, lrs: list[float], dtype: torch.dtype) -> None:
    rtol, atol = (RTOL, ATOL) if dtype == F64 else (1e-6, 1e-7)
    params = [make_params(seed=10 + i, dtype=dtype) for i in range(N_MODELS)]
    grads = [make_grads(VMAP_STEPS, seed=20 + i, dtype=dtype) for i in range(N_MODELS)]
    txs = [case.make(lr) for lr in lrs]
    states = [tx.init(p) for tx, p in zip(txs, params, strict=True)]

    # One transformation for all models: each model's lr lives in its own state.
    step = torch.func.vmap(vmap_step(txs[0]))
    s_params, s_states = stack(params), stack(states)
    separate = [
        list(fnloop_trajectory(tx, p, g)) for tx, p, g in zip(txs, params, grads, strict=True)
    ]
    for t in range(VMAP_STEPS):
        s_params, s_states = step(stack([g[t] for g in grads]), s_states, s_params)
        for i in range(N_MODELS):
            for name, value in unstack(s_params, i).items():
                assert_close(value, separate[i][t][name], rtol=rtol, atol=atol)
    for i in range(N_MODELS):
        assert [lr.item() for lr in optim.learning_rates(unstack(s_states, i))] == [lrs[i]]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_vmap_matches_separate_runs(case: Case) -> None:
    check_vmap_matches_separate(case, [case.lr] * N_MODELS, F64)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_vmap_per_model_learning_rates(case: Case) -> None:
    check_vmap_matches_separate(case, [case.lr, 2 * case.lr, 0.5 * case.lr], F64)


@pytest.mark.parametrize("case", CASES[::4], ids=CASE_IDS[::4])
def test_vmap_float32(case: Case) -> None:
    check_vmap_matches_separate(case, [case.lr, 2 * case.lr, 0.5 * case.lr], torch.float32)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_vmap_learning_rate_sweep_with_shared_grads(case: Case) -> None:
    """Only the states are batched: one step of the same params for several lrs."""
    lrs = [case.lr, 2 * case.lr, 0.5 * case.lr]
    params, (grads,) = make_params(), make_grads(1)
    states = stack([case.make(lr).init(params) for lr in lrs])
    new_params, _ = torch.func.vmap(vmap_step(case.make(lrs[0])), in_dims=(None, 0, None))(
        grads, states, params
    )
    for i, lr in enumerate(lrs):
        (expected,) = fnloop_trajectory(case.make(lr), params, [grads])
        for name, value in unstack(new_params, i).items():
            assert_close(value, expected[name], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.torch_cls in (Adam, AdamW, SGD)], ids=lambda c: c.id
)
def test_apply_under_vmap_matches_torch_per_model(case: Case) -> None:
    """Under vmap, apply_ can run neither torch's fused kernels nor its foreach ops: Adam
    and AdamW take their sync-free path of 0-d tensors, which must still be torch's step
    for each model, weight decay included (only the fused and foreach paths of apply_
    were compared with torch)."""
    lrs = [case.lr, 2 * case.lr, 0.5 * case.lr]
    params = [make_params(seed=10 + i) for i in range(N_MODELS)]
    grads = [make_grads(VMAP_STEPS, seed=20 + i) for i in range(N_MODELS)]
    tx = case.make(lrs[0])
    assert tx.apply_ is not None
    step = torch.func.vmap(lambda g, s, p: tx.apply_(g, s, p))
    s_params = stack(params)
    s_states = stack([case.make(lr).init(p) for lr, p in zip(lrs, params, strict=True)])
    for t in range(VMAP_STEPS):
        s_params, s_states = step(stack([g[t] for g in grads]), s_states, s_params)
    for i, lr in enumerate(lrs):
        twin = lambda ps, lr=lr: case.torch_cls(ps, lr=lr, foreach=False, **case.torch_kwargs)  # noqa: E731
        *_, expected = torch_trajectory(twin, params[i], grads[i])
        for name, value in unstack(s_params, i).items():
            assert_close(value, expected[name], rtol=RTOL, atol=ATOL)


def test_vmap_schedule() -> None:
    tx = optim.adam(lambda t: 0.01 * 0.9**t)
    params = [make_params(seed=i) for i in range(N_MODELS)]
    grads = [make_grads(VMAP_STEPS, seed=30 + i) for i in range(N_MODELS)]
    s_params, s_states = stack(params), stack([tx.init(p) for p in params])
    step = torch.func.vmap(vmap_step(tx))
    for t in range(VMAP_STEPS):
        s_params, s_states = step(stack([g[t] for g in grads]), s_states, s_params)
    for i in range(N_MODELS):
        *_, expected = fnloop_trajectory(tx, params[i], grads[i])
        for name, value in unstack(s_params, i).items():
            assert_close(value, expected[name], rtol=RTOL, atol=ATOL)
        (lr,) = optim.learning_rates(unstack(s_states, i))
        assert lr.item() == pytest.approx(0.01 * 0.9**VMAP_STEPS, rel=1e-12)


# ----------------------------------------------------------------------------- compiled

COMPILED_CASES = [
    c for c in CASES if c.id in ("sgd-momentum", "sgd-wd", "adam-wd", "rmsprop-wd", "adagrad-wd")
]


@pytest.mark.parametrize("case", COMPILED_CASES, ids=lambda c: c.id)
def test_compiled_update_of_a_matmul_gradient_matches_torch(case: Case) -> None:
    """A compiled train step computes a linear layer's weight gradient with a matmul and
    updates it in the same graph. Inductor (torch 2.13) fuses ``torch.add(matmul, y,
    alpha=a)`` into an addmm that drops ``alpha``: L2 weight decay and SGD's momentum
    counted as 1.0 there, silently."""
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(6, 4, generator=g, dtype=F64) for _ in range(3)]
    dy = [torch.randn(6, 5, generator=g, dtype=F64) for _ in range(3)]
    params = {"w": torch.randn(5, 4, generator=g, dtype=F64)}
    tx = case.make(case.lr)

    def step(x, dy, state, params):
        grads = {"w": dy.t() @ x}  # what a linear layer's weight gradient is
        updates, state = tx.update(grads, state, params)
        return optim.apply_updates(params, updates), state

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    grads_seq = [{"w": b.t() @ a} for a, b in zip(x, dy, strict=True)]
    expected = torch_trajectory(torch_twin(case, foreach=False), params, grads_seq)
    state = tx.init(params)
    for a, b, want in zip(x, dy, expected, strict=True):
        params, state = compiled(a, b, state, params)
        assert_close(params["w"], want["w"], rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- bad input


BAD_HYPERPARAMETERS = [
    (lambda: optim.sgd(-0.1), "learning_rate", -0.1),
    (lambda: optim.sgd(0.1, momentum=-0.5), "momentum", -0.5),
    (lambda: optim.sgd(0.1, weight_decay=-1e-3), "weight_decay", -1e-3),
    (lambda: optim.adam(-1e-3), "learning_rate", -1e-3),
    (lambda: optim.adam(1e-3, b1=1.0), "b1", 1.0),
    (lambda: optim.adam(1e-3, b1=-0.1), "b1", -0.1),
    (lambda: optim.adam(1e-3, b2=1.5), "b2", 1.5),
    (lambda: optim.adam(1e-3, eps=-1e-8), "eps", -1e-8),
    (lambda: optim.adam(1e-3, weight_decay=-0.1), "weight_decay", -0.1),
    (lambda: optim.adamw(1e-3, b2=1.0), "b2", 1.0),
    (lambda: optim.adamw(1e-3, weight_decay=-0.01), "weight_decay", -0.01),
    (lambda: optim.adamw(1e-3, eps=-1.0), "eps", -1.0),
    (lambda: optim.rmsprop(-0.01), "learning_rate", -0.01),
    (lambda: optim.rmsprop(0.01, alpha=-0.9), "alpha", -0.9),
    (lambda: optim.rmsprop(0.01, eps=-1e-8), "eps", -1e-8),
    (lambda: optim.rmsprop(0.01, momentum=-0.9), "momentum", -0.9),
    (lambda: optim.rmsprop(0.01, weight_decay=-0.1), "weight_decay", -0.1),
    (lambda: optim.adagrad(-0.01), "learning_rate", -0.01),
    (lambda: optim.adagrad(0.01, lr_decay=-0.1), "lr_decay", -0.1),
    (lambda: optim.adagrad(0.01, weight_decay=-0.1), "weight_decay", -0.1),
    (
        lambda: optim.adagrad(0.01, initial_accumulator_value=-1.0),
        "initial_accumulator_value",
        -1.0,
    ),
    (lambda: optim.adagrad(0.01, eps=-1e-10), "eps", -1e-10),
    # NaN too (torch takes it, and every update would be NaN): refused when made.
    (lambda: optim.sgd(float("nan")), "learning_rate", float("nan")),
    (lambda: optim.sgd(0.1, momentum=float("nan")), "momentum", float("nan")),
    (lambda: optim.adam(1e-3, eps=float("nan")), "eps", float("nan")),
    (lambda: optim.rmsprop(0.01, weight_decay=float("nan")), "weight_decay", float("nan")),
]


@pytest.mark.parametrize(
    ("build", "name", "value"),
    BAD_HYPERPARAMETERS,
    ids=[f"{i}-{name}" for i, (_, name, _) in enumerate(BAD_HYPERPARAMETERS)],
)
def test_bad_hyperparameter_raises_naming_it(build, name, value) -> None:
    with pytest.raises(ValueError) as info:
        build()
    message = str(info.value)
    assert name in message
    assert str(value) in message


@pytest.mark.parametrize("make", [optim.sgd, optim.adam, optim.adamw, optim.rmsprop])
@pytest.mark.parametrize("value", [-1e-3, float("nan")])
def test_bad_tensor_learning_rate_raises_when_the_optimizer_is_made(make, value) -> None:
    with pytest.raises(ValueError, match="learning_rate must be >= 0"):
        make(torch.tensor(value))


@pytest.mark.parametrize(
    "port",
    [
        lambda: optim.sgd(0.1, 0.9, 0.3),  # torch: momentum 0.9, dampening 0.3
        lambda: optim.rmsprop(0.01, 0.99, 1e-8, 0.1),  # torch: weight_decay 0.1
        lambda: optim.adam(1e-3, (0.9, 0.999)),  # torch: betas
        lambda: optim.adamw(1e-3, (0.9, 0.999)),
        lambda: optim.adagrad(0.01, 0.1),  # torch: lr_decay
    ],
    ids=["sgd", "rmsprop", "adam", "adamw", "adagrad"],
)
def test_a_positional_port_of_a_torch_optimizer_is_an_error_not_another_meaning(port) -> None:
    """Past the rate, the options are keyword-only: torch's positional orders differ
    (SGD's third is dampening, RMSprop's fourth weight_decay, Adam's second the betas), so a
    call ported by position would run other settings without a word (h81)."""
    with pytest.raises(TypeError, match="positional argument"):
        port()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_nesterov_needs_momentum_and_no_dampening(momentum: float) -> None:
    with pytest.raises(ValueError, match=r"(?i)nesterov") as info:
        optim.sgd(0.1, momentum=momentum, nesterov=True, dampening=0.0 if momentum == 0 else 0.5)
    assert f"momentum={momentum}" in str(info.value)


def run_one_step(tx: optim.GradientTransformation, grads: Any, params: Any) -> None:
    updates, _ = tx.update(grads, tx.init(params), params)
    optim.apply_updates(params, updates)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_grads_missing_a_key_raise_naming_it(case: Case) -> None:
    params, (grads,) = make_params(), make_grads(1)
    del grads["fc.bias"]
    with pytest.raises(ValueError, match=r"fc\.bias"):
        run_one_step(case.make(case.lr), grads, params)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_grads_with_an_extra_key_raise_naming_it(case: Case) -> None:
    params, (grads,) = make_params(), make_grads(1)
    grads["head.weight"] = torch.zeros(2, dtype=F64)
    with pytest.raises(ValueError, match=r"head\.weight"):
        run_one_step(case.make(case.lr), grads, params)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_a_none_gradient_raises_naming_it_as_none(case: Case) -> None:
    """A ``None`` gradient (``torch.autograd.grad(..., allow_unused=True)`` for an unused
    parameter) is no leaf of the tree: the error said its key was missing from the
    gradients. It names the ``None`` and the fix, in ``update`` (or, for transforms that
    pass it through, ``apply_updates``) and in ``apply_``."""
    params, (grads,) = make_params(), make_grads(1)
    grads["fc.bias"] = None
    match = r"at 'fc\.bias' is a NoneType, not a tensor.*torch\.zeros_like\(param\)"
    with pytest.raises(TypeError, match=match):
        run_one_step(case.make(case.lr), grads, params)
    tx = case.make(case.lr)
    if tx.apply_ is not None:
        with pytest.raises(TypeError, match=match):
            tx.apply_(grads, tx.init(params), params)


def test_state_from_another_optimizer_is_rejected() -> None:
    params, (grads,) = make_params(), make_grads(1)
    with pytest.raises(ValueError, match="chain of 3 transforms got a state with 4"):
        optim.adam(1e-3).update(grads, optim.rmsprop(1e-3).init(params), params)


@pytest.mark.parametrize(
    "make", [optim.sgd, lambda lr: optim.sgd(lr, momentum=0.9), optim.adam, optim.adamw]
)
def test_fused_apply_rejects_a_state_from_another_optimizer_as_update_does(make) -> None:
    """The fused ``apply_`` of sgd/adam/adamw reads the chain's state by position: given
    rmsprop's state (4 entries) or a clipped adam's (2), it failed on an attribute or an
    index; it raises the chain's error, as ``update`` does."""
    params, (grads,) = make_params(), make_grads(1)
    tx = make(1e-3)
    for other, n in [(optim.rmsprop(1e-3), 4), (optim.chain(optim.clip(1.0), optim.adam(1e-3)), 2)]:
        with pytest.raises(ValueError, match=f"chain of 3 transforms got a state with {n}"):
            tx.apply_(grads, other.init(params), params)


def _two_groups(label_of_fc: str = "fc") -> optim.GradientTransformation:
    return optim.partition(
        {"fc": optim.adam(1e-3), "rest": optim.sgd(0.1)},
        lambda name: label_of_fc if name.startswith("fc.") else "rest",
    )


OTHER_STATES = {  # optimizer, the optimizer whose state it is given
    "sgd<-adam": (lambda: optim.sgd(0.1), lambda: optim.adam(1e-3)),
    "sgd<-clip-trace-lr": (
        lambda: optim.sgd(0.1),
        lambda: optim.chain(optim.clip(1.0), optim.trace(0.9), optim.scale_by_learning_rate(0.1)),
    ),
    "adamw<-adam": (lambda: optim.adamw(1e-3), lambda: optim.adam(1e-3)),
    "adam<-adam-amsgrad": (lambda: optim.adam(1e-3), lambda: optim.adam(1e-3, amsgrad=True)),
    "adam-amsgrad<-adam": (lambda: optim.adam(1e-3, amsgrad=True), lambda: optim.adam(1e-3)),
    "rmsprop<-rmsprop-centered": (
        lambda: optim.rmsprop(1e-3),
        lambda: optim.rmsprop(1e-3, centered=True),
    ),
    "rmsprop-momentum<-rmsprop": (
        lambda: optim.rmsprop(1e-3, momentum=0.9),
        lambda: optim.rmsprop(1e-3),
    ),
    "adagrad<-sgd-momentum": (lambda: optim.adagrad(0.1), lambda: optim.sgd(0.1, momentum=0.9)),
    "clip-adam<-clip-sgd-momentum": (
        lambda: optim.chain(optim.clip(1.0), optim.adam(1e-3)),
        lambda: optim.chain(optim.clip(1.0), optim.sgd(0.1, momentum=0.9)),
    ),
    "adam-plateau<-adam": (
        lambda: optim.adam(optim.reduce_on_plateau(1e-3)),
        lambda: optim.adam(1e-3),
    ),
    "adam<-adam-plateau": (
        lambda: optim.adam(1e-3),
        lambda: optim.adam(optim.reduce_on_plateau(1e-3)),
    ),
    "partition<-adam": (_two_groups, lambda: optim.adam(1e-3)),
    "partition<-partition-of-other-groups": (_two_groups, lambda: _two_groups("rest")),
    "clip-sgd<-partition": (
        lambda: optim.chain(optim.clip(1.0), optim.sgd(0.1)),
        _two_groups,
    ),
}


@pytest.mark.parametrize("pair", list(OTHER_STATES))
@pytest.mark.parametrize("method", ["update", "update_", "apply_"])
def test_a_state_of_the_same_length_from_another_optimizer_is_rejected(pair, method) -> None:
    """Not only the chain's length: a state made by another optimizer (or the same one
    with other options that change its state) failed deep inside on an attribute
    ("'EmptyState' object has no attribute 'mu'", "'tuple' object has no attribute
    'items'"), misnamed the trees ("updates and params must have the same structure"), or
    ran: sgd(0.1) took adam's learning rate, adam dropped amsgrad's nu_max."""
    make, make_other = OTHER_STATES[pair]
    params, (grads,) = make_params(), make_grads(1)
    state = make_other().init(params)
    with pytest.raises(ValueError, match=r"was the state made by this optimizer's init\?$"):
        getattr(make(), method)(grads, state, params)


# ----------------------------------------------------------------------------- in place


def tensor_storages(tree: Any) -> set[int]:
    return {t.data_ptr() for t in fl_tree.tree_leaves(tree) if t.dim() > 0}


def inplace_trajectory(
    tx: optim.GradientTransformation,
    params: dict[str, torch.Tensor],
    grads_seq: list[dict[str, torch.Tensor]],
) -> Iterator[dict[str, torch.Tensor]]:
    """Like fnloop_trajectory, with ``update_`` and ``apply_updates_`` (memory reused)."""
    from fnloop.optim.base import apply_updates_

    params = {name: p.clone() for name, p in params.items()}
    state = tx.init(params)
    for grads in grads_seq:
        grads = {name: g.clone() for name, g in grads.items()}
        state_ptrs = tensor_storages(state)
        param_ptrs = storages(params)
        updates, state = tx.update_(grads, state, params)
        assert storages(updates).isdisjoint(storages(state)), "updates alias the state"
        params = apply_updates_(params, updates)
        assert storages(params) == param_ptrs, "params were not updated in place"
        # Moments and buffers are written in place (0-d counters may be new tensors).
        assert tensor_storages(state) == state_ptrs, "state tensors were reallocated"
        yield {name: p.clone() for name, p in params.items()}


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_inplace_update_matches_torch_and_reuses_memory(case: Case, foreach: bool) -> None:
    tx = case.make(case.lr)
    assert tx.update_ is not None
    params, grads = make_params(), make_grads()
    ours = inplace_trajectory(tx, params, grads)
    assert_same_trajectory(ours, torch_trajectory(torch_twin(case, foreach), params, grads))


def apply_trajectory(
    tx: optim.GradientTransformation,
    params: dict[str, torch.Tensor],
    grads_seq: list[dict[str, torch.Tensor]],
) -> Iterator[dict[str, torch.Tensor]]:
    """Like fnloop_trajectory, with the fused in-place ``apply_`` (memory reused)."""
    assert tx.apply_ is not None
    params = {name: p.clone() for name, p in params.items()}
    state = tx.init(params)
    param_ptrs = storages(params)
    state_ptrs = tensor_storages(state)
    for grads in grads_seq:
        grads = {name: g.clone() for name, g in grads.items()}
        params, state = tx.apply_(grads, state, params)
        assert storages(params) == param_ptrs, "params were not updated in place"
        assert tensor_storages(state) == state_ptrs, "state tensors were reallocated"
        yield {name: p.clone() for name, p in params.items()}


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_apply_matches_torch_and_reuses_memory(case: Case, foreach: bool) -> None:
    params, grads = make_params(), make_grads()
    ours = apply_trajectory(case.make(case.lr), params, grads)
    assert_same_trajectory(ours, torch_trajectory(torch_twin(case, foreach), params, grads))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_apply_with_tensor_learning_rate_and_chained_clip_matches_torch(case: Case) -> None:
    params, grads = make_params(), make_grads()
    tx = optim.chain(optim.clip_by_global_norm(0.5), case.make(torch.tensor(case.lr, dtype=F64)))

    def reference() -> Iterator[dict[str, torch.Tensor]]:
        ps = {name: torch.nn.Parameter(p.clone()) for name, p in params.items()}
        opt = torch_twin(case, True)(list(ps.values()))
        for g in grads:
            for name, p in ps.items():
                p.grad = g[name].clone()
            torch.nn.utils.clip_grad_norm_(ps.values(), 0.5)
            opt.step()
            yield {name: p.detach().clone() for name, p in ps.items()}

    assert_same_trajectory(apply_trajectory(tx, params, grads), reference())


@pytest.mark.parametrize(("make", "make_torch", "make_scheduler"), SCHEDULE_CASES)
def test_apply_follows_the_schedule_as_torch_does(make, make_torch, make_scheduler) -> None:
    params, grads_seq = make_params(), make_grads()
    tx = make(lambda t: 0.01 * 0.99**t)
    assert_same_trajectory(
        apply_trajectory(tx, params, grads_seq),
        torch_trajectory(lambda ps: make_torch(ps, True), params, grads_seq, make_scheduler),
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_apply_and_update_keep_interchangeable_states(case: Case) -> None:
    """A state advanced by ``apply_`` continues under ``update`` and vice versa."""
    params, grads = make_params(), make_grads(steps=4)
    tx = case.make(case.lr)
    mixed = {name: p.clone() for name, p in params.items()}
    state = tx.init(mixed)
    for i, g in enumerate(grads):
        g = {name: x.clone() for name, x in g.items()}
        if i % 2:
            updates, state = tx.update(g, state, mixed)
            mixed = optim.apply_updates(mixed, updates)
        else:
            mixed, state = tx.apply_(g, state, mixed)
    *_, pure = fnloop_trajectory(tx, params, grads)
    for name in params:
        assert_close(mixed[name], pure[name], rtol=RTOL, atol=ATOL)


def test_partition_apply_runs_each_group_fused() -> None:
    """The groups interleave in the params: ``update``'s updates and ``apply_``'s params
    keep the params' order (a state_dict's), not one group after the other."""
    params, grads = make_params(), make_grads()
    labels = {name: ("a" if i % 2 else "b") for i, name in enumerate(SHAPES)}
    tx = optim.partition(
        {"a": optim.adamw(1e-2, weight_decay=0.1), "b": optim.sgd(1e-2, momentum=0.9)},
        labels.__getitem__,
    )
    *_, ours = apply_trajectory(tx, params, grads)
    *_, pure = fnloop_trajectory(tx, params, grads)
    for name in params:
        assert_close(ours[name], pure[name], rtol=RTOL, atol=ATOL)
    updates, _ = tx.update(grads[0], tx.init(params), params)
    assert list(updates) == list(ours) == list(params)


FUSED_CASES = [c for c in CASES if c.torch_cls in (Adam, AdamW, SGD)]


def flat_copy(tree: Any) -> Any:
    """Each dict of tensors copied into one buffer, as ``TrainState.clone`` lays it out."""
    from fnloop.state import _clone_group, _is_group

    return fl_tree.tree_map(_clone_group, tree, is_leaf=_is_group)


FUSED_KERNEL_CASES = [(case, kernel) for case in FUSED_CASES for kernel in ("fused", "foreach")]


@pytest.mark.parametrize("layout", ["separate", "flat"])
@pytest.mark.parametrize(
    ("case", "kernel"), FUSED_KERNEL_CASES, ids=[f"{c.id}-{k}" for c, k in FUSED_KERNEL_CASES]
)
def test_fused_apply_is_bit_identical_to_torch(
    case: Case, kernel: str, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a number learning rate, ``apply_`` gives float32 results equal to torch's: on
    the CPU, torch's fused kernels (equal to ``fused=True``); elsewhere (forced here),
    torch's foreach order with Python scalars (equal to ``foreach=True``), also after a
    resume (a count the step did not make is read once)."""
    f32 = torch.float32
    params, grads = make_params(dtype=f32), make_grads(steps=30, dtype=f32)
    twin = torch_twin(case, True)
    if kernel == "fused":
        twin = lambda ps: case.torch_cls(ps, lr=case.lr, fused=True, **case.torch_kwargs)  # noqa: E731
    else:
        monkeypatch.setattr(_foreach, "_fusable", lambda *lists: False)
    theirs = list(torch_trajectory(twin, params, grads))
    tx = case.make(case.lr)
    ours = {name: p.clone() for name, p in params.items()}
    state = tx.init(ours)
    joined = []
    flat_lists = _foreach._flat_lists

    def spy(*lists: Any) -> Any:
        out = flat_lists(*lists)
        joined.append(out is not None)
        return out

    monkeypatch.setattr(_foreach, "_flat_lists", spy)
    if layout == "flat":
        ours, state = flat_copy(ours), flat_copy(state)
    for step, g in enumerate(grads):
        if step == 10:  # a "resumed" state: same values, tensors apply_ has not seen
            state = (
                fl_tree.tree_map(torch.clone, state) if layout == "separate" else flat_copy(state)
            )
        ours, state = tx.apply_({n: x.clone() for n, x in g.items()}, state, ours)
        for name in params:
            assert torch.equal(ours[name], theirs[step][name]), f"step {step}, {name}"
    if kernel == "foreach":  # one tensor per group, or foreach over the tensors
        assert joined == [layout == "flat"] * len(grads)
    else:
        assert joined == []


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: c.id)
def test_foreach_apply_of_a_flat_group_with_a_channels_last_weight_matches_torch(
    case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``TrainState.clone`` keeps a channels-last weight channels-last inside its group's
    buffer: the group lies back to back, but that tensor's elements are not in its
    gradient's order, so the foreach path (forced here, as on other devices) must not
    update the group as one tensor."""
    monkeypatch.setattr(_foreach, "_fusable", lambda *lists: False)
    params = {
        name: p.contiguous(memory_format=torch.channels_last) if p.dim() == 4 else p
        for name, p in make_params().items()
    }
    grads = make_grads(steps=5)
    theirs = list(torch_trajectory(torch_twin(case, True), params, grads))
    tx = case.make(case.lr)
    ours = flat_copy(params)
    assert not ours["conv.weight"].is_contiguous()
    state = flat_copy(tx.init(ours))
    for step, g in enumerate(grads):
        ours, state = tx.apply_({n: x.clone() for n, x in g.items()}, state, ours)
        for name in params:
            assert_close(ours[name], theirs[step][name], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "case", [c for c in FUSED_CASES if c.torch_cls is not SGD], ids=lambda c: c.id
)
def test_foreach_apply_with_a_rate_tensor_matches_torch(
    case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where torch's fused kernels cannot run (other devices, mixed dtypes; forced here),
    Adam(W)'s apply_ with a learning-rate tensor (a schedule's, a plateau's) folds
    -lr / bc1 into the denominator on the device: still torch's step (the foreach path
    was compared with torch for number rates only)."""
    monkeypatch.setattr(_foreach, "_fusable", lambda *lists: False)
    params, grads = make_params(), make_grads()
    tx = case.make(torch.tensor(case.lr, dtype=F64))
    assert_same_trajectory(
        apply_trajectory(tx, params, grads),
        torch_trajectory(torch_twin(case, True), params, grads),
    )


@pytest.mark.parametrize(
    ("rate", "distinct"),
    [
        pytest.param(lambda: optim.cosine_schedule(0.05, 30), 12, id="schedule"),
        pytest.param(lambda: optim.reduce_on_plateau(0.05), 1, id="plateau"),
        pytest.param(lambda: torch.tensor(0.05, dtype=F64), 1, id="tensor"),
    ],
)
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_with_a_rate_tensor_runs_the_fused_kernel(rate, distinct, nesterov, monkeypatch):
    """A schedule's, a plateau's or a tensor learning rate stays a tensor, which torch's
    fused SGD kernel takes as it is: float32 results equal ``SGD(fused=True)`` with that
    rate set before each step, bit for bit, in one fused launch per step."""
    f32 = torch.float32
    params, grads = make_params(dtype=f32), make_grads(steps=12, dtype=f32)
    kw = dict(momentum=0.9, nesterov=nesterov, weight_decay=1e-2)
    tx = optim.sgd(rate(), **kw)
    ours = {name: p.clone() for name, p in params.items()}
    state = tx.init(ours)
    ref = {name: torch.nn.Parameter(p.clone()) for name, p in params.items()}
    opt = SGD(list(ref.values()), lr=0.0, fused=True, **kw)
    launches, rates = [], []
    fused_sgd = torch._fused_sgd_

    def spy(*args: Any, **kwargs: Any) -> None:
        launches.append(type(kwargs["lr"]))
        fused_sgd(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_sgd_", spy)
    for step, g in enumerate(grads):
        rates.append(float(optim.learning_rates(state)[0]))
        opt.param_groups[0]["lr"] = rates[-1]
        for name, p in ref.items():
            p.grad = g[name].clone()
        opt.step()
        ours, state = tx.apply_({n: x.clone() for n, x in g.items()}, state, ours)
        for name in params:
            assert torch.equal(ours[name], ref[name].detach()), f"step {step}, {name}"
    assert launches == [float, torch.Tensor] * len(grads)  # torch's, then ours
    assert len(set(rates)) == distinct  # a schedule's rate changes every step


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: c.id)
def test_fused_apply_matches_torch_fused_in_other_dtypes(case: Case, dtype: torch.dtype) -> None:
    """On the CPU, sgd/adam/adamw ``apply_`` is torch's fused kernel in every float dtype,
    but sgd's in float16 and bfloat16 (see the next test): torch's foreach order there."""
    params, grads = make_params(dtype=dtype), make_grads(steps=10, dtype=dtype)
    fused = case.torch_cls is not SGD or dtype == torch.float64
    twin = lambda ps: case.torch_cls(  # noqa: E731
        ps, lr=case.lr, **{"fused" if fused else "foreach": True}, **case.torch_kwargs
    )
    ours = apply_trajectory(case.make(case.lr), params, grads)
    for step, (a, b) in enumerate(zip(ours, torch_trajectory(twin, params, grads), strict=True)):
        for name in params:
            assert a[name].dtype == dtype
            assert torch.equal(a[name], b[name]), f"step {step}, {name}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_apply_moves_every_element_of_a_half_precision_cpu_param(momentum, dtype) -> None:
    """torch 2.13's fused CPU SGD kernel leaves every full SIMD block of a float16 or
    bfloat16 tensor unchanged (pytorch/pytorch#191763): ``apply_`` must not use it, or a
    bf16 model trained on the CPU keeps most of its weights."""
    params = {"w": torch.zeros(40, dtype=dtype)}
    grads = [{"w": torch.linspace(-1.0, 1.0, 40, dtype=dtype) + 1.5} for _ in range(3)]
    twin = lambda ps: SGD(ps, lr=0.5, momentum=momentum, foreach=True)  # noqa: E731
    for ours, theirs in zip(
        apply_trajectory(optim.sgd(0.5, momentum=momentum), params, grads),
        torch_trajectory(twin, params, grads),
        strict=True,
    ):
        assert bool((ours["w"] != 0).all())
        assert torch.equal(ours["w"], theirs["w"])


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: c.id)
def test_apply_under_inference_mode_is_the_update(case: Case) -> None:
    """Tensors made under ``torch.inference_mode`` have no version counter; ``apply_``
    (which remembers counts and rates it read by version) steps them as ``update`` does,
    as ``torch.optim`` steps them there, instead of failing on the first step."""
    with torch.inference_mode():
        params, grads = make_params(), make_grads()
        assert_same_trajectory(
            apply_trajectory(case.make(case.lr), params, grads),
            fnloop_trajectory(case.make(case.lr), params, grads),
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize(
    "make",
    [optim.sgd, lambda lr: optim.sgd(lr, momentum=0.9), optim.adam, optim.adamw, optim.rmsprop],
    ids=["sgd", "sgd-momentum", "adam", "adamw", "rmsprop"],
)
def test_apply_writes_into_params_that_require_grad_as_torch_step_does(make, dtype) -> None:
    # A loop over a module's own parameters, as torch.optim's step takes them: fused
    # kernels (float32) and foreach paths (float16 on the CPU) alike write under no_grad.
    tx = make(0.1)
    grads = {"w": torch.linspace(-1, 1, 4, dtype=dtype)}  # (no 0: rmsprop float16 gives 0/0)
    plain = {"w": torch.ones(4, dtype=dtype)}
    own = {"w": torch.nn.Parameter(torch.ones(4, dtype=dtype))}
    for params in (plain, own):
        state = tx.init(params)
        for _ in range(2):
            params, state = tx.apply_({"w": grads["w"].clone()}, state, params)
    assert own["w"].requires_grad and own["w"].grad_fn is None
    assert torch.equal(own["w"].detach(), plain["w"])
    assert not torch.equal(plain["w"], torch.ones(4, dtype=dtype))


def test_adagrad_apply_writes_into_params_that_require_grad_as_torch_step_does() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    ref = torch.nn.Parameter(torch.ones(3))
    ref.grad = torch.ones(3)
    Adagrad([ref], lr=0.1, foreach=True).step()
    tx = optim.adagrad(0.1)
    tx.apply_({"w": torch.ones(3)}, tx.init({"w": p}), {"w": p})
    assert torch.equal(p.detach(), ref.detach())


@pytest.mark.xfail(
    strict=True,
    reason=(
        "h90: a sparse gradient (nn.Embedding(sparse=True)) fails inside torch ('Could not "
        "run aten::lerp.Scalar with arguments from the SparseCPU backend', 'add(sparse, "
        "dense) is not supported') without naming the parameter; torch.optim's Adam and "
        "RMSprop refuse it by name, its SGD and Adagrad (no weight decay) take it. A check "
        "of every gradient's layout costs per step; taking them is a feature."
    ),
)
@pytest.mark.parametrize(
    "make",
    [optim.adam, optim.rmsprop, optim.adagrad, lambda lr: optim.sgd(lr, momentum=0.9)],
    ids=["adam", "rmsprop", "adagrad", "sgd-momentum"],
)
@pytest.mark.parametrize("method", ["update", "apply_"])
def test_a_sparse_gradient_is_a_clear_error_naming_it(make, method) -> None:
    tx = make(0.1)
    params = {"emb.weight": torch.ones(4, 2)}
    grad = torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 2), (4, 2), check_invariants=True)
    with pytest.raises(ValueError, match=r"'emb\.weight'.*sparse.*to_dense\(\)"):
        getattr(tx, method)({"emb.weight": grad}, tx.init(params), params)


@pytest.mark.parametrize("make", [optim.sgd, optim.adam, optim.adamw, optim.rmsprop])
def test_a_torch_lr_scheduler_as_learning_rate_is_a_clear_error(make) -> None:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    with pytest.raises(TypeError, match=r"got StepLR.*StepLR -> step_schedule"):
        make(sched)
    with pytest.raises(TypeError, match="got str"):
        make("1e-3")
    with pytest.raises(TypeError, match="got bool"):  # not a rate of 1.0
        make(True)


def test_fused_kernels_run_on_one_cpu_or_cuda_device_and_dtype() -> None:
    """torch's fused kernels take one device's tensors of one floating dtype; anything else
    (mixed dtypes or devices, integer tensors, other devices) runs the foreach order."""
    cpu = [torch.zeros(3), torch.zeros(2, 2)]
    assert _foreach._fusable(cpu)
    assert not _foreach._fusable([])
    assert not _foreach._fusable([torch.zeros(3), torch.zeros(2, dtype=torch.float64)])
    assert not _foreach._fusable([torch.zeros(3, dtype=torch.int64)])
    assert not _foreach._fusable([torch.zeros(3, device="meta")])
    assert not _foreach._fusable([torch.zeros(3), torch.zeros(3, device="meta")])
    # The kernels pair elements by memory position: other lists must share the layout.
    cl = torch.zeros(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert _foreach._fusable([cl], [torch.empty_like(cl)], None)
    assert not _foreach._fusable([cl], [torch.zeros(2, 3, 4, 5)])
    # They walk numel() slots from each tensor's start: a view with gaps is not theirs.
    assert _foreach._fusable([torch.zeros(4, 3).t()], [torch.zeros(4, 3).t()])
    assert not _foreach._fusable([torch.zeros(3, 4)[:, :2]], [torch.zeros(3, 4)[:, :2]])
    assert not _foreach._fusable([torch.zeros(3).expand(2, 3)])


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: c.id)
def test_apply_to_params_that_are_column_slices_updates_them_alone(case: Case) -> None:
    """A param (and its gradient and buffers) may be a view with gaps, such as a column
    slice of a bigger tensor: ``apply_`` gives the pure update's values and writes nothing
    outside the views (torch's fused kernels, given such views, update the first
    ``numel()`` slots from each view's start instead)."""

    def view(x: torch.Tensor) -> torch.Tensor:
        whole = torch.full((x.shape[0], 5), 7.0, dtype=x.dtype)
        whole[:, :2] = x
        return whole[:, :2]

    params = {"w": torch.linspace(-1.0, 1.0, 24, dtype=F64).reshape(12, 2)}
    grads = {"w": torch.linspace(0.5, 2.0, 24, dtype=F64).reshape(12, 2)}
    tx = case.make(case.lr)
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    expected = optim.apply_updates(params, updates)
    views = fl_tree.tree_map(lambda x: view(x) if x.dim() == 2 else x.clone(), state)
    ours, _ = tx.apply_({"w": view(grads["w"])}, views, {"w": view(params["w"])})
    assert_close(ours["w"], expected["w"], rtol=RTOL, atol=ATOL)
    assert bool((ours["w"]._base[:, 2:] == 7.0).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: c.id)
def test_fused_apply_on_cuda_matches_torch_fused(case: Case) -> None:
    """On CUDA too (float32 step counts for the kernel): bit for bit ``fused=True``."""
    cuda = lambda tree: {n: x.cuda() for n, x in tree.items()}  # noqa: E731
    params = cuda(make_params(dtype=torch.float32))
    grads = [cuda(g) for g in make_grads(steps=10, dtype=torch.float32)]
    twin = lambda ps: case.torch_cls(ps, lr=case.lr, fused=True, **case.torch_kwargs)  # noqa: E731
    ours = apply_trajectory(case.make(case.lr), params, grads)
    for step, (a, b) in enumerate(zip(ours, torch_trajectory(twin, params, grads), strict=True)):
        for name in params:
            assert torch.equal(a[name], b[name]), f"step {step}, {name}"


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (optim.adam, r"scale_by_adam \(adam, adamw\)"),
        (optim.adamw, r"scale_by_adam \(adam, adamw\)"),
        (optim.rmsprop, "RMSprop"),
        (optim.adagrad, "Adagrad"),
    ],
)
def test_complex_parameters_are_refused_where_moments_would_square_them(make, named) -> None:
    """The message names what refused them, which adamw reaches through scale_by_adam."""
    params = {"w": torch.ones(3, dtype=torch.complex128)}
    with pytest.raises(
        ValueError, match=rf"^{named} does not take complex parameters.*view_as_real"
    ):
        make(1e-2).init(params)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_integer_and_bool_parameters_are_refused_at_init_naming_them(case: Case, dtype) -> None:
    """They have no gradients (torch.optim never updates them; fused=True refuses them);
    given zeros as their gradients, every update failed inside torch ("For integral input
    tensors, argument alpha must not be a floating point number", "lerp_kernel_scalar not
    implemented for 'Long'"). A dict(model.state_dict()) holds such buffers."""
    params = {**make_params(), "bn.num_batches_tracked": torch.zeros((), dtype=dtype)}
    match = rf"^the parameter 'bn\.num_batches_tracked' is a {dtype} tensor.*TrainState\.buffers"
    with pytest.raises(ValueError, match=match):
        case.make(case.lr).init(params)


def test_sgd_on_complex_parameters_matches_torch() -> None:
    p = torch.tensor([1.0 + 2.0j, -0.5j], dtype=torch.complex128)
    g = torch.tensor([0.3 - 0.1j, 0.2 + 0.4j], dtype=torch.complex128)
    ref = p.clone().requires_grad_()
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    tx = optim.sgd(0.1, momentum=0.9)
    params, state = {"w": p}, tx.init({"w": p})
    for _ in range(3):
        ref.grad = g.clone()
        opt.step()
        updates, state = tx.update({"w": g}, state, params)
        params = optim.apply_updates(params, updates)
    assert_close(params["w"], ref.detach(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("lr", [np.float32(0.25), np.float64(0.25), torch.tensor([0.25])])
def test_numpy_scalars_and_one_element_tensors_are_learning_rates(lr) -> None:
    params, grads = make_params(), make_params(seed=1)
    expected, _ = optim.adam(0.25).update(grads, optim.adam(0.25).init(params), params)
    tx = optim.adam(lr)
    updates, _ = tx.update(grads, tx.init(params), params)
    for name in params:
        assert_close(updates[name], expected[name], rtol=1e-7, atol=0)


def test_a_learning_rate_tensor_of_several_numbers_is_refused() -> None:
    with pytest.raises(ValueError, match=r"holds one number; got shape \(2,\)"):
        optim.adam(torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize(("momentum", "dampening"), [(0.9, 0.5), (0.0, 0.0)])
def test_trace_refuses_nesterov_with_dampening_or_without_momentum(
    momentum: float, dampening: float
) -> None:
    """As torch.optim.SGD: Nesterov needs a momentum and no dampening (trace itself too,
    not only sgd, which checks before it builds the chain)."""
    with pytest.raises(ValueError, match=r"(?i)nesterov"):
        optim.trace(momentum, dampening=dampening, nesterov=True)
