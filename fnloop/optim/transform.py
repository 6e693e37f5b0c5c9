"""Gradient transformations: the building blocks that ``alias`` composes into optimizers.

Each transformation is a state ``NamedTuple`` plus a factory returning a
:class:`GradientTransformation`. All tensor math goes through ``_foreach``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeAlias, TypedDict

import optree
import torch
from torch._C import _functorch

from fnloop import _tree
from fnloop.optim import _foreach
from fnloop.optim.base import (
    STATE_MSG,
    GradientTransformation,
    InitFn,
    check_no_state,
    check_state,
    flatten_like,
    map_flat,
    no_state,
    scalar_dtype,
    with_inplace,
)
from fnloop.optim.plateau import ReduceOnPlateau, ReduceOnPlateauState
from fnloop.typing import OptState, Params, Schedule, Updates


def _first_leaf(tree: Any) -> torch.Tensor:
    leaves = _tree.tree_leaves(tree)
    if not leaves:
        raise ValueError("cannot build an optimizer state for an empty parameter tree")
    return leaves[0]


def _count(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=like.device)


def _as_float(count: torch.Tensor) -> torch.Tensor:
    return count.to(scalar_dtype(count.device))


def _power(base: float, t: torch.Tensor) -> torch.Tensor:
    """``base ** t`` for a 0-d tensor ``t``, written as ``exp(t * log(base))``.

    Same value to a few ulps, but inductor's CPU code computes a ``pow`` of a 0-d tensor
    again in every vector iteration of each kernel that reads it (5 ms per step on a
    1.9M-parameter Adam), while an ``exp`` used by several kernels is computed once.
    """
    log_base = math.log(base) if base > 0 else -math.inf
    return torch.exp(t * log_base)


LEARNING_RATE_TYPE_MSG = (
    "learning_rate must be a number, a 0-d tensor, a schedule (a function of the update "
    "count, such as fnloop.optim.step_schedule(...) or cosine_schedule(...)) or "
    "fnloop.optim.reduce_on_plateau(...); got {kind}. torch.optim.lr_scheduler objects "
    "drive a torch optimizer; use the matching fnloop.optim schedule (StepLR -> "
    "step_schedule, CosineAnnealingLR -> cosine_schedule, ReduceLROnPlateau -> "
    "reduce_on_plateau, ...)."
)


def check_real(params: Params, optimizer: str) -> None:
    """Raises ``ValueError`` for complex parameters, which ``optimizer``'s second moments
    would square as complex numbers (torch takes ``view_as_real``)."""
    if any(isinstance(p, torch.Tensor) and p.is_complex() for p in _tree.tree_leaves(params)):
        raise ValueError(
            f"{optimizer} does not take complex parameters. Keep them real: register "
            f"torch.view_as_real(p) as the parameter and torch.view_as_complex it in forward, "
            f"or use sgd."
        )


def check_floating(params: Params) -> None:
    """Raises ``ValueError`` naming a parameter that is neither a floating-point nor a
    complex tensor: an integer or bool tensor has no gradient (torch.optim leaves it
    alone, and its fused kernels refuse it), and fnloop's updates failed on it in torch."""
    leaves = _tree.tree_leaves(params)
    if all(not isinstance(p, torch.Tensor) or p.is_floating_point() for p in leaves):
        return
    keys, leaves, _ = _tree.tree_flatten_with_keys(params)
    for key, p in zip(keys, leaves, strict=True):
        if isinstance(p, torch.Tensor) and not (p.is_floating_point() or p.is_complex()):
            raise ValueError(NOT_FLOATING_MSG.format(key=key, dtype=p.dtype))


NOT_FLOATING_MSG = (
    "the parameter {key!r} is a {dtype} tensor; optimizers update floating-point (or "
    "complex) tensors, the only ones with gradients. Leave integer and bool tensors out "
    "of the params: buffers such as BatchNorm's num_batches_tracked, which "
    "model.state_dict() holds, belong in TrainState.buffers (TrainState.create puts them "
    "there)."
)


