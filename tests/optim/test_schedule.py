"""Schedules against ``torch.optim.lr_scheduler``, step for step, plus the tensor path."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from torch.optim import lr_scheduler

from fnloop import optim

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch.optim.lr_scheduler")


class Case(NamedTuple):
    """A schedule, the torch scheduler it mirrors, and how far to drive them."""

    schedule: Callable[[], Any]
    scheduler: Callable[[torch.optim.Optimizer], lr_scheduler.LRScheduler]
    lr: float
    steps: int = 250


L = lr_scheduler

CASES = {
    # ---------------------------------------------------------------- constant
    "constant": Case(
        lambda: optim.constant_schedule(0.1),
        lambda o: L.ConstantLR(o, factor=1.0, total_iters=0),
        0.1,
    ),
    "constant-factor": Case(
        lambda: optim.constant_schedule(0.1, factor=0.5, total_iters=4),
        lambda o: L.ConstantLR(o, factor=0.5, total_iters=4),
        0.1,
    ),
    "constant-torch-defaults": Case(
        lambda: optim.constant_schedule(0.3, factor=1 / 3, total_iters=5),
        lambda o: L.ConstantLR(o),
        0.3,
    ),
    "constant-long": Case(
        lambda: optim.constant_schedule(1.0, factor=0.25, total_iters=120),
        lambda o: L.ConstantLR(o, factor=0.25, total_iters=120),
        1.0,
    ),
    # ---------------------------------------------------------------- step
    "step": Case(
        lambda: optim.step_schedule(0.1, step_size=30),
        lambda o: L.StepLR(o, step_size=30),
        0.1,
    ),
    "step-half": Case(
        lambda: optim.step_schedule(1.0, step_size=7, gamma=0.5),
        lambda o: L.StepLR(o, step_size=7, gamma=0.5),
        1.0,
    ),
    "step-every": Case(
        lambda: optim.step_schedule(0.05, step_size=1, gamma=0.99),
        lambda o: L.StepLR(o, step_size=1, gamma=0.99),
        0.05,
    ),
    "step-growth": Case(
        lambda: optim.step_schedule(1e-3, step_size=50, gamma=2.0),
        lambda o: L.StepLR(o, step_size=50, gamma=2.0),
        1e-3,
    ),
    # ---------------------------------------------------------------- multistep
    "multistep": Case(
        lambda: optim.multistep_schedule(0.1, milestones=[30, 80]),
        lambda o: L.MultiStepLR(o, milestones=[30, 80]),
        0.1,
    ),
    "multistep-repeated": Case(
        lambda: optim.multistep_schedule(1.0, milestones=[10, 10, 50, 120, 120, 120], gamma=0.5),
        lambda o: L.MultiStepLR(o, milestones=[10, 10, 50, 120, 120, 120], gamma=0.5),
        1.0,
    ),
    "multistep-at-zero": Case(
        lambda: optim.multistep_schedule(0.2, milestones=[0, 5], gamma=0.5),
        lambda o: L.MultiStepLR(o, milestones=[0, 5], gamma=0.5),
        0.2,
    ),
    "multistep-unsorted": Case(
        lambda: optim.multistep_schedule(0.1, milestones=[150, 20], gamma=0.3),
        lambda o: L.MultiStepLR(o, milestones=[150, 20], gamma=0.3),
        0.1,
    ),
    "multistep-none": Case(
        lambda: optim.multistep_schedule(0.1, milestones=[]),
        lambda o: L.MultiStepLR(o, milestones=[]),
        0.1,
    ),
    # ---------------------------------------------------------------- exponential
    "exponential": Case(
        lambda: optim.exponential_schedule(0.1, gamma=0.99),
        lambda o: L.ExponentialLR(o, gamma=0.99),
        0.1,
    ),
    "exponential-fast": Case(
        lambda: optim.exponential_schedule(1.0, gamma=0.9),
        lambda o: L.ExponentialLR(o, gamma=0.9),
        1.0,
    ),
    "exponential-growth": Case(
        lambda: optim.exponential_schedule(0.01, gamma=1.01),
        lambda o: L.ExponentialLR(o, gamma=1.01),
        0.01,
    ),
    # ---------------------------------------------------------------- cosine
    "cosine-cycles": Case(
        lambda: optim.cosine_schedule(0.1, t_max=50),
        lambda o: L.CosineAnnealingLR(o, T_max=50),
        0.1,
    ),
    "cosine-once": Case(
        lambda: optim.cosine_schedule(0.1, t_max=200),
        lambda o: L.CosineAnnealingLR(o, T_max=200),
        0.1,
    ),
    "cosine-eta-min": Case(
        lambda: optim.cosine_schedule(0.1, t_max=37, eta_min=1e-3),
        lambda o: L.CosineAnnealingLR(o, T_max=37, eta_min=1e-3),
        0.1,
    ),
    "cosine-t-max-1": Case(
        lambda: optim.cosine_schedule(1.0, t_max=1, eta_min=0.1),
        lambda o: L.CosineAnnealingLR(o, T_max=1, eta_min=0.1),
        1.0,
    ),
    # ---------------------------------------------------------------- linear
    "linear-torch-defaults": Case(
        lambda: optim.linear_schedule(0.1),
        lambda o: L.LinearLR(o),
        0.1,
    ),
    "linear-warmup": Case(
        lambda: optim.linear_schedule(0.1, start_factor=0.01, total_iters=100),
        lambda o: L.LinearLR(o, start_factor=0.01, total_iters=100),
        0.1,
    ),
    "linear-decay": Case(
        lambda: optim.linear_schedule(1.0, start_factor=1.0, end_factor=0.1, total_iters=150),
        lambda o: L.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=150),
        1.0,
    ),
    "linear-to-zero": Case(
        lambda: optim.linear_schedule(0.5, start_factor=0.5, end_factor=0.0, total_iters=60),
        lambda o: L.LinearLR(o, start_factor=0.5, end_factor=0.0, total_iters=60),
        0.5,
    ),
    # ---------------------------------------------------------------- polynomial
    "polynomial-torch-defaults": Case(
        lambda: optim.polynomial_schedule(0.1),
        lambda o: L.PolynomialLR(o),
        0.1,
    ),
    "polynomial-linear": Case(
        lambda: optim.polynomial_schedule(0.1, total_iters=100),
        lambda o: L.PolynomialLR(o, total_iters=100),
        0.1,
    ),
    "polynomial-square": Case(
        lambda: optim.polynomial_schedule(0.1, total_iters=150, power=2.0),
        lambda o: L.PolynomialLR(o, total_iters=150, power=2.0),
        0.1,
    ),
    "polynomial-sqrt": Case(
        lambda: optim.polynomial_schedule(1.0, total_iters=50, power=0.5),
        lambda o: L.PolynomialLR(o, total_iters=50, power=0.5),
        1.0,
    ),
    # ---------------------------------------------------------------- onecycle
    # ``steps == total_steps``: torch raises when stepped past ``total_steps``.
    "onecycle": Case(
        lambda: optim.onecycle_schedule(0.1, total_steps=200),
        lambda o: L.OneCycleLR(o, max_lr=0.1, total_steps=200, cycle_momentum=False),
        0.1,
        steps=200,
    ),
    "onecycle-linear": Case(
        lambda: optim.onecycle_schedule(
            0.1, total_steps=250, pct_start=0.25, anneal_strategy="linear"
        ),
        lambda o: L.OneCycleLR(
            o,
            max_lr=0.1,
            total_steps=250,
            pct_start=0.25,
            anneal_strategy="linear",
            cycle_momentum=False,
        ),
        0.1,
        steps=250,
    ),
    "onecycle-three-phase": Case(
        lambda: optim.onecycle_schedule(
            1.0, total_steps=300, div_factor=10.0, final_div_factor=100.0, three_phase=True
        ),
        lambda o: L.OneCycleLR(
            o,
            max_lr=1.0,
            total_steps=300,
            div_factor=10.0,
            final_div_factor=100.0,
            three_phase=True,
            cycle_momentum=False,
        ),
        1.0,
        steps=300,
    ),
    "onecycle-three-phase-linear": Case(
        lambda: optim.onecycle_schedule(
            0.5, total_steps=201, pct_start=0.33, anneal_strategy="linear", three_phase=True
        ),
        lambda o: L.OneCycleLR(
            o,
            max_lr=0.5,
            total_steps=201,
            pct_start=0.33,
            anneal_strategy="linear",
            three_phase=True,
            cycle_momentum=False,
        ),
        0.5,
        steps=201,
    ),
    "onecycle-no-warmup": Case(
        lambda: optim.onecycle_schedule(0.1, total_steps=200, pct_start=0.0),
        lambda o: L.OneCycleLR(o, max_lr=0.1, total_steps=200, pct_start=0.0, cycle_momentum=False),
        0.1,
        steps=200,
    ),
    # ---------------------------------------------------------------- join
    "join-warmup-cosine": Case(
        lambda: optim.join_schedules(
            [
                optim.linear_schedule(0.1, start_factor=0.1, total_iters=10),
                optim.cosine_schedule(0.1, t_max=190),
            ],
            boundaries=[10],
        ),
        lambda o: L.SequentialLR(
            o,
            [L.LinearLR(o, start_factor=0.1, total_iters=10), L.CosineAnnealingLR(o, T_max=190)],
            milestones=[10],
        ),
        0.1,
    ),
    "join-three": Case(
        lambda: optim.join_schedules(
            [
                optim.constant_schedule(0.1, factor=0.5, total_iters=5),
                optim.exponential_schedule(0.1, gamma=0.98),
                optim.step_schedule(0.1, step_size=20, gamma=0.5),
            ],
            boundaries=[20, 100],
        ),
        lambda o: L.SequentialLR(
            o,
            [
                L.ConstantLR(o, factor=0.5, total_iters=5),
                L.ExponentialLR(o, gamma=0.98),
                L.StepLR(o, step_size=20, gamma=0.5),
            ],
            milestones=[20, 100],
        ),
        0.1,
    ),
    "join-at-zero": Case(
        lambda: optim.join_schedules(
            [optim.exponential_schedule(0.1, gamma=0.5), optim.cosine_schedule(0.1, t_max=80)],
            boundaries=[0],
        ),
        lambda o: L.SequentialLR(
            o, [L.ExponentialLR(o, gamma=0.5), L.CosineAnnealingLR(o, T_max=80)], milestones=[0]
        ),
        0.1,
    ),
    "join-one": Case(
        lambda: optim.join_schedules([optim.polynomial_schedule(0.1, total_iters=90)], []),
        lambda o: L.SequentialLR(o, [L.PolynomialLR(o, total_iters=90)], milestones=[]),
        0.1,
    ),
    # OneCycleLR overwrites the group's ``initial_lr`` with max_lr / div_factor, and
    # SequentialLR restarts the lr from it, so torch's MultiStepLR starts at 0.004 here.
    "join-multistep-onecycle": Case(
        lambda: optim.join_schedules(
            [
                optim.multistep_schedule(0.004, milestones=[3, 6], gamma=0.5),
                optim.onecycle_schedule(0.1, total_steps=300),
            ],
            boundaries=[9],
        ),
        lambda o: L.SequentialLR(
            o,
            [
                L.MultiStepLR(o, milestones=[3, 6], gamma=0.5),
                L.OneCycleLR(o, max_lr=0.1, total_steps=300, cycle_momentum=False),
            ],
            milestones=[9],
        ),
        0.1,
    ),
}

IDS = list(CASES)
# One or two configurations per factory; every case in the table compiles the same way.
COMPILED = [
    "constant-factor",
    "step-half",
    "multistep-repeated",
    "exponential",
    "cosine-cycles",
    "cosine-eta-min",
    "linear-warmup",
    "polynomial-sqrt",
    "onecycle-three-phase",
    "join-warmup-cosine",
    "join-three",
]


def torch_lrs(case: Case) -> list[float]:
    """The learning rate torch's scheduler gives each of ``case.steps`` optimizer steps."""
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=case.lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        scheduler = case.scheduler(optimizer)
    lrs = []
    for _ in range(case.steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def f64(t: float) -> torch.Tensor:
    return torch.tensor(t, dtype=torch.float64)


# --------------------------------------------------------------------------- against torch


TORCH_VERSION = tuple(int(v) for v in torch.__version__.split(".")[:2])


@pytest.mark.parametrize("name", IDS)
def test_matches_torch_scheduler(name: str) -> None:
    if name == "join-at-zero" and TORCH_VERSION < (2, 13):
        pytest.skip(
            "SequentialLR before pytorch/pytorch#185986 (in torch 2.13) skips the first step "
            "of a scheduler that starts at milestone 0"
        )
    case = CASES[name]
    schedule = case.schedule()
    expected = torch_lrs(case)
    ours = [schedule(t) for t in range(case.steps)]
    assert all(type(lr) is float for lr in ours)
    # Torch computes most schedules recursively (lr_t = lr_{t-1} * ratio); the closed
    # forms here agree up to the rounding that recursion accumulates: at most ~1e-13
    # relative over these tables (cosine with eta_min, where ``lr - eta_min`` cancels),
    # far inside 1e-9. Both sides are exactly 0 where a schedule reaches 0.
    bad = [
        (t, a, b)
        for t, (a, b) in enumerate(zip(ours, expected, strict=True))
        if not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)
    ]
    assert not bad, f"{name}: (step, ours, torch) mismatches: {bad[:5]}"


