"""One process of a data-parallel run, launched by ``torchrun`` from test_distributed.py.

Usage: torchrun --standalone --nproc_per_node=2 ddp_job.py OUT_DIR [--compile]

Each rank trains on its half of every global batch and saves what it ended with to
``OUT_DIR/rank{r}.pt``; the test compares those with single-process runs on the whole
global batches (``reference`` below, also used by the test).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import fnloop as fl
from fnloop import optim
from fnloop.distributed import broadcast_state
from fnloop.fit import _window_mean

GLOBAL_BATCH = 16
STEPS = 6


def classify(model: Any, batch: Any) -> dict[str, torch.Tensor]:
    x, y = batch
    logits = model(x)
    return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).double().mean()}


def data(n: int = STEPS * GLOBAL_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def with_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).double()


def tx() -> optim.GradientTransformation:
    return optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2))


def steps(part: slice, nan_at: int | None = None) -> fl.TrainState:
    """Clipping, AdamW, accumulation over 2 micro-batches, the skip policy; ``part`` picks
    this process's rows of every global micro-batch; a NaN is put in the rows of step
    ``nan_at`` (in one process only, for the distributed run)."""
    x, y = data()
    state = fl.TrainState.create(mlp(), tx=tx())
    step = fl.make_train_step(classify, accumulation_steps=2, on_nonfinite="skip")
    for i in range(STEPS):
        rows = slice(i * GLOBAL_BATCH, (i + 1) * GLOBAL_BATCH)
        xb, yb = x[rows][part].clone(), y[rows][part]
        if i == nan_at:
            xb[0, 0] = float("nan")
        state, _ = step(state, (xb, yb))
    return state


def own_memory(tensors: dict[str, torch.Tensor]) -> bool:
    return all(
        t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors.values()
    )


def skip_with_bn(rank: int, world: int, nan_at: int = 3) -> tuple[fl.TrainState, fl.TrainState]:
    """BatchNorm, accumulation over 2, the skip policy, a NaN in rank 1's half of
    micro-batch ``nan_at`` (3 closes the second window, 2 opens it): the states after the
    first window (an update) and after the second (skipped)."""
    x, y = data()
    state = fl.TrainState.create(with_bn(), tx=tx())
    step = fl.make_train_step(classify, accumulation_steps=2, on_nonfinite="skip")
    states = []
    for i in range(4):
        rows = slice(i * GLOBAL_BATCH, (i + 1) * GLOBAL_BATCH)
        xb, yb = x[rows][rank::world].clone(), y[rows][rank::world]
        if i == nan_at and rank == 1:
            xb[0, 0] = float("nan")
        state, _ = step(state, (xb, yb))
        states.append(state)
    return states[1], states[3]


def refit(world: int, rank: int) -> tuple[dict, dict]:
    """One fit of 2 epochs, and fit(max_epochs=1) then fit(max_epochs=2): accumulation
    over 3 with 4 batches per epoch leaves a window open between the two calls."""
    x, y = data()
    ds = TensorDataset(x[:64], y[:64])
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(ds, batch_size=GLOBAL_BATCH // world, sampler=sampler)
    step = fl.make_train_step(classify, accumulation_steps=3)

    def go(state: fl.TrainState, epochs: int) -> fl.TrainState:
        return fl.fit(state, step, loader, max_epochs=epochs, log_to_console=False, progress=False)

    one = go(fl.TrainState.create(mlp(), tx=tx()), 2)
    two = go(go(fl.TrainState.create(mlp(), tx=tx()), 1), 2)
    return one.state_dict(), two.state_dict()


def fit(
    out_dir: Path | None, world: int, rank: int, module: nn.Module, given: list | None = None
) -> fl.TrainState:
    """Three epochs of ``fit`` with a shuffling DistributedSampler (``world=1``: the same
    global batches in one process); with a list as ``given``, ``fit`` trains the state it
    appends there with ``donate=True``."""
    x, y = data()

    def loader(rows: slice) -> DataLoader:
        ds = TensorDataset(x[rows], y[rows])
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=3)
        return DataLoader(ds, batch_size=GLOBAL_BATCH // world, sampler=sampler)

    state = fl.TrainState.create(module, tx=tx())
    if given is not None:
        given.append(state)
    return fl.fit(
        state,
        classify,
        {"train": loader(slice(0, 64)), "valid": loader(slice(64, 96))},
        max_epochs=3,
        out_dir=out_dir,
        log_to_console=False,
        progress=False,
        donate=given is not None,
    )


def unequal_validation(world: int, rank: int) -> dict[str, tuple[float, ...]]:
    """The validation history of two epochs with every process validating its own share
    of 33 examples, without repeats: 17 and 16, in 5 and 4 batches (``world=1``: all 33
    in one process)."""
    x, y = data(64 + 33)
    train = TensorDataset(x[:64], y[:64])
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=3)
    share = torch.utils.data.Subset(TensorDataset(x[64:], y[64:]), range(rank, 33, world))
    state = fl.fit(
        fl.TrainState.create(mlp(), tx=tx()),
        classify,
        {
            "train": DataLoader(train, batch_size=GLOBAL_BATCH // world, sampler=sampler),
            "valid": DataLoader(share, batch_size=4),
        },
        max_epochs=2,
        log_to_console=False,
        progress=False,
    )
    return dict(state.history["valid"])


class Crash(Exception):
    pass


class CrashAt(fl.callbacks.Callback):
    """Raises after batch ``batch_idx`` of epoch ``epoch`` (1-based), in every process."""

    def __init__(self, epoch: int, batch_idx: int) -> None:
        self.at = (epoch, batch_idx)

    def on_train_batch_end(self, state: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (state.epoch + 1, batch_idx) == self.at:
            raise Crash


def resumable(
    out_dir: Path,
    world: int,
    rank: int,
    crash_at: tuple[int, int] | None = None,
    max_epochs: int = 3,
):
    """Dropout drawn from each process's own generator (seeded by rank), accumulation over
    3 micro-batches (a window is open at every epoch end), a checkpoint after every update."""
    x, y = data()
    torch.manual_seed(0)
    module = nn.Sequential(
        # No bias before BatchNorm: its true gradient is 0 and Adam magnifies rounding.
        nn.Linear(6, 16, bias=False),
        nn.BatchNorm1d(16),
        nn.Tanh(),
        nn.Dropout(0.3),
        nn.Linear(16, 3),
    )
    torch.manual_seed(100 + rank)
    ds = TensorDataset(x[:64], y[:64])
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=3)
    return fl.fit(
        fl.TrainState.create(module.double(), tx=tx()),
        fl.make_train_step(classify, accumulation_steps=3),
        DataLoader(ds, batch_size=GLOBAL_BATCH // world, sampler=sampler),
        max_epochs=max_epochs,
        out_dir=out_dir,
        checkpoint_every_n_steps=1,
        callbacks=[CrashAt(*crash_at)] if crash_at else [],
        log_to_console=False,
        progress=False,
    )


def compiled(out: Path, rank: int) -> None:
    """The step under torch.compile averages gradients too, in one graph."""
    x, y = data()

    def run(step: Any) -> fl.TrainState:
        state = fl.TrainState.create(mlp(), tx=tx())
        for i in range(4):
            rows = slice(i * GLOBAL_BATCH, (i + 1) * GLOBAL_BATCH)
            state, _ = step(state, (x[rows][rank::2], y[rows][rank::2]))
        return state

    def explain(step: Any) -> int:
        first = (fl.TrainState.create(mlp(), tx=tx()), (x[:8], y[:8]))
        return torch._dynamo.explain(step)(*first).graph_break_count

    def skipping() -> Any:  # decides each micro-batch's statistics together, too
        return fl.make_train_step(classify, accumulation_steps=2, on_nonfinite="skip")

    step = fl.make_train_step(classify)
    result = {
        "eager": run(step).params,
        "compiled": run(torch.compile(fl.make_train_step(classify))).params,
        "eager_skip": run(skipping()).params,
        "compiled_skip": run(torch.compile(skipping())).params,
        "graph_breaks": explain(step) + explain(skipping()),
    }
    torch.save(result, out / f"rank{rank}-compile.pt")


def masked_mean(model: Any, batch: Any) -> dict[str, torch.Tensor]:
    """The loss over the rows not labelled 2: in a micro-batch without such rows the mean
    of nothing, NaN, with finite (zero) gradients."""
    x, y = batch
    return {"loss": F.cross_entropy(model(x), y, reduction="none")[y != 2].mean()}


def raise_on_nan(rank: int, world: int = 2) -> dict[str, tuple[int, str] | None]:
    """on_nonfinite="raise" (k=2) with one bad micro-batch in the last process (``world=1``:
    one process on the whole batches): where it raised, as (call, the error's first
    words), for a NaN in the inputs of micro-batch 4 (it opens the third window) or 3
    (closes the second), and for micro-batch 2 with no row the masked loss keeps (a NaN
    loss with finite gradients, which the window's update does not show)."""
    x, y = data()
    found: dict[str, tuple[int, str] | None] = {}
    for case, at in [("nan_opening", 4), ("nan_closing", 3), ("empty_mask", 2)]:
        fn = masked_mean if case == "empty_mask" else classify
        state = fl.TrainState.create(mlp(), tx=tx())
        step = fl.make_train_step(fn, accumulation_steps=2, on_nonfinite="raise")
        found[case] = None
        for i in range(STEPS):
            rows = slice(i * GLOBAL_BATCH, (i + 1) * GLOBAL_BATCH)
            xb, yb = x[rows][rank::world].clone(), y[rows][rank::world].clone()
            if i == at and rank == world - 1:
                if case == "empty_mask":
                    yb[:] = 2
                else:
                    xb[0, 0] = float("nan")
            try:
                state, _ = step(state, (xb, yb))
            except FloatingPointError as e:
                found[case] = (i, " ".join(str(e).split()[:2]))
                break
    return found


class OwnCount(fl.callbacks.Callback):
    """Adds an epoch metric computed from this process's data only (its rank), also under
    a split whose name holds a "/"."""

    def on_train_epoch_end(self, state: Any, metrics: Any) -> Any:
        rank = torch.distributed.get_rank()
        history = fl.state.append_history(state.history, "train", {"own": rank})
        return state.replace(history=fl.state.append_history(history, "train/part", {"own": rank}))


def metric_names(rank: int) -> dict[str, Any]:
    """Processes that report different metrics: each is averaged over the processes that
    reported it, and an entry that is an output in any process is a metric in none. A
    metric a callback adds is rank 0's everywhere."""

    def step(model: Any, batch: Any) -> dict[str, Any]:
        # "pred" is an output in rank 0 (two elements) and looks like a metric in rank 1.
        pred = torch.zeros(2 - rank)
        return {**classify(model, batch), f"only{rank}": float(rank + 1), "pred": pred}

    x, y = data()
    ds = TensorDataset(x[:64], y[:64])
    sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=False)
    state = fl.fit(
        fl.TrainState.create(mlp(), tx=tx()),
        step,
        DataLoader(ds, batch_size=8, sampler=sampler),
        max_epochs=1,
        callbacks=[OwnCount()],
        log_to_console=False,
        progress=False,
    )
    return {
        **{k: list(v) for k, v in state.history["train"].items()},
        "splits": sorted(state.history),
        "part/own": list(state.history["train/part"]["own"]),
    }


