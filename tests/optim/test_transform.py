"""Building blocks: clipping against ``torch.nn.utils``, ``partition`` against torch param
groups, ``chain`` and ``apply_updates``."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import optree
import pytest
import torch
from torch.testing import assert_close

from fnloop import optim
from fnloop.optim.base import apply_updates_

F64 = torch.float64
SHAPES = {"conv.weight": (3, 2, 2, 2), "fc.weight": (5, 4), "fc.bias": (4,), "scale": ()}


def make_tree(seed: int, dtype: torch.dtype = F64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g, dtype=dtype) for name, shape in SHAPES.items()}


def global_norm(tree: dict[str, torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.stack([t.norm() for t in tree.values()])).item()


def torch_clipped(grads: dict[str, torch.Tensor], clip_fn: Any) -> dict[str, torch.Tensor]:
    """``grads`` after ``clip_fn(list_of_parameters)`` clipped them in place."""
    ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads.values()]
    for p, g in zip(ps, grads.values(), strict=True):
        p.grad = g.clone()
    clip_fn(ps)
    return {name: p.grad for name, p in zip(grads, ps, strict=True)}


# ----------------------------------------------------------------------------- clipping

# The global norm as a multiple of max_norm: below, at and above the limit.
NORM_RATIOS = [0.0, 0.1, 0.5, 0.999, 1.0, 1.001, 2.0, 10.0, 1e4]


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("ratio", NORM_RATIOS)
def test_clip_by_global_norm_matches_clip_grad_norm_(ratio, dtype, foreach) -> None:
    max_norm = 1.5
    raw = make_tree(0, dtype)
    grads = {n: g * (ratio * max_norm / global_norm(raw)) for n, g in raw.items()}
    tx = optim.clip_by_global_norm(max_norm)
    ours, _ = tx.update(grads, tx.init(grads))
    theirs = torch_clipped(
        grads, lambda ps: torch.nn.utils.clip_grad_norm_(ps, max_norm, foreach=foreach)
    )
    rtol, atol = (1e-12, 1e-15) if dtype == F64 else (1e-6, 1e-8)
    for name in grads:
        assert ours[name].dtype == dtype
        assert_close(ours[name], theirs[name], rtol=rtol, atol=atol)
    assert global_norm(ours) <= max_norm * (1 + 1e-6)
    if ratio < 1:
        for name in grads:  # below the limit the factor is 1 (clamped), up to the 1e-6 guard
            assert_close(ours[name], grads[name], rtol=1e-5, atol=0)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
@pytest.mark.parametrize("max_value", [0.0, 0.05, 0.5, 1.0, 10.0])
def test_clip_matches_clip_grad_value_(max_value, foreach) -> None:
    grads = {n: 2 * g for n, g in make_tree(1).items()}
    ours, _ = optim.clip(max_value).update(grads, ())
    theirs = torch_clipped(
        grads, lambda ps: torch.nn.utils.clip_grad_value_(ps, max_value, foreach=foreach)
    )
    for name in grads:
        assert torch.equal(ours[name], theirs[name])
        assert ours[name].abs().max() <= max_value


@pytest.mark.parametrize("max_value", [0.0, 0.05, 0.5, 10.0])
def test_clip_in_place_matches_clip_grad_value_(max_value) -> None:
    """The in-place update_ (what a fused apply_ of a chain runs) clamps both sides too."""
    grads = {n: 2 * g for n, g in make_tree(1).items()}
    theirs = torch_clipped(
        grads, lambda ps: torch.nn.utils.clip_grad_value_(ps, max_value, foreach=True)
    )
    tx = optim.clip(max_value)
    ours, _ = tx.update_({n: g.clone() for n, g in grads.items()}, tx.init(grads), None)
    for name in grads:
        assert torch.equal(ours[name], theirs[name])


@pytest.mark.parametrize("tx", [optim.clip_by_global_norm(1.0), optim.clip(0.5)])
def test_clipping_does_not_change_its_input(tx) -> None:
    grads = {n: 5 * g for n, g in make_tree(2).items()}
    before = {n: g.clone() for n, g in grads.items()}
    versions = {n: g._version for n, g in grads.items()}
    tx.update(grads, tx.init(grads))
    for name, g in grads.items():
        assert torch.equal(g, before[name])
        assert g._version == versions[name]


def test_negative_clipping_limits_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"max_norm: -1\.0"):
        optim.clip_by_global_norm(-1.0)
    with pytest.raises(ValueError, match=r"max_value: -0\.5"):
        optim.clip(-0.5)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
def test_clip_then_adam_matches_torch_for_50_steps(foreach) -> None:
    max_norm = 1.0
    tx = optim.chain(optim.clip_by_global_norm(max_norm), optim.adam(1e-2))
    params = make_tree(3)
    state = tx.init(params)
    ps = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    opt = torch.optim.Adam(list(ps.values()), lr=1e-2, foreach=foreach)
    g = torch.Generator().manual_seed(4)
    for step in range(50):
        scale = 0.2 if step % 2 else 5.0  # alternately below and above the limit
        grads = {n: scale * torch.randn(s, generator=g, dtype=F64) for n, s in SHAPES.items()}
        updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        for n, p in ps.items():
            p.grad = grads[n].clone()
        torch.nn.utils.clip_grad_norm_(list(ps.values()), max_norm, foreach=foreach)
        opt.step()
        for n in params:
            assert_close(params[n], ps[n].detach(), rtol=1e-9, atol=1e-12)


def test_clip_by_global_norm_under_vmap_is_per_model() -> None:
    """Each model's gradients are clipped by their own norm, not the batch's."""
    tx = optim.clip_by_global_norm(1.0)
    trees = [{n: s * g for n, g in make_tree(i).items()} for i, s in enumerate([0.01, 1.0, 100.0])]
    stacked = optree.tree_map(lambda *xs: torch.stack(xs), *trees, namespace="fnloop")
    batched, _ = torch.func.vmap(lambda u: tx.update(u, ()))(stacked)
    for i, tree in enumerate(trees):
        expected, _ = tx.update(tree, ())
        for name in tree:
            assert_close(batched[name][i], expected[name], rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- partition


def label(name: str) -> str:
    return "decay" if name.endswith("weight") else "no_decay"


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
@pytest.mark.parametrize(
    ("make_fn", "make_torch"),
    [
        pytest.param(
            lambda lr, wd: optim.sgd(lr, momentum=0.9, weight_decay=wd),
            lambda groups, fe: torch.optim.SGD(groups, lr=0.5, momentum=0.9, foreach=fe),
            id="sgd",
        ),
        pytest.param(
            lambda lr, wd: optim.adamw(lr, weight_decay=wd),
            lambda groups, fe: torch.optim.AdamW(groups, lr=0.5, foreach=fe),
            id="adamw",
        ),
    ],
)
def test_partition_matches_torch_param_groups(make_fn, make_torch, foreach) -> None:
    lrs = {"decay": 0.1, "no_decay": 0.01}
    wds = {"decay": 0.05, "no_decay": 0.0}
    tx = optim.partition({k: make_fn(lrs[k], wds[k]) for k in lrs}, label)
    params = make_tree(5)
    state = tx.init(params)
    assert [lr.item() for lr in optim.learning_rates(state)] == [0.1, 0.01]

    ps = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    groups = [
        {
            "params": [p for n, p in ps.items() if label(n) == k],
            "lr": lrs[k],
            "weight_decay": wds[k],
        }
        for k in lrs
    ]
    opt = make_torch(groups, foreach)
    g = torch.Generator().manual_seed(6)
    for _ in range(50):
        grads = {n: torch.randn(s, generator=g, dtype=F64) for n, s in SHAPES.items()}
        updates, state = tx.update(grads, state, params)
        assert list(updates) == list(params)  # the params' order, not grouped by label
        params = optim.apply_updates(params, updates)
        for n, p in ps.items():
            p.grad = grads[n].clone()
        opt.step()
        for n in params:
            assert_close(params[n], ps[n].detach(), rtol=1e-9, atol=1e-12)
    assert [lr.item() for lr in optim.learning_rates(state)] == [
        group["lr"] for group in opt.param_groups
    ]


@pytest.mark.parametrize("method", ["update", "apply_"])
def test_a_label_no_parameter_has_is_left_out_and_the_rest_trains_as_torch(method) -> None:
    """A group no parameter falls in (a no_decay group for a model without biases) gets
    no state, and the others train as torch's param groups without it."""
    tx = optim.partition(
        {
            "decay": optim.adamw(0.1, weight_decay=0.05),
            "no_decay": optim.adamw(0.1, weight_decay=0.0),
        },
        lambda name: "decay",
    )
    params = make_tree(5)
    state = tx.init(params)
    ps = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    opt = torch.optim.AdamW(list(ps.values()), lr=0.1, weight_decay=0.05, foreach=True)
    for seed in range(10):
        grads = make_tree(20 + seed)
        if method == "update":
            updates, state = tx.update(grads, state, params)
            params = optim.apply_updates(params, updates)
        else:
            assert tx.apply_ is not None
            params, state = tx.apply_(dict(grads), state, dict(params))
        for n, p in ps.items():
            p.grad = grads[n].clone()
        opt.step()
        for n in params:
            assert_close(params[n], ps[n].detach(), rtol=1e-9, atol=1e-12)
    assert [lr.item() for lr in optim.learning_rates(state)] == [0.1]