def test_constant_with_zero_total_iters_is_value() -> None:
    # torch's recursive ConstantLR(factor, total_iters=0) applies ``factor`` at step 0 and
    # never undoes it; its closed form (and this schedule) give ``value`` throughout.
    schedule = optim.constant_schedule(0.1, factor=0.5, total_iters=0)
    assert [schedule(t) for t in range(3)] == [0.1, 0.1, 0.1]


def test_onecycle_stays_at_final_lr_after_total_steps() -> None:
    schedule = optim.onecycle_schedule(1.0, total_steps=20, anneal_strategy="linear")
    final = schedule(19)
    assert math.isclose(final, 1.0 / 25 / 1e4, rel_tol=1e-9)
    assert [schedule(t) for t in (20, 21, 1000)] == [final] * 3
    assert schedule(f64(1000.0)).item() == final


@pytest.mark.parametrize("three_phase", [False, True])
def test_onecycle_takes_the_phase_that_ends_at_a_boundary_step_as_torch(three_phase) -> None:
    """At a phase's last step torch's OneCycleLR takes the phase that ends there, whose
    cosine reaches its end rate exactly; the next phase's start, min + (max - min), is
    another float for these rates (3.0000000000000003e-4). Both paths must equal torch."""
    kwargs = dict(total_steps=100, div_factor=10.0, final_div_factor=3.0, three_phase=three_phase)
    schedule = optim.onecycle_schedule(3e-4, **kwargs)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-4)
    scheduler = lr_scheduler.OneCycleLR(opt, max_lr=3e-4, **kwargs)
    theirs = []
    for _ in range(60):
        theirs.append(scheduler.get_last_lr()[0])
        opt.step()
        scheduler.step()
    boundaries = [29, 58] if three_phase else [29]
    for t in boundaries:
        assert schedule(t) == theirs[t], t
        assert schedule(f64(t)).item() == theirs[t], t
    assert theirs[29] == 3e-4


