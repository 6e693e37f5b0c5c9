"""The one place that calls torch's multi-tensor kernels (``torch._foreach_*`` and the
fused SGD / Adam / AdamW kernels).

Every function takes lists of tensors and returns a new list; inputs are never changed.
Functions whose names end in ``_`` write into their first argument and are only used on
lists that fnloop itself has just created.

``torch._foreach_*`` ops have no ``vmap`` batching rule, so under ``torch.func.vmap``
(detected from the tensors themselves) the same math runs one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._C import _functorch

Scalar = float | torch.Tensor
TensorList = list[torch.Tensor]


def batched(xs: Sequence[torch.Tensor]) -> bool:
    """True where foreach ops cannot run: inside ``torch.func.vmap``, and on an empty list
    (which they refuse; the per-tensor ops make an empty list of it).

    Also true while ``torch.compile`` traces: per-tensor ops trace on every torch version
    (the vmap check itself breaks the graph on some), work inside a compiled ``vmap``,
    and the compiler fuses them anyway.
    """
    if torch.compiler.is_compiling() or not xs:
        return True
    if _functorch.is_batchedtensor(xs[0]):
        return True
    # vmap over the batches only (in_dims=(None, 0)): a gradient that does not depend on
    # the batch (an unused parameter's zeros) is not batched, while the others are.
    return _functorch.maybe_current_level() is not None and any(
        _functorch.is_batchedtensor(x) for x in xs
    )


def _batched_any(xs: Sequence[torch.Tensor], ys: TensorList | Scalar) -> bool:
    """:func:`batched` for a list and a second operand that is a list or a scalar.

    A 0-d tensor scalar can be batched while the list is not (one learning rate per
    model, the same gradients for all), and foreach ops reject it then too. Also true
    for a scalar tensor that requires grad (a clipping factor or a learning rate being
    differentiated through): the backward of torch's foreach op with a tensor scalar
    fails for lists of more than one tensor ("inconsistent range for TensorList output").
    """
    if isinstance(ys, list):
        return batched(xs) or batched(ys)
    return batched(xs) or (
        isinstance(ys, torch.Tensor) and (ys.requires_grad or _functorch.is_batchedtensor(ys))
    )


def _keep_dtypes(xs: TensorList, out: TensorList, ys: TensorList | Scalar) -> TensorList:
    """Casts results back to their input's dtype after an op with a 0-d tensor scalar.

    A 0-d float32 tensor times a 0-d float64 scalar (a learning rate) is float64 by type
    promotion; torch.optim computes such updates in the parameter's dtype.
    """
    if not isinstance(ys, torch.Tensor):
        return out
    return [o if o.dtype == x.dtype else o.to(x.dtype) for x, o in zip(xs, out, strict=True)]


def _scaled(ys: TensorList, alpha: float) -> TensorList:
    """``alpha * y`` for each ``y``: what :func:`add` adds while ``torch.compile`` traces.

    Inductor (torch 2.13) fuses ``torch.add(x, y, alpha=a)`` whose ``x`` or ``y`` is a
    matmul's output (a linear layer's weight gradient) into an ``addmm`` that drops
    ``alpha``, so compiled steps would add ``y`` unscaled (a weight decay or momentum of
    1.0). Multiplying first is the same arithmetic as inductor's own lowering of ``alpha``.
    """
    return ys if alpha == 1.0 else [y * alpha for y in ys]


def add(xs: TensorList, ys: TensorList | Scalar, alpha: float = 1.0) -> TensorList:
    """``x + alpha * y`` for each pair (or ``x + y`` for a scalar ``y``)."""
    if isinstance(ys, list):
        if batched(xs) or batched(ys):
            if torch.compiler.is_compiling():
                return [x + y for x, y in zip(xs, _scaled(ys, alpha), strict=True)]
            return [torch.add(x, y, alpha=alpha) for x, y in zip(xs, ys, strict=True)]
        return list(torch._foreach_add(xs, ys, alpha=alpha))
    if isinstance(ys, torch.Tensor) or batched(xs):
        # CUDA's foreach add with a 0-d tensor reads it on the host: a sync.
        return _keep_dtypes(xs, [x + ys for x in xs], ys)
    return list(torch._foreach_add(xs, ys))


def add_(xs: TensorList, ys: TensorList | Scalar, alpha: float = 1.0) -> TensorList:
    """In-place :func:`add` into ``xs``."""
    if isinstance(ys, list):
        if batched(xs) or batched(ys):
            if torch.compiler.is_compiling():  # see _scaled
                return [x.add_(y) for x, y in zip(xs, _scaled(ys, alpha), strict=True)]
            return [x.add_(y, alpha=alpha) for x, y in zip(xs, ys, strict=True)]
        torch._foreach_add_(xs, ys, alpha=alpha)
        return xs
    if isinstance(ys, torch.Tensor) or batched(xs):
        # CUDA's foreach add with a 0-d tensor reads it on the host: a sync.
        return [x.add_(ys) for x in xs]
    torch._foreach_add_(xs, ys)
    return xs


def mul(xs: TensorList, ys: TensorList | Scalar) -> TensorList:
    """``x * y`` for each pair, or each ``x`` times a scalar."""
    if _batched_any(xs, ys):
        if isinstance(ys, list):
            return [x * y for x, y in zip(xs, ys, strict=True)]
        return _keep_dtypes(xs, [x * ys for x in xs], ys)
    return _keep_dtypes(xs, list(torch._foreach_mul(xs, ys)), ys)


def mul_(xs: TensorList, ys: TensorList | Scalar) -> TensorList:
    """In-place :func:`mul` into ``xs``."""
    if _batched_any(xs, ys):
        if isinstance(ys, list):
            return [x.mul_(y) for x, y in zip(xs, ys, strict=True)]
        return [x.mul_(ys) for x in xs]
    torch._foreach_mul_(xs, ys)
    return xs


def div(xs: TensorList, ys: TensorList | Scalar) -> TensorList:
    """``x / y`` for each pair, or each ``x`` divided by a scalar."""
    if _batched_any(xs, ys):
        if isinstance(ys, list):
            return [x / y for x, y in zip(xs, ys, strict=True)]
        return _keep_dtypes(xs, [x / ys for x in xs], ys)
    return _keep_dtypes(xs, list(torch._foreach_div(xs, ys)), ys)


def div_(xs: TensorList, ys: TensorList | Scalar) -> TensorList:
    """In-place :func:`div` into ``xs``."""
    if _batched_any(xs, ys):
        if isinstance(ys, list):
            return [x.div_(y) for x, y in zip(xs, ys, strict=True)]
        return [x.div_(ys) for x in xs]
    torch._foreach_div_(xs, ys)
    return xs


def addcmul(xs: TensorList, t1: TensorList, t2: TensorList, value: float = 1.0) -> TensorList:
    """``x + value * t1 * t2``."""
    if batched(xs) or batched(t1):
        return [torch.addcmul(x, a, b, value=value) for x, a, b in zip(xs, t1, t2, strict=True)]
    return list(torch._foreach_addcmul(xs, t1, t2, value=value))


def addcmul_(xs: TensorList, t1: TensorList, t2: TensorList, value: float = 1.0) -> TensorList:
    """In-place :func:`addcmul` into ``xs``; use the returned list.

    Under ``vmap`` the result is a new list (``addcmul_`` has no batching rule and its
    fallback loops over the batch), so callers must not rely on ``xs`` being written.
    """
    if batched(xs) or batched(t1):
        return [torch.addcmul(x, a, b, value=value) for x, a, b in zip(xs, t1, t2, strict=True)]
    torch._foreach_addcmul_(xs, t1, t2, value=value)
    return xs


def addcdiv_(xs: TensorList, t1: TensorList, t2: TensorList, value: float = 1.0) -> TensorList:
    """In-place :func:`addcdiv` into ``xs``; use the returned list (see :func:`addcmul_`)."""
    if batched(xs) or batched(t1):
        return [torch.addcdiv(x, a, b, value=value) for x, a, b in zip(xs, t1, t2, strict=True)]
    torch._foreach_addcdiv_(xs, t1, t2, value=value)
    return xs


def lerp(xs: TensorList, ys: TensorList, weight: float) -> TensorList:
    """``x + weight * (y - x)``."""
    if batched(xs) or batched(ys):
        return [torch.lerp(x, y, weight) for x, y in zip(xs, ys, strict=True)]
    return list(torch._foreach_lerp(xs, ys, weight))


def lerp_(xs: TensorList, ys: TensorList, weight: float) -> TensorList:
    """In-place :func:`lerp` into ``xs``; use the returned list."""
    if batched(xs) or batched(ys):
        return [torch.lerp(x, y, weight) for x, y in zip(xs, ys, strict=True)]
    torch._foreach_lerp_(xs, ys, weight)
    return xs


def sqrt(xs: TensorList) -> TensorList:
    """Element-wise square root."""
    if batched(xs):
        return [torch.sqrt(x) for x in xs]
    return list(torch._foreach_sqrt(xs))


def maximum(xs: TensorList, ys: TensorList) -> TensorList:
    """Element-wise maximum of each pair."""
    if batched(xs) or batched(ys):
        return [torch.maximum(x, y) for x, y in zip(xs, ys, strict=True)]
    return list(torch._foreach_maximum(xs, ys))


def maximum_(xs: TensorList, ys: TensorList) -> TensorList:
    """In-place :func:`maximum` into ``xs``; use the returned list."""
    if batched(xs) or batched(ys):
        return [torch.maximum(x, y) for x, y in zip(xs, ys, strict=True)]
    torch._foreach_maximum_(xs, ys)
    return xs


def clamp_(xs: TensorList, low: float, high: float) -> TensorList:
    """In-place :func:`clamp` into ``xs``; use the returned list."""
    if batched(xs):
        return [torch.clamp(x, low, high) for x in xs]
    torch._foreach_clamp_min_(xs, low)
    torch._foreach_clamp_max_(xs, high)
    return xs


def clamp(xs: TensorList, low: float, high: float) -> TensorList:
    """Element-wise clamp to ``[low, high]``."""
    if batched(xs):
        return [torch.clamp(x, low, high) for x in xs]
    return list(torch._foreach_clamp_max(torch._foreach_clamp_min(xs, low), high))


def norms(xs: TensorList) -> TensorList:
    """The 2-norm of each tensor (0-d tensors)."""
    if batched(xs):
        return [torch.linalg.vector_norm(x) for x in xs]
    return list(torch._foreach_norm(xs))


def global_norm(xs: TensorList) -> torch.Tensor:
    """The 2-norm of all tensors together, as ``torch.nn.utils.clip_grad_norm_`` computes it
    (0 for no tensor)."""
    if not xs:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms(xs)))


def copy_(dst: TensorList, src: TensorList) -> TensorList:
    """Copies ``src`` into ``dst`` (used only when a caller donated ``dst``)."""
    if batched(dst) or batched(src):
        return [d.copy_(s) for d, s in zip(dst, src, strict=True)]
    torch._foreach_copy_(dst, src)
    return dst


def where(cond: torch.Tensor, xs: TensorList, ys: TensorList) -> TensorList:
    """``torch.where(cond, x, y)`` for each pair, with one 0-d boolean ``cond``.

    There is no foreach ``where``; under ``torch.compile`` these fuse into one kernel.
    """
    return [torch.where(cond, x, y) for x, y in zip(xs, ys, strict=True)]


_FLAT_MAX_MEAN_NUMEL = 16384


def flat(xs: TensorList) -> torch.Tensor | None:
    """The one 1-D tensor that ``xs`` tile back to back, or ``None``.

    ``TrainState.clone`` lays each group of tensors (params, EMA, each optimizer buffer)
    out this way; one op on the whole then replaces a foreach op over many small ones.
    """
    if len(xs) < 2:
        return None
    first = xs[0]
    dtype, size, ptr, total = first.dtype, first.element_size(), first.data_ptr(), 0
    storage = first.untyped_storage()
    for x in xs:
        # Adjacent addresses are not enough: separate allocations can sit back to back
        # (CUDA's caching allocator does that), and one view may not span two storages.
        if (
            x.dtype != dtype
            or x.data_ptr() != ptr + total * size
            or not x.is_contiguous()
            or x.untyped_storage().data_ptr() != storage.data_ptr()
        ):
            return None
        total += x.numel()
    if ptr + total * size > storage.data_ptr() + storage.nbytes():
        return None
    return first.as_strided((total,), (1,))


def _flat_lists(grads: TensorList, *groups: TensorList | None) -> list[TensorList | None] | None:
    """``[grads, *groups]`` as one-tensor lists when every group is flat (grads are joined).

    Only for small tensors: joining the gradients costs a pass over them, which pays
    only while the per-tensor overhead saved (about 1.5 us per tensor and op on a CPU)
    is larger, below about 16K values per tensor on average.
    """
    if sum(g.numel() for g in grads) > _FLAT_MAX_MEAN_NUMEL * len(grads):
        return None
    flats = [flat(g) if g is not None else None for g in groups]
    if any(f is None for f, g in zip(flats, groups, strict=True) if g is not None):
        return None
    joined = torch.cat([g.reshape(-1) for g in grads])
    return [[joined], *([f] if f is not None else None for f in flats)]


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (of one shape) place each element at the same offset."""
    sa, sb = a.stride(), b.stride()
    return sa == sb or all(x == y for x, y, n in zip(sa, sb, a.shape, strict=True) if n > 1)