def test_learning_rates_lists_groups_in_the_order_partition_was_given() -> None:
    tx = optim.partition(
        {"head": optim.sgd(0.1), "body": optim.adam(0.01), "bias": optim.sgd(0.5)},
        lambda name: name.split(".")[0],
    )
    params = {"body.w": torch.zeros(2), "bias.b": torch.zeros(1), "head.w": torch.zeros(3)}
    state = tx.init(params)
    assert [lr.item() for lr in optim.learning_rates(state)] == [0.1, 0.01, 0.5]
    # Everywhere else optree still sorts dict keys (the ordering is not left switched on).
    assert optree.tree_leaves({"z": 1, "a": 2}, namespace="fnloop") == [2, 1]


@pytest.mark.parametrize("method", ["update", "apply_"])
def test_partition_compiles_without_a_graph_break(method) -> None:
    """A compiled train step is one graph (guide, section 6); with a partition it was
    three: copy.copy of its dict of updates or params is not traceable."""
    tx = optim.partition(
        {"decay": optim.sgd(0.1, weight_decay=0.1), "no_decay": optim.sgd(0.1)},
        lambda name: "no_decay" if name.endswith("bias") else "decay",
    )
    params = {"fc.weight": torch.ones(2, 2), "fc.bias": torch.zeros(2)}
    grads = {name: torch.ones_like(p) for name, p in params.items()}
    fn = torch.compile(getattr(tx, method), backend="eager", fullgraph=True)
    out, _ = fn(grads, tx.init(params), {name: p.clone() for name, p in params.items()})
    assert type(out) is dict and list(out) == list(params)