@pytest.mark.parametrize(("pct_start", "last"), [(0.55, 1.0 / 25), (0.7, None), (1.0, 1.0)])
def test_onecycle_ends_on_an_earlier_phase_as_torch_when_its_last_one_starts_late(
    pct_start: float, last: float | None
) -> None:
    """The docstring: three phases with 2p - 2 >= T (here 2 * 5.5 - 2 = 9 = T, and 12 > 9)
    end on the way back down to max_lr / div_factor, not at its final rate; stepped past
    the end the schedule keeps that rate."""
    kwargs = dict(total_steps=10, pct_start=pct_start, three_phase=True)
    schedule = optim.onecycle_schedule(1.0, **kwargs)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = lr_scheduler.OneCycleLR(opt, max_lr=1.0, cycle_momentum=False, **kwargs)
    for _ in range(9):
        opt.step()
        scheduler.step()
    final = scheduler.get_last_lr()[0]
    assert schedule(9) == schedule(100) == schedule(f64(100.0)).item() == final
    assert final == last if last is not None else 1.0 / 25 < final < 1.0


def test_join_schedules_never_gives_a_later_schedule_a_negative_step() -> None:
    """Each schedule after the first starts from its own step 0; on the tensor path, which
    computes every schedule at every step, the ones not yet in charge get step 0, not a
    negative one (a table lookup, rates[step.long()], would index from the end)."""
    seen = []

    def spy(step: torch.Tensor) -> torch.Tensor:
        seen.append(step.item())
        return step * 0.0 + 0.01

    schedule = optim.join_schedules([optim.constant_schedule(0.1), spy], boundaries=[5])
    values = [schedule(f64(t)).item() for t in range(8)]
    assert values == [0.1] * 5 + [0.01] * 3
    assert seen == [0.0] * 6 + [1.0, 2.0]