def check_non_negative(name: str, value: float | torch.Tensor) -> None:
    """Raises ``ValueError`` as torch does when a hyper-parameter is negative (or NaN).

    A tensor is read once, here, when the optimizer is made; inside ``vmap`` or while
    compiling it is not checked.
    """
    if isinstance(value, torch.Tensor):
        if torch.compiler.is_compiling() or _functorch.is_batchedtensor(value):
            return
        if not bool((value >= 0).all()):
            raise ValueError(f"Invalid {name}: {value} ({name} must be >= 0)")
        return
    if not value >= 0.0:
        raise ValueError(f"Invalid {name}: {value} ({name} must be >= 0)")


def check_unit_interval(name: str, value: float) -> None:
    """Raises ``ValueError`` unless ``0 <= value < 1``."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value} ({name} must be in [0, 1))")


# --------------------------------------------------------------------------- clipping


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scales the updates so their global 2-norm is at most ``max_norm``.

    Same math as ``torch.nn.utils.clip_grad_norm_``: the factor is
    ``min(1, max_norm / (norm + 1e-6))``, computed on the device (no host sync).

    >>> import torch
    >>> from fnloop import optim
    >>> tx = optim.clip_by_global_norm(1.0)
    >>> u, _ = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(None))
    >>> u["w"]
    tensor([0.6000, 0.8000])
    """
    check_non_negative("max_norm", max_norm)

    def update(
        updates: Updates, state: OptState, params: Params | None, inplace: bool
    ) -> tuple[Updates, OptState]:
        del params
        check_no_state(state, "clip_by_global_norm")
        mul = _foreach.mul_ if inplace else _foreach.mul

        def clip_leaves(leaves: list[torch.Tensor]) -> list[torch.Tensor]:
            norm = _foreach.global_norm(leaves)
            factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            return mul(leaves, factor)

        return map_flat(clip_leaves, updates), state

    return with_inplace(no_state, update)


def clip(max_value: float) -> GradientTransformation:
    """Clamps every update element to ``[-max_value, max_value]``.

    Same math as ``torch.nn.utils.clip_grad_value_``.

    >>> import torch
    >>> from fnloop import optim
    >>> optim.clip(0.5).update({"w": torch.tensor([2.0, -0.1])}, ())[0]["w"]
    tensor([ 0.5000, -0.1000])
    """
    check_non_negative("max_value", max_value)

    def update(
        updates: Updates, state: OptState, params: Params | None, inplace: bool
    ) -> tuple[Updates, OptState]:
        del params
        check_no_state(state, "clip")
        clamp = _foreach.clamp_ if inplace else _foreach.clamp
        return map_flat(lambda xs: clamp(xs, -max_value, max_value), updates), state

    return with_inplace(no_state, update)


# --------------------------------------------------------------------------- generic


def add_decayed_weights(weight_decay: float) -> GradientTransformation:
    """Adds ``weight_decay * params`` to the updates.

    Placed before an optimizer's scaling this is torch's L2 ``weight_decay``; placed
    after it (as in ``adamw``) it is decoupled weight decay.
    """
    check_non_negative("weight_decay", weight_decay)

    def update(
        updates: Updates, state: OptState, params: Params | None, inplace: bool
    ) -> tuple[Updates, OptState]:
        check_no_state(state, "add_decayed_weights")
        if weight_decay == 0:
            return updates, state
        if params is None:
            raise ValueError("add_decayed_weights needs params: call update(grads, state, params)")
        add = _foreach.add_ if inplace else _foreach.add
        return map_flat(lambda us, ps: add(us, ps, alpha=weight_decay), updates, params), state

    return with_inplace(no_state, update)


