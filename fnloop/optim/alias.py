"""Optimizers with ``torch.optim``'s update rules: compositions of transforms, plus a fused
in-place step for the donating training step."""

from __future__ import annotations

import numbers

from fnloop import _tree
from fnloop.optim import _foreach
from fnloop.optim.base import (
    ApplyFn,
    GradientTransformation,
    chain,
    check_chain_state,
    check_no_state,
    check_state,
    flatten_like,
    identity,
)
from fnloop.optim.transform import (
    HostValues,
    LearningRate,
    TraceState,
    _learning_rate,
    adam_apply_,
    add_decayed_weights,
    check_adam_state,
    check_non_negative,
    rate_state_check,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rms,
    trace,
)
from fnloop.typing import OptState, Params, Updates


def sgd(
    learning_rate: LearningRate,
    *,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
) -> GradientTransformation:
    r"""Stochastic gradient descent, as ``torch.optim.SGD``.

    .. math::
       g_t \leftarrow g_t + \lambda \theta_{t-1}, \quad
       b_t = \mu b_{t-1} + (1 - \tau) g_t \ (b_1 = g_1), \quad
       \theta_t = \theta_{t-1} - \gamma \,(g_t + \mu b_t \text{ if nesterov else } b_t)

    Args:
      learning_rate: :math:`\gamma`, a number, 0-d tensor, schedule or plateau.
      momentum: :math:`\mu`; ``0`` disables momentum.
      nesterov: use Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
      weight_decay: :math:`\lambda`, L2 penalty added to the gradient.
      dampening: :math:`\tau`.

    Example:
      >>> import torch
      >>> from fnloop import optim
      >>> params = {"w": torch.tensor([1.0])}
      >>> tx = optim.sgd(0.1, momentum=0.9)
      >>> state = tx.init(params)
      >>> for _ in range(2):
      ...     updates, state = tx.update({"w": torch.tensor([1.0])}, state, params)
      ...     params = optim.apply_updates(params, updates)
      >>> params["w"]
      tensor([0.7100])
    """
    check_non_negative("momentum", momentum)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            f"Nesterov momentum requires a momentum and zero dampening; got "
            f"momentum={momentum}, dampening={dampening}."
        )
    tx = chain(
        add_decayed_weights(weight_decay),
        trace(momentum, dampening=dampening, nesterov=nesterov) if momentum > 0 else identity(),
        scale_by_learning_rate(learning_rate),
    )
    assert tx.apply_ is not None
    return tx._replace(
        apply_=_fused_sgd(
            learning_rate, momentum, dampening, nesterov, weight_decay, chained=tx.apply_
        )
    )


def _fused_sgd(
    learning_rate: LearningRate,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    *,
    chained: ApplyFn,
) -> ApplyFn:
    """``apply_`` of ``sgd``: one fused step on the chain's state tuple, the chain's own
    ``chained`` one while compiling or under ``vmap``.

    A constant learning rate is a Python number, read once from the state (see
    :class:`HostValues`); a schedule's or a plateau's stays a tensor, which torch's fused
    kernel reads itself.
    """
    _, advance = _learning_rate(learning_rate)
    check_rate = rate_state_check(learning_rate)
    constant_lr = isinstance(learning_rate, numbers.Real)
    counts, rates = HostValues(int), HostValues(float)

    def apply_(grads: Updates, state: OptState, params: Params) -> tuple[Params, OptState]:
        # The checks of the chain and its members' updates.
        check_chain_state(state, 3)
        trace_state, lr_state = state[1], state[2]
        check_no_state(state[0], "add_decayed_weights")
        if momentum > 0:
            check_state(trace_state, TraceState, "trace")
        else:
            check_no_state(trace_state, "identity")
        check_rate(lr_state)
        bufs = (trace_state.momentum_buffer,) if momentum > 0 else ()
        g, treedef, (p, *b) = flatten_like(grads, params, *bufs)
        if _foreach.batched(p):  # compiling or under vmap: tensors only
            return chained(grads, state, params)
        count = counts.value(trace_state.count) if momentum > 0 else 0
        # The state's own rate: unstacked states have theirs.
        lr = rates.value(lr_state.lr) if constant_lr else lr_state.lr
        if count is None or lr is None:
            return chained(grads, state, params)
        done = _foreach.sgd_(
            p,
            g,
            b[0] if momentum > 0 else None,
            first=count == 0,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
        )
        if not done:  # a tensor rate where the fused kernel does not run
            return chained(grads, state, params)
        if momentum > 0:
            trace_state = TraceState(
                count=trace_state.count + 1,
                momentum_buffer=_tree.tree_unflatten(treedef, b[0]),
            )
            counts.remember(trace_state.count, count + 1)
        new_params = _tree.tree_unflatten(treedef, p)
        return new_params, (state[0], trace_state, advance(lr_state))

    return apply_