def test_multistep_reads_milestones_given_as_an_iterator_once() -> None:
    """MultiStepLR takes any iterable of milestones; a generator was consumed by the
    argument check, so the schedule kept no milestone and never decayed."""
    schedule = optim.multistep_schedule(1.0, (10 * k for k in (1, 2)), gamma=0.5)
    assert [schedule(t) for t in (0, 9, 10, 19, 20)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert schedule(f64(20)).item() == 0.25


# --------------------------------------------------------------------------- tensor path


@pytest.mark.parametrize("name", IDS)
def test_tensor_path_equals_float_path(name: str) -> None:
    case = CASES[name]
    schedule = case.schedule()
    for t in range(case.steps):
        out = schedule(f64(t))
        assert isinstance(out, torch.Tensor)
        assert out.dtype == torch.float64
        assert out.shape == ()
        # torch's and libm's pow/cos may round differently in the last bit.
        torch.testing.assert_close(out, f64(schedule(t)), rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("name", IDS)
def test_vmap_over_steps(name: str) -> None:
    case = CASES[name]
    schedule = case.schedule()
    steps = torch.arange(case.steps, dtype=torch.float64)
    batched = torch.func.vmap(schedule)(steps)
    assert batched.shape == steps.shape
    assert batched.dtype == torch.float64
    expected = torch.stack([schedule(s) for s in steps])
    torch.testing.assert_close(batched, expected, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize(
    ("step", "dtype"),
    [
        (torch.tensor(7, dtype=torch.int64), torch.float64),
        (torch.tensor(7.0, dtype=torch.float32), torch.float32),
    ],
    ids=["int64-promoted", "float32-kept"],
)
def test_tensor_dtype(name: str, step: torch.Tensor, dtype: torch.dtype) -> None:
    schedule = CASES[name].schedule()
    out = schedule(step)
    assert out.dtype == dtype
    torch.testing.assert_close(out, torch.tensor(schedule(7), dtype=dtype))


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPILED)
def test_compiles_without_graph_breaks(name: str) -> None:
    case = CASES[name]
    schedule = case.schedule()
    compiled = torch.compile(schedule, fullgraph=True)
    for t in (0, 3, 10, 49, 50, 51, 137, case.steps - 1):
        torch.testing.assert_close(compiled(f64(t)), schedule(f64(t)), rtol=1e-13, atol=1e-16)


@pytest.mark.slow
def test_compiled_vmap() -> None:
    schedule = CASES["join-warmup-cosine"].schedule()
    steps = torch.arange(250, dtype=torch.float64)
    compiled = torch.compile(torch.func.vmap(schedule), fullgraph=True)
    torch.testing.assert_close(
        compiled(steps), torch.stack([schedule(s) for s in steps]), rtol=1e-13, atol=1e-16
    )


def test_drives_scale_by_learning_rate() -> None:
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(0.1, start_factor=0.1, total_iters=3),
            optim.cosine_schedule(0.1, t_max=5),
        ],
        boundaries=[3],
    )
    tx = optim.sgd(schedule)
    params = {"w": torch.zeros(2)}
    state = tx.init(params)
    seen = []
    for _ in range(8):
        (lr,) = optim.learning_rates(state)
        seen.append(lr.item())
        _, state = tx.update({"w": torch.ones(2)}, state, params)
    for t, lr in enumerate(seen):
        assert math.isclose(lr, schedule(t), rel_tol=1e-12)