class ScaleByLearningRateState(NamedTuple):
    """State of :func:`scale_by_learning_rate`.

    Attributes:
      count: updates applied so far.
      lr: the learning rate the next update will use (a 0-d tensor, so each of several
        stacked models can have its own).
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as optax's do
    lr: torch.Tensor


LearningRate: TypeAlias = float | torch.Tensor | Schedule | ReduceOnPlateau
"""A learning rate: a number, a 0-d tensor, a schedule ``step -> lr`` or ``reduce_on_plateau``."""


def _learning_rate(
    learning_rate: LearningRate,
) -> tuple[InitFn, Callable[[Any], Any]]:
    """``init(params)`` and ``advance(state)`` (the state after one update) of a learning rate.

    The state holds the rate the next update will use in its ``lr`` field.
    """
    if isinstance(learning_rate, ReduceOnPlateau):
        plateau = learning_rate

        def plateau_init(params: Params) -> ReduceOnPlateauState:
            check_floating(params)
            return plateau.init(_first_leaf(params).device)

        return plateau_init, lambda state: state  # only fit's metric observations change it

    schedule = learning_rate if callable(learning_rate) else None
    if schedule is None:
        if isinstance(learning_rate, bool) or not isinstance(
            learning_rate, numbers.Real | torch.Tensor
        ):
            raise TypeError(LEARNING_RATE_TYPE_MSG.format(kind=type(learning_rate).__name__))
        if isinstance(learning_rate, torch.Tensor):
            if learning_rate.numel() != 1:
                raise ValueError(
                    f"a tensor learning rate holds one number; got shape "
                    f"{tuple(learning_rate.shape)}."
                )
            learning_rate = learning_rate.reshape(())
        else:
            learning_rate = float(learning_rate)
        check_non_negative("learning_rate", learning_rate)

    def lr_at(count: torch.Tensor) -> torch.Tensor:
        value = schedule(_as_float(count)) if schedule is not None else learning_rate
        return torch.as_tensor(value, dtype=scalar_dtype(count.device), device=count.device)

    def init_fn(params: Params) -> ScaleByLearningRateState:
        check_floating(params)
        count = _count(_first_leaf(params))
        return ScaleByLearningRateState(count=count, lr=lr_at(count))

    def advance(state: ScaleByLearningRateState) -> ScaleByLearningRateState:
        count = state.count + 1
        return ScaleByLearningRateState(
            count=count, lr=state.lr if schedule is None else lr_at(count)
        )

    return init_fn, advance


def rate_state_check(learning_rate: LearningRate) -> Callable[[OptState], None]:
    """The check of a learning-rate state: a ``ReduceOnPlateauState`` for
    ``reduce_on_plateau``, a ``ScaleByLearningRateState`` for the other rates."""
    if isinstance(learning_rate, ReduceOnPlateau):
        expected: type = ReduceOnPlateauState
        name = "scale_by_learning_rate(reduce_on_plateau(...))"
    else:
        expected, name = ScaleByLearningRateState, "scale_by_learning_rate"
    return lambda state: check_state(state, expected, name)


def scale_by_learning_rate(
    learning_rate: LearningRate,
    *,
    flip_sign: bool = True,
) -> GradientTransformation:
    """Multiplies the updates by ``-learning_rate`` (or ``+`` with ``flip_sign=False``).

    Args:
      learning_rate: a number, a 0-d tensor, a schedule ``step -> lr`` (called with a
        0-d float64 tensor step and written with torch ops), or
        ``optim.reduce_on_plateau(...)``.
      flip_sign: negate, so that ``apply_updates`` descends.

    The learning rate the next update will use is kept in the state's ``lr`` field;
    :func:`fnloop.optim.learning_rates` reads it.
    """
    init_fn, advance = _learning_rate(learning_rate)
    check_rate = rate_state_check(learning_rate)
    sign = -1.0 if flip_sign else 1.0

    def update(
        updates: Updates, state: OptState, params: Params | None, inplace: bool
    ) -> tuple[Updates, OptState]:
        del params
        check_rate(state)
        mul = _foreach.mul_ if inplace else _foreach.mul
        factor = state.lr * sign
        return map_flat(lambda us: mul(us, factor), updates), advance(state)

    return with_inplace(init_fn, update)


def scale(factor: float) -> GradientTransformation:
    """Multiplies the updates by a constant ``factor``."""

    def update(
        updates: Updates, state: OptState, params: Params | None, inplace: bool
    ) -> tuple[Updates, OptState]:
        del params
        check_no_state(state, "scale")
        mul = _foreach.mul_ if inplace else _foreach.mul
        return map_flat(lambda us: mul(us, factor), updates), state

    return with_inplace(no_state, update)


# --------------------------------------------------------------------------- SGD momentum


class TraceState(NamedTuple):
    """State of :func:`trace`: the update count and the momentum buffer."""

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as optax's do
    momentum_buffer: Updates


def trace(
    momentum: float, *, dampening: float = 0.0, nesterov: bool = False
) -> GradientTransformation:
    """Momentum as in ``torch.optim.SGD``.

    ``buf = momentum * buf + (1 - dampening) * g`` (``buf = g`` on the first step), then
    ``g + momentum * buf`` with ``nesterov`` or ``buf`` without.
    """
    check_non_negative("momentum", momentum)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def init_fn(params: Params) -> TraceState:
        check_floating(params)
        return TraceState(
            count=_count(_first_leaf(params)),
            momentum_buffer=_tree.tree_map(torch.zeros_like, params),
        )

    def update(
        updates: Updates, state: OptState, params: Params | None, inplace: bool
    ) -> tuple[Updates, OptState]:
        del params
        check_state(state, TraceState, "trace")
        grads, treedef, (bufs,) = flatten_like(updates, state.momentum_buffer)
        if dampening != 0.0:
            # torch copies the gradient into the buffer on the first step (no dampening).
            first = state.count == 0
            one = torch.ones((), dtype=scalar_dtype(first.device), device=first.device)
            coef = torch.where(first, one, one * (1.0 - dampening))
            scaled = _foreach.mul_(grads, coef) if inplace else _foreach.mul(grads, coef)
            bufs = _foreach.mul_(bufs, momentum) if inplace else _foreach.mul(bufs, momentum)
            new_bufs = _foreach.add_(bufs, scaled)
        elif inplace:
            new_bufs = _foreach.add_(_foreach.mul_(bufs, momentum), grads)
        else:
            new_bufs = _foreach.add(grads, bufs, alpha=momentum)  # one pass: g + m * buf
        if nesterov:
            add = _foreach.add_ if inplace else _foreach.add
            out = add(grads, new_bufs, alpha=momentum)
        else:
            # In place, later transforms scale the updates in place: they must not be the
            # momentum buffer itself.
            out = _foreach.copy_(grads, new_bufs) if inplace else new_bufs
        return _tree.tree_unflatten(treedef, out), TraceState(
            count=state.count + 1, momentum_buffer=_tree.tree_unflatten(treedef, new_bufs)
        )

    return with_inplace(init_fn, update)


# --------------------------------------------------------------------------- Adam


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`: count, first and second moments (and their max).

    Without ``amsgrad``, ``nu_max`` is ``()``: an empty subtree, which (unlike ``None``)
    ``torch.utils._pytree`` and so ``torch.func.vmap`` do not treat as a leaf.
    """

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as optax's do
    mu: Updates
    nu: Updates
    nu_max: Updates