def broadcast(rank: int) -> dict[str, Any]:
    """Rank 0 alone has trained (as if it alone had loaded a checkpoint): broadcast_state
    gives every process its tensors, counters, history and EMA decay, and one more step keeps them
    equal (the EMA takes the state.step > 0 branch everywhere). A process whose state has
    no EMA is refused in every process, before any tensor is sent."""
    x, y = data()
    state = fl.TrainState.create(mlp(), tx=tx(), ema_decay=0.9)
    if rank == 0:
        state = state.replace(
            params={n: p + 0.1 for n, p in state.params.items()},
            step=3,
            epoch=1,
            history={"train": {"loss": (0.5,)}},
            ema_decay=0.8,
        )
    state = broadcast_state(state)
    after = {"step": state.step, "epoch": state.epoch, "history": dict(state.history)}
    after["ema_decay"] = state.ema_decay
    state, _ = fl.make_train_step(classify)(state, (x[24:32][rank::2], y[24:32][rank::2]))
    after["ema"] = dict(state.ema)
    after["params"] = dict(state.params)
    try:
        broadcast_state(fl.TrainState.create(mlp(), tx=tx(), ema_decay=0.9 if rank else None))
    except ValueError as e:
        after["refused"] = str(e)
    # The same entries, a wider hidden layer in process 1: refused as well.
    wider = nn.Sequential(nn.Linear(6, 16 + rank), nn.Tanh(), nn.Linear(16 + rank, 3)).double()
    try:
        broadcast_state(fl.TrainState.create(wider, tx=tx()))
    except ValueError as e:
        after["refused_shape"] = str(e)
    # An open accumulation window and an fp16 loss scale, in rank 0's state alone (a
    # window's first micro-step makes no collective call).
    state = fl.TrainState.create(mlp(), tx=tx())
    if rank == 0:
        step = fl.make_train_step(classify, accumulation_steps=2, precision="fp16")
        state, _ = step(state, (x[:8], y[:8]))
    state = broadcast_state(state)
    after["window"] = {
        "micro_step": state.micro_step,
        **{f"grad_accum.{n}": g for n, g in state.grad_accum.items()},
        **state.loss_scale._asdict(),
    }
    return after


