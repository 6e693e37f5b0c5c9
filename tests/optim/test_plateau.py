"""``reduce_on_plateau`` against ``torch.optim.lr_scheduler.ReduceLROnPlateau``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import optree
import pytest
import torch
from torch.testing import assert_close

from fnloop import optim

F64 = torch.float64


def random_walk(n: int, seed: int, drift: float = -0.01) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    steps = drift + 0.05 * torch.randn(n, generator=g, dtype=F64)
    return (1.0 + steps.cumsum(0)).tolist()


FLAT = [1.0] * 12
DOWN_THEN_FLAT = [1.0, 0.9, 0.9, 0.9, 0.9, 0.95, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.7, 0.7]
SMALL_GAINS = [1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.8, 0.79, 0.78, 0.77, 0.76, 0.75, 0.74]
UP_THEN_FLAT = [0.1, 0.2, 0.2, 0.25, 0.25, 0.25, 0.25, 0.3, 0.3, 0.3, 0.3, 0.29]
# With negative values a relative threshold in min mode is lenient: best * (1 - t) > best.
NEGATIVE = [-1.0, -1.05, -1.5, -1.5, -1.48, -1.4, -1.3, -1.2, -1.1, -1.6, -1.6, -1.6]
WITH_NAN_INF = [1.0, math.nan, 0.9, math.inf, 0.9, 0.9, math.nan, 0.5, 0.5, 0.5, 0.5]

# (config, metrics). lr is the initial learning rate; the rest go to both implementations.
SCRIPTS = [
    pytest.param({"lr": 0.1, "patience": 2, "factor": 0.5}, DOWN_THEN_FLAT, id="patience"),
    pytest.param({"lr": 0.1, "patience": 0, "factor": 0.5}, FLAT, id="patience-0"),
    pytest.param({"lr": 0.1}, random_walk(60, 0, drift=0.0), id="defaults-random-walk"),
    pytest.param(
        {"lr": 0.1, "patience": 1, "cooldown": 2, "factor": 0.5},
        FLAT + DOWN_THEN_FLAT,
        id="cooldown",
    ),
    pytest.param(
        {"lr": 0.1, "patience": 0, "cooldown": 3, "factor": 0.3},
        random_walk(40, 1),
        id="cooldown-walk",
    ),
    pytest.param(
        {"lr": 1.0, "patience": 1, "threshold": 0.1, "threshold_mode": "rel", "factor": 0.5},
        SMALL_GAINS,
        id="threshold-rel",
    ),
    pytest.param(
        {"lr": 1.0, "patience": 1, "threshold": 0.05, "threshold_mode": "abs", "factor": 0.5},
        SMALL_GAINS,
        id="threshold-abs",
    ),
    pytest.param(
        {"lr": 1.0, "patience": 1, "mode": "max", "factor": 0.5}, UP_THEN_FLAT, id="max-rel"
    ),
    pytest.param(
        {"lr": 1.0, "patience": 1, "mode": "max", "threshold": 0.06, "threshold_mode": "abs"},
        UP_THEN_FLAT,
        id="max-abs",
    ),
    pytest.param(
        {"lr": 1.0, "patience": 2, "mode": "max", "threshold": 0.01, "factor": 0.7},
        random_walk(50, 2, drift=0.005),
        id="max-random-walk",
    ),
    pytest.param(
        {"lr": 1.0, "patience": 1, "threshold": 0.02, "factor": 0.5},
        NEGATIVE,
        id="negative-metrics",
    ),
    pytest.param({"lr": 0.1, "patience": 1, "factor": 0.5}, WITH_NAN_INF, id="nan-inf"),
    pytest.param(
        {"lr": 0.1, "patience": 0, "factor": 0.5, "min_lr": 0.02}, FLAT, id="min_lr-floor"
    ),
    pytest.param(
        {"lr": 0.1, "patience": 0, "factor": 0.5, "min_lr": 0.0123}, FLAT, id="min_lr-odd"
    ),
    pytest.param(
        {"lr": 1e-7, "patience": 0, "factor": 0.5, "eps": 1e-7}, FLAT, id="eps-blocks-all"
    ),
    pytest.param(
        {"lr": 1e-6, "patience": 0, "factor": 0.5, "eps": 1e-8}, FLAT, id="eps-blocks-later"
    ),
    pytest.param(
        {"lr": 1.0, "patience": 0, "factor": 0.5, "min_lr": 0.45, "eps": 0.15},
        FLAT,
        id="eps-and-min_lr",
    ),
    pytest.param(  # 1.0 -> 0.5; then 0.5 -> 0.25 is a change of exactly eps: kept at 0.5
        {"lr": 1.0, "patience": 0, "factor": 0.5, "eps": 0.25}, FLAT, id="eps-equal-to-the-drop"
    ),
]


def torch_scheduler(config: dict[str, Any]) -> tuple[Any, torch.optim.Optimizer]:
    kwargs = {k: v for k, v in config.items() if k != "lr"}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1, dtype=F64))], lr=config["lr"])
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kwargs), opt


def fnloop_plateau(config: dict[str, Any]) -> optim.ReduceOnPlateau:
    kwargs = {k: v for k, v in config.items() if k != "lr"}
    return optim.reduce_on_plateau(config["lr"], **kwargs)


def only_lr(opt_state: Any) -> float:
    (lr,) = optim.learning_rates(opt_state)
    return lr.item()


@pytest.mark.parametrize(("config", "metrics"), SCRIPTS)
def test_learning_rate_matches_torch_after_every_observation(config, metrics, request) -> None:
    tx = optim.sgd(fnloop_plateau(config))
    state = tx.init({"w": torch.zeros(3, dtype=F64)})
    scheduler, opt = torch_scheduler(config)
    assert only_lr(state) == config["lr"]
    lrs = []
    for epoch, metric in enumerate(metrics):
        state = optim.observe_metric(state, metric)
        scheduler.step(metric)
        expected = opt.param_groups[0]["lr"]
        assert only_lr(state) == pytest.approx(expected, rel=1e-12, abs=0), f"epoch {epoch}"
        (plateau,) = [s for s in state if isinstance(s, optim.ReduceOnPlateauState)]
        assert plateau.num_bad_epochs.item() == scheduler.num_bad_epochs, f"epoch {epoch}"
        assert plateau.cooldown_counter.item() == scheduler.cooldown_counter, f"epoch {epoch}"
        assert plateau.best.item() == scheduler.best or (
            math.isnan(scheduler.best) and math.isnan(plateau.best.item())
        )
        lrs.append(expected)
    if request.node.callspec.id != "eps-blocks-all":
        assert min(lrs) < config["lr"], "the script should reduce the learning rate at least once"


def test_scripts_cover_what_they_claim() -> None:
    """The eps and min_lr scripts really hit the floor / the eps guard."""
    for config, expected_final in [
        ({"lr": 0.1, "patience": 0, "factor": 0.5, "min_lr": 0.02}, 0.02),
        ({"lr": 1e-7, "patience": 0, "factor": 0.5, "eps": 1e-7}, 1e-7),
        # 1.0 -> 0.5; then max(0.25, 0.45) = 0.45 is only 0.05 lower: below eps, kept at 0.5.
        ({"lr": 1.0, "patience": 0, "factor": 0.5, "min_lr": 0.45, "eps": 0.15}, 0.5),
        ({"lr": 1e-6, "patience": 0, "factor": 0.5, "eps": 1e-8}, 1e-6 / 2**6),
    ]:
        state = optim.sgd(fnloop_plateau(config)).init({"w": torch.zeros(1)})
        for m in FLAT:
            state = optim.observe_metric(state, m)
        assert only_lr(state) == pytest.approx(expected_final, rel=1e-12)


@pytest.mark.parametrize("metric_type", ["float", "tensor-f32", "tensor-f64"])
def test_tensor_metrics_are_accepted(metric_type) -> None:
    config = {"lr": 0.1, "patience": 1, "factor": 0.5}
    state = optim.adam(fnloop_plateau(config)).init({"w": torch.zeros(2)})
    scheduler, opt = torch_scheduler(config)
    for m in DOWN_THEN_FLAT:
        metric = {
            "float": m,
            "tensor-f32": torch.tensor(m, dtype=torch.float32),
            "tensor-f64": torch.tensor(m, dtype=F64),
        }[metric_type]
        state = optim.observe_metric(state, metric)
        scheduler.step(metric)
        assert only_lr(state) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)


@pytest.mark.parametrize(
    ("make_fn", "make_torch"),
    [
        pytest.param(
            lambda lr: optim.sgd(lr, momentum=0.9),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
            id="sgd-momentum",
        ),
        pytest.param(
            lambda lr: optim.adamw(lr, weight_decay=0.1),
            lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1),
            id="adamw",
        ),
    ],
)
@pytest.mark.parametrize("inplace", [False, True], ids=["update", "apply_"])
def test_updates_use_the_reduced_learning_rate(make_fn, make_torch, inplace) -> None:
    config = {"lr": 0.1, "patience": 1, "factor": 0.5, "cooldown": 1}
    tx = make_fn(fnloop_plateau(config))
    g = torch.Generator().manual_seed(0)
    params = {
        "w": torch.randn(4, 3, generator=g, dtype=F64),
        "b": torch.randn((), generator=g, dtype=F64),
    }
    state = tx.init(params)
    ps = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    opt = make_torch(list(ps.values()))
    kwargs = {k: v for k, v in config.items() if k != "lr"}
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kwargs)
    metrics = [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    for metric in metrics:  # an "epoch" of 5 steps, then the metric
        for _ in range(5):
            grads = {n: torch.randn(p.shape, generator=g, dtype=F64) for n, p in params.items()}
            for n, p in ps.items():
                p.grad = grads[n].clone()
            if inplace:  # consumes grads
                params, state = tx.apply_(grads, state, params)
            else:
                updates, state = tx.update(grads, state, params)
                params = optim.apply_updates(params, updates)
            opt.step()
            for n in params:
                assert_close(params[n], ps[n].detach(), rtol=1e-9, atol=1e-12)
        state = optim.observe_metric(state, metric)
        scheduler.step(metric)
        assert only_lr(state) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
    assert only_lr(state) < config["lr"] / 4


def test_plain_sgd_step_is_minus_reduced_lr_times_grad() -> None:
    tx = optim.sgd(optim.reduce_on_plateau(0.8, factor=0.25, patience=0))
    params = {"w": torch.tensor([1.0, 2.0], dtype=F64)}
    state = tx.init(params)
    for m in [1.0, 1.0]:  # the second observation is a bad epoch: 0.8 -> 0.2
        state = optim.observe_metric(state, m)
    updates, _ = tx.update({"w": torch.tensor([1.0, -1.0], dtype=F64)}, state, params)
    assert_close(updates["w"], torch.tensor([-0.2, 0.2], dtype=F64), rtol=1e-15, atol=0)


def test_observe_metric_is_pure_and_passes_through_plateau_free_states() -> None:
    tx = optim.sgd(optim.reduce_on_plateau(0.1, patience=0))
    state = tx.init({"w": torch.zeros(2)})
    leaves = optree.tree_leaves(state, namespace="fnloop")
    before = [x.clone() for x in leaves]
    new_state = state
    for m in [1.0, 1.0, 1.0]:
        new_state = optim.observe_metric(new_state, m)
    for x, b in zip(leaves, before, strict=True):
        assert torch.equal(x, b)
    assert only_lr(new_state) < 0.1
    assert optim.has_plateau(state) and not optim.has_plateau(
        optim.adam(0.1).init({"w": torch.zeros(1)})
    )
    plain = optim.adam(0.1).init({"w": torch.zeros(1)})
    assert optim.observe_metric(plain, 1.0) is plain


def test_partition_with_two_plateaus_matches_torch_param_groups() -> None:
    """Each group keeps its own plateau; torch reduces each group's lr separately."""
    config = {"patience": 1, "factor": 0.5}
    tx = optim.partition(
        {
            "a": optim.sgd(optim.reduce_on_plateau(0.1, **config)),
            "b": optim.sgd(optim.reduce_on_plateau(0.01, min_lr=0.004, **config)),
        },
        lambda name: "a" if name.startswith("a") else "b",
    )
    state = tx.init({"a.w": torch.zeros(2), "b.w": torch.zeros(3)})
    opt = torch.optim.SGD(
        [
            {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.1},
            {"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 0.01},
        ]
    )
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=[0.0, 0.004], **config)
    for m in DOWN_THEN_FLAT:
        state = optim.observe_metric(state, m)
        scheduler.step(m)
        ours = [lr.item() for lr in optim.learning_rates(state)]
        assert ours == pytest.approx([g["lr"] for g in opt.param_groups], rel=1e-12)


