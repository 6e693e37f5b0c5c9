"""One process of a run set up wrongly or unusually, launched by ``torchrun`` from
test_distributed.py.

Usage: torchrun --standalone --nproc_per_node=2 bad_input_job.py OUT_DIR CASE

Runs ``CASE`` (a function below, given the rank and ``OUT_DIR``) and saves what it
returned to ``OUT_DIR/rank{r}.pt``.
The group times out after a minute, so a case that makes the processes wait for each
other fails instead of hanging the tests.
"""

from __future__ import annotations

import datetime
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import fnloop as fl
from fnloop import optim


def classify(model: Any, batch: Any) -> dict[str, torch.Tensor]:
    x, y = batch
    return {"loss": F.cross_entropy(model(x), y)}


def unequal_train(rank: int, out: Path) -> dict[str, Any]:
    """Train loaders of 5 and 4 batches: refused in both processes (not a hang)."""
    del out
    torch.manual_seed(0)
    n = 40 if rank == 0 else 32
    loader = DataLoader(TensorDataset(torch.randn(n, 4), torch.randint(0, 2, (n,))), 8)
    state = fl.TrainState.create(nn.Linear(4, 2), tx=optim.sgd(0.1))
    try:
        fl.fit(state, classify, loader, max_epochs=1, log_to_console=False, progress=False)
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def other_metric_names(rank: int, out: Path) -> dict[str, Any]:
    """Steps with on_nonfinite="skip" whose metric names differ by process (rank 0 alone
    reports "rare" and "rare2"), with and without accumulation: at call 1 rank 0's "rare"
    is NaN, at call 2 rank 1's loss. Which metrics each call returned finite, the
    parameters and the skipped updates."""
    del out
    out: dict[str, Any] = {}
    for k in (1, 2):

        def step_fn(model: Any, batch: Any, k: int = k) -> dict[str, torch.Tensor]:
            x, y, i = batch
            loss = F.cross_entropy(model(x), y)
            if rank == 1:
                return {"loss": loss * (math.nan if i == 2 * k else 1.0)}
            rare = loss.detach() * (math.nan if i == k else 2.0)
            return {"loss": loss, "rare": rare, "rare2": loss.detach() * 3}

        torch.manual_seed(0)
        state = fl.TrainState.create(nn.Linear(4, 2), tx=optim.sgd(0.1))
        step = fl.make_train_step(step_fn, accumulation_steps=k, on_nonfinite="skip")
        g = torch.Generator().manual_seed(rank)
        finite = []
        for i in range(3 * k):
            x, y = torch.randn(4, 4, generator=g), torch.randint(0, 2, (4,), generator=g)
            state, metrics = step(state, (x, y, i))
            finite.append({n: bool(torch.isfinite(v)) for n, v in metrics.items()})
        out[f"k{k}"] = {
            "finite": finite,
            "params": dict(state.params),
            "skipped": int(state.skipped_steps),
        }
    return out


def empty_valid_share(rank: int, out: Path | None = None, world: int = 2) -> dict[str, Any]:
    """A validation set of one example, shared as the guide says: rank 1's share is
    empty. The validation history of two epochs (``world=1``: one process on it all)."""
    del out
    torch.manual_seed(0)
    x, y = torch.randn(33, 4, dtype=torch.float64), torch.randint(0, 2, (33,))
    train = TensorDataset(x[:32], y[:32])
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=False)
    valid = Subset(TensorDataset(x[32:], y[32:]), range(rank, 1, world))
    state = fl.fit(
        fl.TrainState.create(nn.Linear(4, 2).double(), tx=optim.sgd(0.1)),
        classify,
        {
            "train": DataLoader(train, batch_size=8 // world, sampler=sampler),
            "valid": DataLoader(valid, batch_size=4),
        },
        max_epochs=2,
        log_to_console=False,
        progress=False,
    )
    return dict(state.history["valid"])


def valid_in_rank_0_alone(rank: int, out: Path) -> dict[str, Any]:
    """Validation in rank 0 alone (a pattern of hand-written DDP loops): refused in both
    processes, instead of their collective calls going out of step."""
    del out
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    loaders = {"train": DataLoader(data, batch_size=8, sampler=DistributedSampler(data))}
    if rank == 0:
        loaders["valid"] = DataLoader(data, batch_size=8)
    state = fl.TrainState.create(nn.Linear(4, 2), tx=optim.sgd(0.1))
    try:
        fl.fit(
            state,
            classify,
            loaders,
            max_epochs=1,
            monitor="train/loss",
            log_to_console=False,
            progress=False,
        )
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def window_in_rank_0(rank: int, out: Path) -> dict[str, Any]:
    """fit given a state with an open accumulation window in rank 0 alone (as if it
    alone had loaded a checkpoint), and one given that state in every process."""
    del out
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    step = fl.make_train_step(classify, accumulation_steps=2)
    loader = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, shuffle=False))
    out = {}
    for case, opened in [("rank0", rank == 0), ("everywhere", True)]:
        torch.manual_seed(1)
        state = fl.TrainState.create(nn.Linear(4, 2), tx=optim.sgd(0.1))
        if opened:
            state, _ = step(state, (data.tensors[0][:8], data.tensors[1][:8]))
        state = fl.fit(state, step, loader, max_epochs=1, log_to_console=False, progress=False)
        out[case] = {"params": dict(state.params), "counters": (state.step, state.micro_step)}
    return out