def _is_empty(tree: Any) -> bool:
    return isinstance(tree, tuple) and not tree


def _check_option_state(
    state: OptState, kind: type, field: str, option: str, on: bool, transform: str
) -> None:
    """Raises ``ValueError`` unless ``state`` is a ``kind`` whose ``field`` is filled
    exactly when ``option`` is ``on`` (as ``transform``'s init makes it)."""
    if isinstance(state, kind) and _is_empty(getattr(state, field)) != on:
        return
    name = f"{transform} with {option}={on}"
    check_state(state, kind, name)
    got = f"a {kind.__name__} made with {option}={not on}"
    expected = f"one {'with' if on else 'without'} {field}"
    raise ValueError(STATE_MSG.format(name=name, got=got, expected=expected))


def check_adam_state(state: OptState, amsgrad: bool) -> None:
    """Raises ``ValueError`` unless ``state`` is what ``scale_by_adam(amsgrad=amsgrad)``'s
    init makes (a ``ScaleByAdamState`` with ``nu_max`` exactly when ``amsgrad``)."""
    transform = "scale_by_adam (adam, adamw)"
    _check_option_state(state, ScaleByAdamState, "nu_max", "amsgrad", amsgrad, transform)


def scale_by_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, amsgrad: bool = False
) -> GradientTransformation:
    """Adam's bias-corrected moment scaling, in ``torch.optim.Adam``'s operation order.

    ``m / (1 - b1^t) / (sqrt(v) / sqrt(1 - b2^t) + eps)``, with ``v`` replaced by its
    running maximum when ``amsgrad``.
    """
    check_unit_interval("b1", b1)
    check_unit_interval("b2", b2)
    check_non_negative("eps", eps)

    def init_fn(params: Params) -> ScaleByAdamState:
        check_floating(params)
        check_real(params, "scale_by_adam (adam, adamw)")
        return ScaleByAdamState(
            count=_count(_first_leaf(params)),
            mu=_tree.tree_map(torch.zeros_like, params),
            nu=_tree.tree_map(torch.zeros_like, params),
            nu_max=_tree.tree_map(torch.zeros_like, params) if amsgrad else (),
        )

    def update(
        updates: Updates, state: OptState, params: Params | None, inplace: bool
    ) -> tuple[Updates, OptState]:
        del params
        check_adam_state(state, amsgrad)
        if amsgrad:
            grads, treedef, (mu, nu, nu_max) = flatten_like(
                updates, state.mu, state.nu, state.nu_max
            )
        else:
            grads, treedef, (mu, nu) = flatten_like(updates, state.mu, state.nu)
        count = state.count + 1
        t = _as_float(count)
        bc1 = 1.0 - _power(b1, t)
        bc2_sqrt = torch.sqrt(1.0 - _power(b2, t))
        if inplace:
            mu = _foreach.lerp_(mu, grads, 1.0 - b1)
            nu = _foreach.addcmul_(_foreach.mul_(nu, b2), grads, grads, value=1.0 - b2)
            if amsgrad:
                nu_max = _foreach.maximum_(nu_max, nu)
        else:
            mu = _foreach.lerp(mu, grads, 1.0 - b1)
            nu = _foreach.addcmul_(_foreach.mul(nu, b2), grads, grads, value=1.0 - b2)
            if amsgrad:
                nu_max = _foreach.maximum(nu_max, nu)
        # torch's order: m / bc1 / (sqrt(v) / sqrt(bc2) + eps). eps stays a Python number:
        # a foreach add of a 0-d tensor would read it on the host. Pure, sqrt's result is
        # not overwritten: its backward reads it (autograd, torch.func through updates).
        div = _foreach.div_ if inplace else _foreach.div
        denom = _foreach.add_(div(_foreach.sqrt(nu_max if amsgrad else nu), bc2_sqrt), eps)
        if inplace:
            out = _foreach.div_(_foreach.copy_(grads, mu), denom)
        else:
            out = _foreach.div(mu, denom)
        out = _foreach.mul_(out, 1.0 / bc1)

        def unflat(xs: list[torch.Tensor]) -> Updates:
            return _tree.tree_unflatten(treedef, xs)

        return unflat(out), ScaleByAdamState(
            count=count,
            mu=unflat(mu),
            nu=unflat(nu),
            nu_max=unflat(nu_max) if amsgrad else (),
        )

    return with_inplace(init_fn, update)


