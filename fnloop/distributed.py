"""Data-parallel training with ``torch.distributed`` (launched by ``torchrun``).

fnloop wraps nothing: when the default process group is initialized with more than one
process, every train step averages its gradients (and floating-point and complex buffers, such as
BatchNorm statistics) over the processes before clipping and the optimizer, so every
process holds the same state; ``fit`` averages the epoch metrics over the processes and
only rank 0 writes logs, checkpoints and plots. These helpers are what they use.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, TypeVar

import torch

from fnloop import _tree
from fnloop.state import StateT, with_runtime_fields
from fnloop.typing import Params

VMAP_MSG = (
    "torch.distributed is initialized with {world} processes, and a train step averages "
    "its gradients over them, which it cannot do under torch.func.vmap. Train stacked "
    "states in a single process, or one model per process without vmap."
)


T = TypeVar("T")


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """The number of processes in the default ``torch.distributed`` group (1 outside one).

    >>> world_size()
    1
    """
    return int(torch.distributed.get_world_size()) if _initialized() else 1


def rank() -> int:
    """This process's rank in the default ``torch.distributed`` group (0 outside one).

    >>> rank()
    0
    """
    return int(torch.distributed.get_rank()) if _initialized() else 0


def is_main_process() -> bool:
    """Whether this process writes files and logs: rank 0, or any single process."""
    return rank() == 0


def broadcast_state(state: StateT) -> StateT:
    """Rank 0's state in every process: its tensors (one broadcast per dtype and device),
    its leaves that are not tensors (a float field of a subclass), its step, epoch and
    micro-step counters, history and EMA decay; a collective call.

    Data parallelism needs the same starting state everywhere, as
    ``DistributedDataParallel`` makes it when it wraps a module: ``fit`` calls this on
    start; call it in your own loop before the first step (a state only rank 0 loaded
    from a checkpoint reaches every process, with its open accumulation window and fp16
    loss scale). Outside a distributed run it returns ``state``.

    Raises:
      ValueError: in every process, when a process's state is not shaped as rank 0's
        (another model or optimizer, EMA in some processes only): build the same state
        everywhere.
    """
    if world_size() == 1:
        return state
    paths, leaves, _ = _tree.tree_flatten_with_keys(state)
    # The fields a step creates as it runs (an open accumulation window, the fp16 loss
    # scale) may be in rank 0's state alone, loaded from a checkpoint: they are made here.
    runtime = {
        p: (leaf.dtype, tuple(leaf.shape))
        for p, leaf in zip(paths, leaves)
        if p.startswith(_RUNTIME)
    }
    layout = [(p, _describe(leaf)) for p, leaf in zip(paths, leaves) if not p.startswith(_RUNTIME)]
    static = (state.step, state.epoch, state.micro_step, state.history, state.ema_decay)
    # Indexed as in every process's state once the runtime fields are made (all tensors).
    plain = {i: leaf for i, leaf in enumerate(leaves) if not isinstance(leaf, torch.Tensor)}
    everyone = gather((layout, (runtime, static, plain) if rank() == 0 else None))
    for other, (their_layout, _) in enumerate(everyone[1:], start=1):
        if their_layout != everyone[0][0]:
            raise ValueError(
                f"broadcast_state: process {other}'s state is not shaped as rank 0's: "
                f"{_layout_difference(everyone[0][0], their_layout)}. Every process must "
                f"build the same state (the same module, tx and ema_decay) before rank 0's "
                f"values can be copied into it."
            )
    sent = everyone[0][1]
    assert sent is not None  # rank 0's own
    (runtime, static, plain) = sent
    state = with_runtime_fields(state, runtime)
    leaves, treedef = _tree.tree_flatten(state)
    named = {str(i): leaf for i, leaf in enumerate(leaves) if i not in plain}
    out = _reduce(named, lambda flat: torch.distributed.broadcast(flat, src=0))
    leaves = [plain[i] if i in plain else out[str(i)] for i in range(len(leaves))]
    state = _tree.tree_unflatten(treedef, leaves)
    step, epoch, micro_step, history, ema_decay = static
    return state.replace(
        step=step, epoch=epoch, micro_step=micro_step, history=history, ema_decay=ema_decay
    )


_RUNTIME = ("grad_accum.", "loss_scale.")


def _describe(leaf: Any) -> str:
    if isinstance(leaf, torch.Tensor):
        return f"{leaf.dtype} {tuple(leaf.shape)}".replace("torch.", "")
    return type(leaf).__name__


def _layout_difference(first: list[tuple[str, str]], other: list[tuple[str, str]]) -> str:
    """The first entry where two ``(path, description)`` lists differ, in words."""
    mine, theirs = dict(first), dict(other)
    for path, what in first:
        if path not in theirs:
            return f"rank 0 has {path!r} ({what}), it has not"
        if theirs[path] != what:
            return f"{path!r} is {what} on rank 0 and {theirs[path]} there"
    extra = next((path for path, _ in other if path not in mine), None)
    if extra is None:
        return "it holds the same entries in another order"
    return f"it has {extra!r}, rank 0 has not"


def mean_over_processes(tensors: Params) -> Params:
    """Each tensor averaged over the processes of the default group: one all-reduce per
    dtype and device.

    The inputs are not changed. Contiguous results are views of one reduced buffer per
    dtype and device; others (channels-last, say) keep their memory format.
    """
    world = world_size()
    if world == 1:
        return dict(tensors)

    def mean(flat: torch.Tensor) -> None:
        flat.div_(world)  # first, as DistributedDataParallel does: a sum cannot overflow
        torch.distributed.all_reduce(flat)

    return _reduce(tensors, mean)


def true_everywhere(flag: torch.Tensor) -> torch.Tensor:
    """Whether the bool tensor ``flag`` is true in every process of the default group,
    element by element (one all-reduce; stays on the device); a collective call. Outside
    a distributed run, ``flag``."""
    if world_size() == 1:
        return flag
    t = flag.to(collective_device(flag), torch.int32)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return t.to(flag.device, torch.bool)


def mean_grads_and_buffers(
    grads: Params,
    buffers: Params,
    frozen: Collection[str],
    *,
    kept: Params | None = None,
    extra: Params | None = None,
) -> tuple[Params, Params, Params | None, Params]:
    """Data parallelism: gradients and floating-point or complex buffers (running
    statistics; not the ``frozen`` parameters among them, which are the same everywhere)
    averaged over the processes, in one collective; also the buffers ``kept`` if a skipped
    update falls back to them (each process's own after the micro-batches of an
    accumulation window), and the tensors ``extra`` (a train step's loss, so every process
    decides alike).

    Returns ``(grads, buffers, kept, extra)``; the averaged buffers own their memory.
    """
    floats = [
        n
        for n, b in buffers.items()
        if (b.is_floating_point() or b.is_complex()) and n not in frozen
    ]
    mean = mean_over_processes(
        {
            **{f"grad/{n}": g for n, g in grads.items()},
            **{f"buffer/{n}": buffers[n] for n in floats},
            **({f"kept/{n}": kept[n] for n in floats} if kept is not None else {}),
            **{f"extra/{n}": t for n, t in (extra or {}).items()},
        }
    )
    grads = {n: mean[f"grad/{n}"] for n in grads}
    # Copies: views would keep the whole reduced buffer (the gradients too) alive.
    buffers = {**buffers, **{n: mean[f"buffer/{n}"].clone() for n in floats}}
    if kept is not None:
        kept = {**kept, **{n: mean[f"kept/{n}"].clone() for n in floats}}
    return grads, buffers, kept, {n: mean[f"extra/{n}"] for n in extra or {}}


def _reduce(tensors: Params, op: Callable[[torch.Tensor], None]) -> Params:
    """``op`` (a collective, in place) on one buffer per dtype and device holding
    ``tensors``; the results have the inputs' shapes (and memory formats)."""
    groups: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for name, t in tensors.items():
        groups.setdefault((t.dtype, t.device), []).append(name)
    out: Params = {}
    for names in groups.values():
        first = tensors[names[0]]
        flat = torch.cat([tensors[n].reshape(-1) for n in names]).to(collective_device(first))
        op(flat)
        flat = flat.to(first.device)
        for name, chunk in zip(names, flat.split([tensors[n].numel() for n in names])):
            like = tensors[name]
            if like.is_contiguous():
                out[name] = chunk.view(like.shape)
            else:
                out[name] = torch.empty_like(like).copy_(chunk.view(like.shape))
    return out


def collective_device(t: torch.Tensor) -> torch.device:
    """Where the default group can reduce ``t``: its own device, except CPU tensors under
    a NCCL-only group, which go to this process's CUDA device."""
    if t.device.type == "cpu" and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def gather(obj: T) -> list[T]:
    """Every process's ``obj`` (picklable, tensors on the CPU), in rank order; a
    collective call. Outside a distributed run, ``[obj]``.

    >>> gather({"a": 1})
    [{'a': 1}]
    """
    world = world_size()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Waits for every process of the default group (nothing outside a distributed run)."""
    if world_size() > 1:
        torch.distributed.barrier()