def dense(x: torch.Tensor) -> bool:
    """Whether ``x``'s elements fill ``x.numel()`` adjacent memory slots, one each (in any
    order of dimensions: a transposed or channels-last tensor is dense, a column slice or
    an expanded tensor is not)."""
    if x.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(x.stride(), x.shape, strict=True) if n > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _fusable(params: TensorList, *others: TensorList | None) -> bool:
    """True where torch's fused optimizer kernels run: eager dense tensors (see
    :func:`dense`) of one floating dtype on one CPU or CUDA device, and ``others``
    (gradients, optimizer buffers) laid out like ``params`` (the kernels walk
    ``numel()`` slots from each tensor's first element and pair elements by memory
    position). Elsewhere the foreach ops below do the work."""
    if not params or batched(params) or not hasattr(torch, "_fused_adamw_"):
        return False  # (torch's private kernels: if a release drops them, foreach it is)
    dtype, device = params[0].dtype, params[0].device
    if not dtype.is_floating_point or device.type not in ("cpu", "cuda"):
        return False
    strides = []
    for p in params:
        if p.device != device or p.dtype != dtype or not dense(p):
            return False
        strides.append(p.stride())
    # Strides may differ only along dimensions of size 1.
    return all(
        ts is None
        or [t.stride() for t in ts] == strides
        or all(same_layout(t, p) for t, p in zip(ts, params, strict=True))
        for ts in others
    )