def test_partition_with_an_unknown_label_names_it() -> None:
    tx = optim.partition({"a": optim.sgd(0.1)}, lambda name: "b")
    with pytest.raises(ValueError, match=r"labels\('conv\.weight'\) returned 'b'.*\['a'\]"):
        tx.init(make_tree(0))


@pytest.mark.parametrize("bad", [optim.adamw, 0.1], ids=["uncalled-factory", "number"])
def test_partition_rejects_non_transforms_by_label(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"transform 'head' is a (function|float), not a Grad"):
        optim.partition({"body": optim.sgd(0.1), "head": bad}, label)


def test_partition_under_vmap_with_per_model_learning_rates() -> None:
    def make(scale: float) -> optim.GradientTransformation:
        return optim.partition(
            {"decay": optim.adam(0.1 * scale), "no_decay": optim.sgd(0.01 * scale)}, label
        )

    scales = [1.0, 2.0, 0.5]
    params = [make_tree(10 + i) for i in range(3)]
    grads = [make_tree(20 + i) for i in range(3)]
    states = [make(s).init(p) for s, p in zip(scales, params, strict=True)]

    def stack(trees: list[Any]) -> Any:
        return optree.tree_map(lambda *xs: torch.stack(xs), *trees, namespace="fnloop")

    def step(g: Any, s: Any, p: Any) -> Any:
        u, s = make(1.0).update(g, s, p)
        return optim.apply_updates(p, u), s

    new_params, new_states = torch.func.vmap(step)(stack(grads), stack(states), stack(params))
    for i, scale in enumerate(scales):
        u, _ = make(scale).update(grads[i], states[i], params[i])
        expected = optim.apply_updates(params[i], u)
        for name in params[i]:
            assert_close(new_params[name][i], expected[name], rtol=1e-9, atol=1e-12)
        lrs = optim.learning_rates(optree.tree_map(lambda x: x[i], new_states, namespace="fnloop"))  # noqa: B023
        assert [lr.item() for lr in lrs] == [0.1 * scale, 0.01 * scale]