def adam(
    learning_rate: LearningRate,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
) -> GradientTransformation:
    r"""Adam, as ``torch.optim.Adam`` (``weight_decay`` is an L2 penalty on the gradient).

    .. math::
       m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
       v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
       \theta_t = \theta_{t-1} - \gamma \frac{m_t / (1-\beta_1^t)}
                  {\sqrt{v_t} / \sqrt{1-\beta_2^t} + \epsilon}

    Args:
      learning_rate: :math:`\gamma`.
      b1: :math:`\beta_1`, in ``[0, 1)``.
      b2: :math:`\beta_2`, in ``[0, 1)``.
      eps: :math:`\epsilon`.
      weight_decay: L2 penalty added to the gradient (for decoupled decay use ``adamw``).
      amsgrad: use the running maximum of :math:`v_t`.

    Example:
      >>> import torch
      >>> from fnloop import optim
      >>> params = {"w": torch.tensor([1.0])}
      >>> tx = optim.adam(0.1)
      >>> updates, _ = tx.update({"w": torch.tensor([2.0])}, tx.init(params), params)
      >>> optim.apply_updates(params, updates)["w"]
      tensor([0.9000])
    """
    tx = chain(
        add_decayed_weights(weight_decay),
        scale_by_adam(b1, b2, eps, amsgrad=amsgrad),
        scale_by_learning_rate(learning_rate),
    )
    return tx._replace(
        apply_=_fused_adam(learning_rate, b1, b2, eps, weight_decay, amsgrad, decoupled=False)
    )


def adamw(
    learning_rate: LearningRate,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
) -> GradientTransformation:
    r"""AdamW, as ``torch.optim.AdamW``: Adam with decoupled weight decay.

    .. math::
       \theta_t = \theta_{t-1} - \gamma \left(\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}
                  + \lambda \theta_{t-1}\right)

    Args:
      learning_rate: :math:`\gamma`.
      b1: :math:`\beta_1`, in ``[0, 1)``.
      b2: :math:`\beta_2`, in ``[0, 1)``.
      eps: :math:`\epsilon`.
      weight_decay: :math:`\lambda`, applied to the weights, not the gradient.
      amsgrad: use the running maximum of :math:`v_t`.

    Example:
      >>> import torch
      >>> from fnloop import optim
      >>> params = {"w": torch.tensor([1.0])}
      >>> tx = optim.adamw(0.1, weight_decay=0.5)
      >>> updates, _ = tx.update({"w": torch.tensor([2.0])}, tx.init(params), params)
      >>> optim.apply_updates(params, updates)["w"]
      tensor([0.8500])
    """
    tx = chain(
        scale_by_adam(b1, b2, eps, amsgrad=amsgrad),
        add_decayed_weights(weight_decay),
        scale_by_learning_rate(learning_rate),
    )
    return tx._replace(
        apply_=_fused_adam(learning_rate, b1, b2, eps, weight_decay, amsgrad, decoupled=True)
    )