FINITE_ONLY_VALUES = [  # (rank, batch size, loss, acc): NaNs in either process
    (0, 3, 1.0, 0.5),
    (1, 2, float("nan"), 1.0),
    (0, 4, float("inf"), float("nan")),
    (1, 1, 4.0, 0.0),
    (1, 5, float("nan"), float("nan")),
]


def finite_only_means(rank: int | None) -> dict[str, float]:
    """MetricMeans(finite_only=True) over this process's values, averaged over the
    processes (``rank=None``: one process over all of them)."""
    means = fl.MetricMeans(finite_only=True)
    for r, n, loss, acc in FINITE_ONLY_VALUES:
        if rank is None or r == rank:
            means.add({"loss": torch.tensor(loss), "acc": torch.tensor(acc)}, n)
    return means.means(all_processes=rank is not None)


def skip_epoch_means(world: int, rank: int, k: int) -> dict[str, float]:
    """One epoch of a skipping step with accumulation over ``k``, a NaN in rank 1's rows
    of batches 2 (a window's first micro-batch for k=2) and 5 (an update): the epoch's
    means (``world=1``: one process on the whole batches)."""
    x, y = data()
    x = x.clone()
    for i in (2, 5):
        x[i * GLOBAL_BATCH + 1, 0] = float("nan")  # row 0 of rank 1's half
    batches = [
        (x[rows][rank::world], y[rows][rank::world])
        for rows in (slice(i * GLOBAL_BATCH, (i + 1) * GLOBAL_BATCH) for i in range(STEPS))
    ]
    step = fl.make_train_step(classify, accumulation_steps=k, on_nonfinite="skip")
    state, means = fl.train_epoch(fl.TrainState.create(mlp(), tx=tx()), step, batches)
    assert int(state.skipped_steps) == 2, int(state.skipped_steps)
    return means