class HostValues:
    """Host-side copies of 0-d tensors of optimizer states (update counts, learning rates).

    With them a fused step computes its per-step scalars (bias corrections, step size) as
    Python numbers and passes them to foreach kernels, as ``torch.optim`` does, instead of
    running a dozen 0-d tensor ops. It never reads the device in steady state: a tensor
    is read once (``int(t)`` or ``float(t)``) when it is met for the first time (the
    first step, a state loaded from a checkpoint, a constant rate set anew by
    :func:`with_learning_rates`); a count the step makes is recorded with :meth:`remember`
    instead, and a constant learning rate is the same tensor from step to step (a
    schedule's or a plateau's rate is not read: it stays a tensor). Several states may share
    one optimizer (two models, one transform in two parameter groups, unstacked states
    with their own learning rates): each live tensor has its own entry, dropped when the
    tensor is freed. A tensor made under ``torch.inference_mode`` has no version counter
    to tell a value written in place from the old: it is read every time.
    """

    def __init__(self, kind: type[int] | type[float]) -> None:
        self._kind = kind
        self._known: dict[int, tuple[weakref.ref[torch.Tensor], int, Any]] = {}

    def value(self, t: torch.Tensor) -> Any:
        """The value of ``t``, or ``None`` where it must stay a tensor (compile, vmap)."""
        if torch.compiler.is_compiling() or _functorch.is_batchedtensor(t):
            return None
        if t.is_inference():  # (made under torch.inference_mode: no version counter)
            return self._kind(t)
        entry = self._known.get(id(t))
        # The version counter tells a value written in place (lr.fill_(...)) from the old.
        if entry is not None and entry[0]() is t and entry[1] == t._version:
            return entry[2]
        value = self._kind(t)
        self.remember(t, value)
        return value

    def remember(self, t: torch.Tensor, value: Any) -> None:
        """Records that ``t`` (a tensor the caller just made) holds ``value``."""
        if t.is_inference():  # read again each time: see value
            return
        key = id(t)
        known = self._known

        def forget(ref: weakref.ref[torch.Tensor]) -> None:
            if known.get(key, (None,))[0] is ref:
                del known[key]

        known[key] = (weakref.ref(t, forget), t._version, value)