def _fused_adam(
    learning_rate: LearningRate,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    *,
    decoupled: bool,
) -> ApplyFn:
    """``apply_`` of ``adam`` / ``adamw``: one fused step on the chain's state tuple.

    A constant learning rate is a Python number, read once from the state (see
    :class:`HostValues`); so are the update counts where the step needs them on the host.
    """
    _, advance = _learning_rate(learning_rate)
    at = 0 if decoupled else 1  # where scale_by_adam sits in the chain
    check_rate = rate_state_check(learning_rate)
    constant_lr = isinstance(learning_rate, numbers.Real)
    counts, rates = HostValues(int), HostValues(float)

    def apply_(grads: Updates, state: OptState, params: Params) -> tuple[Params, OptState]:
        # The checks of the chain and its members' updates.
        check_chain_state(state, 3)
        adam_state, lr_state = state[at], state[2]
        check_no_state(state[1 - at], "add_decayed_weights")
        check_adam_state(adam_state, amsgrad)
        check_rate(lr_state)
        # The state's own rate (unstacked states have their own), on the host when it is
        # constant (the same tensor every step); a schedule's stays on the device.
        lr = rates.value(lr_state.lr) if constant_lr else None
        params, adam_state = adam_apply_(
            grads,
            adam_state,
            params,
            lr_state.lr if lr is None else lr,
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            decoupled=decoupled,
            amsgrad=amsgrad,
            counts=counts,
        )
        new_state = list(state)
        new_state[at], new_state[2] = adam_state, advance(lr_state)
        return params, tuple(new_state)

    return apply_


def rmsprop(
    learning_rate: LearningRate,
    *,
    alpha: float = 0.99,
    eps: float = 1e-8,
    momentum: float = 0.0,
    centered: bool = False,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    r"""RMSprop, as ``torch.optim.RMSprop``.

    .. math::
       s_t = \alpha s_{t-1} + (1-\alpha) g_t^2, \quad
       u_t = g_t / (\sqrt{s_t - \bar g_t^2 \,[\text{centered}]} + \epsilon), \quad
       b_t = \mu b_{t-1} + u_t, \quad \theta_t = \theta_{t-1} - \gamma b_t

    Args:
      learning_rate: :math:`\gamma`.
      alpha: smoothing constant :math:`\alpha`.
      eps: :math:`\epsilon`.
      momentum: :math:`\mu`; ``0`` disables momentum.
      centered: normalise by the estimated variance instead of the second moment.
      weight_decay: L2 penalty added to the gradient.

    Example:
      >>> import torch
      >>> from fnloop import optim
      >>> params = {"w": torch.tensor([1.0])}
      >>> tx = optim.rmsprop(0.01)
      >>> updates, _ = tx.update({"w": torch.tensor([1.0])}, tx.init(params), params)
      >>> optim.apply_updates(params, updates)["w"]
      tensor([0.9000])
    """
    check_non_negative("momentum", momentum)
    return chain(
        add_decayed_weights(weight_decay),
        scale_by_rms(alpha, eps, centered=centered),
        trace(momentum) if momentum > 0 else identity(),
        scale_by_learning_rate(learning_rate),
    )


def adagrad(
    learning_rate: LearningRate,
    *,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
) -> GradientTransformation:
    r"""Adagrad, as ``torch.optim.Adagrad``.

    .. math::
       s_t = s_{t-1} + g_t^2, \quad
       \theta_t = \theta_{t-1} - \frac{\gamma}{1 + (t-1)\eta}\,\frac{g_t}{\sqrt{s_t} + \epsilon}

    Args:
      learning_rate: :math:`\gamma`.
      lr_decay: :math:`\eta`.
      weight_decay: L2 penalty added to the gradient.
      initial_accumulator_value: the starting value of :math:`s`.
      eps: :math:`\epsilon`.

    Example:
      >>> import torch
      >>> from fnloop import optim
      >>> params = {"w": torch.tensor([1.0])}
      >>> tx = optim.adagrad(0.5)
      >>> updates, _ = tx.update({"w": torch.tensor([3.0])}, tx.init(params), params)
      >>> optim.apply_updates(params, updates)["w"]
      tensor([0.5000])
    """
    return chain(
        add_decayed_weights(weight_decay),
        scale_by_adagrad(
            eps, initial_accumulator_value=initial_accumulator_value, lr_decay=lr_decay
        ),
        scale_by_learning_rate(learning_rate),
    )
