"""One process of a run whose state has a leaf that is not a tensor, launched by
``torchrun`` from test_distributed.py.

Usage: torchrun --standalone --nproc_per_node=2 leaf_broadcast_job.py OUT_DIR

Each rank builds a state whose float field differs from the other rank's, broadcasts it,
and saves what it got to ``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

import fnloop as fl
from fnloop.distributed import broadcast_state


@dataclasses.dataclass(frozen=True, kw_only=True)
class Best(fl.TrainState):
    best: float = float("inf")


def main() -> None:
    out = Path(sys.argv[1])
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(rank)
    state = Best.create(torch.nn.Linear(3, 2), tx=fl.optim.adam(0.1), device="cpu")
    state = broadcast_state(state.replace(best=float(rank + 1)))
    torch.save({"best": state.best, "params": dict(state.params)}, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