# ----------------------------------------------------------------------------- chain & apply


def test_chain_rejects_non_transforms_by_position() -> None:
    with pytest.raises(TypeError, match=r"argument 1 is a SGD"):
        optim.chain(optim.clip(1.0), torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))


def test_a_transform_without_an_in_place_form_leaves_chain_and_partition_without_one() -> None:
    """``chain`` and ``partition`` have ``update_`` and ``apply_`` only when every member
    does: with a transform of one's own (``init`` and ``update`` only) they update out of
    place, as training steps then do, and still match torch."""

    def double_update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        return {n: 2.0 * u for n, u in updates.items()}, state

    double = optim.GradientTransformation(lambda params: optim.EmptyState(), double_update)
    params, grads = make_tree(5), make_tree(6)
    ps = [torch.nn.Parameter(p.clone()) for p in params.values()]
    for p, g in zip(ps, grads.values(), strict=True):
        p.grad = 2.0 * g
    torch.optim.SGD(ps, lr=0.1, momentum=0.9).step()
    for tx in [
        optim.chain(double, optim.sgd(0.1, momentum=0.9)),
        optim.partition({"decay": double, "no_decay": optim.sgd(0.1)}, label),
    ]:
        assert (tx.update_, tx.apply_) == (None, None)
    tx = optim.chain(double, optim.sgd(0.1, momentum=0.9))
    updates, _ = tx.update(grads, tx.init(params), params)
    for (name, new), theirs in zip(optim.apply_updates(params, updates).items(), ps, strict=True):
        assert_close(new, theirs.detach(), rtol=1e-12, atol=1e-15, msg=name)


@pytest.mark.parametrize(
    "tx",
    [
        optim.clip(1.0),
        optim.clip_by_global_norm(1.0),
        optim.scale(2.0),
        optim.add_decayed_weights(0.1),
        optim.scale_by_rms(),
        optim.chain(optim.clip_by_global_norm(1.0), optim.scale(-0.1)),
    ],
    ids=["clip", "clip_by_global_norm", "scale", "add_decayed_weights", "scale_by_rms", "chain"],
)
def test_transforms_that_take_an_empty_tree_give_an_empty_tree(tx) -> None:
    """A transform whose ``init`` takes no parameters updates none (as
    ``clip_grad_norm_([])`` clips none) in each form, where torch's foreach ops, which
    refuse an empty list, failed; those that count updates refuse the tree in ``init``."""
    state = tx.init({})
    assert tx.update({}, state, {})[0] == {}
    assert tx.update_({}, state, {})[0] == {}
    assert tx.apply_({}, state, {})[0] == {}
    assert optim.apply_updates({}, {}) == {}
    with pytest.raises(ValueError, match="empty parameter tree"):
        optim.adam(1e-3).init({})


def test_apply_updates_keeps_each_params_dtype_and_returns_new_tensors() -> None:
    params = {"a": torch.ones(3, dtype=torch.float32), "b": torch.ones(2, dtype=F64)}
    updates = {"a": torch.full((3,), 0.5, dtype=F64), "b": torch.full((2,), 0.25, dtype=F64)}
    out = optim.apply_updates(params, updates)
    assert out["a"].dtype == torch.float32 and out["b"].dtype == F64
    assert torch.equal(out["a"], torch.full((3,), 1.5)) and torch.equal(params["a"], torch.ones(3))
    assert out["a"].data_ptr() != params["a"].data_ptr()