# --------------------------------------------------------------------------- validation


BAD_ARGUMENTS = [
    (optim.constant_schedule, (0.1,), {"factor": 1.5}, "factor"),
    (optim.constant_schedule, (0.1,), {"factor": -0.1}, "factor"),
    (optim.constant_schedule, (0.1,), {"total_iters": -1}, "total_iters"),
    (optim.step_schedule, (0.1, 0), {}, "step_size"),
    (optim.step_schedule, (0.1, -3), {}, "step_size"),
    (optim.step_schedule, (0.1, 2.5), {}, "step_size"),
    (optim.step_schedule, (0.1, True), {}, "step_size"),
    (optim.step_schedule, (0.1, 10), {"gamma": 0.0}, "gamma"),
    (optim.step_schedule, (0.1, 10), {"gamma": -0.5}, "gamma"),
    (optim.multistep_schedule, (0.1, [10, -1]), {}, "milestones[1]"),
    (optim.multistep_schedule, (0.1, [10.5]), {}, "milestones[0]"),
    (optim.multistep_schedule, (0.1, [10]), {"gamma": 0.0}, "gamma"),
    (optim.exponential_schedule, (0.1, 0.0), {}, "gamma"),
    (optim.exponential_schedule, (0.1, float("nan")), {}, "gamma"),
    (optim.cosine_schedule, (0.1, 0), {}, "t_max"),
    (optim.cosine_schedule, (0.1, -10), {}, "t_max"),
    (optim.linear_schedule, (0.1,), {"start_factor": 0.0}, "start_factor"),
    (optim.linear_schedule, (0.1,), {"start_factor": 1.5}, "start_factor"),
    (optim.linear_schedule, (0.1,), {"end_factor": 1.5}, "end_factor"),
    (optim.linear_schedule, (0.1,), {"end_factor": -0.1}, "end_factor"),
    (optim.linear_schedule, (0.1,), {"total_iters": 0}, "total_iters"),
    (optim.polynomial_schedule, (0.1,), {"total_iters": 0}, "total_iters"),
    (optim.polynomial_schedule, (0.1,), {"power": -1.0}, "power"),
    (optim.polynomial_schedule, (0.1,), {"power": float("nan")}, "power"),
    (optim.onecycle_schedule, (0.1, 0), {}, "total_steps"),
    (optim.onecycle_schedule, (0.1, 100.0), {}, "total_steps"),
    (optim.onecycle_schedule, (0.1, 100), {"pct_start": 1.5}, "pct_start"),
    (optim.onecycle_schedule, (0.1, 100), {"pct_start": 0.01}, "pct_start"),
    (optim.onecycle_schedule, (0.1, 100), {"anneal_strategy": "exp"}, "anneal_strategy"),
    (optim.onecycle_schedule, (0.1, 100), {"div_factor": 0.0}, "div_factor"),
    (optim.onecycle_schedule, (0.1, 100), {"final_div_factor": -1.0}, "final_div_factor"),
    (optim.constant_schedule, (-0.1,), {}, "value"),
    (optim.step_schedule, (float("nan"), 10), {}, "init_value"),
    (optim.multistep_schedule, (-1e-3, [10]), {}, "init_value"),
    (optim.exponential_schedule, (float("inf"), 0.9), {}, "init_value"),
    (optim.cosine_schedule, (-1e-3, 100), {}, "init_value"),
    (optim.cosine_schedule, (0.1, 100), {"eta_min": float("nan")}, "eta_min"),
    (optim.linear_schedule, (-0.1,), {}, "init_value"),
    (optim.polynomial_schedule, (float("nan"),), {}, "init_value"),
    (optim.onecycle_schedule, (-0.1, 100), {}, "max_lr"),
    (optim.join_schedules, ([], []), {}, "schedules"),
    (optim.join_schedules, ([0.1], []), {}, "schedules[0]"),
    (optim.join_schedules, ([optim.constant_schedule(0.1)] * 2, []), {}, "boundaries"),
    (optim.join_schedules, ([optim.constant_schedule(0.1)] * 2, [1, 2]), {}, "boundaries"),
    (optim.join_schedules, ([optim.constant_schedule(0.1)] * 3, [5, 2]), {}, "boundaries"),
    (optim.join_schedules, ([optim.constant_schedule(0.1)] * 2, [-1]), {}, "boundaries[0]"),
]