class _AdamScalars(TypedDict):
    """The keyword arguments that ``adam_apply_`` passes to each of its Adam kernels."""

    lr: torch.Tensor | float
    b1: float
    b2: float
    eps: float
    weight_decay: float
    decoupled: bool


def adam_apply_(
    grads: Updates,
    state: ScaleByAdamState,
    params: Params,
    lr: torch.Tensor | float,
    *,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    amsgrad: bool,
    counts: HostValues,
) -> tuple[Params, ScaleByAdamState]:
    """One Adam (or, with ``decoupled``, AdamW) step written into ``params`` and ``state``.

    The fused form of ``scale_by_adam`` + weight decay + ``scale_by_learning_rate`` +
    ``apply_updates_``; ``grads`` are consumed (written into). Eager CPU and CUDA tensors
    take torch's fused kernel (bit for bit ``torch.optim``'s ``fused=True``). Elsewhere, with
    the update count on the host (from ``counts``), it runs ``torch.optim``'s foreach
    operation order with Python scalars (bit for bit ``foreach=True`` with a float
    ``lr``); under ``torch.compile`` and ``vmap``, its sync-free order with 0-d tensors.
    """
    trees = (params, state.mu, state.nu, *((state.nu_max,) if amsgrad else ()))
    g, treedef, (p, mu, nu, *nu_max) = flatten_like(grads, *trees)
    count = state.count + 1
    lists = (p, g, mu, nu, nu_max[0] if amsgrad else None)
    scalars = _AdamScalars(
        lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, decoupled=decoupled
    )
    done = _foreach.fused_adam_(*lists, step=count, **scalars)
    if not done:
        host = counts.value(state.count)
        if host is not None:
            _foreach.adam_(*lists, step=host + 1, **scalars)
            counts.remember(count, host + 1)
            done = True
    if not done:
        if weight_decay != 0:
            if decoupled:
                p = _foreach.mul_(p, 1.0 - lr * weight_decay)
            else:
                g = _foreach.add_(g, p, alpha=weight_decay)
        mu = _foreach.lerp_(mu, g, 1.0 - b1)
        nu = _foreach.addcmul_(_foreach.mul_(nu, b2), g, g, value=1.0 - b2)
        if amsgrad:
            nu_max = [_foreach.maximum_(nu_max[0], nu)]
        t = _as_float(count)
        denom = _foreach.sqrt(nu_max[0] if amsgrad else nu)
        denom = _foreach.add_(_foreach.div_(denom, torch.sqrt(1.0 - _power(b2, t))), eps)
        # p - lr / bc1 * m / denom, with the step size folded into denom (no host read).
        denom = _foreach.div_(denom, lr / (_power(b1, t) - 1.0))
        p = _foreach.addcdiv_(p, mu, denom)

    def unflat(xs: list[torch.Tensor]) -> Updates:
        return _tree.tree_unflatten(treedef, xs)

    return unflat(p), ScaleByAdamState(
        count=count,
        mu=unflat(mu),
        nu=unflat(nu),
        nu_max=unflat(nu_max[0]) if amsgrad else (),
    )