def test_an_ordered_dict_of_params_keeps_its_type_through_update_and_apply() -> None:
    """A module's state_dict() is an OrderedDict: its updates, new params and optimizer
    state stay OrderedDicts, as any tree keeps its node types (the fast path for plain
    dicts must not take a dict subclass, which it would give back as a dict)."""
    params = OrderedDict(w=torch.ones(2), b=torch.zeros(1))
    grads = OrderedDict((k, torch.ones_like(v)) for k, v in params.items())
    tx = optim.adam(0.1)
    opt_state = tx.init(params)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new = optim.apply_updates(params, updates)
    assert (type(updates), type(new), list(new)) == (OrderedDict, OrderedDict, ["w", "b"])
    structure = optree.tree_structure(opt_state, namespace="fnloop")
    assert optree.tree_structure(new_opt_state, namespace="fnloop") == structure


@pytest.mark.parametrize("method", ["update", "update_", "apply_"])
def test_partition_gives_an_ordered_dict_of_params_back_as_one(method) -> None:
    """``partition`` keeps the type of its flat dict, as every other transform keeps its
    node types: with a plain dict, ``apply_updates(params, updates)`` refused the updates
    of an ``OrderedDict`` of params ("different node types")."""
    params = OrderedDict(w=torch.ones(2), b=torch.zeros(1))
    grads = OrderedDict((k, torch.ones_like(v)) for k, v in params.items())
    tx = optim.partition({"w": optim.adam(0.1), "b": optim.sgd(0.1)}, lambda name: name)
    state = tx.init(params)
    if method == "apply_":
        new, _ = tx.apply_(grads, state, OrderedDict((k, v.clone()) for k, v in params.items()))
    else:
        updates, _ = getattr(tx, method)(grads, state, params)
        assert (type(updates), list(updates)) == (OrderedDict, ["w", "b"])
        new = optim.apply_updates(params, updates)
    assert (type(new), list(new)) == (OrderedDict, ["w", "b"])
    assert_close(new["b"], torch.full((1,), -0.1))


def test_scale_by_learning_rate_without_sign_flip_and_learning_rates_order() -> None:
    params = {"w": torch.ones(2, dtype=F64)}
    tx = optim.chain(
        optim.scale_by_learning_rate(0.5, flip_sign=False), optim.scale_by_learning_rate(0.1)
    )
    state = tx.init(params)
    updates, state = tx.update({"w": torch.ones(2, dtype=F64)}, state, params)
    assert_close(updates["w"], torch.full((2,), -0.05, dtype=F64), rtol=1e-15, atol=0)
    assert [lr.item() for lr in optim.learning_rates(state)] == [0.5, 0.1]


# --------------------------------------------------------------------------- shapes

_SHAPE_TXS = {
    "sgd": lambda: optim.sgd(0.1),
    "sgd-momentum": lambda: optim.sgd(0.1, momentum=0.9),
    "adam": lambda: optim.adam(0.1),
    "adamw": lambda: optim.adamw(0.1),
    "rmsprop": lambda: optim.rmsprop(0.1),
    "adagrad": lambda: optim.adagrad(0.1),
    "clip-adamw": lambda: optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(0.1)),
}


@pytest.mark.parametrize("name", list(_SHAPE_TXS))
@pytest.mark.parametrize("method", ["update", "update_", "apply_"])
def test_a_gradient_of_the_wrong_shape_is_rejected_before_anything_is_written(name, method):
    # torch's fused kernels pair elements by position: a short gradient would be read
    # past its end, and the update path would broadcast a (3,) gradient over a (3, 1)
    # parameter into a (3, 3) one.
    tx = _SHAPE_TXS[name]()
    params = {"b": torch.zeros(4), "w": torch.zeros(3, 1)}
    state = tx.init(params)
    before = [t.clone() for t in optree.tree_leaves((params, state))]
    grads = {"b": torch.ones(4), "w": torch.ones(3)}
    either = r"\((3,|3, 1)\)"  # which of the two comes first depends on the transform
    match = rf"shape mismatch at 'w': a tensor of shape {either} is paired with .* {either}"
    with pytest.raises(ValueError, match=match):
        out = getattr(tx, method)(grads, state, params)
        if method != "apply_":  # plain sgd's updates never meet the params before this
            optim.apply_updates(params, out[0])
    for old, now in zip(before, optree.tree_leaves((params, state)), strict=True):
        assert torch.equal(old, now)