@pytest.mark.parametrize(
    ("factory", "args", "kwargs", "argument"),
    BAD_ARGUMENTS,
    ids=[f"{f.__name__}-{a}-{i}" for i, (f, _, _, a) in enumerate(BAD_ARGUMENTS)],
)
def test_bad_argument_raises(
    factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], argument: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(argument)):
        factory(*args, **kwargs)


@pytest.mark.parametrize("value", ["1e-3", True, None, torch.tensor(0.1)])
def test_learning_rate_of_another_type_raises_type_error(value: Any) -> None:
    # Caught when the schedule is made, not at the first update.
    with pytest.raises(TypeError, match="init_value is a learning rate and must be a real"):
        optim.cosine_schedule(value, 100)


@pytest.mark.parametrize("value", [torch.tensor(0.1), "0.1", None, True])
def test_join_schedules_offers_constant_schedule_only_for_a_number(value: Any) -> None:
    """The advice "Wrap a constant as constant_schedule(tensor(0.1000))" (or of '0.1', None)
    led to constant_schedule's TypeError; a number still gets it."""
    with pytest.raises(ValueError, match=r"schedules\[1\] must be a schedule") as info:
        optim.join_schedules([optim.constant_schedule(0.1), value], [3])
    assert "constant_schedule" not in str(info.value)
    assert str(info.value).endswith(f"got {value!r} ({type(value).__name__}).")
    with pytest.raises(ValueError, match=re.escape("Wrap a constant as constant_schedule(0.1).")):
        optim.join_schedules([optim.constant_schedule(0.1), 0.1], [3])


def test_a_plateau_rate_in_join_schedules_says_it_cannot_be_joined() -> None:
    """The advice was "Wrap a constant as constant_schedule(ReduceOnPlateau(...))"."""
    plateau = optim.reduce_on_plateau(1e-3, mode="max")
    with pytest.raises(ValueError, match=r"schedules\[1\] is a reduce_on_plateau rate") as info:
        optim.join_schedules([optim.constant_schedule(0.0), plateau], [24])
    assert "constant_schedule" not in str(info.value)
