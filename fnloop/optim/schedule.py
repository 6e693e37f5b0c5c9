"""Learning-rate schedules: pure functions ``step -> lr`` matching ``torch.optim.lr_scheduler``.

Each factory returns a :data:`~fnloop.typing.Schedule`. ``schedule(t)`` is the
learning rate of the ``t``-th update (counting from 0): the value the torch scheduler
named on the factory reports through ``get_last_lr()`` after ``t`` calls to
``scheduler.step()``. Torch computes most of them recursively from the previous value;
here they are closed forms, so the two agree up to floating-point rounding (but for
``ConstantLR`` with ``total_iters=0``: see :func:`constant_schedule`).

A schedule works on two kinds of step:

* a Python ``int`` or ``float``: it computes with :mod:`math` and returns a ``float``;
* a tensor, such as the 0-d float64 step :func:`fnloop.optim.scale_by_learning_rate`
  passes: it uses tensor ops only (no host sync, no Python branching on values), so it
  traces under ``torch.compile(fullgraph=True)`` and maps over a batch of steps under
  ``torch.func.vmap``. The result keeps a floating step's dtype; integer steps are
  promoted to float64 (float32 on MPS).

>>> import torch
>>> from fnloop import optim
>>> schedule = optim.join_schedules(
...     [optim.linear_schedule(0.1, start_factor=0.1, total_iters=5),
...      optim.cosine_schedule(0.1, t_max=95)],
...     boundaries=[5],
... )
>>> [round(schedule(t), 4) for t in (0, 5, 100)]
[0.01, 0.1, 0.0]
>>> schedule(torch.tensor(5.0, dtype=torch.float64))
tensor(0.1000, dtype=torch.float64)
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Sequence
from typing import Literal, cast

import torch

from fnloop.optim.base import scalar_dtype
from fnloop.optim.plateau import ReduceOnPlateau
from fnloop.typing import Schedule

_JOIN_LENGTHS = (
    "join_schedules needs one boundary between each pair of consecutive schedules, so "
    "len(boundaries) must be len(schedules) - 1; got {n_schedules} schedules and "
    "boundaries={boundaries}. Schedule i + 1 takes over (restarting from its own step 0) "
    "at step boundaries[i]."
)
_JOIN_UNSORTED = (
    "join_schedules needs boundaries in non-decreasing order (the steps at which each "
    "next schedule takes over); got boundaries={boundaries}. Sort them, or reorder the "
    "schedules to match."
)
_ONECYCLE_EMPTY_WARMUP = (
    "onecycle_schedule's warm-up phase would be empty: pct_start * total_steps == 1 "
    "(pct_start={pct_start}, total_steps={total_steps}) makes it end at step 0, where "
    "torch's OneCycleLR divides by zero. Choose pct_start so that pct_start * total_steps "
    "is 0, below 1, or above 1."
)


# --------------------------------------------------------------------------- validation


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {expected}; got {name}={value!r}.")


def _check_rate(name: str, value: object) -> None:
    """A learning rate given to a schedule: a finite real number >= 0, as torch's optimizers
    require of ``lr``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} is a learning rate and must be a real number; got {name}={value!r} "
            f"({type(value).__name__})."
        )
    # typeshed's numbers.Real declares __lt__ and __le__ but not __ge__ (what `0.0 <= value`
    # falls back to); every Real compares with a float, as its ABC requires.
    rate = cast(float, value)
    if not 0.0 <= rate < math.inf:
        raise ValueError(f"{name} is a learning rate and must be finite and >= 0; got {value!r}.")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0; got {name}={value!r}.")


def _check_between(name: str, value: float, low: float, high: float, *, open_low: bool) -> None:
    if not (low < value <= high if open_low else low <= value <= high):
        interval = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise ValueError(f"{name} must be in {interval}; got {name}={value!r}.")


# --------------------------------------------------------------------------- helpers


def _float_step(step: torch.Tensor) -> torch.Tensor:
    """A floating step keeps its dtype; an integer step becomes fnloop's scalar dtype."""
    if step.is_floating_point():
        return step
    return step.to(scalar_dtype(step.device))