@pytest.mark.parametrize("method", ["update_", "apply_"])
def test_an_optimizer_state_of_other_shapes_is_rejected(method) -> None:
    tx = optim.adam(0.1)
    state = tx.init({"w": torch.zeros(2)})  # made for other params
    params = {"w": torch.zeros(6)}
    with pytest.raises(ValueError, match=r"shape mismatch at 'w'.*tx\.init\(params\)"):
        getattr(tx, method)({"w": torch.ones(6)}, state, params)


_DTYPE_TXS = {
    **_SHAPE_TXS,
    "sgd-nesterov-wd": lambda: optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    "adam-amsgrad": lambda: optim.adam(0.1, amsgrad=True),
    "rmsprop-centered-momentum": lambda: optim.rmsprop(0.1, centered=True, momentum=0.9),
    "trace": lambda: optim.trace(0.9),
    "scale_by_adagrad": lambda: optim.scale_by_adagrad(),
}


@pytest.mark.parametrize("name", list(_DTYPE_TXS))
@pytest.mark.parametrize("method", ["update", "update_", "apply_"])
@pytest.mark.parametrize(
    ("param_dtype", "grad_dtype"),
    [(torch.float32, F64), (torch.bfloat16, torch.float32)],
    ids=["f32-param-f64-grad", "bf16-param-f32-grad"],
)
def test_a_gradient_of_another_dtype_is_rejected_naming_it(name, method, param_dtype, grad_dtype):
    """As torch refuses such a .grad: the fused kernels failed ("expected scalar type
    Float but found Double"), adam's update too, and sgd's momentum or adagrad's sum
    silently became float64 in a pure update. Plain sgd's update reads the gradients
    alone and passes them through (apply_updates casts)."""
    if name == "sgd" and method != "apply_":
        pytest.skip("plain sgd's update never pairs the gradients with anything")
    tx = _DTYPE_TXS[name]()
    params = {"b": torch.zeros(4, dtype=param_dtype), "w": torch.zeros(3, dtype=param_dtype)}
    state = tx.init(params)
    before = [t.clone() for t in optree.tree_leaves((params, state))]
    grads = {"b": torch.ones(4, dtype=param_dtype), "w": torch.ones(3, dtype=grad_dtype)}
    match = (
        rf"^dtype mismatch at 'w': the update \(gradient\) is {grad_dtype}, paired with "
        rf"{param_dtype} .*g\.to\(params\[k\]\.dtype\)"
    )
    with pytest.raises(ValueError, match=match):
        getattr(tx, method)(grads, state, params)
    for old, now in zip(before, optree.tree_leaves((params, state)), strict=True):
        assert torch.equal(old, now)


def test_apply_updates_rejects_updates_of_another_shape_in_nested_trees() -> None:
    params = {"layer": [torch.zeros(2, 2), torch.zeros(3)]}
    updates = {"layer": [torch.zeros(2, 2), torch.zeros(1)]}
    match = r"shape mismatch at 'layer\.1': a tensor of shape \(3,\) is paired with .* \(1,\)"
    with pytest.raises(ValueError, match=match):
        optim.apply_updates(params, updates)


@pytest.mark.parametrize("apply", [optim.apply_updates, apply_updates_])
def test_apply_updates_names_the_tree_a_key_is_missing_from(apply) -> None:
    """The message said an extra update was in params and missing from the updates."""
    one, two = {"w": torch.zeros(2)}, {"w": torch.zeros(2), "b": torch.zeros(1)}
    with pytest.raises(
        ValueError,
        match=r"'b' is present in the first tree but not in the second \(first tree: updates",
    ):
        apply(one, two)
    with pytest.raises(
        ValueError,
        match=r"'b' is present in the second tree but not in the first \(first tree: updates",
    ):
        apply(two, one)


def test_a_shape_mismatch_is_refused_under_torch_compile_too() -> None:
    tx = optim.adam(0.1)
    state = tx.init({"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="shape mismatch at 'w'"):
        torch.compile(tx.update, backend="eager")(
            {"w": torch.ones(3, 1)}, state, {"w": torch.zeros(3, 1)}
        )