def main() -> None:
    out = Path(sys.argv[1])
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    assert world == 2, world
    if sys.argv[2:] == ["--compile"]:
        compiled(out, rank)
        torch.distributed.destroy_process_group()
        return
    # Rows r, r + 2, ...: what DistributedSampler(shuffle=False) would hand this process.
    every_other = slice(rank, None, world)
    result = {
        "steps": steps(every_other).params,
        "steps_nan": steps(every_other, nan_at=4 if rank == 1 else None),
        "fit": fit(out / "run", world, rank, mlp()),
        "fit_bn": fit(None, world, rank, with_bn()),
        "fit_seeded": fit(None, world, rank, mlp(seed=rank)),  # rank 0's weights win
    }
    given: list[fl.TrainState] = []
    donated = fit(None, world, rank, mlp(seed=rank), given)  # rank 0's, in this one's memory
    result = {
        "steps": result["steps"],
        "steps_nan": result["steps_nan"].state_dict(),
        "skipped": int(result["steps_nan"].skipped_steps),
        "fit": result["fit"].state_dict(),
        "history": {k: dict(v) for k, v in result["fit"].history.items()},
        "fit_bn": result["fit_bn"].state_dict(),
        "fit_seeded": result["fit_seeded"].state_dict(),
        "fit_donated": donated.state_dict(),
        "fit_donated_in_place": all(
            a.data_ptr() == b.data_ptr()
            for a, b in zip(given[0].params.values(), donated.params.values())
        ),
    }
    result["raised_at"] = raise_on_nan(rank)
    updated, skipped = skip_with_bn(rank, world)
    result["skip_bn"] = skipped.state_dict()
    result["skip_bn_skipped"] = int(skipped.skipped_steps)
    result["skip_bn_opening"] = skip_with_bn(rank, world, nan_at=2)[1].state_dict()
    # The new buffers own their memory (not a view of the reduced gradients), also in
    # the state fit saves while an accumulation window is open.
    result["buffers_own_memory"] = own_memory(updated.buffers)
    x, y = data()
    first = (x[:GLOBAL_BATCH][rank::world], y[:GLOBAL_BATCH][rank::world])
    opened, _ = fl.make_train_step(classify, accumulation_steps=2)(
        fl.TrainState.create(with_bn(), tx=tx()), first
    )
    result["window_buffers_own_memory"] = own_memory(_window_mean(opened).buffers)
    result["refit_one"], result["refit_two"] = refit(world, rank)
    result["metric_names"] = metric_names(rank)
    result["finite_only_means"] = finite_only_means(rank)
    result["skip_epoch_means"] = [skip_epoch_means(world, rank, k) for k in (1, 2)]
    result["broadcast"] = broadcast(rank)
    result["unequal_validation"] = unequal_validation(world, rank)
    straight = resumable(out / "straight", world, rank)
    result["straight"] = straight.state_dict()
    result["straight_history"] = {k: dict(v) for k, v in straight.history.items()}
    for epoch, batch_idx in [(2, 0), (2, 2)]:
        folder = out / f"crash-{epoch}-{batch_idx}"
        try:
            resumable(folder, world, rank, crash_at=(epoch, batch_idx))
            raise AssertionError("no crash")
        except Crash:
            pass
        resumed = resumable(folder, world, rank)
        result[f"resumed-{epoch}-{batch_idx}"] = resumed.state_dict()
        result[f"resumed-{epoch}-{batch_idx}_history"] = {
            k: dict(v) for k, v in resumed.history.items()
        }
    torch.save(result, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