def fused_adam_(
    params: TensorList,
    grads: TensorList,
    mu: TensorList,
    nu: TensorList,
    nu_max: TensorList | None,
    *,
    step: torch.Tensor,
    lr: float | torch.Tensor,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> bool:
    """One Adam / AdamW step by torch's fused kernel (``torch.optim.Adam(fused=True)``'s).

    One pass over each tensor instead of eight foreach passes, and no host scalars: the
    kernel reads ``step`` (this update's number, a 0-d tensor) and ``lr`` itself. Runs
    only on eager tensors of one floating dtype on one CPU or CUDA device, and returns
    whether it ran; the results then equal ``torch.optim`` with ``fused=True`` bit for
    bit.
    """
    if not _fusable(params, grads, mu, nu, nu_max):
        return False
    if params[0].is_cuda:
        # The CUDA kernel reads the step count and a tensor learning rate as float32 on
        # the device (torch.optim keeps them so for fused=True): a device-side cast.
        step = step.to(params[0].device, torch.float32)
        if isinstance(lr, torch.Tensor):
            lr = lr.to(device=params[0].device, dtype=torch.float32)
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    kernel(
        params,
        grads,
        mu,
        nu,
        nu_max if nu_max is not None else [],
        [step] * len(params),
        lr=lr,
        beta1=b1,
        beta2=b2,
        weight_decay=weight_decay,
        eps=eps,
        amsgrad=nu_max is not None,
        maximize=False,
    )
    return True


@torch.no_grad()  # as torch.optim's step: params that require grad are written too
def adam_(
    params: TensorList,
    grads: TensorList,
    mu: TensorList,
    nu: TensorList,
    nu_max: TensorList | None,
    *,
    step: int,
    lr: float | torch.Tensor,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> None:
    """One Adam / AdamW step with Python scalars, in place, in ``torch.optim``'s foreach order.

    ``step`` counts this update (1 for the first); ``lr`` may be a 0-d tensor (a
    schedule's), which then stays on the device. Writes ``params``, ``mu``, ``nu`` and
    ``nu_max`` (amsgrad); ``grads`` are consumed. Eager and unbatched only (callers
    check): the checks of the per-op helpers above would cost more than the math here.
    Groups laid out back to back (see :func:`flat`) are updated as single tensors.
    """
    lists = _flat_lists(grads, params, mu, nu, nu_max)
    if lists is not None:
        grads, params, mu, nu, nu_max = lists  # type: ignore[assignment]
    if weight_decay != 0:
        if decoupled:
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        else:
            torch._foreach_add_(grads, params, alpha=weight_decay)
    torch._foreach_lerp_(mu, grads, 1.0 - b1)
    torch._foreach_mul_(nu, b2)
    torch._foreach_addcmul_(nu, grads, grads, value=1.0 - b2)
    if nu_max is not None:
        torch._foreach_maximum_(nu_max, nu)
    denom = torch._foreach_sqrt(nu_max if nu_max is not None else nu)
    torch._foreach_div_(denom, (1.0 - b2**step) ** 0.5)
    torch._foreach_add_(denom, eps)
    if isinstance(lr, torch.Tensor):  # fold -lr / bc1 into denom: no host read of lr
        torch._foreach_div_(denom, lr * (-1.0 / (1.0 - b1**step)))
        torch._foreach_addcdiv_(params, mu, denom)
    else:
        torch._foreach_addcdiv_(params, mu, denom, value=-lr / (1.0 - b1**step))


def _half_on_cpu(x: torch.Tensor) -> bool:
    """True for a float16 or bfloat16 CPU tensor, whose updates torch's CPU fused SGD
    kernel skips but for the last few elements (every full SIMD block; torch 2.13,
    pytorch/pytorch#191763)."""
    return x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16)


def sgd_(
    params: TensorList,
    grads: TensorList,
    bufs: TensorList | None,
    *,
    first: bool,
    lr: float | torch.Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
) -> bool:
    """One SGD step, in place, as ``torch.optim`` takes it; returns whether it ran.

    ``bufs`` are the momentum buffers (``None`` without momentum); ``first`` marks the
    first update, which copies the gradient into them. ``grads`` are consumed. Eager and
    unbatched only, like :func:`adam_`. On a CPU or CUDA device this is torch's fused
    kernel (bit for bit ``torch.optim.SGD(fused=True)``), which also takes ``lr`` as a
    0-d tensor (a schedule's); elsewhere, and for float16 and bfloat16 on the CPU,
    torch's foreach order (bit for bit ``foreach=True``) with a number ``lr``, and a
    tensor one does not run.
    """
    if _fusable(params, grads, bufs) and not _half_on_cpu(params[0]):
        if isinstance(lr, torch.Tensor) and params[0].is_cuda:
            # As for Adam: the CUDA kernel reads a tensor rate as float32 on the device.
            lr = lr.to(device=params[0].device, dtype=torch.float32)
        torch._fused_sgd_(
            params,
            grads,
            bufs if bufs is not None else [],
            weight_decay=weight_decay,
            momentum=momentum,
            lr=lr,
            dampening=dampening,
            nesterov=nesterov,
            maximize=False,
            is_first_step=first and bufs is not None,  # (CUDA warns otherwise)
        )
        return True
    if isinstance(lr, torch.Tensor):
        return False
    _sgd_foreach_(params, grads, bufs, first, lr, weight_decay, momentum, dampening, nesterov)
    return True


@torch.no_grad()  # as torch.optim's step: params that require grad are written too
def _sgd_foreach_(
    params: TensorList,
    grads: TensorList,
    bufs: TensorList | None,
    first: bool,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
) -> None:
    """The foreach half of :func:`sgd_`: torch's foreach order, with a number ``lr``."""
    lists = _flat_lists(grads, params, bufs)
    if lists is not None:
        grads, params, bufs = lists  # type: ignore[assignment]
    if weight_decay != 0:
        torch._foreach_add_(grads, params, alpha=weight_decay)
    step = grads
    if bufs is not None:
        if first:
            torch._foreach_copy_(bufs, grads)
        else:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads, alpha=1.0 - dampening)
        if nesterov:
            torch._foreach_add_(grads, bufs, alpha=momentum)
        else:
            step = bufs
    torch._foreach_add_(params, step, alpha=-lr)