# --------------------------------------------------------------------------- schedules


def constant_schedule(value: float, factor: float = 1.0, total_iters: int = 0) -> Schedule:
    r"""A constant learning rate, optionally scaled by ``factor`` for the first steps.

    As ``torch.optim.lr_scheduler.ConstantLR`` (whose ``factor`` defaults to 1/3 and
    ``total_iters`` to 5; here the defaults give a plain constant):

    .. math::
       \eta_t = \begin{cases} \text{value} \cdot \text{factor} & t < \text{total\_iters} \\
       \text{value} & \text{otherwise} \end{cases}

    With ``total_iters=0`` that is torch's closed form, ``value`` at every step; torch's
    ``scheduler.step()`` (its recursive form) applies ``factor`` at step 0 and, never
    reaching step ``total_iters`` again, never undoes it.

    Args:
      value: the learning rate.
      factor: the multiplier applied before ``total_iters``, in ``[0, 1]``.
      total_iters: the number of steps that use ``value * factor``.

    Returns:
      The schedule ``step -> lr``.

    Example:
      >>> from fnloop import optim
      >>> schedule = optim.constant_schedule(0.1, factor=0.5, total_iters=2)
      >>> [schedule(t) for t in range(4)]
      [0.05, 0.05, 0.1, 0.1]
    """
    _check_rate("value", value)
    _check_between("factor", factor, 0.0, 1.0, open_low=False)
    _check_int("total_iters", total_iters, 0)
    scaled = value * factor

    def schedule(step: float | torch.Tensor) -> float | torch.Tensor:
        if isinstance(step, torch.Tensor):
            step = _float_step(step)
            return torch.where(
                step < total_iters, torch.full_like(step, scaled), torch.full_like(step, value)
            )
        return float(scaled if step < total_iters else value)

    return schedule