def test_observe_metric_under_vmap_is_per_model() -> None:
    """Stacked plateau states, one metric sequence per model."""
    config = {"lr": 0.1, "patience": 1, "factor": 0.5}
    tx = optim.sgd(fnloop_plateau(config))
    n = 3
    state = optree.tree_map(
        lambda *xs: torch.stack(xs),
        *[tx.init({"w": torch.zeros(2, dtype=F64)}) for _ in range(n)],
        namespace="fnloop",
    )
    walks = [random_walk(30, 10 + i, drift=0.0) for i in range(n)]
    schedulers = [torch_scheduler(config) for _ in range(n)]
    observe = torch.func.vmap(optim.observe_metric)
    for t in range(30):
        state = observe(state, torch.tensor([w[t] for w in walks], dtype=F64))
        (lrs,) = optim.learning_rates(state)
        for i, (scheduler, opt) in enumerate(schedulers):
            scheduler.step(walks[i][t])
            assert lrs[i].item() == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
    assert len({lr.item() for lr in lrs}) > 1, "the walks should end with different lrs"


def test_a_metric_of_another_shape_than_the_plateau_state_is_a_clear_error() -> None:
    """One number per state, or one per model of a stacked state; never a new shape."""
    tx = optim.sgd(optim.reduce_on_plateau(0.1, patience=0, factor=0.5))
    one = tx.init({"w": torch.zeros(2, dtype=F64)})
    stacked = optree.tree_map(lambda *xs: torch.stack(xs), one, one, one, namespace="fnloop")
    for state, metric in [(one, [1.0, 2.0]), (stacked, [1.0, 2.0]), (stacked, [[1.0, 2.0, 3.0]])]:
        with pytest.raises(ValueError, match=r"fed a metric of shape \(.*\), but its state has"):
            optim.observe_metric(state, metric)
    for metric in (torch.tensor([1.0]), [1.0]):  # one element: that number
        (lr,) = optim.learning_rates(optim.observe_metric(optim.observe_metric(one, 1.0), metric))
        assert lr.shape == () and lr.item() == 0.05
    for metric in (1.0, [1.0, 1.0, 0.5]):  # every model's, or one for all
        state = optim.observe_metric(optim.observe_metric(stacked, 1.0), metric)
        (lrs,) = optim.learning_rates(state)
        assert lrs.shape == (3,)
    assert lrs.tolist() == [0.05, 0.05, 0.1]


