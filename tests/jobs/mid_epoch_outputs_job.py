"""A mid-epoch checkpoint written by two processes, launched by ``torchrun`` from
test_distributed.py (one process resumes it there).

Usage: torchrun --standalone --nproc_per_node=2 mid_epoch_outputs_job.py OUT_DIR

The step returns predictions (one per example: an output, not a metric). Each process
trains on 12 examples in batches of 4 and the run stops after batch 2 of epoch 1, so the
newest checkpoint holds each process's partial means after 2 batches.
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


class Crash(Exception):
    pass


class CrashAt(fl.callbacks.Callback):
    """Raises after batch 2 of epoch 1 (before the checkpoint of that batch)."""

    def on_train_batch_end(self, state: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if state.epoch == 0 and batch_idx == 2:
            raise Crash


def step(model: Any, batch: Any) -> dict[str, torch.Tensor]:
    x, y = batch
    logits = model(x)
    return {"loss": F.cross_entropy(logits, y), "pred": logits.argmax(-1).double()}


def run(out_dir: Path, world: int, rank: int, n: int, crash: bool = False) -> fl.TrainState:
    """One epoch over ``n`` examples (this process's share with ``world`` > 1), batches
    of 4, a checkpoint after every update."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    ds = TensorDataset(x, y)
    sampler = (
        DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
    )
    torch.manual_seed(0)
    return fl.fit(
        fl.TrainState.create(nn.Linear(4, 3).double(), tx=optim.sgd(0.1)),
        fl.make_train_step(step),
        DataLoader(ds, batch_size=4, sampler=sampler),
        max_epochs=1,
        out_dir=out_dir,
        checkpoint_every_n_steps=1,
        callbacks=[CrashAt()] if crash else [],
        log_to_console=False,
        progress=False,
    )


def main() -> None:
    out = Path(sys.argv[1])
    torch.distributed.init_process_group("gloo")
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    try:
        run(out, world, rank, 24, crash=True)
        raise AssertionError("no crash")
    except Crash:
        pass
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