def best_model_after_fit(rank: int, out: Path) -> dict[str, Any]:
    """Whether best_model.pt is there in every process as soon as fit returns (to test
    the best model in every process, say)."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    loaders = {
        "train": DataLoader(data, batch_size=8, sampler=DistributedSampler(data)),
        "valid": DataLoader(Subset(data, range(rank, 32, 2)), batch_size=8),
    }
    state = fl.TrainState.create(nn.Linear(4, 2), tx=optim.sgd(0.1))
    run = out / "run"
    fl.fit(state, classify, loaders, max_epochs=1, out_dir=run, log_to_console=False)
    return {"best_model": (run / "best_model.pt").exists(), "plot": (run / "history.png").exists()}


def _fails_in(failing: int, rank: int, out: Path) -> dict[str, Any]:
    """A training step that raises in rank ``failing`` alone, at its third batch: fit
    raises in both processes (the other one's all-reduce is cut off), so this case
    returns nothing."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    loader = DataLoader(data, batch_size=8, sampler=DistributedSampler(data))
    calls = []

    def step(model: Any, batch: Any) -> dict[str, torch.Tensor]:
        calls.append(None)
        if rank == failing and len(calls) == 3:
            raise ValueError(f"a bug in rank {failing} alone")
        return classify(model, batch)

    state = fl.TrainState.create(nn.Linear(4, 2), tx=optim.sgd(0.1))
    fl.fit(state, step, loader, max_epochs=1, out_dir=out / "run", log_to_console=False)
    raise AssertionError("fit went on after a process failed")


def fails_in_rank_0(rank: int, out: Path) -> dict[str, Any]:
    return _fails_in(0, rank, out)


def fails_in_rank_1(rank: int, out: Path) -> dict[str, Any]:
    return _fails_in(1, rank, out)


class Records(logging.Handler):
    """Keeps the messages logged to it."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def train_samplers(rank: int, out: Path) -> dict[str, Any]:
    """What fit logs (to a handler the script attached to its logger, in every process)
    for a train loader without a DistributedSampler, with one, and over a Subset (this
    process's share)."""
    del out
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    loaders = {
        "plain": DataLoader(data, batch_size=4, shuffle=True),
        "sampler": DataLoader(data, batch_size=4, sampler=DistributedSampler(data)),
        "subset": DataLoader(Subset(data, range(rank, 32, 2)), batch_size=4, shuffle=True),
    }
    logs = {}
    for name, loader in loaders.items():
        records = Records()
        logging.getLogger("fnloop.run.run").addHandler(records)
        state = fl.TrainState.create(nn.Linear(4, 2), tx=optim.sgd(0.1))
        fl.fit(state, classify, loader, max_epochs=1, log_to_console=False, progress=False)
        logging.getLogger("fnloop.run.run").removeHandler(records)
        logs[name] = records.messages
    return logs


def main() -> None:
    out, case = Path(sys.argv[1]), sys.argv[2]
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = torch.distributed.get_rank()
    torch.save(globals()[case](rank, out), out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