def test_plateau_defaults_are_reduce_lr_on_plateaus() -> None:
    """reduce_on_plateau(lr) with no other argument decides as ReduceLROnPlateau(opt) does:
    the same mode, factor, patience, threshold, cooldown, min_lr and eps."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    ours = optim.reduce_on_plateau(0.1)
    assert (
        ours.mode,
        ours.factor,
        ours.patience,
        ours.threshold,
        ours.threshold_mode,
        ours.cooldown,
        ours.min_lr,
        ours.eps,
    ) == (
        theirs.mode,
        theirs.factor,
        theirs.patience,
        theirs.threshold,
        theirs.threshold_mode,
        theirs.cooldown,
        theirs.min_lrs[0],
        theirs.eps,
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "avg"}, "mode must be 'min' or 'max'; got 'avg'"),
        ({"threshold_mode": "pct"}, "threshold_mode must be 'rel' or 'abs'; got 'pct'"),
        ({"factor": 1.0}, r"factor must be in \(0, 1\); got 1\.0"),
        ({"factor": 0.0}, r"factor must be in \(0, 1\); got 0\.0"),
        ({"patience": -1}, "patience"),
        ({"cooldown": -2}, "cooldown"),
        # A float cooldown was accepted and turned the state's cooldown counter into a
        # float tensor at the first reduction (a checkpoint from before no longer fit).
        ({"cooldown": 1.5}, r"cooldown counts epochs: a whole number >= 0; got cooldown=1\.5"),
        ({"patience": 2.5}, r"patience counts epochs: a whole number >= 0; got patience=2\.5"),
        ({"patience": True}, r"patience counts epochs: .* got patience=True"),
        ({"cooldown": float("inf")}, r"cooldown counts epochs: .* got cooldown=inf"),
        ({"min_lr": -0.1}, r"min_lr must be >= 0; got -0\.1"),
        # Was accepted, and then no reduction ever happened (torch reduces, ignoring it).
        ({"min_lr": float("nan")}, r"min_lr must be >= 0; got nan"),
    ],
)
def test_bad_plateau_config_is_rejected(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        optim.reduce_on_plateau(0.1, **kwargs)


@pytest.mark.parametrize("lr", [-0.1, float("nan"), float("inf")])
def test_negative_or_non_finite_plateau_learning_rate_is_rejected(lr: float) -> None:
    with pytest.raises(ValueError, match=r"learning_rate must be finite and >= 0; got"):
        optim.reduce_on_plateau(lr)


def test_plateau_learning_rate_of_another_type_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"learning_rate must be a real number; got '0\.1'"):
        optim.reduce_on_plateau("0.1")


@pytest.mark.parametrize("patience", [2**63 - 1, 2**63, 10**20])
def test_a_patience_past_int64_never_reduces_as_torchs(patience: int) -> None:
    """sys.maxsize as a patience "never" went through a float (2**63) and compared as -2**63
    with the int64 count, so the rate dropped at every epoch after the first; 10**20
    raised OverflowError at the first metric. ReduceLROnPlateau never reduces."""
    plateau = optim.reduce_on_plateau(1.0, patience=patience)
    assert plateau.patience == patience
    state = optim.sgd(plateau).init({"w": torch.zeros(1)})
    for metric in [1.0, 2.0, 2.0, 2.0]:
        state = optim.observe_metric(state, metric)
    assert only_lr(state) == 1.0


def test_a_cooldown_past_int64_is_one_that_does_not_end() -> None:
    """A cooldown of 2**63 raised "value cannot be converted to type int64_t" at the first
    reduction."""
    state = optim.sgd(optim.reduce_on_plateau(1.0, patience=0, cooldown=2**63)).init(
        {"w": torch.zeros(1)}
    )
    for metric in [1.0, 2.0, 2.0, 2.0]:
        state = optim.observe_metric(state, metric)
    assert only_lr(state) == pytest.approx(0.1)


def test_plateau_state_keeps_its_dtypes_through_reductions() -> None:
    """The counters stay int64 and the rate float64 whatever happened, so a state saved
    at any epoch fits the one ``init`` makes (checkpoints compare dtypes)."""
    plateau = optim.reduce_on_plateau(0.1, patience=np.int64(0), cooldown=2.0)
    assert (type(plateau.patience), type(plateau.cooldown)) == (int, int)  # whole numbers pass
    tx = optim.sgd(plateau)
    state = tx.init({"w": torch.zeros(2)})
    fresh = [x.dtype for x in optree.tree_leaves(state, namespace="fnloop")]
    for metric in FLAT:
        state = optim.observe_metric(state, metric)
        assert [x.dtype for x in optree.tree_leaves(state, namespace="fnloop")] == fresh
    assert only_lr(state) < 0.1