# --------------------------------------------------------------------------- RMSprop


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms`: squared-gradient average (and gradient average).

    Without ``centered``, ``grad_avg`` is ``()`` (an empty subtree, not a ``None`` leaf).
    """

    square_avg: Updates
    grad_avg: Updates


def _check_rms_state(state: OptState, centered: bool) -> None:
    """As :func:`check_adam_state`, for ``scale_by_rms(centered=centered)``."""
    transform = "scale_by_rms (rmsprop)"
    _check_option_state(state, ScaleByRmsState, "grad_avg", "centered", centered, transform)


def scale_by_rms(
    alpha: float = 0.99, eps: float = 1e-8, *, centered: bool = False
) -> GradientTransformation:
    """RMSprop's scaling ``g / (sqrt(E[g^2] - centered * E[g]^2) + eps)`` as in torch."""
    check_non_negative("alpha", alpha)
    check_non_negative("eps", eps)

    def init_fn(params: Params) -> ScaleByRmsState:
        check_floating(params)
        check_real(params, "RMSprop")
        return ScaleByRmsState(
            square_avg=_tree.tree_map(torch.zeros_like, params),
            grad_avg=_tree.tree_map(torch.zeros_like, params) if centered else (),
        )

    def update(
        updates: Updates, state: OptState, params: Params | None, inplace: bool
    ) -> tuple[Updates, OptState]:
        del params
        _check_rms_state(state, centered)
        if centered:
            grads, treedef, (sq, gavg) = flatten_like(updates, state.square_avg, state.grad_avg)
        else:
            grads, treedef, (sq,) = flatten_like(updates, state.square_avg)
        sq = _foreach.mul_(sq, alpha) if inplace else _foreach.mul(sq, alpha)
        sq = _foreach.addcmul_(sq, grads, grads, value=1.0 - alpha)
        if centered:
            lerp = _foreach.lerp_ if inplace else _foreach.lerp
            gavg = lerp(gavg, grads, 1.0 - alpha)
            avg = _foreach.sqrt(_foreach.addcmul(sq, gavg, gavg, value=-1.0))
        else:
            avg = _foreach.sqrt(sq)
        avg = (_foreach.add_ if inplace else _foreach.add)(avg, eps)  # sqrt's backward reads it
        out = _foreach.div_(grads, avg) if inplace else _foreach.div(grads, avg)

        def unflat(xs: list[torch.Tensor]) -> Updates:
            return _tree.tree_unflatten(treedef, xs)

        return unflat(out), ScaleByRmsState(
            square_avg=unflat(sq), grad_avg=unflat(gavg) if centered else ()
        )

    return with_inplace(init_fn, update)


# --------------------------------------------------------------------------- Adagrad


class ScaleByAdagradState(NamedTuple):
    """State of :func:`scale_by_adagrad`: update count and the sum of squared gradients."""

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as optax's do
    sum_of_squares: Updates


def scale_by_adagrad(
    eps: float = 1e-10, *, initial_accumulator_value: float = 0.0, lr_decay: float = 0.0
) -> GradientTransformation:
    """Adagrad's scaling ``g / (sqrt(sum g^2) + eps) / (1 + (t - 1) * lr_decay)`` as in torch."""
    check_non_negative("eps", eps)
    check_non_negative("initial_accumulator_value", initial_accumulator_value)
    check_non_negative("lr_decay", lr_decay)

    def init_fn(params: Params) -> ScaleByAdagradState:
        check_floating(params)
        check_real(params, "Adagrad")
        return ScaleByAdagradState(
            count=_count(_first_leaf(params)),
            sum_of_squares=_tree.tree_map(
                lambda p: torch.full_like(p, initial_accumulator_value), params
            ),
        )

    def update(
        updates: Updates, state: OptState, params: Params | None, inplace: bool
    ) -> tuple[Updates, OptState]:
        del params
        check_state(state, ScaleByAdagradState, "scale_by_adagrad (adagrad)")
        grads, treedef, (acc,) = flatten_like(updates, state.sum_of_squares)
        acc = (_foreach.addcmul_ if inplace else _foreach.addcmul)(acc, grads, grads)
        std = (_foreach.add_ if inplace else _foreach.add)(_foreach.sqrt(acc), eps)
        out = _foreach.div_(grads, std) if inplace else _foreach.div(grads, std)
        if lr_decay != 0.0:
            decay = 1.0 + _as_float(state.count) * lr_decay
            out = _foreach.div_(out, decay)

        def unflat(xs: list[torch.Tensor]) -> Updates:
            return _tree.tree_unflatten(treedef, xs)

        return unflat(out), ScaleByAdagradState(count=state.count + 1, sum_of_squares=unflat(acc))

    return with_inplace(init_fn, update)


def learning_rates(opt_state: OptState) -> list[torch.Tensor]:
    """The learning rates the next update will use, one per learning-rate transform.

    A plain optimizer has one; a partitioned one (several parameter groups) has one per
    group, in the order they appear in the state. Each is a 0-d tensor on the state's
    device, float64 (float32 on MPS), or for a stacked state a 1-d one with an entry per
    model: ``float(lr)`` reads a 0-d one, which waits for the device. They are the
    state's own tensors, as a state's parameters are: read them, but do not write into
    them (``lr.fill_(...)``, as torch's schedulers do to a tensor ``group["lr"]``, would
    change the state); :func:`with_learning_rates` makes a state with other rates.

    >>> import torch
    >>> from fnloop import optim
    >>> state = optim.adam(1e-3).init({"w": torch.zeros(1)})
    >>> [float(lr) for lr in optim.learning_rates(state)]
    [0.001]
    """

    return [n.lr for n in _rate_nodes(opt_state)[0] if _is_rate(n)]


def _is_rate(node: Any) -> bool:
    return isinstance(node, ScaleByLearningRateState | ReduceOnPlateauState)


def _rate_nodes(opt_state: OptState) -> tuple[list[Any], Any]:
    """The nodes of ``opt_state`` down to the learning-rate states, and its tree structure."""
    # optree sorts dict keys; a partition's groups are listed in the order it was given.
    with optree.dict_insertion_ordered(True, namespace=_tree.NAMESPACE):
        return optree.tree_flatten(opt_state, is_leaf=_is_rate, namespace=_tree.NAMESPACE)


def with_learning_rates(
    opt_state: OptState, rates: float | torch.Tensor | Sequence[float | torch.Tensor]
) -> OptState:
    """``opt_state`` with the learning rates the next update will use set to ``rates``.

    The functional form of ``for g in opt.param_groups: g["lr"] = rate``: to go on with
    another rate from a trained or resumed state, moments and update counts kept. A
    constant rate stays at the new value, a ``reduce_on_plateau`` rate until its next
    reduction; a schedule gives the rates after the next update from the update count
    (change the schedule, ``tx``, to change those).

    Args:
      opt_state: an optimizer state (``state.opt_state``).
      rates: one rate for every learning-rate transform, or one per transform in the
        order :func:`learning_rates` lists them (one per ``partition`` group). For a
        stacked state a rate may also be a 1-d tensor with an entry per model.

    Returns:
      The new optimizer state; ``opt_state`` is unchanged.

    Raises:
      ValueError: ``opt_state`` has no learning rate, ``rates`` has another length
        than :func:`learning_rates`, or a rate is negative or of another shape.
      TypeError: a rate is neither a number nor a tensor.

    >>> import torch
    >>> from fnloop import optim
    >>> opt_state = optim.adam(1e-3).init({"w": torch.zeros(1)})
    >>> [float(lr) for lr in optim.learning_rates(optim.with_learning_rates(opt_state, 1e-4))]
    [0.0001]
    """
    leaves, treedef = _rate_nodes(opt_state)
    positions = [i for i, node in enumerate(leaves) if _is_rate(node)]
    if not positions:
        raise ValueError(
            "with_learning_rates: this optimizer state holds no learning rate (an "
            "optimizer such as optim.adamw(lr) has one; optim.learning_rates lists them)."
        )
    if isinstance(rates, Sequence) and not isinstance(rates, str):
        values = list(rates)
    else:
        values = [rates] * len(positions)
    if len(values) != len(positions):
        raise ValueError(
            f"with_learning_rates: the optimizer state has {len(positions)} learning rates "
            f"(one per parameter group, as optim.learning_rates lists them); got "
            f"{len(values)}. Pass one rate for all, or one per group."
        )
    leaves = list(leaves)
    for i, value in zip(positions, values):
        old = leaves[i].lr
        if isinstance(value, bool) or not isinstance(value, numbers.Real | torch.Tensor):
            raise TypeError(
                f"with_learning_rates takes numbers or tensors; got a {type(value).__name__}."
            )
        lr = torch.as_tensor(value, dtype=old.dtype, device=old.device)
        if lr.shape not in (torch.Size(), old.shape):
            raise ValueError(
                f"with_learning_rates: a rate is a number or a 0-d tensor (a 1-d one with "
                f"an entry per model for a stacked state of shape {tuple(old.shape)}); got "
                f"shape {tuple(lr.shape)}."
            )
        check_non_negative("learning_rate", lr)
        lr = lr.expand(old.shape).clone()
        node = leaves[i]
        leaves[i] = (
            node._replace(lr=lr)
            if isinstance(node, ScaleByLearningRateState)
            else dataclasses.replace(node, lr=lr)
        )
    return optree.tree_unflatten(treedef, leaves)