def step_schedule(init_value: float, step_size: int, gamma: float = 0.1) -> Schedule:
    r"""Decays the learning rate by ``gamma`` every ``step_size`` steps.

    As ``torch.optim.lr_scheduler.StepLR``:

    .. math::
       \eta_t = \text{init\_value} \cdot \gamma^{\lfloor t / \text{step\_size} \rfloor}

    Args:
      init_value: the learning rate at step 0.
      step_size: the number of steps between two decays.
      gamma: the decay factor.

    Returns:
      The schedule ``step -> lr``.

    Example:
      >>> from fnloop import optim
      >>> schedule = optim.step_schedule(1.0, step_size=2, gamma=0.5)
      >>> [schedule(t) for t in range(5)]
      [1.0, 1.0, 0.5, 0.5, 0.25]
    """
    _check_rate("init_value", init_value)
    _check_int("step_size", step_size, 1)
    _check_positive("gamma", gamma)

    def schedule(step: float | torch.Tensor) -> float | torch.Tensor:
        if isinstance(step, torch.Tensor):
            step = _float_step(step)
            return init_value * torch.pow(gamma, torch.div(step, step_size, rounding_mode="floor"))
        return float(init_value * gamma ** (step // step_size))

    return schedule


def multistep_schedule(
    init_value: float, milestones: Sequence[int], gamma: float = 0.1
) -> Schedule:
    r"""Decays the learning rate by ``gamma`` at each milestone step.

    As ``torch.optim.lr_scheduler.MultiStepLR``: a milestone listed ``k`` times decays by
    ``gamma ** k``, and the order of ``milestones`` does not matter.

    .. math::
       \eta_t = \text{init\_value} \cdot \gamma^{\#\{m \in \text{milestones} : m \le t\}}

    Args:
      init_value: the learning rate before the first milestone.
      milestones: the steps at which to decay, non-negative integers.
      gamma: the decay factor.

    Returns:
      The schedule ``step -> lr``.

    Example:
      >>> from fnloop import optim
      >>> schedule = optim.multistep_schedule(1.0, milestones=[1, 3, 3], gamma=0.5)
      >>> [schedule(t) for t in range(5)]
      [1.0, 0.5, 0.5, 0.125, 0.125]
    """
    _check_rate("init_value", init_value)
    milestones = tuple(milestones)  # read once: an iterator would be empty the second time
    for i, milestone in enumerate(milestones):
        _check_int(f"milestones[{i}]", milestone, 0)
    _check_positive("gamma", gamma)
    bounds = tuple(sorted(int(m) for m in milestones))

    def schedule(step: float | torch.Tensor) -> float | torch.Tensor:
        if isinstance(step, torch.Tensor):
            step = _float_step(step)
            table = torch.tensor(bounds, dtype=step.dtype, device=step.device)
            passed = (step.unsqueeze(-1) >= table).sum(-1).to(step.dtype)
            return init_value * torch.pow(gamma, passed)
        return float(init_value * gamma ** bisect.bisect_right(bounds, step))

    return schedule


def exponential_schedule(init_value: float, gamma: float) -> Schedule:
    r"""Decays the learning rate by ``gamma`` every step.

    As ``torch.optim.lr_scheduler.ExponentialLR``:

    .. math::
       \eta_t = \text{init\_value} \cdot \gamma^t

    Args:
      init_value: the learning rate at step 0.
      gamma: the decay factor per step.

    Returns:
      The schedule ``step -> lr``.

    Example:
      >>> from fnloop import optim
      >>> schedule = optim.exponential_schedule(1.0, gamma=0.5)
      >>> [schedule(t) for t in range(4)]
      [1.0, 0.5, 0.25, 0.125]
    """
    _check_rate("init_value", init_value)
    _check_positive("gamma", gamma)

    def schedule(step: float | torch.Tensor) -> float | torch.Tensor:
        if isinstance(step, torch.Tensor):
            return init_value * torch.pow(gamma, _float_step(step))
        return float(init_value * gamma**step)

    return schedule


def cosine_schedule(init_value: float, t_max: int, eta_min: float = 0.0) -> Schedule:
    r"""Anneals the learning rate from ``init_value`` to ``eta_min`` along a half cosine.

    As ``torch.optim.lr_scheduler.CosineAnnealingLR`` (``T_max`` there), including what
    it does after ``t_max``: the cosine goes on, so the learning rate climbs back to
    ``init_value`` at ``2 * t_max``, falls to ``eta_min`` at ``3 * t_max``, and so on.
    Join it with a constant (:func:`join_schedules`) to stay at ``eta_min`` instead.

    .. math::
       \eta_t = \eta_{\min} + \tfrac{1}{2}(\text{init\_value} - \eta_{\min})
       \left(1 + \cos\frac{\pi t}{t_{\max}}\right)

    Args:
      init_value: the learning rate at step 0.
      t_max: the number of steps from ``init_value`` down to ``eta_min``.
      eta_min: the learning rate at step ``t_max``.

    Returns:
      The schedule ``step -> lr``.

    Example:
      >>> from fnloop import optim
      >>> schedule = optim.cosine_schedule(1.0, t_max=4)
      >>> [round(schedule(t), 4) for t in range(9)]
      [1.0, 0.8536, 0.5, 0.1464, 0.0, 0.1464, 0.5, 0.8536, 1.0]
    """
    _check_rate("init_value", init_value)
    _check_rate("eta_min", eta_min)
    _check_int("t_max", t_max, 1)

    def schedule(step: float | torch.Tensor) -> float | torch.Tensor:
        if isinstance(step, torch.Tensor):
            cos = torch.cos(math.pi * _float_step(step) / t_max)
            return eta_min + (init_value - eta_min) * (1 + cos) / 2
        return float(eta_min + (init_value - eta_min) * (1 + math.cos(math.pi * step / t_max)) / 2)

    return schedule


def linear_schedule(
    init_value: float,
    start_factor: float = 1.0 / 3,
    end_factor: float = 1.0,
    total_iters: int = 5,
) -> Schedule:
    r"""Moves the learning rate linearly from ``init_value`` times one factor to another.

    As ``torch.optim.lr_scheduler.LinearLR``; with ``end_factor=1`` it is the usual linear
    warm-up. After ``total_iters`` steps the learning rate stays at
    ``init_value * end_factor``.

    .. math::
       \eta_t = \text{init\_value} \left(s + (e - s)
       \frac{\min(t, \text{total\_iters})}{\text{total\_iters}}\right)

    Args:
      init_value: the learning rate the factors multiply.
      start_factor: :math:`s`, the factor at step 0, in ``(0, 1]``.
      end_factor: :math:`e`, the factor from step ``total_iters`` on, in ``[0, 1]``.
      total_iters: the number of steps the change takes, a positive integer.

    Returns:
      The schedule ``step -> lr``.

    Example:
      >>> from fnloop import optim
      >>> schedule = optim.linear_schedule(1.0, start_factor=0.25, total_iters=3)
      >>> [schedule(t) for t in range(5)]
      [0.25, 0.5, 0.75, 1.0, 1.0]
    """
    _check_rate("init_value", init_value)
    _check_between("start_factor", start_factor, 0.0, 1.0, open_low=True)
    _check_between("end_factor", end_factor, 0.0, 1.0, open_low=False)
    _check_int("total_iters", total_iters, 1)
    slope = end_factor - start_factor

    def schedule(step: float | torch.Tensor) -> float | torch.Tensor:
        if isinstance(step, torch.Tensor):
            progress = slope * torch.clamp(_float_step(step), max=total_iters) / total_iters
            return init_value * (start_factor + progress)
        return float(init_value * (start_factor + slope * min(total_iters, step) / total_iters))

    return schedule


def polynomial_schedule(init_value: float, total_iters: int = 5, power: float = 1.0) -> Schedule:
    r"""Decays the learning rate to 0 in ``total_iters`` steps along a polynomial.

    As ``torch.optim.lr_scheduler.PolynomialLR``; the learning rate stays 0 after
    ``total_iters``.

    .. math::
       \eta_t = \text{init\_value}
       \left(1 - \frac{\min(t, \text{total\_iters})}{\text{total\_iters}}\right)^{\text{power}}

    Args:
      init_value: the learning rate at step 0.
      total_iters: the number of steps to reach 0, a positive integer.
      power: the exponent, ``>= 0``.

    Returns:
      The schedule ``step -> lr``.

    Example:
      >>> from fnloop import optim
      >>> schedule = optim.polynomial_schedule(1.0, total_iters=4, power=2.0)
      >>> [schedule(t) for t in range(6)]
      [1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0]
    """
    _check_rate("init_value", init_value)
    _check_int("total_iters", total_iters, 1)
    if not power >= 0:
        raise ValueError(f"power must be >= 0; got power={power!r}.")

    def schedule(step: float | torch.Tensor) -> float | torch.Tensor:
        if isinstance(step, torch.Tensor):
            remaining = 1.0 - torch.clamp(_float_step(step), max=total_iters) / total_iters
            return init_value * remaining**power
        return float(init_value * (1.0 - min(total_iters, step) / total_iters) ** power)

    return schedule


def onecycle_schedule(
    max_lr: float,
    total_steps: int,
    pct_start: float = 0.3,
    anneal_strategy: Literal["cos", "linear"] = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> Schedule:
    r"""The 1cycle policy: warm up to ``max_lr``, then anneal far below the start.

    The learning rate of ``torch.optim.lr_scheduler.OneCycleLR`` (its momentum cycling is
    not part of a learning-rate schedule). With :math:`\eta_0 = \text{max\_lr} /
    \text{div\_factor}` and :math:`\eta_{\min} = \eta_0 / \text{final\_div\_factor}`, the
    phases are, with :math:`p = \text{pct\_start} \cdot \text{total\_steps}` and
    :math:`T = \text{total\_steps} - 1`:

    * two phases: :math:`\eta_0 \to \text{max\_lr}` over steps :math:`[0, p - 1]`, then
      :math:`\text{max\_lr} \to \eta_{\min}` over :math:`[p - 1, T]`;
    * ``three_phase``: :math:`\eta_0 \to \text{max\_lr}` over :math:`[0, p - 1]`,
      :math:`\text{max\_lr} \to \eta_0` over :math:`[p - 1, 2p - 2]`, then
      :math:`\eta_0 \to \eta_{\min}` over :math:`[2p - 2, T]`.

    Within a phase from :math:`a` to :math:`b` at fraction :math:`x` of the way, ``"cos"``
    gives :math:`b + \tfrac{1}{2}(a - b)(1 + \cos \pi x)` and ``"linear"``
    :math:`a + (b - a) x`. Torch raises past ``total_steps``; this schedule stays at its
    rate of step :math:`T` from there on. That is :math:`\eta_{\min}` unless step
    :math:`T` comes before the last phase, where torch gives it an earlier phase's rate, as
    here: ``max_lr`` with ``pct_start=1``, and with ``three_phase`` and
    :math:`2p - 2 \ge T` a rate on the way back down to :math:`\eta_0` (:math:`\eta_0`
    itself when :math:`2p - 2 = T`), never reaching :math:`\eta_{\min}`. Torch
    extrapolates the last phase one step further, to step ``total_steps``, a value no
    optimizer step uses.

    Args:
      max_lr: the peak learning rate.
      total_steps: the number of steps in the cycle, a positive integer.
      pct_start: the fraction of the cycle spent warming up, in ``[0, 1]``.
      anneal_strategy: ``"cos"`` or ``"linear"``.
      div_factor: the initial learning rate is ``max_lr / div_factor``.
      final_div_factor: the final learning rate is the initial one over this.
      three_phase: come back down to the initial learning rate symmetrically before the
        final annealing, as in the original paper.

    Returns:
      The schedule ``step -> lr``.

    Example:
      >>> from fnloop import optim
      >>> schedule = optim.onecycle_schedule(1.0, total_steps=10, pct_start=0.5)
      >>> [round(schedule(t), 4) for t in (0, 4, 9)]
      [0.04, 1.0, 0.0]
    """
    _check_rate("max_lr", max_lr)
    _check_int("total_steps", total_steps, 1)
    _check_between("pct_start", pct_start, 0.0, 1.0, open_low=False)
    if anneal_strategy not in ("cos", "linear"):
        raise ValueError(
            f"anneal_strategy must be 'cos' or 'linear'; got anneal_strategy={anneal_strategy!r}."
        )
    _check_positive("div_factor", div_factor)
    _check_positive("final_div_factor", final_div_factor)
    if pct_start * total_steps == 1:
        raise ValueError(
            _ONECYCLE_EMPTY_WARMUP.format(pct_start=pct_start, total_steps=total_steps)
        )

    initial_lr = max_lr / div_factor
    min_lr = initial_lr / final_div_factor
    warmup_end = float(pct_start * total_steps) - 1
    last_step = total_steps - 1
    if three_phase:
        ends_and_lrs = [
            (warmup_end, initial_lr, max_lr),
            (float(2 * pct_start * total_steps) - 2, max_lr, initial_lr),
            (last_step, initial_lr, min_lr),
        ]
    else:
        ends_and_lrs = [(warmup_end, initial_lr, max_lr), (last_step, max_lr, min_lr)]
    # (start step, end step, length, start lr, end lr) of each phase, in torch's float
    # arithmetic. A phase that a step can select has a non-zero length (checked above, and
    # the step is clamped to ``last_step``), so the 1.0 only keeps other branches finite.
    phases: list[tuple[float, float, float, float, float]] = []
    start = 0.0
    for end, start_lr, end_lr in ends_and_lrs:
        phases.append((start, end, (end - start) or 1.0, start_lr, end_lr))
        start = end
    cosine = anneal_strategy == "cos"

    def anneal_float(start_lr: float, end_lr: float, pct: float) -> float:
        if cosine:
            return end_lr + (start_lr - end_lr) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end_lr - start_lr) * pct + start_lr

    def anneal_tensor(start_lr: float, end_lr: float, pct: torch.Tensor) -> torch.Tensor:
        if cosine:
            return end_lr + (start_lr - end_lr) / 2.0 * (torch.cos(math.pi * pct) + 1)
        return (end_lr - start_lr) * pct + start_lr

    def schedule(step: float | torch.Tensor) -> float | torch.Tensor:
        if isinstance(step, torch.Tensor):
            t = torch.clamp(_float_step(step), max=last_step)
            start, _, length, start_lr, end_lr = phases[-1]
            lr = anneal_tensor(start_lr, end_lr, (t - start) / length)
            for start, end, length, start_lr, end_lr in reversed(phases[:-1]):
                in_phase = anneal_tensor(start_lr, end_lr, (t - start) / length)
                lr = torch.where(t <= end, in_phase, lr)
            return lr
        t_float = min(step, last_step)
        start, _, length, start_lr, end_lr = next(
            (phase for phase in phases if t_float <= phase[1]), phases[-1]
        )
        return float(anneal_float(start_lr, end_lr, (t_float - start) / length))

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    r"""Runs ``schedules`` one after the other, switching at the ``boundaries`` steps.

    As ``torch.optim.lr_scheduler.SequentialLR`` (``milestones`` there): from step
    ``boundaries[i]`` on, ``schedules[i + 1]`` is in charge and starts again from its own
    step 0.

    .. math::
       \eta_t = \text{schedules}[i](t - b_{i-1}), \quad
       i = \#\{j : b_j \le t\}, \quad b_{-1} = 0

    Args:
      schedules: the schedules, in order; at least one.
      boundaries: the steps at which each next schedule takes over; non-negative integers
        in non-decreasing order, one fewer than the schedules.

    Returns:
      The schedule ``step -> lr``.

    Example:
      >>> from fnloop import optim
      >>> warmup = optim.linear_schedule(1.0, start_factor=0.5, total_iters=2)
      >>> decay = optim.exponential_schedule(1.0, gamma=0.5)
      >>> schedule = optim.join_schedules([warmup, decay], boundaries=[2])
      >>> [schedule(t) for t in range(5)]
      [0.5, 0.75, 1.0, 0.5, 0.25]
    """
    schedules = tuple(schedules)
    boundaries = tuple(boundaries)
    if not schedules:
        raise ValueError("schedules must hold at least one schedule; got schedules=().")
    for i, schedule in enumerate(schedules):
        if isinstance(schedule, ReduceOnPlateau):
            raise ValueError(
                f"schedules[{i}] is a reduce_on_plateau rate, which join_schedules cannot "
                f"run: it follows the metrics fit feeds it, not the step count. Give the "
                f"optimizer the plateau rate itself (optim.adamw(optim.reduce_on_plateau("
                f"...))); a plateau does not join or follow other schedules."
            )
        if not callable(schedule):
            # The advice only for what constant_schedule takes, a real number.
            number = isinstance(schedule, numbers.Real) and not isinstance(schedule, bool)
            raise ValueError(
                f"schedules[{i}] must be a schedule (a callable step -> lr); got {schedule!r}"
                + (
                    f". Wrap a constant as constant_schedule({schedule!r})."
                    if number
                    else f" ({type(schedule).__name__})."
                )
            )
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            _JOIN_LENGTHS.format(n_schedules=len(schedules), boundaries=list(boundaries))
        )
    for i, boundary in enumerate(boundaries):
        _check_int(f"boundaries[{i}]", boundary, 0)
    if list(boundaries) != sorted(boundaries):
        raise ValueError(_JOIN_UNSORTED.format(boundaries=list(boundaries)))
    first, rest = schedules[0], schedules[1:]

    def joined(step: float | torch.Tensor) -> float | torch.Tensor:
        if isinstance(step, torch.Tensor):
            step = _float_step(step)
            lr = first(step)
            for boundary, schedule in zip(boundaries, rest, strict=True):
                # Clamped so a schedule not yet in charge never sees a negative step.
                local = torch.clamp(step - boundary, min=0)
                lr = torch.where(step >= boundary, schedule(local), lr)
            return lr
        i = bisect.bisect_right(boundaries, step)
        return schedules[i](step - boundaries[i - 1]) if i else first(step)

    return joined
